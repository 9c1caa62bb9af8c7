"""Time one CV-DD synthesis step against its floor and against single-member SRe2L++.

The CV-DD step (N = 2 experts, resnet18 + mobilenet_v2, one batch of 100 images at 32 px)
runs through cvdd.synthesis.synthesize_item, the code path of `cvdd distill`. The floor is
the bare forward and pixel-gradient backward of the same two experts on the same batch:
no augmentation, no BN statistics, no optimiser step. The three timings alternate in
rounds, so a load that changes during the run affects them alike; each figure is the
median over rounds of the mean step time.

    python benchmarks/synthesis_speed.py            # CPU-profile widths (0.25) and full widths
    python benchmarks/synthesis_speed.py --widths 0.25 --rounds 3
    python benchmarks/synthesis_speed.py --widths 0.25 --options default --profile 15

Prints ms per image per iteration and the ratios, and writes synthesis_over_floor (at the
first width) into benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cvdd.config import SynthesisConfig
from cvdd.data import ImageDataset, Split
from cvdd.models import create_model
from cvdd.synthesis import Expert, WorkItem, synthesize_item

RESULTS = Path(__file__).resolve().parent / "results.json"
MEMBERS = ("resnet18", "mobilenet_v2")


class _NoSplit(Split):
    def __len__(self):
        return 0


def _dataset(classes: int, size: int) -> ImageDataset:
    """Describe a dataset of `classes` classes, 3 channels and `size` px with no images (only shapes are used)."""
    return ImageDataset(name="benchmark", class_names=[str(c) for c in range(classes)], channels=3, image_size=size,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=_NoSplit(), test=_NoSplit(),
                        identity="benchmark")


def _members(width: float, classes: int, size: int) -> dict:
    models = {}
    for index, arch in enumerate(MEMBERS):
        torch.manual_seed(index)
        models[arch] = create_model(arch, classes, 3, size, width).eval().requires_grad_(False)
    return models


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def _time(step, device: str = "cpu") -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


# "default" has the fused BatchNorm statistics (synthesis.fused_bn, on by default). "separate"
# is the same step with the statistics hook that runs used before that option existed.
OPTIONS = {"default": {}, "separate": {"fused_bn": False}, "channels_last": {"channels_last": True},
           "bf16": {"precision": "bf16"}, "compile": {"compile": True}}


def measure(width: float, batch: int, size: int, iterations: int, rounds: int, options: list[str],
            device: str = "cpu", profile_rows: int = 0) -> dict:
    dataset = _dataset(batch, size)
    # The floor runs these models without BN statistics hooks; every other step attaches its
    # hooks to copies of them.
    bare = {name: model.to(device) for name, model in _members(width, batch, size).items()}
    images = torch.randn(batch, 3, size, size).to(device)
    labels = torch.arange(batch).to(device)
    item = WorkItem(0, 0, list(range(batch)))
    weights = torch.tensor([0.6, 0.4]).to(device)

    def cvdd_step(option: str):
        cfg = SynthesisConfig(ipc=1, iterations=iterations, **OPTIONS[option])
        # Experts persist across calls, as they do across the items of `cvdd distill`, so a
        # compiled expert is compiled once, in the warm-up call.
        # Each option gets its own copies of the clean models: a fused expert replaces the
        # forward of its model's BatchNorm layers for as long as it lives.
        experts = [Expert(name, copy.deepcopy(model), 50.0, True, channels_last=cfg.channels_last,
                          compile=cfg.compile, fused_bn=cfg.fused_bn)
                   for name, model in bare.items()]
        return lambda: synthesize_item(item, experts, weights, dataset, cfg, images, device, 0, use_crop=True)

    def sre2l_step():
        cfg = SynthesisConfig(ipc=1, iterations=iterations)
        expert = Expert(MEMBERS[0], copy.deepcopy(bare[MEMBERS[0]]), 50.0, True)
        return lambda: synthesize_item(item, [expert], torch.ones(1, device=device), dataset, cfg, images, device, 0,
                                       use_crop=True)

    def floor_step():
        for _ in range(iterations):
            x = images.clone().requires_grad_(True)
            loss = sum(w * F.cross_entropy(m(x), labels) for w, m in zip(weights, bare.values()))
            loss.backward()

    steps = {f"cvdd {option}": cvdd_step(option) for option in options}
    steps["sre2l++"] = sre2l_step()
    steps["floor"] = floor_step
    compile_seconds = {}
    for name, step in steps.items():
        compile_seconds[name] = _time(step, device)  # warm-up; for compile, this call compiles
    timings = {name: [] for name in steps}
    for _ in range(rounds):
        # Alternating in rounds spreads a changing load over all timings alike.
        for name, step in steps.items():
            timings[name].append(_time(step, device) / iterations)
    median = {k: statistics.median(v) for k, v in timings.items()}
    profiles = {}
    if profile_rows:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        for name in ("cvdd default", "floor"):
            if name not in steps:
                continue
            with profile(activities=activities) as prof:
                steps[name]()
            profiles[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile_rows)
    return {
        "width": width, "batch": batch, "image_size": size, "iterations": iterations, "rounds": rounds,
        "ms_per_image_iteration": {k: 1000 * v / batch for k, v in median.items()},
        "over_floor": {k: median[k] / median["floor"] for k in median if k.startswith("cvdd")},
        "synthesis_over_floor": median["cvdd default"] / median["floor"],
        "cvdd_over_sre2lpp": median["cvdd default"] / median["sre2l++"],
        "first_call_seconds": compile_seconds,
        "profiles": profiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10, help="synthesis steps per timed call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS),
                        help="speed options to time; compile spends a minute or more compiling first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after the rounds, print the profiler's top ROWS operators of one CV-DD call and one floor call")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {describe_device(args.device)}")
    results = []
    for width in args.widths:
        r = measure(width, args.batch, args.size, args.iterations, args.rounds, args.options, args.device,
                    args.profile)
        for name, table in r.pop("profiles").items():
            print(f"profile of one {name} call ({args.iterations} steps), width {width}:\n{table}")
        results.append(r)
        ms = r["ms_per_image_iteration"]
        print(f"width {width}, batch {args.batch}, {args.size} px: ms per image per iteration: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
        print(f"  cvdd / floor: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in r["over_floor"].items())
              + f"; cvdd / sre2l++ {r['cvdd_over_sre2lpp']:.3f}")
    if args.device == "cpu" and args.size == 32 and args.widths[0] == 0.25:
        saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        saved["synthesis_over_floor"] = round(results[0]["synthesis_over_floor"], 4)
        saved["synthesis"] = results
        RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote synthesis_over_floor {saved['synthesis_over_floor']} to {RESULTS}")


if __name__ == "__main__":
    main()
