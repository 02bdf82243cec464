"""One worker process: it runs jobs in the main thread, its I/O beside it.

      I/O thread (cw.conn.peer)              main thread: loop()
        JOBS ----> pending deque (under lock) ---> pop: note "started", run in the client's
        CANCEL --> drop from pending if there        cwd with its sys.path in front
        FORGET --> drop a gone client's functions  result or remote traceback --> outbox
        flush <--- outbox (started, done, frames) <--- flush asked when idle or every few ms
        HEARTBEAT both ways, answered here, so a job holding the GIL never looks dead
      lane thread (cw.worker.lane: LaneServer)
        LJOB from a client --> idle: pending; the main thread sends the result straight to
                               the client's inbox; lane jobs done --> outbox (for the counts)
                               busy: BOUNCE (from the I/O thread), the client resends it

Jobs run in the main thread so that SIGINT/SIGTERM interrupt a running job (WorkerShutdown);
the worker says BYE and the master re-queues what it held. A job's exception, or a function,
argument or result that will not (un)pickle, fails that one job; the worker lives on.

The supervisor (cw.worker.supervisor) started this process and restarts it if it dies.
Near its SLURM allocation's end, or on the drain signal, it drains (cw.worker.drain):
prefetched jobs go back (DRAIN), it finishes what runs, says BYE and is not restarted.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque

from tornado.ioloop import PeriodicCallback

from cw import protocol as P
from cw import serialize
from cw.conn import address
from cw.conn.alias import Alias
from cw.conn.peer import Connection, check_size, peer_info
from cw.defaults import DEFAULT_SLOTS
from cw.errors import CwError, ProtocolError
from cw.worker.deadline import JobInterrupted, time_up, timeout_error
from cw.worker.drain import Drain, drain_at, give_back
from cw.worker.lane import LaneServer
from cw.worker.outbox import FLUSH_INTERVAL, Outbox
from cw.worker.outcome import error_frames, rss_mb
from cw.worker.supervisor import SupervisorLink

log = logging.getLogger(__name__)



class WorkerShutdown(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to stop the worker, even mid-job."""


class Task:
    __slots__ = ("cid", "seq", "digest", "frames", "opts", "epoch", "lane", "told",
                 "interrupted")

    def __init__(self, cid: int, seq: int, digest: bytes, frames: list, opts, epoch: int,
                 lane: str | None = None):
        self.cid, self.seq, self.digest, self.frames, self.opts = cid, seq, digest, frames, opts
        self.epoch = epoch  # which registration with the master it came under
        self.lane = lane    # a lane job: the inbox of the client that sent it
        self.told = False   # a lane job's client was told it started
        self.interrupted = False  # SIGUSR1 sent for passing its timeout


