"""The journal's on-disk format: framed records in numbered segment files, and the writer lock.

A journal is a directory::

    PATH/
      LOCK                     "host pid\\n", created O_CREAT|O_EXCL by the one writer
      seg-00000001.log         sealed segment (fsync'ed before the next one is written)
      seg-00000002.log         the active segment: appended to, the only one with a torn tail
      seg-00000003.log.tmp     a compaction in progress (deleted on open: never trusted)

A segment is a sequence of frames; the first frame of every segment is a header::

    +-----------+-----------+-------------+----------------------+------------------+
    | u32 len   | u32 crc32 | u32 metalen | meta (msgpack array) | payload (raw)    |
    +-----------+-----------+-------------+----------------------+------------------+
      len = 4 + metalen + len(payload);  crc32 covers metalen, meta and payload (little endian)

    meta:  [0, "cw-journal", VERSION, base]      header; segments numbered < base are dead
           [1, fid]                  payload = pickled function   (stored once per fid)
           [2, bid, name]            a batch is created, bid a small int used by what follows
           [3, bid, n]               jobs: payload = n job entries (keys increase per batch)
           [4, bid, n]               outcomes: payload = n outcome entries
           [5, bid, upto]            cancel: jobs with key <= upto and no outcome yet
           [6, bid]                  forget: the batch and everything it holds is dead

A bulk frame (jobs, outcomes) carries many entries under one checksum, each indexed by its own
position, so a restart does one crc32 per frame and a struct.unpack per job, not a msgpack
decode and a crc per job::

    job entry:     [u32 entry_len][i64 key][u16 fidlen][u32 optlen] fid, opts (msgpack), args
    outcome entry: [u32 entry_len][i64 key][i32 status] outcome  (status 0 done, else failed)

Recovery reads the segments in order: a short, torn or bad-crc frame ends the last segment (it
is truncated there); anywhere else it is corruption. Only the small meta is decoded on open,
the payload is only checksummed, so a restart costs one sequential read.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import socket
import struct
import zlib

import msgpack

from cw.errors import JournalCorrupt, JournalLocked

log = logging.getLogger(__name__)

VERSION = 1
MAGIC = "cw-journal"
HEADER = struct.Struct("<III")           # len, crc32, metalen
HEAD = HEADER.size
K_HEADER, K_FUNCTION, K_BATCH, K_JOBS, K_OUTCOMES, K_CANCEL, K_FORGET = range(7)
JOB_ENTRY = struct.Struct("<IqHI")       # entry_len, key, fidlen, optlen
OUT_ENTRY = struct.Struct("<Iqi")        # entry_len, key, status
BULK_BYTES = 1 << 20                     # a bulk frame is cut after this many entry bytes
MAX_FRAME = 1 << 31
SEG_RE = re.compile(r"^seg-(\d{8})\.log$")
READ_CHUNK = 16 << 20


def seg_name(n: int) -> str:
    """The file name of segment number ``n``."""
    return f"seg-{n:08d}.log"


def frame(meta: list, payload: bytes = b"") -> bytes:
    """One record, ready to append: header, msgpack meta and the raw payload."""
    m = msgpack.packb(meta, use_bin_type=True)
    ml = struct.pack("<I", len(m))
    crc = zlib.crc32(payload, zlib.crc32(m, zlib.crc32(ml)))
    n = 4 + len(m) + len(payload)
    if n >= MAX_FRAME:
        raise ValueError(f"journal record of {n} bytes is too large")
    return b"".join((struct.pack("<II", n, crc), ml, m, payload))


def job_entry(key: int, fid: bytes, payload: bytes, options: dict | None) -> bytes:
    """One job of a jobs frame."""
    opts = b"" if options is None else msgpack.packb(options, use_bin_type=True)
    n = JOB_ENTRY.size + len(fid) + len(opts) + len(payload)
    return b"".join((JOB_ENTRY.pack(n, key, len(fid), len(opts)), fid, opts, payload))


def parse_job(entry: bytes) -> tuple[int, bytes, bytes, dict | None]:
    """(key, fid, payload, options) of a job entry."""
    n, key, fl, ol = JOB_ENTRY.unpack_from(entry)
    a = JOB_ENTRY.size
    fid = entry[a:a + fl]
    opts = msgpack.unpackb(entry[a + fl:a + fl + ol], raw=False) if ol else None
    return key, fid, entry[a + fl + ol:n], opts


def outcome_entry(key: int, status: int, payload: bytes) -> bytes:
    """One outcome of an outcomes frame."""
    return OUT_ENTRY.pack(OUT_ENTRY.size + len(payload), key, status) + payload


def bulk_frames(kind: int, bid: int, entries: list[bytes]) -> list[tuple[list, bytes]]:
    """(meta, payload) of the bulk frames that carry ``entries``, cut every BULK_BYTES."""
    out: list[tuple[list, bytes]] = []
    cut: list[bytes] = []
    size = 0
    for e in entries:
        cut.append(e)
        size += len(e)
        if size >= BULK_BYTES:
            out.append(([kind, bid, len(cut)], b"".join(cut)))
            cut, size = [], 0
    if cut:
        out.append(([kind, bid, len(cut)], b"".join(cut)))
    return out


def read_entry(fd: int, off: int) -> bytes:
    """The entry (of a bulk frame) that starts at ``off`` of segment ``fd``."""
    head = os.pread(fd, 4096, off)
    n = struct.unpack_from("<I", head)[0]
    return head[:n] if n <= len(head) else head + os.pread(fd, n - len(head), off + len(head))


def header_frame(base: int) -> bytes:
    """The first record of a segment: live segments are those numbered >= ``base``."""
    return frame([K_HEADER, MAGIC, VERSION, base])


def parse(buf: bytes | memoryview, off: int = 0) -> tuple[list, int, int]:
    """Decode the frame at ``off`` of a complete frame buffer: (meta, payload offset, payload
    length). Assumes a frame that was checked when the journal was opened."""
    n, _crc, ml = HEADER.unpack_from(buf, off)
    meta = msgpack.unpackb(buf[off + HEAD:off + HEAD + ml], raw=False, use_list=True)
    start = off + HEAD + ml
    return meta, start, off + 8 + n - start


class Scan:
    """What a replay of one segment found (Index._replay fills it in): ``good`` is the offset
    where the valid frames end and ``error`` says what was wrong there ("" at a clean end)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.good = 0
        self.error = ""


