"""The master's journal (cw/master/journal/store.py) on real files: recovery of torn and corrupt tails,
the single-writer lock, max_bytes, compaction that survives a crash at every step, and a
writer SIGKILLed mid-run that keeps every record it was told was durable."""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from cw.errors import JournalCorrupt, JournalFull, JournalLocked, UnknownBatch
from cw.master.journal import CANCELLED, DONE, FAILED, QUEUED, Journal
from cw.master.journal.format import list_segments, seg_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID = b"f" * 16


def fill(j: Journal, batch: str, keys: range, size: int = 100) -> None:
    j.add_function(FID, b"pickled function")
    j.add_jobs(batch, [(k, FID, b"%d:" % k + b"x" * size, {"k": k} if k % 7 == 0 else None)
                       for k in keys])


def snapshot(j: Journal) -> dict:
    """Everything a journal holds, read back."""
    out = {}
    for name in j.batches():
        b = j._batch(name)
        out[name] = (j.status(name), [
            (k, j.state(name, k), j.read_job(name, k), j.read_outcome(name, k))
            for k in b.keys])
    return out


def last_segment(path: str) -> str:
    return os.path.join(path, seg_name(list_segments(path)[-1]))


def test_round_trip_and_reopen(tmp_path):
    durable: list[int] = []
    with Journal(str(tmp_path), on_durable=durable.append) as j:
        fill(j, "a", range(10, 60))
        assert j.read_job("a", 14).options == {"k": 14}        # read back while buffered
        j.add_job("a", 100, FID, b"late", {"timeout": 3})
        j.add_outcomes("a", [(10, 0, b"r10"), (11, 1, b"e11"), (10, 0, b"again")])
        seq = j.flush()
        assert seq == j.seq and durable and durable[-1] == seq
        assert durable == sorted(durable)
        before = snapshot(j)
        assert list(j.pending("a"))[:3] == [12, 13, 14]
        assert list(j.pending("a", after=50)) == list(range(51, 60)) + [100]
        assert list(j.keys("a", DONE)) == [10] and list(j.keys("a", FAILED)) == [11]
        assert list(j.keys("a", after=57)) == [58, 59, 100]
    with Journal(str(tmp_path)) as j:
        assert snapshot(j) == before
        st = j.status("a", running=2)
        assert st == {"jobs": 51, "queued": 47, "running": 2, "done": 1, "failed": 1,
                      "cancelled": 0}
        assert j.read_outcome("a", 10).payload == b"r10"       # the first outcome wins
        assert j.read_outcome("a", 12) is None
        assert j.read_job("a", 100).payload == b"late"
        assert j.read_function(FID) == b"pickled function"
        assert j.last_key("a") == 100
        j.add_job("a", 101, FID, b"keys continue")
        with pytest.raises(ValueError):
            j.add_job("a", 101, FID, b"not increasing")
        with pytest.raises(ValueError):
            j.add_jobs("a", [(102, FID, b"ok", None), (103, b"unknown fid", b"", None)])
        assert j.last_key("a") == 101                          # nothing of that call
        with pytest.raises(UnknownBatch):
            j.status("nope")
        with pytest.raises(LookupError):
            j.read_job("nope", 1)


def test_segments_rotate_and_are_read_back(tmp_path):
    with Journal(str(tmp_path), segment_bytes=4096) as j:
        for k in range(300):
            fill(j, "a", range(k, k + 1), size=200)
        j.add_outcomes("a", [(k, k % 2, b"o%d" % k) for k in range(0, 300, 3)])
        before = snapshot(j)
    assert len(list_segments(str(tmp_path))) > 10
    with Journal(str(tmp_path), segment_bytes=4096) as j:
        assert snapshot(j) == before
        assert j.status("a")["failed"] == 50


