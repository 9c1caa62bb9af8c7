"""Tests of how `python -m cvdd` reports bad input: exit status 2, one line, nothing written."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from cvdd.config import load_config
from cvdd.data import load_digits_dataset, load_imagefolder
from cvdd.errors import CheckpointError, DataError
from cvdd.models import checkpoint_payload, create_model
from cvdd.runs import RunFolder
from cvdd.train import load_committee, member_fingerprint

DIGITS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
SENTINEL = b"sentinel written before the command ran\n"


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture
def workdir(tmp_path):
    """Return a working folder whose digits run folder already contains a config.yaml and a sentinel file."""
    run_dir = tmp_path / load_config(DIGITS_CONFIG).resolved_run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_bytes(SENTINEL)
    (run_dir / "sentinel.txt").write_bytes(SENTINEL)
    return tmp_path


def run_cvdd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CVDD_CACHE=str(cwd / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "cvdd", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def snapshot(root: Path) -> dict:
    """Return {relative path: (bytes, mtime_ns)} of every file under `root`."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


def save_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 60, 30)).save(path)


def make_imagefolder(root: Path, classes=("cat", "dog"), empty=()) -> Path:
    """Write train/<class>/ and test/<class>/ with one 8 px image each, except the folders listed in `empty`."""
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            if f"{split}/{name}" not in empty:
                save_png(folder / "a.png")
    return root


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cvdd: error: ")
    for value in named:
        assert value in lines[0]
    return lines[0]


def imagefolder_missing(root: Path):
    return ["--set", "data.dataset=imagefolder", "--data-root", str(root / "absent")], [str(root / "absent")]


def cifar10_not_downloaded(root: Path):
    (root / "cifar").mkdir()
    return ["--set", "data.dataset=cifar10", "--data-root", str(root / "cifar")], ["'cifar10'", "--download"]


def imagefolder_empty_class(root: Path):
    make_imagefolder(root / "pets", empty=("train/cat",))
    return ["--set", "data.dataset=imagefolder", "--data-root", str(root / "pets")], ["train/cat", "no images"]


def unknown_member(root: Path):
    return ["--set", "committee.members=[resnet18,notamodel]"], ["'notamodel'"]


def zero_width(root: Path):
    return ["--set", "committee.width=0"], ["committee.width", "value 0"]


def unknown_key(root: Path):
    return ["--set", "train.bogus=1"], ["'train.bogus'", "epochs"]


@pytest.mark.parametrize(
    "make_case",
    [imagefolder_missing, cifar10_not_downloaded, imagefolder_empty_class, unknown_member, zero_width,
     unknown_key],
)
def test_pretrain_bad_input(workdir, make_case):
    args, named = make_case(workdir)
    before = snapshot(workdir)

    result = run_cvdd(workdir, "pretrain", "--config", str(DIGITS_CONFIG), "--device", "cpu", *args)

    assert_one_line_error(result, *named)
    assert result.stdout == ""
    assert snapshot(workdir) == before


def test_pretrain_nan_width_writes_nothing(workdir):
    before = snapshot(workdir)

    result = run_cvdd(workdir, "pretrain", "--config", str(DIGITS_CONFIG), "--device", "cpu",
                      "--set", "committee.width=.nan")

    assert_one_line_error(result, "committee.width")
    assert snapshot(workdir) == before


def test_config_invalid_yaml_override(tmp_path):
    result = run_cvdd(tmp_path, "config", "--config", str(DIGITS_CONFIG), "--set", "train.epochs=[1")
    assert_one_line_error(result, "train.epochs=[1")


def test_config_command_prints_yaml(tmp_path):
    result = run_cvdd(tmp_path, "config", "--config", str(DIGITS_CONFIG), "--set", "train.epochs=2")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["epochs"] == 2
    assert printed["name"] == load_config(DIGITS_CONFIG).name
    assert list(tmp_path.iterdir()) == []


