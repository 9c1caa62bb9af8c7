"""Image synthesis for SRe2L, SRe2L++ and CV-DD (`cvdd distill`).

Synthetic images are optimised in normalised pixel space with Adam, one image per class
per batch. Each step augments the batch (RandomResizedCrop, flip, roll), passes it
through the chosen experts and minimises
    sum_i w_i * [CE(Phi_i(aug(x)), y) + r_bn * L_BN,i(aug(x))]
(Eq. 4 and Algorithm 2 of Cui et al., "Dataset Distillation via Committee Voting").
The members are frozen, so backward computes gradients for the pixels only.

The work is split into items (IPC index k, class block b); each item is written to its
own file as soon as it finishes, so an interrupted run continues with the next item.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from .progress import tqdm

from . import distributed
from .augment import random_resized_crop, random_roll
from .bn import BNStatisticsHook, bn_matching_loss, require_batchnorm
from .config import SynthesisConfig, config_to_dict, fingerprint
from .data import ImageDataset, sample_per_class
from .errors import ConfigError
from .runs import atomic_torch_save, atomic_write_text
from .train import autocast, seed_for
from .voting import draw_experts, online_reweighting, strongest_expert, voter_weights

log = logging.getLogger(__name__)

SYNTHESIS_METHODS = ("sre2l", "sre2l++", "cvdd")


@dataclass
class WorkItem:
    """One synthesis batch: IPC index `ipc_index`, classes `classes` (one image each)."""

    ipc_index: int
    block: int
    classes: list[int]

    @property
    def name(self) -> str:
        return f"ipc{self.ipc_index:03d}-block{self.block:03d}"


def class_block_size(cfg: SynthesisConfig, num_classes: int) -> int:
    if cfg.batch_size is not None:
        return min(cfg.batch_size, num_classes)
    return num_classes if num_classes < 100 else 100


def work_items(cfg: SynthesisConfig, num_classes: int) -> list[WorkItem]:
    """List all (IPC index, class block) batches of a synthesis run, in a fixed order."""
    size = class_block_size(cfg, num_classes)
    blocks = [list(range(start, min(start + size, num_classes))) for start in range(0, num_classes, size)]
    return [WorkItem(k, b, classes) for k in range(cfg.ipc) for b, classes in enumerate(blocks)]


def roll_pixels(cfg: SynthesisConfig, image_size: int) -> int:
    if cfg.roll is not None:
        return cfg.roll
    if image_size > 64:
        return 32
    return max(1, min(4, image_size // 8))


def resolve_init(method: str, cfg: SynthesisConfig) -> str:
    if cfg.init != "auto":
        return cfg.init
    return "noise" if method == "sre2l" else "real"


class Expert:
    """A frozen committee member with its BN hook and prior.

    With `channels_last` or `compile`, the expert works on its own copy of the model, so the
    committee's models (which post-evaluation uses as teachers) keep their layout. With
    `fused_bn` (not combined with `compile`), the BatchNorm layers return their input
    statistics themselves until the hook is removed (see cvdd.bn.BNStatisticsHook).
    """

    def __init__(self, name: str, model: nn.Module, prior: float, needs_bn: bool,
                 channels_last: bool = False, compile: bool = False, fused_bn: bool = True):
        self.name = name
        if channels_last or compile:
            model = copy.deepcopy(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.prior = prior
        self.channels_last = channels_last
        if needs_bn:
            require_batchnorm(model, name)
        self.hook = BNStatisticsHook(model, fused=fused_bn and not compile) if needs_bn else None
        self.forward = torch.compile(model) if compile else model

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.hook is not None:
            self.hook.clear()
        return self.forward(images)


def _valid_range(dataset: ImageDataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def initial_images(
    init: str, dataset: ImageDataset, classes: list[int], real_indices: torch.Tensor | None,
    ipc_index: int, generator: torch.Generator, device,
) -> torch.Tensor:
    """Starting point of one batch in normalised space, shape (len(classes), C, H, W)."""
    if init == "real":
        picks = real_indices[classes, ipc_index]
        return dataset.normalize(dataset.train.get(picks.tolist()).to(device))
    shape = (len(classes), dataset.channels, dataset.image_size, dataset.image_size)
    return torch.randn(shape, generator=generator).to(device)


def synthesize_item(
    item: WorkItem, experts: list[Expert], weights: torch.Tensor, dataset: ImageDataset,
    cfg: SynthesisConfig, init_images: torch.Tensor, device, seed: int, use_crop: bool,
    callback: Callable | None = None, online: bool = False, partial: bool = False, flip: bool = True,
) -> tuple[torch.Tensor, list[dict]]:
    """Optimise one batch of synthetic images.

    Returns:
        (images float in [0, 1], shape (B, C, H, W), on the CPU; one log row per iteration).
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(item.classes, device=device)
    x = init_images.clone().detach().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    low, high = _valid_range(dataset, device)
    roll = roll_pixels(cfg, dataset.image_size)
    bn_owner = strongest_expert([e.prior for e in experts]) if partial else None

    ce_history, bn_history, weight_history, lr_history = [], [], [], []
    for iteration in range(cfg.iterations):
        lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * iteration / cfg.iterations))
        for group in optimizer.param_groups:
            group["lr"] = lr
        current = online_reweighting(weights, iteration, cfg.iterations) if online else weights

        if use_crop:
            augmented = random_resized_crop(x, scale=cfg.crop_scale, flip=flip, generator=generator)
        elif flip:
            flips = torch.rand(x.shape[0], generator=generator) < 0.5
            augmented = torch.where(flips.to(device).view(-1, 1, 1, 1), x.flip(3), x)
        else:
            augmented = x
        augmented = random_roll(augmented, roll, generator=generator)

        total = torch.zeros((), device=device)
        ce_terms, bn_terms = [], []
        for index, expert in enumerate(experts):
            with autocast(augmented.device, cfg.precision):
                logits = expert(augmented)
            ce = F.cross_entropy(logits.float(), labels)
            if expert.hook is not None and cfg.r_bn > 0 and (bn_owner is None or index == bn_owner):
                bn = bn_matching_loss(expert.hook, cfg.bn_form, cfg.bn_reduction, cfg.first_bn_multiplier)
            else:
                bn = torch.zeros((), device=device)
            total = total + current[index] * (ce + cfg.r_bn * bn)
            ce_terms.append(ce.detach())
            bn_terms.append(bn.detach())

        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))

        # Kept as tensors; converted to numbers once per item, not per iteration.
        ce_history.append(torch.stack(ce_terms))
        bn_history.append(torch.stack(bn_terms))
        weight_history.append(current.detach().clone())
        lr_history.append(lr)
        if callback is not None and ((iteration + 1) % cfg.callback_every == 0 or iteration + 1 == cfg.iterations):
            callback({
                "item": item.name, "iteration": iteration + 1, "iterations": cfg.iterations,
                "experts": [e.name for e in experts],
                "ce": [float(v) for v in ce_terms], "bn": [float(v) for v in bn_terms],
                "weights": [float(v) for v in current], "lr": lr, "labels": item.classes,
                "images": dataset.denormalize(x.detach()).clamp(0, 1).cpu(),
            })

    ce_all = torch.stack(ce_history).cpu()
    bn_all = torch.stack(bn_history).cpu()
    w_all = torch.stack(weight_history).cpu()
    rows = []
    for iteration in range(cfg.iterations):
        for index, expert in enumerate(experts):
            rows.append({
                "item": item.name, "iteration": iteration + 1, "expert": expert.name,
                "weight": float(w_all[iteration, index]), "ce": float(ce_all[iteration, index]),
                "bn": float(bn_all[iteration, index]), "lr": lr_history[iteration],
            })
    images = dataset.denormalize(x.detach()).clamp(0, 1).cpu()
    return images, rows


