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


def cvdd(cwd: Path, run_dir: Path, *args: str, ranks: int = 1, extra: tuple = ()) -> subprocess.CompletedProcess:
    """Run a cvdd command with the TINY overrides, then `extra` overrides (which win)."""
    options = ["--config", str(ROOT / "configs" / "digits.yaml"), "--run-dir", str(run_dir)]
    for assignment in [*TINY, *extra]:
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


DDP_EVAL = ["evaluate.epochs=30", "evaluate.eval_every=30", "evaluate.seeds=[0,1,2]"]


def _top1(run_dir: Path, seeds=(0, 1, 2)) -> list[float]:
    return [json.loads((run_dir / "eval" / "cvdd" / f"resnet18-soft-seed{s}.json").read_text())["top1"] for s in seeds]


def test_ddp_post_evaluation_lands_within_the_seed_spread(runs):
    """Two ranks train each student together; top-1 is not bit-identical (BN sees half batches) but close."""
    ddp_dir = runs["cwd"] / "ddp"
    shutil.copytree(runs["single"] / "committee", ddp_dir / "committee")
    shutil.copytree(runs["single"] / "distilled", ddp_dir / "distilled")
    single_dir = runs["cwd"] / "single-30"
    shutil.copytree(runs["single"] / "committee", single_dir / "committee")
    shutil.copytree(runs["single"] / "distilled", single_dir / "distilled")
    cvdd(runs["cwd"], single_dir, "evaluate", "--method", "cvdd", extra=DDP_EVAL)
    cvdd(runs["cwd"], ddp_dir, "evaluate", "--method", "cvdd", extra=(*DDP_EVAL, "ddp=true"), ranks=2)

    single, ddp = _top1(single_dir), _top1(ddp_dir)
    saved = json.loads((ddp_dir / "eval" / "cvdd" / "resnet18-soft-seed0.json").read_text())
    assert saved["protocol"]["ddp_ranks"] == 2
    mean = sum(single) / 3
    spread = (sum((v - mean) ** 2 for v in single) / 2) ** 0.5
    # Chance is 0.1, and 0.15 is three binomial standard deviations above it on 360 test images.
    # Both must have learnt, and the DDP mean must sit within the single-process spread.
    assert min(single) > 0.15
    assert min(ddp) > 0.15
    assert abs(sum(ddp) / 3 - mean) <= max(2 * spread, 0.03), (single, ddp)


def test_ddp_committee_training_writes_one_checkpoint_per_member(runs):
    ddp_dir = runs["cwd"] / "ddp-pretrain"
    result = cvdd(runs["cwd"], ddp_dir, "pretrain", extra=("ddp=true",), ranks=2)
    for arch in ("resnet18", "mobilenet_v2"):
        payload = torch.load(ddp_dir / "committee" / f"{arch}.pt", weights_only=False)
        single = torch.load(runs["single"] / "committee" / f"{arch}.pt", weights_only=False)
        # One epoch of digits at width 0.125: ResNet-18 learns well above chance (0.1), MobileNetV2
        # hardly starts; DDP lands within a few points of one process either way.
        assert abs(payload["accuracy"] - single["accuracy"]) < 0.15
        if arch == "resnet18":
            assert payload["accuracy"] > 0.3
        assert not (ddp_dir / "committee" / f"{arch}.partial.pt").exists()
    assert result.stdout.count("resnet18") >= 1
