"""The requests about named batches (cw.master.batches), answered on the master's loop.

    BATCH_OPEN rid name            bind the client as the batch's submitter: {"next", "status"}
    BATCH_LIST rid                 [{"name", "jobs", "queued", ... "durable"}]
    BATCH_STATUS rid name seen t   the counts; with ``seen``, not before more than ``seen``
                                   jobs settled (or all did, or ``t`` seconds passed)
    BATCH_FETCH rid name after n   a page of keys after ``after`` in submission order, their
                                   outcomes as frames (about ``n`` bytes at most)
    BATCH_CANCEL rid name          queued jobs never run: the counts
    BATCH_FORGET rid name          the batch and its outcomes are dropped, space given back

Also the payload helpers the batch modules share (journaled payloads are msgpack lists of
frames). Every answer is a BATCH_REPLY [rid, error, value] sent once what it reports is durable;
error is None or [type name, message] (UnknownBatch, BatchInUse, ProtocolError).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from cw import protocol as P
from cw.errors import BatchInUse, CwError, ProtocolError, UnknownBatch
from cw.master.journal import CANCELLED, QUEUED

if TYPE_CHECKING:
    from cw.master.batches import BatchState
    from cw.master.daemon import Master
    from cw.master.journal import Journal
    from cw.master.records import ClientRecord

log = logging.getLogger(__name__)
_pack = msgpack.Packer(use_bin_type=True).pack

PAGE_ENTRIES = 20_000      # most keys in one BATCH_FETCH answer
MAX_PAGE = 16 << 20        # most outcome bytes in one (one outcome always goes)
MAX_WAIT = 300.0           # longest BATCH_STATUS wait


def unpack(data: bytes) -> Any:
    """Decode a journaled payload (msgpack)."""
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


def pack_frames(frames: list) -> bytes:
    """A job's frames as one journal payload (msgpack), without copying them first."""
    return _pack([f.buffer if isinstance(f, zmq.Frame) else f for f in frames])


def journal_has(journal: Journal, name: str, key: int) -> bool:
    """Whether batch ``name`` of the journal has job ``key``."""
    try:
        journal.state(name, key)
    except KeyError:
        return False
    return True


