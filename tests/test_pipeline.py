"""End-to-end tests of `python -m cvdd` on digits: a tiny full run, its rerun, determinism and bad input.

Every command runs in a subprocess with its own working folder and $CVDD_CACHE, as a user
would run it. One tiny `cvdd run` (two members of width 0.125, one epoch, IPC 2, three
synthesis iterations, two student epochs) is shared by the whole module.
"""

import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DIGITS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"
MEMBERS = ("resnet18", "mobilenet_v2")
PRIORS = {"resnet18": 80.0, "mobilenet_v2": 70.0}
PRIOR_VALUES = "prior.values={resnet18: 80.0, mobilenet_v2: 70.0}"
METHODS = ("random", "sre2l", "sre2l++", "cvdd")
SYNTHESIS_METHODS = ("sre2l", "sre2l++", "cvdd")
IPC = 2
ITERATIONS = 3
SEEDS = (0, 1)
LABEL_MODES = ("soft", "hard")
STUDENT = "resnet18"
NUM_CLASSES = 10
# digits.yaml draws N=2 experts per batch, which with two members is the whole committee.
CVDD_EXPERTS = 2
TINY = [
    "workers=1",
    f"committee.members=[{','.join(MEMBERS)}]",
    "committee.width=0.125",
    "train.epochs=1",
    f"synthesis.ipc={IPC}",
    f"synthesis.iterations={ITERATIONS}",
    "evaluate.epochs=2",
    "evaluate.eval_every=1",
    f"evaluate.seeds=[{','.join(str(s) for s in SEEDS)}]",
]


def tiny_args(run_dir: Path, *overrides: str, priors: bool = True) -> list[str]:
    """Return --config, --run-dir and the tiny overrides, then `overrides` (later ones win)."""
    assignments = TINY + ([PRIOR_VALUES] if priors else []) + list(overrides)
    args = ["--config", str(DIGITS_CONFIG), "--run-dir", str(run_dir)]
    for assignment in assignments:
        args += ["--set", assignment]
    return args