def read_frame(fd: int, off: int) -> bytes:
    """The complete frame that starts at ``off`` of segment ``fd``."""
    head = os.pread(fd, HEAD, off)
    n = HEADER.unpack(head)[0]
    return head + os.pread(fd, 8 + n - HEAD, off + HEAD)


def fsync_dir(path: str) -> None:
    """Make the creation, rename or deletion of a file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_segments(path: str) -> list[int]:
    """The segment numbers found in the journal directory, in order."""
    return sorted(int(m.group(1)) for m in map(SEG_RE.match, os.listdir(path)) if m)


def read_base(path: str, n: int) -> int | None:
    """The ``base`` of segment ``n``'s header record, or None if it has no valid header (torn:
    the replay says what is wrong with it)."""
    fd = os.open(os.path.join(path, seg_name(n)), os.O_RDONLY)
    try:
        head = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    if len(head) < HEAD:
        return None
    n_, crc, ml = HEADER.unpack_from(head)
    if n_ < 4 or ml > n_ - 4 or 8 + n_ > len(head) or zlib.crc32(head[8:8 + n_]) != crc:
        return None
    meta = msgpack.unpackb(head[HEAD:HEAD + ml], raw=False)
    if meta[:3] != [K_HEADER, MAGIC, VERSION]:
        raise JournalCorrupt(f"{seg_name(n)} in {path} does not start with a cw-journal "
                             f"version {VERSION} header")
    return int(meta[3])


class Lock:
    """The single-writer lock: PATH/LOCK made with O_CREAT|O_EXCL (atomic on NFSv3+ and
    Lustre), holding "host pid". A lock left by a dead process of this host is taken over; any
    other raises JournalLocked (a lock of another host cannot be checked from here)."""

    def __init__(self, path: str):
        self.file = os.path.join(path, "LOCK")
        self.text = f"{socket.gethostname()} {os.getpid()}\n"
        for _attempt in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                os.write(fd, self.text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path)
            return
        raise JournalLocked(f"journal {path} is locked and the lock could not be taken over")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.file) as f:
                text = f.read()
        except FileNotFoundError:
            return
        host, _, pid = text.strip().partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            raise JournalLocked(f"journal is locked by {text.strip()!r} ({self.file})")
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.warning("journal lock %s of dead pid %s taken over", self.file, pid)
            try:
                os.unlink(self.file)
            except FileNotFoundError:
                pass
            return
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
        raise JournalLocked(f"journal is locked by live process {pid} on {host} ({self.file})")

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        try:
            with open(self.file) as f:
                if f.read() != self.text:
                    return
            os.unlink(self.file)
        except FileNotFoundError:
            pass
