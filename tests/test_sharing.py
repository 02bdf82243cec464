"""Sharing a cluster (issue 16), with real masters, workers and clients.

Fair share between clients (and --policy fifo's old order), priorities within a client,
resources on a mixed cluster, --gpus pinning as a job sees it, and a job nobody can run
shown as waiting by status.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import wait

import pytest
from conftest import gated, wait_for

from cw.client import ClusterExecutor
from cw.status import format_table

JOB = 0.02  # seconds: the 20 ms jobs


def now_ns(_label=None) -> int:
    """Runs on a worker: when it ran (CLOCK_MONOTONIC is one clock for the whole machine)."""
    return time.monotonic_ns()


def where(_=None) -> tuple[int, str | None]:
    """Runs on a worker: its pid and the GPUs it sees."""
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def gated_where(gate: str) -> tuple[int, str | None]:
    """Runs on a worker: holds it until ``gate`` exists, then says where it ran."""
    gated(gate)
    return where()


def makespan_of_b(master) -> tuple[float, int]:
    """A keeps both workers busy with a backlog of 20 ms jobs; B then submits 20 such jobs.
    Returns B's makespan and how many of A's jobs were unfinished when B's were done."""
    with ClusterExecutor(master.host, master.port) as a, \
            ClusterExecutor(master.host, master.port) as b:
        backlog = [a.submit(time.sleep, JOB) for _ in range(250)]   # ~2.5 s on 2 workers
        wait_for(lambda: sum(f.done() for f in backlog) >= 10, 30, "A's jobs to run")
        start = time.monotonic()
        wait([b.submit(time.sleep, JOB) for _ in range(20)], timeout=60)
        seconds = time.monotonic() - start
        left = sum(not f.done() for f in backlog)
        wait(backlog, timeout=60)
        return seconds, left


def test_a_small_client_does_not_wait_behind_a_big_ones_backlog(cluster):
    seconds, left = makespan_of_b(cluster)
    # B's 20 jobs on its half of 2 workers take ~0.4 s; A's backlog needed ~2 s more: B
    # finished long before A, i.e. it did not queue behind A's backlog
    assert left > 60, (seconds, left)


def test_policy_fifo_keeps_the_old_order(procs):
    master = procs.master("--policy", "fifo")
    procs.workers(master, 2)
    seconds, left = makespan_of_b(master)
    # behind every one of A's jobs queued before: at most what the workers held is left
    assert left <= 10, (seconds, left)


def test_status_shows_each_clients_share(cluster):
    with ClusterExecutor(cluster.host, cluster.port, share=2.0) as ex:
        gate = os.path.join(os.environ["CW_HOME"], "gate")
        futures = [ex.submit(gated, gate) for _ in range(6)]
        info = wait_for(lambda: (s := cluster.status())["shares"] and
                        any(x["queued"] for x in s["shares"]) and s, 20, "queued jobs")
        mine = [x for x in info["shares"] if x["queued"]]
        assert [x["share"] for x in mine] == [2.0] and info["policy"] == "fair"
        assert [c["share"] for c in info["clients"]] == [2.0]   # in its client row too
        assert "0" in mine[0]["by_priority"]
        assert "share" in format_table(info)
        open(gate, "w").close()
        wait(futures, timeout=30)
    with pytest.raises(ValueError):
        ClusterExecutor(cluster.host, cluster.port, share=0)


def test_higher_priority_first_fifo_among_equals(procs):
    master = procs.master()
    procs.workers(master, 1, "--slots", "1")   # holds the running job only: nothing prefetched
    gate = os.path.join(os.environ["CW_HOME"], "gate")
    with ClusterExecutor(master.host, master.port) as ex:
        blocker = ex.submit(gated, gate)
        wait_for(lambda: blocker.running(), 20, "the worker to be busy")
        order = [0, 10, 5, 10, 0, -1, 5]
        futures = [ex.options(priority=p).submit(now_ns, i) for i, p in enumerate(order)]
        mapped = ex.options(priority=20).map(now_ns, range(2))  # map takes priority too
        wait_for(lambda: master.status()["queue"] == len(order) + 2, 20, "all queued")
        info = master.status()
        assert sum(info["shares"][0]["by_priority"].values()) == len(order) + 2
        assert list(info["shares"][0]["by_priority"]) == ["20", "10", "5", "0", "-1"]
        open(gate, "w").close()
        ran = [f.result(30) for f in futures]
        first_mapped = max(mapped)
    ranked = sorted(range(len(order)), key=lambda i: ran[i])
    assert ranked == [1, 3, 2, 6, 0, 4, 5]    # by priority, then submission order
    assert first_mapped < min(ran)


