"""Compaction of a cw journal (cw.master.journal.store): give back the space of forgotten
batches.

    under the lock: rotate (a new active segment A); note the live batches and their job counts
    no lock:        flush; copy the live records of segments < A into seg-(A-1).log.tmp; fsync
    under the lock: rename it over seg-(A-1).log, fsync dir; move the RAM positions to it;
                    store again any dropped function a job added meanwhile uses; delete
                    the segments < A-1; fsync dir

The compacted segment's header has base A-1: once it is renamed, recovery ignores (and deletes)
every segment before it and replays it, then A and later; before that, recovery deletes the
.tmp. So a crash at any step leaves either the old journal or the compacted one. Appends and
reads go on during the copy (into A); only the final swap holds the lock.
"""
from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import msgpack

from cw.errors import JournalError
from cw.master.journal import format as F
from cw.master.journal.index import OFF_MASK, SEG_SHIFT

if TYPE_CHECKING:
    from cw.master.journal.index import _Batch
    from cw.master.journal.store import Journal

log = logging.getLogger(__name__)

WRITE_CHUNK = 8 << 20


class _Out:
    """Frames written to a new segment file in large pwrites; ``offset`` is where the next
    frame lands."""

    def __init__(self, fd: int, first: bytes):
        self.fd = fd
        self.buf = bytearray(first)
        self.written = 0

    @property
    def offset(self) -> int:
        return self.written + len(self.buf)

    def add(self, fr: bytes) -> None:
        self.buf.extend(fr)
        if len(self.buf) >= WRITE_CHUNK:
            self.drain()

    def drain(self) -> None:
        mv = memoryview(self.buf)
        while mv:
            n = os.pwrite(self.fd, mv, self.written)
            mv, self.written = mv[n:], self.written + n
        del mv
        del self.buf[:]


class _Copy:
    """The copy phase: live records of the sealed segments into ``out`` (segment ``target``),
    noting each one's new position."""

    def __init__(self, out: _Out, target: int, old: dict[int, int], active: int):
        self.out, self.hi, self.old, self.active = out, target << SEG_SHIFT, old, active
        self.fids: set[bytes] = set()                  # used by the copied jobs

    def read(self, pos: int) -> bytes:
        return F.read_entry(self.old[pos >> SEG_SHIFT], pos & OFF_MASK)

    def bulk(self, kind: int, bid: int, entries: Iterable[bytes], new: array) -> None:
        cut: list[bytes] = []
        size = 0
        for e in entries:
            cut.append(e)
            size += len(e)
            if size >= F.BULK_BYTES:
                self._emit(kind, bid, cut, new)
                cut, size = [], 0
        if cut:
            self._emit(kind, bid, cut, new)

    def _emit(self, kind: int, bid: int, cut: list[bytes], new: array) -> None:
        meta = [kind, bid, len(cut)]
        at = self.out.offset + F.HEAD + len(msgpack.packb(meta))
        for e in cut:
            new.append(self.hi | at)
            at += len(e)
        self.out.add(F.frame(meta, b"".join(cut)))

    def jobs(self, b: _Batch, n: int) -> Iterator[bytes]:
        last = None
        for i in range(n):
            e = self.read(b.jobs[i])
            fl = F.JOB_ENTRY.unpack_from(e)[2]
            fid = e[F.JOB_ENTRY.size:F.JOB_ENTRY.size + fl]
            if fid != last:
                self.fids.add(fid)
                last = fid
            yield e

    def batch(self, b: _Batch, n: int, upto: int | None) -> tuple[array, array, array]:
        """Copy batch ``b``'s first ``n`` jobs and their outcomes that are in sealed segments;
        returns the jobs' new positions, and the indexes and new positions of the outcomes."""
        self.out.add(F.frame([F.K_BATCH, b.bid, b.name]))
        jobs, idx, outs = array("q"), array("q"), array("q")
        self.bulk(F.K_JOBS, b.bid, self.jobs(b, n), jobs)
        if upto is not None:                 # before the outcomes: a cancel covers only
            self.out.add(F.frame([F.K_CANCEL, b.bid, upto]))    # jobs without one
        sealed = [i for i in range(n) if b.outs[i] != -1 and b.outs[i] >> SEG_SHIFT < self.active]
        idx.extend(sealed)
        self.bulk(F.K_OUTCOMES, b.bid, (self.read(b.outs[i]) for i in sealed), outs)
        return jobs, idx, outs


def compact(j: Journal, between: Callable[[], None] | None = None) -> int:
    """Rewrite ``j``'s live records of its sealed segments into one; returns the bytes given
    back. ``between`` (tests) runs after the copy, before the swap."""
    with j._lock:
        if j._compacting:
            raise JournalError(f"journal {j.path}: a compaction is already running")
        j._compacting, j._fids_since = True, set()
        j._rotate()
        j._cond.notify_all()
        active = j._seg
        snap = [(b, len(b.keys), b.upto) for b in j._batches.values()]
        funcs = list(j._funcs.items())
    try:
        j.flush()                                      # every sealed segment is on disk
        with j._lock:
            old = {n: fd for n, fd in j._fds.items() if n < active}
        target = active - 1
        before = sum(os.fstat(fd).st_size for fd in old.values())
        final = os.path.join(j.path, F.seg_name(target))
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
        try:
            out = _Out(fd, F.header_frame(target))
            c = _Copy(out, target, old, active)
            moved = [(b, *c.batch(b, n, upto)) for b, n, upto in snap]
            newfuncs = {}
            for fid, pos in funcs:                     # the order of functions does not matter
                if fid in c.fids:
                    newfuncs[fid] = (pos, c.hi | out.offset)
                    out.add(F.read_frame(old[pos >> SEG_SHIFT], pos & OFF_MASK))
            out.drain()
            os.fsync(fd)
            after = out.written
        finally:
            os.close(fd)
        if between is not None:
            between()
        with j._lock:
            os.rename(tmp, final)
            F.fsync_dir(j.path)
            _swap(j, moved, newfuncs, old, os.open(final, os.O_RDONLY), target, active)
            j._disk += after - before
            for n in old:
                if n != target:
                    os.unlink(os.path.join(j.path, F.seg_name(n)))
            F.fsync_dir(j.path)
            freed = before - after
    finally:
        with j._lock:
            j._compacting, j._fids_since = False, set()
    log.info("journal %s: sealed segments compacted into %s, %d bytes given back",
             j.path, F.seg_name(target), freed)
    return freed


def _swap(j: Journal, moved: list, newfuncs: dict, old: dict[int, int], fd: int,
          target: int, active: int) -> None:
    """Under the lock: point the RAM index at the compacted segment."""
    for b, jobs, idx, outs in moved:
        b.jobs[0:len(jobs)] = jobs
        for i, p in zip(idx, outs):
            b.outs[i] = p
    again = []
    for fid, pos in list(j._funcs.items()):
        if fid in newfuncs and newfuncs[fid][0] == pos:
            j._funcs[fid] = newfuncs[fid][1]
        elif pos >> SEG_SHIFT < active:                # not copied: no copied job uses it
            if fid in j._fids_since:                   # ... but a job added since does
                again.append((fid, F.read_frame(old[pos >> SEG_SHIFT], pos & OFF_MASK)))
            del j._funcs[fid]
    for fd_ in j._retired:
        os.close(fd_)
    j._retired = list(old.values())
    j._fds = {n: f for n, f in j._fds.items() if n >= active}
    j._fds[target] = fd
    j._base = target
    for fid, fr in again:
        _meta, start, n = F.parse(fr)
        j._append([([F.K_FUNCTION, fid], fr[start:start + n])], check=False)
