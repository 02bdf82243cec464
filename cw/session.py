"""A client's session with the master: what both client APIs share.

    user thread                                   I/O thread (cw.peer.Connection)
    submit(func, args) --pickle here-->  unsent --flush: one SUBMIT per turn-->  master
                         jobs[seq] (kept until settled: resubmitted if the master restarts)
                                                  <--RESULTS: started seqs, done [seq, status]--
    on_started(token) / on_done(token, error, value)   <-- decoded here, once per seq
    cancel(seqs): round trip through the master and the worker holding the job: True only
                  if the job was removed before it started, so it will never run

Byte window: the master keeps what it is sent in memory until a worker takes it, so a client
keeps at most ``window()`` bytes of arguments there (``WINDOW_PER_WORKER`` per connected
worker, at least ``WINDOW_MIN``; one job always fits). Jobs beyond it wait in ``held`` (they
reference the caller's data, so this costs no copy) and leave, in order, as results free room.
Small jobs never reach it: 20,000 no-op jobs are under 1 MB.

A function object is pickled once per session (cached by identity) and its blob travels to
the master once; jobs afterwards name it by digest. Results arriving twice are dropped by seq.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import sys
import threading
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Optional

import msgpack

from . import address
from . import protocol as P
from . import serialize
from .errors import MasterLost, RemoteException, RemoteTraceback, SerializationError
from .peer import DEFAULT_CONNECT_TIMEOUT, Alias, Connection, check_size, peer_info

log = logging.getLogger("cw.client")

DEFAULT_MASTER_TIMEOUT = 120.0  # seconds a client waits for a silent master to come back
FUNCTION_CACHE = 512
WINDOW_PER_WORKER = 24 << 20   # argument bytes a client keeps at the master, per worker
WINDOW_MIN = 32 << 20


class ClientJob:
    __slots__ = ("seq", "token", "digest", "blob", "frames", "opts", "size", "held")

    def __init__(self, seq, token, digest, blob, frames, opts, size):
        self.seq, self.token, self.digest, self.blob = seq, token, digest, blob
        self.frames, self.opts = frames, opts
        self.size = size  # bytes of its argument frames
        self.held = False  # waiting in the client for room in the byte window


class Session:
    """Submit jobs, get their outcomes through two callbacks (run in the I/O thread)."""

    def __init__(self, host: Optional[str], port: Optional[int],
                 on_started: Callable[[Any], None],
                 on_done: Callable[[Any, Optional[BaseException], Any], None],
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 master_timeout: float = DEFAULT_MASTER_TIMEOUT):
        self.host, self.port = address.resolve(host, port)
        self.on_started = on_started
        self.on_done = on_done
        self.master_timeout = master_timeout
        self.lock = threading.Lock()
        self.jobs: dict[int, ClientJob] = {}      # unsettled jobs, by seq
        self.unsent: list[ClientJob] = []
        self.held: deque[ClientJob] = deque()     # beyond the byte window, in order
        self.inflight = 0                          # argument bytes sent and not settled
        self.flush_asked = False
        # id(func) -> (func, digest, blob, name)
        self.functions: OrderedDict[int, tuple] = OrderedDict()
        self.master_has: set[bytes] = set()       # digests sent (I/O thread only)
        self.cancels: dict[int, list] = {}        # seq -> [event, answer]
        self.seqs = itertools.count(1)
        self.closed = False
        info = peer_info(cwd=os.getcwd(), path=[p for p in sys.path if isinstance(p, str)])
        self.conn = Connection(self.host, self.port, "client", info, self._on_message,
                               on_welcome=self._on_welcome, on_silence=self._on_silence,
                               logger=log)
        self.conn.start(connect_timeout)
        self.alias = Alias(self.conn)  # a lone job leaves from the submitting thread

    # ---------------------------------------------------------------- user side
    def submit(self, func: Callable, args: tuple, kwargs: dict, token: Any,
               opts: Optional[dict] = None) -> int:
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
            lone = not self.jobs and not self.unsent and not self.flush_asked \
                and digest in self.master_has  # its function went ahead on the main socket
            self.jobs[seq] = job
            if self.held or not self._fits(job.size):
                job.held = True
                self.held.append(job)
                return seq
            self.inflight += job.size
            if lone:  # nothing in flight: no batch to wait for, send it from here
                self.alias.send(self._message([job]))
            else:
                self.unsent.append(job)
                self._ask_flush()
        return seq

    def pending(self) -> int:
        """Jobs submitted and not yet settled."""
        return len(self.jobs)

    def window(self) -> int:
        """Most argument bytes this client keeps at the master (see the module docstring)."""
        return max(WINDOW_MIN, WINDOW_PER_WORKER * self.conn.master_workers)

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
                elif seq in self.jobs and not self.conn.in_io_thread():
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
            for seq, waiter in asked.items():
                waiter[0].wait(timeout)
                answers[seq] = waiter[1]
        return answers

    def close(self) -> None:
        """Leave the master; unsettled jobs are dropped there."""
        if not self.closed:
            self.closed = True
            with self.lock:
                self.alias.close()
            self.conn.close()

    def _function(self, func: Callable) -> tuple[bytes, bytes, str]:
        """``(digest, blob, name)`` of a function, pickled once while it stays cached."""
        cached = self.functions.get(id(func))
        if cached is not None and cached[0] is func:
            self.functions.move_to_end(id(func))
            return cached[1:]
        digest, blob = serialize.dumps_function(func)
        entry = self.functions[id(func)] = (func, digest, blob, _name(func))
        if len(self.functions) > FUNCTION_CACHE:
            self.functions.popitem(last=False)
        return entry[1:]

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
        else:
            log.warning("dropped a message of unexpected kind %s from the master", kind)

    def _results(self, started: list, done: list, frames: list) -> None:
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
        self._admit_and_flush()

    def _admit_and_flush(self) -> None:
        """Results freed room in the byte window: send held jobs that now fit."""
        if self.held:
            with self.lock:
                moved = self._admit()
            if moved:
                self._flush()

    def _cancelled(self, answers: list) -> None:
        for seq, ok in answers:
            with self.lock:
                job = self.jobs.pop(seq, None) if ok else None
                if job is not None:
                    self._settled(job)
                waiter = self.cancels.pop(seq, None)
            if waiter is not None:
                waiter[1] = bool(ok)
                waiter[0].set()
        self._admit_and_flush()

    def _on_welcome(self, restarted: bool) -> None:
        if not restarted:
            return
        with self.lock:
            self.master_has.clear()
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
            self.inflight = 0
        error = MasterLost(f"the master at {self.conn.endpoint} has been silent for "
                           f"{seconds:.0f} s (master_timeout={self.master_timeout:g} s)")
        log.error("%s; failing %d jobs", error, len(lost))
        for job in lost:
            self._call(self.on_done, job.token, error, None)

    @staticmethod
    def _call(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("a result callback raised")


def decode_outcome(status: int, payload: list, seq: int) -> tuple[Optional[BaseException], Any]:
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
    blob, tb, meta = (getattr(f, "bytes", f) for f in payload)
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
        exc.remote_traceback = text
    except AttributeError:  # an exception type with __slots__
        pass
    return exc


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
