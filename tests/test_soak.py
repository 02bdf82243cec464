"""Soak: many small jobs from 2 client processes under chaos.

While two client processes push ``SOAK_JOBS`` jobs through the cluster, a chaos loop
SIGKILLs a worker process every ``KILL_EVERY`` seconds (the supervisor restarts it) and
kills the master with SIGKILL twice, restarting it on the same port. Every result must be
correct, none lost, none delivered twice (each client counts its callbacks per job), and
the restarted master's RSS must come back near its baseline once the clients are gone.

The normal run pushes 200,000 jobs (about 8 s on 2 cores, long enough for 5 or more kills); ``CW_SOAK=1`` pushes
1,000,000 for a longer soak; ``CW_SOAK_JOBS=N`` sets any number.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time

import psutil
import pytest
from conftest import wait_for
from test_faults import client_script, run_client

SOAK_JOBS = int(os.environ.get("CW_SOAK_JOBS") or (1_000_000 if os.environ.get("CW_SOAK")
                                                    else 200_000))
KILL_EVERY = 1.1     # seconds between worker kills (the supervisor's "dies at start"
                     # guard counts deaths less than 1 s after any spawn)
RESTART_AT = (0.25, 0.6)  # fractions of the results at which the master is killed -9
WINDOW = 4000        # jobs a client keeps in flight
RSS_SLACK_MB = 40    # how far above its idle baseline the master may stay afterwards

CLIENT = """
    import collections, json, threading
    tag, n, window, progress = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]

    def job(tag, i):
        return tag, i, i * i

    counts = collections.Counter()
    wrong = []
    room = threading.Semaphore(window)

    def callback(jobid, result):
        counts[jobid] += 1
        if result != (tag, jobid, jobid * jobid):
            wrong.append([jobid, repr(result)])
        room.release()
        if len(counts) % 1000 == 0:
            with open(progress + ".tmp", "w") as f:
                f.write(str(len(counts)))
            os.replace(progress + ".tmp", progress)

    started = time.monotonic()
    error = None
    client = ClientThread(callback, host, port, master_timeout=60).start()
    try:
        for i in range(n):
            if not room.acquire(timeout=60):
                raise TimeoutError(f"no result for 60 s with {window} jobs in flight")
            client.submit(i, job, tag, i)
        client.wait(timeout=120)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        client.stop()
    print(json.dumps({
        "tag": tag, "error": error, "received": len(counts),
        "duplicates": sum(c - 1 for c in counts.values()),
        "missing": sorted(set(range(n)) - set(counts))[:10], "wrong": wrong[:10],
        "seconds": round(time.monotonic() - started, 1)}), flush=True)
"""


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2 ** 20


@pytest.mark.soak
@pytest.mark.timeout(600 if os.environ.get("CW_SOAK") else 180)
def test_soak_with_worker_kills_and_a_master_restart(procs, tmp_path):
    master = procs.master()
    port = master.port
    supervisor = procs.workers(master, 2)
    workers = psutil.Process(supervisor.pid).children
    script = client_script(tmp_path, CLIENT, "soak_client.py")
    per_client = SOAK_JOBS // 2
    progress = {tag: tmp_path / f"{tag}.progress" for tag in ("a", "b")}
    clients = {tag: run_client(procs, master, script, tag, per_client, WINDOW, path)
               for tag, path in progress.items()}

    def done_so_far() -> int:
        return sum(int(p.read_text() or 0) for p in progress.values() if p.exists())

    started = time.monotonic()
    kills, restarts, baseline = 0, list(RESTART_AT), None
    next_kill = started + KILL_EVERY
    rng = random.Random(4)
    while any(c.popen.poll() is None for c in clients.values()):
        assert time.monotonic() - started < SOAK_JOBS / 2000 + 60, f"soak stuck at {done_so_far()} results"
        now = time.monotonic()
        if now >= next_kill:
            victims = [p for p in workers() if time.time() - p.create_time() > 1]
            if victims:
                rng.choice(victims).send_signal(signal.SIGKILL)
                kills += 1
            next_kill = now + KILL_EVERY
        if restarts and done_so_far() >= SOAK_JOBS * restarts[0]:
            restarts.pop(0)
            master.signal(signal.SIGKILL)
            master.popen.wait(10)
            master = procs.master(port=port)
            baseline = rss_mb(master.pid)
        time.sleep(0.05)  # the chaos loop's pace
    elapsed = time.monotonic() - started

    summaries = [json.loads(c.readline(10)) for c in clients.values()]
    for s in summaries:
        assert s["error"] is None, s
        assert (s["received"], s["duplicates"], s["missing"], s["wrong"]) == \
            (per_client, 0, [], []), s
    assert not restarts and kills >= 3, (restarts, kills)

    # the clients are gone: the master forgets them and gives memory back
    wait_for(lambda: not master.status()["clients"], 20, "clients gone")
    info = master.status()
    assert info["queue"] == 0
    after = rss_mb(master.pid)
    print(f"\nsoak: {SOAK_JOBS} jobs in {elapsed:.1f} s with {kills} worker kills and "
          f"{len(RESTART_AT)} master restarts; clients took {[s['seconds'] for s in summaries]} s; restarted master RSS "
          f"{baseline:.0f} MB idle, {after:.0f} MB after")
    assert after < baseline + RSS_SLACK_MB, (baseline, after)
