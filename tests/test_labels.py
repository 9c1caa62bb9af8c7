"""The label store: replayed batches and soft labels against the on-the-fly stream they record."""

import torch
import pytest

from cvdd.config import EvalConfig
from cvdd.data import ImageDataset, TensorSplit
from cvdd.errors import CvddError
from cvdd.evaluate import Committee, augmented_batches, train_student
from cvdd.labels import LabelStore, build_label_store
from cvdd.models import create_model

CLASSES, SIZE, IMAGES = 4, 16, 22


@pytest.fixture(scope="module")
def setting():
    generator = torch.Generator().manual_seed(0)
    test = TensorSplit(torch.randint(0, 256, (12, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator),
                       torch.arange(12) % CLASSES)
    dataset = ImageDataset(name="tiny", class_names=[str(c) for c in range(CLASSES)], channels=3, image_size=SIZE,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=test, test=test, identity="tiny")
    teachers = {}
    for index, arch in enumerate(("resnet18", "mobilenet_v2")):
        torch.manual_seed(index)
        teachers[arch] = create_model(arch, CLASSES, 3, SIZE, 0.125).eval().requires_grad_(False)
    committee = Committee(teachers, torch.tensor([0.7, 0.3]), dataset.class_names)
    images = torch.rand(IMAGES, 3, SIZE, SIZE, generator=generator)
    labels = torch.arange(IMAGES) % CLASSES
    cfg = EvalConfig(epochs=3, eval_every=3, batch_size=8)
    store = build_label_store(images, dataset, cfg, committee, True, 5, CLASSES, torch.device("cpu"), "test")
    return dataset, committee, images, labels, cfg, store


def test_replayed_batches_match_the_stream_they_were_drawn_from(setting):
    dataset, committee, images, _, cfg, store = setting
    normalized = dataset.normalize(images)
    live = augmented_batches(normalized, cfg, cfg.epochs, 8, True, torch.Generator().manual_seed(5))
    replayed = store.batches(normalized, torch.device("cpu"))
    count = 0
    for (epoch, rows, _, mix, x), (epoch2, rows2, _, mix2, x2, targets) in zip(live, replayed):
        assert epoch == epoch2
        assert torch.equal(rows, rows2)
        assert torch.equal(x, x2)
        assert mix.lam == pytest.approx(mix2.lam, abs=1e-12)
        expected = committee.soft_labels(x, cfg.tau, cfg.bssl, cfg.soft_label_space)
        # float16 keeps about three significant digits of each probability.
        assert torch.allclose(targets, expected, atol=2e-3, rtol=0)
        count += 1
    # 22 images in batches of 8: 8, 8, 6 per epoch, three epochs.
    assert count == 9


def test_bytes_per_image_per_epoch(setting):
    *_, store = setting
    # order int32 (4) + crop 4 x int16 (8) + flip (1) + partner int16 (2) + 4 values float16 (8)
    # + 4 classes int16 (8) per image, plus one CutMix box 4 x int16 (8) per batch: 3 batches / 22 images.
    assert store.bytes_per_image_epoch() == pytest.approx(31 + 8 * 3 / 22)


def test_top_k_keeps_the_largest_and_renormalises(setting):
    dataset, committee, images, _, cfg, _ = setting
    store = build_label_store(images, dataset, cfg, committee, True, 5, 2, torch.device("cpu"), "top2")
    normalized = dataset.normalize(images)
    _, _, _, _, x, targets = next(store.batches(normalized, torch.device("cpu")))
    full = committee.soft_labels(x, cfg.tau, cfg.bssl, cfg.soft_label_space)
    values, classes = full.topk(2, dim=1)
    expected = torch.zeros_like(full).scatter_(1, classes, values / values.sum(1, keepdim=True))
    assert (targets > 0).sum(dim=1).eq(2).all()
    assert torch.allclose(targets, expected, atol=2e-3)


def test_stored_student_matches_on_the_fly_student_with_the_same_stream(setting, tmp_path):
    """With the augmentation seed equal to the student seed, only float16 rounding separates the two."""
    dataset, committee, images, labels, cfg, _ = setting
    store = build_label_store(images, dataset, cfg, committee, True, 11, CLASSES, torch.device("cpu"), "seed11")
    store.save(tmp_path / "store.pt")
    loaded = LabelStore.load(tmp_path / "store.pt")
    live = train_student(images, labels, dataset, cfg, "resnet18", 0.125, torch.device("cpu"), 11, committee=committee)
    stored = train_student(images, labels, dataset, cfg, "resnet18", 0.125, torch.device("cpu"), 11,
                           committee=committee, stored=loaded)
    for a, b in zip(live["curve"], stored["curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
    assert stored["protocol"]["labels"] == "stored"
    assert stored["protocol"]["label_store"]["top_k"] == CLASSES


def test_store_made_for_other_epochs_is_refused(setting):
    dataset, committee, images, labels, cfg, store = setting
    longer = EvalConfig(epochs=4, eval_every=4, batch_size=8)
    with pytest.raises(CvddError, match="3 epochs.*4 epochs"):
        train_student(images, labels, dataset, longer, "resnet18", 0.125, torch.device("cpu"), 0,
                      committee=committee, stored=store)


def test_stored_mode_writes_its_own_results_and_reuses_the_store(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
    sets = ["workers=1", "committee.members=[resnet18]", "committee.width=0.125", "train.epochs=1",
            "prior.values={resnet18: 80.0}", "synthesis.experts=1", "synthesis.ipc=2", "synthesis.iterations=2",
            "evaluate.epochs=2", "evaluate.eval_every=2", "evaluate.seeds=[0,1]", "evaluate.label_modes=[soft,hard]",
            "methods=[random]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CVDD_NO_PROGRESS": "1", "CVDD_CACHE": str(tmp_path / "cache")}

    def cvdd(*extra):
        args = [sys.executable, "-m", "cvdd", "run", "--config", str(config), "--run-dir", str(tmp_path / "run")]
        for assignment in [*sets, *extra]:
            args += ["--set", assignment]
        result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    cvdd()
    live = (tmp_path / "run" / "eval" / "random" / "resnet18-soft-seed0.json").read_text()
    hard = (tmp_path / "run" / "eval" / "random" / "resnet18-hard-seed0.json").read_text()
    first = cvdd("evaluate.labels=stored")
    # Hard-label students read no labels, so only the two stored-label students train.
    assert "2 of 4 items to train (2 reused)" in first.stderr
    assert (tmp_path / "run" / "eval" / "random" / "resnet18-hard-seed0.json").read_text() == hard
    stores = list((tmp_path / "run" / "labels" / "random").glob("*.pt"))
    assert len(stores) == 1
    stored = json.loads((tmp_path / "run" / "eval" / "random" / "resnet18-soft-stored-seed0.json").read_text())
    assert stored["protocol"]["labels"] == "stored"
    assert (tmp_path / "run" / "eval" / "random" / "resnet18-soft-seed0.json").read_text() == live
    before = stores[0].stat().st_mtime_ns
    again = cvdd("evaluate.labels=stored")
    assert "0 reused" not in again.stderr
    assert stores[0].stat().st_mtime_ns == before
