"""Peak memory of synthesis at the CPU profile, and whether it grows with the iteration count.

Each measurement runs in a fresh Python process, so its peak resident set size (RSS, from
getrusage) belongs to that measurement alone. On a GPU the figure is
torch.cuda.max_memory_allocated instead.

- synthesis: one CV-DD work item of configs/cifar10-cpu.yaml (a class block of 10 images at
  32 px, N = 2 experts: resnet18 at width 0.25 and mobilenet_v2 at width 0.25), run for a
  short and a long iteration count. Equal peaks mean nothing accumulates per iteration.
- digits run (with --digits-run): the whole `cvdd run --config configs/digits.yaml` in a
  temporary run folder, its peak RSS per stage read from metrics.json. It takes about five
  minutes on two cores.

    python benchmarks/memory.py
    python benchmarks/memory.py --iterations 20 200 --digits-run

Writes the figures under "memory" in benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results.json"

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
from synthesis_speed import _dataset, _members
from cvdd.config import SynthesisConfig
from cvdd.synthesis import Expert, WorkItem, synthesize_item
device = {device!r}
dataset = _dataset(10, 32)
models = {{n: m.to(device) for n, m in _members(0.25, 10, 32).items()}}
experts = [Expert(n, m, 50.0, True) for n, m in models.items()]
cfg = SynthesisConfig(ipc=1, iterations={iterations})
images, rows = synthesize_item(WorkItem(0, 0, list(range(10))), experts, torch.tensor([0.6, 0.4]).to(device), dataset,
                               cfg, torch.randn(10, 3, 32, 32).to(device), device, 0, use_crop=True)
peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
print(json.dumps({{"peak_rss_bytes": peak_rss, "cuda_max_allocated_bytes": cuda, "rows": len(rows)}}))
"""


def synthesis_peak(iterations: int, device: str) -> dict:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), iterations=iterations, device=device)
    env = {**os.environ, "CVDD_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def digits_run_peak(keep: str = "") -> dict:
    """Run the digits config from an empty run folder: a temporary one, or `keep` when given (it must not exist)."""
    if keep and Path(keep).exists():
        raise SystemExit(f"memory.py: --keep-run folder {keep!r} already exists; name a new folder")
    with tempfile.TemporaryDirectory() as scratch:
        folder = keep or scratch
        env = {**os.environ, "CVDD_NO_PROGRESS": "1"}
        subprocess.run([sys.executable, "-m", "cvdd", "run", "--config", str(ROOT / "configs" / "digits.yaml"),
                        "--run-dir", folder], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    return {"peak_rss_bytes": metrics["peak_rss_bytes"], "stage_peak_rss_bytes": metrics["stage_peak_rss_bytes"],
            "stage_seconds": metrics["stage_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs=2, default=[20, 200], metavar=("SHORT", "LONG"))
    parser.add_argument("--digits-run", action="store_true", help="also time a whole digits run (about 5 minutes)")
    parser.add_argument("--keep-run", default="", metavar="DIR",
                        help="with --digits-run: keep the digits run folder in DIR (a new folder) for later use")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    gib = 2**30
    short, long = (synthesis_peak(n, args.device) for n in args.iterations)
    key = "cuda_max_allocated_bytes" if args.device.startswith("cuda") else "peak_rss_bytes"
    growth = long[key] / short[key]
    print(f"cifar10-cpu synthesis item ({args.device}): peak {key} {short[key] / gib:.3f} GiB at "
          f"{args.iterations[0]} iterations, {long[key] / gib:.3f} GiB at {args.iterations[1]}; "
          f"long / short = {growth:.3f}")
    memory = {"device": args.device, "synthesis": {str(args.iterations[0]): short, str(args.iterations[1]): long,
                                                   "long_over_short": growth}}
    if args.digits_run:
        digits = digits_run_peak(args.keep_run)
        memory["digits_run"] = digits
        stages = ", ".join(f"{k} {v / gib:.2f}" for k, v in digits["stage_peak_rss_bytes"].items())
        print(f"digits run: peak RSS {digits['peak_rss_bytes'] / gib:.2f} GiB (after each stage, GiB: {stages})")
    if args.device == "cpu":
        saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        saved["memory"] = memory
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