def run_cvdd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CVDD_CACHE=str(cwd / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "cvdd", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def snapshot(root: Path, under: str = "") -> dict:
    """Return {relative path: (bytes, mtime_ns)} of every file under `root` / `under`."""
    files = {}
    for path in sorted((root / under).rglob("*")):
        if path.is_file():
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


def assert_error_last_line(result: subprocess.CompletedProcess, *named: str) -> str:
    """Check exit status 2, no traceback and a last stderr line `cvdd: error: ...` naming every value."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines, "stderr is empty"
    last = lines[-1]
    assert last.startswith("cvdd: error: "), result.stderr
    for value in named:
        assert value in last, last
    return last


def table_lines(stdout: str) -> list[str]:
    """Return the printed results table without the closing line that reports the run time."""
    return [line for line in stdout.splitlines() if not line.startswith("total ")]


def load_distilled(run_dir: Path, method: str) -> dict:
    return torch.load(run_dir / "distilled" / method / "images.pt", weights_only=False)


@dataclasses.dataclass
class FinishedRun:
    """A `cvdd run` subprocess and what its run folder held right after it ended."""

    cwd: Path
    root: Path
    result: subprocess.CompletedProcess
    metrics: dict
    log_text: str
    files: dict
    cvdd_set: dict


def finish_run(cwd: Path, root: Path) -> FinishedRun:
    result = run_cvdd(cwd, "run", *tiny_args(root))
    assert result.returncode == 0, result.stderr
    return FinishedRun(
        cwd=cwd, root=root, result=result,
        metrics=json.loads((root / "metrics.json").read_text()),
        log_text=(root / "run.log").read_text(),
        files=snapshot(root),
        cvdd_set=load_distilled(root, "cvdd"),
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> FinishedRun:
    cwd = tmp_path_factory.mktemp("pipeline")
    return finish_run(cwd, cwd / "run")


@pytest.fixture(scope="module")
def second_run(first_run) -> FinishedRun:
    """The same `cvdd run` command again in the first run's folder."""
    return finish_run(first_run.cwd, first_run.root)


# --- the first run ---------------------------------------------------------------------------------


def test_run_prints_results_table(first_run):
    stdout = first_run.result.stdout

    assert "Results on digits at IPC 2" in stdout
    for method in METHODS:
        assert f"| {method} | {STUDENT} | " in stdout, stdout


def test_run_metrics_header(first_run):
    metrics = first_run.metrics

    assert metrics["dataset"] == "digits"
    assert metrics["ipc"] == IPC
    assert metrics["priors"] == PRIORS
    assert set(metrics["stage_seconds"]) == {"committee", "prior", "synthesis", "evaluate"}
    assert metrics["peak_rss_bytes"] > 0


def test_run_metrics_rows(first_run):
    rows = first_run.metrics["results"]

    assert sorted((r["method"], r["label_mode"]) for r in rows) == sorted(
        (m, mode) for m in METHODS for mode in LABEL_MODES
    )
    for row in rows:
        where = f"{row['method']} {row['label_mode']}"
        per_seed = row["top1_per_seed"]
        assert row["student"] == STUDENT, where
        assert row["ipc"] == IPC, where
        assert row["label_mode"] in LABEL_MODES, where
        assert 0.0 <= row["top1_mean"] <= 1.0, where
        assert row["top1_std"] >= 0.0, where
        assert len(per_seed) == len(SEEDS), where
        assert row["top1_mean"] == pytest.approx(statistics.fmean(per_seed)), where
        assert row["top1_std"] == pytest.approx(statistics.stdev(per_seed)), where
        # The config's evaluation seeds, not the students' derived torch seeds.
        assert row["seeds"] == list(SEEDS), where
        # The best epoch is at least as good as the final one for every seed, so also on average.
        assert row["best_top1_mean"] >= row["top1_mean"], where


def test_run_metrics_match_eval_files(first_run):
    for row in first_run.metrics["results"]:
        folder = first_run.root / "eval" / row["method"]
        saved = [json.loads((folder / f"{STUDENT}-{row['label_mode']}-seed{k}.json").read_text()) for k in SEEDS]
        assert row["top1_per_seed"] == [s["top1"] for s in saved], row


def test_run_folder_top_level(first_run):
    root = first_run.root

    assert (root / "config.yaml").is_file()
    assert (root / "run.log").is_file()
    assert (root / "metrics.json").is_file()
    for member in MEMBERS:
        assert (root / "committee" / f"{member}.pt").is_file(), member


def test_run_log_names_prior_source(first_run):
    assert "prior.values" in first_run.log_text


@pytest.mark.parametrize("method", METHODS)
def test_distilled_set_and_pngs(first_run, method):
    folder = first_run.root / "distilled" / method
    distilled = load_distilled(first_run.root, method)
    images, labels, class_names = distilled["images"], distilled["labels"], distilled["class_names"]

    assert images.shape == (IPC * NUM_CLASSES, 1, 8, 8)
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert torch.bincount(labels, minlength=NUM_CLASSES).tolist() == [IPC] * NUM_CLASSES
    assert len(class_names) == NUM_CLASSES
    assert sorted(p.name for p in (folder / "png").iterdir()) == sorted(class_names)
    for name in class_names:
        assert len(list((folder / "png" / name).glob("*.png"))) == IPC, name


@pytest.mark.parametrize("method", SYNTHESIS_METHODS)
def test_synthesis_csv_rows(first_run, method):
    with open(first_run.root / "distilled" / method / "synthesis.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        rows = list(reader)
    experts = list(MEMBERS[:CVDD_EXPERTS]) if method == "cvdd" else [MEMBERS[0]]
    # A work item is one batch of one image per class, so digits at IPC 2 has two items.
    items = [f"ipc{k:03d}-block000" for k in range(IPC)]
    expected = sorted((item, str(i), e) for item in items for i in range(1, ITERATIONS + 1) for e in experts)

    assert header == ["item", "iteration", "expert", "weight", "ce", "bn", "lr"]
    assert len(rows) == len(items) * ITERATIONS * len(experts)
    assert sorted((r["item"], r["iteration"], r["expert"]) for r in rows) == expected


@pytest.mark.parametrize("method", METHODS)
def test_eval_files(first_run, method):
    for mode in LABEL_MODES:
        for seed in SEEDS:
            name = f"{STUDENT}-{mode}-seed{seed}.json"
            saved = json.loads((first_run.root / "eval" / method / name).read_text())
            assert 0.0 <= saved["top1"] <= 1.0, name
            assert saved["best_top1"] >= saved["top1"], name
            assert isinstance(saved["protocol"], dict), name
            assert saved["protocol"]["label_mode"] == mode, name
            # digits.yaml trains the committee without flips, so students are not flipped either.
            assert saved["protocol"]["augmentation"]["flip"] is False, name


# --- the same command again -------------------------------------------------------------------------


def test_rerun_trains_nothing(first_run, second_run):
    stderr = second_run.result.stderr

    for member in MEMBERS:
        assert f"member {member}: checkpoint" in stderr
    assert stderr.count("matches the config, skipped") == len(MEMBERS)
    assert "items to train" not in stderr
    for under in ("committee/", "eval/"):
        before = {k: v for k, v in first_run.files.items() if k.startswith(under)}
        after = {k: v for k, v in second_run.files.items() if k.startswith(under)}
        assert after == before, under


def test_rerun_reuses_synthesis_items(first_run, second_run):
    before = {k: v for k, v in first_run.files.items() if k.startswith("distilled/") and "/items/" in k}
    after = {k: v for k, v in second_run.files.items() if k.startswith("distilled/") and "/items/" in k}

    assert len(before) == len(SYNTHESIS_METHODS) * IPC
    assert after == before
    assert torch.equal(second_run.cvdd_set["images"], first_run.cvdd_set["images"])


def test_rerun_is_much_faster(first_run, second_run):
    first = sum(first_run.metrics["stage_seconds"].values())
    second = sum(second_run.metrics["stage_seconds"].values())

    assert second < 0.5 * first, (first_run.metrics["stage_seconds"], second_run.metrics["stage_seconds"])


def test_rerun_prints_same_table(first_run, second_run):
    assert table_lines(second_run.result.stdout) == table_lines(first_run.result.stdout)


def test_rerun_leaves_distilled_files_untouched(first_run, second_run):
    before = {k: v[1] for k, v in first_run.files.items() if k.startswith("distilled/")}
    after = {k: v[1] for k, v in second_run.files.items() if k.startswith("distilled/")}

    changed = sorted(k for k in before if after.get(k) != before[k])
    assert changed == []


# --- determinism ------------------------------------------------------------------------------------


def test_distill_cvdd_is_bitwise_reproducible(first_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(first_run.root / "committee", root / "committee")

    result = run_cvdd(tmp_path, "distill", "--method", "cvdd", *tiny_args(root))

    assert result.returncode == 0, result.stderr
    again = load_distilled(root, "cvdd")
    assert torch.equal(again["images"], first_run.cvdd_set["images"])
    assert torch.equal(again["labels"], first_run.cvdd_set["labels"])
    assert again["draws"] == first_run.cvdd_set["draws"]


# --- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def copied_run(first_run, tmp_path) -> Path:
    """Return a copy of the finished first run, so a failing command meets real artifacts."""
    root = tmp_path / "run"
    shutil.copytree(first_run.root, root)
    return root


BAD_INPUT = {
    "experts_above_committee": (["distill", "--method", "cvdd"], ["synthesis.experts=3"],
                                ["'synthesis.experts'", "value 3"]),
    "experts_below_one": (["distill", "--method", "cvdd"], ["synthesis.experts=0"],
                          ["'synthesis.experts'", "value 0"]),
    "temperature_zero": (["distill", "--method", "cvdd"], ["synthesis.temperature=0"],
                         ["'synthesis.temperature'", "value 0"]),
    "temperature_negative": (["distill", "--method", "cvdd"], ["synthesis.temperature=-1"],
                             ["'synthesis.temperature'", "value -1"]),
    "ipc_above_smallest_class": (["run"], ["synthesis.ipc=500"], ["synthesis.ipc=500"]),
    "member_without_batchnorm": (["run"], ["committee.members=[resnet18,convnet_in]",
                                           "prior.values={resnet18: 80.0, convnet_in: 70.0}"],
                                 ["'convnet_in'", "BatchNorm"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_leaves_run_untouched(copied_run, case):
    command, overrides, named = BAD_INPUT[case]
    before = snapshot(copied_run)

    result = run_cvdd(copied_run.parent, *command, *tiny_args(copied_run, *overrides))

    assert_error_last_line(result, *named)
    assert snapshot(copied_run) == before


def test_distill_cvdd_without_priors(first_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(first_run.root / "committee", root / "committee")
    before = snapshot(root)

    result = run_cvdd(tmp_path, "distill", "--method", "cvdd", *tiny_args(root, priors=False))

    assert_error_last_line(result, *(repr(m) for m in MEMBERS), "prior.values")
    assert snapshot(root) == before


def rename_distilled_classes(root: Path) -> None:
    """Give the cvdd set class names that differ from the digits 0 to 9 of the teachers."""
    path = root / "distilled" / "cvdd" / "images.pt"
    distilled = torch.load(path, weights_only=False)
    distilled["class_names"] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    torch.save(distilled, path)


def test_evaluate_other_class_list_message(copied_run):
    rename_distilled_classes(copied_run)

    result = run_cvdd(copied_run.parent, "evaluate", "--method", "cvdd", *tiny_args(copied_run))

    assert_error_last_line(result, "'cvdd'", "'zero'")


def test_evaluate_other_class_list_writes_nothing(copied_run):
    rename_distilled_classes(copied_run)
    before = snapshot(copied_run)

    result = run_cvdd(copied_run.parent, "evaluate", "--method", "cvdd", *tiny_args(copied_run))

    assert result.returncode == 2, result.stderr
    changed = sorted(k for k, v in snapshot(copied_run).items() if before.get(k) != v)
    assert changed == []


def test_validation_run_tests_on_held_out_training_rows(tmp_path):
    root = tmp_path / "run"
    overrides = ["validation=true", "prior.member_epochs=1", "prior.iterations=2", "prior.student_epochs=1",
                 "prior.ipc=1"]
    result = run_cvdd(tmp_path, "run", *tiny_args(root, *overrides, priors=False))
    assert result.returncode == 0, result.stderr
    assert "held-out training rows, validation" in result.stdout

    # The split of Algorithm 1, computed here from its definition: a stratified 80/20 split.
    from cvdd.config import load_config
    from cvdd.data import load_dataset, stratified_split

    cfg = load_config(DIGITS_CONFIG)
    dataset = load_dataset(cfg.data)
    train_rows, held_out = stratified_split(dataset.train.labels, cfg.prior.train_fraction, cfg.prior.split_seed)
    assert len(train_rows) + len(held_out) == len(dataset.train)

    metrics = json.loads((root / "validation" / "metrics.json").read_text())
    assert metrics["validation"]["held_out_rows"] == len(held_out)
    assert not (root / "metrics.json").exists()
    assert not (root / "committee").exists()
    saved = json.loads((root / "validation" / "eval" / "cvdd" / f"{STUDENT}-soft-seed0.json").read_text())
    assert saved["protocol"]["test_images"] == len(held_out)
    subset = torch.load(root / "validation" / "distilled" / "random" / "images.pt", weights_only=False)
    assert set(subset["indices"].tolist()) <= set(train_rows.tolist())
    assert not set(subset["indices"].tolist()) & set(held_out.tolist())


# --- result reuse across job lists ------------------------------------------------------------------


def test_evaluate_with_fewer_seeds_trains_nothing(copied_run):
    before = snapshot(copied_run, "eval")

    result = run_cvdd(copied_run.parent, "evaluate", *tiny_args(copied_run, "evaluate.seeds=[1]"))

    assert result.returncode == 0, result.stderr
    assert "items to train" not in result.stderr
    assert snapshot(copied_run, "eval") == before


def test_bssl_off_retrains_soft_students_only(copied_run):
    before = snapshot(copied_run, "eval")

    result = run_cvdd(copied_run.parent, "evaluate", *tiny_args(copied_run, "evaluate.bssl=false"))

    assert result.returncode == 0, result.stderr
    after = snapshot(copied_run, "eval")
    changed = sorted(k for k in before if after[k] != before[k])
    soft = sorted(k for k in before if "-soft-" in k and not k.startswith("eval/sre2l/"))
    # SRe2L relabels with running statistics whatever the value of evaluate.bssl, so its files stay.
    assert changed == soft
    assert len(soft) == (len(METHODS) - 1) * len(SEEDS)
    assert all(json.loads(after[k][0])["protocol"]["bssl"] is False for k in soft)


def test_result_with_earlier_key_reused(copied_run):
    from cvdd.config import fingerprint, load_config
    from cvdd.data import load_dataset
    from cvdd.pipeline import _evaluation_jobs, _saved_result
    from cvdd.runs import RunFolder
    from cvdd.train import load_committee

    cfg = load_config(DIGITS_CONFIG, TINY + [PRIOR_VALUES, "evaluate.seeds=[1]"])
    dataset = load_dataset(cfg.data)
    run = RunFolder(copied_run)
    committee = load_committee(cfg, dataset, run, torch.device("cpu"))
    job = next(j for j in _evaluation_jobs(cfg, dataset, run, PRIORS, ["cvdd"], committee) if j["mode"] == "soft")
    path = Path(job["path"])
    saved = json.loads(path.read_text())
    # Before result_key, the key hashed the whole evaluation config, with the lists of the run
    # that wrote the file: seeds [0, 1] here, where the current config requests seed 1 only.
    parts = job["key_parts"]
    saved["fingerprint"] = fingerprint(parts[0], dataclasses.replace(parts[1], seeds=list(SEEDS)), *parts[2:])
    path.write_text(json.dumps(saved))

    assert _saved_result(job) is not None

    saved["protocol"]["config"]["seeds"] = [1]
    path.write_text(json.dumps(saved))

    assert _saved_result(job) is None
