"""The worker's end of the lane: lone jobs straight from clients on this machine.

    client --LJOB--> LaneServer.on_job (lane thread): idle and the client known?
        yes: queued to run next (Worker.pending); the main thread runs it, then done():
             small result --LRESULT--> the client's inbox, large one --LANE_RESULT--> master
        no:  --BOUNCE--> the client (from the I/O thread): it resends through the master
    running past a tick (I/O thread): --LSTARTED--> the client, --LANE_BUSY--> the master
    an inbox we cannot reach --LANE_REFUSED--> the master, which takes the lane back
    a gone client (FORGET) --> forget(): its inbox connections closed

The lane's framing and sockets are cw.conn.lane's; this object holds the worker's part
and is the only code of the worker that knows of lanes besides the ``Task.lane`` mark.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cw import protocol as P
from cw.conn import lane
from cw.errors import ProtocolError

if TYPE_CHECKING:
    from cw.worker.process import Task, Worker

log = logging.getLogger(__name__)

RESULT_TIMEOUT = 30.0      # seconds a lane result may wait for its client to read it
LANE_RESULT_MAX = 64 << 10  # larger lane results go through the master (they never block us)


class LaneServer:
    """One worker process's lane: its listener, and its connections to clients' inboxes."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.results_out: lane.Outlets | None = None  # main thread: results to inboxes
        self.result_inboxes: dict[int, str] = {}      # cid -> its inbox (main thread)
        self.io_out: lane.Outlets | None = None       # I/O thread: BOUNCE, LSTARTED
        self.io_inboxes: dict[int, str] = {}

    def open(self) -> None:
        """Bind the lane before the first HELLO, which tells the master where it is."""
        conn = self.worker.conn
        endpoint = conn.listen("lane", self.on_job)
        if endpoint:
            conn.info["lane"] = endpoint
        self.io_out = lane.Outlets(endpoint or "", 0.0)  # never blocks the I/O thread

    def start(self) -> None:
        """The main thread's outlets (once connected)."""
        self.results_out = lane.Outlets(self.worker.conn.info.get("lane", ""), RESULT_TIMEOUT)

    def close(self) -> None:
        if self.results_out is not None:
            self.results_out.close_all()
        if self.io_out is not None:
            self.worker.conn.call(self.io_out.close_all)  # before the connection's shutdown

    def on_job(self, frames: list) -> None:
        """A client's lone job (lane thread): run it next if we are idle and know the client
        (its context and function), else BOUNCE it back."""
        try:
            kind, cid, seq, digest, n, inbox, has_blob = P.unpack(frames[0])
            if kind != P.LJOB or not all(isinstance(x, int) for x in (cid, seq, n)) or \
                    not isinstance(digest, bytes) or n < 1 or not lane.is_endpoint(inbox) \
                    or len(frames) != 1 + bool(has_blob) + n:
                raise ProtocolError("not a well-formed LJOB")
        except (ProtocolError, ValueError, TypeError) as exc:
            log.warning("dropped a bad message on the lane: %s", exc)
            return
        worker = self.worker
        take, wake = worker.take_lane_job(cid, seq, digest, frames[1:], bool(has_blob), inbox)
        if wake:
            worker.conn.call(worker.wake_flusher)
        elif not take:
            worker.conn.call(self.tell, cid, inbox, P.BOUNCE, seq)

    def done(self, job: Task, status: int, frames: list, known: bool) -> None:
        """Send a lane job's outcome straight to its client (a large one through the master,
        so a client slow to read never stalls us). Main thread."""
        assert job.lane is not None and self.results_out is not None  # a lane job, start()
        alias = self.worker.alias
        if not known:
            return  # its client is gone (FORGET)
        if sum(memoryview(f).nbytes for f in frames) > LANE_RESULT_MAX:
            alias.send([P.pack(P.LANE_RESULT, job.cid, job.seq, status, len(frames)), *frames])
            return
        self.result_inboxes[job.cid] = job.lane
        error = self.results_out.send(job.lane, [P.pack(P.LRESULT, job.seq, status,
                                                        len(frames)), *frames])
        if lane.unreachable(error):  # the master takes the lane back; the client resends
            alias.send([P.pack(P.LANE_REFUSED, job.cid)])

    def started_long(self, job: Task) -> None:
        """A lane job runs past a tick (I/O thread): its client may show it running, and
        the master feeds other workers meanwhile."""
        assert job.lane is not None
        self.tell(job.cid, job.lane, P.LSTARTED, job.seq)
        self.worker.conn.send([P.pack(P.LANE_BUSY, job.cid, job.seq)])

    def tell(self, cid: int, inbox: str, kind: int, seq: int) -> None:
        """A note to a lane job's client (I/O thread)."""
        self.io_inboxes[cid] = inbox
        assert self.io_out is not None  # open() made it, before any lane job came
        if lane.unreachable(self.io_out.send(inbox, [P.pack(kind, seq)])):
            self.worker.conn.send([P.pack(P.LANE_REFUSED, cid)])

    def forget_io(self, cid: int) -> None:
        """A client is gone (I/O thread, under the worker's lock)."""
        inbox = self.io_inboxes.pop(cid, None)
        if inbox and self.io_out is not None:
            self.io_out.close(inbox)

    def forget_results(self, cid: int) -> None:
        """A client is gone (main thread)."""
        inbox = self.result_inboxes.pop(cid, None)
        if inbox and self.results_out is not None:
            self.results_out.close(inbox)
