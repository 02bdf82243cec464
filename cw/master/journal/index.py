"""The journal's RAM index (cw/master/journal/store.py): what each record of a segment changes.

Per batch only compact arrays: keys, the position of each job's and each outcome's frame
(segment << 40 | offset of its entry in a bulk frame) and one state byte per job: 25 bytes a
job. Replaying the segments through Index._apply rebuilds it on open; appends go through the
same _apply, so the two cannot disagree.
"""
from __future__ import annotations

import bisect
import os
import threading
import zlib
from array import array
from collections.abc import Iterator
from typing import NamedTuple

import msgpack

from cw.errors import JournalCorrupt, UnknownBatch
from cw.master.journal import format as F

QUEUED, DONE, FAILED, CANCELLED = 0, 1, 2, 3
SEG_SHIFT = 40
OFF_MASK = (1 << SEG_SHIFT) - 1


class StoredJob(NamedTuple):
    """A journaled job: its key, function id, pickled arguments and options."""
    key: int
    fid: bytes
    payload: bytes
    options: dict | None


class StoredOutcome(NamedTuple):
    """A journaled outcome: status 0 is done, any other status failed."""
    key: int
    status: int
    payload: bytes


class _Batch:
    __slots__ = ("bid", "name", "keys", "jobs", "outs", "states", "counts", "upto")

    def __init__(self, bid: int, name: str):
        self.bid = bid
        self.name = name
        self.keys = array("q")
        self.jobs = array("q")       # position of each job's entry
        self.outs = array("q")       # position of each outcome's entry, -1: none yet
        self.states = bytearray()
        self.counts = [0, 0, 0, 0]   # by state
        self.upto: int | None = None  # the highest key a cancel covered

    def index(self, key: int) -> int:
        keys = self.keys
        if keys:
            i = key - keys[0]
            if 0 <= i < len(keys) and keys[i] == key:
                return i
            i = bisect.bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                return i
        raise KeyError(f"batch {self.name!r} has no job {key}")


