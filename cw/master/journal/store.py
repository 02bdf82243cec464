"""The master's journal: durable named batches in append-only segment files (issue 14).

Safe on NFS/Lustre with one writer: plain files written with pwrite + fsync, no mmap, no
shared memory, no SQLite; a LOCK file (O_CREAT|O_EXCL) keeps a second writer out. Format
(details in cw/master/journal/format.py)::

    PATH/seg-00000001.log  seg-00000002.log ...  (numbered; only the last one is appended to)
    segment = header frame, frame, frame, ...
    frame   = [u32 len][u32 crc32][u32 metalen][msgpack meta][payload]
              meta [3, bid, n]: payload = n job entries [u32 len][i64 key][u16][u32] fid opts args
              meta [4, bid, n]: payload = n outcome entries [u32 len][i64 key][i32 status] value

The write path::

    IOLoop thread                         writer thread ("cw-journal")
    add_job/add_outcome/...               waits for buffered frames
      validate, frame, check max_bytes      swaps the buffer out (under the lock)
      append to the buffer  -> seq          pwrite each chunk to its segment
      update the RAM index (offsets)        fsync (a segment before the next one is written;
      return seq, never blocks                  the directory when a segment is created)
                                            durable = seq of the last frame written
    on_durable(seq)  <-------------------   on_durable(seq): one fsync for many records

RAM holds only compact indexes: per batch the keys, the file position of each job and of each
outcome (array('q'), position = segment << 40 | offset) and a state byte per job. Arguments
and outcomes are read back with os.pread (or from the buffer while they are not written yet).

forget() appends a record; compact() then rewrites the live records into a new segment
(written as .tmp, fsync'ed, renamed, directory fsync'ed; its header says every older segment
is dead; then the old ones are deleted), so a crash at any step leaves either the old state or
the new one. Compaction keeps only the functions some live job uses (has_function says when
the master must store one again).

Recovery (on open): segments are read in order; the first short, torn or bad-crc frame of the
last segment ends it (truncated there, with a warning); one anywhere else is JournalCorrupt.
Sequence numbers (seq) count appends of this open journal only; they restart after a reopen.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable

from cw.errors import JournalCorrupt, JournalError, JournalFull
from cw.master.journal import format as F
from cw.master.journal.index import (CANCELLED, DONE, FAILED, QUEUED, SEG_SHIFT, Index,
                                     StoredJob, StoredOutcome)

__all__ = ["CANCELLED", "DONE", "FAILED", "QUEUED", "Journal", "StoredJob", "StoredOutcome"]

log = logging.getLogger(__name__)

class Journal(Index):
    """A journal directory opened for writing (one writer: see the module docstring).

    ``on_durable(seq)`` is called on the writer thread each time every append numbered up to
    ``seq`` is on disk (the master passes a function that does ``loop.add_callback``).
    ``max_bytes`` bounds the segments' total size: an add_* that would pass it raises
    JournalFull. Outcomes, cancels and forgets are always accepted (one outcome per accepted
    job at most), so a full journal never loses or blocks results.
    """

    def __init__(self, path: str, *, max_bytes: int | None = None,
                 segment_bytes: int = 64 << 20,
                 on_durable: Callable[[int], None] | None = None):
        self.path = path
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.on_durable = on_durable
        os.makedirs(path, exist_ok=True)
        self._lock_file = F.Lock(path)
        self._lock = threading.RLock()   # with self._lock: C speed; the condition shares it
        self._cond = threading.Condition(self._lock)
        self._seq = 0
        self._durable = 0
        self._chunks: list[list] = []     # [seg, offset, bytearray] not yet handed to the writer
        self._inflight: list[list] = []   # ... being written
        self._error: BaseException | None = None
        self._closed = False
        self._idle = False                # the writer waits for frames
        self._fds: dict[int, int] = {}
        self._retired: list[int] = []     # fds of compacted-away segments (a read may race)
        self._compacting = False
        self._fids_since: set[bytes] = set()   # functions jobs used while compacting
        try:
            self._load()
        except BaseException:
            self._close_fds()
            self._lock_file.release()
            raise
        self._thread = threading.Thread(target=self._run, name="cw-journal", daemon=True)
        self._thread.start()

    # -- opening and recovery ---------------------------------------------------------------

    def _load(self) -> None:
        self._reset_index()
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):
                log.warning("journal %s: removing %s (an unfinished compaction)", self.path, name)
                os.unlink(os.path.join(self.path, name))
        segs = F.list_segments(self.path)
        bases = [b for b in map(lambda n: F.read_base(self.path, n), segs) if b is not None]
        base = max(bases) if bases else None       # a compacted segment kills all before it
        if base is not None:
            dead = [n for n in segs if n < base]
            for n in dead:
                os.unlink(os.path.join(self.path, F.seg_name(n)))
            if dead:
                F.fsync_dir(self.path)
            segs = [n for n in segs if n >= base]
        if segs and segs != list(range(segs[0], segs[-1] + 1)):
            raise JournalCorrupt(f"journal {self.path}: segments missing among {segs}")
        self._base = base if base is not None else (segs[0] if segs else 1)
        self._disk = 0
        for n in segs:
            self._scan(n, last=n == segs[-1])
        if not segs:
            self._seg = self._base
            self._new_segment_now(self._seg)

    def _scan(self, n: int, last: bool) -> None:
        file = os.path.join(self.path, F.seg_name(n))
        fd = os.open(file, os.O_RDWR if last else os.O_RDONLY)
        self._fds[n] = fd
        try:
            scan = self._replay(fd, n)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise JournalCorrupt(f"journal {file}: a record that does not fit: {e!r}") from e
        if scan.error:
            if not last:
                raise JournalCorrupt(f"journal {file}: {scan.error}")
            log.warning("journal %s: %s; dropping the last %d bytes (a torn write)",
                        file, scan.error, scan.size - scan.good)
            os.ftruncate(fd, scan.good)
            os.fsync(fd)
        size = scan.good
        if last:
            self._seg = n
            if size == 0:                    # even the header was torn
                os.pwrite(fd, F.header_frame(self._base), 0)
                os.fsync(fd)
                size = os.fstat(fd).st_size
            self._tail = size
        self._disk += size

    def _new_segment_now(self, n: int) -> None:
        fd = os.open(os.path.join(self.path, F.seg_name(n)),
                     os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self._fds[n] = fd
        head = F.header_frame(self._base)
        os.pwrite(fd, head, 0)
        os.fsync(fd)
        F.fsync_dir(self.path)
        self._tail = len(head)
        self._disk += len(head)

    # -- appending (any thread; never blocks on the disk) -----------------------------------

    def _append(self, records: list[tuple[list, bytes]], check: bool) -> int:
        frames = [F.frame(meta, payload) for meta, payload in records]
        with self._lock:
            if self._closed:
                raise JournalError(f"journal {self.path} is closed")
            if self._error is not None:
                raise JournalError(f"journal {self.path} failed: {self._error}")
            need = sum(map(len, frames))
            if check and self.max_bytes is not None and self._disk + need > self.max_bytes:
                raise JournalFull(f"journal {self.path} would pass its max_bytes "
                                  f"({self._disk} + {need} > {self.max_bytes})")
            for (meta, _payload), fr in zip(records, frames):
                if self._tail + len(fr) > self.segment_bytes and self._tail > F.HEAD + 64:
                    self._rotate()
                pos = self._put(fr)
                start = F.HEAD + F.HEADER.unpack_from(fr)[2]
                self._apply(meta, pos, fr, start, len(fr), pos + start)
                self._seq += 1
            if self._idle:                # wake the writer only if it sleeps
                self._cond.notify_all()
            return self._seq

    def _rotate(self) -> None:
        self._seg += 1
        self._tail = 0
        self._put(F.header_frame(self._base))

    def _put(self, fr: bytes) -> int:
        pos = (self._seg << SEG_SHIFT) | self._tail
        last = self._chunks[-1] if self._chunks else None
        if last is not None and last[0] == self._seg:
            last[2] += fr
        else:
            self._chunks.append([self._seg, self._tail, bytearray(fr)])
        self._tail += len(fr)
        self._disk += len(fr)
        return pos

    def add_function(self, fid: bytes, blob: bytes) -> int:
        """Store a pickled function once; returns the append's seq (the last seq if known)."""
        if fid in self._funcs:
            return self._seq
        return self._append([([F.K_FUNCTION, fid], blob)], check=True)

    def add_job(self, batch: str, key: int, fid: bytes, payload: bytes,
                options: dict | None = None) -> int:
        """Append one job to ``batch`` (created if new); returns its seq."""
        with self._lock:
            b = self._batches.get(batch)
            if b is None or (b.keys and key <= b.keys[-1]) or fid not in self._funcs:
                return self.add_jobs(batch, [(key, fid, payload, options)])   # or raise there
            if self._compacting:
                self._fids_since.add(fid)
            return self._append([([F.K_JOBS, b.bid, 1], F.job_entry(key, fid, payload, options))],
                                check=True)

    def add_jobs(self, batch: str, jobs: Iterable[tuple[int, bytes, bytes, dict | None]]) -> int:
        """Append jobs (key, fid, payload, options) to ``batch``, creating it if new: all of
        them or, on JournalFull or a bad key or fid, none. Keys must increase. Returns the seq
        that covers them all. More than BULK_BYTES go in several frames: a crash before that
        seq is durable may keep a prefix of them (acknowledge nothing before on_durable, and
        skip keys <= last_key() when a client resubmits after a restart)."""
        with self._lock:
            b = self._batches.get(batch)
            records: list[tuple[list, bytes]] = []
            if b is None:
                bid = self._next_bid
                records.append(([F.K_BATCH, bid, batch], b""))
            else:
                bid = b.bid
            last = b.keys[-1] if b is not None and b.keys else None
            entries = []
            for key, fid, payload, options in jobs:
                if last is not None and key <= last:
                    raise ValueError(f"batch {batch!r}: key {key} does not follow {last}")
                if fid not in self._funcs:
                    raise ValueError(f"batch {batch!r}: job {key} names an unknown function")
                entries.append(F.job_entry(key, fid, payload, options))
                last = key
                if self._compacting:
                    self._fids_since.add(fid)
            records += F.bulk_frames(F.K_JOBS, bid, entries)
            return self._append(records, check=True)

    def add_outcome(self, batch: str, key: int, status: int, payload: bytes) -> int:
        """Journal a job's outcome (status 0: done, else failed); see add_outcomes."""
        return self.add_outcomes(batch, [(key, status, payload)])

    def add_outcomes(self, batch: str, outcomes: Iterable[tuple[int, int, bytes]]) -> int:
        """Journal outcomes (key, status, payload), status 0 done, else failed. The first
        outcome of a key wins; a later one is not written. An outcome after a cancel still
        counts (the job was running). Never raises JournalFull. Returns the covering seq."""
        with self._lock:
            b = self._batch(batch)
            entries, seen = [], set()
            for key, status, payload in outcomes:
                if b.outs[b.index(key)] == -1 and key not in seen:
                    seen.add(key)
                    entries.append(F.outcome_entry(key, status, payload))
            if not entries:
                return self._seq
            return self._append(F.bulk_frames(F.K_OUTCOMES, b.bid, entries), check=False)

    def cancel(self, batch: str) -> int:
        """Mark every job of ``batch`` without an outcome cancelled (a running one that still
        finishes gets its outcome)."""
        with self._lock:
            b = self._batch(batch)
            if not b.keys:
                return self._seq
            return self._append([([F.K_CANCEL, b.bid, b.keys[-1]], b"")], check=False)

    def forget(self, batch: str) -> int:
        """Drop ``batch`` and all it holds; compact() gives the disk space back."""
        with self._lock:
            b = self._batch(batch)
            return self._append([([F.K_FORGET, b.bid], b"")], check=False)

    # -- reading ----------------------------------------------------------------------------

    # -- durability -------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The seq of the last accepted append."""
        return self._seq

    @property
    def durable(self) -> int:
        """Every append numbered up to this is on disk."""
        return self._durable

    @property
    def size_bytes(self) -> int:
        """The segments' total size, counting what is buffered."""
        return self._disk

    @property
    def buffered_bytes(self) -> int:
        """Bytes accepted but not yet on disk (the master may stop reading clients past some)."""
        with self._lock:
            return sum(len(c[2]) for c in self._chunks + self._inflight)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._chunks and not self._closed:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if not self._chunks:
                    return
                chunks = self._inflight = self._chunks
                self._chunks = []
                target = self._seq
            try:
                self._write(chunks)
            except BaseException as e:
                log.error("journal %s: write failed: %s", self.path, e)
                with self._lock:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._lock:
                self._inflight = []
                self._durable = target
                self._cond.notify_all()
            if self.on_durable is not None:
                try:
                    self.on_durable(target)
                except Exception:
                    log.exception("journal on_durable callback failed")

    def _write(self, chunks: list[list]) -> None:
        prev = None
        for seg, off, data in chunks:
            if prev is not None and seg != prev:
                os.fsync(self._fds[prev])            # sealed before the next one is written
            fd = self._fds.get(seg)
            if fd is None:
                fd = os.open(os.path.join(self.path, F.seg_name(seg)),
                             os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                F.fsync_dir(self.path)
                with self._lock:
                    self._fds[seg] = fd
            mv = memoryview(data)
            while mv:
                n = os.pwrite(fd, mv, off)
                mv, off = mv[n:], off + n
            prev = seg
        if prev is not None:
            os.fsync(self._fds[prev])

    def flush(self, timeout: float | None = 60.0) -> int:
        """Block until everything accepted so far is on disk; returns the durable seq."""
        with self._lock:
            target = self._seq
            ok = self._cond.wait_for(
                lambda: self._durable >= target or self._error is not None, timeout)
            if self._error is not None:
                raise JournalError(f"journal {self.path} failed: {self._error}")
            if not ok:
                raise TimeoutError(f"journal {self.path}: not durable after {timeout} s")
            return self._durable

    def compact(self) -> int:
        """Rewrite the live records of the sealed segments into one and delete them; returns
        the bytes given back. Blocks its caller while it copies (run it on a thread); appends
        and reads go on meanwhile, and wait only for the final swap of positions."""
        from cw.master.journal.compact import compact
        return compact(self)

    def _close_fds(self) -> None:
        for fd in [*self._fds.values(), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()

    def close(self) -> None:
        """Flush, stop the writer thread and release the lock."""
        if self._closed:
            return
        try:
            if self._error is None:
                self.flush()
        finally:
            with self._lock:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout=60)
            self._close_fds()
            self._lock_file.release()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
