"""Benchmark of the master's journal (cw/master/journal/store.py), issue 14.

    python bench/journal.py [--jobs 1000000] [--size 1024] [--small 200000] [--dir DIR]

Prints: appends/s of small records with group commit (one call a record, and in lists of
100), the time and RSS to write N x SIZE-byte jobs, the journal's size, and the time and RSS of
a fresh process that reopens it (the master's restart) and walks the pending keys.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cw.master.journal import Journal


def rss_mb() -> float:
    """This process's current RSS in MB (from /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def small(d: str, n: int) -> None:
    for per in (1, 100):
        path = os.path.join(d, f"small{per}")
        commits = []
        j = Journal(path, on_durable=commits.append)
        j.add_function(b"f" * 16, b"blob")
        payload = b"p" * 64
        t = time.perf_counter()
        if per == 1:
            for k in range(n):
                j.add_job("b", k, b"f" * 16, payload)
        else:
            for k in range(0, n, per):
                j.add_jobs("b", [(i, b"f" * 16, payload, None) for i in range(k, k + per)])
        j.flush()
        dt = time.perf_counter() - t
        j.close()
        print(f"small records ({len(payload)} B payload, {per} per call): {n} in {dt:.2f} s = "
              f"{n / dt:,.0f} records/s durable, {len(commits)} group commits (fsyncs)")
        shutil.rmtree(path)


def big(d: str, n: int, size: int) -> str:
    path = os.path.join(d, "big")
    j = Journal(path)
    j.add_function(b"f" * 16, b"blob")
    payload = os.urandom(size)
    t = time.perf_counter()
    for k in range(0, n, 1000):
        j.add_jobs("sweep", [(i, b"f" * 16, payload, None) for i in range(k, min(n, k + 1000))])
        if j.buffered_bytes > 256 << 20:     # what the master does: stop reading clients
            j.flush()
    j.flush()
    dt = time.perf_counter() - t
    print(f"write {n:,} x {size} B jobs: {dt:.1f} s ({n / dt:,.0f} jobs/s), "
          f"journal {j.size_bytes / 1e9:.2f} GB, writer RSS now {rss_mb():.0f} MB "
          f"(peak {peak_mb():.0f} MB, the buffer included)")
    j.close()
    return path


def compaction(d: str, n: int, size: int) -> None:
    """forget() a batch of n jobs beside a live one of n/4, then compact on a thread while this
    thread keeps appending: the compaction's time and the longest append meanwhile."""
    path = os.path.join(d, "compact")
    j = Journal(path)
    j.add_function(b"f" * 16, b"blob")
    payload = os.urandom(size)
    for name, count in (("gone", n), ("kept", n // 4)):
        for k in range(0, count, 1000):
            j.add_jobs(name, [(i, b"f" * 16, payload, None) for i in range(k, min(count, k + 1000))])
            if j.buffered_bytes > 256 << 20:
                j.flush()
    j.add_outcomes("kept", [(k, 0, b"ok") for k in range(0, n // 4, 2)])
    j.flush()
    j.forget("gone")
    before = j.size_bytes
    result: list = []
    t = time.perf_counter()
    th = threading.Thread(target=lambda: result.append(j.compact()))
    th.start()
    worst, calls, k = 0.0, 0, 0
    while th.is_alive():
        a = time.perf_counter()
        j.add_job("live", k, b"f" * 16, b"x" * 64)
        worst = max(worst, time.perf_counter() - a)
        calls, k = calls + 1, k + 1
        if calls % 1000 == 0:
            time.sleep(0.001)          # leave the compaction thread the GIL now and then
    th.join()
    dt = time.perf_counter() - t
    j.flush()
    print(f"compaction after forget() of {n:,} x {size} B jobs (live: {n // 4:,}): {dt:.1f} s, "
          f"{before / 1e9:.2f} GB -> {j.size_bytes / 1e9:.2f} GB (freed {result[0] / 1e9:.2f} GB); "
          f"{calls:,} appends meanwhile, the longest {worst * 1e3:.0f} ms")
    j.close()
    shutil.rmtree(path)


REOPEN = r"""
import os, sys, time
sys.path.insert(0, {root!r})
t = time.perf_counter()
from cw.master.journal import Journal
j = Journal({path!r})
t1 = time.perf_counter()
first = next(j.pending("sweep"))
job = j.read_job("sweep", first)
t2 = time.perf_counter()
n = sum(1 for _ in j.pending("sweep"))
t3 = time.perf_counter()
st = j.status("sweep")
mem = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(f"reopen: {{t1 - t:.2f}} s to open (recovery scan, imports included), {{t2 - t1:.4f}} s to "
      f"the first pending job, {{t3 - t2:.2f}} s to walk {{n:,}} pending keys; status {{st}}; "
      f"RSS {{mem['VmRSS'].strip()}}, peak {{mem['VmHWM'].strip()}}")
j.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--small", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="where to put the journals (default: a tmp dir)")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="cwjournal-", dir=a.dir)
    try:
        small(d, a.small)
        compaction(d, a.jobs // 2, a.size)
        path = big(d, a.jobs, a.size)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for cache in ("warm page cache", "second run"):
            print(f"[{cache}] ", end="", flush=True)
            subprocess.run([sys.executable, "-c", REOPEN.format(root=root, path=path)],
                           check=True)
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
