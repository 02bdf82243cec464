"""The master's peers: who is connected, who left, and what a departure does to jobs.

    HELLO --> hello(): a ClientRecord, WorkerRecord or supervisor PeerRecord (and its alias)
    BYE, a closed connection, DIED, silence past the timeout (tick) --> peer_gone():
        a client's queued jobs are dropped and its held ones cancelled on their workers;
        a worker's jobs go back to the front of the queue (a death makes them suspects
        and charges the running one: WorkerLost after max_retries)

``Peers`` holds every map of the master's state; ``Stealing`` and ``Scheduler`` build on it
(one object, one owner: the master's event loop).
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable

from cw import protocol as P
from cw.errors import ProtocolError, QuotaExceeded, WorkerLost
from cw.master import outbox
from cw.master.jobqueue import JobQueue
from cw.master.lanes import Lanes
from cw.master.records import ClientRecord, JobRecord, PeerRecord, WorkerRecord
from cw.serialize import dumps

log = logging.getLogger(__name__)

QUOTA_WINDOWS = 2          # a client's argument bytes at the master: this many byte windows
MAX_FUNCTIONS = 100_000    # functions stored per client
MAX_FUNCTION_BYTES = 1 << 30  # bytes of functions stored per client


class Peers:
    """The master's state (every map) and the rules of joining and leaving."""

    def __init__(self, send: Callable[[bytes, list], bool | None],
                 heartbeat_timeout: float = 10.0, lanes: bool = True,
                 max_functions: int = MAX_FUNCTIONS,
                 max_function_bytes: int = MAX_FUNCTION_BYTES, policy: str = "fair"):
        self.send = send
        self.max_functions = max_functions
        self.max_function_bytes = max_function_bytes
        self._counts: deque[tuple[float, int]] = deque()  # (time, workers) at recent ticks
        self.peak_workers = 0      # most workers in the last heartbeat timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.master_id = uuid.uuid4().hex
        self.clients: dict[bytes, ClientRecord] = {}
        self.by_cid: dict[int, ClientRecord] = {}
        self.workers: dict[bytes, WorkerRecord] = {}
        self.supervisors: dict[bytes, PeerRecord] = {}  # one per node: it reports deaths (DIED)
        self.aliases: dict[bytes, PeerRecord] = {}   # a peer's second, send-only socket
        # queued jobs, by policy (cw.master.jobqueue): fair share between clients or fifo
        self.queue: JobQueue[JobRecord] = JobQueue(policy, held=ClientRecord.backlogged)
        self.delivered = 0         # results delivered through the master, ever
        self.discarded = 0         # results dropped because their client had gone
        # client ids differ between master runs, so a worker's late result for an old
        # master's client can never match a new client's job
        self._next_cid = random.randrange(1, 1 << 40)
        self._dirty: dict[bytes, ClientRecord] = {}  # clients with news to flush
        self._cancelling: dict[bytes, WorkerRecord] = {}  # workers with cancel requests to send
        self._full: dict[bytes, ClientRecord] = {}  # clients whose socket queue was full
        self._went_idle = False  # a worker emptied since the last steal check
        # lane grants and counts (cw.master.lanes; off with --no-local-socket)
        self.lanes = Lanes(send, lanes, self.by_cid, self.clients, self._wake)

    @property
    def queued(self) -> int:
        """Live (not cancelled) jobs in the queue, parked ones included."""
        return len(self.queue)

    @property
    def routed(self) -> int:
        """Results delivered, ever: through the master and on lanes."""
        return self.delivered + self.lanes.routed

    def _wake(self) -> None:
        self._went_idle = True  # some worker may take jobs: check for steals at the flush

    # ---------------------------------------------------------------- peers
    def peer(self, ident: bytes) -> PeerRecord | None:
        """The peer behind a socket identity (its own or its alias), if known."""
        return self.clients.get(ident) or self.workers.get(ident) or \
            self.aliases.get(ident) or self.supervisors.get(ident)

    def hello(self, ident: bytes, role: str, info: dict, now: float) -> PeerRecord:
        """Register a peer; a HELLO from a known identity only refreshes it."""
        known = self.peer(ident)
        if known is not None:
            known.last_seen = now
            return known
        if role == "worker":
            worker = self.workers[ident] = WorkerRecord(ident, info, now)
            peer: PeerRecord = worker
            self.peak_workers = max(self.peak_workers, len(self.workers))
            self._went_idle = True  # it may take jobs prefetched elsewhere (stealing)
        elif role == "client":
            peer = ClientRecord(ident, info, now, self._next_cid)
            self._next_cid += 1
            self.clients[ident] = peer
            self.by_cid[peer.cid] = peer
            self.queue.set_share(peer, info.get("share", 1.0))
        elif role == "supervisor":
            peer = self.supervisors[ident] = PeerRecord(ident, info, now)
        else:
            raise ProtocolError(f"unknown role {role!r}")
        alias = info.get("alias")
        if alias == P.alias_of(ident) and self.peer(alias) is None:
            peer.alias = alias
            self.aliases[alias] = peer
        log.info("%s %s joined from %s (pid %s)", role, peer.name, peer.host, peer.pid)
        return peer

    def peer_gone(self, ident: bytes, reason: str, graceful: bool = False) -> None:
        """Forget a peer; a worker's jobs are re-queued (or failed), a client's dropped."""
        peer = self.peer(ident)
        if peer is None:
            return
        ident = peer.ident
        self.aliases.pop(peer.alias, None)
        if ident in self.workers:
            self._worker_gone(self.workers.pop(ident), reason, graceful)
        elif ident in self.clients:
            self._client_gone(self.clients.pop(ident), reason)
        elif self.supervisors.pop(ident, None) is not None:
            log.info("supervisor %s left (%s)", peer.name, reason)

    def died(self, supervisor: PeerRecord, pid: int, code: int, lived: float) -> None:
        """A supervisor saw its worker process ``pid`` end without a note: that worker is
        gone now, and the job it ran is charged (no-op if it is not registered, or no more)."""
        P.parse_died(pid, code, lived)
        worker = next((w for w in self.workers.values() if w.pid == pid and
                       w.host == supervisor.host and w.machine == supervisor.machine and
                       w.supervisor in (None, supervisor.pid)), None)
        if worker is None:
            log.debug("supervisor %s: its worker %d died unregistered", supervisor.name, pid)
            return
        self.peer_gone(worker.ident, f"{P.describe_exit(code)} after {lived:.1f} s")

    def _client_gone(self, client: ClientRecord, reason: str) -> None:
        del self.by_cid[client.cid]
        self.lanes.client_gone(client, self.workers)
        self._dirty.pop(client.ident, None)
        self._full.pop(client.ident, None)
        dropped = self.queue.drop(client)
        for job in client.jobs.values():
            if job.worker is not None and not job.started:
                self._ask_cancel(job.worker, client.cid, job.seq)
        client.jobs.clear()
        client.functions.clear()
        for worker in self.workers.values():
            if client.cid in worker.ctxs:
                worker.ctxs.discard(client.cid)
                worker.fns = {f for f in worker.fns if f[0] != client.cid}
                self.send(worker.ident, [P.pack(P.FORGET, [client.cid])])
        log.info("client %s left (%s); %d queued jobs dropped", client.name, reason, dropped)

    def _worker_gone(self, worker: WorkerRecord, reason: str, graceful: bool) -> None:
        who = f"{worker.name} on {worker.host} (pid {worker.pid})"
        evicted = worker.evicted(time.time())
        if evicted:  # SLURM took it back: an eviction, uncharged (cw.worker.drain)
            reason, graceful = f"{reason}, {evicted}; its jobs go back uncharged", True
        lost = f"{who}: {reason}"
        requeue: list[JobRecord] = []
        self._left(worker, worker.assigned.values())
        for job in worker.assigned.values():
            job.worker = None
            if job.client.ident not in self.clients:
                continue  # its client is gone too
            if not graceful:
                job.suspect = True
            if not graceful and (job.started or worker.isolated):
                job.losses.append(lost)
                if len(job.losses) >= job.max_retries:
                    self._fail(job, WorkerLost(_lost_message(job), job.losses))
                    continue
            job.started = 0.0
            requeue.append(job)
        self.queue.give_back(requeue, taken=False)  # the front, in their order
        worker.assigned.clear()
        self.lanes.worker_gone(worker, lost, graceful)
        level = logging.INFO if graceful else logging.WARNING
        log.log(level, "worker %s left (%s); %d jobs re-queued", who, reason, len(requeue))

    def tick(self, now: float) -> None:
        """Drop every peer not heard from within the heartbeat timeout."""
        deadline = now - self.heartbeat_timeout
        silent = [p.ident for p in (*self.workers.values(), *self.clients.values(),
                                    *self.supervisors.values()) if p.last_seen < deadline]
        for ident in silent:
            self.peer_gone(ident, f"silent for {self.heartbeat_timeout:g} s: "
                                  f"node lost? (or hung)")
        counts = self._counts
        counts.append((now, len(self.workers)))
        while counts[0][0] < deadline:
            counts.popleft()
        self.peak_workers = max(n for _, n in counts)

    def quota(self) -> int:
        """Most argument bytes a client may keep here (see the module docstring)."""
        return QUOTA_WINDOWS * P.window(max(self.peak_workers, len(self.workers)))

    def _store_function(self, client: ClientRecord, digest: bytes, frame) -> None:
        """Keep a client's function, unless its store is full (then its jobs fail)."""
        if digest in client.functions:
            return
        size = len(frame)
        if len(client.functions) >= self.max_functions or \
                client.function_bytes + size > self.max_function_bytes:
            if not client.functions_refused:
                log.warning("client %s has %d functions (%d bytes) here; refusing more",
                            client.name, len(client.functions), client.function_bytes)
            client.functions_refused = True
            return
        client.functions[digest] = frame
        client.function_bytes += size

    def _unknown_function(self, client: ClientRecord, seq: int) -> Exception:
        if client.functions_refused:
            return QuotaExceeded(
                f"job {seq} refused: the master stores at most {self.max_functions} functions "
                f"and {self.max_function_bytes} bytes of them per client, and its function "
                f"did not fit")
        return ProtocolError(f"job {seq} names a function the master was never sent")

    def _deliver(self, job: JobRecord, status: int, payload: list) -> None:
        client = job.client
        if client.jobs.pop(job.seq, None) is None or client.ident not in self.clients:
            return  # the client left or the job was settled: never deliver elsewhere
        client.arg_bytes -= job.size
        client.done += 1
        self.delivered += 1
        outbox.add_result(client, job.seq, status, payload)
        self._dirty[client.ident] = client

    def _fail(self, job: JobRecord, error: Exception) -> None:
        log.error("job %d of client %s failed: %s", job.seq, job.client.name, error)
        self._deliver(job, P.FAILED, dumps(error, "error"))


    def _left(self, worker: WorkerRecord, jobs: Iterable[JobRecord]) -> None:
        """Jobs left the worker's ``assigned`` (done, cancelled, stolen, re-queued, lost):
        their clients' use of the workers drops (fair share), and what they took of the
        worker's resources is free again. Called exactly once per job that leaves."""
        release, give = self.queue.release, worker.capacity.give
        for job in jobs:
            release(job)
            opts = job.opts
            if opts and "resources" in opts:
                give(opts["resources"])

    def _ask_cancel(self, worker: WorkerRecord, cid: int, seq: int, steal: bool = False) -> None:
        if not steal:
            worker.cancelling.add((cid, seq))
        worker.out_cancel.append([cid, seq])
        self._cancelling[worker.ident] = worker

    def _dirty_client(self, client: ClientRecord) -> None:
        self._dirty[client.ident] = client


def _lost_message(job: JobRecord) -> str:
    return (f"job {job.seq} was running on {len(job.losses)} workers that died or went "
            f"silent (max_retries={job.max_retries}); likely causes: the job exhausts memory "
            f"(OOM killer: killed by SIGKILL), ends its process (os._exit, exit() in C code, "
            f"a signal, a segfault), or its node was lost (silent). Workers: "
            + "; ".join(job.losses))
