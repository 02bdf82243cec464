"""Adaptive SLURM workers, run by the master inside its own allocation (``--adapt N``).

    every interval (10 s):  executor thread                 the master's IOLoop
      Poller.poll(): ONE squeue for all ---> snapshot --->  Elastic.plan(): Demand (queued,
        of the master's worker jobs                         running, learned job seconds,
                                                            pending worker jobs) and a
                                                            WorkerView per connected worker
                                                            (its SLURM job id and allocation
                                                            end from its HELLO, idle since)
                                                            -> adapt.decide -> Decision
      act(): sbatch --array (one call for <--- what to do <--'
        all new workers), scancel of the
        newest unneeded pending jobs, scancel
        -s INT of idle workers' jobs

SLURM commands never run on the loop: squeue, sbatch and scancel all run in one executor
thread, one after the other, so the master asks SLURM at most one squeue per interval and
one sbatch and two scancels per decision, whatever the number of jobs. What the workers
are is the launcher's: the worker script (``--worker-script``) and sbatch options
(``--worker-option``, the launcher's ``--Xworkers``) go to every submit. When the master
stops, it cancels the worker jobs it submitted.

A worker job counts as *pending* from its submit until its worker says HELLO (or squeue no
longer lists it); a worker whose allocation ends within margin + lead is *leaving* and
counts for nothing (cw.launch.adapt), so its replacement comes before it drains; a
draining worker (DRAIN) counts for nothing either.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cw.launch import adapt, slurm_jobs
from cw.master.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Config:
    """What ``--adapt`` and its flags ask for."""
    limits: adapt.Limits
    script: str                        # the worker job's batch script (its text)
    options: tuple[str, ...] = ()      # sbatch options of every worker job
    interval: float = slurm_jobs.POLL_INTERVAL
    name: str = slurm_jobs.JOB_ADAPT


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``python -m cw.master``'s adapt flags."""
    g = parser.add_argument_group("adaptive SLURM workers (the master runs in SLURM)")
    g.add_argument("--adapt", type=int, default=0, metavar="N",
                   help="submit and cancel SLURM worker jobs with the work, up to N workers")
    g.add_argument("--min-workers", type=int, default=0, help="keep at least this many")
    g.add_argument("--idle-timeout", type=float, default=adapt.IDLE_TIMEOUT,
                   help="seconds a worker may idle before it is cancelled (down to the min)")
    g.add_argument("--adapt-interval", type=float, default=slurm_jobs.POLL_INTERVAL,
                   help="seconds between squeue calls (one call for all worker jobs)")
    g.add_argument("--drain-margin", type=float, default=adapt.MARGIN,
                   help="seconds before its allocation ends a worker drains")
    g.add_argument("--adapt-lead", type=float, default=adapt.LEAD,
                   help="seconds a new worker job is assumed to take to start")
    g.add_argument("--adapt-horizon", type=float, default=adapt.HORIZON,
                   help="seconds the queued work should take with the workers asked for")
    g.add_argument("--worker-script", default=None,
                   help="the worker jobs' batch script (default: srun python -m cw.worker "
                        "--slurm, as ./slurm.py writes it)")
    g.add_argument("--worker-option", action="append", default=[], metavar="ARG",
                   help="an sbatch option of the worker jobs (repeatable, as --worker-option=ARG)")


def config_from(args: argparse.Namespace) -> Config | None:
    """The Config the flags describe; None without ``--adapt``."""
    if not args.adapt:
        return None
    limits = adapt.Limits(args.adapt, args.min_workers, args.idle_timeout,
                          args.adapt_horizon, args.drain_margin, args.adapt_lead)
    if args.worker_script:
        script = Path(args.worker_script).read_text()
    else:  # srun python -m cw.worker --slurm, with this master's CW_HOME and PYTHONPATH
        from cw.launch.slurm_script import worker_script
        script = worker_script(worker_args=["--drain-margin", f"{args.drain_margin:g}"])
    return Config(limits, script, tuple(args.worker_option), args.adapt_interval)


