"""Adaptive workers: the pure policy (no I/O, no clock of its own; ``now`` is passed in).

    master, every poll (cw.slurm_jobs.Poller)       decide(Demand, [WorkerView], Limits)
      queued jobs, learned mean job seconds  ---->    -> Decision(submit=k,
      connected worker processes (idle since,              cancel_pending=p,
        allocation end)                                    cancel_idle=[idents])
      pending worker jobs (squeue)           ---->  the master: submit_workers(k) as one
                                                    array, cancel the p newest pending jobs,
                                                    SIGINT the idle workers' jobs
    worker, before taking each job
      takes(expected, now, end, margin)      ---->  False: give the job back (uncharged)
      draining(now, end, margin)             ---->  True: take nothing unexpected, give
                                                    prefetched jobs back, finish, BYE

How many workers: enough to run the queued and running jobs within ``horizon`` seconds by
the learned job time (``ceil(jobs * job_seconds / horizon)``; one per job while no time is
learned), between ``min_workers`` and ``max_workers``. Connected workers and pending worker
jobs both count, so a decision taken again before the pending jobs start asks for nothing
more. A worker whose allocation ends within ``lead`` (the time a new worker job takes to
start) plus the drain margin is *leaving*: it no longer counts, nor against the maximum, so
its replacement is asked for before it drains and throughput does not dip. Idle workers
are cancelled only when nothing is queued, longest idle first, down to ``min_workers``;
pending jobs no longer needed are cancelled first.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0     # seconds a worker may idle before it is cancelled (down to min)
HORIZON = 60.0          # seconds the policy aims to drain the queue in
MARGIN = 60.0           # seconds before its allocation's end a worker starts draining
LEAD = 60.0             # seconds a new worker job is assumed to take to start
SLACK = 1.25            # a job "is expected to finish" if now + expected * SLACK <= end
SHARE = 0.25            # the most of an allocation's life a margin or the lead may take


@dataclasses.dataclass(frozen=True)
class WorkerView:
    """One connected worker process, as the master sees it."""
    ident: str                    # what the master cancels it by (e.g. its SLURM job id)
    idle_since: float | None      # when it last became idle; None: it holds jobs
    end: float | None = None      # when its allocation ends; None: never (or unknown)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The user's bounds: ``-n`` (max), ``--min-workers``, ``--idle-timeout``."""
    max_workers: int
    min_workers: int = 0
    idle_timeout: float = IDLE_TIMEOUT
    horizon: float = HORIZON
    margin: float = MARGIN
    lead: float = LEAD

    def __post_init__(self) -> None:
        if self.max_workers < 0 or not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 0 <= min_workers ({self.min_workers}) <= max_workers "
                             f"({self.max_workers})")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be positive, not {self.horizon}")


@dataclasses.dataclass(frozen=True)
class Demand:
    """The work the master holds: queued jobs and what it learned of their times."""
    now: float
    queued: int
    job_seconds: float | None = None   # mean job time learned so far; None: nothing yet
    pending: int = 0                   # worker jobs submitted that have not connected yet
    running: int = 0                   # jobs running on workers now


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the master should do now."""
    submit: int = 0                    # worker processes to submit (as one array job)
    cancel_pending: int = 0            # pending worker jobs to cancel (the newest ones)
    cancel_idle: tuple[str, ...] = ()  # idents of idle workers to cancel
    wanted: int = 0                    # the worker count aimed at (for status)
    leaving: int = 0                   # workers whose allocation ends soon (not counted)

    def __bool__(self) -> bool:
        return bool(self.submit or self.cancel_pending or self.cancel_idle)


def wanted(queued: int, job_seconds: float | None, limits: Limits) -> int:
    """Workers that run ``queued`` jobs (those queued and those running) within the
    horizon, within the limits."""
    if queued <= 0:
        need = 0
    elif job_seconds is None or job_seconds <= 0:
        need = queued if job_seconds is None else 1  # unknown: one each; ~0 s: one is enough
    else:
        need = max(1, math.ceil(queued * job_seconds / limits.horizon))
    return max(limits.min_workers, min(limits.max_workers, need))


def leaving(worker: WorkerView, now: float, limits: Limits) -> bool:
    """True if the worker's allocation ends before a replacement asked for now would run
    (its drain margin plus the lead time a new worker job needs)."""
    return worker.end is not None and now >= worker.end - limits.margin - limits.lead


def decide(demand: Demand, workers: Sequence[WorkerView], limits: Limits) -> Decision:
    """How many workers to submit, pending jobs to cancel and idle workers to cancel."""
    now = demand.now
    staying = [w for w in workers if not leaving(w, now, limits)]
    gone = len(workers) - len(staying)
    target = wanted(demand.queued + demand.running, demand.job_seconds, limits)
    have = len(staying) + demand.pending
    if have < target:
        submit = min(target, limits.max_workers) - have
        return _said(Decision(submit=submit, wanted=target, leaving=gone))
    surplus_pending = min(demand.pending, have - target)  # never more than needed
    idle: list[str] = []
    if demand.queued == 0:
        expired = sorted((w for w in staying if w.idle_since is not None
                          and now - w.idle_since > limits.idle_timeout),
                         key=lambda w: w.idle_since or 0.0)
        room = len(staying) - max(target, limits.min_workers)
        idle = [w.ident for w in expired[:max(0, room)]]
    return _said(Decision(cancel_pending=surplus_pending, cancel_idle=tuple(idle),
                          wanted=target, leaving=gone))


def _said(decision: Decision) -> Decision:
    if decision:
        log.debug("adapt: %s", decision)
    return decision


# ------------------------------------------------------------------ a worker's walltime
def takes(expected: float | None, now: float, end: float | None,
          margin: float = MARGIN) -> bool:
    """Whether a worker whose allocation ends at ``end`` takes a job now.

    A job of known duration (learned, or ``ex.options(expected=SECONDS)``) is taken if it
    is expected to finish before the end (with SLACK); one of unknown duration only until
    ``margin`` seconds before the end. No end (unlimited): every job."""
    if end is None:
        return True
    if expected is not None and expected >= 0:
        return now + expected * SLACK <= end
    return now < end - margin


def draining(now: float, end: float | None, margin: float = MARGIN) -> bool:
    """True from ``margin`` seconds before the allocation's end: the worker gives back
    what it prefetched, takes only jobs ``takes`` accepts, and leaves when it runs none."""
    return end is not None and now >= end - margin


def scaled(seconds: float, life: float | None) -> float:
    """A margin (or lead) for an allocation of ``life`` seconds: at most SHARE of it, so
    that a short allocation (``--time=1``) still works most of its minute. None: as is."""
    return seconds if life is None or life <= 0 else min(seconds, SHARE * life)


def replace_at(end: float | None, margin: float = MARGIN, lead: float = LEAD) -> float | None:
    """When the master should ask for this worker's replacement (None: never), so that
    the new worker runs by the time this one starts draining."""
    return None if end is None else end - margin - lead