def test_cancel_then_outcome_and_new_jobs(tmp_path):
    with Journal(str(tmp_path)) as j:
        fill(j, "a", range(10))
        j.add_outcome("a", 0, 0, b"done before")
        j.cancel("a")
        j.add_outcome("a", 1, 1, b"was running")              # a running job still settles
        fill(j, "a", range(10, 13))
        states = [j.state("a", k) for k in range(13)]
        assert states == [DONE, FAILED] + [CANCELLED] * 8 + [QUEUED] * 3
        assert list(j.pending("a")) == [10, 11, 12]
        before = snapshot(j)
        j.compact()
        assert snapshot(j) == before
    with Journal(str(tmp_path)) as j:
        assert snapshot(j) == before


@pytest.mark.parametrize("cut", [1, 4, 8, 11, 12, 30, -1])
def test_truncated_last_write_is_dropped(tmp_path, caplog, cut):
    path = str(tmp_path / "j")
    with Journal(path) as j:
        fill(j, "a", range(20))
        before = snapshot(j)
    seg = last_segment(path)
    good = os.path.getsize(seg)
    with Journal(path) as j:
        j.add_job("a", 20, FID, b"y" * 500)
    full = os.path.getsize(seg)
    keep = good + cut if cut > 0 else full + cut
    os.truncate(seg, keep)
    with caplog.at_level(logging.WARNING, logger="cw.master.journal.store"):
        j = Journal(path)
    assert f"dropping the last {keep - good} bytes" in caplog.text
    assert snapshot(j) == before and os.path.getsize(seg) == good
    j.add_job("a", 20, FID, b"again")                          # appends after the cut
    j.close()
    with Journal(path) as j:
        assert j.read_job("a", 20).payload == b"again"


