"""SLURM elasticity against the real local SLURM (``tests/slurm/local_slurm.sh start``):
``slurm.start(n, adapt=True)`` (the master submits and cancels worker jobs itself), worker
allocations that end under the work (walltime), a worker preempted with SIGTERM, and the
number of SLURM calls the master makes.

Every test has its own CW_HOME (conftest); the jobs write where each job started into a
file of the test's own, so "no job starts twice" is read from there. PATH wrappers count the
SLURM calls, tagged with who made them (the master, a worker, the launcher).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_for
from slurm_conftest_helpers import count, processes_with_env, run_cli, slurm_problem
from test_slurm import fake_slurm  # noqa: F401  (a fixture)

from cw.client import ClusterExecutor
from cw.launch import slurm
from cw.status import status

_problem = slurm_problem()
needs_slurm = pytest.mark.skipif(bool(_problem), reason=_problem or "SLURM is running")


def real_slurm(test):
    """Marks a test that needs the real (local) SLURM."""
    return pytest.mark.slurm(needs_slurm(test))


def adaptive() -> list[slurm.SlurmJob]:
    return [j for j in slurm.jobs() if j.name == slurm.JOB_ADAPT]


def recorder(path: Path, seconds: float):
    """A job that notes where it starts (one line per start) and returns its SLURM job."""
    def job(i: int) -> tuple[int, str]:
        import os as _os
        import time as _time
        with open(path, "a") as f:
            f.write(f"{i} {_os.environ.get('SLURM_JOB_ID')} {_os.getpid()}\n")
        _time.sleep(seconds)
        return i * i, _os.environ.get("SLURM_ARRAY_JOB_ID", "") + "_" + \
            _os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return job


def starts(path: Path) -> dict[int, int]:
    found: dict[int, int] = {}
    for line in path.read_text().splitlines():
        i = int(line.split()[0])
        found[i] = found.get(i, 0) + 1
    return found


@real_slurm
@pytest.mark.timeout(120)
def test_adapt_submits_an_array_with_the_work_and_cancels_idle_workers(cw_jobs, counted,
                                                                       tmp_path):
    cluster = slurm.start(3, port=0, adapt=True, idle_timeout=3, interval=1, timeout=60)
    assert set(cluster.jobs) == {"cmaster"}
    launcher = count(counted, "launcher")
    assert launcher.get("sbatch") == 1 and launcher.get("squeue", 0) <= 20
    time.sleep(3)  # no client, no work: three polls and no worker job
    assert adaptive() == []
    assert count(counted, "cmaster").get("sbatch", 0) == 0

    seen: list[list[slurm.SlurmJob]] = []
    used: dict[int, dict] = {}
    with ClusterExecutor() as ex:
        for n in (10, 100):
            before = count(counted, "cmaster")
            t0 = time.monotonic()
            futures = [ex.submit(pow, i, 2) if n == 10 else ex.submit(_slow_square, i)
                       for i in range(n)]
            while not all(f.done() for f in futures):
                seen.append(adaptive())
                assert len(seen[-1]) <= 3  # never more than -n
                time.sleep(0.5)
            assert [f.result(timeout=60) for f in futures] == [i * i for i in range(n)]
            after = count(counted, "cmaster")
            used[n] = {k: after.get(k, 0) - before.get(k, 0) for k in ("squeue", "sbatch")}
            used[n]["seconds"] = time.monotonic() - t0
    ids = {j.id for jobs in seen for j in jobs}
    assert ids and all("_" in i for i in ids)  # array tasks: 12_0, 12_1, ...
    assert len({i.split("_")[0] for i in ids}) <= count(counted, "cmaster")["sbatch"]
    for n, calls in used.items():  # one squeue per 1 s interval, whatever the job count
        assert calls["squeue"] <= calls["seconds"] / 1.0 + 2, (n, calls)
        assert calls["sbatch"] <= 2, (n, calls)
    info = status()
    assert info["adapt"]["max_workers"] == 3 and "pending_reasons" in info["adapt"]

    wait_for(lambda: not adaptive(), 40, "the idle workers cancelled", interval=0.5)
    assert [j.name for j in slurm.jobs()] == ["cmaster"]
    assert status()["workers"] == []
    shown = subprocess.run([os.sys.executable, "-m", "cw.launch.slurm", "status"],
                           capture_output=True, text=True, timeout=30)
    assert "adapt: 0-3 SLURM workers" in shown.stdout, shown.stdout + shown.stderr
    assert count(counted, "launcher").get("squeue", 0) - launcher.get("squeue", 0) \
        <= 1 + 3 * 40  # slurm.jobs() above, once per wait (bounded), and status's one


@real_slurm
@pytest.mark.timeout(60)
def test_pending_worker_jobs_show_slurms_reason_and_are_never_more_than_needed(cw_jobs):
    slurm.start(4, port=0, adapt=True, interval=1, worker_options=["--hold"], timeout=60)
    with ClusterExecutor() as ex:
        futures = [ex.submit(pow, i, 2) for i in range(2)]
        info = wait_for(lambda: (s := status())["adapt"]["pending_reasons"] and s, 20,
                        "pending worker jobs", interval=0.5)
        assert info["adapt"]["pending_reasons"] == {"JobHeldUser": 2}
        calls = info["adapt"]["squeue_calls"]
        wait_for(lambda: status()["adapt"]["squeue_calls"] >= calls + 3, 20, "three polls", interval=0.5)
        held = adaptive()
        assert len(held) == 2 and all(j.reason == "JobHeldUser" for j in held)
        assert status()["adapt"]["sbatch_calls"] == 1  # two pending: nothing more asked
        shown = subprocess.run([os.sys.executable, "-m", "cw.status"], capture_output=True,
                               text=True, timeout=30).stdout
        assert "pending: 2 JobHeldUser" in shown, shown
        assert not any(f.done() for f in futures)
        ex.shutdown(wait=False, cancel_futures=True)
    wait_for(lambda: not adaptive(), 30, "the unneeded pending jobs cancelled", interval=0.5)


def _slow_square(i: int) -> int:
    time.sleep(0.1)
    return i * i


@real_slurm
@pytest.mark.timeout(170)
def test_allocations_that_end_under_a_stream_of_long_jobs_lose_nothing(cw_jobs, tmp_path):
    """One-minute worker jobs, jobs of 12 s, the default margin and lead (60 s each,
    scaled to a quarter of a short allocation: ~15 s): workers drain ~15 s before their
    end, their replacements are asked ~30 s before it; each job starts once and succeeds."""
    slurm.start(2, port=0, adapt=True, idle_timeout=5, interval=1,
                worker_options=["--time=1"], timeout=60)
    log = tmp_path / "started"
    log.touch()
    job = recorder(log, 12.0)
    with ClusterExecutor() as ex:
        futures = [ex.submit(job, i) for i in range(10)]
        results = [f.result(timeout=150) for f in futures]
    assert [r[0] for r in results] == [i * i for i in range(10)]
    assert starts(log) == {i: 1 for i in range(10)}  # none started twice: none charged
    assert len({r[1] for r in results}) >= 3  # a first generation of two, and more
    home = cw_jobs
    master_log = next((home / "logs").glob("cmaster-*.log")).read_text()
    assert "drains (its allocation" in master_log
    lines = master_log.splitlines()
    submits = [line[:23] for line in lines if "cwadapt workers as array job" in line]
    drains = [line[:23] for line in lines if "drains (its allocation" in line]
    assert len(submits) >= 2 and submits[1] < drains[0]  # the replacement came first
    assert "WorkerLost" not in master_log and "died" not in master_log
    worker_logs = "".join(p.read_text() for p in (home / "logs").glob("cwadapt-*.log"))
    assert "draining: its allocation" in worker_logs


@real_slurm
@pytest.mark.timeout(90)
def test_a_worker_preempted_with_sigterm_drains_and_loses_nothing(cw_jobs, tmp_path):
    slurm.start(2, port=0, adapt=True, min_workers=2, idle_timeout=30, interval=1,
                timeout=60)
    log = tmp_path / "started"
    log.touch()
    job = recorder(log, 2.0)
    with ClusterExecutor() as ex:
        futures = [ex.submit(job, i) for i in range(12)]
        wait_for(lambda: len(starts(log)) >= 2, 30, "two jobs running", interval=0.5)
        victim = sorted(j.id for j in adaptive() if j.state == "RUNNING")[0]
        subprocess.run(["scancel", "-s", "TERM", victim], check=True, timeout=30)
        results = [f.result(timeout=60) for f in futures]
    assert [r[0] for r in results] == [i * i for i in range(12)]
    assert starts(log) == {i: 1 for i in range(12)}
    wait_for(lambda: victim not in {j.id for j in adaptive()}, 30, "the preempted job gone", interval=0.5)
    home = cw_jobs
    master_log = next((home / "logs").glob("cmaster-*.log")).read_text()
    assert "drains (got SIGTERM" in master_log
    assert "WorkerLost" not in master_log
    victim_log = (home / "logs" / f"cwadapt-{victim}.log").read_text()
    assert "draining: got SIGTERM" in victim_log and "Traceback" not in victim_log
    assert processes_with_env(f"CW_HOME={home}") != []  # the master and the others run on


@pytest.mark.timeout(60)
def test_cli_adapt_gives_the_master_the_workers_script_and_options(
        fake_slurm, cw_home):  # noqa: F811
    env, log = fake_slurm
    run_cli("-n", "8", "--port", "6000", "--timeout", "1", "--Xworkers=--time=1",
            "--signal", "USR1@90", "--margin", "30", "start", "--adapt", "--min-workers",
            "2", "--idle-timeout", "30", env=env)
    submits = log.read_text().split("sbatch ")[1:]
    assert len(submits) == 1  # the master alone: it submits the workers itself
    master = submits[0]
    script = cw_home / "slurm" / "adapt-worker.sh"
    assert (f"-m cw.master --port 6000 --connection-file {cw_home}/default.json "
            f"--log-level INFO --adapt 8 --min-workers 2 --idle-timeout 30 "
            f"--worker-script {script} --worker-option=--signal=USR1@90 "
            f"--worker-option=--time=1 --drain-margin 30") in master
    text = script.read_text()
    assert "exec srun " in text and "-m cw.worker --slurm" in text
    assert "--drain-margin 30 --drain-signal USR1" in text
    assert oct(script.stat().st_mode & 0o777) == "0o600"


def test_plan_counts_pending_jobs_until_their_worker_says_hello_and_never_runs_away():
    """Elastic.plan on a real Scheduler (no SLURM: the snapshots are made here)."""
    from cw.launch import adapt
    from cw.launch.slurm_jobs import Snapshot, WorkerJob
    from cw.master.elastic import Config, Elastic
    from cw.master.scheduler import Scheduler

    sched = Scheduler(lambda *a: True)
    client = sched.hello(b"c", "client", {"name": "c"}, time.monotonic())
    seqs = iter(range(1, 1000))

    def queue(n: int) -> None:  # n more jobs waiting (nothing dispatches: no flush here)
        fns = [] if client.functions else [b"f" * 16]
        sched.submit(client, fns, [[next(seqs), b"f" * 16, 1, None] for _ in range(n)],
                     [b"fn"] * len(fns) + [b"arg"] * n)

    el = Elastic(sched, Config(adapt.Limits(4, idle_timeout=5, lead=10, margin=10), "x"))
    assert not el.plan(Snapshot({}, time.monotonic()))[0]  # no work: nothing
    queue(3)  # three jobs waiting, no worker
    decision, pending = el.plan(Snapshot({}, time.monotonic()))
    assert decision.submit == 3 and pending == []
    el.submitted = {f"9_{i}": time.monotonic() for i in range(3)}
    running = {i: WorkerJob(i, "RUNNING", "None", None) for i in el.submitted}
    decision, pending = el.plan(Snapshot(running, time.monotonic()))
    assert not decision and len(pending) == 3  # asked for: nothing more
    for i in range(3):  # their workers said HELLO long ago; their allocations end soon
        sched.hello(b"w%d" % i, "worker", {"slurm_job": f"9_{i}", "pid": i,
                                           "alloc_end": time.time() + 15},
                    time.monotonic() - 1000)
    decision, pending = el.plan(Snapshot(running, time.monotonic()))
    assert pending == [] and decision.leaving == 3 and decision.submit == 3  # replacements
    el.submitted.update({f"10_{i}": time.monotonic() for i in range(3)})
    queue(47)
    decision, _ = el.plan(Snapshot(running, time.monotonic()))
    assert decision.submit <= 2 * 4 - 3 - 3  # connected + pending stay within 2 x max
    el.submitted.clear()
    sched.peer_gone(b"c", "gone")  # its queued jobs are dropped: nothing waits
    later = time.monotonic() + 2
    decision, _ = el.plan(Snapshot({}, later))  # squeue lists none of ours: forgotten
    assert el.submitted == {} and not decision.cancel_pending
