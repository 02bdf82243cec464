"""A client's session with the master: what both client APIs share.

    user thread                                   I/O thread (cw.conn.peer.Connection) and,
                                                  for lane results, the inbox thread
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

The lane (cw.client.lane): once the master names a worker on this machine (LANE), a lone
job (nothing else in flight, default options, arguments up to 1 MB) goes straight to it from
the submitting thread and its result comes straight back to the inbox. A job on the lane
stays in ``jobs``
until settled: BOUNCE (the worker was busy), LANE_LOST (it left or died), its worker's
connection closing, or a master restart send it again through the master; the first outcome
to arrive wins. Cancelling it answers False (it may run).

A function is pickled once while it lives (cw.client.functions) and its blob travels to the
master once; jobs afterwards name it by digest. Results arriving twice are dropped by seq.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from cw import protocol as P
from cw import serialize
from cw.client.functions import FunctionCache
from cw.client.lane import DIGESTS_KEPT, LaneClient
from cw.client.outcomes import decode_outcome
from cw.conn import address
from cw.conn.alias import Alias
from cw.conn.peer import DEFAULT_CONNECT_TIMEOUT, Connection, check_size, peer_info
from cw.defaults import DEFAULT_MASTER_TIMEOUT
from cw.errors import (
    MasterLost,
)

log = logging.getLogger(__name__)



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
                 master_timeout: float = DEFAULT_MASTER_TIMEOUT, insecure: bool = False,
                 share: float = 1.0):
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
        self.functions = FunctionCache()          # pickled once per function while it lives
        self.master_has: set[bytes] = set()       # digests sent (under lock; cleared past
        # DIGESTS_KEPT, so millions of distinct partials cost no memory here: a function in
        # use is then sent to the master once more, which ships it to a worker once still)
        self.cancels: dict[int, asyncio.Future] = {}  # seq -> its answer (I/O thread only)
        self.seqs = itertools.count(1)
        self.closed = False
        self.lane = LaneClient(self)  # lone jobs straight to a worker on this machine
        info = peer_info(cwd=os.getcwd(), path=[p for p in sys.path if isinstance(p, str)])
        if share != 1.0:
            info["share"] = float(share)  # its weight in the master's fair share
        self.conn = Connection(self.host, self.port, "client", info, self._on_message,
                               on_welcome=self._on_welcome, on_silence=self._on_silence,
                               logger=log, on_begin=self.lane.open_inbox, insecure=insecure)
        self.conn.start(connect_timeout)
        self.alias = Alias(self.conn)  # a lone job leaves from the submitting thread

    # ---------------------------------------------------------------- user side
    def submit(self, func: Callable, args: tuple, kwargs: dict, token: Any,
               opts: dict | None = None) -> int:
        """Queue one call; raise SerializationError at once if it will not pickle."""
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        digest, blob, name = self.functions.get(func)
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
            if lone and opts is None and self.lane.send(job):
                pass  # straight to a worker
            elif lone and digest in self.master_has:  # its function went ahead
                self.alias.send(self._message([job]))  # no batch to wait for: send it here
            else:
                self.unsent.append(job)
                self._ask_flush()
        return seq

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
        asked: list[int] = []
        with self.lock:
            unsent = {j.seq for j in self.unsent} | {j.seq for j in self.held}
            for seq in seqs:
                if seq in unsent:
                    answers[seq] = True
                elif seq in self.lane.jobs:
                    answers[seq] = False  # on its way to a worker, or running there
                elif seq in self.jobs and not self.conn.in_io_thread() and \
                        self.deliverer != threading.get_ident():  # (a callback can't wait)
                    asked.append(seq)
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
            answers.update(self._ask_master(asked, False, timeout))
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
            asked = [seq for seq in self.jobs if seq not in self.lane.jobs]
        if asked and not self.conn.in_io_thread():
            answers.update(self._ask_master(asked, True, timeout))
        return answers

    def _ask_master(self, seqs: list[int], queued_only: bool, timeout: float
                    ) -> dict[int, bool]:
        """Run the cancel round trip on the I/O thread and wait for its answers (all False
        if the connection is gone meanwhile)."""
        try:
            return self.conn.run(self._cancel_round_trip(seqs, queued_only, timeout),
                                 timeout + 5.0)
        except (FutureTimeout, TimeoutError, RuntimeError):
            return dict.fromkeys(seqs, False)

    async def _cancel_round_trip(self, seqs: list[int], queued_only: bool, timeout: float
                                 ) -> dict[int, bool]:
        """CANCEL to the master, then its answers: True only for a job removed before it
        started. One not answered within ``timeout`` is False; its late answer then settles
        the job itself (``_cancelled``)."""
        loop = asyncio.get_running_loop()
        waiting = {seq: self.cancels.setdefault(seq, loop.create_future()) for seq in seqs}
        if queued_only:
            self.flush()  # what is unsent goes first, so the master can feed idle workers
        self.conn.send([P.pack(P.CANCEL, seqs, True)] if queued_only else
                       [P.pack(P.CANCEL, seqs)])
        await asyncio.wait(list(waiting.values()), timeout=timeout)
        answers = {}
        for seq, answer in waiting.items():
            answers[seq] = answer.done() and not answer.cancelled() and answer.result()
            if not answer.done():
                answer.cancel()  # the asker gave up: a late answer settles the job
        return answers

    def close(self) -> None:
        """Leave the master; unsettled jobs are dropped there."""
        if not self.closed:
            self.closed = True
            with self.lock:
                self.alias.close()
                self.lane.drop()
            self.conn.close()

    def _ask_flush(self) -> None:  # under lock
        if not self.flush_asked:
            self.flush_asked = True
            self.conn.call(self.flush)

    # ---------------------------------------------------------------- I/O thread
    def flush(self) -> None:
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
            self.results(header[1], header[2], frames)
        elif kind == P.CANCELLED:
            self._cancelled(header[1])
        elif kind == P.LANE:
            self.lane.granted(header[1], header[2])
        elif kind == P.LANE_LOST:
            self.lane.lost(header[1], header[2], header[3])
        else:
            log.warning("dropped a message of unexpected kind %s from the master", kind)

    def results(self, started: list, done: list, frames: list) -> None:
        """Deliver outcomes (I/O or inbox thread), one delivery at a time."""
        with self.delivering:
            self.deliverer = threading.get_ident()
            try:
                self._deliver(started, done, frames)
            finally:
                self.deliverer = None
        self.functions.forget_dead()
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

    def _admit_and_flush(self) -> None:
        """Results freed room in the byte window: send held jobs that now fit."""
        if self.held and not self.conn.in_io_thread():
            self.conn.call(self._admit_and_flush)
        elif self.held:
            with self.lock:
                moved = self._admit()
            if moved:
                self.flush()

    def _cancelled(self, answers: list) -> None:
        """Answers to our CANCELs (I/O thread); one we never asked for is ignored (it would
        drop a job whose future then never settles). A job cancelled after its asker
        stopped waiting is settled with CancelledError."""
        late = []
        for seq, ok in answers:
            answer = self.cancels.pop(seq, None)
            if answer is None:
                log.warning("ignored a cancel answer for job %r that we did not ask for", seq)
                continue
            with self.lock:
                job = self.jobs.pop(seq, None) if ok else None
                if job is not None:
                    self._settled(job)
            if answer.done():  # the asker gave up waiting
                if job is not None:
                    late.append(job)
            else:
                answer.set_result(bool(ok))
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
            self.lane.forget_all()  # what was on it is resubmitted below with the rest
            self.unsent = sorted((j for j in self.jobs.values() if not j.held),
                                 key=lambda j: j.seq)
            waiters, self.cancels = self.cancels, {}
        for answer in waiters.values():
            if not answer.done():
                answer.set_result(False)  # unknown: answer "not cancelled"
        log.warning("master restarted; resubmitting %d unfinished jobs", len(self.unsent))
        self.flush()

    def _on_silence(self, seconds: float) -> None:
        if seconds < self.master_timeout or not self.jobs:
            return
        with self.lock:
            lost, self.jobs, self.unsent = list(self.jobs.values()), {}, []
            self.held.clear()
            self.lane.jobs.clear()
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
