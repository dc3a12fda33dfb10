"""Independent cached runs in parallel processes, each with this process's run state.

A notebook's searches that do not depend on each other (Q-Rater's Table 1 columns, one per bit width
and operation) can run side by side, one per CPU core. :func:`map_in_processes` calls a module-level
function once per job in ``workers`` processes of the standard library's
:class:`concurrent.futures.ProcessPoolExecutor` (``spawn`` start method: safe with torch's thread
pools) and gives each worker what :func:`lowbit.profiles.resolve` set in this process: the output
folder (:func:`lowbit.paths.set_run_output`), the ImageNet inputs (:func:`lowbit.imagenet.use`) and
the torch CPU thread count (and data loading in the worker itself, no
nested DataLoader processes). With the same thread count a job computes the same bits in a worker as in
this process, so ``workers`` changes the wall time, never a result (tests/test_processes.py).
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from . import imagenet, paths


def _state() -> dict:
    """What a worker needs to write and read where this process does."""
    return {"output": paths.output_dir(), "imagenet": imagenet.active(), "threads": torch.get_num_threads()}


def _init_worker(state: dict) -> None:
    paths.set_run_output(state["output"])
    imagenet.use(**state["imagenet"])
    imagenet.set_loader_workers(0)  # no DataLoader processes inside a worker: each worker has its core
    torch.set_num_threads(state["threads"])


def check_workers(workers) -> int:
    """``workers`` as an int >= 1, or a ``ValueError``/``TypeError`` saying what to pass."""
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int (processes to run independent jobs in), got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (1 runs every job in this process), got {workers}")
    return workers


def map_in_processes(fn: Callable, jobs: Sequence[tuple], workers: int = 1, desc: str | None = None) -> list:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes (1: in this process, in order).

    ``fn`` must be a module-level function and every job picklable. Results come back in job
    order; jobs are started in the order given, so put the longest first. A job's exception is
    raised here. A progress bar (tqdm) counts finished jobs when ``desc`` is given.
    """
    workers = check_workers(workers)
    jobs = [tuple(j) for j in jobs]
    bar = tqdm(total=len(jobs), desc=desc, disable=desc is None or not jobs)
    if workers == 1 or len(jobs) <= 1:
        out = []
        for job in jobs:
            out.append(fn(*job))
            bar.update()
        bar.close()
        return out
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(_state(),)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        out = [f.result() for f in futures]
    bar.close()
    return out
