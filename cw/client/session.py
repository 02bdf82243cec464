"""A client's session with the master: what both client APIs share.

    user thread                                   I/O thread (cw.peer.Connection) and, for
                                                  lane results, the inbox thread (cw.lane)
    submit(func, args) --pickle here-->  unsent --flush: one SUBMIT per turn-->  master
                         jobs[seq] (kept until settled: resubmitted if the master restarts)
                                                  <--RESULTS: started seqs, done [seq, status]--
    on_started(token) / on_done(token, error, value)   <-- decoded here, once per seq, one
                                                          call at a time (``delivering``)
    cancel(seqs): round trip through the master and the worker holding the job: True only
                  if the job was removed before it started, so it will never run
    cancel_queued(): shutdown(cancel_futures=True): unsent jobs go first, then the master
                  feeds idle workers and cancels only what is still queued (CANCEL with
                  queued_only); what a worker holds runs, as in ProcessPoolExecutor

Byte window: the master keeps what it is sent in memory until a worker takes it, so a client
keeps at most ``window()`` bytes of arguments there (``protocol.window``: WINDOW_PER_WORKER per
connected worker, at least WINDOW_MIN; one job always fits). Jobs beyond it wait in ``held`` (they
reference the caller's data, so this costs no copy) and leave, in order, as results free room.
Small jobs never reach it: 20,000 no-op jobs are under 1 MB.

The lane (cw.lane): once the master names a worker on this machine (LANE), a lone job (nothing
else in flight, default options, arguments up to 1 MB) goes straight to it from the submitting
thread and its result comes straight back to ``inbox``. A job on the lane stays in ``jobs``
until settled: BOUNCE (the worker was busy), LANE_LOST (it left or died), its worker's
connection closing, or a master restart send it again through the master; the first outcome
to arrive wins. Cancelling it answers False (it may run).

A function object is pickled once per session (cached by identity) and its blob travels to
the master once; jobs afterwards name it by digest. Results arriving twice are dropped by seq.
The cache holds a function only weakly: once the caller lets go of it (a bound method, a
partial) and its jobs are settled, nothing here keeps it or what it references alive. A
function that cannot be weakly referenced is pickled again on each submit (same digest, so it
still travels once).
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from typing import Any

import msgpack

from cw import protocol as P
from cw import serialize
from cw.conn import address, lane
from cw.conn.peer import DEFAULT_CONNECT_TIMEOUT, Alias, Connection, check_size, peer_info
from cw.defaults import DEFAULT_MASTER_TIMEOUT
from cw.errors import (
    MasterLost,
    ProtocolError,
    RemoteException,
    RemoteTraceback,
    SerializationError,
)

log = logging.getLogger(__name__)

FUNCTION_CACHE = 512
DIGESTS_KEPT = 10_000          # digests remembered as sent; beyond, forgotten (sent again)
LANE_TIMEOUT = 5.0             # seconds a lone job may wait to enter a worker's lane
LANE_MAX_BYTES = 1 << 20       # larger arguments go through the master (zero-copy there)


class ClientJob:
    __slots__ = ("seq", "token", "digest", "blob", "frames", "opts", "size", "held")

    def __init__(self, seq, token, digest, blob, frames, opts, size):
        self.seq, self.token, self.digest, self.blob = seq, token, digest, blob
        self.frames, self.opts = frames, opts
        self.size = size  # bytes of its argument frames
        self.held = False  # waiting in the client for room in the byte window


class Session:
    """Submit jobs, get their outcomes through two callbacks (run in the I/O thread)."""

    def __init__(self, host: str | None, port: int | None,
                 on_started: Callable[[Any], None],
                 on_done: Callable[[Any, BaseException | None, Any], None],
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 master_timeout: float = DEFAULT_MASTER_TIMEOUT, insecure: bool = False):
        self.host, self.port = address.resolve(host, port)
        self.on_started = on_started
        self.on_done = on_done
        self.master_timeout = master_timeout
        self.lock = threading.Lock()
        self.delivering = threading.Lock()        # callbacks run one at a time
        self.deliverer: int | None = None      # the thread running them now
        self.jobs: dict[int, ClientJob] = {}      # unsettled jobs, by seq
        self.unsent: list[ClientJob] = []
        self.held: deque[ClientJob] = deque()     # beyond the byte window, in order
        self.inflight = 0                          # argument bytes sent and not settled
        self.flush_asked = False
        # id(func) -> (weakref to func, digest, blob, name); entries of collected functions
        # are dropped from dead_functions (their weakref callbacks only append there)
        self.functions: OrderedDict[int, tuple] = OrderedDict()
        self.dead_functions: deque[tuple[int, weakref.ref]] = deque()
        self.functions_lock = threading.Lock()
        self.master_has: set[bytes] = set()       # digests sent (under lock; cleared past
        # DIGESTS_KEPT, so millions of distinct partials cost no memory here: a function in
        # use is then sent to the master once more, which ships it to a worker once still)
        self.cancels: dict[int, list] = {}        # seq -> [event, answer]
        self.seqs = itertools.count(1)
        self.closed = False
        # the lane (under lock): a worker's socket path, our id there, a connection to it
        self.inbox: str | None = None          # where lane results come (I/O thread)
        self.lane: str | None = None
        self.lane_cid = 0
        self.lane_sock: socket.socket | None = None  # to the worker's lane
        self.lane_has: set[bytes] = set()         # digests sent on this lane
        self.on_lane: dict[int, tuple[ClientJob, str]] = {}  # seq -> (job, lane endpoint)
        info = peer_info(cwd=os.getcwd(), path=[p for p in sys.path if isinstance(p, str)])
        self.conn = Connection(self.host, self.port, "client", info, self._on_message,
                               on_welcome=self._on_welcome, on_silence=self._on_silence,
                               logger=log, on_begin=self._open_inbox, insecure=insecure)
        self.conn.start(connect_timeout)
        self.alias = Alias(self.conn)  # a lone job leaves from the submitting thread

    # ---------------------------------------------------------------- user side
    def submit(self, func: Callable, args: tuple, kwargs: dict, token: Any,
               opts: dict | None = None) -> int:
        """Queue one call; raise SerializationError at once if it will not pickle."""
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        digest, blob, name = self._function(func)
        frames = serialize.dumps_call(args, kwargs, f"the arguments of {name}")
        sizes = [len(f) for f in frames]  # bytes, and 1-D byte views of large buffers
        limit = self.conn.max_message_size
        if limit > 0 and (len(blob) > limit or max(sizes) > limit):
            check_size([blob], limit, f"the pickled function {name}")
            check_size(frames, limit, f"a pickled argument of {name}")
        with self.lock:
            seq = next(self.seqs)
            job = ClientJob(seq, token, digest, blob, frames, opts, sum(sizes))
            lone = not self.jobs and not self.unsent and not self.flush_asked
            self.jobs[seq] = job
            if self.held or not self._fits(job.size):
                job.held = True
                self.held.append(job)
                return seq
            self.inflight += job.size
            if lone and opts is None and self._to_lane(job):
                pass  # straight to a worker
            elif lone and digest in self.master_has:  # its function went ahead
                self.alias.send(self._message([job]))  # no batch to wait for: send it here
            else:
                self.unsent.append(job)
                self._ask_flush()
        return seq

    def _to_lane(self, job: ClientJob) -> bool:
        """Send a lone job on the lane (under lock); False if there is none or it is not
        connected (yet, or any more): then it goes through the master."""
        if self.lane_sock is None or self.lane is None:  # (both are set together)
            return False
        has_blob = job.digest not in self.lane_has
        if has_blob and len(self.lane_has) >= DIGESTS_KEPT:
            self.lane_has.clear()
        if job.size + (len(job.blob) if has_blob else 0) > LANE_MAX_BYTES:
            return False
        header = P.pack(P.LJOB, self.lane_cid, job.seq, job.digest, len(job.frames),
                        self.inbox, has_blob)
        frames = [header, job.blob, *job.frames] if has_blob else [header, *job.frames]
        try:
            lane.send(self.lane_sock, frames)
        except OSError as exc:  # the worker is gone or stuck: part of it may have gone,
            log.info("lane to %s failed (%s); using the master", self.lane, exc)
            self._drop_lane()  # so this connection is done for (the worker drops the part)
            return False
        if has_blob:
            self.lane_has.add(job.digest)
        self.on_lane[job.seq] = (job, self.lane)
        return True

    def _drop_lane(self) -> None:  # under lock
        if self.lane_sock is not None:
            self.lane_sock.close()
        self.lane, self.lane_sock = None, None

    def pending(self) -> int:
        """Jobs submitted and not yet settled."""
        return len(self.jobs)

    def window(self) -> int:
        """Most argument bytes this client keeps at the master (see the module docstring)."""
        return P.window(self.conn.master_workers)

    def _fits(self, size: int) -> bool:  # under lock
        return not self.inflight or self.inflight + size <= self.window()

    def _settled(self, job: ClientJob) -> None:  # under lock, job just left self.jobs
        if not job.held:
            self.inflight -= job.size

    def _admit(self) -> bool:
        """Move held jobs that now fit to the unsent batch (under lock); True if any moved."""
        moved = False
        while self.held and self._fits(self.held[0].size):
            job = self.held.popleft()
            job.held = False
            self.inflight += job.size
            self.unsent.append(job)
            moved = True
        return moved

    def cancel(self, seqs: Iterable[int], timeout: float = 10.0) -> dict[int, bool]:
        """Cancel jobs; a job maps to True only if it was removed before it started."""
        answers: dict[int, bool] = {}
        asked: dict[int, list] = {}
        with self.lock:
            unsent = {j.seq for j in self.unsent} | {j.seq for j in self.held}
            for seq in seqs:
                if seq in unsent:
                    answers[seq] = True
                elif seq in self.on_lane:
                    answers[seq] = False  # on its way to a worker, or running there
                elif seq in self.jobs and not self.conn.in_io_thread() and \
                        self.deliverer != threading.get_ident():  # (a callback can't wait)
                    asked[seq] = self.cancels.setdefault(seq, [threading.Event(), False])
                else:
                    answers[seq] = False
            if unsent & answers.keys():
                self.unsent = [j for j in self.unsent if j.seq not in answers]
                self.held = deque(j for j in self.held if j.seq not in answers)
                for seq in unsent & answers.keys():
                    self._settled(self.jobs.pop(seq))
                if self._admit():
                    self._ask_flush()
        if asked:
            self.conn.call(self.conn.send, [P.pack(P.CANCEL, list(asked))])
            answers.update(self._answers(asked, timeout))
        return answers

    def cancel_queued(self, timeout: float = 10.0) -> dict[int, bool]:
        """Cancel every job no worker holds yet (``shutdown(cancel_futures=True)``), as
        ProcessPoolExecutor does: jobs beyond the byte window are dropped here; the rest are
        sent, then the master feeds its idle workers and cancels what is still queued. A job
        maps to True if it was cancelled; the others run (their outcomes follow)."""
        with self.lock:
            answers = {job.seq: True for job in self.held}
            for job in self.held:
                self._settled(self.jobs.pop(job.seq))
            self.held.clear()
            asked = {seq: self.cancels.setdefault(seq, [threading.Event(), False])
                     for seq in self.jobs if seq not in self.on_lane}
        if asked and not self.conn.in_io_thread():
            self.conn.call(self._send_cancel_queued, list(asked))
            answers.update(self._answers(asked, timeout))
        return answers

    def _send_cancel_queued(self, seqs: list) -> None:
        self._flush()  # what is unsent goes first, so the master can feed idle workers
        self.conn.send([P.pack(P.CANCEL, seqs, True)])

    def _answers(self, asked: dict[int, list], timeout: float) -> dict[int, bool]:
        """Wait (``timeout`` seconds in all) for the master's cancel answers; False if none.
        From then on a late answer settles its job itself (``_cancelled``)."""
        deadline = time.monotonic() + timeout
        answers = {}
        for seq, waiter in asked.items():
            waiter[0].wait(max(0.0, deadline - time.monotonic()))
            with self.lock:
                answers[seq] = waiter[1]
                waiter[0].set()
        return answers

    def close(self) -> None:
        """Leave the master; unsettled jobs are dropped there."""
        if not self.closed:
            self.closed = True
            with self.lock:
                self.alias.close()
                self._drop_lane()
            self.conn.close()

    def _function(self, func: Callable) -> tuple[bytes, bytes, str]:
        """``(digest, blob, name)`` of a function, pickled once while it lives (and stays
        among the FUNCTION_CACHE last used)."""
        key = id(func)
        with self.functions_lock:
            self._forget_dead_functions()
            cached = self.functions.get(key)
            if cached is not None and cached[0]() is func:
                self.functions.move_to_end(key)
                return cached[1:]
        digest, blob = serialize.dumps_function(func)
        name = _name(func)
        try:
            ref = weakref.ref(func, _on_collected(self.dead_functions, key))
        except TypeError:  # not weakly referenceable: never cached, so never kept alive
            return digest, blob, name
        with self.functions_lock:
            self.functions[key] = (ref, digest, blob, name)
            if len(self.functions) > FUNCTION_CACHE:
                self.functions.popitem(last=False)
        return digest, blob, name

    def _forget_dead_functions(self) -> None:  # under functions_lock
        """Drop the cache entries (and pickled blobs) of functions collected since."""
        while self.dead_functions:
            key, ref = self.dead_functions.popleft()
            cached = self.functions.get(key)
            if cached is not None and cached[0] is ref:
                del self.functions[key]

    def _ask_flush(self) -> None:  # under lock
        if not self.flush_asked:
            self.flush_asked = True
            self.conn.call(self._flush)

    # ---------------------------------------------------------------- I/O thread
    def _flush(self) -> None:
        with self.lock:  # sent under the lock too, so a lone job never overtakes a batch
            self.flush_asked = False
            batch, self.unsent = self.unsent, []
            if batch:
                self.conn.send(self._message(batch))

    def _message(self, batch: list[ClientJob]) -> list:
        """One SUBMIT message; a function goes along the first time only (under lock)."""
        fns, fn_frames, entries, frames = [], [], [], []
        for job in batch:
            if job.digest not in self.master_has:
                if len(self.master_has) >= DIGESTS_KEPT:
                    self.master_has.clear()
                self.master_has.add(job.digest)
                fns.append(job.digest)
                fn_frames.append(job.blob)
            entries.append([job.seq, job.digest, len(job.frames), job.opts])
            frames.extend(job.frames)
        return [P.pack(P.SUBMIT, fns, entries), *fn_frames, *frames]

    def _on_message(self, kind: int, header: list, frames: list) -> None:
        if kind == P.RESULTS:
            self._results(header[1], header[2], frames)
        elif kind == P.CANCELLED:
            self._cancelled(header[1])
        elif kind == P.LANE:
            self._lane_granted(header[1], header[2])
        elif kind == P.LANE_LOST:
            self._lane_lost(header[1], header[2], header[3])
        else:
            log.warning("dropped a message of unexpected kind %s from the master", kind)

    def _results(self, started: list, done: list, frames: list) -> None:
        with self.delivering:
            self.deliverer = threading.get_ident()
            try:
                self._deliver(started, done, frames)
            finally:
                self.deliverer = None
        if self.dead_functions:
            with self.functions_lock:
                self._forget_dead_functions()
        self._admit_and_flush()

    def _deliver(self, started: list, done: list, frames: list) -> None:
        jobs = self.jobs
        for seq in started:
            job = jobs.get(seq)
            if job is not None:
                self._call(self.on_started, job.token)
        pos = 0
        for seq, status, n in done:
            payload = frames[pos:pos + n]
            pos += n
            with self.lock:
                job = jobs.pop(seq, None)
                if job is not None:
                    self._settled(job)
            if job is None:
                continue  # delivered already (resubmitted after a master restart)
            error, value = decode_outcome(status, payload, job.seq)
            self._call(self.on_done, job.token, error, value)

    def _open_inbox(self) -> None:
        """Bind the inbox for lane results before the first HELLO (which says we have one)."""
        self.inbox = self.conn.listen("inbox", self._on_inbox, self._on_inbox_closed)
        if self.inbox:
            self.conn.info["inbox"] = True

    def _on_inbox(self, frames: list) -> None:
        """A lane job's outcome, its "started" note, or a BOUNCE (inbox thread); bad input
        is dropped."""
        try:
            header = P.unpack(frames[0])
            kind, seq = header[0], header[1]
            if not isinstance(seq, int):
                raise ProtocolError("no job number")
            if kind == P.LRESULT:
                status, n = header[2], header[3]
                if not isinstance(status, int) or n != len(frames) - 1:
                    raise ProtocolError("LRESULT frame count does not match its header")
                with self.lock:
                    self.on_lane.pop(seq, None)
                self._results([], [[seq, status, n]], frames[1:])
            elif kind == P.LSTARTED:
                self._results([seq], [], [])
            elif kind == P.BOUNCE:
                self.conn.call(self._resend_from_lane, [seq], None)
            else:
                raise ProtocolError(f"unexpected kind {kind}")
        except (ProtocolError, ValueError, TypeError, IndexError) as exc:
            log.warning("dropped a bad message on the inbox: %s", exc)

    def _on_inbox_closed(self, peer: str) -> None:
        """A worker's connection to our inbox closed (inbox thread)."""
        self.conn.call(self._lane_closed, peer)

    def _lane_closed(self, peer: str) -> None:
        """The worker died, left, or gave up sending to us. The master's LANE_LOST says
        which (and charges a death); if none comes, resend anyway (it gave up)."""
        with self.lock:
            if self.lane == peer:
                self._drop_lane()
            waiting = any(ep == peer for _, ep in self.on_lane.values())
        if waiting:
            assert self.conn.loop is not None  # we run in it
            self.conn.loop.call_later(2 * self.conn.heartbeat_timeout, self._lane_lost, peer,
                                      "its connection closed", True)

    def _lane_granted(self, endpoint: str, cid: int) -> None:
        if not lane.is_endpoint(endpoint) or not isinstance(cid, int):
            raise ProtocolError("LANE needs a socket path and a client id")
        if self.closed or not self.inbox:
            return
        try:  # not under the lock: a stuck worker must not stall submitting threads
            sock = lane.connect(endpoint, self.inbox, LANE_TIMEOUT)
        except OSError as exc:
            log.info("cannot use the lane at %s: %s", endpoint, exc)
            return
        with self.lock:
            self._drop_lane()
            if self.closed:
                sock.close()
                return
            self.lane, self.lane_cid, self.lane_has = endpoint, cid, set()
            self.lane_sock = sock
        log.debug("lane to the worker at %s", endpoint)

    def _lane_lost(self, endpoint: str, why: str, graceful: bool) -> None:
        """The lane's worker left: what was on it goes through the master (a death is
        charged to the job there, as the master would have charged it)."""
        with self.lock:
            if self.lane == endpoint:
                self._drop_lane()
            seqs = [seq for seq, (_, ep) in self.on_lane.items() if ep == endpoint]
        self._resend_from_lane(seqs, None if graceful else str(why))

    def _resend_from_lane(self, seqs: list, loss: str | None) -> None:
        with self.lock:
            jobs = [self.on_lane.pop(seq)[0] for seq in seqs if seq in self.on_lane]
            jobs = [job for job in jobs if self.jobs.get(job.seq) is job]
            for job in jobs:
                if loss is not None:
                    job.opts = {"losses": [loss]}
            self.unsent[:0] = jobs
        if jobs:
            if loss is not None:
                log.warning("lost the lane's worker (%s); resending %d job(s) through the "
                            "master", loss, len(jobs))
            self._flush()

    def _admit_and_flush(self) -> None:
        """Results freed room in the byte window: send held jobs that now fit."""
        if self.held and not self.conn.in_io_thread():
            self.conn.call(self._admit_and_flush)
        elif self.held:
            with self.lock:
                moved = self._admit()
            if moved:
                self._flush()

    def _cancelled(self, answers: list) -> None:
        """Answers to our CANCELs; one we never asked for is ignored (it would drop a job
        whose future then never settles). A job cancelled after its asker stopped waiting
        is settled with CancelledError."""
        late = []
        for seq, ok in answers:
            with self.lock:
                waiter = self.cancels.pop(seq, None)
                job = self.jobs.pop(seq, None) if ok and waiter is not None else None
                if job is not None:
                    self._settled(job)
                if waiter is not None:
                    waiter[1] = bool(ok)
                    if waiter[0].is_set() and job is not None:  # the asker gave up waiting
                        late.append(job)
                    waiter[0].set()
            if waiter is None:
                log.warning("ignored a cancel answer for job %r that we did not ask for", seq)
        if late:
            with self.delivering:
                for job in late:
                    self._call(self.on_done, job.token,
                               CancelledError(f"job {job.seq} was cancelled"), None)
        self._admit_and_flush()

    def _on_welcome(self, restarted: bool) -> None:
        if not restarted:
            return
        with self.lock:
            self.master_has.clear()
            self._drop_lane()
            self.on_lane.clear()  # resubmitted below with the rest
            self.unsent = sorted((j for j in self.jobs.values() if not j.held),
                                 key=lambda j: j.seq)
            waiters, self.cancels = self.cancels, {}
        for waiter in waiters.values():
            waiter[0].set()  # unknown: answer "not cancelled"
        log.warning("master restarted; resubmitting %d unfinished jobs", len(self.unsent))
        self._flush()

    def _on_silence(self, seconds: float) -> None:
        if seconds < self.master_timeout or not self.jobs:
            return
        with self.lock:
            lost, self.jobs, self.unsent = list(self.jobs.values()), {}, []
            self.held.clear()
            self.on_lane.clear()
            self.inflight = 0
        error = MasterLost(f"the master at {self.conn.endpoint} has been silent for "
                           f"{seconds:.0f} s (master_timeout={self.master_timeout:g} s)")
        log.error("%s; failing %d jobs", error, len(lost))
        with self.delivering:
            for job in lost:
                self._call(self.on_done, job.token, error, None)

    @staticmethod
    def _call(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("a result callback raised")


def decode_outcome(status: int, payload: list, seq: int) -> tuple[BaseException | None, Any]:
    """Turn a RESULTS entry into ``(error, value)``; never raises."""
    try:
        if status == P.OK:
            return None, serialize.loads(payload, f"the result of job {seq}")
        if status == P.ERROR:
            return rebuild_error(payload), None
        return serialize.loads(payload, "the master's error"), None
    except SerializationError as exc:
        return exc, None
    except Exception as exc:  # a malformed payload
        return SerializationError(f"cannot decode the outcome of job {seq}: {exc}"), None


def rebuild_error(payload: list) -> BaseException:
    """The remote exception, with its remote traceback chained as the cause.

    The original type is re-created where it unpickles here; otherwise a RemoteException
    carries its type name, message and traceback.
    """
    blob, tb, meta = (bytes(getattr(f, "bytes", f)) for f in payload)
    type_name, message = msgpack.unpackb(meta, raw=False)
    text = tb.decode("utf-8", "replace")
    exc: Any = None
    if blob:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteException(type_name, message, text)
    exc.__cause__ = RemoteTraceback(text)
    try:
        exc.remote_traceback = text  # type: ignore[attr-defined]  # any type: set at run time
    except AttributeError:  # an exception type with __slots__
        pass
    return exc


def _on_collected(dead: deque, key: int) -> Callable[[weakref.ref], None]:
    """A weakref callback that only notes the entry (it may run in any thread, inside any
    allocation, so it takes no lock and touches no dict)."""
    return lambda ref: dead.append((key, ref))


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
