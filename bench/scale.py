"""Scale checks of issue 5: a million-job map in bounded memory, and 500 workers on one master.

    python -m bench.scale [--jobs 1000000] [--workers 2,500] [--json bench/scale.json]

1. ``map`` over N no-op jobs through a real master and 2 real workers; the client's and the
   master's RSS are sampled every 0.2 s (peak reported), and every result is checked.
2. The master's routing rate with W simulated workers: a few processes each hold W/k DEALER
   sockets that speak the worker protocol (HELLO, then answer every JOBS at once with OK
   results), so the master, not job execution, is what is measured. The same client load
   (``--route-jobs`` no-op jobs via ``map``) runs against 2 and against 500 of them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import zmq

from cw import protocol as P
from cw import security
from cw.client import ClusterExecutor
from cw.status import status

RESULT = pickle.dumps(None, protocol=5)


def median(values: list) -> float:
    return sorted(values)[len(values) // 2]


def start_master(home: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "CW_HOME": home}
    master = subprocess.Popen([sys.executable, "-m", "cw.master", "--host", "127.0.0.1",
                               "--port", "0", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, env=env)
    return master, int(master.stdout.readline().decode().rsplit(":", 1)[1])


def wait_workers(port: int, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(status("127.0.0.1", port, 10)["workers"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} workers did not register")
        time.sleep(0.1)


class PeakRss(threading.Thread):
    """Samples the RSS of some processes until stopped; keeps the peaks (MB)."""

    def __init__(self, procs: dict[str, psutil.Process]):
        super().__init__(daemon=True)
        self.procs = procs
        self.peak = {name: 0.0 for name in procs}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.2):
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], proc.memory_info().rss / 1e6)


def million(jobs: int) -> dict:
    """map over ``jobs`` no-op calls; wall time and peak RSS of client and master."""
    home = os.environ["CW_HOME"]
    master, port = start_master(home)
    workers = subprocess.Popen([sys.executable, "-m", "cw.worker", "127.0.0.1", "--port",
                                str(port), "-n", "2", "--log-level", "WARNING"])
    try:
        wait_workers(port, 2)
        rss = PeakRss({"client": psutil.Process(), "master": psutil.Process(master.pid)})
        base = {n: p.memory_info().rss / 1e6 for n, p in rss.procs.items()}
        rss.start()
        start = time.perf_counter()
        with ClusterExecutor("127.0.0.1", port) as ex:
            wrong = sum(1 for i, v in enumerate(ex.map(abs, range(-jobs, 0))) if v != jobs - i)
        seconds = time.perf_counter() - start
        rss.halt.set()
        rss.join()
        return {"jobs": jobs, "seconds": round(seconds, 1), "jobs_per_s": round(jobs / seconds),
                "wrong": wrong, "rss_start_mb": {k: round(v) for k, v in base.items()},
                "rss_peak_mb": {k: round(v) for k, v in rss.peak.items()}}
    finally:
        workers.terminate()
        master.terminate()
        workers.wait(30)
        master.wait(30)


def fake_workers(port: int, n: int, home: str, ready) -> None:
    """``n`` simulated workers in this process: answer every job at once with None."""
    os.environ["CW_HOME"] = home
    ctx = zmq.Context()
    keys = security.keys_for("127.0.0.1", port, "worker")
    socks = []
    poller = zmq.Poller()
    for _ in range(n):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(sock, keys)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(P.pack(P.HELLO, P.VERSION, "worker",
                         {"name": f"sim-{os.getpid()}-{len(socks)}", "slots": 64}))
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    ready.set()
    beat = P.pack(P.HEARTBEAT)
    last_beat = time.monotonic()
    while True:
        for sock, _ in poller.poll(200):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                header = P.unpack(frames[0])
                if header[0] == P.JOBS:
                    jobs = header[3]
                    done = [[cid, seq, P.OK, 1] for cid, seq, _d, _n, _o in jobs]
                    sock.send_multipart([P.pack(P.RESULTS, [j[:2] for j in done], done,
                                                1e-5 * len(done)), *[RESULT] * len(done)])
        if time.monotonic() - last_beat > 1.0:
            last_beat = time.monotonic()
            for sock in socks:
                sock.send(beat)


def routing(workers: int, jobs: int, procs: int, clients: int = 1) -> dict:
    """The master's jobs/s with ``workers`` simulated workers and ``clients`` clients (each
    maps its share of ``jobs`` at once, from a thread of this process)."""
    home = os.environ["CW_HOME"]
    master, port = start_master(home)
    children = []
    try:
        per = [workers // procs + (i < workers % procs) for i in range(procs)]
        for n in filter(None, per):
            ready = mp.Event()
            child = mp.Process(target=fake_workers, args=(port, n, home, ready), daemon=True)
            child.start()
            ready.wait(60)
            children.append(child)
        wait_workers(port, workers)
        cpu = psutil.Process(master.pid).cpu_times
        executors = [ClusterExecutor("127.0.0.1", port) for _ in range(clients)]
        try:
            for ex in executors:
                list(ex.map(abs, range(2000)))  # warm up
            each = jobs // clients
            results: list = [None] * clients
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                i, list(executors[i].map(abs, range(-each, 0))))) for i in range(clients)]
            start, cpu_start = time.perf_counter(), sum(cpu()[:2])
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds, cpu_seconds = time.perf_counter() - start, sum(cpu()[:2]) - cpu_start
        finally:
            for ex in executors:
                ex.shutdown()
        # the simulated workers answer None, once each
        assert all(r == [None] * each for r in results)
        jobs = each * clients
        return {"workers": workers, "clients": clients, "jobs": jobs,
                "jobs_per_s": round(jobs / seconds),
                "master_cpu_us_per_job": round(cpu_seconds / jobs * 1e6, 1)}
    finally:
        for child in children:
            child.terminate()
        master.terminate()
        master.wait(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--workers", default="2,500")
    parser.add_argument("--route-jobs", type=int, default=50_000)
    parser.add_argument("--procs", type=int, default=4, help="processes simulating workers")
    parser.add_argument("--clients", type=int, default=1,
                        help="clients mapping at once (the routing part; fair share)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default="bench/scale.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("CW_HOME", str(Path(os.environ.get("TMPDIR", "/tmp"))
                                         / f"cw-scale-{os.getpid()}"))
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    rates: dict = {}
    costs: dict = {}
    for rep in range(args.reps):  # taking turns, as the main benchmark does
        for w in [int(x) for x in args.workers.split(",")]:
            r = routing(w, args.route_jobs, min(args.procs, w), args.clients)
            rates.setdefault(w, []).append(r["jobs_per_s"])
            costs.setdefault(w, []).append(r["master_cpu_us_per_job"])
            print(f"routing, {w:4d} simulated workers, rep {rep + 1}: {r['jobs_per_s']} jobs/s, "
                  f"{r['master_cpu_us_per_job']} µs of master CPU per job", flush=True)
    out["routing"] = {str(w): {"median": median(v), "runs": v,
                               "master_cpu_us_per_job": median(costs[w]),
                               "master_cpu_runs": costs[w]}
                      for w, v in rates.items()}
    ws = sorted(rates)
    if len(ws) >= 2:
        lo, hi = (out["routing"][str(w)] for w in (ws[0], ws[-1]))
        # two views of the same question: end-to-end jobs/s (noisy: client and simulated
        # workers share the 2 cores) and the master's capacity, 1 / its CPU per job
        out["routing"]["ratio"] = round(hi["median"] / lo["median"], 3)
        out["routing"]["capacity_ratio"] = round(
            lo["master_cpu_us_per_job"] / hi["master_cpu_us_per_job"], 3)
        print(f"with {ws[-1]} workers / with {ws[0]}: jobs/s {out['routing']['ratio']:.2f}, "
              f"master capacity {out['routing']['capacity_ratio']:.2f}")
    if args.jobs:
        out["million"] = million(args.jobs)
        print(f"map over {args.jobs} jobs: {out['million']}", flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