def test_own_files_of_a_non_run_folder(tmp_path):
    result = run_cvdd(tmp_path, "own-files", "nothing-here")
    assert_one_line_error(result, "'nothing-here'", "config.yaml")


def test_own_files_lists_a_variants_new_file(tmp_path):
    run = tmp_path / "run"
    variant = run / "ablations" / "temperature" / "T1"
    variant.mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    (run / "priors.json").write_text("{}")
    (variant / "priors.json").write_text("{}")
    (variant / "metrics.json").write_text("{}")
    (variant.parent / "metrics.json").write_text("{}")

    result = run_cvdd(tmp_path, "own-files", "run")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["run/ablations/temperature/metrics.json",
                                          "run/ablations/temperature/T1/metrics.json"]


# --- empty class folders, in process --------------------------------------------------------------


def test_empty_class_folder_message(tmp_path):
    root = make_imagefolder(tmp_path / "pets", empty=("train/cat",))
    with pytest.raises(DataError, match="train/cat") as info:
        load_imagefolder(root, cache_dir=tmp_path / "cache")
    assert "no images" in str(info.value)


def test_class_empty_in_both_splits(tmp_path):
    root = make_imagefolder(tmp_path / "pets", classes=("bird", "cat", "dog"), empty=("train/cat", "test/cat"))
    with pytest.raises(DataError, match="cat"):
        load_imagefolder(root, cache_dir=tmp_path / "cache")


def test_class_folder_of_non_images(tmp_path):
    root = make_imagefolder(tmp_path / "pets", empty=("train/cat",))
    (root / "train" / "cat" / "notes.txt").write_text("no images here\n")
    with pytest.raises(DataError, match="train/cat") as info:
        load_imagefolder(root, cache_dir=tmp_path / "cache")
    assert "no images" in str(info.value)


# --- a checkpoint trained on another class list ------------------------------------------------------


def write_foreign_member(run: RunFolder, arch: str, cfg, digits) -> Path:
    """Save a member checkpoint of `arch` made for letters a to j instead of the digits 0 to 9.

    The stored fingerprint is that of the digits run, so `cvdd pretrain` takes the file
    for a finished member and loads it instead of retraining.
    """
    letters = dataclasses.replace(digits, class_names=list("abcdefghij"))
    model = create_model(arch, letters.num_classes, letters.channels, letters.image_size, cfg.member_width(arch))
    config = {"fingerprint": member_fingerprint(cfg, digits, arch), "seconds": 0.0}
    payload = checkpoint_payload(model, arch=arch, width=cfg.member_width(arch), dataset=letters, accuracy=0.9,
                                 config=config)
    path = run.member_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def test_load_committee_other_class_list(tmp_path, digits):
    cfg = load_config(DIGITS_CONFIG)
    arch = cfg.committee.members[0]
    run = RunFolder(tmp_path / cfg.resolved_run_dir())
    path = write_foreign_member(run, arch, cfg, digits)

    with pytest.raises(CheckpointError) as info:
        load_committee(cfg, digits, run, torch.device("cpu"), members=[arch])

    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "another class list" in message
    assert "'digits'" in message


def test_pretrain_other_class_list(workdir, digits):
    overrides = ["train.epochs=1"]
    cfg = load_config(DIGITS_CONFIG, overrides)
    arch = cfg.committee.members[0]
    path = write_foreign_member(RunFolder(workdir / cfg.resolved_run_dir()), arch, cfg, digits)
    checkpoint_before = (path.read_bytes(), path.stat().st_mtime_ns)

    result = run_cvdd(workdir, "pretrain", "--config", str(DIGITS_CONFIG), "--device", "cpu",
                      "--set", overrides[0])

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # The run folder and its log are set up before the committee loads, so INFO lines come first.
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("cvdd: error: ")]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0] == result.stderr.splitlines()[-1]
    assert "another class list" in error_lines[0]
    assert str(path.relative_to(workdir)) in error_lines[0]
    assert (path.read_bytes(), path.stat().st_mtime_ns) == checkpoint_before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
