"""The lane: lone jobs go straight to a worker on the client's machine and back (cw.lane).

Whatever happens on the lane, a job is finished exactly once: a busy worker bounces it to
the master, a dead one's job is resent through the master (its death charged), and bad
input on a lane or an inbox is dropped and logged.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time

import psutil
import pytest
from conftest import gated, wait_for
from test_faults import NOTICE, executor, exit_once, exit_worker
from test_soak import KILL_EVERY

from cw.client import ClientThread, ClusterExecutor
from cw.conn import lane
from cw.errors import WorkerLost


def pid_of(_=None) -> int:
    return os.getpid()


def with_lane(ex: ClusterExecutor) -> str:
    """Run one job through the master, which then names a lane, and a few on the lane (so
    its worker is connected to our inbox); return the lane's endpoint."""
    assert ex.submit(abs, -1).result(timeout=30) == 1
    endpoint = wait_for(lambda: ex._session.lane.endpoint, 10, "the master to name a lane")
    assert [ex.submit(abs, -i).result(timeout=30) for i in range(3)] == [0, 1, 2]
    return endpoint


@pytest.mark.timeout(60)
def test_lone_jobs_take_the_lane_and_the_master_counts_them(cluster):
    with executor(cluster) as ex:
        with_lane(ex)
        lane_jobs = []
        for i in range(50):
            future = ex.submit(abs, -i)
            lane_jobs.append(future._seq in ex._session.lane.jobs)
            assert future.result(timeout=30) == i
        assert all(lane_jobs)
        assert ex.submit(pid_of).result(timeout=30) in {w["pid"] for w in
                                                         cluster.status()["workers"]}
        # not routed by the master, but counted there (a tick later)
        wait_for(lambda: cluster.status()["routed"] == 55, 10, "55 jobs counted")
        info = cluster.status()
        assert sum(w["done"] for w in info["workers"]) == 55
        assert info["clients"][0]["done"] == info["clients"][0]["submitted"] == 55


@pytest.mark.timeout(60)
def test_a_busy_worker_bounces_a_lane_job_to_the_master(procs, master, tmp_path):
    """One worker: another client's job keeps it busy, so our lone job is bounced: the
    master gets it (and may prefetch it to the worker), and it runs once the worker is
    free."""
    procs.workers(master, 1)
    gate = str(tmp_path / "gate")
    with executor(master) as ours, executor(master) as other:
        with_lane(ours)
        blocker = other.submit(gated, gate, "blocker")
        wait_for(lambda: blocker.running(), 20, "the blocker running")
        lone = ours.submit(abs, -7)
        wait_for(lambda: sum(c["queued"] for c in master.status()["clients"]) == 1, 20,
                 "the bounced job at the master")
        assert lone._seq not in ours._session.lane.jobs
        assert not lone.done()
        open(gate, "w").close()
        assert lone.result(timeout=30) == 7
        assert blocker.result(timeout=30) == "blocker"