def test_gpu_jobs_run_only_on_the_worker_that_has_a_gpu(procs):
    master = procs.master()
    procs.workers(master, 1)
    procs.workers(master, 1, "--resources", "gpu=1,mem=64")
    info = master.status()
    gpu_pid = next(w["pid"] for w in info["workers"] if w["resources"])
    assert [w["resources"] for w in info["workers"] if w["pid"] == gpu_pid] == \
        [{"gpu": 1.0, "mem": 64.0}]
    with ClusterExecutor(master.host, master.port) as ex:
        gpu = ex.options(resources={"gpu": 1})
        pids = {pid for pid, _ in gpu.map(where, range(40))}
        assert pids == {gpu_pid}
        # more than any worker has: it never runs (it waits), status says what for
        big = ex.options(resources={"mem": 128}).submit(where)
        info = wait_for(lambda: (s := master.status())["waiting"] and s, 20, "waiting")
        assert info["waiting"][0]["resources"] == "mem=128"
        assert not big.done()
        assert big.cancel()


def test_gpus_pin_one_process_per_gpu(procs):
    master = procs.master()
    procs.workers(master, 1, "--gpus", "0,1", wait=False)
    info = master.wait_workers(2)
    assert sorted(w["resources"]["gpu"] for w in info["workers"]) == [1.0, 1.0]
    gate = os.path.join(os.environ["CW_HOME"], "gate")
    with ClusterExecutor(master.host, master.port) as ex:
        gpu = ex.options(resources={"gpu": 1})
        futures = [gpu.submit(gated_where, gate) for _ in range(2)]
        held = wait_for(lambda: [w for w in master.status()["workers"]
                                 if w["resources_held_by"]], 20, "both GPUs to be held")
        wait_for(lambda: len([w for w in master.status()["workers"]
                              if w["resources_held_by"]]) == 2, 20, "both GPUs held")
        assert held
        open(gate, "w").close()
        seen = [f.result(30) for f in futures]
    assert sorted(gpu_seen for _, gpu_seen in seen) == ["0", "1"]
    assert len({pid for pid, _ in seen}) == 2


def test_a_job_nobody_can_run_waits_and_status_says_what_for(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        future = ex.options(resources={"gpu": 1}).submit(where)
        info = wait_for(lambda: (s := cluster.status())["waiting"] and s, 20, "waiting")
        assert info["waiting"] == [{"client": info["clients"][0]["name"], "jobs": 1,
                                    "resources": "gpu=1",
                                    "reason": "no connected worker offers gpu=1"}]
        out = subprocess.run([sys.executable, "-m", "cw.status", cluster.address],
                             capture_output=True, text=True, timeout=30)
        assert "waiting: 1 jobs" in out.stdout and "gpu=1" in out.stdout, out
        assert ex.submit(abs, -3).result(30) == 3   # the others run meanwhile
        assert not future.done() and future.cancel()


def test_bad_options_are_refused_at_the_client(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        with pytest.raises(ValueError):
            ex.options(priority=1.5)
        with pytest.raises(ValueError):
            ex.options(resources={"gpu": -1})
        with pytest.raises(ValueError):
            ex.options(resources=["gpu"])


def test_the_dashboard_shows_shares_resources_and_what_waits(procs):
    master = procs.master("--dashboard", "0")
    url = wait_for(lambda: (m := re.search(r"dashboard on (http://\S+)", master.stderr()))
                   and m.group(1), 10, "the dashboard's address in the master's log")
    procs.workers(master, 1, "--resources", "mem=8")
    with ClusterExecutor(master.host, master.port, share=3.0) as ex:
        future = ex.options(resources={"gpu": 1}, priority=2).submit(where)
        info = wait_for(lambda: (s := json.loads(get(url + "status.json")))["waiting"] and s,
                        20, "the waiting job on the dashboard")
        assert info["waiting"][0]["resources"] == "gpu=1"
        assert [(s["share"], s["by_priority"]) for s in info["shares"]] == [(3.0, {"2": 1})]
        assert info["workers"][0]["resources"] == {"mem": 8.0}
        page = get(url).decode()
        assert "Sharing" in page and "resourceText" in page and "waits for" in page
        assert future.cancel()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        return reply.read()
