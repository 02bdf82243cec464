"""Job timeouts, like rq's death penalty: interrupt a job past its time, replace a worker
whose job will not yield.

    I/O thread tick: now > deadline --> SIGUSR1 to the main thread --> JobInterrupted raised
        inside the job's own code (only there: ``Worker.in_job``) --> the job fails with
        JobTimeout, the worker lives on
    still running TIMEOUT_GRACE later (C code that ignores signals) --> report JobTimeout,
        BYE, tell the supervisor "recycle", exit: a fresh process takes the slot
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from cw import protocol as P
from cw.errors import JobTimeout
from cw.worker.outcome import error_frames
from cw.worker.supervisor import NOTE_RECYCLE

if TYPE_CHECKING:
    from cw.worker.process import Task, Worker

log = logging.getLogger(__name__)

TIMEOUT_GRACE = 2.0        # seconds a timed-out job gets to yield to the interrupt


class JobInterrupted(BaseException):
    """Raised in the main thread (by SIGUSR1 from the I/O thread) when a job's time is up."""


def timeout_error(job: Task) -> JobTimeout:
    """The error a timed-out job fails with."""
    return JobTimeout(f"job {job.seq} ran longer than its timeout of "
                      f"{(job.opts or {}).get('timeout')} s and was stopped")


def time_up(worker: Worker, now: float) -> None:
    """Interrupt a job past its deadline; if it will not yield, report and exit (I/O thread)."""
    job = worker.current
    if job is None:
        return
    if now < worker.deadline + TIMEOUT_GRACE:
        if not job.interrupted:
            job.interrupted = True
            log.warning("job %d passed its timeout; interrupting it", job.seq)
            main = threading.main_thread().ident
            assert main is not None  # it runs us
            signal.pthread_kill(main, signal.SIGUSR1)
        return
    log.error("job %d ignores its timeout; reporting it and replacing this worker", job.seq)
    frames = error_frames(timeout_error(job))
    with worker.cond:
        worker.outbox.note([], [[job.cid, job.seq, P.ERROR, len(frames)]], frames)
        job.seq = -1
        worker.recycle = True
    worker.flush()
    worker.conn.send([P.pack(P.BYE)])
    worker.conn.sock.close(linger=2000)
    if worker.link is not None:
        worker.link.tell(NOTE_RECYCLE)
    os._exit(0)
