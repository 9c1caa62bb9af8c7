"""A run killed with SIGKILL mid-synthesis and mid-post-evaluation continues when started again.

The restarted run must end with the results of an uninterrupted run and must not redo any
work item whose file existed when the process was killed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "workers=1", "committee.members=[resnet18,mobilenet_v2]", "committee.width=0.125", "train.epochs=1",
    "prior.values={resnet18: 80.0, mobilenet_v2: 70.0}", "methods=[random,sre2l++,cvdd]", "synthesis.ipc=4",
    "synthesis.iterations=40", "evaluate.epochs=6", "evaluate.eval_every=3", "evaluate.seeds=[0,1]",
    "evaluate.label_modes=[soft]",
]


def command(run_dir: Path) -> list[str]:
    args = [sys.executable, "-m", "cvdd", "run", "--config", str(ROOT / "configs" / "digits.yaml"),
            "--run-dir", str(run_dir)]
    for assignment in TINY:
        args += ["--set", assignment]
    return args


def environment(cwd: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CVDD_NO_PROGRESS": "1", "CVDD_CACHE": str(cwd / "cache")}


def finished_files(run_dir: Path) -> dict[str, int]:
    """Work-item files (synthesis batches and student results) with their modification times."""
    paths = list((run_dir / "distilled").glob("*/items/*.pt")) + list((run_dir / "eval").glob("*/*.json"))
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in paths}


def kill_when(cwd: Path, run_dir: Path, ready) -> dict[str, int]:
    """Start the run, SIGKILL it once `ready(run_dir)` holds, and return the finished files at that moment."""
    process = subprocess.Popen(command(run_dir), cwd=cwd, env=environment(cwd), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not ready(run_dir):
            assert process.poll() is None, "the run ended before the point where it was to be killed"
            assert time.monotonic() < deadline, "the run did not reach the kill point within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    return finished_files(run_dir)


def complete(cwd: Path, run_dir: Path) -> dict:
    result = subprocess.run(command(run_dir), cwd=cwd, env=environment(cwd), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def cvdd_items(run_dir: Path) -> int:
    return len(list((run_dir / "distilled" / "cvdd" / "items").glob("*.pt")))


def eval_results(run_dir: Path) -> int:
    return len(list((run_dir / "eval").glob("*/*.json")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    run_dir = cwd / "run"
    return {"metrics": complete(cwd, run_dir), "run_dir": run_dir}


@pytest.mark.parametrize("stage, ready", [
    ("synthesis", lambda run_dir: cvdd_items(run_dir) >= 2),
    ("post-evaluation", lambda run_dir: eval_results(run_dir) >= 3),
])
def test_killed_run_resumes_to_identical_results(reference, tmp_path, stage, ready):
    run_dir = tmp_path / "run"
    before = kill_when(tmp_path, run_dir, ready)
    assert before, f"no work item was finished when the run was killed during {stage}"
    metrics = complete(tmp_path, run_dir)

    assert metrics["results"] == reference["metrics"]["results"]
    for method in ("sre2l++", "cvdd"):
        resumed = torch.load(run_dir / "distilled" / method / "images.pt", weights_only=False)
        uninterrupted = torch.load(reference["run_dir"] / "distilled" / method / "images.pt", weights_only=False)
        assert torch.equal(resumed["images"], uninterrupted["images"])
    after = finished_files(run_dir)
    # A recomputed item would have been written again, with a newer modification time.
    assert {name: after[name] for name in before} == before
