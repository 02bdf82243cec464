"""Compaction of a cw journal (cw/journal.py): give back the space of forgotten batches.

    live records --copy--> seg-N+1.log.tmp --fsync--> rename seg-N+1.log --fsync dir-->
    delete seg-base..N --fsync dir--> reload the RAM index from seg-N+1

seg-N+1's header has base N+1: once it is renamed, recovery ignores (and deletes) the older
segments, and before that recovery deletes the .tmp. So a crash at any step leaves either the
old journal or the compacted one, never a mix.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from . import journal_format as F

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger(__name__)

WRITE_CHUNK = 8 << 20


class _Out:
    """Frames written to a new segment file in large pwrites."""

    def __init__(self, fd: int, first: bytes):
        self.fd = fd
        self.buf = bytearray(first)
        self.written = 0

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


def _copy_live(j: Journal, out: _Out) -> None:
    from .journal_index import OFF_MASK, SEG_SHIFT

    def entries(positions: Iterable[int]) -> Iterator[bytes]:
        for pos in positions:
            if pos != -1:
                yield F.read_entry(j._fds[pos >> SEG_SHIFT], pos & OFF_MASK)

    def bulk(kind: int, bid: int, it: Iterator[bytes]) -> None:
        cut: list[bytes] = []
        size = 0
        for e in it:
            cut.append(e)
            size += len(e)
            if size >= F.BULK_BYTES:
                out.add(F.frame([kind, bid, len(cut)], b"".join(cut)))
                cut, size = [], 0
        if cut:
            out.add(F.frame([kind, bid, len(cut)], b"".join(cut)))

    live: set[bytes] = set()

    def note_fid(it: Iterator[bytes]) -> Iterator[bytes]:
        last = None
        for e in it:
            _n, _key, fl, _ol = F.JOB_ENTRY.unpack_from(e)
            fid = e[F.JOB_ENTRY.size:F.JOB_ENTRY.size + fl]
            if fid != last:
                live.add(fid)
                last = fid
            yield e

    for b in j._batches.values():
        out.add(F.frame([F.K_BATCH, b.bid, b.name]))
        bulk(F.K_JOBS, b.bid, note_fid(entries(b.jobs)))
        if b.upto is not None:               # before the outcomes: a cancel covers only
            out.add(F.frame([F.K_CANCEL, b.bid, b.upto]))    # jobs without one
        bulk(F.K_OUTCOMES, b.bid, entries(b.outs))
    for fid, pos in j._funcs.items():         # the order of functions does not matter
        if fid in live:
            out.add(F.read_frame(j._fds[pos >> SEG_SHIFT], pos & OFF_MASK))
    out.drain()


def compact(j: Journal) -> int:
    """Rewrite ``j``'s live records into one new segment; returns the bytes given back."""
    while True:
        j.flush()
        with j._lock:
            if j._chunks or j._inflight:
                continue                 # an append slipped in between: flush it too
            before = j._disk
            new = j._seg + 1
            final = os.path.join(j.path, F.seg_name(new))
            tmp = final + ".tmp"
            fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
            try:
                _copy_live(j, _Out(fd, F.header_frame(new)))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            F.fsync_dir(j.path)
            old = sorted(j._fds)
            j._close_fds()
            for n in old:
                os.unlink(os.path.join(j.path, F.seg_name(n)))
            F.fsync_dir(j.path)
            j._load()
            freed = before - j._disk
            log.info("journal %s compacted into %s: %d bytes given back",
                     j.path, F.seg_name(new), freed)
            return freed