def synthesis_fingerprint(method: str, cfg: SynthesisConfig, dataset: ImageDataset, members: list[str],
                          priors: dict[str, float], seed: int, member_ids: dict[str, str], flip: bool = True) -> str:
    relevant_priors = {m: priors.get(m) for m in members} if method == "cvdd" else {}
    # Only the flip-free case adds a part, so sets made with flips keep their keys.
    no_flip = [] if flip else ["no flip"]
    return fingerprint(method, cfg, dataset.identity, members, relevant_priors, seed, member_ids,
                       "init: random subset draw", *no_flip)


def distill(
    method: str, committee: dict[str, nn.Module], priors: dict[str, float], dataset: ImageDataset,
    cfg: SynthesisConfig, out_dir: str | Path, device, seed: int = 0, single_member: str | None = None,
    callback: Callable | None = None, member_ids: dict[str, str] | None = None,
    train_indices: torch.Tensor | None = None, flip: bool = True,
) -> dict:
    """Distil `dataset` into `cfg.ipc` images per class and write them to `out_dir`.

    Args:
        method: `sre2l`, `sre2l++` or `cvdd`.
        committee: member name -> frozen model (eval mode, on `device`).
        priors: member name -> prior performance in percent (used by cvdd).
        single_member: the member of sre2l and sre2l++ (default: the first of `committee`).
        callback: called every `cfg.callback_every` iterations with the loss terms, the
            weights and the current images, for live plots.
        member_ids: member name -> checkpoint fingerprint, so a retrained member invalidates items.
        train_indices: restrict real-image initialisation to these train indices.
        flip: flip images at random in the per-step augmentation; follow the members'
            training (train.flip), since flipped inputs are foreign to members trained without.

    Returns:
        {"images": float (N, C, H, W) in [0, 1], "labels": (N,), "class_names": [...], ...}
    """
    if method not in SYNTHESIS_METHODS:
        raise ConfigError(f"synthesis method {method!r} is unknown; choose one of {', '.join(SYNTHESIS_METHODS)}")
    out_dir = Path(out_dir)
    if method == "cvdd":
        names = list(committee)
        missing = [n for n in names if n not in priors]
        if missing:
            raise ConfigError(
                f"member(s) {missing} have no prior and there is no priors.json; run `cvdd prior` first "
                "or set prior.values"
            )
        draws_from = names
    else:
        member = single_member or next(iter(committee))
        if member not in committee:
            raise ConfigError(f"member {member!r} is not in the committee {list(committee)}; set synthesis.member")
        draws_from = [member]
    if method == "cvdd" and cfg.experts > len(draws_from):
        raise ConfigError(
            f"number of experts N={cfg.experts} exceeds the committee size {len(draws_from)}; "
            f"use at most {len(draws_from)}"
        )

    needs_bn = cfg.r_bn > 0
    if needs_bn:
        for name in draws_from:
            require_batchnorm(committee[name], name)
    init = resolve_init(method, cfg)
    use_crop = not (method == "sre2l" and dataset.image_size <= 64)
    key = synthesis_fingerprint(method, cfg, dataset, draws_from, priors, seed, member_ids or {}, flip)
    items = work_items(cfg, dataset.num_classes)

    real_indices = None
    if init == "real":
        # The same draw as random_subset: real-initialised methods start from the random
        # subset's images, so their gain over it is what the optimisation adds.
        init_generator = torch.Generator().manual_seed(seed_for(seed, "random-subset"))
        labels = dataset.train.labels if train_indices is None else dataset.train.labels[train_indices]
        chosen = sample_per_class(labels, dataset.num_classes, cfg.ipc, init_generator)
        real_indices = chosen if train_indices is None else train_indices[chosen]

    for name in draws_from:
        committee[name].eval().requires_grad_(False)
    # Hooks are attached only after every check above passed, and removed in the finally block.
    experts_all: dict[str, Expert] = {}
    existing = out_dir / "images.pt"
    if existing.is_file():
        saved = torch.load(existing, weights_only=False)
        if saved.get("fingerprint") == key:
            log.info("%s: %s matches the config, reused", method, existing)
            return saved

    item_dir = out_dir / "items"
    start = time.perf_counter()
    try:
        for name in draws_from:
            experts_all[name] = Expert(name, committee[name], float(priors.get(name, 0.0)), needs_bn,
                                       channels_last=cfg.channels_last, compile=cfg.compile, fused_bn=cfg.fused_bn)
        # Under torchrun each rank optimises its share of the items (see cvdd.distributed).
        bar = tqdm(distributed.shard(items), desc=f"distill {method}", leave=False)
        for item in bar:
            path = item_dir / f"{item.name}.pt"
            if path.is_file():
                saved = torch.load(path, weights_only=False)
                if saved.get("fingerprint") == key:
                    continue
            item_seed = seed_for(seed, method, item.ipc_index, item.block)
            draw_generator = torch.Generator().manual_seed(
                seed_for(seed, "draw", item.ipc_index, 0 if cfg.draw == "per_ipc" else item.block)
            )
            if method == "cvdd":
                picks = draw_experts(len(draws_from), cfg.experts, draw_generator)
                chosen_names = [draws_from[i] for i in picks.tolist()]
                weights = voter_weights(cfg.voter, [experts_all[n].prior for n in chosen_names],
                                        cfg.temperature, draw_generator)
            else:
                chosen_names = draws_from
                weights = torch.ones(1)
            experts = [experts_all[n] for n in chosen_names]
            init_generator = torch.Generator().manual_seed(seed_for(item_seed, "noise"))
            init_images = initial_images(init, dataset, item.classes, real_indices, item.ipc_index,
                                         init_generator, device)
            images, rows = synthesize_item(
                item, experts, weights.to(device), dataset, cfg, init_images, device, item_seed, use_crop,
                callback=callback, online=cfg.online_reweighting and method == "cvdd",
                partial=cfg.partial_aggregation and method == "cvdd", flip=flip,
            )
            atomic_torch_save({"fingerprint": key, "images": images, "labels": torch.tensor(item.classes),
                               "experts": chosen_names, "weights": weights.cpu(), "rows": rows}, path)
            bar.set_postfix(experts="+".join(chosen_names))
    finally:
        for expert in experts_all.values():
            if expert.hook is not None:
                expert.hook.remove()

    distributed.barrier()
    if distributed.is_main():
        result = merge_items(method, items, item_dir, dataset, out_dir, key, cfg, time.perf_counter() - start)
    distributed.barrier()
    if not distributed.is_main():
        result = torch.load(out_dir / "images.pt", weights_only=False)
    return result


