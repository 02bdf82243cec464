"""cw across hosts: master, workers and client each in a network namespace of their own
(tests/hosts.py), so every peer takes the TCP + CurveZMQ path other cluster nodes take.

Links are cut by taking a host's veth off the bridge: packets vanish both ways, nothing
resets a connection, as when a switch fails. Jobs count their executions in
files under a shared folder; the client reports every outcome it got as JSON.
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import hosts
import pytest
from conftest import HB, wait_for

HB_TIMEOUT = float(HB[HB.index("--heartbeat-timeout") + 1])

UNAVAILABLE = hosts.unavailable()
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE or "")


@pytest.fixture
def rig():
    with hosts.Rig(4) as rig:
        try:
            yield rig
        finally:
            print(rig.logs())  # shown when the test fails


@pytest.fixture
def cluster(rig) -> hosts.Cluster:
    """Master on h1, one worker process on each of h2 and h3; the client goes on h4."""
    cluster = hosts.Cluster(rig, heartbeat=tuple(HB))
    cluster.workers(2)
    cluster.workers(3)
    wait_for(lambda: len(cluster.status()["workers"]) == 2, 20, "workers on h2 and h3")
    return cluster


HEADER = """\
import hashlib, json, os, socket, sys, threading, time
from cw.client import ClusterExecutor, ClientThread
host, port = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else (None, None)
def say(**kw):
    print(json.dumps(kw), flush=True)
"""


def client(rig: hosts.Rig, body: str, *args, host: int = 4) -> hosts.HostProc:
    """Run a client program on ``rig[host]``; ``args`` become its argv[1:] (the master's
    address first, if any)."""
    path = rig.base / f"client-{time.monotonic_ns()}.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return rig[host].python(str(path), *map(str, args), name="client")


# -------------------------------------------------------------------- jobs across hosts
def test_jobs_closures_errors_and_10_mb_across_hosts(rig, cluster):
    cluster.workers(4)  # one beside the client: its lane is the only one the client may get
    wait_for(lambda: len(cluster.status()["workers"]) == 3, 20, "a worker on h4")
    proc = client(rig, """
        class FarError(Exception):
            pass
        def where(i):
            time.sleep(0.05)
            return socket.gethostname(), i * i
        def fail(text):
            raise FarError(text)
        big = os.urandom(10 << 20)
        with ClusterExecutor(host, port) as ex:
            spread = [f.result(60) for f in [ex.submit(where, i) for i in range(30)]]
            k = 7
            closure = ex.submit(lambda x: x + k, 1).result(60)
            try:
                ex.submit(fail, "from afar").result(60)
                error = None
            except FarError as exc:
                error = [str(exc), type(exc).__name__, "fail" in str(exc.__cause__)]
            t = time.monotonic()
            echoed = ex.submit(lambda b: (len(b), hashlib.sha256(b).hexdigest(),
                                          socket.gethostname()), big).result(60)
            seconds = time.monotonic() - t
            lone = [ex.submit(where, i).result(60)[0] for i in range(5)]
            say(endpoint=ex._session.conn.endpoint, lane=ex._session.lane.endpoint, spread=spread,
                closure=closure, error=error, echoed=echoed, seconds=seconds,
                sha=hashlib.sha256(big).hexdigest(), lone=lone)
    """, cluster.host.ip, cluster.port)
    out = proc.json(90)
    assert proc.wait(30) == 0, proc.stderr()
    print(f"10 MB round trip across hosts: {out['seconds']:.2f} s")
    assert out["endpoint"] == f"tcp://{cluster.address}"  # never the master's local socket
    assert [v for _, v in out["spread"]] == [i * i for i in range(30)]
    assert {h for h, _ in out["spread"]} == {"h2", "h3", "h4"}
    assert out["closure"] == 8
    assert out["error"] == ["from afar", "FarError", True]
    assert out["echoed"][:2] == [10 << 20, out["sha"]]
    # a lane only to the worker on the client's own host, never across hosts
    assert out["lane"] and out["lane"].startswith(str(rig[4].run_dir)), out["lane"]
    assert out["lone"] == ["h4"] * 5
    assert list(rig[1].run_dir.glob("cw/master-*.sock"))
    for h in (2, 3, 4):  # the master's socket is on its host only
        assert not list(rig[h].run_dir.glob("cw/master-*")), h
    workers = [p for p in rig.procs if p.command[1:3] == ["-m", "cw.worker"]]
    for proc in workers:  # every worker registered over TCP
        assert "registered with master" in proc.stderr()
        assert "at ipc://" not in proc.stderr(), proc.stderr()


def test_peers_find_a_master_bound_to_all_interfaces_by_its_hostname(rig):
    """As the launchers run it: the master binds everything and records ``h1:port`` in
    $CW_HOME/default.json; workers and clients elsewhere give no address at all."""
    default = Path(os.environ["CW_HOME"]) / "default.json"
    master = rig[1].python("-m", "cw.master", "--port", "0", "--connection-file",
                           str(default), *HB, name="master")
    assert master.readline().startswith("cw master listening on tcp://h1:")
    rig[2].python("-m", "cw.worker", "-n", "1", stdout=subprocess.DEVNULL, name="workers")
    proc = client(rig, """
        from cw.status import status
        with ClusterExecutor(connect_timeout=30) as ex:
            ran = ex.submit(socket.gethostname).result(60)
            say(ran=ran, endpoint=ex._session.conn.endpoint, workers=len(status()["workers"]))
    """)
    out = proc.json(60)
    assert out["ran"] == "h2" and out["workers"] == 1
    assert out["endpoint"].startswith("tcp://h1:")


# -------------------------------------------------------------------- links cut, master killed
WORK = """
marks, n = sys.argv[3], int(sys.argv[4])
def work(i):
    name = f"{i}-{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}"
    open(os.path.join(marks, name), "w").close()
    time.sleep(0.1)
    return i, i * i
