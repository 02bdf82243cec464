"""``python -m cw.worker [HOST] [-n N]``: processes that run jobs.

    supervisor (the command you start) --spawns, restarts if killed--> N worker processes

    one worker process:
      I/O thread (cw.peer.Connection)              main thread: loop()
        JOBS ----> pending deque (under lock) ---> pop: note "started", run in the client's
        CANCEL --> drop from pending if there        cwd with its sys.path in front
        FORGET --> drop a gone client's functions  result or remote traceback --> outbox
        flush <--- outbox (started, done, frames) <--- flush asked when idle or every few ms
        HEARTBEAT both ways, answered here, so a job holding the GIL never looks dead
      lane thread (cw.lane)
        LJOB from a client --> idle: pending; the main thread sends the result straight to
                               the client's inbox; lane jobs done --> outbox (for the counts)
                               busy: BOUNCE (from the I/O thread), the client resends it

Jobs run in the main thread so that SIGINT/SIGTERM interrupt a running job (WorkerShutdown);
the worker says BYE and the master re-queues what it held. A job's exception, or a function,
argument or result that will not (un)pickle, fails that one job; the worker lives on.

    supervisor <--- socketpair (--supervisor-fd), one per worker process ---> worker process
        "stop" ---> before it signals a stop (so a SIGTERM the job sent itself is a crash)
               <--- "refused" (the master refused us: not restarted), "recycle" (restart me)
        any exit without a note is a crash, whatever its exit code: restarted with back-off,
        and told to the master (DIED, on the supervisor's own connection, role "supervisor"),
        which charges the running job at once and names how it ended in WorkerLost
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence

import cloudpickle
import msgpack
from tornado.ioloop import PeriodicCallback

from cw import cli, serialize
from cw import protocol as P
from cw.conn import address, lane
from cw.conn.peer import Alias, Connection, check_size, peer_info
from cw.defaults import DEFAULT_SLOTS
from cw.errors import CwError, JobTimeout, MasterUnreachable, NoKeys, ProtocolError, SecurityError

log = logging.getLogger(__name__)

RESULT_TIMEOUT = 30.0      # seconds a lane result may wait for its client to read it
LANE_RESULT_MAX = 64 << 10  # larger lane results go through the master (they never block us)
FLUSH_INTERVAL = 0.025     # seconds a started/done note may wait (the I/O thread's tick)
FLUSH_MAX = 256            # notes that force a flush
TIMEOUT_GRACE = 2.0        # seconds a timed-out job gets to yield to the interrupt
# notes between a worker process and its supervisor (never exit codes: those are the job's)
NOTE_REFUSED = b"refused"  # the master refused us: the supervisor does not restart us
NOTE_RECYCLE = b"recycle"  # a planned restart (--max-jobs, --max-memory, a stuck timed-out job)
NOTE_STOP = b"stop"        # supervisor -> worker: the SIGTERM/SIGINT that follows is a stop
STOP_GRACE = 2.0           # seconds a signalled worker waits for the supervisor's "stop"


class WorkerShutdown(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM to stop the worker, even mid-job."""


class JobInterrupted(BaseException):
    """Raised in the main thread (by SIGUSR1 from the I/O thread) when a job's time is up."""


class LocalJob:
    __slots__ = ("cid", "seq", "digest", "frames", "opts", "epoch", "lane", "told",
                 "_interrupted")

    def __init__(self, cid: int, seq: int, digest: bytes, frames: list, opts, epoch: int,
                 lane: str | None = None):
        self.cid, self.seq, self.digest, self.frames, self.opts = cid, seq, digest, frames, opts
        self.epoch = epoch  # which registration with the master it came under
        self.lane = lane    # a lane job: the inbox of the client that sent it
        self.told = False   # a lane job's client was told it started
        self._interrupted = False  # SIGUSR1 sent for passing its timeout