class Index:
    """The index part of Journal: replay (_apply) and the queries that need no disk."""

    path: str
    _lock: threading.RLock
    _fds: dict[int, int]
    _chunks: list[list]
    _inflight: list[list]

    def _reset_index(self) -> None:
        self._funcs: dict[bytes, int] = {}
        self._batches: dict[str, _Batch] = {}
        self._by_id: dict[int, _Batch] = {}
        self._next_bid = 1

    def _replay(self, fd: int, seg: int) -> F.Scan:
        """Apply every valid frame of segment ``seg`` (open as ``fd``) in order; the returned
        Scan says where the valid frames end and what stopped them."""
        scan = F.Scan(fd)
        size, hi, head = scan.size, seg << SEG_SHIFT, F.HEAD
        unpack, unpackb, crc32 = F.HEADER.unpack_from, msgpack.unpackb, zlib.crc32
        apply = self._apply
        filepos, want = 0, F.READ_CHUNK
        while filepos < size:
            buf = os.pread(fd, min(want, size - filepos), filepos)
            mv, nbuf, i = memoryview(buf), len(buf), 0
            while i + head <= nbuf:
                n, crc, ml = unpack(buf, i)
                end = i + 8 + n
                if end > nbuf:
                    break
                if n < 4 or ml > n - 4:
                    scan.error = f"bad record header at {filepos + i}"
                elif crc32(mv[i + 8:end]) != crc:
                    scan.error = f"bad checksum at {filepos + i}"
                if scan.error:
                    scan.good = filepos + i
                    return scan
                start = i + head + ml
                apply(unpackb(mv[i + head:start]), hi | (filepos + i), buf, start, end,
                      hi | (filepos + start))
                i = end
            if i == 0:                                   # a frame longer than what was read
                need = head if nbuf < head else 8 + unpack(buf, 0)[0]
                if filepos + need > size or need <= nbuf:
                    scan.error = f"short record at {filepos} ({size - filepos} bytes left)"
                    break
                want = need
                continue
            filepos += i
            scan.good, want = filepos, F.READ_CHUNK
        return scan

    def _batch(self, name: str) -> _Batch:
        try:
            return self._batches[name]
        except KeyError:
            raise UnknownBatch(f"no batch named {name!r}") from None

    def _apply(self, meta: list, pos: int, data: bytes | bytearray = b"", start: int = 0,
               end: int = 0, ppos: int = 0) -> None:
        """Record what the frame at ``pos`` changes; its payload is data[start:end], found at
        position ``ppos`` (entries of a bulk frame are indexed by their own position)."""
        kind = meta[0]
        if kind == F.K_JOBS:
            b = self._by_id[meta[1]]
            keys_append, jobs_append = b.keys.append, b.jobs.append
            unpack, j, n = F.JOB_ENTRY.unpack_from, start, 0
            while j < end:
                elen, key = unpack(data, j)[:2]
                keys_append(key)
                jobs_append(ppos + j - start)
                j += elen
                n += 1
            if j != end or n != meta[2]:
                raise ValueError(f"a jobs record of {meta[2]} jobs holds {n}")
            if n == 1:
                b.outs.append(-1)
                b.states.append(QUEUED)
            else:
                b.outs.extend(array("q", [-1]) * n)
                b.states.extend(bytes(n))
            b.counts[QUEUED] += n
        elif kind == F.K_OUTCOMES:
            b = self._by_id[meta[1]]
            unpack, j = F.OUT_ENTRY.unpack_from, start
            outs, states, counts, index = b.outs, b.states, b.counts, b.index
            while j < end:
                elen, key, status = unpack(data, j)
                i = index(key)
                if outs[i] == -1:
                    new = DONE if status == 0 else FAILED
                    counts[states[i]] -= 1
                    counts[new] += 1
                    states[i] = new
                    outs[i] = ppos + j - start
                j += elen
        elif kind == F.K_FUNCTION:
            self._funcs.setdefault(meta[1], pos)
        elif kind == F.K_BATCH:
            b = _Batch(meta[1], meta[2])
            self._batches[b.name] = self._by_id[b.bid] = b
            self._next_bid = max(self._next_bid, b.bid + 1)
        elif kind == F.K_CANCEL:
            b = self._by_id[meta[1]]
            lim = bisect.bisect_right(b.keys, meta[2])
            head = b.states[:lim]
            n = head.count(QUEUED)
            b.states[:lim] = head.replace(bytes([QUEUED]), bytes([CANCELLED]))
            b.counts[QUEUED] -= n
            b.counts[CANCELLED] += n
            b.upto = meta[2] if b.upto is None else max(b.upto, meta[2])
        elif kind == F.K_FORGET:
            b = self._by_id.pop(meta[1])
            del self._batches[b.name]
        elif kind != F.K_HEADER:
            raise JournalCorrupt(f"journal {self.path}: unknown record kind {kind}")

    def batches(self) -> list[str]:
        """The names of the live batches, oldest first."""
        return list(self._batches)

    def has_function(self, fid: bytes) -> bool:
        """Whether the function ``fid`` is stored."""
        return fid in self._funcs

    def last_key(self, batch: str) -> int | None:
        """The highest key of ``batch`` (a reopened batch's keys continue after it)."""
        b = self._batch(batch)
        return b.keys[-1] if b.keys else None

    def status(self, batch: str, running: int = 0) -> dict[str, int]:
        """Counts of ``batch``'s jobs. The journal does not know what runs: the master passes
        ``running`` (how many of the queued jobs it has dispatched) and gets it split off."""
        b = self._batch(batch)
        c = b.counts
        return {"jobs": len(b.keys), "queued": c[QUEUED] - running, "running": running,
                "done": c[DONE], "failed": c[FAILED], "cancelled": c[CANCELLED]}

    def state(self, batch: str, key: int) -> int:
        """QUEUED, DONE, FAILED or CANCELLED."""
        b = self._batch(batch)
        return b.states[b.index(key)]

    def pending(self, batch: str, after: int | None = None) -> Iterator[int]:
        """The keys of ``batch``'s queued jobs in submission order (those after key ``after``
        if given). Live: a job settled while iterating is skipped."""
        return self.keys(batch, QUEUED, after)

    def keys(self, batch: str, state: int | None = None,
             after: int | None = None) -> Iterator[int]:
        """The keys of ``batch`` in submission order: all, or those in ``state`` (QUEUED,
        DONE, FAILED, CANCELLED), after key ``after`` if given."""
        b = self._batch(batch)
        i = 0 if after is None else bisect.bisect_right(b.keys, after)
        if state is None:
            yield from b.keys[i:]
            return
        q = bytes([state])
        while True:
            i = b.states.find(q, i)
            if i < 0:
                return
            yield b.keys[i]
            i += 1

    def _buffered(self, pos: int) -> tuple[bytearray, int] | None:
        seg, off = pos >> SEG_SHIFT, pos & OFF_MASK
        for s, base, data in self._inflight + self._chunks:
            if s == seg and base <= off < base + len(data):
                return data, off - base
        return None

    def _locate(self, pos: int, frame: bool = False) -> bytes | tuple[int, int]:
        """Under the lock (positions move when a compaction ends): the entry (or frame) at
        ``pos`` if it is still buffered, else (fd, offset) to pread it from."""
        found = self._buffered(pos)
        if found is None:
            return self._fds[pos >> SEG_SHIFT], pos & OFF_MASK
        data, i = found
        if frame:
            return bytes(data[i:i + 8 + int.from_bytes(data[i:i + 4], "little")])
        return bytes(data[i:i + int.from_bytes(data[i:i + 4], "little")])

    def read_job(self, batch: str, key: int) -> StoredJob:
        """StoredJob ``key`` of ``batch``, read back from disk (or the write buffer)."""
        with self._lock:
            b = self._batch(batch)
            src = self._locate(b.jobs[b.index(key)])
        e = src if isinstance(src, bytes) else F.read_entry(*src)
        key, fid, payload, options = F.parse_job(e)
        return StoredJob(key, fid, payload, options)

    def read_outcome(self, batch: str, key: int) -> StoredOutcome | None:
        """The outcome of job ``key`` of ``batch``, or None if it has none."""
        with self._lock:
            b = self._batch(batch)
            pos = b.outs[b.index(key)]
            if pos == -1:
                return None
            src = self._locate(pos)
        e = src if isinstance(src, bytes) else F.read_entry(*src)
        n, k, status = F.OUT_ENTRY.unpack_from(e)
        return StoredOutcome(k, status, e[F.OUT_ENTRY.size:n])

    def read_function(self, fid: bytes) -> bytes:
        """The pickled function ``fid``."""
        with self._lock:
            src = self._locate(self._funcs[fid], frame=True)
        fr = src if isinstance(src, bytes) else F.read_frame(*src)
        _meta, start, n = F.parse(fr)
        return fr[start:start + n]