@pytest.mark.timeout(60)
def test_a_long_lane_job_shows_running_and_the_master_feeds_others(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    with executor(cluster) as ex:
        with_lane(ex)
        long_job = ex.submit(gated, gate, "long")
        assert long_job._seq in ex._session.lane.jobs
        wait_for(lambda: long_job.running(), 10, "the lane job reported running")
        busy = wait_for(lambda: [w for w in cluster.status()["workers"] if w["job"]], 10,
                        "the master to show the lane job")
        assert len(busy) == 1 and busy[0]["job"][1] == long_job._seq
        try:  # its worker gets nothing meanwhile: all of these run on the other one
            others = {f.result(timeout=30) for f in [ex.submit(pid_of) for _ in range(20)]}
            assert others == {w["pid"] for w in cluster.status()["workers"]
                              if not w["job"]}
            assert not long_job.done()
        finally:
            open(gate, "w").close()
        assert long_job.result(timeout=30) == "long"
        wait_for(lambda: not any(w["job"] for w in cluster.status()["workers"]), 10,
                 "both workers idle")


@pytest.mark.timeout(90)
def test_a_lane_job_that_kills_its_worker_is_resent_through_the_master(cluster, tmp_path):
    with executor(cluster) as ex:
        with_lane(ex)
        future = ex.submit(exit_once, str(tmp_path / "died"), 42)
        assert future._seq in ex._session.lane.jobs
        assert future.result(timeout=NOTICE + 30) == 42
        assert (tmp_path / "died").exists()  # it did die once
    cluster.wait_workers(2)


@pytest.mark.timeout(120)
def test_a_lane_death_is_charged_like_any_other(cluster):
    """A poison job first sent on the lane still fails after max_retries (3) deaths, all
    named, the lane's among them."""
    with executor(cluster) as ex:
        with_lane(ex)
        future = ex.submit(exit_worker, 0.2)
        assert future._seq in ex._session.lane.jobs
        with pytest.raises(WorkerLost) as info:
            future.result(timeout=3 * (NOTICE + 2) + 10)
        assert len(info.value.workers) == 3
        cluster.wait_workers(2)
        assert list(ex.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]


@pytest.mark.timeout(60)
def test_garbage_on_a_lane_and_an_inbox_is_dropped(procs, master, caplog):
    """Well-framed nonsense is dropped message by message; a broken frame count closes
    that one connection. Either way the lane keeps working."""
    caplog.set_level(logging.WARNING, "cw.session")
    workers = procs.workers(master, 1)
    with executor(master) as ex:
        endpoint = with_lane(ex)
        for path in (endpoint, ex._session.lane.inbox):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            for frames in ([b"\xc1"], [b"\x93\x28\x01\x02"], [b""], [b"\x91\xcd"],
                           [b"\x97\x28\x01\x02\xc4\x02ab\x05\xa3bad\xc3"]):
                sock.sendall(b"".join(lane.encode(frames)))
            sock.sendall(b"\x00\x00\x00\x00")  # a message of no frames
            assert sock.recv(1) == b""  # we are cut off
            sock.close()
        for i in range(20):  # both ends still work, on the lane
            assert ex.submit(abs, -i).result(timeout=30) == i
        assert ex._session.lane.endpoint == endpoint
    assert "dropped a bad message on the inbox" in caplog.text
    assert "dropped a bad message on the lane" in workers.stderr()
    assert "a message of 0 frames" in workers.stderr()


@pytest.mark.timeout(60)
def test_no_local_socket_means_no_lane(procs):
    master = procs.master("--no-local-socket")
    procs.workers(master, 1)
    with executor(master) as ex:
        assert list(ex.map(abs, [-1, -2])) == [1, 2]
        for i in range(5):
            assert ex.submit(abs, -i).result(timeout=30) == i
        assert ex._session.lane.endpoint is None


@pytest.mark.timeout(90)
def test_a_lane_job_survives_a_master_restart(procs, tmp_path):
    """The master is killed while a lane job runs: the client resubmits it to the new
    master; whichever copy finishes first settles it, once."""
    first = procs.master()
    procs.workers(first, 2)
    gate = str(tmp_path / "gate")
    done = []
    with executor(first) as ex:
        with_lane(ex)
        future = ex.submit(gated, gate, "gated")
        future.add_done_callback(done.append)
        assert future._seq in ex._session.lane.jobs
        first.signal(signal.SIGKILL)
        first.popen.wait(10)
        second = procs.master(port=first.port)
        second.wait_workers(2, timeout=30)
        wait_for(lambda: ex._session.conn.master_id == second.status()["master_id"], 30,
                 "the client to re-register")
        open(gate, "w").close()
        assert future.result(timeout=30) == "gated"
        assert [ex.submit(abs, -i).result(timeout=30) for i in range(5)] == list(range(5))
    assert done == [future]


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_reach_the_inbox_gives_the_lane_back(cluster):
    """A tmp cleaner removed the client's inbox: the worker cannot answer on the lane, so
    the master takes the lane back and the client resends the job through it."""
    with executor(cluster) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        wait_for(lambda: ex._session.lane.endpoint, 10, "the master to name a lane")
        os.unlink(ex._session.lane.inbox)  # before any worker connected to it
        future = ex.submit(abs, -5)
        assert future._seq in ex._session.lane.jobs
        assert future.result(timeout=30) == 5
        assert ex._session.lane.endpoint is None
        assert [ex.submit(abs, -i).result(timeout=30) for i in range(5)] == list(range(5))
        assert not ex._session.lane.jobs


@pytest.mark.timeout(90)
def test_lone_jobs_under_worker_kills_all_settle_once(procs, master):
    """Sequential lone jobs for a few seconds while a worker process is SIGKILLed every
    KILL_EVERY s (its supervisor restarts it): every future gets its own right result."""
    supervisor = psutil.Process(procs.workers(master, 2).popen.pid)
    stop = threading.Event()
    kills = []

    def chaos():
        while not stop.wait(KILL_EVERY):
            children = supervisor.children()
            if children:
                random.choice(children).kill()
                kills.append(1)

    killer = threading.Thread(target=chaos, daemon=True)
    with executor(master) as ex:
        with_lane(ex)
        on_lane, i, deadline = 0, 0, time.monotonic() + 5.0
        killer.start()
        try:
            while time.monotonic() < deadline or len(kills) < 3:
                future = ex.submit(pow, i, 2)
                on_lane += future._seq in ex._session.lane.jobs
                assert future.result(timeout=60) == i * i
                i += 1
        finally:
            stop.set()
            killer.join(10)
    assert len(kills) >= 3 and on_lane > i // 2, (len(kills), on_lane, i)


def sized(n: int) -> bytes:
    return b"x" * n


@pytest.mark.timeout(60)
def test_a_large_lane_result_comes_through_the_master(cluster):
    """Results over 64 KB leave the worker through the master (queued there, so a client
    slow to read never stalls the worker); the client cannot tell."""
    with executor(cluster) as ex:
        with_lane(ex)
        for n in (10, 200_000, 3_000_000):
            future = ex.submit(sized, n)
            assert future._seq in ex._session.lane.jobs
            assert future.result(timeout=30) == b"x" * n
        assert ex._session.lane.endpoint is not None


@pytest.mark.timeout(60)
def test_a_worker_whose_lane_client_left_mid_job_is_fed_again(procs, master, tmp_path):
    """A long lane job made the master hold its worker back (LANE_BUSY); its client left
    before it ended. The worker must get jobs again once it is free."""
    procs.workers(master, 1)
    gate = str(tmp_path / "gate")
    gone = ClientThread(lambda jobid, result: None, master.host, master.port).start()
    for i in range(4):  # through the master, then (once it named the lane) on the lane
        gone.submit(i, abs, -i)
        gone.wait(30)
    wait_for(lambda: gone._session.lane.endpoint, 10, "the master to name a lane")
    gone.submit("orphan", gated, gate, "orphan")
    wait_for(lambda: any(w["job"] for w in master.status()["workers"]), 10,
             "the master to hold the worker back")
    gone.stop()  # leaves at once, its lane job still running
    wait_for(lambda: not master.status()["clients"], 10, "the client gone")
    open(gate, "w").close()
    with executor(master) as ex:
        assert [ex.submit(abs, -i).result(timeout=20) for i in range(3)] == [0, 1, 2]
        assert list(ex.map(abs, range(-20, 0), timeout=20)) == list(range(20, 0, -1))
