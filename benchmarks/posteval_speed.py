"""Time post-evaluation with on-the-fly committee soft labels against the sum of its parts.

The CPU profile of CIFAR-10: 100 distilled images at 32 px (IPC 10), a ResNet-18 student at
width 0.25 and the five-member committee of configs/cifar10-cpu.yaml (width 0.25, ResNet-50
and DenseNet-121 at 0.125), batch 16. Three timings of cvdd.evaluate.train_student over the
same epochs, alternated in rounds:

- soft: the student learns from the committee's BSSL soft labels, computed for every batch;
- hard: the same student with hard labels, which is the student's own training step;
- teachers: the committee's soft labels for the same number of batches, alone;
- stored: the student replaying a label store (cvdd.labels) built once before the rounds.

The ratio soft / (hard + teachers) shows what the on-the-fly labelling costs beyond its
parts, and stored / hard what replaying stored labels costs beyond hard-label training.
Images and models are random (untrained): speed does not depend on the weights.

    python benchmarks/posteval_speed.py --epochs 10 --rounds 3

Writes posteval_onthefly_over_parts and posteval_stored_over_hard into benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cvdd.config import EvalConfig
from cvdd.data import ImageDataset, TensorSplit
from cvdd.evaluate import Committee, eval_batch_size, train_student
from cvdd.labels import build_label_store
from cvdd.models import create_model
from cvdd.voting import prior_weights

RESULTS = Path(__file__).resolve().parent / "results.json"
COMMITTEE = {"resnet18": 0.25, "resnet50": 0.125, "densenet121": 0.125, "shufflenet_v2": 0.25, "mobilenet_v2": 0.25}


def _dataset(classes: int, size: int, test_images: int) -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    test = TensorSplit(torch.randint(0, 256, (test_images, 3, size, size), dtype=torch.uint8, generator=generator),
                       torch.arange(test_images) % classes)
    return ImageDataset(name="benchmark", class_names=[str(c) for c in range(classes)], channels=3, image_size=size,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=test, test=test, identity="benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()

    classes, size = 10, 32
    dataset = _dataset(classes, size, test_images=20)
    teachers = {}
    for index, (arch, width) in enumerate(COMMITTEE.items()):
        torch.manual_seed(index)
        teachers[arch] = create_model(arch, classes, 3, size, width).eval().requires_grad_(False)
    committee = Committee(teachers, prior_weights([40.0] * len(teachers), 5.0), dataset.class_names)
    images = torch.rand(args.images, 3, size, size)
    labels = torch.arange(args.images) % classes
    cfg = EvalConfig(epochs=args.epochs, eval_every=args.epochs)
    batch = eval_batch_size(cfg, args.images)
    batches = args.epochs * -(-args.images // batch)

    def soft():
        train_student(images, labels, dataset, cfg, "resnet18", 0.25, torch.device("cpu"), 0, committee=committee)

    def hard():
        train_student(images, labels, dataset, cfg, "resnet18", 0.25, torch.device("cpu"), 0, label_mode="hard")

    start = time.perf_counter()
    store = build_label_store(images, dataset, cfg, committee, True, 0, 10, torch.device("cpu"), "benchmark")
    store_seconds = time.perf_counter() - start

    def stored():
        train_student(images, labels, dataset, cfg, "resnet18", 0.25, torch.device("cpu"), 0, stored=store)

    def teachers_alone():
        x = dataset.normalize(images[:batch])
        for _ in range(batches):
            committee.soft_labels(x, cfg.tau, cfg.bssl, cfg.soft_label_space)

    timings = {"soft": [], "hard": [], "teachers": [], "stored": []}
    for _ in range(args.rounds):
        for name, func in (("soft", soft), ("hard", hard), ("teachers", teachers_alone), ("stored", stored)):
            start = time.perf_counter()
            func()
            timings[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in timings.items()}
    ratio = median["soft"] / (median["hard"] + median["teachers"])
    stored_ratio = median["stored"] / median["hard"]
    seen = args.epochs * args.images
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.epochs} epochs of "
          f"{args.images} images, batch {batch}, {args.rounds} rounds")
    print(f"student images per second: soft (on the fly) {seen / median['soft']:.1f}, hard {seen / median['hard']:.1f}; "
          f"teachers alone {median['teachers']:.2f} s for {batches} batches")
    print(f"on-the-fly / (student step + teachers) = {ratio:.3f}")
    print(f"stored labels: {seen / median['stored']:.1f} images per second; stored / hard = {stored_ratio:.3f}; "
          f"store built once in {store_seconds:.2f} s, {store.bytes_per_image_epoch():.1f} bytes per image per epoch")
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved["posteval_onthefly_over_parts"] = round(ratio, 4)
    saved["posteval_stored_over_hard"] = round(stored_ratio, 4)
    saved["posteval"] = {"seconds": median, "epochs": args.epochs, "images": args.images, "batch": batch,
                         "rounds": args.rounds, "store_build_seconds": store_seconds,
                         "store_bytes_per_image_epoch": store.bytes_per_image_epoch()}
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
