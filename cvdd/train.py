"""Supervised training, top-1 evaluation and committee training (`cvdd pretrain`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from .progress import tqdm

from .augment import random_resized_crop
from . import distributed
from .config import RunConfig, TrainConfig, config_to_dict, fingerprint
from .data import ImageDataset, Split
from .models import checkpoint_payload, count_parameters, create_model, load_checkpoint
from .runs import RunFolder, atomic_torch_save, atomic_write_text

log = logging.getLogger(__name__)


def seed_for(seed: int, *names) -> int:
    """Derive a stable per-item seed from a base seed and names (such as a member's arch)."""
    text = "|".join(str(n) for n in names)
    return (seed * 1_000_003 + zlib.crc32(text.encode())) % (2**31)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups_no_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters so that BatchNorm weights and all biases get no weight decay."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if name == "bias" or isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_top1(model: nn.Module, split: Split, dataset: ImageDataset, device: torch.device,
                  batch_size: int = 500, precision: str = "fp32") -> float:
    """Return the top-1 accuracy of `model` on `split`, as a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for images, labels in split.batches(batch_size):
        with autocast(device, precision):
            logits = model(dataset.normalize(images.to(device)))
        correct += int((logits.argmax(dim=1).cpu() == labels).sum())
    model.train(was_training)
    return correct / max(1, len(split))


def train_model(
    model: nn.Module, dataset: ImageDataset, cfg: TrainConfig, device: torch.device, seed: int,
    indices: torch.Tensor | None = None, desc: str = "train", state_path=None, state_key: str = "",
    ddp: bool = False,
) -> list[dict]:
    """Train `model` with cross-entropy on the train split (or the subset `indices`).

    Uses SGD with momentum or AdamW, a per-step cosine schedule, and per-sample
    RandomResizedCrop and flip when `cfg.augment` is set. Returns one dict per epoch
    with the mean loss, the train top-1 and the seconds taken.

    With `state_path`, the model, optimiser, schedule and random states are saved after
    every epoch, and a later call with the same `state_key` continues after the last
    saved epoch with the same random stream as an uninterrupted run.

    With `ddp` under torchrun, every rank draws the same global batch and augmentation and
    trains a DistributedDataParallel copy on its own rows of it; rank 0 writes the state file.
    """
    from . import distributed

    ddp = ddp and distributed.active()
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    trained = distributed.wrap_ddp(model, device) if ddp else model
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(param_groups_no_decay(model, cfg.weight_decay), lr=cfg.lr)
    size = len(dataset.train) if indices is None else len(indices)
    steps_per_epoch = max(1, size // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    history = []
    first_epoch = 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("key") == state_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = state["history"]
            first_epoch = state["epoch"]
            log.info("%s: continuing after epoch %d from %s", desc, first_epoch, state_path)

    for epoch in range(first_epoch, cfg.epochs):
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        batches = dataset.train.batches(cfg.batch_size, shuffle=True, generator=generator, drop_last=True,
                                        indices=indices)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for images, labels in bar:
            images = dataset.normalize(images.to(device))
            labels = labels.to(device)
            if cfg.augment:
                images = random_resized_crop(images, scale=cfg.crop_scale, flip=cfg.flip, generator=generator)
            if ddp:
                mine = distributed.local_rows(len(images))
                images, labels = images[mine], labels[mine]
            with autocast(device, cfg.precision):
                logits = trained(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += len(labels)
        if ddp:
            seen = int(distributed.all_sum(seen))
            loss_sum = torch.tensor(distributed.all_sum(float(loss_sum)))
            correct = torch.tensor(distributed.all_sum(float(correct)))
        record = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / max(1, seen),
            "train_top1": int(correct) / max(1, seen),
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        log.info("%s epoch %d/%d: loss %.4f, train top-1 %.4f, %.1f s", desc, epoch + 1, cfg.epochs,
                 record["loss"], record["train_top1"], record["seconds"])
        if state_path is not None and epoch + 1 < cfg.epochs and (not ddp or distributed.is_main()):
            atomic_torch_save({
                "key": state_key, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            }, state_path)
    model.eval()
    return history


def member_fingerprint(cfg: RunConfig, dataset: ImageDataset, arch: str, split_tag: str = "full") -> str:
    """Identify what a member checkpoint was trained from: data, arch, width, recipe, seed."""
    return fingerprint(dataset.identity, dataset.class_names, arch, cfg.member_width(arch),
                       cfg.member_train(arch), cfg.seed, split_tag)


def _existing_checkpoint_matches(path, expected: str) -> bool:
    if not path.is_file():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt file is retrained, not trusted
        log.warning("checkpoint %s cannot be read (%s); retraining it", path, exc)
        return False
    return isinstance(payload, dict) and payload.get("config", {}).get("fingerprint") == expected


def build_context(cfg_data: dict) -> dict:
    """Config, dataset, run folder and CPU device for a worker process (see cvdd.parallel)."""
    from .config import config_from_dict
    from .data import load_dataset

    from .runs import ValidationFolder

    data = dict(cfg_data)
    validation_folder = data.pop("_validation_folder", False)
    cfg = config_from_dict(data)
    run = RunFolder(cfg.resolved_run_dir())
    if validation_folder:
        run = ValidationFolder(run)
    return {"cfg": cfg, "dataset": load_dataset(cfg.data), "run": run, "device": torch.device("cpu")}


def worker_config_data(cfg: RunConfig, run: RunFolder) -> dict:
    """Plain config data for worker processes, with the run folder fixed to `run`."""
    from .runs import ValidationFolder

    data = config_to_dict(cfg)
    if isinstance(run, ValidationFolder):
        data["run_dir"] = str(run.base.root)
        data["_validation_folder"] = True
    else:
        data["run_dir"] = str(run.root)
    return data


def workers_for(cfg: RunConfig, device: torch.device) -> int:
    return cfg.workers if device.type == "cpu" else 1


def _train_member(context: dict, arch: str) -> dict:
    """Train one member from scratch (or from its per-epoch state) and save its checkpoint."""
    cfg, dataset, run, device = context["cfg"], context["dataset"], context["run"], context["device"]
    path = run.member_path(arch)
    expected = member_fingerprint(cfg, dataset, arch)
    train_cfg = cfg.member_train(arch)
    width = cfg.member_width(arch)
    torch.manual_seed(seed_for(cfg.seed, "init", arch))
    model = create_model(arch, dataset.num_classes, dataset.channels, dataset.image_size, width)
    log.info("member %s: width %g, %d parameters, %d epochs", arch, width, count_parameters(model),
             train_cfg.epochs)
    partial = path.with_suffix(".partial.pt")
    ddp = cfg.ddp and distributed.active()
    history = train_model(model, dataset, train_cfg, device, seed_for(cfg.seed, "train", arch), desc=arch,
                          state_path=partial, state_key=expected, ddp=ddp)
    seconds = sum(h["seconds"] for h in history)
    top1 = evaluate_top1(model, dataset.test, dataset, device, train_cfg.eval_batch_size, train_cfg.precision)
    log.info("member %s: test top-1 %.4f after %.1f s of training", arch, top1, seconds)
    meta_config = {
        "fingerprint": expected, "train": config_to_dict(train_cfg), "seed": cfg.seed,
        "dataset_identity": dataset.identity, "seconds": seconds, "history": history,
        "torch_threads": torch.get_num_threads(),
    }
    payload = checkpoint_payload(model, arch=arch, width=width, dataset=dataset, accuracy=top1, config=meta_config)
    if not ddp or distributed.is_main():
        atomic_torch_save(payload, path)
        lines = ["epoch,loss,train_top1,seconds"] + [
            f"{h['epoch']},{h['loss']:.6f},{h['train_top1']:.6f},{h['seconds']:.2f}" for h in history
        ]
        atomic_write_text(path.with_suffix(".csv"), "\n".join(lines) + "\n")
        partial.unlink(missing_ok=True)
    return {"top1": top1, "seconds": seconds, "parameters": count_parameters(model), "skipped": False}


def pretrain_committee(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device: torch.device) -> dict:
    """Train every committee member the config lists and save one checkpoint each.

    A member whose checkpoint exists and was made with the same config is skipped. With
    `cfg.workers` above 1 on the CPU, members train in parallel processes.
    Returns {arch: {"top1", "seconds", "parameters", "skipped"}}.
    """
    from .parallel import map_jobs

    results = {}
    pending = []
    for arch in cfg.committee.members:
        path = run.member_path(arch)
        if _existing_checkpoint_matches(path, member_fingerprint(cfg, dataset, arch)):
            model, meta = load_checkpoint(path, dataset)
            log.info("member %s: checkpoint %s matches the config, skipped (top-1 %.4f)", arch, path, meta["accuracy"])
            results[arch] = {
                "top1": meta["accuracy"], "seconds": meta["config"].get("seconds", 0.0),
                "parameters": count_parameters(model), "skipped": True,
            }
        else:
            pending.append(arch)
    context = {"cfg": cfg, "dataset": dataset, "run": run, "device": device}
    if cfg.ddp and distributed.active():
        # Every rank trains every member together (DistributedDataParallel); rank 0 writes the checkpoints.
        distributed.barrier()
        trained = [_train_member(context, arch) for arch in pending]
        distributed.barrier()
    else:
        trained = map_jobs(_train_member, pending, build_context, (worker_config_data(cfg, run),),
                           workers_for(cfg, device), in_process_context=context, log_file=run.log_path)
    results.update(dict(zip(pending, trained)))
    return {arch: results[arch] for arch in cfg.committee.members}


def load_committee(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device: torch.device,
                   members: list[str] | None = None) -> dict[str, nn.Module]:
    """Load the trained members as frozen eval-mode models on `device`."""
    committee = {}
    for arch in members or cfg.committee.members:
        model, _ = load_checkpoint(run.member_path(arch), dataset)
        model.to(device).eval().requires_grad_(False)
        committee[arch] = model
    return committee


def format_committee_table(results: dict) -> str:
    lines = ["| member | test top-1 | parameters | seconds |", "|---|---|---|---|"]
    for arch, r in results.items():
        note = " (reused)" if r.get("skipped") else ""
        lines.append(f"| {arch} | {100 * r['top1']:.2f}%{note} | {r['parameters']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)
