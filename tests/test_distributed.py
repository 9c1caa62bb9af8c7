"""`torchrun --nproc_per_node=2 -m cvdd ...` on the CPU (gloo) against the same command in one process.

Both run with one torch thread per process, so the arithmetic is the same and the outputs
must match bit for bit.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = [
    "workers=1", "committee.members=[resnet18,mobilenet_v2]", "committee.width=0.125", "train.epochs=1",
    "prior.values={resnet18: 80.0, mobilenet_v2: 70.0}", "synthesis.ipc=3", "synthesis.iterations=4",
    "evaluate.epochs=2", "evaluate.eval_every=1", "evaluate.seeds=[0,1]", "evaluate.label_modes=[soft]",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cvdd(cwd: Path, run_dir: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    options = ["--config", str(ROOT / "configs" / "digits.yaml"), "--run-dir", str(run_dir)]
    for assignment in TINY:
        options += ["--set", assignment]
    if ranks == 1:
        command = [sys.executable, "-m", "cvdd", *args, *options]
    else:
        command = [str(TORCHRUN), "--nnodes=1", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
                   f"--master-port={free_port()}", "-m", "cvdd", *args, *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CVDD_NO_PROGRESS": "1", "CVDD_CACHE": str(cwd / "cache")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained committee copied into two run folders: one for a single process, one for torchrun."""
    cwd = tmp_path_factory.mktemp("distributed")
    single, sharded = cwd / "single", cwd / "sharded"
    cvdd(cwd, single, "pretrain")
    shutil.copytree(single / "committee", sharded / "committee")
    return {"cwd": cwd, "single": single, "sharded": sharded}


def test_torchrun_synthesis_matches_one_process(runs):
    cvdd(runs["cwd"], runs["single"], "distill", "--method", "cvdd")
    result = cvdd(runs["cwd"], runs["sharded"], "distill", "--method", "cvdd", ranks=2)
    single = torch.load(runs["single"] / "distilled" / "cvdd" / "images.pt", weights_only=False)
    sharded = torch.load(runs["sharded"] / "distilled" / "cvdd" / "images.pt", weights_only=False)
    assert torch.equal(single["images"], sharded["images"])
    assert torch.equal(single["labels"], sharded["labels"])
    assert single["draws"] == sharded["draws"]
    csv_single = (runs["single"] / "distilled" / "cvdd" / "synthesis.csv").read_text()
    assert (runs["sharded"] / "distilled" / "cvdd" / "synthesis.csv").read_text() == csv_single
    # Only rank 0 prints; the log names both ranks.
    assert result.stdout.count("cvdd: 30 images") == 1
    log = (runs["sharded"] / "run.log").read_text()
    assert "rank 1 of 2 joined the gloo process group" in result.stderr + log


def test_torchrun_post_evaluation_matches_one_process(runs):
    cvdd(runs["cwd"], runs["single"], "evaluate", "--method", "cvdd")
    cvdd(runs["cwd"], runs["sharded"], "evaluate", "--method", "cvdd", ranks=2)
    for seed in (0, 1):
        name = f"resnet18-soft-seed{seed}.json"
        single = json.loads((runs["single"] / "eval" / "cvdd" / name).read_text())
        sharded = json.loads((runs["sharded"] / "eval" / "cvdd" / name).read_text())
        assert sharded["top1"] == single["top1"]
        assert [r["loss"] for r in sharded["curve"]] == [r["loss"] for r in single["curve"]]
