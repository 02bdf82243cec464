"""A session bound to a named batch (campaigns): its jobs belong to the batch at the master.

    BatchSession(batch=name): after WELCOME, BATCH_OPEN --> {"next": key}: our seqs are the
        batch's keys from there on (a reopened batch goes on after its last key)
    submit --> BATCH_SUBMIT name (never the lane: a lane job would not be journaled)
    master --ACKED name upto error--> every job up to key ``upto`` is durable (its argument
        bytes leave the byte window: the master keeps them on disk, not in RAM); error: why
        the jobs of that message were refused (JournalFull), and their outcomes fail
    RESULTS --> futures settle as in any session, once the outcome is durable
    detach(): wait until every job is acknowledged, then leave: the jobs go on running

After a master restart the session opens nothing again: its resubmitted jobs name the batch,
the master skips those it journaled already and sends the outcomes it has of them (so an
acknowledged job keeps none of its argument bytes here: it is resent with an empty frame).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Any

from cw import protocol as P
from cw.client.session import ClientJob, Session
from cw.errors import BatchInUse, CwError, JournalFull, ProtocolError, UnknownBatch

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 30.0   # seconds BATCH_OPEN may take (the master may be busy journaling)
CHUNK_BYTES = 2 << 20  # argument bytes per BATCH_SUBMIT message
CHUNK_JOBS = 2048      # jobs per BATCH_SUBMIT message
ACKED_FRAMES = [b""]  # what an acknowledged job keeps of its arguments
ERRORS: dict[str, type[Exception]] = {
    "UnknownBatch": UnknownBatch, "BatchInUse": BatchInUse, "JournalFull": JournalFull,
    "ProtocolError": ProtocolError}


def error_of(err: list | None) -> Exception | None:
    """The exception a BATCH_REPLY's error names (a CwError if its type is not ours)."""
    if err is None:
        return None
    kind, message = err
    return ERRORS.get(kind, CwError)(message)


class InOrder:
    """Stands for the session's Alias: a lone job goes through the I/O thread like any
    batch, so no message overtakes another (the master journals keys in increasing order)."""

    def __init__(self, conn):
        self.conn = conn

    def send(self, frames: list) -> None:
        self.conn.call(self.conn.send, frames)

    def close(self) -> None:
        pass


class BatchSession(Session):
    """A Session whose jobs go to the named batch ``batch`` at the master."""

    def __init__(self, *args: Any, batch: str, **kwargs: Any):
        if not isinstance(batch, str) or not 0 < len(batch) <= 256:
            raise ValueError("a batch name is a string of 1 to 256 characters")
        self.batch = batch
        self.acked = 0                         # every key up to this is durable
        self.refused: str | None = None        # why the master refused jobs (JournalFull)
        self.sent: deque[ClientJob] = deque()  # sent, not yet acknowledged (in key order)
        self.last = 0                          # the highest key submitted
        self.acks = threading.Condition()
        self._reply: list = []
        self._opened = threading.Event()
        super().__init__(*args, **kwargs)
        self.alias.close()
        self.alias = InOrder(self.conn)  # type: ignore[assignment]  # keys stay in order
        self.conn.call(self.conn.send, [P.pack(P.BATCH_OPEN, 0, batch)])
        if not self._opened.wait(OPEN_TIMEOUT):
            self.close()
            raise TimeoutError(f"the master did not open batch {batch!r} within "
                               f"{OPEN_TIMEOUT:g} s")
        err, value = self._reply
        if err is not None:
            self.close()
            raise error_of(err)  # type: ignore[misc]
        with self.lock:
            self.seqs = itertools.count(int(value["next"]))
            self.acked = int(value["next"]) - 1
        self.durable = bool(value.get("durable"))

    def submit(self, *args: Any, **kwargs: Any) -> int:
        seq = super().submit(*args, **kwargs)
        self.last = seq
        return seq

    def flush(self) -> None:
        """Send the unsent jobs in messages of at most CHUNK_BYTES / CHUNK_JOBS (the master
        copies each into its journal: small messages keep its memory small)."""
        with self.lock:
            self.flush_asked = False
            batch, self.unsent = self.unsent, []
            i = 0
            while i < len(batch):
                j, size = i, 0
                while j < len(batch) and (j == i or (size < CHUNK_BYTES and j - i < CHUNK_JOBS)):
                    size += batch[j].size
                    j += 1
                self.conn.send(self._message(batch[i:j]))
                i = j

    def _message(self, batch: list[ClientJob]) -> list:
        """BATCH_SUBMIT, not SUBMIT (under lock)."""
        frames = super()._message(batch)
        header = P.unpack(frames[0])
        self.sent.extend(batch)
        return [P.pack(P.BATCH_SUBMIT, self.batch, header[1], header[2]), *frames[1:]]

    def _on_message(self, kind: int, header: list, frames: list) -> None:
        if kind == P.ACKED:
            self._acked(header[2], header[3])
        elif kind == P.BATCH_REPLY:
            if header[1] == 0:
                self._reply = [header[2], header[3]]
                self._opened.set()
        elif kind in (P.LANE, P.LANE_LOST):
            pass  # never the lane: its jobs would not be journaled
        else:
            super()._on_message(kind, header, frames)

    def _on_welcome(self, restarted: bool) -> None:
        if restarted:
            with self.lock:
                self.sent.clear()  # what is unsettled goes again, and is acknowledged again
        super()._on_welcome(restarted)

    def _acked(self, upto: int, error: str | None) -> None:
        with self.lock:
            while self.sent and self.sent[0].seq <= upto:
                job = self.sent.popleft()
                if not job.held and job.seq in self.jobs:
                    self.inflight -= job.size  # at the master's disk now, not in its RAM
                job.size = 0
                job.frames = ACKED_FRAMES  # durable there: resent (after a master restart)
                #                            only so that the master sends its outcome
            moved = self._admit()
        with self.acks:
            self.acked = max(self.acked, upto)
            if error:
                self.refused = error
            self.acks.notify_all()
        if moved:
            self.flush()

    def detach(self, timeout: float | None = None) -> None:
        """Return once the master has journaled every job submitted (JournalFull if it
        refused some, TimeoutError after ``timeout`` seconds), then leave it: the jobs go on
        running, their outcomes wait at the master for ``cw.batch.Batch``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.acks:
            while self.acked < self.last:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"batch {self.batch!r}: {self.last - self.acked} jobs "
                                       f"not acknowledged by the master after {timeout} s")
                self.acks.wait(min(left, 1.0) if left is not None else 1.0)
            refused = self.refused
        self.close()
        if refused:
            raise JournalFull(f"batch {self.batch!r}: the master refused jobs: {refused}")
