"""Algorithm 1's per-member priors: reuse across committees and per-member train overrides."""

import json
import logging
from pathlib import Path

import pytest
import torch

from cvdd.config import load_config
from cvdd.data import load_dataset
from cvdd.prior import compute_priors, load_or_compute_priors, prior_fingerprint
from cvdd.runs import RunFolder
from cvdd.train import member_fingerprint

DIGITS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
TINY = ["workers=1", "committee.members=[resnet18, mobilenet_v2]", "committee.width=0.125",
        "prior.member_epochs=1", "prior.iterations=2", "prior.student_epochs=1", "prior.ipc=1"]


def tiny(*overrides):
    return load_config(DIGITS_CONFIG, TINY + list(overrides))


@pytest.fixture(scope="module")
def two_member_run(tmp_path_factory):
    cfg = tiny()
    dataset = load_dataset(cfg.data)
    run = RunFolder(tmp_path_factory.mktemp("prior") / "run")
    run.create()
    priors = compute_priors(cfg, dataset, run, torch.device("cpu"))
    return cfg, dataset, run, priors


def test_priors_are_written_once_per_member(two_member_run):
    _, _, run, priors = two_member_run
    for arch in ("resnet18", "mobilenet_v2"):
        saved = json.loads((run.root / "prior" / "alpha" / f"{arch}.json").read_text())
        assert saved["alpha"] == priors["alpha"][arch]
        assert saved["seconds"] > 0


def test_smaller_committee_reuses_member_priors(two_member_run, caplog):
    _, dataset, run, priors = two_member_run
    single = tiny("committee.members=[resnet18]", "synthesis.experts=1")
    with caplog.at_level(logging.INFO, logger="cvdd.prior"):
        alpha = load_or_compute_priors(single, dataset, run, torch.device("cpu"))
    assert alpha == {"resnet18": priors["alpha"]["resnet18"]}
    assert "reused from" in caplog.text
    assert "held-out" not in caplog.text


def test_stored_labels_reuse_the_priors(two_member_run):
    cfg, dataset, run, priors = two_member_run
    stored = tiny("evaluate.labels=stored", "evaluate.label_top_k=3", "evaluate.augment_seed=7")
    assert prior_fingerprint(stored, dataset) == prior_fingerprint(cfg, dataset)
    assert load_or_compute_priors(stored, dataset, run, torch.device("cpu")) == priors["alpha"]


def test_train_override_recomputes_only_that_member(two_member_run, caplog):
    cfg, dataset, run, priors = two_member_run
    overfit = tiny("committee.train={mobilenet_v2: {augment: false}}")
    assert member_fingerprint(overfit, dataset, "resnet18") == member_fingerprint(cfg, dataset, "resnet18")
    assert member_fingerprint(overfit, dataset, "mobilenet_v2") != member_fingerprint(cfg, dataset, "mobilenet_v2")
    with caplog.at_level(logging.INFO, logger="cvdd.prior"):
        alpha = load_or_compute_priors(overfit, dataset, run, torch.device("cpu"))
    assert alpha["resnet18"] == priors["alpha"]["resnet18"]
    assert "prior of resnet18: alpha" in caplog.text
    assert "reused from" in caplog.text
    assert "prior of mobilenet_v2: alpha" in caplog.text
    recomputed = [line for line in caplog.text.splitlines() if "prior of mobilenet_v2" in line]
    assert all("reused" not in line for line in recomputed)


def test_member_train_override_merges_over_committee_epochs():
    cfg = tiny("committee.epochs={resnet18: 3}", "committee.train={resnet18: {augment: false, lr: 0.2}}")
    train = cfg.member_train("resnet18")
    assert (train.epochs, train.augment, train.lr) == (3, False, 0.2)
    assert cfg.member_train("mobilenet_v2") == cfg.train


def test_member_train_override_with_unknown_key_names_it():
    from cvdd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"committee\.train\.resnet18\.augmnt"):
        tiny("committee.train={resnet18: {augmnt: false}}")


def test_evaluate_bssl_off_reuses_priors(two_member_run):
    from cvdd.prior import _member_alpha_key

    cfg, dataset, _, _ = two_member_run
    no_bssl = tiny("evaluate.bssl=false")

    assert prior_fingerprint(no_bssl, dataset) == prior_fingerprint(cfg, dataset)
    for arch in ("resnet18", "mobilenet_v2"):
        assert _member_alpha_key(no_bssl, dataset, arch) == _member_alpha_key(cfg, dataset, arch)


def test_prior_bssl_off_changes_key(two_member_run):
    cfg, dataset, _, _ = two_member_run

    assert prior_fingerprint(tiny("prior.bssl=false"), dataset) != prior_fingerprint(cfg, dataset)
    assert prior_fingerprint(tiny("prior.bssl=true"), dataset) == prior_fingerprint(cfg, dataset)


def test_member_train_epochs_kept_for_prior():
    from cvdd.prior import _prior_member_train

    cfg = tiny("committee.train={mobilenet_v2: {augment: false, epochs: 7}}")
    dataset = load_dataset(cfg.data)

    assert _prior_member_train(cfg, dataset, "mobilenet_v2")[0].epochs == 7
    assert _prior_member_train(cfg, dataset, "resnet18")[0].epochs == 1
