"""The master's state and routing rules: one owner, no sockets, no clocks of its own.

    client --SUBMIT--> Client.jobs + queue (one FIFO for all clients)
                                   |
                              dispatch(): idle workers first, each up to its free slots
                                   v
                         Worker.assigned --JOBS--> worker
    worker --RESULTS--> job leaves Worker.assigned and Client.jobs --> Client outbox
    flush(): one RESULTS / CANCELLED message per client with news, one JOBS per fed worker
    tick(now): peers silent for longer than the timeout are dropped (a set difference);
               a lost worker's jobs go back to the front of the queue, or fail with
               WorkerLost once they have lost ``max_retries`` workers.

Work stealing: prefetched jobs can strand behind a long one (or a worker that learned its
jobs were short may hold too many). When the queue is empty and a worker is idle, the
master asks the busiest worker to give back the newer half of its unstarted jobs (a CANCEL
that the master, not a client, sent); what comes back goes to the front of the queue.

Lanes (cw.lane): once a client's job has gone to a worker on the client's machine, the client
is told that worker's lane (LANE) and sends its lone jobs there directly. The master only
counts them (the worker's RESULTS "lane" list), and says LANE_LOST to the client when the
worker leaves; the client then resubmits what was on the lane, naming the lost worker in the
job's options ("losses"), so the death is charged here like any other.

A worker process that dies on a node whose supervisor lives is reported by that supervisor
(DIED: pid, exit code or signal, lifetime): ``died`` runs the same worker-gone path at once,
naming how it ended ("exit code 3", "killed by SIGSEGV"). Heartbeats remain for what only
they can see: a lost node, a hung supervisor, a silent peer.

A worker may die before its "started" note leaves it (a job that calls os._exit), so the
master cannot always tell which held job killed it. Every job a dead worker held becomes a
*suspect*; a suspect is re-run alone on an idle worker, where a death is charged to it
exactly. Innocent jobs are never charged; the guilty one fails after max_retries deaths.

Bounds (a client gone rogue must not grow the master without limit):
  - argument bytes: a client's live jobs at the master hold at most twice its byte window
    (``P.window`` of the most workers seen in the last heartbeat timeout; one job always
    fits, as in cw.session). A SUBMIT past it fails those jobs with QuotaExceeded; cw's own
    client never sends past its window, and what the master holds is never more than what
    the client counts as in flight.
  - functions: at most ``max_functions`` and ``max_function_bytes`` stored per client; jobs
    of a function refused for that fail with QuotaExceeded.
  - results: sent in messages of about RESULT_MESSAGE bytes. When a client's queue at the
    socket is full (it stopped reading), ``send`` says so (None) and its results wait in its
    outbox; while that holds more than RESULT_BACKLOG bytes, its queued jobs are parked
    (kept, not dispatched), so no more results are made for it. Nothing is dropped.

The master's event loop (cw.master) owns the only Scheduler and calls it from one thread.
Everything sent goes through ``send(ident, frames)``, which returns True once sent, False if
the peer is gone, and None if its queue is full (send it again later).
"""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence

from cw import protocol as P
from cw.conn.lane import is_endpoint
from cw.errors import ProtocolError, QuotaExceeded, WorkerLost
from cw.serialize import dumps

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
PREFETCH_SECONDS = 0.005   # a worker holds about this much work (by its measured job time)
MIN_HOLD = 2               # the running job and one prefetched, whatever the job time
MIN_BATCH = 8              # fewest jobs per JOBS message while the queue allows it
LANE_MEMORY = 64           # lane jobs done a worker's late LANE_BUSY may still name
QUOTA_WINDOWS = 2          # a client's argument bytes at the master: this many byte windows
MAX_FUNCTIONS = 100_000    # functions stored per client
MAX_FUNCTION_BYTES = 1 << 30  # bytes of functions stored per client
RESULT_MESSAGE = 1 << 20   # results bytes per RESULTS message (a larger result goes alone)
RESULT_BACKLOG = 32 << 20  # unsent result bytes past which a client's jobs are parked