class Worker:
    """One worker process: connects, registers and runs jobs until stopped."""

    def __init__(self, host: str | None = None, port: int | None = None,
                 slots: int = DEFAULT_SLOTS, max_jobs: int = 0, max_memory: float = 0.0,
                 link: SupervisorLink | None = None, insecure: bool = False):
        self.host, self.port = address.resolve(host, port)
        self.link = link  # to our supervisor (None: run by hand)
        self.slots = slots
        self.max_jobs = max_jobs          # recycle after this many jobs (0: never)
        self.max_memory = max_memory      # recycle when RSS passes this many MB (0: never)
        self.recycle = False
        self.current: LocalJob | None = None   # the running job (set under cond)
        self.deadline = 0.0                       # monotonic time it must end by, 0: none
        self.in_job = False                       # main thread is inside the job's code
        self.cond = threading.Condition()
        # shared with the I/O thread, guarded by cond
        self.pending: deque[LocalJob] = deque()
        self.contexts: dict[int, tuple[str, list]] = {}
        self.blobs: dict[tuple[int, bytes], object] = {}
        self.forgotten: list[int] = []
        self.out_started: list[list] = []
        self.out_done: list[list] = []
        self.out_frames: list = []
        self.out_since = 0.0
        self.out_busy = 0.0
        self.out_lane: list[list] = []   # lane jobs done [[cid, seq]]: the master counts them
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
        self.results_out: lane.Outlets | None = None  # lane results to client inboxes
        self.result_inboxes: dict[int, str] = {}      # cid -> its inbox, for FORGET
        # I/O thread only
        self.flusher: PeriodicCallback | None = None
        self.io_out: lane.Outlets | None = None    # BOUNCE and LSTARTED to client inboxes
        self.io_inboxes: dict[int, str] = {}
        info = peer_info(slots=slots, supervisor=os.getppid() if link else None)
        self.conn = Connection(self.host, self.port, "worker", info,
                               self._on_message, on_welcome=self._on_welcome, logger=log,
                               on_begin=self._open_lane, insecure=insecure)

    # ---------------------------------------------------------------- main thread
    def run(self, connect_timeout: float | None = None) -> None:
        """Register, then run jobs until SIGINT/SIGTERM or ``stop()``."""
        log.info("worker %s connecting to %s", self.conn.info["name"], self.conn.endpoint)
        self.conn.start(connect_timeout)
        self.alias = Alias(self.conn)  # results leave from this thread, on their own socket
        self.results_out = lane.Outlets(self.conn.info.get("lane", ""), RESULT_TIMEOUT)
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
            message = self._take_outbox()
        if message:
            self.alias.send(message)
        if self.conn.welcomed.is_set():
            self.alias.send([P.pack(P.BYE)])
        self.alias.close()
        if self.results_out is not None:
            self.results_out.close_all()
        if self.io_out is not None:
            self.conn.call(self.io_out.close_all)  # runs before the connection's shutdown
        self.conn.close(bye=False)

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()

    def loop(self) -> None:
        """Take jobs one by one, run them, note their outcome."""
        while True:
            with self.cond:
                while not self.pending and self.running:
                    self.cond.wait()
                if not self.running:
                    return
                job = self.pending.popleft()
                if job.lane is None:
                    self._note([[job.cid, job.seq]], [], [])
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
            with self.cond:
                self.current, self.deadline = None, 0.0
                if job.seq < 0 or job.epoch != self.epoch:
                    continue  # reported already (timed out), or an old master's job
                self._note([], [[job.cid, job.seq, status, len(frames)]], frames)
                self.out_busy += time.perf_counter() - began
                # flush when idle, or once half of what we held is done (low water): the
                # master refills us while we run the other half
                flush = len(self.out_done) >= len(self.pending) or len(self.out_done) >= FLUSH_MAX
                message = self._take_outbox() if flush else None
            if message:
                self.alias.send(message)
            if self._should_recycle():
                return

    def _lane_done(self, job: LocalJob, status: int, frames: list) -> None:
        """Send a lane job's outcome straight to its client (a large one through the master,
        so a client slow to read never stalls us); the master counts it from our note."""
        assert job.lane is not None and self.results_out is not None  # a lane job, run()
        with self.cond:
            self.current, self.deadline = None, 0.0
            known = job.cid in self.contexts  # else its client is gone (FORGET)
            # noted even then: the note is what ends a LANE_BUSY at the master
            self._note([], [], [], lane_done=[[job.cid, job.seq]])
            # a long one made the master hold back: tell it at once that we are free
            message = self._take_outbox() if job.told else None
        if message:
            self.alias.send(message)
        if not known:
            return
        if sum(memoryview(f).nbytes for f in frames) > LANE_RESULT_MAX:
            self.alias.send([P.pack(P.LANE_RESULT, job.cid, job.seq, status, len(frames)),
                             *frames])
            return
        self.result_inboxes[job.cid] = job.lane
        error = self.results_out.send(job.lane, [P.pack(P.LRESULT, job.seq, status,
                                                        len(frames)), *frames])
        if lane.unreachable(error):  # the master takes the lane back; the client resends
            self.alias.send([P.pack(P.LANE_REFUSED, job.cid)])

    def execute(self, job: LocalJob, context, blob) -> tuple[int, list]:
        """Run one job; return ``(status, frames)`` for the RESULTS message.

        ``in_job`` is True only inside the job's own code, so the timeout interrupt (a
        signal handled in this thread) can only land where it is caught here.
        """
        try:
            return self._execute(job, context, blob)
        except JobInterrupted:
            self.in_job = False
            return P.ERROR, error_frames(_timeout_error(job))

    def _execute(self, job: LocalJob, context, blob) -> tuple[int, list]:
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

    def _function(self, job: LocalJob, blob):
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
            inbox = self.result_inboxes.pop(cid, None)
            if inbox and self.results_out is not None:
                self.results_out.close(inbox)
            if self.current_cid == cid:
                self.current_cid = None
        self.forgotten.clear()

    # ---------------------------------------------------------------- outbox (under cond)
    def _note(self, started: list, done: list, frames: list, lane_done: Sequence = ()) -> None:
        if not self._has_notes():
            self.out_since = time.monotonic()
        self.out_started.extend(started)
        self.out_done.extend(done)
        self.out_frames.extend(frames)
        self.out_lane.extend(lane_done)

    def _has_notes(self) -> bool:
        return bool(self.out_started or self.out_done or self.out_lane)

    def _take_outbox(self) -> list | None:
        """The outbox as one RESULTS message (None if empty), emptied."""
        if not self._has_notes():
            return None
        header = P.pack(P.RESULTS, self.out_started, self.out_done, self.out_busy,
                        self.out_lane)
        message = [header, *self.out_frames]
        self.out_started, self.out_done, self.out_frames, self.out_lane = [], [], [], []
        self.out_busy = 0.0
        return message

    # ---------------------------------------------------------------- I/O thread
    def _wake_flusher(self) -> None:
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
        if self._has_notes() and now - self.out_since >= FLUSH_INTERVAL:
            self._flush()
        if self.deadline and now > self.deadline:
            self._time_up(now)
        with self.cond:  # told: decided under cond, so _lane_done sees it or no note goes
            job = self.current
            tell = job is not None and job.lane and not job.told and \
                now - self.current_since >= FLUSH_INTERVAL
            if tell and job is not None:  # (mypy does not narrow job through tell)
                job.told = True
        if tell and job is not None and job.lane is not None:
            # it runs on: its client may show it running, the master feeds others
            self._tell(job.cid, job.lane, P.LSTARTED, job.seq)
            self.conn.send([P.pack(P.LANE_BUSY, job.cid, job.seq)])
        with self.cond:
            idle = not self.pending and self.current is None and not self._has_notes()
            if idle:
                self.ticking = False
        if idle and self.flusher is not None:
            self.flusher.stop()

    def _time_up(self, now: float) -> None:
        """Interrupt a job past its deadline; if it will not yield, report and exit."""
        job = self.current
        if job is None:
            return
        if now < self.deadline + TIMEOUT_GRACE:
            if not job._interrupted:
                job._interrupted = True
                log.warning("job %d passed its timeout; interrupting it", job.seq)
                main = threading.main_thread().ident
                assert main is not None  # it runs us
                signal.pthread_kill(main, signal.SIGUSR1)
            return
        log.error("job %d ignores its timeout; reporting it and replacing this worker", job.seq)
        frames = error_frames(_timeout_error(job))
        with self.cond:
            self._note([], [[job.cid, job.seq, P.ERROR, len(frames)]], frames)
            job.seq = -1
            self.recycle = True
        self._flush()
        self.conn.send([P.pack(P.BYE)])
        self.conn.sock.close(linger=2000)
        if self.link is not None:
            self.link.tell(NOTE_RECYCLE)
        os._exit(0)

    def _flush(self) -> None:
        """Send the outbox from the I/O thread (old notes, and before BYE)."""
        with self.cond:
            message = self._take_outbox()
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
                    inbox = self.io_inboxes.pop(cid, None)
                    if inbox and self.io_out is not None:
                        self.io_out.close(inbox)
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
                jobs.append(LocalJob(cid, seq, digest, frames[pos:pos + n], opts, self.epoch))
                pos += n
            for cid, cwd, path in ctxs:
                self.contexts[cid] = (cwd, path)
            for (cid, digest), frame in zip(fns, frames):
                self.blobs[(cid, digest)] = frame
            self.pending.extend(jobs)
            self.cond.notify()
        self._wake_flusher()

    def _open_lane(self) -> None:
        """Bind our lane before the first HELLO, which tells the master where it is."""
        endpoint = self.conn.listen("lane", self._on_lane)
        if endpoint:
            self.conn.info["lane"] = endpoint
        self.io_out = lane.Outlets(endpoint or "", 0.0)  # never blocks the I/O thread

    def _on_lane(self, frames: list) -> None:
        """A client's lone job (lane thread): run it next if we are idle and know the client
        (its context and function), else BOUNCE it back: the client resends it through the
        master."""
        try:
            kind, cid, seq, digest, n, inbox, has_blob = P.unpack(frames[0])
            if kind != P.LJOB or not all(isinstance(x, int) for x in (cid, seq, n)) or \
                    not isinstance(digest, bytes) or n < 1 or not lane.is_endpoint(inbox) \
                    or len(frames) != 1 + bool(has_blob) + n:
                raise ProtocolError("not a well-formed LJOB")
        except (ProtocolError, ValueError, TypeError) as exc:
            log.warning("dropped a bad message on the lane: %s", exc)
            return
        body = frames[1:]
        with self.cond:
            known = cid in self.contexts
            if known and has_blob:
                self.blobs[(cid, digest)] = body[0]
            take = known and self.running and self.current is None and not self.pending \
                and (cid, digest) in self.blobs
            # the tick sends the lane note to the master, and LSTARTED if the job runs long
            wake = take and not self.ticking
            if take:
                self.ticking = True
                self.pending.append(LocalJob(cid, seq, digest, body[bool(has_blob):], None,
                                             self.epoch, lane=inbox))
                self.cond.notify()  # last: the main thread wakes to a released lock
        if wake:
            self.conn.call(self._wake_flusher)
        elif not take:
            self.conn.call(self._tell, cid, inbox, P.BOUNCE, seq)

    def _tell(self, cid: int, inbox: str, kind: int, seq: int) -> None:
        """A note to a lane job's client (I/O thread)."""
        self.io_inboxes[cid] = inbox
        assert self.io_out is not None  # _begin() made it, before any lane job came
        if lane.unreachable(self.io_out.send(inbox, [P.pack(kind, seq)])):
            self.conn.send([P.pack(P.LANE_REFUSED, cid)])

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
            self.out_started, self.out_done, self.out_frames = [], [], []
            self.out_busy = 0.0