class Elastic:
    """The master's adaptive workers: one coroutine on its loop (``run``)."""

    def __init__(self, scheduler: Scheduler, config: Config):
        self.sched = scheduler
        self.config = config
        self.poller = slurm_jobs.Poller(config.name, config.interval)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cw-slurm")
        self.submitted: dict[str, float] = {}  # our worker jobs -> monotonic submit time
        self.joined: set[str] = set()          # ... whose worker said HELLO once
        self.cancelled: set[str] = set()       # ... cancelled by us
        self.idle: dict[bytes, tuple[int, float]] = {}  # worker -> (done, idle since)
        self.job_seconds: float | None = None  # last learned mean job time
        self.last = adapt.Decision()
        self.submits = 0                       # sbatch calls
        self.task: asyncio.Future | None = None

    def start(self) -> None:
        """Start ``run`` on the running loop."""
        self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        log.info("adapt: %d to %d SLURM workers, idle timeout %g s, squeue every %g s",
                 self.config.limits.min_workers, self.config.limits.max_workers,
                 self.config.limits.idle_timeout, self.config.interval)
        while True:
            snap = await loop.run_in_executor(self.pool, self.poller.poll)
            try:
                decision, pending = self.plan(snap)
                if decision:
                    submitted = await loop.run_in_executor(
                        self.pool, self.act, decision, pending)
                    now = time.monotonic()
                    self.submitted.update((i, now) for i in submitted)
            except Exception:
                log.exception("adapt: a decision failed")
            await asyncio.sleep(max(0.1, self.config.interval -
                                    (self.poller.clock() - snap.taken)))

    def plan(self, snap: slurm_jobs.Snapshot) -> tuple[adapt.Decision, list[str]]:
        """On the loop: what to do, from the scheduler and the snapshot."""
        now = time.time()
        workers = self.sched.workers.values()
        connected = {w.slurm_job for w in workers if w.slurm_job}
        self.joined |= connected & set(self.submitted)
        for jid, when in list(self.submitted.items()):  # ended: squeue (asked after the
            if snap.ok and snap.taken > when + 1.0 and jid not in snap.jobs \
                    and jid not in connected:  # submit) no longer lists it
                del self.submitted[jid]
                self.joined.discard(jid)
                self.cancelled.discard(jid)
        pending = [j for j in self.submitted if j not in self.joined and j not in self.cancelled]
        views = []
        for w in workers:
            if w.draining or w.slurm_job in self.cancelled:
                continue
            views.append(adapt.WorkerView(w.slurm_job if w.slurm_job in self.joined else "",
                                          self._idle_since(w, now), self._end(w, now)))
        self.idle = {i: v for i, v in self.idle.items() if i in self.sched.workers}
        times = [w.job_seconds for w in workers if w.job_seconds is not None]
        if times:
            self.job_seconds = sum(times) / len(times)
        demand = adapt.Demand(now, self.sched.queued, self.job_seconds, len(pending),
                              sum(len(w.assigned) for w in workers))
        decision = adapt.decide(demand, views, self.config.limits)
        most = 2 * self.config.limits.max_workers - len(self.sched.workers) - len(pending)
        if decision.submit > most:  # leaving workers not counted: never run away
            decision = dataclasses.replace(decision, submit=max(0, most))
        idle = tuple(i for i in decision.cancel_idle if i)
        self.cancelled.update(idle)
        self.cancelled.update(pending[len(pending) - decision.cancel_pending:]
                              if decision.cancel_pending else [])
        self.last = dataclasses.replace(decision, cancel_idle=idle)
        return self.last, pending

    def _end(self, worker, now: float) -> float | None:
        """The worker's end as adapt.decide should see it: for a short allocation, the
        margin and lead scaled down to its life (adapt.scaled, as its worker does)."""
        end = worker.alloc_end
        if end is None:
            return None
        life = end - (now - (time.monotonic() - worker.joined))  # from its HELLO
        limits = self.config.limits
        short = adapt.scaled(limits.margin, life) + adapt.scaled(limits.lead, life)
        return end + (limits.margin + limits.lead) - short

    def _idle_since(self, worker, now: float) -> float | None:
        """When the worker last became idle, as seen at the polls (None: it holds jobs)."""
        if worker.assigned:
            self.idle.pop(worker.ident, None)
            return None
        done, since = self.idle.get(worker.ident, (-1, now))
        if done != worker.done:
            since = now
        self.idle[worker.ident] = (worker.done, since)
        return since

    def act(self, decision: adapt.Decision, pending: list[str]) -> list[str]:
        """In the executor thread: the SLURM calls of one decision; the ids submitted."""
        if decision.cancel_pending:
            slurm_jobs.cancel(pending[len(pending) - decision.cancel_pending:])
        if decision.cancel_idle:
            log.info("adapt: cancelling %d idle workers", len(decision.cancel_idle))
            slurm_jobs.cancel(list(decision.cancel_idle), "INT")
        if decision.submit <= 0:
            return []
        self.submits += 1
        try:
            return slurm_jobs.submit_workers(decision.submit, self.config.script,
                                             self.config.options, self.config.name)
        except Exception as exc:  # LaunchError: logged, tried again at the next poll
            log.warning("adapt: %s", exc)
            return []

    def status(self) -> dict:
        """What status shows: the limits, the aim, the worker jobs and SLURM's reasons."""
        snap = self.poller.last
        limits = self.config.limits
        return {"max_workers": limits.max_workers, "min_workers": limits.min_workers,
                "idle_timeout": limits.idle_timeout, "interval": self.config.interval,
                "wanted": self.last.wanted, "leaving": self.last.leaving,
                "worker_jobs": len(self.submitted),
                "pending": len([j for j in self.submitted
                                if j not in self.joined and j not in self.cancelled]),
                "pending_reasons": slurm_jobs.pending_reasons(snap),
                "squeue_calls": self.poller.calls, "sbatch_calls": self.submits}

    def close(self) -> None:
        """The master stops: end its worker jobs (running ones get SIGINT: BYE, leave)."""
        if self.task is not None:
            self.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)
        snap = self.poller.last
        jobs = snap.jobs
        running = [j for j in self.submitted if j in jobs and not jobs[j].pending]
        waiting = [j for j, when in self.submitted.items() if j not in running and
                   (j in jobs or when >= snap.taken)]  # pending, or too new to be seen
        try:
            slurm_jobs.cancel(waiting)
            slurm_jobs.cancel(running, "INT")
        except Exception as exc:
            log.warning("adapt: cannot cancel the worker jobs: %s", exc)
