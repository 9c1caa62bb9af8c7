"""Tests of cvdd.synthesis: one synthesis batch, the work split and `distill` end to end.

The committee is two tiny BatchNorm ConvNets at width 0.125 on the 8 px digits, with
random weights and running statistics measured on real digits, so every test runs in
seconds on a CPU.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cvdd.synthesis
from cvdd.config import SynthesisConfig
from cvdd.data import load_digits_dataset
from cvdd.errors import ConfigError, CvddError
from cvdd.models import create_model
from cvdd.synthesis import Expert, WorkItem, distill, synthesize_item, work_items
from cvdd.voting import prior_weights

WIDTH = 0.125
PRIORS = {"convnet": 70.0, "convnet4": 60.0}


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def frozen_member(arch: str, dataset, seed: int) -> nn.Module:
    """Build a member with BatchNorm running statistics of real digits, frozen as load_committee leaves it."""
    torch.manual_seed(seed)
    model = create_model(arch, dataset.num_classes, dataset.channels, dataset.image_size, WIDTH)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in (0, 256):
            model(dataset.normalize(dataset.train.get(range(start, start + 256))))
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def committee(digits):
    return {"convnet": frozen_member("convnet", digits, 0), "convnet4": frozen_member("convnet4", digits, 1)}


def first_image_of_each_class(dataset) -> torch.Tensor:
    indices = [int(dataset.train.indices_of_class(c)[0]) for c in range(dataset.num_classes)]
    return dataset.normalize(dataset.train.get(indices))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert len(module._forward_pre_hooks) == 0, f"module {name!r} still has forward pre-hooks"


def totals_per_iteration(rows: list[dict], r_bn: float) -> list[float]:
    """Return sum_i w_i * (CE_i + r_bn * BN_i) for each logged iteration, from the log rows."""
    totals: dict[int, float] = {}
    for row in rows:
        totals[row["iteration"]] = totals.get(row["iteration"], 0.0) + row["weight"] * (row["ce"] + r_bn * row["bn"])
    return [totals[i] for i in sorted(totals)]


def two_experts(committee) -> list[Expert]:
    return [Expert(name, committee[name], PRIORS[name], needs_bn=True) for name in ("convnet", "convnet4")]


def remove_hooks(experts: list[Expert]) -> None:
    for expert in experts:
        expert.hook.remove()


# --- synthesize_item ----------------------------------------------------------------------------


def test_synthesize_item_lowers_loss(digits, committee):
    cfg = SynthesisConfig(iterations=15, r_bn=0.01)
    item = WorkItem(0, 0, list(range(10)))
    experts = two_experts(committee)
    weights = prior_weights([70.0, 60.0], 5.0)

    images, rows = synthesize_item(item, experts, weights, digits, cfg, first_image_of_each_class(digits),
                                   "cpu", seed=0, use_crop=True)
    remove_hooks(experts)

    assert images.shape == (10, 1, 8, 8)
    assert len(rows) == 15 * 2
    totals = totals_per_iteration(rows, cfg.r_bn)
    assert totals[-1] < totals[0], f"loss per iteration: {totals}"
    # Random crops make single iterations noisy, so compare the first and last three as well.
    assert sum(totals[-3:]) < sum(totals[:3]), f"loss per iteration: {totals}"


def test_synthesize_item_members_untouched(digits, committee):
    cfg = SynthesisConfig(iterations=5, r_bn=0.01)
    item = WorkItem(0, 0, list(range(10)))
    experts = two_experts(committee)
    before = {name: state_snapshot(model) for name, model in committee.items()}

    synthesize_item(item, experts, prior_weights([70.0, 60.0], 5.0), digits, cfg,
                    first_image_of_each_class(digits), "cpu", seed=0, use_crop=True)
    remove_hooks(experts)

    for name, model in committee.items():
        for parameter_name, parameter in model.named_parameters():
            assert parameter.grad is None, f"{name}.{parameter_name} received a gradient"
        after = model.state_dict()
        for key, value in before[name].items():
            assert torch.equal(after[key], value), f"{name}.{key} changed"
        assert not model.training


def test_synthesize_item_pixels_stay_in_range(digits, committee):
    cfg = SynthesisConfig(iterations=6, r_bn=0.01, lr=1.0)
    item = WorkItem(0, 0, list(range(10)))
    experts = two_experts(committee)
    # Noise in normalised space reaches well outside the valid pixel range, so the projection has work to do.
    init = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert (digits.denormalize(init) < 0).any()
    assert (digits.denormalize(init) > 1).any()

    # Record what synthesize_item denormalises before it clamps, to check the optimised pixels themselves.
    recorded = []
    recording = dataclasses.replace(digits)

    def denormalize_and_record(images):
        result = digits.denormalize(images)
        recorded.append(result.detach().clone())
        return result

    recording.denormalize = denormalize_and_record
    images, _ = synthesize_item(item, experts, prior_weights([70.0, 60.0], 5.0), recording, cfg, init,
                                "cpu", seed=0, use_crop=False)
    remove_hooks(experts)

    assert recorded, "synthesize_item did not denormalise the result"
    assert recorded[-1].min() >= -1e-6
    assert recorded[-1].max() <= 1 + 1e-6
    assert images.min() >= 0
    assert images.max() <= 1
    assert images.device.type == "cpu"


def test_synthesize_item_log_rows(digits, committee):
    cfg = SynthesisConfig(iterations=4, r_bn=0.01, lr=0.25, callback_every=2)
    item = WorkItem(1, 0, list(range(10)))
    experts = two_experts(committee)
    weights = torch.tensor([0.8, 0.2])
    calls = []

    _, rows = synthesize_item(item, experts, weights, digits, cfg, first_image_of_each_class(digits), "cpu",
                              seed=0, use_crop=True, callback=calls.append)
    remove_hooks(experts)

    assert [row["iteration"] for row in rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [row["expert"] for row in rows[:2]] == ["convnet", "convnet4"]
    assert all(row["item"] == "ipc001-block000" for row in rows)
    assert [row["weight"] for row in rows[:2]] == pytest.approx([0.8, 0.2])
    # Cosine from 0.25: 0.125 * (1 + cos(pi * t / 4)) for t = 0..3.
    learning_rates = [row["lr"] for row in rows[::2]]
    assert learning_rates == pytest.approx([0.25, 0.2133883, 0.125, 0.0366117], abs=1e-6)
    assert all(row["bn"] > 0 for row in rows)
    assert [call["iteration"] for call in calls] == [2, 4]
    assert calls[-1]["images"].shape == (10, 1, 8, 8)


def test_synthesize_item_online_reweighting(digits, committee):
    cfg = SynthesisConfig(iterations=3, r_bn=0.01)
    experts = two_experts(committee)

    _, rows = synthesize_item(WorkItem(0, 0, list(range(10))), experts, torch.tensor([0.9, 0.1]), digits, cfg,
                              first_image_of_each_class(digits), "cpu", seed=0, use_crop=True, online=True)
    remove_hooks(experts)

    weights = [row["weight"] for row in rows]
    # Equal at the first iteration, the given weights at the last, halfway in between.
    assert weights == pytest.approx([0.5, 0.5, 0.7, 0.3, 0.9, 0.1], abs=1e-6)


def test_synthesize_item_partial_aggregation(digits, committee):
    cfg = SynthesisConfig(iterations=2, r_bn=0.01)
    experts = two_experts(committee)

    _, rows = synthesize_item(WorkItem(0, 0, list(range(10))), experts, torch.tensor([0.5, 0.5]), digits, cfg,
                              first_image_of_each_class(digits), "cpu", seed=0, use_crop=True, partial=True)
    remove_hooks(experts)

    # Only the strongest expert (convnet, prior 70) contributes a BN term.
    for row in rows:
        if row["expert"] == "convnet":
            assert row["bn"] > 0
        else:
            assert row["bn"] == 0.0
        assert row["ce"] > 0


# --- work_items ---------------------------------------------------------------------------------


# Hand counts of class blocks for 10 classes: ceil(10 / batch size), and one block of all 10 by default.
BLOCKS_FOR_10_CLASSES = {None: 1, 1: 10, 3: 4, 4: 3, 5: 2, 10: 1, 12: 1}


@pytest.mark.parametrize("batch_size", list(BLOCKS_FOR_10_CLASSES))
def test_work_items_cover_each_pair_once(batch_size):
    cfg = SynthesisConfig(ipc=3, batch_size=batch_size)

    items = work_items(cfg, 10)

    pairs = Counter((item.ipc_index, cls) for item in items for cls in item.classes)
    assert set(pairs) == {(k, c) for k in range(3) for c in range(10)}
    assert set(pairs.values()) == {1}
    assert len(items) == 3 * BLOCKS_FOR_10_CLASSES[batch_size]
    limit = batch_size or 10
    assert all(1 <= len(item.classes) <= limit for item in items)
    assert len({item.name for item in items}) == len(items)


def test_work_items_last_block_short():
    items = work_items(SynthesisConfig(ipc=1, batch_size=3), 10)
    assert [item.classes for item in items] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_work_items_default_block_100():
    items = work_items(SynthesisConfig(ipc=1), 150)
    assert [len(item.classes) for item in items] == [100, 50]


# --- distill: input checks ----------------------------------------------------------------------


def small_config(**changes) -> SynthesisConfig:
    values = {"ipc": 1, "iterations": 3, "experts": 2, "r_bn": 0.01}
    values.update(changes)
    return SynthesisConfig(**values)


def test_distill_missing_prior(digits, committee, tmp_path):
    with pytest.raises(ConfigError, match="convnet4"):
        distill("cvdd", committee, {"convnet": 70.0}, digits, small_config(), tmp_path, "cpu")


def test_distill_too_many_experts(digits, committee, tmp_path):
    with pytest.raises(ConfigError, match="N=3"):
        distill("cvdd", committee, PRIORS, digits, small_config(experts=3), tmp_path, "cpu")


def test_distill_unknown_method(digits, committee, tmp_path):
    with pytest.raises(ConfigError, match="'dm'"):
        distill("dm", committee, PRIORS, digits, small_config(), tmp_path, "cpu")


def test_distill_member_without_batchnorm(digits, tmp_path):
    without_bn = create_model("convnet_in", 10, 1, 8, WIDTH).eval().requires_grad_(False)

    with pytest.raises(CvddError, match="'convnet_in'"):
        distill("cvdd", {"convnet_in": without_bn}, {"convnet_in": 50.0}, digits, small_config(experts=1),
                tmp_path, "cpu")


def test_distill_failed_check_removes_hooks(digits, tmp_path):
    with_bn = frozen_member("convnet", digits, 0)
    without_bn = create_model("convnet_in", 10, 1, 8, WIDTH).eval().requires_grad_(False)

    with pytest.raises(CvddError, match="'convnet_in'"):
        distill("cvdd", {"convnet": with_bn, "convnet_in": without_bn}, {"convnet": 70.0, "convnet_in": 50.0},
                digits, small_config(), tmp_path, "cpu")

    assert_no_hooks(with_bn)


def test_distill_without_bn_term_accepts_member_without_batchnorm(digits, tmp_path):
    without_bn = create_model("convnet_in", 10, 1, 8, WIDTH).eval().requires_grad_(False)

    result = distill("sre2l++", {"convnet_in": without_bn}, {}, digits, small_config(r_bn=0.0, iterations=1),
                     tmp_path, "cpu")

    assert result["images"].shape == (10, 1, 8, 8)


# --- distill: outputs, reproducibility and resuming ---------------------------------------------


def test_distill_writes_outputs(digits, committee, tmp_path):
    result = distill("cvdd", committee, PRIORS, digits, small_config(), tmp_path, "cpu", seed=0)

    images = result["images"]
    assert images.shape == (10, 1, 8, 8)
    assert images.min() >= 0
    assert images.max() <= 1
    assert torch.equal(result["labels"], torch.arange(10))
    assert result["class_names"] == digits.class_names

    saved = torch.load(tmp_path / "images.pt", weights_only=False)
    assert torch.equal(saved["images"], images)

    with open(tmp_path / "synthesis.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # One item (ipc 1, all 10 classes in one block), 3 iterations, 2 experts.
    assert len(rows) == 3 * 2
    assert {row["expert"] for row in rows} == {"convnet", "convnet4"}

    for cls, name in enumerate(digits.class_names):
        path = tmp_path / "png" / name / "0000.png"
        assert path.is_file(), f"missing {path}"
        pixels = np.asarray(Image.open(path))
        expected = (images[cls, 0] * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels, expected), f"PNG of class {name} differs from the images tensor"

    for name, model in committee.items():
        assert_no_hooks(model)


def test_distill_same_seed_identical(digits, committee, tmp_path):
    first = distill("cvdd", committee, PRIORS, digits, small_config(), tmp_path / "a", "cpu", seed=7)
    second = distill("cvdd", committee, PRIORS, digits, small_config(), tmp_path / "b", "cpu", seed=7)
    other = distill("cvdd", committee, PRIORS, digits, small_config(), tmp_path / "c", "cpu", seed=8)

    assert torch.equal(first["images"], second["images"])
    assert first["draws"] == second["draws"]
    assert not torch.equal(first["images"], other["images"])


def test_distill_rerun_skips_finished_items(digits, committee, tmp_path, monkeypatch):
    cfg = small_config()
    first = distill("cvdd", committee, PRIORS, digits, cfg, tmp_path, "cpu", seed=0)

    def raise_if_called(*args, **kwargs):
        raise AssertionError("synthesize_item was called for an item that is already finished")

    monkeypatch.setattr(cvdd.synthesis, "synthesize_item", raise_if_called)
    second = distill("cvdd", committee, PRIORS, digits, cfg, tmp_path, "cpu", seed=0)

    assert torch.equal(first["images"], second["images"])
    assert torch.equal(first["labels"], second["labels"])


def test_distill_changed_config_redoes_items(digits, committee, tmp_path, monkeypatch):
    distill("cvdd", committee, PRIORS, digits, small_config(), tmp_path, "cpu", seed=0)

    class Resynthesised(Exception):
        pass

    def raise_if_called(*args, **kwargs):
        raise Resynthesised

    monkeypatch.setattr(cvdd.synthesis, "synthesize_item", raise_if_called)
    with pytest.raises(Resynthesised):
        distill("cvdd", committee, PRIORS, digits, small_config(iterations=4), tmp_path, "cpu", seed=0)


def test_distill_ipc2_class_major_order(digits, committee, tmp_path):
    result = distill("cvdd", committee, PRIORS, digits, small_config(ipc=2, iterations=1, batch_size=4),
                     tmp_path, "cpu", seed=0)

    # Class-major: rows 2c and 2c + 1 hold class c.
    assert result["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert len(result["draws"]) == 2 * math.ceil(10 / 4)
    for cls, name in enumerate(digits.class_names):
        assert (tmp_path / "png" / name / "0000.png").is_file()
        assert (tmp_path / "png" / name / "0001.png").is_file()


def test_real_initialisation_starts_from_the_random_subset(digits, committee, tmp_path):
    from cvdd.synthesis import random_subset

    # One step at a negligible lr leaves the images where they started.
    cfg = SynthesisConfig(ipc=2, iterations=1, lr=1e-9)
    distilled = distill("sre2l++", committee, {}, digits, cfg, tmp_path / "sre2l++", "cpu", seed=3)
    subset = random_subset(digits, ipc=2, seed=3)
    assert torch.equal(distilled["labels"], subset["labels"])
    assert torch.allclose(distilled["images"], subset["images"], atol=1e-6)


def test_flip_follows_the_argument(digits, committee, monkeypatch):
    calls = []
    original = cvdd.synthesis.random_resized_crop

    def recording(images, **kwargs):
        calls.append(kwargs["flip"])
        return original(images, **kwargs)

    monkeypatch.setattr(cvdd.synthesis, "random_resized_crop", recording)
    item = WorkItem(0, 0, list(range(digits.num_classes)))
    cfg = SynthesisConfig(ipc=1, iterations=2)
    experts = [Expert("convnet", committee["convnet"], 70.0, True)]
    try:
        for flip in (True, False):
            synthesize_item(item, experts, torch.ones(1), digits, cfg, first_image_of_each_class(digits), "cpu", 0,
                            use_crop=True, flip=flip)
    finally:
        remove_hooks(experts)
    assert calls == [True, True, False, False]


def test_compiled_expert_compiles_once(digits, committee, monkeypatch):
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    from cvdd.bn import bn_matching_loss

    # The eager backend keeps the test fast; recompiles come from dynamo's guards, not the backend.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    expert = Expert("convnet", committee["convnet"], PRIORS["convnet"], needs_bn=True, compile=True)
    images = first_image_of_each_class(digits)
    try:
        for _ in range(3):
            expert(images.clone().requires_grad_(True))
            bn_matching_loss(expert.hook).backward()
    finally:
        expert.hook.remove()
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()

    assert graphs == 1
