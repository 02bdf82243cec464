"""A worker's allocation end (cw.worker.drain), without SLURM: a worker is told its end
the way SLURM tells it (``$SLURM_JOB_ID``, ``$SLURM_JOB_END_TIME``), so these run anywhere.

A job expected to outlive the allocation (``ex.options(expected=...)``) is given back and
its worker leaves; a job still running when the allocation ends and its worker is killed
(SLURM's SIGKILL after the walltime) goes back to the queue uncharged: with
``max_retries=1`` a charged death would fail it with WorkerLost.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import wait_for
from slurm_conftest_helpers import alive, parent_of
from test_faults import executor


def allocation(seconds: float, job: str = "77_1") -> dict:
    """The environment of a worker whose (pretend) SLURM allocation ends in ``seconds``."""
    array, task = job.split("_")
    return {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": array, "SLURM_ARRAY_TASK_ID": task,
            "SLURM_JOB_END_TIME": str(int(time.time() + seconds))}


def where() -> str:
    import os as _os
    return _os.environ.get("SLURM_ARRAY_JOB_ID", "free")


def long_unless_free(seconds: float) -> str:
    import os as _os
    import time as _time
    if "SLURM_JOB_ID" in _os.environ:
        _time.sleep(seconds)  # outlives the allocation
    return "done"


@pytest.mark.timeout(60)
def test_a_job_expected_to_outlive_the_allocation_is_given_back(procs, master):
    procs.workers(master, 1, "--drain-margin", "2", env=allocation(40))
    info = master.status()["workers"]
    assert len(info) == 1
    with executor(master) as ex:
        assert ex.options(expected=1).submit(where).result(timeout=20) == "77"
        late = ex.options(expected=120, max_retries=1).submit(where)
        wait_for(lambda: not master.status()["workers"], 20, "the worker to drain and leave")
        assert not late.done()
        procs.workers(master, 1)  # no allocation end: takes anything
        assert late.result(timeout=20) == "free"
    assert "drains (a job expected to take 120.0 s does not fit" in master.stderr()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("margin, said", [
    ("2", "while draining: its allocation"),   # it drained, and its job overran
    ("-60", "at its allocation's end: killed by the walltime"),  # no drain: the end alone
])
def test_a_job_killed_at_the_allocations_end_is_requeued_uncharged(procs, master, margin,
                                                                   said):
    env = allocation(4)
    end = int(env["SLURM_JOB_END_TIME"])
    procs.workers(master, 1, "--drain-margin", margin, env=env)
    pid = master.status()["workers"][0]["pid"]
    with executor(master) as ex:
        future = ex.options(max_retries=1).submit(long_unless_free, 60)
        wait_for(lambda: master.status()["workers"][0]["held"], 10, "the job to start")
        wait_for(lambda: time.time() > end + 0.5, 10, "the allocation's end", interval=0.1)
        assert master.status()["workers"][0]["held"] == 1  # it finishes what runs
        for victim in (parent_of(pid), pid):  # the whole step, as SLURM kills it
            os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 10, "the worker killed")
        wait_for(lambda: not master.status()["workers"], 10, "the loss seen")
        procs.workers(master, 1)
        assert future.result(timeout=20) == "done"  # uncharged: max_retries=1 held
    log = master.stderr()
    assert said in log and "its jobs go back uncharged" in log
