"""Post-evaluation: train a fresh student on a distilled set only and report its test top-1.

Soft labels are computed on the fly for every augmented batch by the committee vote:
the teachers see exactly the batch the student sees (after RandomResizedCrop, flip and
CutMix), with BatchNorm normalising by that batch's own statistics when BSSL is on
(Section 3.5 and Algorithm 3 of Cui et al., "Dataset Distillation via Committee Voting").
The student minimises KL(softmax(t / tau) || softmax(s / tau)) with AdamW, no weight
decay on BatchNorm and bias parameters, and the smoothed cosine schedule
0.5 * (1 + cos(pi * e / (E * eta))).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from .progress import tqdm

from .augment import apply_crop, apply_cutmix, sample_crop_params, sample_cutmix
from .bn import batch_specific_bn
from .config import EvalConfig, config_to_dict
from .data import ImageDataset
from .errors import CvddError
from .models import create_model
from .train import evaluate_top1, param_groups_no_decay
from .voting import aggregate_soft_labels

log = logging.getLogger(__name__)


def smoothed_lr_factor(epoch: int, epochs: int, eta: float) -> float:
    """LR multiplier at `epoch` (0-based) of `epochs`: 0.5 * (1 + cos(pi * epoch / (epochs * eta)))."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (epochs * eta)))


def eval_batch_size(cfg: EvalConfig, num_images: int) -> int:
    if cfg.batch_size is not None:
        return cfg.batch_size
    return 10 if num_images <= 16 else 16


class Committee:
    """Frozen teachers and their vote weights, producing soft labels for a batch."""

    def __init__(self, teachers: dict[str, nn.Module], weights: torch.Tensor, class_names: list[str]):
        self.teachers = teachers
        self.weights = weights
        self.class_names = class_names

    def soft_labels(self, images: torch.Tensor, tau: float, bssl: bool, space: str) -> torch.Tensor:
        """Return (B, K) target probabilities for normalised images (B, C, H, W).

        One forward pass per teacher under inference mode; the result is an ordinary tensor
        that autograd may save (the KL loss keeps its target for the backward pass).
        """
        with torch.inference_mode():
            logits = []
            for model in self.teachers.values():
                context = batch_specific_bn(model) if bssl else contextlib.nullcontext()
                with context:
                    logits.append(model(images))
            targets = aggregate_soft_labels(logits, self.weights, tau=tau, space=space)
        return targets.clone()


def check_class_names(distilled: dict, dataset: ImageDataset, committee_names: list[str] | None = None) -> None:
    names = list(distilled.get("class_names", []))
    if names != list(dataset.class_names):
        raise CvddError(
            f"the distilled set of method {distilled.get('method')!r} has classes {names[:5]}... but the dataset "
            f"and teachers have {list(dataset.class_names)[:5]}...; distil it again from this committee"
        )
    if committee_names is not None and list(committee_names) != names:
        raise CvddError(
            f"the distilled set's class list differs from the teachers' ({names[:5]}... against "
            f"{list(committee_names)[:5]}...); use teachers trained on the same class order"
        )