def merge_items(method, items, item_dir, dataset, out_dir, key, cfg, seconds) -> dict:
    """Join the finished item files into images.pt, synthesis.csv and a PNG ImageFolder tree."""
    images = torch.empty(cfg.ipc * dataset.num_classes, dataset.channels, dataset.image_size, dataset.image_size)
    labels = torch.empty(cfg.ipc * dataset.num_classes, dtype=torch.long)
    draws = []
    rows = []
    for item in items:
        saved = torch.load(item_dir / f"{item.name}.pt", weights_only=False)
        rows += saved["rows"]
        # Order: class-major, so images of class c are rows c*ipc .. c*ipc+ipc-1.
        for position, cls in enumerate(item.classes):
            row = cls * cfg.ipc + item.ipc_index
            images[row] = saved["images"][position]
            labels[row] = cls
        draws.append({"item": item.name, "experts": saved["experts"], "weights": saved["weights"].tolist()})
    result = {
        "images": images, "labels": labels, "class_names": list(dataset.class_names), "method": method,
        "ipc": cfg.ipc, "fingerprint": key, "config": config_to_dict(cfg), "draws": draws,
        "mean": list(dataset.mean), "std": list(dataset.std), "seconds": seconds,
    }
    atomic_torch_save(result, Path(out_dir) / "images.pt")
    write_synthesis_csv(rows, Path(out_dir) / "synthesis.csv")
    export_png(images, labels, dataset.class_names, Path(out_dir) / "png")
    return result


