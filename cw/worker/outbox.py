"""A worker process's notes to the master, gathered and sent as one RESULTS message.

    main thread: job taken --note(started)--> Outbox <--note(done + frames)-- job finished
                 lane job done --note(lane_done)-->  (the master counts lane jobs)
    take() --> [RESULTS started done busy lane, *frames], sent by whichever thread flushes:
      the main thread when idle or past the low-water mark, the I/O thread's tick when a
      note has waited FLUSH_INTERVAL, and the leaving worker before its BYE

Not thread-safe by itself: every call is made under the worker's condition lock.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from cw import protocol as P

FLUSH_INTERVAL = 0.025     # seconds a started/done note may wait (the I/O thread's tick)
FLUSH_MAX = 256            # notes that force a flush


class Outbox:
    """Started and done notes, result frames, and the busy seconds they took."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Drop everything (a new master knows nothing of it)."""
        self.started: list[list] = []
        self.done: list[list] = []
        self.frames: list = []
        self.lane: list[list] = []   # lane jobs done [[cid, seq]]: the master counts them
        self.busy = 0.0              # seconds spent running the done jobs
        self.since = 0.0             # monotonic time of the oldest note waiting

    def note(self, started: list, done: list, frames: list, lane_done: Sequence = ()) -> None:
        if not self.has_notes():
            self.since = time.monotonic()
        self.started.extend(started)
        self.done.extend(done)
        self.frames.extend(frames)
        self.lane.extend(lane_done)

    def has_notes(self) -> bool:
        return bool(self.started or self.done or self.lane)

    def old(self, now: float) -> bool:
        """A note has waited a tick: send it now."""
        return self.has_notes() and now - self.since >= FLUSH_INTERVAL

    def full(self, pending: int) -> bool:
        """Flush when idle, or once half of what we held is done (the low-water mark): the
        master refills us while we run the other half."""
        return len(self.done) >= pending or len(self.done) >= FLUSH_MAX

    def take(self) -> list | None:
        """The notes as one RESULTS message (None if there are none), emptied."""
        if not self.has_notes():
            return None
        message = [P.pack(P.RESULTS, self.started, self.done, self.busy, self.lane),
                   *self.frames]
        self.clear()
        return message