def _timeout_error(job: LocalJob) -> JobTimeout:
    return JobTimeout(f"job {job.seq} ran longer than its timeout of "
                      f"{(job.opts or {}).get('timeout')} s and was stopped")


def rss_mb() -> float:
    """This process's resident memory in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def error_frames(exc: BaseException) -> list:
    """``[pickled exception or b"", traceback text, msgpack [type name, message]]``."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        blob = b""
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return [blob, text.encode("utf-8", "replace"), msgpack.packb([kind, str(exc)])]


# -------------------------------------------------------------------- processes
class SupervisorLink:
    """A worker process's end of the socketpair to its supervisor (``--supervisor-fd``)."""

    def __init__(self, fd: int):
        os.set_inheritable(fd, False)  # not for the job's own subprocesses
        self.sock = socket.socket(fileno=fd)
        self.parent = os.getppid()

    def tell(self, note: bytes) -> None:
        """Say why we exit (before exiting); any exit without a note is a crash."""
        try:
            self.sock.sendall(note)
        except OSError as exc:
            log.warning("cannot tell the supervisor %r: %s", note, exc)

    def stop_asked(self, timeout: float) -> bool:
        """Did the supervisor ask us to stop (or is it gone)? Waits up to ``timeout`` s for
        its note, which it sends just before the signal (a SIGTERM to the whole process
        group, from SLURM or Ctrl-C, may reach us before the supervisor has written it)."""
        deadline = time.monotonic() + timeout
        while os.getppid() == self.parent:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return False
            try:
                note = self.sock.recv(64)
            except OSError:
                return True
            if not note or NOTE_STOP in note:
                return True  # EOF: our supervisor is gone
        return True


