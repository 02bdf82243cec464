"""What the master knows of each peer and job: plain records, no rules.

    PeerRecord      any connected peer (a supervisor is only this)
      ClientRecord  a client: its context (cwd, sys.path), functions, live jobs, outbox
      WorkerRecord  a worker process: the jobs it holds, its learned job time, what it has
    JobRecord       one submitted call as the master sees it (its frames are opaque)

The Scheduler (cw.master.scheduler) owns every record and is the only one to change them;
the lane's part of a client or worker lives in cw.master.lanes.
"""
from __future__ import annotations

from cw.defaults import DEFAULT_MAX_RETRIES
from cw.master.lanes import ClientLane, WorkerLane
from cw.resources import Capacity

PREFETCH_SECONDS = 0.005   # a worker holds about this much work (by its measured job time)
MIN_HOLD = 2               # the running job and one prefetched, whatever the job time
RESULT_BACKLOG = 32 << 20  # unsent result bytes past which a client's jobs are parked
EVICT_SLACK = 5.0          # seconds before its announced allocation end a loss is the end's


class JobRecord:
    """One submitted call, as the master sees it (its payload frames are opaque)."""

    __slots__ = ("client", "seq", "digest", "frames", "worker", "started", "cancelled",
                 "losses", "max_retries", "opts", "suspect", "size")

    def __init__(self, client: ClientRecord, seq: int, digest: bytes, frames: list, opts):
        self.client = client
        self.seq = seq
        self.digest = digest
        self.frames = frames
        self.opts = opts
        self.worker: WorkerRecord | None = None
        self.started = 0.0          # time the worker reported starting it, 0 if not started
        self.cancelled = False      # dropped while queued (skipped lazily by dispatch)
        self.losses: list[str] = list((opts or {}).get("losses", ()))  # workers lost
        # while running it (a lane job's come from its client)
        self.suspect = bool(self.losses)  # held by a worker that died: runs alone from now on
        self.max_retries = (opts or {}).get("max_retries", DEFAULT_MAX_RETRIES)
        self.size = 0               # argument bytes counted in its client's quota


class PeerRecord:
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


class ClientRecord(PeerRecord):
    """A connected client: its context, functions and live jobs."""

    def __init__(self, ident: bytes, info: dict, now: float, cid: int):
        super().__init__(ident, info, now)
        self.cid = cid
        self.cwd = str(info.get("cwd", ""))
        self.path = [str(p) for p in info.get("path", [])]
        self.functions: dict[bytes, object] = {}  # digest -> function frame
        self.function_bytes = 0
        self.functions_refused = False             # the store was full once
        self.jobs: dict[int, JobRecord] = {}             # seq -> job queued or assigned
        self.arg_bytes = 0                         # argument bytes of its live jobs here
        self.submitted = 0
        self.done = 0
        self.lane = ClientLane(bool(info.get("inbox")))  # its lane grant (cw.master.lanes)
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


class WorkerRecord(PeerRecord):
    """A connected worker process: what it runs and holds, and what it already has."""

    def __init__(self, ident: bytes, info: dict, now: float):
        super().__init__(ident, info, now)
        self.slots = max(1, int(info.get("slots", 1)))  # most jobs it accepts to hold
        supervisor = info.get("supervisor")  # the pid of its supervisor, if it has one
        self.supervisor = supervisor if isinstance(supervisor, int) else None
        self.job_seconds: float | None = None        # moving average of its job times
        self.hold = min(self.slots, MIN_HOLD)            # jobs it may hold now
        self.assigned: dict[tuple[int, int], JobRecord] = {}  # (cid, seq) -> job, in dispatch order
        self.fns: set[tuple[int, bytes]] = set()         # functions it has been sent
        self.ctxs: set[int] = set()                      # clients whose context it has
        self.done = 0
        self.failures = 0
        self.isolated = False  # holds one suspect job and nothing else
        self.stealing: set[tuple[int, int]] = set()  # jobs asked back, not yet answered
        self.cancelling: set[tuple[int, int]] = set()  # jobs a cancel was asked for
        self.out_cancel: list[list] = []
        self.lane = WorkerLane.offered(info.get("lane"))  # None: it has no lane
        self.slurm_job = str(info.get("slurm_job") or "")  # its SLURM job ("123_4"), if any
        end = info.get("alloc_end")  # when its allocation ends (time.time()), if it does
        self.alloc_end: float | None = float(end) if isinstance(end, (int, float)) else None
        self.draining = ""     # why it drains (its DRAIN): it gets nothing more
        # what the process offers (--resources, --gpus; checked by the protocol) and what
        # its held jobs take of it; it runs one job at a time, each with all of it
        self.capacity = Capacity(dict(info.get("resources") or {}))

    def evicted(self, wall_now: float) -> str:
        """Why its loss now is an eviction (its drain, its allocation's end), not a death
        ("" if it is a death): its jobs go back uncharged."""
        if self.draining:
            return f"while draining: {self.draining}"
        if self.alloc_end is not None and wall_now >= self.alloc_end - EVICT_SLACK:
            return "at its allocation's end: killed by the walltime"
        return ""

    def free(self) -> int:
        if self.isolated or self.draining or (self.lane is not None and self.lane.job):
            return 0  # a suspect alone, or a long lane job: feed it nothing
        return self.hold - len(self.assigned)

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

    def running(self) -> JobRecord | None:
        """The job it reported starting last and has not finished, if any."""
        for job in self.assigned.values():
            if job.started:
                return job
        return None


