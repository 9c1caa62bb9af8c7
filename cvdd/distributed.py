"""torchrun support: process ranks, sharding of work items, and gathering their results.

Under `torchrun --nproc_per_node=K -m cvdd ...` every rank runs the same command. Work
split into items (synthesis batches, committee members, priors, students) is shared out by
item index: rank r takes items r, r + K, r + 2K and so on. Each item still writes its own
file, and the results are gathered so that every rank continues with all of them. The backend is gloo on CPUs and NCCL on GPUs; torchrun's rendezvous options
(--nnodes, --rdzv-endpoint) spread the ranks over several machines.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_from_env() -> bool:
    """Join the process group that torchrun describes in the environment; False when not under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def describe() -> str:
    """Return a line naming this rank, for the run log ("" when not under torchrun)."""
    if not active():
        return ""
    return f"rank {rank()} of {world_size()} joined the {dist.get_backend()} process group"


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_sum(value: float) -> float:
    """Return the sum of `value` over all ranks (the value itself outside torchrun)."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def local_rows(batch: int) -> slice:
    """This rank's rows of a global batch under DistributedDataParallel: rank, rank + K, ...

    Every rank draws the same global batch and augmentation from the same generator, so
    the ranks together train on exactly the batches of a single-process run.
    """
    if not active():
        return slice(None)
    return slice(rank(), batch, world_size())


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap `model` in DistributedDataParallel under torchrun; return it unchanged otherwise."""
    if not active():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def device(name: str) -> torch.device:
    """Return the device of this rank: its own GPU under torchrun when `name` is a CUDA device."""
    resolved = torch.device(name)
    if active() and resolved.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolved


def shard(items: Sequence) -> list:
    """Return the items of this rank: indices rank, rank + world size, and so on."""
    return list(items)[rank()::world_size()]


def map_sharded(func: Callable, jobs: Sequence) -> list:
    """Return [func(job) for job in jobs] in job order, each job computed by one rank only.

    Results must be picklable; every rank receives all of them.
    """
    jobs = list(jobs)
    if not active():
        return [func(job) for job in jobs]
    # Callers list pending jobs by looking for finished files; no rank may write one before
    # every rank has made its list, or the ranks would index different lists.
    dist.barrier()
    mine = [(index, func(job)) for index, job in enumerate(jobs) if index % world_size() == rank()]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, mine)
    results: dict[int, object] = {}
    for part in gathered:
        results.update(dict(part))
    return [results[index] for index in range(len(jobs))]