def run_child(args: argparse.Namespace) -> None:
    """Body of one worker process. A SIGTERM/SIGINT stops it (the running job goes back to
    the queue) when it is a stop: the supervisor said so, or there is none. Otherwise the
    job sent it to its own process: that is a crash like any other, and we die of it."""
    link = SupervisorLink(args.supervisor_fd) if args.supervisor_fd is not None else None

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if link is not None and not link.stop_asked(STOP_GRACE):
            log.warning("got %s that nobody stopping us sent; dying of it",
                        signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise WorkerShutdown(signal.Signals(signum).name)

    def time_up(signum, frame):
        if worker.in_job:
            raise JobInterrupted()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGUSR1, time_up)
    worker = Worker(args.host, args.port, args.slots, args.max_jobs, args.max_memory, link,
                    args.insecure)
    try:
        worker.run(args.connect_timeout or None)
    except (ProtocolError, MasterUnreachable, SecurityError) as exc:
        log.error("%s", exc)
        note = NOTE_REFUSED
    except WorkerShutdown:
        note = b""
    else:
        note = NOTE_RECYCLE if worker.recycle else b""
    if link is not None and note:
        link.tell(note)


class Supervisor:
    """Starts N worker processes and keeps N running until told to stop.

    Each worker process gets one end of a socketpair: it notes there why it exits (refused,
    recycle); an exit without a note is a crash. A crash is told to the master at once
    (DIED, on our own connection), so the job it ran is charged without waiting for the
    heartbeat timeout, and its slot is restarted (with a back-off if it keeps dying).
    """

    def __init__(self, argv: list[str], n: int, host: str | None = None,
                 port: int | None = None, insecure: bool = False):
        self.argv = argv
        self.n = n
        self.children: dict[int, subprocess.Popen] = {}
        self.born: dict[int, float] = {}
        self.links: dict[int, socket.socket] = {}
        self.stopping = False
        self.quick_deaths = 0
        host, port = address.resolve(host, port)
        self.conn = Connection(host, port, "supervisor", peer_info(), self._on_message,
                               logger=log, insecure=insecure)
        self.reporting = False  # our connection is open (once the master's keys are here)

    def spawn(self) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "cw.worker", "--child",
                                     "--supervisor-fd", str(fd), *self.argv], pass_fds=[fd])
        finally:
            theirs.close()
        self.children[proc.pid] = proc
        self.born[proc.pid] = time.monotonic()
        self.links[proc.pid] = ours

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self.n):
            self.spawn()
        self._report_deaths()
        log.info("supervisor %d started %d workers: %s", os.getpid(), self.n,
                 " ".join(map(str, self.children)))
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            self._reap(pid, status)
        if self.reporting:
            self.conn.close()
        return 0

    def _report_deaths(self) -> bool:
        """Open our connection to the master if its keys are here (it registers in the
        background; a DIED waits behind its HELLO). Until then deaths wait for heartbeats."""
        if not self.reporting:
            try:
                self.conn.open(keys_timeout=0)
                self.reporting = True
            except NoKeys:
                log.info("no keys of the master yet: deaths are reported once they appear")
        return self.reporting

    def _on_message(self, kind: int, header: list, frames: list) -> None:
        log.warning("dropped a message of unexpected kind %s from the master", kind)

    def _note(self, pid: int) -> bytes:
        """What a worker process noted before it exited (b"": nothing, a crash)."""
        link = self.links.pop(pid)
        link.setblocking(False)
        note = b""
        try:
            while chunk := link.recv(256):
                note += chunk
        except OSError:  # nothing more (BlockingIOError), or a reset
            pass
        link.close()
        return note

    def _reap(self, pid: int, status: int) -> None:
        proc = self.children.pop(pid, None)
        if proc is None:
            return
        lived = time.monotonic() - self.born.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        note = self._note(pid)
        if self.stopping:
            return
        if NOTE_REFUSED in note:
            log.error("worker %d cannot work here (the master refused it or never "
                      "answered); not restarting it", pid)
            return
        if NOTE_RECYCLE in note:
            log.info("worker %d recycled; starting a fresh one", pid)
            return self.spawn()
        # a crash, whatever the exit code: the master charges the job it ran at once
        if self._report_deaths():
            self.conn.call(self.conn.send, [P.pack(P.DIED, pid, proc.returncode, lived)])
        self.quick_deaths = self.quick_deaths + 1 if lived < 1.0 else 0
        delay = min(30.0, 0.1 * 2 ** self.quick_deaths) if self.quick_deaths > 2 else 0.0
        log.warning("worker %d died (%s) after %.1f s; starting a new one%s", pid,
                    P.describe_exit(proc.returncode), lived,
                    f" in {delay:.1f} s (it keeps dying at start)" if delay else "")
        if delay:
            time.sleep(delay)  # back off, but never give the slot up
        if not self.stopping:
            self.spawn()

    def _stop(self, signum, frame) -> None:
        if not self.stopping:
            log.info("supervisor got %s; stopping %d workers", signal.Signals(signum).name,
                     len(self.children))
        self.stopping = True
        for pid, proc in self.children.items():
            try:  # first the note: a signal without it is one the job sent itself
                self.links[pid].send(NOTE_STOP)
            except OSError:
                pass
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        timer = threading.Timer(10.0, self._kill_stragglers)
        timer.daemon = True  # must not keep the supervisor alive once its children are gone
        timer.start()

    def _kill_stragglers(self) -> None:
        for proc in list(self.children.values()):
            if proc.poll() is None:
                log.warning("worker %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cw-worker", description=(
        "Run cw worker processes that take jobs from a cw master."))
    parser.add_argument("host", nargs="?", default=None,
                        help="the master's host[:port] (default: $CW_MASTER, else the "
                             "connection file $CW_HOME/default.json, else localhost)")
    cli.add_flag(parser, "--port", default=None, cast=int, help="the master's port (5494)")
    cli.add_flag(parser, "-n", "--processes", default=1, cast=int,
                 help="worker processes to run on this node")
    cli.add_flag(parser, "--slots", default=DEFAULT_SLOTS, cast=int,
                 help="jobs one worker holds at once: the running one plus prefetched ones")
    cli.add_flag(parser, "--max-jobs", default=0, cast=int,
                 help="restart a worker process after this many jobs (0: never)")
    cli.add_flag(parser, "--max-memory", default=0.0, cast=float,
                 help="restart a worker process, between jobs, once its RSS passes this "
                      "many MB (0: never)")
    cli.add_flag(parser, "--connect-timeout", default=0.0, cast=float,
                 help="give up if no master answers within this many seconds; 0 waits "
                      "for ever (also for its connection file: a worker never dials a "
                      "master without its keys)")
    cli.add_flag(parser, "--insecure", default=False, action="store_true",
                 help="if no connection file has the master's keys, talk plain TCP to it "
                      "(a loopback master started with --insecure only)")
    cli.add_logging_flags(parser)
    parser.add_argument("--slurm", action="store_true",
                        help="find the master through SLURM: $CW_HOME/default.json, else the "
                             "node of this user's running cmaster job in squeue")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one worker process, from the supervisor's."""
    argv = [args.host] if args.host else []
    for flag, value in (("--port", args.port), ("--slots", args.slots),
                        ("--max-jobs", args.max_jobs), ("--max-memory", args.max_memory),
                        ("--connect-timeout", args.connect_timeout),
                        ("--log-level", args.log_level), ("--log-file", args.log_file)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + ["--insecure"] * args.insecure


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.tune_malloc()
    cli.raise_fd_limit()
    role = "worker" if args.child else "supervisor"
    cli.setup_logging(args.log_level, args.log_file, f"{role} {os.uname().nodename}:{os.getpid()}")
    if args.child:
        run_child(args)
        sys.exit(0)
    if args.slurm and not args.host:
        from cw.launch import slurm
        args.host, args.port = slurm.find_master(args.connect_timeout or 300.0)
    try:
        supervisor = Supervisor(child_argv(args), max(1, args.processes), args.host,
                                args.port, args.insecure)
    except SecurityError as exc:  # e.g. --insecure to a master that is not on loopback
        sys.exit(f"cw-worker: {exc}")
    sys.exit(supervisor.run())