def as_bytes(frame) -> bytes:
    """The bytes of a zmq.Frame, bytes or memoryview."""
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def remove_stale_tmp() -> None:
    """Temporary journals of masters that died without removing theirs."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        if not name.startswith("cw-batches-"):
            continue
        try:
            pid = int(name.split("-")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except PermissionError:
            continue


class BatchRequests:
    """The request side of ``Batches`` (the state and the journal are its)."""

    master: Master
    journal: Journal
    states: dict[str, BatchState]
    bound: dict[bytes, str]
    loop: Any
    path: str | None
    _compacting: bool
    _compact_again: bool
    known: Callable[[Any], BatchState]
    reply: Callable[..., None]
    submit: Callable[..., None]
    listeners: Callable[[str], list[bytes]]
    _state: Callable[[str], BatchState]
    _fail: Callable[[bytes, list[int], Exception], None]

    def handle(self, peer: ClientRecord, kind: int, header: list, frames: list) -> None:
        """A batch message from a client (BATCH_SUBMIT or a request)."""
        if kind == P.BATCH_SUBMIT:
            return self.submit(peer, *header[1:4], frames)
        rid = header[1]
        out: list = []
        try:
            if kind == P.BATCH_OPEN:
                value: Any = self.open_batch(peer, header[2])
            elif kind == P.BATCH_LIST:
                value = self.rows()
            elif kind == P.BATCH_STATUS:
                _, _, name, seen, timeout = header
                value = self.status(name)
                if seen is not None and self._wait(peer.ident, rid, name, value, seen, timeout):
                    return
            elif kind == P.BATCH_FETCH:
                value, out = self.fetch(header[2], header[3], header[4])
            elif kind == P.BATCH_CANCEL:
                value = self.cancel(header[2])
            elif kind == P.BATCH_FORGET:
                self.forget(header[2])
                value = None
            else:
                raise ProtocolError(f"unexpected batch message kind {kind}")
        except (CwError, LookupError) as exc:
            if isinstance(exc, ProtocolError):
                log.warning("a bad batch request from %s: %s", peer.name, exc)
            return self.reply(peer.ident, rid, None, error=exc)
        self.reply(peer.ident, rid, value, out)

    def open_batch(self, peer: ClientRecord, name) -> dict:
        """BATCH_OPEN: the client submits to ``name`` (created if new); its keys go on
        from the batch's last."""
        if not isinstance(name, str) or not 0 < len(name) <= 256 or "\0" in name:
            raise ProtocolError("a batch name is 1 to 256 characters")
        st = self._state(name)
        sched = self.master.scheduler
        if st.writer not in (None, peer.ident) and st.writer in sched.clients:
            raise BatchInUse(f"batch {name!r} is open for submitting by "
                             f"{sched.clients[st.writer].name}")
        st.writer = peer.ident
        self.bound[peer.ident] = name
        last = self.journal.last_key(name) if name in self.journal._batches else None
        return {"next": (last or 0) + 1, "status": self.status(name),
                "durable": self.path is not None}

    def _wait(self, ident: bytes, rid, name: str, status: dict, seen, timeout) -> bool:
        """Keep a BATCH_STATUS until more than ``seen`` jobs settled; False: answer now."""
        if not isinstance(seen, int) or not isinstance(timeout, (int, float)):
            raise ProtocolError("BATCH_STATUS needs a settled count and a timeout")
        settled = status["done"] + status["failed"] + status["cancelled"]
        if settled > seen or settled >= status["jobs"] or timeout <= 0:
            return False
        waiter: list = [ident, rid, seen, None]
        waiter[3] = self.loop.call_later(min(float(timeout), MAX_WAIT),
                                         self._waited, name, waiter)
        self.states[name].waiters.append(waiter)
        return True

    def _waited(self, name: str, waiter: list) -> None:
        st = self.states.get(name)
        if st is not None and waiter in st.waiters:
            st.waiters.remove(waiter)
            self.reply(waiter[0], waiter[1], self.status(name))

    def fetch(self, name, after, max_bytes) -> tuple[list, list]:
        """BATCH_FETCH: ``[[key, status, nframes, id]], last key, more`` and the frames."""
        self.known(name)
        if (after is not None and not isinstance(after, int)) or not isinstance(max_bytes, int):
            raise ProtocolError("BATCH_FETCH needs a key (or None) and a byte count")
        if name not in self.journal._batches:
            return [[], after, False], []
        journal = self.journal
        limit = min(max(max_bytes, 1), MAX_PAGE)
        entries: list = []
        frames: list = []
        size, last, more = 0, after, False
        for key in journal.keys(name, after=after):
            if len(entries) >= PAGE_ENTRIES or (entries and size >= limit):
                more = True
                break
            out = journal.read_outcome(name, key)
            if out is None:
                state = journal.state(name, key)
                entries.append([key, -1 if state == QUEUED else -2, 0, None])
            else:
                jobid, payload = unpack(out.payload)
                entries.append([key, out.status, len(payload), jobid])
                frames += payload
                size += sum(map(len, payload))
            last = key
        return [entries, last, more], frames

    def wake(self, name: str) -> None:
        """Answer the BATCH_STATUS waiters of ``name`` that see a change."""
        st = self.states.get(name)
        if st is None or not st.waiters:
            return
        status = self.status(name)
        settled = status["done"] + status["failed"] + status["cancelled"]
        keep = []
        for waiter in st.waiters:
            ident, rid, seen, handle = waiter
            if settled > seen or settled >= status["jobs"]:
                self.loop.remove_timeout(handle)
                self.reply(ident, rid, status)
            else:
                keep.append(waiter)
        st.waiters = keep

    def status(self, name: str) -> dict:
        """Counts of a batch's jobs by state (UnknownBatch if there is no such batch)."""
        st = self.known(name)
        if name not in self.journal._batches:
            return {"jobs": 0, "queued": 0, "running": 0, "done": 0, "failed": 0,
                    "cancelled": 0}
        running = sum(1 for j in st.client.jobs.values() if j.started)
        return self.journal.status(name, running)

    def rows(self) -> list[dict]:
        """Every batch and its progress, for the master's status."""
        durable = self.path is not None
        return [{"name": n, **self.status(n), "durable": durable} for n in self.states]

    # ---------------------------------------------------------------- cancel, forget
    def cancel(self, name: str) -> dict:
        """Queued jobs never run; running ones finish and keep their outcome."""
        st = self.known(name)
        if name in self.journal._batches:
            self.journal.cancel(name)
            st.cursor = self.journal.last_key(name)
        client = st.client
        self.master.scheduler.cancel(client, list(client.jobs))
        listeners = self.listeners(name)
        if listeners and name in self.journal._batches:
            keys = list(self.journal.keys(name, CANCELLED))
            for ident in listeners:
                for i in range(0, len(keys), 10_000):
                    self._fail(ident, keys[i:i + 10_000],
                               CancelledError(f"batch {name!r} was cancelled"))
        self.master._changed()
        self.wake(name)
        return self.status(name)

    def forget(self, name: str) -> None:
        """Drop a batch and all it holds; the journal gives the space back (compaction)."""
        st = self.known(name)
        sched = self.master.scheduler
        sched.peer_gone(st.client.ident, "its batch was forgotten", graceful=True)
        self.master.routes.pop(st.client.ident, None)
        del self.states[name]
        self.bound = {i: n for i, n in self.bound.items() if n != name}
        for waiter in st.waiters:
            self.loop.remove_timeout(waiter[3])
            self.reply(waiter[0], waiter[1], None,
                       error=UnknownBatch(f"batch {name!r} was forgotten"))
        if name in self.journal._batches:
            self.journal.forget(name)
            self.compact()

    def compact(self) -> None:
        """Give forgotten batches' space back, on a thread (one compaction at a time)."""
        if self._compacting:
            self._compact_again = True
            return
        self._compacting = True
        assert self.loop is not None
        future = self.loop.run_in_executor(None, self.journal.compact)
        future.add_done_callback(lambda f: self.loop.add_callback(self._compacted, f))

    def _compacted(self, future) -> None:
        self._compacting = False
        try:
            log.info("journal compacted: %d bytes given back", future.result())
        except Exception:
            log.exception("journal compaction failed")
        if self._compact_again:
            self._compact_again = False
            self.compact()
