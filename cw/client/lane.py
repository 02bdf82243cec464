"""The client's end of the lane: lone jobs straight to a worker on this machine.

    master --LANE endpoint cid--> granted(): connect to that worker's lane (one at a time)
    Session.submit, a lone job (nothing else in flight, default options, small)
        --send(job)--> LJOB on the lane (from the submitting thread, under the session lock)
    worker --LRESULT / LSTARTED / BOUNCE--> our inbox (its own thread) --> on_inbox():
        a result or "started" is delivered like any RESULTS; a BOUNCE resends the job
        through the master
    master --LANE_LOST-->, or the worker's connection to our inbox closes --> lost():
        what was on the lane goes through the master (a death is charged there)

A lane job stays in ``Session.jobs`` until settled, so every path that loses it (BOUNCE,
LANE_LOST, a closed connection, a master restart) sends it again; the first outcome wins.
The framing and sockets are cw.conn.lane's.
"""
from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from cw import protocol as P
from cw.conn import lane
from cw.errors import ProtocolError

if TYPE_CHECKING:
    from cw.client.session import ClientJob, Session

log = logging.getLogger(__name__)

DIGESTS_KEPT = 10_000          # digests remembered as sent; beyond, forgotten (sent again)
LANE_TIMEOUT = 5.0             # seconds a lone job may wait to enter a worker's lane
LANE_MAX_BYTES = 1 << 20       # larger arguments go through the master (zero-copy there)


class LaneClient:
    """A session's lane and inbox. Fields marked "lock" are guarded by the session's lock."""

    def __init__(self, session: Session):
        self.session = session
        self.inbox: str | None = None           # where lane results come (I/O thread)
        self.endpoint: str | None = None        # lock: the worker's lane we hold
        self.cid = 0                            # lock: our client id there
        self.sock: socket.socket | None = None  # lock: our connection to it
        self.has: set[bytes] = set()            # lock: digests sent on this lane
        self.jobs: dict[int, tuple[ClientJob, str]] = {}  # lock: seq -> (job, endpoint)

    # ---------------------------------------------------------------- submitting thread
    def send(self, job: ClientJob) -> bool:
        """Send a lone job on the lane (under lock); False if there is none or it is not
        connected (yet, or any more): then it goes through the master."""
        if self.sock is None or self.endpoint is None:  # (both are set together)
            return False
        has_blob = job.digest not in self.has
        if has_blob and len(self.has) >= DIGESTS_KEPT:
            self.has.clear()
        if job.size + (len(job.blob) if has_blob else 0) > LANE_MAX_BYTES:
            return False
        header = P.pack(P.LJOB, self.cid, job.seq, job.digest, len(job.frames), self.inbox,
                        has_blob)
        frames = [header, job.blob, *job.frames] if has_blob else [header, *job.frames]
        try:
            lane.send(self.sock, frames)
        except OSError as exc:  # the worker is gone or stuck: part of it may have gone,
            log.info("lane to %s failed (%s); using the master", self.endpoint, exc)
            self.drop()  # so this connection is done for (the worker drops the part)
            return False
        if has_blob:
            self.has.add(job.digest)
        self.jobs[job.seq] = (job, self.endpoint)
        return True

    def drop(self) -> None:
        """Close our connection to the lane (under lock)."""
        if self.sock is not None:
            self.sock.close()
        self.endpoint, self.sock = None, None

    def forget_all(self) -> None:
        """A new master: nothing is on a lane any more (under lock; resent by the caller)."""
        self.drop()
        self.jobs.clear()

    # ---------------------------------------------------------------- I/O thread
    def open_inbox(self) -> None:
        """Bind the inbox before the first HELLO (which says we have one)."""
        conn = self.session.conn
        self.inbox = conn.listen("inbox", self.on_inbox, self.on_inbox_closed)
        if self.inbox:
            conn.info["inbox"] = True

    def granted(self, endpoint: str, cid: int) -> None:
        """LANE: the master names a worker on this machine."""
        if not lane.is_endpoint(endpoint) or not isinstance(cid, int):
            raise ProtocolError("LANE needs a socket path and a client id")
        session = self.session
        if session.closed or not self.inbox:
            return
        try:  # not under the lock: a stuck worker must not stall submitting threads
            sock = lane.connect(endpoint, self.inbox, LANE_TIMEOUT)
        except OSError as exc:
            log.info("cannot use the lane at %s: %s", endpoint, exc)
            return
        with session.lock:
            self.drop()
            if session.closed:
                sock.close()
                return
            self.endpoint, self.cid, self.has = endpoint, cid, set()
            self.sock = sock
        log.debug("lane to the worker at %s", endpoint)

    def lost(self, endpoint: str, why: str, graceful: bool) -> None:
        """LANE_LOST (or no word after a close): the lane's worker left; what was on it goes
        through the master (a death is charged to the job there)."""
        with self.session.lock:
            if self.endpoint == endpoint:
                self.drop()
            seqs = [seq for seq, (_, ep) in self.jobs.items() if ep == endpoint]
        self.resend(seqs, None if graceful else str(why))

    def resend(self, seqs: list, loss: str | None) -> None:
        """Send these lane jobs again through the master, naming a death if there was one."""
        session = self.session
        with session.lock:
            jobs = [self.jobs.pop(seq)[0] for seq in seqs if seq in self.jobs]
            jobs = [job for job in jobs if session.jobs.get(job.seq) is job]
            for job in jobs:
                if loss is not None:
                    job.opts = {"losses": [loss]}
            session.unsent[:0] = jobs
        if jobs:
            if loss is not None:
                log.warning("lost the lane's worker (%s); resending %d job(s) through the "
                            "master", loss, len(jobs))
            session.flush()

    def _closed(self, peer: str) -> None:
        """The worker died, left, or gave up sending to us. The master's LANE_LOST says
        which (and charges a death); if none comes, resend anyway (it gave up)."""
        session = self.session
        with session.lock:
            if self.endpoint == peer:
                self.drop()
            waiting = any(ep == peer for _, ep in self.jobs.values())
        if waiting:
            loop = session.conn.loop
            assert loop is not None  # we run in it
            loop.call_later(2 * session.conn.heartbeat_timeout, self.lost, peer,
                            "its connection closed", True)

    # ---------------------------------------------------------------- inbox thread
    def on_inbox(self, frames: list) -> None:
        """A lane job's outcome, its "started" note, or a BOUNCE; bad input is dropped."""
        session = self.session
        try:
            header = P.unpack(frames[0])
            kind, seq = header[0], header[1]
            if not isinstance(seq, int):
                raise ProtocolError("no job number")
            if kind == P.LRESULT:
                status, n = header[2], header[3]
                if not isinstance(status, int) or n != len(frames) - 1:
                    raise ProtocolError("LRESULT frame count does not match its header")
                with session.lock:
                    self.jobs.pop(seq, None)
                session.results([], [[seq, status, n]], frames[1:])
            elif kind == P.LSTARTED:
                session.results([seq], [], [])
            elif kind == P.BOUNCE:
                session.conn.call(self.resend, [seq], None)
            else:
                raise ProtocolError(f"unexpected kind {kind}")
        except (ProtocolError, ValueError, TypeError, IndexError) as exc:
            log.warning("dropped a bad message on the inbox: %s", exc)

    def on_inbox_closed(self, peer: str) -> None:
        """A worker's connection to our inbox closed."""
        self.session.conn.call(self._closed, peer)