def batch_starts(count: int, batch_size: int) -> list[int]:
    """First positions of the batches of one epoch; a last batch of one image joins the previous one."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return starts


def augmented_batches(normalized: torch.Tensor, cfg: EvalConfig, epochs: int, batch_size: int, flip: bool,
                      generator: torch.Generator):
    """Yield (epoch, batch rows, crop, CutMix draw or None, augmented batch) for every batch of every epoch.

    The one source of post-evaluation batches: on-the-fly training and the label store draw
    from `generator` in exactly this order, so a stored stream replays what a student saw.
    """
    count = len(normalized)
    device = normalized.device
    starts = batch_starts(count, batch_size)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for position, first in enumerate(starts):
            last = starts[position + 1] if position + 1 < len(starts) else count
            rows = order[first:last]
            x = normalized[rows.to(device)]
            crop = sample_crop_params(len(x), x.shape[-1], scale=cfg.crop_scale, flip=flip, generator=generator)
            x = apply_crop(x, crop)
            mix = None
            if cfg.cutmix_alpha > 0:
                mix = sample_cutmix(len(x), x.shape[-1], cfg.cutmix_alpha, generator=generator)
                x = apply_cutmix(x, mix)
            yield epoch, rows, crop, mix, x


def train_student(
    images: torch.Tensor, labels: torch.Tensor, dataset: ImageDataset, cfg: EvalConfig, student: str,
    width: float, device: torch.device, seed: int, committee: Committee | None = None,
    label_mode: str = "soft", test_split=None, desc: str = "student", flip: bool = True,
    stored=None, ddp: bool = False,
) -> dict:
    """Train a freshly initialised student on (images, labels) and measure test top-1.

    Args:
        images: distilled images, float (N, C, H, W) in [0, 1].
        labels: (N,) class indices (used by hard-label mode and for the class check).
        committee: teachers and weights for soft labels; required when `label_mode` is soft
            and no `stored` labels are given.
        test_split: the split to measure top-1 on (default: the dataset's test split).
        flip: flip training images at random (follow train.flip of the committee).
        stored: a :class:`cvdd.labels.LabelStore` whose batches, augmentation and soft labels
            are replayed instead of drawn and computed; `seed` then sets only the initial weights.
        ddp: under torchrun, train one student with DistributedDataParallel: every rank draws
            the same global batch and trains on its own rows of it (rank, rank + K, ...).

    Returns:
        a dict with the curve, `top1` (final epoch), `best_top1`, `best_epoch` and the protocol.
    """
    from . import distributed

    if label_mode == "soft" and committee is None and stored is None:
        raise CvddError("soft-label evaluation needs teachers; train the committee or use label mode 'hard'")
    test_split = test_split if test_split is not None else dataset.test
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(student, dataset.num_classes, dataset.channels, dataset.image_size, width).to(device)
    ddp = ddp and distributed.active()
    trained = distributed.wrap_ddp(model, device) if ddp else model
    optimizer = torch.optim.AdamW(param_groups_no_decay(model, cfg.weight_decay), lr=cfg.lr)
    batch_size = eval_batch_size(cfg, len(images))
    normalized = dataset.normalize(images.to(device))
    labels = labels.to(device)
    count = len(normalized)
    if count % batch_size == 1 and count > 1:
        # A last batch of one image cannot give BatchNorm batch statistics at 1x1 feature
        # maps; fold it into the previous batch instead.
        log.info("batch size %d leaves one image in the last batch; it joins the previous batch", batch_size)
    if stored is not None:
        stored.check(count, batch_size, cfg.epochs)
        batches = stored.batches(normalized, device)
    else:
        batches = augmented_batches(normalized, cfg, cfg.epochs, batch_size, flip, generator)

    curve = []
    start = time.perf_counter()
    steps = len(batch_starts(count, batch_size))
    bar = tqdm(range(cfg.epochs), desc=desc, leave=False)
    for epoch in bar:
        factor = smoothed_lr_factor(epoch, cfg.epochs, cfg.eta)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for _ in range(steps):
            batch = next(batches)
            _, rows, _, mix, x = batch[:5]
            mine = distributed.local_rows(len(x)) if ddp else slice(None)
            y = labels[rows.to(device)]
            x_local = x[mine]
            logits = trained(x_local)
            if label_mode == "soft":
                if stored is not None:
                    targets = batch[5][mine]
                else:
                    # The teachers label exactly the batch the student trains on, mixed pixels included.
                    targets = committee.soft_labels(x_local, cfg.tau, cfg.bssl, cfg.soft_label_space)
                # NOTE: no tau**2 factor. AdamW's step size is
                # nearly independent of a constant loss scale, but SGD students would need it.
                loss = F.kl_div(F.log_softmax(logits / cfg.tau, dim=1), targets, reduction="batchmean")
            else:
                lam = mix.lam if mix is not None else 1.0
                loss = lam * F.cross_entropy(logits, y[mine])
                if mix is not None and lam < 1.0:
                    loss = loss + (1.0 - lam) * F.cross_entropy(logits, y[mix.permutation.to(device)][mine])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(x_local)
            correct += (logits.argmax(dim=1) == y[mine]).sum()

        record = {"epoch": epoch + 1, "loss": float(loss_sum) / count, "train_top1": float(correct) / count,
                  "lr": cfg.lr * factor}
        if ddp:
            record["loss"] = distributed.all_sum(float(loss_sum)) / count
            record["train_top1"] = distributed.all_sum(float(correct)) / count
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            record["test_top1"] = evaluate_top1(model, test_split, dataset, device)
            bar.set_postfix(top1=f"{record['test_top1']:.3f}")
        curve.append(record)

    tested = [r for r in curve if "test_top1" in r]
    best = max(tested, key=lambda r: r["test_top1"])
    return {
        "student": student, "seed": seed, "label_mode": label_mode,
        "top1": tested[-1]["test_top1"], "best_top1": best["test_top1"], "best_epoch": best["epoch"],
        "curve": curve, "seconds": time.perf_counter() - start,
        "protocol": {
            "label_mode": label_mode, "loss": "kl" if label_mode == "soft" else "cross_entropy",
            "labels": ("stored" if stored is not None else "on the fly") if label_mode == "soft" else None,
            "label_store": stored.describe() if stored is not None and label_mode == "soft" else None,
            "ddp_ranks": distributed.world_size() if ddp else 1,
            "tau": cfg.tau if label_mode == "soft" else None, "bssl": cfg.bssl if label_mode == "soft" else None,
            "soft_label_space": cfg.soft_label_space if label_mode == "soft" else None,
            "augmentation": {"random_resized_crop": list(cfg.crop_scale), "flip": flip,
                             "cutmix_alpha": cfg.cutmix_alpha},
            "epochs": cfg.epochs, "batch_size": batch_size,
            "optimizer": {"name": "adamw", "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                          "no_decay": "batchnorm and bias", "schedule": "smoothed cosine", "eta": cfg.eta},
            "student": student, "student_width": width, "seed": seed, "num_images": count,
            "test_images": len(test_split),
            "teachers": list(committee.teachers) if committee is not None and label_mode == "soft" else [],
            "teacher_weights": committee.weights.tolist() if committee is not None and label_mode == "soft" else [],
            "config": config_to_dict(cfg),
        },
    }
