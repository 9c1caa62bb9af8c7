"""Tests of config loading, `--set` overrides, validation, YAML output and fingerprints."""

from pathlib import Path

import pytest
import yaml

from cvdd.config import (
    RunConfig,
    apply_override,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    fingerprint,
    hash_view,
    load_config,
)
from cvdd.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DIGITS = CONFIGS / "digits.yaml"
CIFAR10_CPU = CONFIGS / "cifar10-cpu.yaml"


def assert_one_line(message: str) -> None:
    assert "\n" not in message, f"message spans several lines: {message!r}"


def config_error(overrides, path=DIGITS) -> str:
    """Return the ConfigError message that loading `path` with `overrides` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert_one_line(message)
    return message


# --- loading the shipped configs ---------------------------------------------------------------


@pytest.mark.parametrize("path", [DIGITS, CIFAR10_CPU], ids=["digits", "cifar10-cpu"])
def test_shipped_config_matches_file(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    loaded = config_to_dict(cfg)

    assert isinstance(cfg, RunConfig)
    for section, value in raw.items():
        if isinstance(value, dict):
            for key, item in value.items():
                assert loaded[section][key] == item, f"{section}.{key}"
        else:
            assert loaded[section] == value, section


def test_digits_config_values():
    cfg = load_config(DIGITS)

    assert cfg.name == "digits"
    assert cfg.data.dataset == "digits"
    assert cfg.committee.width == 0.25
    assert isinstance(cfg.train.epochs, int)
    assert cfg.train.crop_scale == (0.5, 1.0)
    assert cfg.train.flip is False
    assert cfg.resolved_run_dir() == Path("runs") / "digits"


def test_cifar10_cpu_member_overrides():
    cfg = load_config(CIFAR10_CPU)

    assert cfg.data.dataset == "imagefolder"
    assert cfg.train.precision == "bf16"
    assert cfg.member_width("resnet50") == 0.125
    assert cfg.member_width("resnet18") == cfg.committee.width
    assert cfg.member_train("resnet50").epochs == 4
    assert cfg.member_train("resnet18").epochs == 12
    assert cfg.train.epochs == 10


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    message = config_error([], path)
    assert str(path) in message
    assert "not found" in message


def test_no_config_file_gives_defaults():
    assert load_config(None) == RunConfig()


# --- overrides -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "assignment, section, key, expected",
    [
        ("train.epochs=3", "train", "epochs", 3),
        ("train.lr=0.5", "train", "lr", 0.5),
        ("train.flip=true", "train", "flip", True),
        ("data.root=null", "data", "root", None),
        ("data.root=/data/cifar10", "data", "root", "/data/cifar10"),
        ("committee.members=[resnet18, convnet]", "committee", "members", ["resnet18", "convnet"]),
        ("committee.widths={resnet50: 0.5}", "committee", "widths", {"resnet50": 0.5}),
    ],
)
def test_apply_override_parses_yaml_value(assignment, section, key, expected):
    data = {"train": {"epochs": 20}}

    apply_override(data, assignment)

    assert data[section][key] == expected
    assert type(data[section][key]) is type(expected)


def test_apply_override_keeps_other_keys():
    data = {"train": {"epochs": 20, "lr": 0.1}}
    apply_override(data, "train.epochs=3")
    assert data == {"train": {"epochs": 3, "lr": 0.1}}


def test_apply_override_top_level_key():
    data = {}
    apply_override(data, "name=a=b")
    assert data == {"name": "a=b"}


def test_override_changes_loaded_value():
    base = load_config(DIGITS)
    cfg = load_config(DIGITS, ["train.epochs=3"])

    assert cfg.train.epochs == 3
    assert type(cfg.train.epochs) is int
    assert cfg.train.lr == base.train.lr
    assert cfg.committee == base.committee


def test_override_exponent_float():
    # PyYAML follows YAML 1.1 and reads 1e-3 as a string, so float fields must accept numeric strings.
    cfg = load_config(DIGITS, ["train.lr=1e-3"])
    assert cfg.train.lr == 0.001
    assert type(cfg.train.lr) is float


def test_override_int_for_float_field():
    cfg = load_config(DIGITS, ["committee.width=1"])
    assert cfg.committee.width == 1.0
    assert type(cfg.committee.width) is float


def test_override_tuple_field():
    cfg = load_config(DIGITS, ["train.crop_scale=[0.2, 0.9]"])
    assert cfg.train.crop_scale == (0.2, 0.9)


def test_later_override_wins():
    cfg = load_config(DIGITS, ["train.epochs=3", "train.epochs=4"])
    assert cfg.train.epochs == 4


def test_override_without_equals_sign():
    message = config_error(["train.epochs"])
    assert "'train.epochs'" in message


def test_override_into_non_section():
    message = config_error(["train.epochs.value=3"])
    assert "'epochs' is not a section" in message


# --- validation ----------------------------------------------------------------------------------


def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"bogus": 1})
    message = str(info.value)
    assert "unknown config key 'bogus'" in message
    for allowed in ("committee", "data", "name", "seed", "train"):
        assert allowed in message


def test_unknown_nested_key():
    message = config_error(["train.bogus=1"])
    assert "unknown config key 'train.bogus'" in message
    for allowed in ("batch_size", "epochs", "flip", "lr"):
        assert allowed in message


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  datset: digits\n")
    message = config_error([], path)
    assert "unknown config key 'data.datset'" in message
    assert "dataset" in message


@pytest.mark.parametrize(
    "assignment, key, shown, expected_type",
    [
        ("train.epochs=ten", "train.epochs", "'ten'", "an integer"),
        ("train.epochs=3.5", "train.epochs", "3.5", "an integer"),
        ("train.flip=3", "train.flip", "3", "true or false"),
        ("train.lr=fast", "train.lr", "'fast'", "a number"),
        ("train.optimizer=adam", "train.optimizer", "'adam'", "'sgd'"),
        ("train.crop_scale=[0.5]", "train.crop_scale", "[0.5]", "a list of"),
        ("committee.members=resnet18", "committee.members", "'resnet18'", "a list of"),
        ("train=3", "train", "3", "a mapping"),
    ],
)
def test_wrong_type(assignment, key, shown, expected_type):
    message = config_error([assignment])
    assert f"config key '{key}'" in message
    assert shown in message
    assert expected_type in message


@pytest.mark.parametrize(
    "assignment, key, bound",
    [
        ("train.lr=0", "train.lr", "greater than 0"),
        ("train.lr=-0.1", "train.lr", "greater than 0"),
        ("committee.width=0", "committee.width", "greater than 0"),
        ("committee.width=-1", "committee.width", "greater than 0"),
        ("train.epochs=0", "train.epochs", "at least 1"),
        ("train.momentum=1.5", "train.momentum", "at most 1"),
        ("committee.widths={resnet18: 0}", "committee.widths.resnet18", "greater than 0"),
        ("committee.epochs={resnet18: 0}", "committee.epochs.resnet18", "at least 1"),
    ],
)
def test_value_out_of_range(assignment, key, bound):
    value = assignment.split("=", 1)[1]
    message = config_error([assignment])
    assert f"config key '{key}'" in message
    assert bound in message
    if not value.startswith("{"):
        assert f"value {float(value)}" in message or f"value {value}" in message


@pytest.mark.parametrize("assignment", ["committee.width=.nan", "train.lr=.nan"])
def test_nan_rejected(assignment):
    message = config_error([assignment])
    assert "nan" in message


def test_unknown_member_name():
    message = config_error(["committee.members=[resnet18, notamodel]"])
    assert "'notamodel'" in message
    assert "resnet18" in message


def test_unknown_member_in_widths():
    message = config_error(["committee.widths={notamodel: 0.5}"])
    assert "'notamodel'" in message


def test_duplicate_member():
    message = config_error(["committee.members=[resnet18, resnet18]"])
    assert "committee.members" in message


def test_empty_member_list():
    message = config_error(["committee.members=[]"])
    assert "committee.members" in message


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: 3\n   lr: 2\n")
    message = config_error([], path)
    assert str(path) in message
    assert "not valid YAML" in message


def test_yaml_file_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- data\n")
    message = config_error([], path)
    assert str(path) in message
    assert "mapping" in message


def test_invalid_yaml_override_raises():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DIGITS, ["train.epochs=[1"])


def test_invalid_yaml_override_one_line():
    message = config_error(["train.epochs=[1"])
    assert "'train.epochs=[1'" in message


# --- YAML output and fingerprints ------------------------------------------------------------------


@pytest.mark.parametrize("path", [DIGITS, CIFAR10_CPU], ids=["digits", "cifar10-cpu"])
def test_yaml_round_trip(tmp_path, path):
    cfg = load_config(path, ["train.epochs=3", "committee.widths={resnet18: 0.5}"])
    written = tmp_path / "resolved.yaml"
    written.write_text(config_to_yaml(cfg))

    reloaded = load_config(written)

    assert reloaded == cfg
    assert config_to_yaml(reloaded) == config_to_yaml(cfg)


def test_yaml_round_trip_defaults(tmp_path):
    written = tmp_path / "defaults.yaml"
    written.write_text(config_to_yaml(RunConfig()))
    assert load_config(written) == RunConfig()


def test_fingerprint_equal_for_equal_configs():
    first = load_config(DIGITS)
    second = load_config(DIGITS)

    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(first.train, "resnet18") == fingerprint(second.train, "resnet18")
    assert len(fingerprint(first)) == 16


@pytest.mark.parametrize("assignment", ["train.epochs=3", "committee.width=0.5", "seed=1", "train.flip=true"])
def test_fingerprint_changes_with_value(assignment):
    assert fingerprint(load_config(DIGITS)) != fingerprint(load_config(DIGITS, [assignment]))


def test_fingerprint_changes_with_extra_part():
    cfg = load_config(DIGITS)
    assert fingerprint(cfg, "resnet18") != fingerprint(cfg, "resnet50")


def test_fingerprint_leaves_out_fused_bn_false():
    # fused_bn defaults to true, but runs made before it existed computed the statistics the
    # separate way, so false is the value that keeps their fingerprints.
    cfg = load_config(DIGITS)
    assert cfg.synthesis.fused_bn is True
    assert "fused_bn" in hash_view(cfg.synthesis)
    separate = load_config(DIGITS, ["synthesis.fused_bn=false"])
    assert "fused_bn" not in hash_view(separate.synthesis)
    assert fingerprint(cfg) != fingerprint(separate)
