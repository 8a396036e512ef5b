"""runtime.threads=auto: the job's share of the cores, less the cores other processes keep busy."""

import pytest
import torch
from threadpoolctl import threadpool_info

import tadfkd.run.runtime
from tadfkd.run.runtime import auto_threads, busy_cores_of_others, set_threads


@pytest.mark.parametrize(
    "cores, side_by_side, busy, expected",
    [
        (2, 1, 0.0, 2),  # an idle 2-core machine: both cores
        (2, 1, 0.9, 1),  # one busy single-thread process beside it: one thread
        (2, 1, 1.6, 1),  # both cores busy: still one thread, never none
        (2, 2, 0.0, 1),  # two sweep jobs side by side: one core each
        (16, 4, 0.0, 4),
        (16, 1, 3.2, 13),
        (16, 4, 13.0, 3),  # the share is cut to the cores left free
        (1, 1, 0.0, 1),
    ],
)
def test_auto_threads_is_the_share_less_the_busy_cores(cores, side_by_side, busy, expected):
    assert auto_threads(cores, side_by_side, busy) == expected


def test_busy_cores_of_others_leaves_out_this_process(monkeypatch):
    readings = iter([100.0, 100.9])  # 0.9 s of busy CPU time in the machine over the window
    monkeypatch.setattr(tadfkd.run.runtime, "machine_busy_seconds", lambda: next(readings))
    monkeypatch.setattr(tadfkd.run.runtime.time, "sleep", lambda seconds: None)
    clock = iter([0.0, 1.0])  # a window of 1 s
    monkeypatch.setattr(tadfkd.run.runtime.time, "perf_counter", lambda: next(clock))
    own = iter([5.0, 5.1])  # of which this process used 0.1 s
    monkeypatch.setattr(tadfkd.run.runtime.time, "process_time", lambda: next(own))
    assert busy_cores_of_others(1.0) == pytest.approx(0.8)


def test_busy_cores_are_zero_where_the_machine_cannot_tell(monkeypatch):
    monkeypatch.setattr(tadfkd.run.runtime, "machine_busy_seconds", lambda: None)
    assert busy_cores_of_others() == 0.0


def test_the_machine_busy_time_is_read_on_linux():
    seconds = tadfkd.run.runtime.machine_busy_seconds()
    assert seconds is None or seconds > 0


def test_set_threads_auto_drops_to_one_thread_beside_a_busy_process(monkeypatch):
    # the thread counts are restored after the test (conftest.py)
    monkeypatch.setattr(tadfkd.run.runtime, "cores_available", lambda: 2)
    monkeypatch.setattr(tadfkd.run.runtime, "busy_cores_of_others", lambda: 1.0)
    assert set_threads("auto") == 1 == torch.get_num_threads()
    monkeypatch.setattr(tadfkd.run.runtime, "busy_cores_of_others", lambda: 0.0)
    assert set_threads("auto") == 2 == torch.get_num_threads()
    assert set_threads(3) == 3


def test_set_threads_holds_numpys_blas_pool_to_the_same_count():
    # numpy's BLAS threads spin after a call; more of them than the job's threads take cores
    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    assert blas_threads()  # numpy links a BLAS whose pool threadpoolctl sees
    for count in (1, 2):  # the thread counts are restored after the test (conftest.py)
        set_threads(count)
        assert blas_threads() == {count}
