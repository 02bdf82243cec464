"""cw.slurm_jobs against the real local SLURM (``tests/slurm/local_slurm.sh start``).

The jobs here are tiny shell scripts, not cw workers: what is tested is the SLURM layer
(one array job per submit, one squeue per poll interval whatever the number of jobs, one
scancel, a worker's allocation end). Every job has a name of its own, so that the tests
never see nor cancel jobs of other tests or of the user; PATH wrappers count the calls.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from conftest import wait_for
from slurm_conftest_helpers import count, slurm_problem

from cw.client import ClusterExecutor
from cw.launch import slurm, slurm_jobs
from cw.launch.slurm_jobs import (
    Poller,
    Snapshot,
    allocation_end,
    cancel,
    parse_squeue,
    poll_forever,
    submit_workers,
)

_problem = slurm_problem()
needs_slurm = pytest.mark.skipif(bool(_problem), reason=_problem or "SLURM is running")

SLEEPER = "#!/bin/sh\nexec sleep 300\n"


class Clock:
    """A clock the test moves, for the poller's interval."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def name():
    """A job name of this test's own; its jobs are cancelled at teardown."""
    job_name = f"cwt{uuid.uuid4().hex[:10]}"
    yield job_name
    subprocess.run(["scancel", "--me", "-n", job_name], capture_output=True, timeout=30)


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(60)
def test_an_array_of_three_is_seen_in_one_call_and_cancelled(name, counted):
    ids = submit_workers(3, SLEEPER, name=name)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(3)]
    assert count(counted) == {"sbatch": 1}

    poller = Poller(name, interval=3600)  # only force=True asks squeue again
    snap = poller.poll()
    assert snap.ok and set(snap.jobs) == set(ids)
    assert all(j.array == array and j.state in ("PENDING", "RUNNING") for j in
               snap.jobs.values())
    assert count(counted) == {"sbatch": 1, "squeue": 1}
    assert poller.poll() is snap  # within the interval: no call
    assert count(counted)["squeue"] == 1

    assert cancel(ids)
    assert count(counted)["scancel"] == 1
    gone = wait_for(lambda: not {i: j for i, j in poller.poll(force=True).jobs.items()
                                 if j.state != "COMPLETING"}, 30, "the cancelled jobs gone", interval=0.2)
    assert gone


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(80)
@pytest.mark.parametrize("n", [10, 100])
def test_the_poller_makes_one_squeue_call_per_interval_whatever_the_number_of_jobs(
        name, counted, n):
    # held: the tasks stay PENDING (JobHeldUser) and take no CPU from other tests
    ids = submit_workers(n, SLEEPER, options=["--hold"], name=name)
    clock = Clock()
    poller = Poller(name, interval=10.0, clock=clock)
    seen = []
    for _interval in range(3):
        for _ in range(50):  # many asks within one interval
            seen.append(poller.poll())
            clock.t += 0.1   # 50 * 0.1 = 5 s < interval
        clock.t += 5.0
    assert count(counted) == {"sbatch": 1, "squeue": 3}
    assert poller.calls == 3
    last = seen[-1]
    assert set(last.jobs) == set(ids)
    assert all(j.pending and j.reason == "JobHeldUser" for j in last.jobs.values())
    assert slurm_jobs.pending_reasons(last) == {"JobHeldUser": n}
    assert cancel(ids)
    assert count(counted) == {"sbatch": 1, "squeue": 3, "scancel": 1}


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(60)
def test_poll_forever_hands_one_snapshot_per_interval_to_the_loop(name, counted):
    ids = submit_workers(5, SLEEPER, options=["--hold"], name=name)
    got: list[Snapshot] = []

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        def on_snapshot(snap: Snapshot) -> None:
            got.append(snap)
            if len(got) == 3 and not done.done():
                done.set_result(None)

        task = asyncio.ensure_future(poll_forever(Poller(name, interval=0.3), on_snapshot))
        await asyncio.wait_for(done, 20)
        task.cancel()

    started = time.monotonic()
    asyncio.run(main())
    assert len(got) == 3 and all(set(s.jobs) == set(ids) for s in got)
    assert time.monotonic() - started >= 0.6  # three calls, an interval apart
    assert got[1].taken - got[0].taken >= 0.3 and got[2].taken - got[1].taken >= 0.3
    assert count(counted) == {"sbatch": 1, "squeue": 3}
    assert cancel(ids)


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(60)
def test_allocation_end_of_two_minute_jobs_is_two_minutes_after_each_start(name,
                                                                          tmp_path):
    code = ("import json, os, time; from cw.launch.slurm_jobs import allocation_end, this_job; "
            "t = time.time(); e = allocation_end(); "
            f"open(os.path.join({str(tmp_path)!r}, os.environ['SLURM_ARRAY_TASK_ID']), 'w')"
            ".write(json.dumps([t, e, this_job()]))")
    limited = f"#!/bin/sh\nexec {sys.executable} -c {json.dumps(code)}\n"
    # three tasks: one of them has the array's id as its own, which names all three
    ids = submit_workers(3, limited, options=["--time=2"], name=name)
    for task in range(3):
        out = tmp_path / str(task)
        started, end, job = json.loads(wait_for(lambda out=out: out.exists() and out.read_text(),
                                           45, f"task {task}'s answer", interval=0.2))
        assert end is not None and 100 <= end - started <= 121, (task, started, end)
        assert job == ids[task]  # what the poller and cancel name it


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(60)
def test_allocation_end_is_none_without_a_time_limit_or_a_job(name, tmp_path):
    out = tmp_path / "end.json"
    code = ("import json; from cw.launch.slurm_jobs import allocation_end; "
            f"open({str(out)!r}, 'w').write(json.dumps(allocation_end()))")
    submit_workers(1, f"#!/bin/sh\nexec {sys.executable} -c {json.dumps(code)}\n",
                   name=name)
    assert json.loads(wait_for(lambda: out.exists() and out.read_text(), 45,
                               "the job's answer", interval=0.2)) is None
    assert allocation_end({}) is None
    assert allocation_end({"SLURM_JOB_END_TIME": "1900000000"}) == 1900000000.0


