"""jobs.map_jobs: side-by-side jobs give what a loop gives, in order, with one CPU thread each."""
import pytest
import torch

from pinpp_lib import jobs
from pinpp_lib.fileio import PinppError


def _threads_and_square(x: int) -> tuple[int, int]:
    return torch.get_num_threads(), x * x


def _fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise PinppError(f"job {x} failed")
    return x


def _matmul_sum(seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(300, 300, generator=g)
    return float((a @ a).sum())


def test_results_in_order_with_one_thread_each():
    out = jobs.map_jobs(_threads_and_square, [(i,) for i in range(5)], jobs=2)
    assert [sq for _, sq in out] == [0, 1, 4, 9, 16]
    assert {t for t, _ in out} == {jobs.JOB_THREADS}


def test_jobs_1_is_the_loop_in_this_process():
    before = torch.get_num_threads()
    assert jobs.map_jobs(_threads_and_square, [(3,)], jobs=1) == [(before, 9)]


def test_single_job_runs_here_with_a_workers_threads_and_restores():
    before = torch.get_num_threads()
    assert jobs.map_jobs(_threads_and_square, [(2,)], jobs=2) == [(jobs.JOB_THREADS, 4)]
    assert torch.get_num_threads() == before
    with jobs.job_threads(2):
        assert torch.get_num_threads() == jobs.JOB_THREADS
    assert torch.get_num_threads() == before


def test_same_numbers_here_and_in_a_worker():
    """The thread count, not the place, decides a job's numbers: alone in this process or beside another."""
    alone = jobs.map_jobs(_matmul_sum, [(7,)], jobs=2)
    beside = jobs.map_jobs(_matmul_sum, [(7,), (8,)], jobs=2)
    assert alone[0] == beside[0]


def test_first_failure_is_raised():
    with pytest.raises(PinppError, match="job 2 failed"):
        jobs.map_jobs(_fail_on, [(i, 2) for i in range(4)], jobs=2)
    assert jobs.map_jobs(_fail_on, [(i, 9) for i in range(3)], jobs=2) == [0, 1, 2]


def test_runs_side_by_side_train_what_a_run_alone_trains(pseudo_converted, tmp_path):
    """Notebook 05's schedule (clean run first, AT runs 2 at a time in workers) against `pinpp train` of one run
    in this process: the same weights, byte for byte."""
    import dataclasses

    from pinpp_lib import config, training
    from pinpp_lib import mpm_experiments as mx
    s = config.resolve("smoke", data_root=tmp_path)
    at = dataclasses.replace(s.mpm.at, epochs=1, init_stage_epochs=1, batch_size=8, max_steps=2, attack_warmup_epochs=0.0)
    e = dataclasses.replace(s.mpm, at=at, clean_epochs=1)
    assert e.jobs == 2 and e.at_init == "clean_run"
    runs = {n: tc for n, tc in mx.plan(e).items() if n in ("clean_vanilla", "at_plain", "at_mpm")}
    done = mx.run_training(runs, e, pseudo_converted, tmp_path / "side")
    assert list(done) == ["clean_vanilla", "at_mpm", "at_plain"]  # the plan's order, the clean run first
    alone = tmp_path / "alone"
    (alone / "clean_vanilla").mkdir(parents=True)
    for f in (tmp_path / "side" / "clean_vanilla").iterdir():  # the clean run the AT run starts from
        if f.is_file():
            (alone / "clean_vanilla" / f.name).write_bytes(f.read_bytes())
    with jobs.job_threads(e.jobs):
        rec = training.train(mx.resolve_init("at_mpm", runs["at_mpm"], e, alone), pseudo_converted, alone / "at_mpm")
    assert rec["sha256"] == done["at_mpm"]["sha256"]
    assert training.finished(mx.resolve_init("at_mpm", runs["at_mpm"], e, alone), pseudo_converted, alone / "at_mpm") == rec