def test_flipped_byte(tmp_path):
    path = str(tmp_path)
    with Journal(path, segment_bytes=2048) as j:
        for k in range(40):
            fill(j, "a", range(k, k + 1))
    segs = list_segments(path)
    assert len(segs) >= 3
    last = last_segment(path)
    size = os.path.getsize(last)
    with open(last, "r+b") as f:                               # the last record: a torn write
        f.seek(size - 3)
        b = f.read(1)
        f.seek(size - 3)
        f.write(bytes([b[0] ^ 0x40]))
    with Journal(path, segment_bytes=2048) as j:
        assert j.last_key("a") == 38
    middle = os.path.join(path, seg_name(segs[1]))              # a sealed segment: corruption
    with open(middle, "r+b") as f:
        f.seek(os.path.getsize(middle) // 2)
        b = f.read(1)
        f.seek(os.path.getsize(middle) // 2)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(JournalCorrupt):
        Journal(path, segment_bytes=2048)
    assert not os.path.exists(os.path.join(path, "LOCK"))       # a failed open lets go


def test_lock(tmp_path):
    path = str(tmp_path)
    j = Journal(path)
    with pytest.raises(JournalLocked):
        Journal(path)                                          # this live process holds it
    j.close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    with open(os.path.join(path, "LOCK"), "w") as f:
        f.write(f"{socket.gethostname()} {dead.pid}\n")
    Journal(path).close()                                      # a dead pid's lock: taken over
    with open(os.path.join(path, "LOCK"), "w") as f:
        f.write("some-other-host 1\n")
    with pytest.raises(JournalLocked, match="some-other-host"):
        Journal(path)


def test_max_bytes(tmp_path):
    path = str(tmp_path)
    j = Journal(path, max_bytes=64 << 10)
    fill(j, "a", range(0))
    k = 0
    with pytest.raises(JournalFull):
        while True:
            j.add_jobs("a", [(k, FID, b"z" * 1000, None), (k + 1, FID, b"z" * 1000, None)])
            k += 2
    assert j.last_key("a") == k - 1                           # nothing of the failed call
    assert j.size_bytes <= 64 << 10
    j.add_outcomes("a", [(i, 0, b"ok") for i in range(k)])     # outcomes are never refused
    j.cancel("a")
    with pytest.raises(JournalFull):
        j.add_job("b", 0, FID, b"z" * 1000)
    with pytest.raises(UnknownBatch):
        j.status("b")                                          # not even the batch
    j.forget("a")
    freed = j.compact()
    assert freed > 60 << 10 and j.size_bytes < 4 << 10
    assert not j.has_function(FID)                            # no live job uses it any more
    j.add_function(FID, b"pickled function")
    j.add_job("b", 0, FID, b"z" * 1000)
    j.close()
    with Journal(path, max_bytes=64 << 10) as j:
        assert j.batches() == ["b"] and j.status("b")["jobs"] == 1


def test_compaction_leftovers(tmp_path):
    path = str(tmp_path / "j")
    with Journal(path, segment_bytes=8192) as j:
        fill(j, "keep", range(50))
        fill(j, "drop", range(50))
        j.add_outcomes("keep", [(k, 0, b"r") for k in range(0, 50, 2)])
        j.forget("drop")
        j.flush()
        old = {n: open(os.path.join(path, seg_name(n)), "rb").read()
               for n in list_segments(path)}
        before = snapshot(j)
        j.compact()
        assert snapshot(j) == before
        target, active = list_segments(path)
    for n, data in old.items():                                # a crash before the deletes
        if n != target:
            with open(os.path.join(path, seg_name(n)), "wb") as f:
                f.write(data)
    with open(os.path.join(path, seg_name(active) + ".tmp"), "wb") as f:
        f.write(b"half a compaction" * 100)                   # a crash before a rename
    with Journal(path, segment_bytes=8192) as j:
        assert snapshot(j) == before
    assert sorted(os.listdir(path)) == [seg_name(target), seg_name(active)]


KILLED_COMPACTION = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from cw.master.journal import Journal
    point = sys.argv[1]
    real_rename, real_unlink = os.rename, os.unlink
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def rename(a, b):
        if point == "before-rename":
            die()
        real_rename(a, b)
        if point == "after-rename":
            die()
    def unlink(p):
        real_unlink(p)
        if point == "after-unlink":
            die()
    j = Journal({path!r}, segment_bytes=8192)
    os.rename, os.unlink = rename, unlink
    j.compact()
""")


@pytest.mark.parametrize("point", ["before-rename", "after-rename", "after-unlink"])
def test_compaction_killed(tmp_path, point):
    path = str(tmp_path / "j")
    with Journal(path, segment_bytes=8192) as j:
        fill(j, "keep", range(60))
        fill(j, "drop", range(60))
        j.add_outcomes("keep", [(k, 1, b"e") for k in range(0, 60, 3)])
        j.forget("drop")
        kept = snapshot(j)
    p = subprocess.run([sys.executable, "-c", KILLED_COMPACTION.format(root=ROOT, path=path),
                        point], timeout=60)
    assert p.returncode == -signal.SIGKILL
    with Journal(path, segment_bytes=8192) as j:
        assert snapshot(j) == kept
        j.compact()
        assert snapshot(j) == kept


WRITER = textwrap.dedent("""
    import bisect, os, sys
    sys.path.insert(0, {root!r})
    from cw.master.journal import Journal
    seqs = []                  # seqs[k]: the seq that covers job k and the outcome of job k-10
    def durable(seq):
        k = bisect.bisect_right(seqs, seq) - 1
        os.write(1, b"%d\\n" % k)
    j = Journal({path!r}, on_durable=durable, segment_bytes=1 << 16)
    j.add_function(b"f" * 16, b"fn")
    k = 0
    while True:
        j.add_job("a", k, b"f" * 16, b"%d;" % k * 20)
        s = j.add_outcome("a", k - 10, 0, b"r%d" % (k - 10)) if k >= 10 else j.seq
        seqs.append(s)
        k += 1
""")


def test_sigkill_mid_run_keeps_every_durable_record(tmp_path):
    path = str(tmp_path / "j")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, path=path)],
                            stdout=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    reported, buf, deadline = -1, b"", time.monotonic() + 60
    try:
        while reported < 5000:
            assert time.monotonic() < deadline, "the writer reported too little durability"
            assert sel.select(timeout=deadline - time.monotonic()), "no durability reported"
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"writer died: {proc.wait()}"
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if lines:
                reported = max(reported, int(lines[-1]))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    with Journal(path, segment_bytes=1 << 16) as j:
        assert j.last_key("a") >= reported
        for k in range(reported + 1):
            assert j.read_job("a", k).payload == b"%d;" % k * 20
        for k in range(reported - 9):
            assert j.read_outcome("a", k).payload == b"r%d" % k
        st = j.status("a")
        assert st["done"] >= reported - 9 and st["jobs"] == j.last_key("a") + 1


def test_forget_and_unknown(tmp_path):
    with Journal(str(tmp_path)) as j:
        fill(j, "a", range(5))
        fill(j, "b", range(5))
        j.forget("a")
        with pytest.raises(UnknownBatch):
            j.forget("a")
        with pytest.raises(UnknownBatch):
            j.cancel("a")
        assert j.batches() == ["b"]
        fill(j, "a", range(3))                                 # the name may be reused
        assert j.status("a")["jobs"] == 3
    with Journal(str(tmp_path)) as j:
        assert j.batches() == ["b", "a"] and j.status("a")["jobs"] == 3


@pytest.mark.parametrize("left", [0, 5])
def test_new_segment_torn_at_its_header(tmp_path, left):
    """A crash right after a segment was created (empty) or while its header was written."""
    path = str(tmp_path)
    with Journal(path, segment_bytes=2048) as j:
        for k in range(30):
            fill(j, "a", range(k, k + 1))
    last = list_segments(path)[-1]
    with Journal(path, segment_bytes=2048) as j:
        before = snapshot(j)
    with open(os.path.join(path, seg_name(last + 1)), "wb") as f:
        f.write(b"\x50\x00\x00\x00\x01"[:left])
    with Journal(path, segment_bytes=2048) as j:
        assert snapshot(j) == before
        fill(j, "a", range(30, 60))
        before = snapshot(j)
    with Journal(path, segment_bytes=2048) as j:
        assert snapshot(j) == before


def test_appends_and_reads_during_compaction(tmp_path):
    """What happens between the copy and the swap lands in the new active segment and
    survives; a function only a job added meanwhile uses is stored again; an unused one goes."""
    from cw.master.journal.compact import compact
    path = str(tmp_path)
    g, h = b"g" * 16, b"h" * 16
    seen = {}
    with Journal(path, segment_bytes=4096) as j:
        fill(j, "keep", range(40))
        fill(j, "drop", range(40))
        fill(j, "late", range(5))
        j.add_outcomes("keep", [(k, 0, b"early") for k in range(0, 40, 4)])
        j.add_function(g, b"function g")
        j.add_function(h, b"function h")
        j.forget("drop")

        def meanwhile():
            assert j.read_job("keep", 3).payload.startswith(b"3:")     # old positions
            j.add_outcomes("keep", [(k, 1, b"late") for k in range(1, 40, 4)])
            fill(j, "keep", range(40, 50))
            j.add_jobs("new", [(1, g, b"uses g", None)])
            j.cancel("late")
            j.forget("late")
            seen.update(snapshot(j))

        freed = compact(j, between=meanwhile)
        assert freed > 0
        assert snapshot(j) == seen
        assert j.has_function(g) and not j.has_function(h)
        assert j.read_function(g) == b"function g"
    with Journal(path, segment_bytes=4096) as j:
        assert snapshot(j) == seen and j.batches() == ["keep", "new"]
        assert j.read_function(g) == b"function g" and not j.has_function(h)
        assert j.status("keep") == {"jobs": 50, "queued": 30, "running": 0, "done": 10,
                                    "failed": 10, "cancelled": 0}
        j.compact()                                            # and once more
        assert snapshot(j) == seen