def test_parse_squeue_reads_times_limits_and_arrays():
    text = ("7_0|RUNNING|None|2026-12-01T23:13:05|2:00|vm\n"
            "7_1|PENDING|Resources|N/A|2:00|\n"
            "8|RUNNING|None|NONE|UNLIMITED|vm\n")
    jobs = parse_squeue(text)
    assert jobs["7_0"].end is not None and jobs["7_0"].node == "vm"
    assert jobs["7_1"].pending and jobs["7_1"].end is None and jobs["7_1"].array == "7"
    assert jobs["8"].end is None and not jobs["8"].pending


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(90)
def test_cw_workers_submitted_as_an_array_register_run_jobs_and_leave_on_sigint(
        name, procs, cw_home):
    # the master runs here, not as a cmaster job, so that the test never meets (nor
    # stops) a cmaster job of the user or of another test; the workers find it through
    # $CW_HOME/default.json, as the launcher's --slurm workers do
    master = procs.master("--connection-file", str(cw_home / "default.json"))
    # on this machine's node: the master listens on loopback here, which the test SLURM's
    # other nodes (network namespaces) cannot reach
    here = socket.gethostname().split(".")[0]
    ids = submit_workers(3, slurm.worker_script(), options=[f"--nodelist={here}"], name=name)
    poller = Poller(name, interval=0.0)
    info = master.wait_workers(3, timeout=45)
    assert len({w["pid"] for w in info["workers"]}) == 3
    with ClusterExecutor(master.address) as ex:
        assert list(ex.map(pow, range(30), [2] * 30)) == [i * i for i in range(30)]
    running = [i for i, j in poller.poll().jobs.items() if j.state == "RUNNING"]
    assert sorted(running) == sorted(ids)
    assert cancel(running, signal="INT")  # the steps get SIGINT: BYE, then the jobs end
    master.wait_workers(0, timeout=30)
    wait_for(lambda: not poller.poll().jobs, 30, "the worker jobs to end", interval=0.2)
    for task in ids:  # each stopped as asked (not killed by SLURM)
        text = (cw_home / "logs" / f"{name}-{task}.log").read_text()
        assert "supervisor got SIGINT" in text and "stopped after" in text, text


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(60)
def test_a_failing_squeue_keeps_the_last_snapshot_and_waits_an_interval(name, tmp_path,
                                                                        monkeypatch):
    ids = submit_workers(2, SLEEPER, options=["--hold"], name=name)
    clock = Clock()
    poller = Poller(name, interval=10.0, clock=clock)
    first = poller.poll()
    assert first.ok and set(first.jobs) == set(ids)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to "
                                   "contact slurm controller' >&2\nexit 1\n")
    (broken / "squeue").chmod(0o755)
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}{path}")
    clock.t += 10.0
    failed = poller.poll()
    assert not failed.ok and failed.jobs == first.jobs and poller.calls == 2
    assert poller.poll() is failed and poller.calls == 2  # no retry storm
    monkeypatch.setenv("PATH", path)  # the controller is back
    clock.t += 10.0
    assert poller.poll().ok
    assert cancel(ids)