class Worker:
    """One worker process: connects, registers and runs jobs until stopped."""

    def __init__(self, host: str | None = None, port: int | None = None,
                 slots: int = DEFAULT_SLOTS, max_jobs: int = 0, max_memory: float = 0.0,
                 link: SupervisorLink | None = None, insecure: bool = False,
                 drain: Drain | None = None, resources: dict[str, float] | None = None):
        self.host, self.port = address.resolve(host, port)
        self.drain = drain or Drain(slurm=False)  # its allocation's end (cw.worker.drain)
        self.link = link  # to our supervisor (None: run by hand)
        self.slots = slots
        self.max_jobs = max_jobs          # recycle after this many jobs (0: never)
        self.max_memory = max_memory      # recycle when RSS passes this many MB (0: never)
        self.recycle = False
        self.current: Task | None = None   # the running job (set under cond)
        self.deadline = 0.0                       # monotonic time it must end by, 0: none
        self.in_job = False                       # main thread is inside the job's code
        self.cond = threading.Condition()
        # shared with the I/O thread, guarded by cond
        self.pending: deque[Task] = deque()
        self.contexts: dict[int, tuple[str, list]] = {}
        self.blobs: dict[tuple[int, bytes], object] = {}
        self.forgotten: list[int] = []
        self.outbox = Outbox()           # notes to the master
        self.current_since = 0.0         # monotonic time the running job started
        self.ticking = False             # the I/O thread's flush tick runs (or is asked to)
        self.epoch = 0       # bumped when the master restarted or forgot us
        self.running = True
        # main thread only
        self.functions: dict[tuple[int, bytes], object] = {}
        self.current_cid: int | None = None
        self.base_path = list(sys.path)
        self.base_cwd = os.getcwd()
        self.jobs_done = 0
        # I/O thread only
        self.flusher: PeriodicCallback | None = None
        self.lane = LaneServer(self)  # lone jobs from clients on this machine
        info = peer_info(slots=slots, supervisor=os.getppid() if link else None,
                         **self.drain.info())
        if resources:
            info["resources"] = dict(resources)  # what this process offers (cw.resources)
        self.conn = Connection(self.host, self.port, "worker", info,
                               self._on_message, on_welcome=self._on_welcome, logger=log,
                               on_begin=self.lane.open, insecure=insecure)

    # ---------------------------------------------------------------- main thread
    def run(self, connect_timeout: float | None = None) -> None:
        """Register, then run jobs until SIGINT/SIGTERM or ``stop()``."""
        log.info("worker %s connecting to %s", self.conn.info["name"], self.conn.endpoint)
        self.conn.start(connect_timeout)
        self.alias = Alias(self.conn)  # results leave from this thread, on their own socket
        self.lane.start()
        if self.drain.end is not None:  # the margin before the allocation's end
            self.conn.call(drain_at, self)
        try:
            self.loop()
        except WorkerShutdown:
            log.info("worker %s stopping", self.conn.info["name"])
        finally:
            self._leave()
            log.info("worker %s stopped after %d jobs", self.conn.info["name"], self.jobs_done)

    def _leave(self) -> None:
        """Last outcomes, then BYE, on one socket (so in that order); the master re-queues
        whatever else we held. A BYE on the other socket could overtake the results."""
        with self.cond:
            message = self.outbox.take()
        if message:
            self.alias.send(message)
        if self.conn.welcomed.is_set():
            if self.drain.reason:  # why, on the BYE's socket: the master logs it first
                self.alias.send([P.pack(P.DRAIN, self.drain.reason, [])])
            self.alias.send([P.pack(P.BYE)])
        self.alias.close()
        self.lane.close()
        self.conn.close(bye=False)

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()

    def loop(self) -> None:
        """Take jobs one by one, run them, note their outcome."""
        while True:
            with self.cond:
                while not self.pending and self.running and not self.drain.reason:
                    self.cond.wait()
                if not self.running or (self.drain.reason and not self.pending):
                    return
                job = self.pending.popleft()
                late = "" if job.lane else self.drain.fits(job.cid, job.digest, job.opts)
                if late:  # it would outlive the allocation: back with the rest, and leave
                    self.pending.appendleft(job)
                    self.start_drain(late)
                    continue
                if job.lane is None:
                    self.outbox.note([[job.cid, job.seq]], [], [])
                context = self.contexts.get(job.cid)
                blob = self.blobs.get((job.cid, job.digest))
                self._forget_functions()
                self.current, self.current_since = job, time.monotonic()
                timeout = (job.opts or {}).get("timeout")
                self.deadline = time.monotonic() + timeout if timeout else 0.0
            began = time.perf_counter()
            status, frames = self.execute(job, context, blob)
            self.jobs_done += 1
            if job.lane is not None:
                self._lane_done(job, status, frames)
                if self._should_recycle():
                    return
                continue
            self.drain.learn(job.cid, job.digest, time.perf_counter() - began)
            with self.cond:
                self.current, self.deadline = None, 0.0
                if job.seq < 0 or job.epoch != self.epoch:
                    continue  # reported already (timed out), or an old master's job
                self.outbox.note([], [[job.cid, job.seq, status, len(frames)]], frames)
                self.outbox.busy += time.perf_counter() - began
                message = self.outbox.take() if self.outbox.full(len(self.pending)) else None
            if message:
                self.alias.send(message)
            if self._should_recycle():
                return

    def start_drain(self, reason: str) -> None:
        give_back(self, reason)  # any thread, once (cw.worker.drain)

    def _lane_done(self, job: Task, status: int, frames: list) -> None:
        """A lane job ended: note it (the master counts it, and it ends a LANE_BUSY), then
        the lane sends its outcome to the client."""
        with self.cond:
            self.current, self.deadline = None, 0.0
            known = job.cid in self.contexts  # else its client is gone (FORGET)
            self.outbox.note([], [], [], lane_done=[[job.cid, job.seq]])
            # a long one made the master hold back: tell it at once that we are free
            message = self.outbox.take() if job.told else None
        if message:
            self.alias.send(message)
        self.lane.done(job, status, frames, known)

    def execute(self, job: Task, context, blob) -> tuple[int, list]:
        """Run one job; return ``(status, frames)`` for the RESULTS message.

        ``in_job`` is True only inside the job's own code, so the timeout interrupt (a
        signal handled in this thread) can only land where it is caught here.
        """
        try:
            return self._execute(job, context, blob)
        except JobInterrupted:
            self.in_job = False
            return P.ERROR, error_frames(timeout_error(job))

    def _execute(self, job: Task, context, blob) -> tuple[int, list]:
        try:
            self.in_job = True
            self._enter(job.cid, context)
            func = self._function(job, blob)
            args, kwargs = serialize.loads(job.frames, "the job's arguments")
            result = func(*args, **kwargs)
            self.in_job = False
        except (WorkerShutdown, JobInterrupted):
            raise
        except BaseException as exc:  # the job's own failure, SystemExit included
            self.in_job = False
            return P.ERROR, error_frames(exc)
        try:
            frames = serialize.dumps_result(result, f"the result of job {job.seq}")
            check_size(frames, self.conn.max_message_size, f"the result of job {job.seq}")
            return P.OK, frames
        except CwError as exc:
            return P.ERROR, error_frames(exc)

    def _should_recycle(self) -> bool:
        reason = ""
        if self.max_jobs and self.jobs_done >= self.max_jobs:
            reason = f"{self.jobs_done} jobs done (--max-jobs {self.max_jobs})"
        elif self.max_memory and rss_mb() > self.max_memory:
            reason = f"RSS {rss_mb():.0f} MB above --max-memory {self.max_memory:g}"
        if reason:
            log.info("worker %s recycling: %s", self.conn.info["name"], reason)
            self.recycle = True
        return self.recycle

    def _function(self, job: Task, blob):
        key = (job.cid, job.digest)
        func = self.functions.get(key)
        if func is None:
            if blob is None:
                raise ProtocolError(f"job {job.seq} names a function this worker never got")
            func = self.functions[key] = serialize.loads([blob], "the job's function")
        return func

    def _enter(self, cid: int, context) -> None:
        """Switch to the client's working directory and sys.path (once per client switch)."""
        if cid == self.current_cid or context is None:
            return
        cwd, path = context
        try:
            os.chdir(cwd)
        except OSError as exc:
            log.warning("cannot enter the client's directory %s (%s); staying in %s",
                        cwd, exc, os.getcwd())
        sys.path[:] = list(dict.fromkeys([*path, *self.base_path]))
        self.current_cid = cid

    def _forget_functions(self) -> None:
        for cid in self.forgotten:
            for key in [k for k in self.functions if k[0] == cid]:
                del self.functions[key]
            self.lane.forget_results(cid)
            if self.current_cid == cid:
                self.current_cid = None
        self.forgotten.clear()

    # ---------------------------------------------------------------- I/O thread
    def wake_flusher(self) -> None:
        """Tick while the worker has jobs (they alone make notes and deadlines)."""
        with self.cond:
            self.ticking = True
        if self.flusher is None:
            self.flusher = PeriodicCallback(self._flush_if_old, FLUSH_INTERVAL * 1000)
        if not self.flusher.is_running():
            self.flusher.start()

    def _flush_if_old(self) -> None:
        """The tick: send notes that waited long enough, enforce the deadline, and stop
        ticking once idle (an idle worker then costs nothing but its heartbeats)."""
        now = time.monotonic()
        if self.outbox.old(now):
            self.flush()
        if self.deadline and now > self.deadline:
            time_up(self, now)
        with self.cond:  # told: decided under cond, so _lane_done sees it or no note goes
            job = self.current
            tell = job is not None and job.lane and not job.told and \
                now - self.current_since >= FLUSH_INTERVAL
            if tell and job is not None:  # (mypy does not narrow job through tell)
                job.told = True
        if tell and job is not None and job.lane is not None:
            self.lane.started_long(job)
        with self.cond:
            idle = not self.pending and self.current is None and not self.outbox.has_notes()
            if idle:
                self.ticking = False
        if idle and self.flusher is not None:
            self.flusher.stop()

    def flush(self) -> None:
        """Send the outbox from the I/O thread (old notes, and before BYE)."""
        with self.cond:
            message = self.outbox.take()
        if message:
            self.conn.send(message)

    def _on_message(self, kind: int, header: list, frames: list) -> None:
        if kind == P.JOBS:
            self._jobs(header[1], header[2], header[3], frames)
        elif kind == P.CANCEL:
            self._cancel(header[1])
        elif kind == P.FORGET:
            with self.cond:
                for cid in header[1]:
                    self.lane.forget_io(cid)
                    self.contexts.pop(cid, None)
                    for key in [k for k in self.blobs if k[0] == cid]:
                        del self.blobs[key]
                    self.forgotten.append(cid)
        else:
            log.warning("dropped a message of unexpected kind %s from the master", kind)

    def _jobs(self, ctxs: list, fns: list, entries: list, frames: list) -> None:
        pos = len(fns)
        jobs = []
        with self.cond:
            for cid, seq, digest, n, opts in entries:
                jobs.append(Task(cid, seq, digest, frames[pos:pos + n], opts, self.epoch))
                pos += n
            for cid, cwd, path in ctxs:
                self.contexts[cid] = (cwd, path)
            for (cid, digest), frame in zip(fns, frames):
                self.blobs[(cid, digest)] = frame
            if self.drain.reason:  # sent before it heard of our drain: straight back
                keys = [[j.cid, j.seq] for j in jobs]
                return self.conn.send([P.pack(P.DRAIN, self.drain.reason, keys)])
            self.pending.extend(jobs)
            self.cond.notify()
        self.wake_flusher()

    def take_lane_job(self, cid: int, seq: int, digest: bytes, body: list, has_blob: bool,
                      inbox: str) -> tuple[bool, bool]:
        """A lane job (lane thread): ``(taken, wake the tick)``. Taken only if we are idle
        and know its client and function; the tick then sends its note to the master."""
        with self.cond:
            known = cid in self.contexts
            if known and has_blob:
                self.blobs[(cid, digest)] = body[0]
            take = known and self.running and self.current is None and not self.pending \
                and (cid, digest) in self.blobs and not self.drain.reason
            wake = take and not self.ticking
            if take:
                self.ticking = True
                self.pending.append(Task(cid, seq, digest, body[has_blob:], None,
                                              self.epoch, lane=inbox))
                self.cond.notify()  # last: the main thread wakes to a released lock
        return take, wake

    def _cancel(self, entries: list) -> None:
        wanted = {(cid, seq) for cid, seq in entries}
        with self.cond:
            kept = deque(j for j in self.pending if (j.cid, j.seq) not in wanted)
            dropped = {(j.cid, j.seq) for j in self.pending} - {(j.cid, j.seq) for j in kept}
            self.pending = kept
        reply = [[cid, seq, (cid, seq) in dropped] for cid, seq in entries]
        self.conn.send([P.pack(P.CANCELLED, reply)])

    def _on_welcome(self, restarted: bool) -> None:
        if not restarted:
            return
        with self.cond:  # the new master knows nothing of what we held
            self.epoch += 1
            self.pending.clear()
            self.contexts.clear()
            self.blobs.clear()
            self.forgotten.extend({k[0] for k in self.functions})
            self.outbox.clear()
