"""Micro-benchmark of cw.jobqueue against the deque the Scheduler used before it.

    python bench/jobqueue.py [--jobs 200000] [--reps 5]

Each case queues N jobs, then takes them in batches of B (1 and 8) as workers would, and
releases each taken job as its result would (fair policy). "deque" is the Scheduler's old
path: append, then _take's loop (popleft, cancelled/suspect/backlogged checks). Prints ns
per job (push + take + release), best of the repetitions.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cw.master.jobqueue import JobQueue


class Client:
    full = False

    def backlogged(self) -> bool:
        return self.full


class Job:
    __slots__ = ("client", "seq", "cancelled", "suspect", "opts")

    def __init__(self, client: Client, seq: int, opts: dict | None = None):
        self.client, self.seq, self.cancelled, self.suspect, self.opts = \
            client, seq, False, False, opts


def make(n: int, clients: int, prio: bool) -> list[Job]:
    cs = [Client() for _ in range(clients)]
    return [Job(cs[i % clients], i, {"priority": i % 3} if prio else None) for i in range(n)]


def run_deque(jobs: list[Job], batch: int) -> float:
    queue: deque[Job] = deque()
    t = time.perf_counter()
    for job in jobs:
        queue.append(job)
    while queue:
        got: list[Job] = []
        while queue and len(got) < batch:   # the Scheduler's old _take
            job = queue[0]
            if job.suspect and not job.cancelled and got:
                break
            queue.popleft()
            if job.cancelled:
                continue
            if job.client.backlogged():
                continue
            got.append(job)
            if job.suspect:
                break
    return time.perf_counter() - t


def run_queue(jobs: list[Job], batch: int, policy: str) -> float:
    q: JobQueue[Job] = JobQueue(policy, held=Client.backlogged)
    t = time.perf_counter()
    for job in jobs:
        q.push(job)
    release = q.release
    while len(q):
        for job in q.take(batch):
            release(job)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    n = args.jobs
    cases = [("deque (old _take)", 1, False, None), ("fifo", 1, False, "fifo"),
             ("fair", 1, False, "fair"), ("fair", 4, False, "fair"),
             ("fair", 100, False, "fair"), ("fair, 3 priorities", 1, True, "fair"),
             ("fair, 3 priorities", 4, True, "fair")]
    print(f"{'case':<22}{'clients':>8}{'batch':>7}{'ns/job':>9}{'x deque':>9}")
    for batch in (1, 8):
        base = 0.0
        for name, clients, prio, policy in cases:
            best = float("inf")
            for _ in range(args.reps):
                jobs = make(n, clients, prio)
                took = run_deque(jobs, batch) if policy is None else \
                    run_queue(jobs, batch, policy)
                best = min(best, took)
            ns = best / n * 1e9
            base = base or ns
            print(f"{name:<22}{clients:>8}{batch:>7}{ns:>9.0f}{ns / base:>9.2f}")


if __name__ == "__main__":
    main()
