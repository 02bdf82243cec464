"""A worker's end of its allocation: when to stop taking jobs, and how to leave.

    start: allocation_end() (cw.launch.slurm_jobs, once) --> HELLO info "alloc_end" and
           "slurm_job" (the master tells an eviction from a death, and cancels by the id)
    before each job (main thread): Drain.fits(job) -- adapt.takes(expected, now, end,
           margin), expected = the job's option ``expected`` or the time this worker
           learned for its function -- no: the worker starts draining and gives it back
    from ``margin`` s before the end (a timer on the I/O thread), or on the drain signal
           (SIGTERM under SLURM, ``--drain-signal``): Drain.begin(reason) once; the worker
           gives its prefetched jobs back (DRAIN, uncharged at the master), takes nothing
           more, finishes what runs, says BYE and tells its supervisor "drained" (no restart)

Outside SLURM (no end, no drain signal) nothing here changes what a worker does.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from tornado.ioloop import IOLoop

from cw import protocol as P
from cw.launch import adapt, slurm_jobs

if TYPE_CHECKING:
    from cw.worker.process import Worker

log = logging.getLogger(__name__)

LEARN_KEEP = 1024   # functions whose job time a worker remembers


class Drain:
    """One worker process's drain state. ``begin`` may be called from any thread."""

    def __init__(self, margin: float = adapt.MARGIN, end: float | None = None,
                 slurm: bool | None = None):
        in_slurm = bool(os.environ.get("SLURM_JOB_ID")) if slurm is None else slurm
        self.margin = margin
        self.job = slurm_jobs.this_job() if in_slurm else None
        self.end = end if end is not None or not in_slurm else slurm_jobs.allocation_end()
        if self.end is not None:  # a one-minute job does not drain from its start
            self.margin = adapt.scaled(margin, self.end - time.time())
        self.reason = ""                 # why it drains ("" while it does not)
        self.learned: dict[tuple[int, bytes], float] = {}  # (cid, digest) -> seconds
        self._lock = threading.Lock()

    def info(self) -> dict:
        """What the worker's HELLO says of its allocation (nothing outside SLURM)."""
        found: dict = {}
        if self.job:
            found["slurm_job"] = self.job
        if self.end is not None:
            found["alloc_end"] = float(self.end)
        return found

    def begin(self, reason: str) -> bool:
        """Start draining (True the first time only)."""
        with self._lock:
            if self.reason:
                return False
            self.reason = reason
        log.info("draining: %s", reason)
        return True

    def seconds_to_margin(self, now: float | None = None) -> float | None:
        """Seconds until the drain by time starts (None: never)."""
        if self.end is None:
            return None
        return max(0.0, self.end - self.margin - (time.time() if now is None else now))

    def fits(self, cid: int, digest: bytes, opts) -> str:
        """"" if this job may start now, else why not (it would outlive the allocation)."""
        if self.end is None:
            return ""
        now = time.time()
        expected = (opts or {}).get("expected")
        if not isinstance(expected, (int, float)) or isinstance(expected, bool):
            expected = self.learned.get((cid, digest))
        if adapt.takes(expected, now, self.end, self.margin):
            return ""
        left = self.end - now
        if expected is None:
            return f"{left:.0f} s left of the allocation, within the {self.margin:g} s margin"
        return (f"a job expected to take {expected:.1f} s does not fit in the {left:.0f} s "
                f"left of the allocation")

    def learn(self, cid: int, digest: bytes, seconds: float) -> None:
        """Remember how long a job of this function took (the longer of the last two)."""
        key = (cid, digest)
        before = self.learned.pop(key, None)
        self.learned[key] = seconds if before is None else max(seconds, 0.5 * before)
        if len(self.learned) > LEARN_KEEP:
            self.learned.pop(next(iter(self.learned)))


def give_back(worker: Worker, reason: str) -> None:
    """Start ``worker``'s drain (any thread, once): its prefetched jobs go back to the
    master (DRAIN) and the main loop, woken, finishes what runs and leaves."""
    if not worker.drain.begin(reason):
        return
    with worker.cond:
        given = [j for j in worker.pending if j.lane is None]
        worker.pending = deque(j for j in worker.pending if j.lane is not None)
        worker.cond.notify()
        keys = [[j.cid, j.seq] for j in given if j.epoch == worker.epoch]
    worker.conn.call(worker.conn.send, [P.pack(P.DRAIN, reason, keys)])


def drain_at(worker: Worker) -> None:
    """On the worker's I/O thread: drain at the margin before the allocation's end."""
    drain = worker.drain
    delay = drain.seconds_to_margin() or 0.0
    end = time.strftime("%H:%M:%S", time.localtime(drain.end or 0))
    IOLoop.current().call_later(delay, give_back, worker,
                                f"its allocation (SLURM job {drain.job}) ends at {end}, "
                                f"within the {drain.margin:g} s margin")