class Job:
    """One submitted call, as the master sees it (its payload frames are opaque)."""

    __slots__ = ("client", "seq", "digest", "frames", "worker", "started", "cancelled",
                 "losses", "max_retries", "opts", "suspect", "size")

    def __init__(self, client: Client, seq: int, digest: bytes, frames: list, opts):
        self.client = client
        self.seq = seq
        self.digest = digest
        self.frames = frames
        self.opts = opts
        self.worker: Worker | None = None
        self.started = 0.0          # time the worker reported starting it, 0 if not started
        self.cancelled = False      # dropped while queued (skipped lazily by dispatch)
        self.losses: list[str] = list((opts or {}).get("losses", ()))  # workers lost
        # while running it (a lane job's come from its client)
        self.suspect = bool(self.losses)  # held by a worker that died: runs alone from now on
        self.max_retries = (opts or {}).get("max_retries", DEFAULT_MAX_RETRIES)
        self.size = 0               # argument bytes counted in its client's quota


class Peer:
    """What the master knows of any connected peer."""

    def __init__(self, ident: bytes, info: dict, now: float):
        self.ident = ident
        self.name = str(info.get("name") or ident.hex()[:8])
        self.host = str(info.get("host", "?"))
        self.pid = info.get("pid")
        self.last_seen = now
        self.joined = now
        self.alias = b""
        self.machine = str(info.get("machine") or "")  # equal only on one running kernel


class Client(Peer):
    """A connected client: its context, functions and live jobs."""

    def __init__(self, ident: bytes, info: dict, now: float, cid: int):
        super().__init__(ident, info, now)
        self.cid = cid
        self.cwd = str(info.get("cwd", ""))
        self.path = [str(p) for p in info.get("path", [])]
        self.functions: dict[bytes, object] = {}  # digest -> function frame
        self.function_bytes = 0
        self.functions_refused = False             # the store was full once
        self.jobs: dict[int, Job] = {}             # seq -> job queued or assigned
        self.arg_bytes = 0                         # argument bytes of its live jobs here
        self.parked: list[Job] = []                # queued jobs held back: results unsent
        self.submitted = 0
        self.done = 0
        self.inbox = bool(info.get("inbox"))   # it can take lane results (False once a
        # worker could not reach it there)
        self.lane: Worker | None = None     # the worker whose lane it was told of
        # outbox, flushed once per loop turn
        self.out_started: list[int] = []
        self.out_done: list[list] = []
        self.out_frames: list = []
        self.out_cancelled: list[list] = []
        self.out_bytes = 0     # bytes in out_frames
        self.full = False      # its socket queue did not take our last message

    def backlogged(self) -> bool:
        """Too many result bytes wait for it to read: make no more for now."""
        return self.full and self.out_bytes > RESULT_BACKLOG


class Worker(Peer):
    """A connected worker process: what it runs and holds, and what it already has."""

    def __init__(self, ident: bytes, info: dict, now: float):
        super().__init__(ident, info, now)
        self.slots = max(1, int(info.get("slots", 1)))  # most jobs it accepts to hold
        supervisor = info.get("supervisor")  # the pid of its supervisor, if it has one
        self.supervisor = supervisor if isinstance(supervisor, int) else None
        self.job_seconds: float | None = None        # moving average of its job times
        self.hold = min(self.slots, MIN_HOLD)            # jobs it may hold now
        self.assigned: dict[tuple[int, int], Job] = {}  # (cid, seq) -> job, in dispatch order
        self.fns: set[tuple[int, bytes]] = set()         # functions it has been sent
        self.ctxs: set[int] = set()                      # clients whose context it has
        self.done = 0
        self.failures = 0
        self.isolated = False  # holds one suspect job and nothing else
        self.stealing: set[tuple[int, int]] = set()  # jobs asked back, not yet answered
        self.cancelling: set[tuple[int, int]] = set()  # jobs a cancel was asked for
        self.out_cancel: list[list] = []
        lane = info.get("lane")
        self.lane = lane if is_endpoint(lane) else None
        self.lane_holders: set[bytes] = set()  # clients told of its lane
        self.lane_job: tuple[int, int] | None = None  # a lane job it said runs long
        self.lane_job_client = ""
        # lane jobs it reported done lately: its LANE_BUSY and its note come on different
        # sockets, so a LANE_BUSY may arrive after the job's note
        self.lane_done: deque[tuple[int, int]] = deque(maxlen=LANE_MEMORY)

    def free(self) -> int:
        return 0 if self.isolated or self.lane_job else self.hold - len(self.assigned)

    def measured(self, busy: float, jobs: int) -> None:
        """Learn the job time from a RESULTS message; hold ~PREFETCH_SECONDS of work.

        Starts at MIN_HOLD (like TCP's slow start), so long jobs never strand short ones
        behind them, and grows to ``slots`` for short jobs, so they travel in batches.
        """
        if jobs <= 0 or busy < 0:
            return
        each = busy / jobs
        # cautious: a longer job time counts at once, a shorter one only by halves
        self.job_seconds = each if self.job_seconds is None else \
            max(each, 0.5 * self.job_seconds)
        want = int(PREFETCH_SECONDS / max(self.job_seconds, 1e-6))
        self.hold = max(min(self.slots, MIN_HOLD), min(self.slots, want))

    def running(self) -> Job | None:
        """The job it reported starting last and has not finished, if any."""
        for job in self.assigned.values():
            if job.started:
                return job
        return None


