"""Lane grants: which client may send its lone jobs straight to which worker.

    scheduler sends a client's job to a worker on the client's machine
        --> Lanes.offer: LANE(endpoint, cid) to the client (one lane per client)
    client --LJOB--> worker's lane (cw.worker.lane) --result--> client's inbox (cw.client.lane)
    worker --RESULTS "lane": [[cid, seq], ...]--> Lanes.count (jobs and results counted only)
    worker --LANE_BUSY--> a lane job runs long: the worker is fed nothing, what it holds is
                          stolen back (WorkerLane.job is set until that job's note comes)
    worker --LANE_RESULT--> a large lane result through the master: passed on like any result
    worker --LANE_REFUSED--> it cannot reach the client's inbox: no lane for that client again
    worker leaves / client leaves --> LANE_LOST to the client, which resends what was on it

The scheduler calls these at five points (offer, count, and the three departures); the
records keep only a ClientLane and a WorkerLane each, and the routing path never reads them
except through ``WorkerLane.job`` (a worker busy with a lane job takes nothing else).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from cw import protocol as P
from cw.conn.lane import is_endpoint
from cw.errors import ProtocolError

if TYPE_CHECKING:
    from cw.master.records import ClientRecord, WorkerRecord

log = logging.getLogger(__name__)

LANE_MEMORY = 64  # lane jobs done a worker's late LANE_BUSY may still name


class ClientLane:
    """A client's side of the lane: whether it takes lane results, and the worker it holds."""

    __slots__ = ("inbox", "worker")

    def __init__(self, inbox: bool):
        self.inbox = inbox   # it can take lane results (False once a worker could not)
        self.worker: WorkerRecord | None = None  # the worker whose lane it was told of


class WorkerLane:
    """A worker's side: its endpoint, the clients told of it, and a long lane job."""

    __slots__ = ("endpoint", "holders", "job", "job_client", "done")

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.holders: set[bytes] = set()  # clients told of this lane
        self.job: tuple[int, int] | None = None  # a lane job it said runs long
        self.job_client = ""
        # lane jobs it reported done lately: its LANE_BUSY and its note come on different
        # sockets, so a LANE_BUSY may arrive after the job's note
        self.done: deque[tuple[int, int]] = deque(maxlen=LANE_MEMORY)

    @classmethod
    def offered(cls, endpoint: object) -> WorkerLane | None:
        """The lane a worker's HELLO offers, if it names a usable endpoint."""
        return cls(endpoint) if is_endpoint(endpoint) else None  # type: ignore[arg-type]


class Lanes:
    """The master's lane grants and counts. Called by the Scheduler only."""

    def __init__(self, send: Callable[[bytes, list], bool | None], enabled: bool,
                 by_cid: dict[int, ClientRecord], clients: dict[bytes, ClientRecord],
                 woke: Callable[[], None]):
        self.send = send
        self.enabled = enabled   # off with --no-local-socket
        self.by_cid = by_cid     # the scheduler's own maps (read only here)
        self.clients = clients
        self.woke = woke         # a worker may take jobs again: the scheduler checks steals
        self.routed = 0          # lane jobs counted, ever

    # ---------------------------------------------------------------- the five hooks
    def offer(self, clients: list[ClientRecord], worker: WorkerRecord) -> None:
        """Jobs of these clients went to ``worker``: tell each on its machine of its lane."""
        lane = worker.lane
        if not self.enabled or lane is None:
            return
        for client in clients:
            mine = client.lane
            if mine.worker is None and mine.inbox and client.machine \
                    and client.machine == worker.machine:
                mine.worker = worker
                lane.holders.add(client.ident)
                self.send(client.ident, [P.pack(P.LANE, lane.endpoint, client.cid)])

    def count(self, worker: WorkerRecord, keys: list[tuple[int, int]]) -> None:
        """Lane jobs a worker ran (their clients have the results): counted only."""
        lane = worker.lane
        for key in keys:
            if lane is not None:
                lane.done.append(key)
                if key == lane.job:
                    lane.job = None
            worker.done += 1
            self.routed += 1
            client = self.by_cid.get(key[0])
            if client is not None:
                client.submitted += 1
                client.done += 1

    def client_gone(self, client: ClientRecord, workers: dict[bytes, WorkerRecord]) -> None:
        self._take(client)
        for worker in workers.values():
            lane = worker.lane
            if lane is not None and lane.job and lane.job[0] == client.cid:
                lane.job = None  # its note may never come: feed that worker again
                self.woke()

    def worker_gone(self, worker: WorkerRecord, why: str, graceful: bool) -> None:
        lane = worker.lane
        for ident in list(lane.holders if lane else ()):
            client = self.clients.get(ident)
            if client is not None and client.lane.worker is worker:
                self._lost(client, why, graceful)

    # ---------------------------------------------------------------- lane messages
    def busy(self, worker: WorkerRecord, cid: int, seq: int) -> None:
        """LANE_BUSY: a long lane job runs; feed the worker nothing, take back what it holds."""
        if not isinstance(cid, int) or not isinstance(seq, int):
            raise ProtocolError("LANE_BUSY needs a client id and a job number")
        lane = worker.lane
        if lane is None or (cid, seq) in lane.done or cid not in self.by_cid:
            return  # came after the job's note (it is over), or its client is gone
        lane.job = (cid, seq)
        lane.job_client = self.by_cid[cid].name
        self.woke()

    def result(self, worker: WorkerRecord, cid: int, seq: int, status: int, n: int,
               frames: list) -> ClientRecord | None:
        """LANE_RESULT: the client to pass a large lane result to, if this worker holds its
        lane (no other can have run its lane jobs; if the lane was taken back, the client
        resends); None: drop it."""
        if not all(isinstance(x, int) for x in (cid, seq, status)):
            raise ProtocolError("LANE_RESULT needs a client id, a job number and a status")
        if n != len(frames):
            raise ProtocolError("LANE_RESULT frame count does not match its header")
        client = self.by_cid.get(cid)
        if client is not None and client.lane.worker is worker:
            return client
        if client is not None:
            log.warning("dropped a lane result from worker %s for client %s, whose lane it "
                        "does not hold", worker.name, client.name)
        return None

    def refused(self, worker: WorkerRecord, cid: int) -> None:
        """LANE_REFUSED: a worker cannot reach a client's inbox: no more lanes for it."""
        client = self.by_cid.get(cid) if isinstance(cid, int) else None
        if client is None or not client.lane.inbox:
            return
        client.lane.inbox = False
        log.warning("worker %s cannot reach the inbox of client %s; no lane for it",
                    worker.name, client.name)
        self._lost(client, f"{worker.name} cannot reach our inbox", True)

    # ---------------------------------------------------------------- inside
    def _take(self, client: ClientRecord) -> WorkerRecord | None:
        """Forget the lane a client was told of; return its worker (None: it had none)."""
        worker, client.lane.worker = client.lane.worker, None
        if worker is not None and worker.lane is not None:
            worker.lane.holders.discard(client.ident)
        return worker

    def _lost(self, client: ClientRecord, why: str, graceful: bool) -> None:
        """Take a client's lane back and tell it (LANE_LOST): it resends what was on it."""
        worker = self._take(client)
        if worker is not None and worker.lane is not None:
            self.send(client.ident, [P.pack(P.LANE_LOST, worker.lane.endpoint, why, graceful)])
