"""cw.adapt, the adaptive-workers policy, in-process: explicit ``now``, no processes."""
from __future__ import annotations

import pytest

from cw.launch.adapt import (
    Decision,
    Demand,
    Limits,
    WorkerView,
    decide,
    draining,
    leaving,
    replace_at,
    takes,
    wanted,
)

NOW = 1_000_000.0


def idle(name: str, since: float, end: float | None = None) -> WorkerView:
    return WorkerView(name, idle_since=since, end=end)


def busy(name: str, end: float | None = None) -> WorkerView:
    return WorkerView(name, idle_since=None, end=end)


def test_no_work_no_workers():
    assert decide(Demand(NOW, 0), [], Limits(64)) == Decision()
    assert not decide(Demand(NOW, 0), [], Limits(64))


def test_min_workers_are_kept_up_without_work():
    assert decide(Demand(NOW, 0), [], Limits(64, min_workers=2)).submit == 2
    assert decide(Demand(NOW, 0, pending=2), [], Limits(64, min_workers=2)).submit == 0


def test_unknown_job_times_ask_one_worker_per_job_up_to_the_maximum():
    assert decide(Demand(NOW, 5), [], Limits(64)).submit == 5
    assert decide(Demand(NOW, 100), [], Limits(64)).submit == 64


def test_learned_job_times_ask_what_drains_the_queue_in_the_horizon():
    limits = Limits(64, horizon=60)
    assert wanted(100, 0.01, limits) == 1          # 1 s of work: one worker
    assert wanted(100, 6.0, limits) == 10          # 600 s of work: ten
    assert wanted(100, 600.0, limits) == 64        # far more: the maximum
    assert decide(Demand(NOW, 100, job_seconds=6.0), [], limits).submit == 10


def test_running_jobs_count_as_work():
    limits = Limits(64, horizon=60)
    workers = [busy(f"w{i}") for i in range(10)]
    assert decide(Demand(NOW, 10, job_seconds=60.0, running=10), workers, limits).submit == 10


def test_pending_and_connected_workers_count_so_a_second_decision_asks_nothing_more():
    limits = Limits(64)
    first = decide(Demand(NOW, 100), [], limits)
    assert first.submit == 64
    again = decide(Demand(NOW + 10, 100, pending=64), [], limits)
    assert again.submit == 0 and again.cancel_pending == 0
    some_up = [busy(f"w{i}") for i in range(20)]
    assert decide(Demand(NOW + 20, 80, pending=44, running=20), some_up, limits) == \
        Decision(wanted=64)


def test_never_above_the_maximum_and_never_more_pending_than_needed():
    limits = Limits(8)
    workers = [busy(f"w{i}") for i in range(6)]
    assert decide(Demand(NOW, 100, pending=0, running=6), workers, limits).submit == 2
    # the queue shrank to what the connected workers run: the pending jobs go
    shrunk = decide(Demand(NOW, 0, job_seconds=1.0, pending=2, running=6), workers, limits)
    assert shrunk.submit == 0 and shrunk.cancel_pending == 2


def test_idle_workers_are_cancelled_after_the_timeout_down_to_min_longest_idle_first():
    limits = Limits(64, min_workers=1, idle_timeout=60)
    workers = [idle("a", NOW - 100), idle("b", NOW - 200), idle("c", NOW - 30),
               idle("d", NOW - 61)]
    got = decide(Demand(NOW, 0), workers, limits)
    assert got.cancel_idle == ("b", "a", "d")  # c idled only 30 s; min 1 would keep one
    limits2 = Limits(64, min_workers=3, idle_timeout=60)
    assert decide(Demand(NOW, 0), workers, limits2).cancel_idle == ("b",)


def test_idle_workers_are_kept_while_jobs_are_queued():
    workers = [idle("a", NOW - 1000), busy("b")]
    assert decide(Demand(NOW, 3, running=1), workers, Limits(64)).cancel_idle == ()


def test_busy_workers_are_never_cancelled():
    workers = [busy("a"), busy("b")]
    assert decide(Demand(NOW, 0, running=2, job_seconds=1.0), workers, Limits(64)) == \
        Decision(wanted=1)


def test_a_worker_whose_allocation_ends_soon_is_replaced_before_it_drains():
    limits = Limits(4, margin=60, lead=60)
    end = NOW + 100  # within margin + lead: leaving
    workers = [busy("old", end=end), busy("w1"), busy("w2"), busy("w3")]
    assert leaving(workers[0], NOW, limits)
    got = decide(Demand(NOW, 50, running=4), workers, limits)
    assert got.submit == 1 and got.leaving == 1  # the maximum counts the staying ones
    later = [busy("old", end=NOW + 500), *workers[1:]]
    assert decide(Demand(NOW, 50, running=4), later, limits).submit == 0
    assert replace_at(end, 60, 60) == end - 120 and replace_at(None) is None


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Limits(2, min_workers=3)
    with pytest.raises(ValueError):
        Limits(2, horizon=0)


def test_takes_jobs_expected_to_finish_before_the_end():
    end = NOW + 600
    assert takes(None, NOW, None) and takes(10_000.0, NOW, None)  # unlimited: all
    assert takes(100.0, NOW, end, margin=60)
    assert not takes(590.0, NOW, end, margin=60)             # 590 * SLACK > 600 left
    assert takes(30.0, end - 50, end, margin=60)             # in the margin, but it fits
    assert not takes(30.0, end - 20, end, margin=60)


def test_takes_unknown_jobs_only_until_the_margin():
    end = NOW + 600
    assert takes(None, NOW, end, margin=60)
    assert takes(None, end - 61, end, margin=60)
    assert not takes(None, end - 60, end, margin=60)
    assert not takes(None, end + 5, end, margin=60)


def test_draining_starts_at_the_margin():
    end = NOW + 600
    assert not draining(NOW, end, 60) and not draining(NOW, None, 60)
    assert draining(end - 60, end, 60) and draining(end + 1, end, 60)
