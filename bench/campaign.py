"""Benchmark of named batches (campaigns, issue 14): durable versus anonymous, and a big batch
through a master SIGKILL.

    python bench/campaign.py speed [--jobs 10000] [--reps 3]
        one master (--journal on the local disk) and 2 workers; the same no-op jobs through an
        anonymous ClusterExecutor and through a named batch, taking turns: jobs/s of each
        (submit one by one, then wait for every future) and durable / anonymous
    python bench/campaign.py big [--jobs 1000000] [--size 1024]
        submit N jobs of SIZE-byte arguments to a named batch, detach; SIGKILL the master
        once half are done, restart it on the same journal and port; collect with
        Batch.results(). Prints the times, the masters' peak RSS (VmHWM), the journal's size
        and the restart-to-dispatch time (new master started -> a job done again)

Both print a JSON line at the end (``--json FILE`` also writes it), for bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cw.batch import Batch
from cw.client import ClusterExecutor
from cw.status import status

REPO = Path(__file__).resolve().parent.parent


def noop(x):
    """The no-op job."""
    return x


def size_of(x: bytes) -> int:
    """A job of the big batch: its argument's length."""
    return len(x)


class Cluster:
    """A master with a journal and a supervisor of 2 workers, as processes."""

    def __init__(self, home: Path, workers: int = 2, port: int = 0):
        self.home = home
        self.journal = home / "journal"
        os.environ["CW_HOME"] = str(home)  # this process's clients find the master's keys
        self.env = {**os.environ, "CW_HOME": str(home),
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.master = self.start_master(port)
        self.workers = subprocess.Popen(
            [sys.executable, "-m", "cw.worker", "127.0.0.1", "--port", str(self.port),
             "-n", str(workers)], env=self.env, stderr=open(home / "workers.log", "ab"),
            start_new_session=True)
        deadline = time.monotonic() + 60
        while len(status("127.0.0.1", self.port)["workers"]) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not register")
            time.sleep(0.05)

    def start_master(self, port: int) -> subprocess.Popen:
        self.started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cw.master", "--host", "127.0.0.1", "--port", str(port),
             "--journal", str(self.journal)], env=self.env, stdout=subprocess.PIPE, text=True,
            stderr=open(self.home / "master.log", "ab"), start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"no master: {line!r}; see {self.home / 'master.log'}")
        self.port = int(line.rsplit(":", 1)[1])
        return proc

    def peak_rss_mb(self) -> float:
        """The master's peak RSS so far (VmHWM), in MB."""
        with open(f"/proc/{self.master.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e3
        return 0.0

    def kill_master(self) -> None:
        self.master.send_signal(signal.SIGKILL)
        self.master.wait(30)

    def journal_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.journal.glob("seg-*"))

    def stop(self) -> None:
        for proc in (self.workers, self.master):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def run_jobs(port: int, n: int, batch: str | None) -> float:
    """jobs/s of n no-op submits then waiting for all, anonymous or in ``batch``."""
    with ClusterExecutor("127.0.0.1", port, batch=batch) as ex:
        t = time.perf_counter()
        futures = [ex.submit(noop, i) for i in range(n)]
        for i, f in enumerate(futures):
            assert f.result(300) == i
        rate = n / (time.perf_counter() - t)
        if batch is not None:
            ex.detach()
    if batch is not None:
        with Batch(batch, "127.0.0.1", port) as b:
            b.forget()
    return rate


def speed(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="cw-bench-") as d:
        cluster = Cluster(Path(d))
        try:
            run_jobs(cluster.port, 500, None)
            run_jobs(cluster.port, 500, "warm")
            anon, durable = [], []
            for rep in range(args.reps):
                anon.append(run_jobs(cluster.port, args.jobs, None))
                durable.append(run_jobs(cluster.port, args.jobs, f"speed-{rep}"))
                print(f"rep {rep}: anonymous {anon[-1]:,.0f} jobs/s, durable "
                      f"{durable[-1]:,.0f} jobs/s", file=sys.stderr)
        finally:
            cluster.stop()
    a, b = statistics.median(anon), statistics.median(durable)
    return {"bench": "campaign-speed", "jobs": args.jobs, "reps": args.reps,
            "anonymous_jobs_per_s": round(a), "durable_jobs_per_s": round(b),
            "durable_over_anonymous": round(b / a, 3), "anonymous_all": anon,
            "durable_all": durable}


def big(args) -> dict:
    n, payload = args.jobs, b"x" * args.size
    out: dict = {"bench": "campaign-big", "jobs": n, "arg_bytes": args.size}
    with tempfile.TemporaryDirectory(prefix="cw-bench-", dir=args.dir) as d:
        cluster = Cluster(Path(d))
        try:
            t0 = time.perf_counter()
            ex = ClusterExecutor("127.0.0.1", cluster.port, batch="big")
            for _ in range(n):
                ex.submit(size_of, payload)
            out["submit_s"] = round(time.perf_counter() - t0, 1)
            ex.detach()
            out["submit_and_detach_s"] = round(time.perf_counter() - t0, 1)
            print(f"submitted and detached {n:,} jobs in {out['submit_and_detach_s']} s",
                  file=sys.stderr)
            with Batch("big", "127.0.0.1", cluster.port) as b:
                while b.status()["done"] < n // 2:
                    time.sleep(0.2)
                done = b.status()["done"]
            out["peak_rss_mb_first_master"] = cluster.peak_rss_mb()
            out["journal_bytes_at_kill"] = cluster.journal_bytes()
            out["killed_after_s"] = round(time.perf_counter() - t0, 1)
            cluster.kill_master()
            print(f"SIGKILLed the master with {done:,} done", file=sys.stderr)
            cluster.master = cluster.start_master(cluster.port)
            started = cluster.started
            while True:  # until the new master runs jobs again
                try:
                    with Batch("big", "127.0.0.1", cluster.port, connect_timeout=30) as b:
                        while b.status()["done"] <= done:
                            time.sleep(0.01)
                    break
                except Exception:
                    time.sleep(0.05)
            out["restart_to_dispatch_s"] = round(time.monotonic() - started, 2)
            with Batch("big", "127.0.0.1", cluster.port) as b:
                b.wait()
                out["all_done_s"] = round(time.perf_counter() - t0, 1)
                t1 = time.perf_counter()
                results = b.results()
                out["collect_s"] = round(time.perf_counter() - t1, 1)
                assert len(results) == n and all(r == args.size for r in results)
                outcomes = b.status()
            out["status"] = outcomes
            out["total_s"] = round(time.perf_counter() - t0, 1)
            out["peak_rss_mb_second_master"] = cluster.peak_rss_mb()
            out["journal_bytes"] = cluster.journal_bytes()
        finally:
            cluster.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("speed", "big"))
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where the big run's journal goes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.jobs is None:
        args.jobs = 10_000 if args.what == "speed" else 1_000_000
    result = speed(args) if args.what == "speed" else big(args)
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
