"""The local launcher (cw.mp, ./mp.py) with real master and worker processes.

Each test gets its own CW_HOME (conftest's autouse fixture), so the state file
$CW_HOME/mp.json and default.json are private to it; the ``launched`` fixture stops
whatever the state file still lists at teardown, also when the test fails.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from conftest import wait_for
from slurm_conftest_helpers import ROOT, alive, pids_of

from cw.client import ClusterExecutor
from cw.conn import address
from cw.errors import LaunchError
from cw.launch import local as mp
from cw.status import status

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def launched():
    """Stops (by the state file's pids) anything a test left running."""
    yield
    mp.stop()


def run_cli(*args: str, timeout: float = 45) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "mp.py"), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_start_runs_jobs_and_stop_stops_exactly_what_started(launched):
    cluster = mp.start(2, port=0)
    info = status()  # host=None: found through $CW_HOME/default.json
    assert len(info["workers"]) == 2
    started = pids_of(info) | {p.pid for p in cluster.procs}
    with ClusterExecutor() as ex:
        assert list(ex.map(pow, range(20), [2] * 20)) == [i * i for i in range(20)]
        assert set(ex.map(lambda _: os.getpid(), range(20))) <= pids_of(info)

    said = mp.stop()
    assert any("stopped master" in line for line in said), said
    assert any("stopped 2 workers" in line for line in said), said
    assert not [pid for pid in started if alive(pid)]
    assert not mp.state_file().exists()
    assert not address.default_connection_file().exists()
    assert mp.stop() == []  # idempotent


def test_allocate_stops_everything_when_the_body_raises(launched):
    with pytest.raises(RuntimeError, match="boom"):
        with mp.allocate(1, port=0) as cluster:
            started = pids_of(status(cluster.host, cluster.port)) | {p.pid for p in cluster.procs}
            raise RuntimeError("boom")
    assert started and not [pid for pid in started if alive(pid)]
    assert not mp.state_file().exists()


def test_workers_only_and_master_only(launched):
    master = mp.start(0, workers=False, port=0)
    assert status()["workers"] == []
    mp.start(2, master=False)  # joins the master default.json names
    assert len(status()["workers"]) == 2

    said = mp.stop(master=False)
    assert len(said) == 1 and "workers" in said[0]
    wait_for(lambda: status()["workers"] == [], 10, "the workers' goodbyes")
    assert alive(master.procs[0].pid)
    assert "stopped master" in mp.stop()[0]


def test_start_fails_clearly_and_leaves_nothing_when_the_master_cannot_bind(launched):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        with pytest.raises(LaunchError, match="master .* exited during start"):
            mp.start(1, port=busy.getsockname()[1], timeout=20)
    assert not mp.state_file().exists()


def test_stop_never_signals_a_process_that_reused_a_recorded_pid(launched):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with mp._state() as procs:  # a record whose process has gone and whose pid was reused
            procs.append(mp.Proc("master", stranger.pid, "1", "localhost", 1))
        assert mp.stop() == [f"master pid {stranger.pid} (tcp://localhost:1) was already gone"]
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_cli_start_status_stop(launched):
    started = run_cli("-n", "2", "--port", "0", "start")
    assert started.returncode == 0, started.stderr
    assert "started master" in started.stdout and "started 2 workers" in started.stdout

    shown = run_cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "running" in shown.stdout and "2 workers" in shown.stdout

    stopped = run_cli("stop")
    assert "stopped 2 workers" in stopped.stdout and "stopped master" in stopped.stdout
    assert "nothing to stop" in run_cli("stop").stdout
    assert run_cli("status").returncode == 1  # no master any more


def test_cli_start_names_what_did_not_come_up(launched):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        failed = run_cli("-n", "1", "--port", str(busy.getsockname()[1]), "start")
    assert failed.returncode == 1
    assert "master" in failed.stderr and "exited during start" in failed.stderr
    assert not mp.state_file().exists()
