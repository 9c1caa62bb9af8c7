"""Time one CV-DD synthesis step against its floor and against single-member SRe2L++.

The CV-DD step (N = 2 experts, resnet18 + mobilenet_v2, one batch of 100 images at 32 px)
runs through cvdd.synthesis.synthesize_item, the code path of `cvdd distill`. The floor is
the bare forward and pixel-gradient backward of the same two experts on the same batch:
no augmentation, no BN statistics, no optimiser step. The three timings alternate in
rounds, so a load that changes during the run affects them alike; each figure is the
median over rounds of the mean step time.

    python benchmarks/synthesis_speed.py            # CPU-profile widths (0.25) and full widths
    python benchmarks/synthesis_speed.py --widths 0.25 --rounds 3

Prints ms per image per iteration and the ratios, and writes synthesis_over_floor (at the
first width) into benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
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


def _time(step, iterations: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return (time.perf_counter() - start) / iterations


def measure(width: float, batch: int, size: int, iterations: int, rounds: int) -> dict:
    dataset = _dataset(batch, size)
    models = _members(width, batch, size)
    images = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch)
    item = WorkItem(0, 0, list(range(batch)))
    cfg = SynthesisConfig(ipc=1, iterations=iterations)
    weights = torch.tensor([0.6, 0.4])

    def cvdd_step():
        experts = [Expert(name, model, 50.0, True) for name, model in models.items()]
        try:
            synthesize_item(item, experts, weights, dataset, cfg, images, "cpu", 0, use_crop=True)
        finally:
            for expert in experts:
                expert.hook.remove()

    def sre2l_step():
        expert = Expert(MEMBERS[0], models[MEMBERS[0]], 50.0, True)
        try:
            synthesize_item(item, [expert], torch.ones(1), dataset, cfg, images, "cpu", 0, use_crop=True)
        finally:
            expert.hook.remove()

    def floor_step():
        for _ in range(iterations):
            x = images.clone().requires_grad_(True)
            loss = sum(w * F.cross_entropy(m(x), labels) for w, m in zip(weights, models.values()))
            loss.backward()

    timings = {"cvdd": [], "sre2l++": [], "floor": []}
    for _ in range(rounds):
        # synthesize_item runs `iterations` steps per call, so each call time is divided by it.
        timings["cvdd"].append(_time(cvdd_step, 1) / iterations)
        timings["sre2l++"].append(_time(sre2l_step, 1) / iterations)
        timings["floor"].append(_time(floor_step, 1) / iterations)
    median = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "width": width, "batch": batch, "image_size": size, "iterations": iterations, "rounds": rounds,
        "ms_per_image_iteration": {k: 1000 * v / batch for k, v in median.items()},
        "synthesis_over_floor": median["cvdd"] / median["floor"],
        "cvdd_over_sre2lpp": median["cvdd"] / median["sre2l++"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=10, help="synthesis steps per timed call")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    results = [measure(w, args.batch, args.size, args.iterations, args.rounds) for w in args.widths]
    for r in results:
        ms = r["ms_per_image_iteration"]
        print(f"width {r['width']}: ms per image per iteration: cvdd {ms['cvdd']:.3f}, floor {ms['floor']:.3f}, "
              f"sre2l++ {ms['sre2l++']:.3f}; cvdd / floor {r['synthesis_over_floor']:.3f}, "
              f"cvdd / sre2l++ {r['cvdd_over_sre2lpp']:.3f}")
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved["synthesis_over_floor"] = round(results[0]["synthesis_over_floor"], 4)
    saved["synthesis"] = results
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
