"""Named batches (campaigns): jobs that belong to a batch, not to a client (issue 14).

    client --BATCH_SUBMIT name--> Batches.submit: functions and jobs appended to the journal
        (cw.master.journal); the writer thread fsyncs them in groups --> on_durable -->
        ACKED to the client (its detach() waits for that)
    jobs --> the Scheduler, as jobs of the batch's pseudo-client (a ClientRecord whose route
        in Master.routes is a Sink, not a socket), a window of FEED_JOBS at a time: straight
        from the message when the window has room, else read back from the journal later
    Scheduler --RESULTS--> Sink --> outcomes(): journaled; once durable they are passed on to
        the clients that submit to the batch (their futures settle) and to waiters
    BATCH_OPEN / LIST / STATUS / FETCH / CANCEL / FORGET (cw.master.batch_requests): each
        answered once what it saw is durable

One owner: the master's event loop. The journal holds the jobs and the outcomes; RAM holds,
per batch, the window of jobs fed to the scheduler and the ids of those (a ClientThread's job
ids), so a 1,000,000-job batch costs the journal's index (25 bytes a job), not its payloads.
Without --journal the journal lives in a temporary directory removed when the master stops:
batches then outlive their clients, not the master (the log and the status say so).

A job's function is journaled with the context of the client that submitted it (cwd and
sys.path, which the worker needs): its journal id is a digest of both.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import msgpack

from cw import protocol as P
from cw.errors import JournalFull, ProtocolError, UnknownBatch
from cw.master.batch_outbox import BatchOutbox
from cw.master.batch_requests import (
    BatchRequests,
    as_bytes,
    journal_has,
    pack_frames,
    remove_stale_tmp,
    unpack,
)
from cw.master.journal import Journal
from cw.master.records import ClientRecord

if TYPE_CHECKING:
    from cw.master.daemon import Master

log = logging.getLogger(__name__)

FEED_JOBS = 4096           # jobs of one batch the scheduler holds (queued or running)
PSEUDO = b"\0batch:"       # the identity prefix of a batch's pseudo-client
BATCH_KINDS = frozenset((P.BATCH_OPEN, P.BATCH_SUBMIT, P.BATCH_LIST, P.BATCH_STATUS,
                         P.BATCH_FETCH, P.BATCH_CANCEL, P.BATCH_FORGET))
_pack = msgpack.Packer(use_bin_type=True).pack


class Sink:
    """Stands for a socket in ``Master.routes``: what the Scheduler sends a batch's
    pseudo-client (RESULTS, CANCELLED, heartbeats) comes here."""

    def __init__(self, batches: Batches, name: str):
        self.batches, self.name = batches, name

    def send_multipart(self, frames: list, flags: int = 0, copy: bool = True) -> None:
        self.batches.from_scheduler(self.name, frames[1:])


class BatchState:
    """What the master keeps in RAM of one named batch."""

    __slots__ = ("name", "client", "cursor", "ids", "writer", "waiters")

    def __init__(self, name: str, client: ClientRecord):
        self.name = name
        self.client = client            # its pseudo-client: the scheduler's view of its jobs
        self.cursor: int | None = None  # the highest key fed to the scheduler
        self.ids: dict[int, object] = {}   # key -> a ClientThread job id, for fed jobs
        self.writer: bytes | None = None   # the client that opened it to submit
        self.waiters: list[list] = []   # [ident, rid, seen, timeout handle]: BATCH_STATUS waits


class Batches(BatchRequests, BatchOutbox):
    """Every named batch of one master, and its journal."""

    def __init__(self, master: Master, path: str | None = None,
                 max_bytes: int | None = None):
        self.master = master
        self.path = path
        self.max_bytes = max_bytes
        self.journal: Journal = None  # type: ignore[assignment]  # open() makes it
        self.tmp: str | None = None
        self.states: dict[str, BatchState] = {}
        self.bound: dict[bytes, str] = {}       # client identity -> the batch it submits to
        self.fids: dict[tuple[bytes, bytes], bytes] = {}  # (client, digest) -> journal fid
        self._after: deque[tuple[int, Callable[[], object]]] = deque()
        self._refill_asked = False
        self._backlog: dict[bytes, deque[list]] = {}  # client -> messages its queue refused
        self._retrying = False
        self._compacting = False
        self._compact_again = False
        self.loop = None

    @property
    def durable(self) -> bool:
        """Whether batches outlive this master (a --journal was given)."""
        return self.path is not None

    # ---------------------------------------------------------------- life cycle
    def open(self, loop) -> None:
        """Open the journal, rebuild its batches and queue their pending jobs again."""
        self.loop = loop
        path = self.path
        if path is None:
            remove_stale_tmp()
            path = self.tmp = tempfile.mkdtemp(prefix=f"cw-batches-{os.getpid()}-")
            log.warning("no --journal: named batches outlive their clients but not this "
                        "master (kept in %s until it stops)", path)
        started = time.monotonic()
        self.journal = Journal(path, max_bytes=self.max_bytes, on_durable=self._on_durable)
        pending = 0
        for name in self.journal.batches():
            self._state(name)
            pending += self.journal.status(name)["queued"]
        if self.path is not None:
            log.info("journal %s: %d batches, %d jobs to run, opened in %.2f s", path,
                     len(self.states), pending, time.monotonic() - started)
        self.refill()

    def close(self) -> None:
        """Flush and close the journal (a temporary one is removed)."""
        if self.journal is not None:
            self.journal.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _state(self, name: str) -> BatchState:
        """The batch ``name``, created (with its pseudo-client) if new."""
        st = self.states.get(name)
        if st is not None:
            return st
        ident = PSEUDO + name.encode()
        self.master.routes[ident] = Sink(self, name)  # type: ignore[assignment]
        client = self.master.scheduler.hello(
            ident, "client", {"name": f"batch:{name}", "host": socket.gethostname(),
                              "pid": os.getpid()}, time.monotonic())
        assert isinstance(client, ClientRecord)
        client.last_seen = math.inf    # never silent: it is not a connection
        st = self.states[name] = BatchState(name, client)
        return st

    def known(self, name) -> BatchState:
        """The batch ``name``; UnknownBatch if there is none."""
        st = self.states.get(name) if isinstance(name, str) else None
        if st is None:
            raise UnknownBatch(f"no batch {name!r} at this master")
        return st

    # ---------------------------------------------------------------- durability
    def _on_durable(self, seq: int) -> None:  # the journal's writer thread
        loop = self.loop
        if loop is not None:
            loop.add_callback(self._durable, seq)

    def _durable(self, seq: int) -> None:
        after = self._after
        while after and after[0][0] <= seq:
            try:
                after.popleft()[1]()
            except Exception:
                log.exception("a batch callback failed")

    def after_durable(self, seq: int, fn: Callable[[], object]) -> None:
        """Call ``fn`` (on the loop) once every journal append up to ``seq`` is on disk."""
        if self.journal.durable >= seq and not self._after:
            fn()
        else:
            self._after.append((seq, fn))

    def reply(self, ident: bytes, rid, value, frames: list | None = None,
              error: Exception | None = None) -> None:
        """Answer a request once what it saw is durable."""
        err = None if error is None else [type(error).__name__, str(error)]
        msg = [P.pack(P.BATCH_REPLY, rid, err, value), *(frames or ())]
        self.after_durable(self.journal.seq, lambda: self.send(ident, msg))

    # ---------------------------------------------------------------- submitting
    def submit(self, peer: ClientRecord, name, fns, jobs, frames: list) -> None:
        """BATCH_SUBMIT: journal the jobs, acknowledge them once durable, feed the window."""
        if not isinstance(name, str) or not isinstance(fns, list) or not isinstance(jobs, list):
            raise ProtocolError("BATCH_SUBMIT needs a name and lists of functions and jobs")
        entries = [P.parse_job(j) for j in jobs]
        if len(fns) + sum(e[2] for e in entries) != len(frames):
            raise ProtocolError("BATCH_SUBMIT frame count does not match its header")
        sched, journal = self.master.scheduler, self.journal
        for digest, frame in zip(fns, frames):
            sched._store_function(peer, P.parse_digest(digest), frame)
        st = self._state(name)
        self.bound[peer.ident] = name
        last = journal.last_key(name) if name in journal._batches else None
        pos = len(fns)
        new, skipped, bad = [], [], []
        for seq, digest, n, opts in entries:
            job_frames = frames[pos:pos + n]
            pos += n
            if last is not None and seq <= last:
                if journal_has(journal, name, seq):
                    skipped.append(seq)  # journaled already (resubmitted after our restart)
                else:
                    bad.append(seq)  # out of order: never journaled, and it cannot be now
            elif digest not in peer.functions:
                bad.append(seq)
            else:
                new.append((seq, digest, job_frames, opts))
                last = seq
        upto = max((e[0] for e in entries), default=0)
        fids: list[bytes] = []
        try:
            fids = [self._function(peer, digest) for _, digest, _, _ in new]
            seq = journal.add_jobs(name, [(k, fid, pack_frames(fr), opts) for (k, _, fr, opts),
                                          fid in zip(new, fids)]) if new else journal.seq
        except JournalFull as exc:
            seq, taken = self._as_many_as_fit(name, new, fids)
            log.warning("batch %s: %d jobs refused: %s", name, len(new) - taken, exc)
            self._fail(peer.ident, [k for k, _, _, _ in new[taken:]], exc)
            ident, error = peer.ident, str(exc)
            self.after_durable(seq, partial(self.send, ident,
                                            [P.pack(P.ACKED, name, upto, error)]))
            del new[taken:], fids[taken:]
            upto = -1  # acknowledged above
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if bad:
            self._fail(peer.ident, bad, ProtocolError(
                "a job names a function the master was never sent, or came out of order"))
        ident = peer.ident
        if upto >= 0:
            self.after_durable(seq, partial(self.send, ident,
                                            [P.pack(P.ACKED, name, upto, None)]))
        if skipped:
            self._resend(ident, name, skipped)
        if new and next(journal.pending(name, after=st.cursor), None) == new[0][0]:
            jobs, room = self._room(st)  # the window has room and nothing queued before them
            now = []
            for (k, _, fr, opts), fid in zip(new, fids):
                if jobs <= 0 or room <= 0:
                    break
                now.append((k, fid, fr, opts))
                jobs -= 1
                room -= sum(map(len, fr))
            self._feed(st, now)
        self.ask_refill()

    def _as_many_as_fit(self, name: str, new: list, fids: list[bytes]) -> tuple[int, int]:
        """The journal is full: journal the first jobs one by one while they fit; returns
        the covering seq and how many were taken."""
        journal, taken = self.journal, 0
        for (key, _, frames, opts), fid in zip(new, fids):
            try:
                journal.add_jobs(name, [(key, fid, pack_frames(frames), opts)])
            except JournalFull:
                break
            taken += 1
        return journal.seq, taken

    def _function(self, peer: ClientRecord, digest: bytes) -> bytes:
        """The journal id of a client's function in its context, journaled if new."""
        fid = self.fids.get((peer.ident, digest))
        if fid is None or not self.journal.has_function(fid):
            ctx = _pack([peer.cwd, peer.path])
            fid = hashlib.blake2b(digest + ctx, digest_size=16).digest()
            blob = as_bytes(peer.functions[digest])
            self.journal.add_function(fid, _pack([blob, peer.cwd, peer.path]))
            self.fids[(peer.ident, digest)] = fid
        return fid

    # ---------------------------------------------------------------- the window
    def _room(self, st: BatchState) -> tuple[int, int]:
        client = st.client
        return FEED_JOBS - len(client.jobs), self.master.scheduler.quota() // 2 - client.arg_bytes

    def _feed(self, st: BatchState, jobs: list[tuple[int, bytes, list, dict | None]]) -> None:
        """Hand jobs ``(key, fid, frames, opts)`` to the scheduler as the batch's."""
        client, sched = st.client, self.master.scheduler
        entries, flat = [], []
        for key, fid, frames, opts in jobs:
            if fid not in client.functions:
                blob, cwd, path = unpack(self.journal.read_function(fid))
                client.functions[fid] = blob
                client.function_bytes += len(blob)
                client.cwd, client.path = cwd, path
            if opts and "id" in opts:
                opts = dict(opts)
                st.ids[key] = opts.pop("id")
                opts = opts or None
            entries.append([key, fid, len(frames), opts])
            flat += frames
            st.cursor = key
        if entries:
            sched.submit(client, [], entries, flat)

    def ask_refill(self) -> None:
        """Feed the windows soon (once per loop turn)."""
        if not self._refill_asked and self.loop is not None:
            self._refill_asked = True
            self.loop.add_callback(self.refill)

    def refill(self) -> None:
        """Top every batch's window up from the journal, then let the master dispatch."""
        self._refill_asked = False
        journal, fed = self.journal, False
        for st in self.states.values():
            if st.name not in journal._batches:
                continue
            jobs, room = self._room(st)
            if jobs <= 0 or room <= 0 or (st.cursor is not None and
                                          st.cursor >= (journal.last_key(st.name) or 0)):
                continue
            batch = []
            for key in journal.pending(st.name, after=st.cursor):
                job = journal.read_job(st.name, key)
                batch.append((key, job.fid, unpack(job.payload), job.options))
                jobs -= 1
                room -= len(job.payload)
                if jobs <= 0 or room <= 0:
                    break
            if not batch:
                st.cursor = journal.last_key(st.name)
                continue
            self._feed(st, batch)
            fed = True
        if fed:
            self.master._changed()

    # ---------------------------------------------------------------- outcomes
    def from_scheduler(self, name: str, frames: list) -> None:
        """What the Scheduler sent a batch's pseudo-client: outcomes are journaled."""
        st = self.states.get(name)
        header = P.unpack(frames[0])
        if st is None or header[0] != P.RESULTS:
            return  # heartbeats, cancel answers: nothing to do
        started, done = header[1], header[2]
        if started:
            msg = [P.pack(P.RESULTS, started, [])]
            for ident in self.listeners(name):
                self.send(ident, msg)
        if not done:
            return
        outs, payloads, pos = [], [], 1
        for key, status, n in done:
            payload = [as_bytes(f) for f in frames[pos:pos + n]]
            pos += n
            payloads += payload
            outs.append((key, status, _pack([st.ids.pop(key, None), payload])))
        seq = self.journal.add_outcomes(name, outs)
        self.after_durable(seq, partial(self._settled, name, done, payloads))
        self.ask_refill()

    def _settled(self, name: str, done: list, payloads: list) -> None:
        """Outcomes are durable: pass them on, wake the waiters."""
        msg = [P.pack(P.RESULTS, [], done), *payloads]
        for ident in self.listeners(name):
            self.send(ident, msg)
        self.wake(name)

    def listeners(self, name: str) -> list[bytes]:
        """The connected clients that submit to batch ``name`` (gone ones are dropped)."""
        clients = self.master.scheduler.clients
        gone = [i for i in self.bound if i not in clients]
        for ident in gone:
            del self.bound[ident]
        if gone:
            self.fids = {k: v for k, v in self.fids.items() if k[0] in clients}
        return [i for i, n in self.bound.items() if n == name]
