"""Independent training jobs run side by side on a CPU machine (smoke: notebooks 02, 03, 05-07).

On 2 CPU cores one small job with 2 threads runs only ~1.3x faster than with 1 thread (an AT run of notebook 05:
33 s vs 44 s), so two single-threaded jobs at once finish a list ~1.5x sooner (two such runs: 43 s). With
`jobs` > 1, `map_jobs` runs jobs that do not depend on each other in `jobs` spawned processes, and every job
computes with one CPU thread, wherever and with whatever beside it it runs: its numbers never depend on the
machine's core count, on the schedule or on which notebook ran it first (CPU kernels reduce in another order
with another thread count). `jobs=1` (GPU profiles, where a job takes all devices) runs the list in this
process, one after another, exactly as a loop would.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar


T = TypeVar("T")


JOB_THREADS = 1  # CPU threads of a job when jobs run side by side


@contextlib.contextmanager
def job_threads(jobs: int) -> Iterator[None]:
    """Within: this process computes with a job's thread count when jobs run side by side (`jobs` > 1), so that a
    job run alone (`pinpp train` of one run) gives the numbers it gives beside others; `jobs` 1: unchanged."""
    import torch
    before = torch.get_num_threads()
    if jobs > 1:
        torch.set_num_threads(JOB_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start_worker(threads: int) -> None:
    """Worker set-up: a fixed thread count (torch's default is the machine's core count), and no progress bars
    (they would write over each other's on the console; the parent shows one bar for the list). Runs before the
    first job is unpickled, i.e. before its modules import tqdm, which reads TQDM_DISABLE on import."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def _call(fn: Callable[..., T], args: tuple) -> T:
    return fn(*args)


def map_jobs(fn: Callable[..., T], arg_lists: Sequence[tuple], jobs: int = 1, desc: str = "jobs") -> list[T]:
    """`[fn(*args) for args in arg_lists]`, with up to `jobs` of them at once in spawned worker processes.

    `fn` must be importable (a module-level function) and its arguments and result picklable. Results come back
    in the order of `arg_lists`. The first job that fails stops the rest (queued jobs are cancelled, running ones
    finish) and its exception is raised here. A job's own outputs (its run folder) must not overlap another's.
    """
    from tqdm.auto import tqdm  # not at import: a worker turns bars off before anything imports tqdm
    arg_lists = list(arg_lists)
    if jobs <= 1:
        return [fn(*args) for args in tqdm(arg_lists, desc=desc)]
    threads = JOB_THREADS
    if len(arg_lists) <= 1:  # nothing to run beside it: here (no process to start), with a worker's threads
        with job_threads(jobs):
            return [fn(*args) for args in arg_lists]
    workers = min(jobs, len(arg_lists))
    # spawn: a fork of a process that already ran torch (a notebook kernel) can deadlock in OpenMP
    ctx = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(arg_lists)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_call, fn, args): i for i, args in enumerate(arg_lists)}
        pending = set(futures)
        with tqdm(total=len(futures), desc=f"{desc} ({workers} at once, {threads} CPU thread each)") as bar:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    if f.exception() is not None:
                        for p in pending:
                            p.cancel()
                        raise f.exception()
                    results[futures[f]] = f.result()
                    bar.update(1)
    return results