class Scheduler:
    """All routing state of one master. Not thread-safe: one owner calls it."""

    def __init__(self, send: Callable[[bytes, list], bool | None],
                 heartbeat_timeout: float = 10.0, lanes: bool = True,
                 max_functions: int = MAX_FUNCTIONS,
                 max_function_bytes: int = MAX_FUNCTION_BYTES):
        self.send = send
        self.max_functions = max_functions
        self.max_function_bytes = max_function_bytes
        self._counts: deque[tuple[float, int]] = deque()  # (time, workers) at recent ticks
        self.peak_workers = 0      # most workers in the last heartbeat timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.lanes = lanes         # grant lanes to clients (off with --no-local-socket)
        self.master_id = uuid.uuid4().hex
        self.clients: dict[bytes, Client] = {}
        self.by_cid: dict[int, Client] = {}
        self.workers: dict[bytes, Worker] = {}
        self.supervisors: dict[bytes, Peer] = {}  # one per node: it reports deaths (DIED)
        self.aliases: dict[bytes, Peer] = {}   # a peer's second, send-only socket
        self.queue: deque[Job] = deque()
        self.queued = 0            # live (not cancelled) jobs in the queue
        self.routed = 0            # results delivered, ever
        self.discarded = 0         # results dropped because their client had gone
        # client ids differ between master runs, so a worker's late result for an old
        # master's client can never match a new client's job
        self._next_cid = random.randrange(1, 1 << 40)
        self._dirty: dict[bytes, Client] = {}  # clients with news to flush
        self._cancelling: dict[bytes, Worker] = {}  # workers with cancel requests to send
        self._full: dict[bytes, Client] = {}  # clients whose socket queue was full
        self._went_idle = False  # a worker emptied since the last steal check

    # ---------------------------------------------------------------- peers
    def peer(self, ident: bytes) -> Peer | None:
        """The peer behind a socket identity (its own or its alias), if known."""
        return self.clients.get(ident) or self.workers.get(ident) or \
            self.aliases.get(ident) or self.supervisors.get(ident)

    def hello(self, ident: bytes, role: str, info: dict, now: float) -> Peer:
        """Register a peer; a HELLO from a known identity only refreshes it."""
        known = self.peer(ident)
        if known is not None:
            known.last_seen = now
            return known
        if role == "worker":
            worker = self.workers[ident] = Worker(ident, info, now)
            peer: Peer = worker
            self.peak_workers = max(self.peak_workers, len(self.workers))
            self._went_idle = True  # it may take jobs prefetched elsewhere (stealing)
        elif role == "client":
            peer = Client(ident, info, now, self._next_cid)
            self._next_cid += 1
            self.clients[ident] = peer
            self.by_cid[peer.cid] = peer
        elif role == "supervisor":
            peer = self.supervisors[ident] = Peer(ident, info, now)
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

    def died(self, supervisor: Peer, pid: int, code: int, lived: float) -> None:
        """A supervisor saw its worker process ``pid`` end without a note: that worker is
        gone now, and the job it ran is charged (no-op if it is not registered, or no more)."""
        died_entry(pid, code, lived)
        worker = next((w for w in self.workers.values() if w.pid == pid and
                       w.host == supervisor.host and w.machine == supervisor.machine and
                       w.supervisor in (None, supervisor.pid)), None)
        if worker is None:
            log.debug("supervisor %s: its worker %d died unregistered", supervisor.name, pid)
            return
        self.peer_gone(worker.ident, f"{P.describe_exit(code)} after {lived:.1f} s")

    def _client_gone(self, client: Client, reason: str) -> None:
        del self.by_cid[client.cid]
        self._take_lane(client)
        for worker in self.workers.values():
            if worker.lane_job and worker.lane_job[0] == client.cid:
                worker.lane_job = None  # its note may never come: feed that worker again
                self._went_idle = True
        self._dirty.pop(client.ident, None)
        self._full.pop(client.ident, None)
        client.parked.clear()
        dropped = 0
        for job in client.jobs.values():
            if job.worker is None:
                job.cancelled = True
                self.queued -= 1
                dropped += 1
            elif not job.started:
                self._ask_cancel(job.worker, client.cid, job.seq)
        client.jobs.clear()
        client.functions.clear()
        for worker in self.workers.values():
            if client.cid in worker.ctxs:
                worker.ctxs.discard(client.cid)
                worker.fns = {f for f in worker.fns if f[0] != client.cid}
                self.send(worker.ident, [P.pack(P.FORGET, [client.cid])])
        log.info("client %s left (%s); %d queued jobs dropped", client.name, reason, dropped)

    def _worker_gone(self, worker: Worker, reason: str, graceful: bool) -> None:
        who = f"{worker.name} on {worker.host} (pid {worker.pid})"
        lost = f"{who}: {reason}"
        requeue: list[Job] = []
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
        for job in reversed(requeue):
            self.queue.appendleft(job)
        self.queued += len(requeue)
        worker.assigned.clear()
        for ident in list(worker.lane_holders):
            client = self.clients.get(ident)
            if client is not None and client.lane is worker:
                self._lane_lost(client, lost, graceful)
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

    # ---------------------------------------------------------------- clients
    def submit(self, client: Client, fns: list, jobs: list, frames: list) -> None:
        """Queue a batch of jobs; ``frames`` holds the function frames, then each job's."""
        if not isinstance(fns, list) or not isinstance(jobs, list):
            raise ProtocolError("SUBMIT needs lists of functions and jobs")
        entries = [_job_entry(j) for j in jobs]
        need = len(fns) + sum(e[2] for e in entries)
        if need != len(frames):
            raise ProtocolError(f"SUBMIT lists {need} frames but carries {len(frames)}")
        for digest, frame in zip(fns, frames):
            self._store_function(client, _digest(digest), frame)
        pos = len(fns)
        quota = self.quota()
        for seq, digest, n, opts in entries:
            job = Job(client, seq, digest, frames[pos:pos + n], opts)
            pos += n
            if seq in client.jobs:
                continue  # resubmitted while still live: keep the first
            client.jobs[seq] = job
            if digest not in client.functions:  # fail that job, loudly, never silently
                self._fail(job, self._unknown_function(client, seq))
                continue
            size = sum(len(f) for f in job.frames)
            if client.arg_bytes and client.arg_bytes + size > quota:
                self._fail(job, QuotaExceeded(
                    f"job {seq} refused: its client keeps {client.arg_bytes} argument bytes "
                    f"at the master already, and may keep {quota} (twice its byte window)"))
                continue
            job.size = size
            client.arg_bytes += size
            self.queue.append(job)
            self.queued += 1
            client.submitted += 1

    def _store_function(self, client: Client, digest: bytes, frame) -> None:
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

    def _unknown_function(self, client: Client, seq: int) -> Exception:
        if client.functions_refused:
            return QuotaExceeded(
                f"job {seq} refused: the master stores at most {self.max_functions} functions "
                f"and {self.max_function_bytes} bytes of them per client, and its function "
                f"did not fit")
        return ProtocolError(f"job {seq} names a function the master was never sent")

    def cancel(self, client: Client, seqs: list, queued_only: bool = False) -> None:
        """Cancel jobs not yet started; workers are asked about jobs they hold.

        ``queued_only`` (a client's shutdown with cancel_futures): idle workers are fed
        first, then what runs or is next on its worker (ProcessPoolExecutor's call queue)
        runs; the rest is cancelled, also what a worker prefetched behind its next job.
        """
        if queued_only and self.queued:
            self._dispatch()
        for seq in seqs:
            job = client.jobs.get(seq) if isinstance(seq, int) else None
            if job is None or job.started or (queued_only and _about_to_run(job)):
                client.out_cancelled.append([seq, False])
            elif job.worker is None:
                job.cancelled = True
                self.queued -= 1
                del client.jobs[seq]
                client.arg_bytes -= job.size
                client.out_cancelled.append([seq, True])
            else:
                self._ask_cancel(job.worker, client.cid, seq)
                continue
            self._dirty[client.ident] = client

    # ---------------------------------------------------------------- workers
    def results(self, worker: Worker, started: list, done: list, frames: list,
                now: float, busy: float = -1.0, lane: Sequence = ()) -> None:
        """Record jobs a worker started and finished; pass results to their clients.

        ``busy`` is the seconds the worker spent running the ``done`` jobs; ``lane`` lists
        the lane jobs it ran (their clients have their results already): counted only.
        """
        if not isinstance(started, list) or not isinstance(done, list) or \
                not isinstance(busy, (int, float)) or not isinstance(lane, (list, tuple)) \
                or not math.isfinite(busy):
            raise ProtocolError("RESULTS needs lists and a number")
        self._count_lane(worker, [_key(e) for e in lane])
        done = [_done_entry(d) for d in done]
        worker.measured(busy, len(done))
        if sum(d[3] for d in done) != len(frames):
            raise ProtocolError("RESULTS frame count does not match its header")
        finished = {(cid, seq) for cid, seq, _, _ in done}
        for entry in started:
            key = _key(entry)
            if key in finished:
                continue  # started and done at once: the result says both
            job = worker.assigned.get(key)
            if job is not None:
                job.started = now
                client = job.client
                client.out_started.append(job.seq)
                self._dirty[client.ident] = client
        pos = 0
        for cid, seq, status, n in done:
            job = worker.assigned.pop((cid, seq), None)
            payload = frames[pos:pos + n]
            pos += n
            worker.stealing.discard((cid, seq))
            worker.cancelling.discard((cid, seq))
            if not worker.assigned:
                self._went_idle = True
            if job is None:
                continue  # not ours any more (cancelled, re-queued after a timeout)
            if job.client.ident not in self.clients:
                self.discarded += 1
                log.info("discarded the result of job %d: client %s has gone",
                         seq, job.client.name)
                continue
            worker.done += 1
            worker.failures += status != P.OK
            if not worker.assigned:
                worker.isolated = False
            self._deliver(job, status, payload)

    def lane_busy(self, worker: Worker, cid: int, seq: int) -> None:
        """A worker runs a long lane job: feed it nothing more, take back what it holds."""
        if not isinstance(cid, int) or not isinstance(seq, int):
            raise ProtocolError("LANE_BUSY needs a client id and a job number")
        if (cid, seq) in worker.lane_done or cid not in self.by_cid:
            return  # came after the job's note (it is over), or its client is gone
        worker.lane_job = (cid, seq)
        worker.lane_job_client = self.by_cid[cid].name
        self._went_idle = True

    def lane_result(self, worker: Worker, cid: int, seq: int, status: int, n: int,
                    frames: list) -> None:
        """A lane job's large result, sent through us: pass it on like any result, if it
        comes from the worker whose lane that client was given (no other worker can have
        run that client's lane jobs; if the lane was taken back, the client resends)."""
        if not all(isinstance(x, int) for x in (cid, seq, status)):
            raise ProtocolError("LANE_RESULT needs a client id, a job number and a status")
        if n != len(frames):
            raise ProtocolError("LANE_RESULT frame count does not match its header")
        client = self.by_cid.get(cid)
        if client is None or client.lane is not worker:
            if client is not None:
                log.warning("dropped a lane result from worker %s for client %s, whose "
                            "lane it does not hold", worker.name, client.name)
            self.discarded += 1
            return
        client.out_done.append([seq, status, len(frames)])
        client.out_frames.extend(frames)
        client.out_bytes += sum(len(f) for f in frames)
        self._dirty[client.ident] = client

    def lane_refused(self, worker: Worker, cid: int) -> None:
        """A worker cannot reach a client's inbox: no more lanes for that client."""
        client = self.by_cid.get(cid) if isinstance(cid, int) else None
        if client is None or not client.inbox:
            return
        client.inbox = False
        log.warning("worker %s cannot reach the inbox of client %s; no lane for it",
                    worker.name, client.name)
        self._lane_lost(client, f"{worker.name} cannot reach our inbox", True)

    def _take_lane(self, client: Client) -> Worker | None:
        """Forget the lane a client was told of; return its worker (None: it had none)."""
        worker, client.lane = client.lane, None
        if worker is not None:
            worker.lane_holders.discard(client.ident)
        return worker

    def _lane_lost(self, client: Client, why: str, graceful: bool) -> None:
        """Take a client's lane back and tell it (LANE_LOST): it resends what was on it."""
        worker = self._take_lane(client)
        if worker is not None:
            self.send(client.ident, [P.pack(P.LANE_LOST, worker.lane, why, graceful)])

    def _count_lane(self, worker: Worker, keys: list[tuple[int, int]]) -> None:
        worker.lane_done.extend(keys)
        for key in keys:
            if key == worker.lane_job:
                worker.lane_job = None
            cid = key[0]
            worker.done += 1
            self.routed += 1
            client = self.by_cid.get(cid)
            if client is not None:
                client.submitted += 1
                client.done += 1

    def _grant_lane(self, client: Client, worker: Worker) -> None:
        """Tell a client of a worker's lane if both are on one machine (it has one lane)."""
        if client.lane is None and client.inbox and client.machine == worker.machine \
                and client.machine:
            client.lane = worker
            worker.lane_holders.add(client.ident)
            self.send(client.ident, [P.pack(P.LANE, worker.lane, client.cid)])

    def cancelled(self, worker: Worker, entries: list) -> None:
        """A worker answered cancel requests: ok means it dropped the job unstarted.
        Answers nobody asked for are ignored (they would drop a client's job unsettled)."""
        stolen: list[Job] = []
        for entry in entries:
            cid, seq, ok = entry
            if (cid, seq) in worker.stealing:
                stolen.extend(self._stolen(worker, (cid, seq), bool(ok)))
                continue
            job = worker.assigned.get((cid, seq))
            if (cid, seq) not in worker.cancelling:
                continue
            worker.cancelling.discard((cid, seq))
            if job is None:
                continue
            if ok:  # dropped unstarted: the worker no longer holds it, whoever asked
                del worker.assigned[(cid, seq)]
                if job.client.jobs.pop(seq, None) is job:
                    job.client.arg_bytes -= job.size
                worker.isolated = worker.isolated and bool(worker.assigned)
            client = self.by_cid.get(cid)
            if client is not None:
                client.out_cancelled.append([seq, bool(ok)])
                self._dirty[client.ident] = client
        self.queue.extendleft(reversed(stolen))  # given back: the front, in their order
        self.queued += len(stolen)

    def _stolen(self, worker: Worker, key: tuple[int, int], ok: bool) -> list[Job]:
        """A steal answered: the job given back, to queue again (none if it stays)."""
        worker.stealing.discard(key)
        job = worker.assigned.get(key)
        if job is None or not ok:
            return []  # finished meanwhile, or started: it stays where it runs
        del worker.assigned[key]
        job.worker = None
        worker.isolated = worker.isolated and bool(worker.assigned)
        if job.client.ident in self.clients and job.seq in job.client.jobs:
            return [job]
        return []

    def _steal(self) -> None:
        """Queue empty, a worker idle: take back half the unstarted jobs of the busiest."""
        if all(w.assigned for w in self.workers.values()):
            return
        victim = max((w for w in self.workers.values() if not w.stealing and not w.isolated),
                     key=lambda w: len(w.assigned) + 2 * bool(w.lane_job), default=None)
        if victim is None or len(victim.assigned) < (1 if victim.lane_job else 2):
            return
        waiting = [j for j in victim.assigned.values() if not j.started]
        # the newer half, rounded up (all of them behind a long lane job); the worker's
        # answer is exact (a job it already started stays), so even the oldest may be asked
        for job in waiting[0 if victim.lane_job else len(waiting) // 2:]:
            victim.stealing.add((job.client.cid, job.seq))
            self._ask_cancel(victim, job.client.cid, job.seq, steal=True)

    def _ask_cancel(self, worker: Worker, cid: int, seq: int, steal: bool = False) -> None:
        if not steal:
            worker.cancelling.add((cid, seq))
        worker.out_cancel.append([cid, seq])
        self._cancelling[worker.ident] = worker

    def _deliver(self, job: Job, status: int, payload: list) -> None:
        client = job.client
        if client.jobs.pop(job.seq, None) is None or client.ident not in self.clients:
            return  # the client left or the job was settled: never deliver elsewhere
        client.arg_bytes -= job.size
        client.done += 1
        self.routed += 1
        client.out_done.append([job.seq, status, len(payload)])
        client.out_frames.extend(payload)
        client.out_bytes += sum(len(f) for f in payload)
        self._dirty[client.ident] = client

    def _fail(self, job: Job, error: Exception) -> None:
        log.error("job %d of client %s failed: %s", job.seq, job.client.name, error)
        self._deliver(job, P.FAILED, dumps(error, "error"))

    # ---------------------------------------------------------------- output
    def flush(self) -> None:
        """Feed workers from the queue, then send every outbox that has news."""
        if self.queued:
            self._dispatch()
            self._went_idle = True  # some worker may have been left idle: check for steals
        if not self.queued and self._went_idle:
            self._went_idle = False
            self._steal()
        cancelling, self._cancelling = self._cancelling, {}
        for worker in cancelling.values():
            entries, worker.out_cancel = worker.out_cancel, []
            if entries and worker.ident in self.workers:
                self.send(worker.ident, [P.pack(P.CANCEL, entries)])
        dirty, self._dirty = self._dirty, {}
        if self._full:  # try again those that could not take more last time
            dirty.update(self._full)
            self._full = {}
        for client in dirty.values():
            self._flush_client(client)

    def _flush_client(self, client: Client) -> None:
        """Send a client's news in messages of about RESULT_MESSAGE bytes; what its full
        queue does not take waits here (``_full``) for the next flush."""
        while client.out_started or client.out_done:
            n, nframes, size = _chunk(client)
            header = P.pack(P.RESULTS, client.out_started, client.out_done[:n])
            if self.send(client.ident, [header, *client.out_frames[:nframes]]) is None:
                client.full = True
                self._full[client.ident] = client
                return
            client.full = False
            client.out_started = []
            del client.out_done[:n], client.out_frames[:nframes]
            client.out_bytes -= size
        if client.parked:  # it reads again: what was held back goes first
            self.queue.extendleft(reversed(client.parked))
            client.parked = []
        if client.out_cancelled:
            header = P.pack(P.CANCELLED, client.out_cancelled)
            if self.send(client.ident, [header]) is None:
                self._full[client.ident] = client
                return
            client.out_cancelled = []

    def _dispatch(self) -> None:
        """Hand queued jobs to workers with free slots, idle workers first, evenly."""
        ready = sorted((w for w in self.workers.values() if w.free() > 0),
                       key=lambda w: len(w.assigned))
        for i, worker in enumerate(ready):
            if not self.queued:
                break
            # spread evenly over the rest (ceil); for a worker known to run short jobs (a
            # large hold) in batches of up to MIN_BATCH, so they still travel in batches when
            # hundreds of workers idle. Fresh workers and long jobs: one each.
            share = max(-(-self.queued // (len(ready) - i)), min(worker.hold // 2, MIN_BATCH))
            batch = self._take(min(worker.free(), share), idle=not worker.assigned)
            if batch:
                worker.isolated = batch[0].suspect
                self._send_jobs(worker, batch)

    def _take(self, n: int, idle: bool) -> list[Job]:
        """Up to ``n`` jobs in FIFO order; a suspect goes alone, and only to an idle worker."""
        batch: list[Job] = []
        queue = self.queue
        while queue and len(batch) < n:
            job = queue[0]
            if job.suspect and not job.cancelled and (batch or not idle):
                break
            queue.popleft()
            if job.cancelled:
                continue
            if job.client.backlogged():
                job.client.parked.append(job)  # still queued; back once it reads
                continue
            batch.append(job)
            if job.suspect:
                break
        self.queued -= len(batch)
        return batch

    def _send_jobs(self, worker: Worker, batch: list[Job]) -> None:
        ctxs, fns, entries = [], [], []
        fn_frames, job_frames = [], []
        for job in batch:
            client = job.client
            cid = client.cid
            if cid not in worker.ctxs:
                worker.ctxs.add(cid)
                ctxs.append([cid, client.cwd, client.path])
            if (cid, job.digest) not in worker.fns:
                worker.fns.add((cid, job.digest))
                fns.append([cid, job.digest])
                fn_frames.append(client.functions[job.digest])
            entries.append([cid, job.seq, job.digest, len(job.frames), job.opts])
            job_frames.extend(job.frames)
            job.worker = worker
            worker.assigned[(cid, job.seq)] = job
        header = P.pack(P.JOBS, ctxs, fns, entries)
        sent = self.send(worker.ident, [header, *fn_frames, *job_frames])
        if not sent:
            # the batch never reached it: back to the front of the queue, uncharged and not
            # suspect; what it held before is charged as in any other death
            for job in batch:
                del worker.assigned[(job.client.cid, job.seq)]
                job.worker = None
            self.queue.extendleft(reversed(batch))
            self.queued += len(batch)
            worker.isolated = False
            worker.ctxs.difference_update(c[0] for c in ctxs)
            worker.fns.difference_update((f[0], f[1]) for f in fns)
            if sent is None:
                return  # its queue is full: it gets them at a later flush
            # its connection is gone without a goodbye: a death, charged like one
            self.peer_gone(worker.ident, "unreachable: its connection was lost")
            return
        if self.lanes and worker.lane:
            for client in {job.client.ident: job.client for job in batch}.values():
                self._grant_lane(client, worker)

    # ---------------------------------------------------------------- status
    def status(self, now: float | None = None) -> dict:
        """A plain-data snapshot of the master's state."""
        now = time.time() if now is None else now
        return {
            "master_id": self.master_id,
            "queue": self.queued,
            "routed": self.routed,
            "discarded": self.discarded,
            "workers": [_worker_status(w, now) for w in self.workers.values()],
            "clients": [_client_status(c) for c in self.clients.values()],
        }


def _worker_status(w: Worker, now: float) -> dict:
    job = w.running()
    return {
        "name": w.name, "host": w.host, "pid": w.pid,
        "state": "busy" if w.assigned or w.lane_job else "idle",
        "job": [job.client.name, job.seq] if job else _lane_job_status(w),
        "job_seconds": round(now - job.started, 3) if job else None,
        "held": len(w.assigned), "hold": w.hold, "done": w.done, "failures": w.failures,
        "last_heartbeat": round(now - w.last_seen, 3),
    }


def _lane_job_status(w: Worker) -> list | None:
    return [w.lane_job_client, w.lane_job[1]] if w.lane_job else None


def _client_status(c: Client) -> dict:
    running = sum(1 for j in c.jobs.values() if j.started)
    return {
        "name": c.name, "host": c.host, "pid": c.pid,
        "queued": len(c.jobs) - running, "running": running, "done": c.done,
        "submitted": c.submitted,
    }


def _lost_message(job: Job) -> str:
    return (f"job {job.seq} was running on {len(job.losses)} workers that died or went "
            f"silent (max_retries={job.max_retries}); likely causes: the job exhausts memory "
            f"(OOM killer: killed by SIGKILL), ends its process (os._exit, exit() in C code, "
            f"a signal, a segfault), or its node was lost (silent). Workers: "
            + "; ".join(job.losses))


def died_entry(pid, code, lived) -> None:
    """Check a DIED's fields; raise ProtocolError if they are not a pid, code, lifetime."""
    if not isinstance(pid, int) or not isinstance(code, int) or not -128 <= code <= 255 \
            or not isinstance(lived, (int, float)) or not lived >= 0:
        raise ProtocolError("DIED needs a pid, an exit code and a lifetime")


def _chunk(client: Client) -> tuple[int, int, int]:
    """``(entries, frames, bytes)`` of the client's next RESULTS message: its outbox if that
    is small, else the first done entries up to RESULT_MESSAGE bytes (at least one)."""
    if client.out_bytes <= RESULT_MESSAGE:
        return len(client.out_done), len(client.out_frames), client.out_bytes
    n = pos = size = 0
    for _, _, count in client.out_done:
        if n and size >= RESULT_MESSAGE:
            break
        size += sum(len(f) for f in client.out_frames[pos:pos + count])
        pos += count
        n += 1
    return n, pos, size


def _digest(value) -> bytes:
    if not isinstance(value, bytes) or len(value) != 16:
        raise ProtocolError("function digest must be 16 bytes")
    return value


def _about_to_run(job: Job) -> bool:
    """The job is among the first MIN_HOLD its worker holds (running, or next to run)."""
    return job.worker is not None and \
        any(held is job for held in itertools.islice(job.worker.assigned.values(), MIN_HOLD))


def _key(entry) -> tuple[int, int]:
    cid, seq = entry
    return cid, seq


def _job_entry(entry) -> tuple[int, bytes, int, dict | None]:
    if not isinstance(entry, list) or len(entry) != 4:
        raise ProtocolError("job entry must be [seq, digest, nframes, opts]")
    seq, digest, n, opts = entry
    if not isinstance(seq, int) or not isinstance(n, int) or n < 1:
        raise ProtocolError("job entry has a bad seq or frame count")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ProtocolError("job options must be a map")
        retries, timeout = opts.get("max_retries", 1), opts.get("timeout", 1)
        losses = opts.get("losses", [])
        if not isinstance(retries, int) or retries < 1 or \
                not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ProtocolError("job options need max_retries >= 1 and timeout > 0")
        if not isinstance(losses, list) or not all(isinstance(x, str) for x in losses):
            raise ProtocolError("job option losses must be a list of strings")
    return seq, _digest(digest), n, opts


def _done_entry(entry) -> tuple[int, int, int, int]:
    if not isinstance(entry, list) or len(entry) != 4 or not all(isinstance(x, int) for x in entry):
        raise ProtocolError("done entry must be [cid, seq, status, nframes]")
    return tuple(entry)
