"""Independent work items in parallel CPU processes, one torch thread each.

On a small CPU, many small models (8 to 32 px, width-reduced) use a second thread poorly,
while two single-threaded processes use both cores fully. Every work item seeds its own
generators, so the order in which items run does not change their results.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

_STATE: dict = {}


def _initialize(setup: Callable, setup_args: tuple, log_file) -> None:
    torch.set_num_threads(1)
    from .runs import setup_logging

    setup_logging(log_file)
    _STATE["context"] = setup(*setup_args)


def _call(job_and_func):
    func, job = job_and_func
    return func(_STATE["context"], job)


def map_jobs(func: Callable, jobs: Iterable, setup: Callable, setup_args: tuple, workers: int,
             in_process_context=None, log_file=None) -> list:
    """Return [func(context, job) for job in jobs], in job order.

    With `workers` > 1, jobs run in that many spawned processes whose context is built
    once per process by `setup(*setup_args)`; `func` and `setup` must be module-level
    functions. With one worker, jobs run here with `in_process_context` (or a fresh setup).
    Workers append their log records to `log_file` as well as to stderr. Under torchrun
    the ranks split the jobs instead (see cvdd.distributed).
    """
    from . import distributed

    jobs = list(jobs)
    if distributed.active():
        # Under torchrun the ranks share the jobs out; each rank runs its own in this process.
        context = in_process_context if in_process_context is not None else setup(*setup_args)
        return distributed.map_sharded(lambda job: func(context, job), jobs)
    if workers <= 1 or len(jobs) <= 1:
        context = in_process_context if in_process_context is not None else setup(*setup_args)
        return [func(context, job) for job in jobs]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=spawn, initializer=_initialize,
                             initargs=(setup, setup_args, log_file)) as pool:
        return list(pool.map(_call, [(func, job) for job in jobs]))