def where(i):
    time.sleep(0.3)
    return socket.gethostname()
calls = {}
lock = threading.Lock()
def callback(jobid, result):
    with lock:
        calls.setdefault(jobid, []).append(result if isinstance(result, tuple) else repr(result))
with ClientThread(callback, host, port) as ct, ClusterExecutor(host, port) as ex:
    for i in range(n):  # half through each client API
        ct.submit(i, work, i)
    mapped = list(ex.map(work, range(n, 2 * n), timeout=120))
    ct.wait(120)
    say(calls=calls, mapped=mapped)
    sys.stdin.readline()  # the test says when every host is back
    say(hosts=sorted(set(ex.map(where, range(8), timeout=60))))
"""


def executions(marks: Path) -> dict[int, list[str]]:
    """Job input -> the hosts that ran it, from the files each execution left."""
    runs: dict[int, list[str]] = {}
    for path in marks.iterdir():
        i, host = path.name.split("-")[:2]
        runs.setdefault(int(i), []).append(host)
    return runs


def worker_hosts(cluster) -> list[str]:
    return sorted(w["host"] for w in cluster.status()["workers"])


def start_jobs(rig, cluster, n: int):
    marks = rig.base / "marks"
    marks.mkdir()
    proc = client(rig, WORK, cluster.host.ip, cluster.port, marks, n)
    wait_for(lambda: len(list(marks.iterdir())) >= 8, 30, "jobs running on both hosts")
    return proc, marks


def check_every_job_once(proc, marks: Path, n: int, cluster) -> dict:
    """Every outcome once and right; every job ran; the cluster serves on all hosts again."""
    try:
        out = proc.json(60)  # before the test's timeout, so the state below gets shown
    except AssertionError as exc:
        state = cluster.status()
        raise AssertionError(f"{exc}\nmaster: queue {state['queue']}, workers "
                             f"{state['workers']}, clients {state['clients']}") from None
    assert out["calls"] == {str(i): [[i, i * i]] for i in range(n)}
    assert out["mapped"] == [[i, i * i] for i in range(n, 2 * n)]
    runs = executions(marks)
    assert sorted(runs) == list(range(2 * n))
    # at most twice: only what was on the far side of the cut when the master gave up
    assert max(map(len, runs.values())) <= 2, runs
    twice = {i: h for i, h in runs.items() if len(h) > 1}
    print(f"jobs run more than once: {len(twice)} of {2 * n}: {twice}")
    wait_for(lambda: worker_hosts(cluster) == ["h2", "h3"], 30, "both worker hosts back")
    proc.write("go")
    assert proc.json(60)["hosts"] == ["h2", "h3"]
    assert proc.wait(30) == 0, proc.stderr()
    return twice


# what the master sees once a host has been cut for longer than the heartbeat timeout
NOTICED = {
    2: lambda s: [w["host"] for w in s["workers"]] == ["h3"],
    1: lambda s: not s["workers"] and not s["clients"],
    4: lambda s: not s["clients"],
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", [2, 1, 4], ids=["worker-host", "master-host", "client-host"])
def test_a_host_cut_off_longer_than_the_heartbeat_timeout(rig, cluster, victim):
    n = 40
    proc, marks = start_jobs(rig, cluster, n)
    host = rig[victim]
    host.cut()
    cut = time.monotonic()
    try:
        wait_for(lambda: NOTICED[victim](cluster.status()), HB_TIMEOUT + 10,
                 f"the master to notice that {host.name} is gone")
        # the master may notice a little before the timeout has passed since the cut
        wait_for(lambda: time.monotonic() - cut > HB_TIMEOUT + 0.5, HB_TIMEOUT + 1,
                 "the cut to outlast the heartbeat timeout")
    finally:
        host.restore()
    print(f"{host.name} cut for {time.monotonic() - cut:.1f} s")
    twice = check_every_job_once(proc, marks, n, cluster)
    if victim == 4:
        # the master dropped the silent client's jobs: those already running (one per
        # worker, or one that started before its cancel came) ran again on its return
        assert len(twice) <= 4, twice


@pytest.mark.timeout(90)
def test_master_sigkilled_and_restarted_on_its_host(rig, cluster):
    n = 40
    proc, marks = start_jobs(rig, cluster, n)
    cluster.master.signal(signal.SIGKILL)
    cluster.master.wait(10)
    cluster.master = cluster.start_master()  # same host, same port, same keys
    check_every_job_once(proc, marks, n, cluster)