def write_synthesis_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["item", "iteration", "expert", "weight", "ce", "bn", "lr"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def export_png(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], root: Path) -> None:
    """Write images (N, C, H, W) in [0, 1] as an ImageFolder tree root/<class>/<index>.png."""
    from PIL import Image

    from .runs import atomic_write_bytes

    counters: dict[int, int] = {}
    for image, label in zip(images, labels.tolist()):
        index = counters.get(label, 0)
        counters[label] = index + 1
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        mode = "L" if array.shape[2] == 1 else "RGB"
        picture = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        safe = class_names[label].replace("/", "_")
        atomic_write_bytes(root / safe / f"{index:04d}.png", buffer.getvalue())


def random_subset(dataset: ImageDataset, ipc: int, seed: int, out_dir: str | Path | None = None,
                  train_indices: torch.Tensor | None = None) -> dict:
    """IPC real training images per class chosen with `seed`: the baseline that synthesis must beat.

    With `train_indices`, the images come from those training rows only (validation runs).
    """
    split_tag = None if train_indices is None else [len(train_indices), int(train_indices.sum())]
    key = fingerprint("random", ipc, seed, dataset.identity, split_tag)
    if out_dir is not None and (Path(out_dir) / "images.pt").is_file():
        saved = torch.load(Path(out_dir) / "images.pt", weights_only=False)
        if saved.get("fingerprint") == key:
            return saved
    generator = torch.Generator().manual_seed(seed_for(seed, "random-subset"))
    labels = dataset.train.labels if train_indices is None else dataset.train.labels[train_indices]
    chosen = sample_per_class(labels, dataset.num_classes, ipc, generator).flatten()  # (K * ipc,)
    indices = chosen if train_indices is None else train_indices[chosen]
    images = dataset.train.get(indices.tolist()).float() / 255.0
    labels = dataset.train.labels[indices]
    result = {
        "images": images, "labels": labels, "class_names": list(dataset.class_names), "method": "random",
        "ipc": ipc, "fingerprint": key, "indices": indices,
        "mean": list(dataset.mean), "std": list(dataset.std), "seconds": 0.0,
    }
    if out_dir is not None:
        atomic_torch_save(result, Path(out_dir) / "images.pt")
        export_png(images, labels, dataset.class_names, Path(out_dir) / "png")
    return result
