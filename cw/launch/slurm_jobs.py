"""The SLURM side of adaptive workers, used from inside the master's allocation (and, for
``allocation_end``, from inside a worker's).

    master (cw.adapt decides how many)                         SLURM
      submit_workers(n, script, options) --- sbatch --array=0-(n-1) --parsable ----> "123"
            -> ["123_0", ..., "123_(n-1)"]       (one array job: one call for n workers)
      Poller(name).poll() --- at most once per interval: squeue -h -r --me -n NAME
                              -o '%i|%T|%r|%e|%l|%N' ---> {id: WorkerJob(state, reason,
                              end, ...)}  for ALL of the master's worker jobs in one call;
                              within the interval the last snapshot comes back unasked
      cancel(ids) / cancel(ids, "INT") --- one scancel for all of them (pending jobs, or
                              running ones signalled so the worker says BYE and leaves)

    worker
      this_job() ------------ "123_4" from $SLURM_ARRAY_JOB_ID/_TASK_ID (else $SLURM_JOB_ID):
                              what its HELLO tells the master, to be cancelled by
      allocation_end() --- once, at start: $SLURM_JOB_END_TIME (newer SLURM: a UNIX time),
                           else squeue -h -j $SLURM_JOB_ID (ARRAY_TASK for an array
                           task) -o '%e|%l' ---> time.time() scale
                           float, None when the job has no time limit (or no SLURM job)

The worker script is the launcher's (``cw.launch.slurm.worker_script``): srun runs one
``python -m cw.worker --slurm`` per array task, with the launcher's exports. sbatch is run
with the allocation's own ``SLURM_*`` output variables removed from its environment, so the
master's job geometry (``SLURM_NTASKS``, ``SLURM_CPUS_PER_TASK``, ...) does not leak into the
workers' srun; ``SBATCH_*`` input variables (the user's choices) are kept.

Every SLURM command is bounded (COMMAND_TIMEOUT) and raises LaunchError when it fails; the
poller instead logs and keeps its last snapshot (a slow controller must not stop the master).
The poller is thread-safe: the master runs ``poll`` in an executor thread, off its IOLoop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

from cw.conn import address
from cw.errors import LaunchError

log = logging.getLogger(__name__)

JOB_ADAPT = "cwadapt"        # job name of the master's adaptive worker jobs
POLL_INTERVAL = 10.0         # seconds: the most often the poller asks squeue
COMMAND_TIMEOUT = 30.0       # seconds any one SLURM command may take
SQUEUE_FORMAT = "%i|%T|%r|%e|%l|%N"  # id (array: 123_4), state, reason, end, limit, nodes
KEEP_ENV = ("SLURM_CONF", "SLURM_CLUSTERS")  # SLURM_* that configure the commands
NO_TIME = frozenset({"", "N/A", "NONE", "Unknown", "UNLIMITED", "INVALID", "NOT_SET"})


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """One worker job (or array task) as squeue last saw it."""
    id: str                # "123_4" for an array task, "123" for a plain job
    state: str             # PENDING, RUNNING, COMPLETING, ...
    reason: str            # why it pends ("None" when it runs)
    end: float | None      # when it ends or is expected to (time.time() scale); None: no limit
    node: str = ""         # its node list, "" while pending

    @property
    def pending(self) -> bool:
        return self.state in ("PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD")

    @property
    def array(self) -> str:
        """The array job's id ("123" for "123_4"), or the job's own id."""
        return self.id.split("_", 1)[0]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one squeue call said about all of a master's worker jobs."""
    jobs: dict[str, WorkerJob]
    taken: float           # time.monotonic() of the call
    ok: bool = True        # False: the call failed; ``jobs`` is the previous snapshot's


def _environment() -> dict[str, str]:
    """This process's environment without the allocation's SLURM_* output variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") or k in KEEP_ENV}


def _squeue_environment() -> dict[str, str]:
    """squeue prints times as parse_time reads them, whatever the user's time format."""
    return {**os.environ, "SLURM_TIME_FORMAT": "standard"}


def _run(argv: list[str], input: str | None = None,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one SLURM command, bounded; LaunchError if it is missing or hangs."""
    log.debug("running %s", shlex.join(argv))
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot run {argv[0]}: {exc}") from exc


def parse_time(text: str) -> float | None:
    """squeue's ``%e`` (``2026-12-01T23:13:05``, the local time zone) as a UNIX time; None
    for the words SLURM prints when there is no such time (N/A, Unknown, ...)."""
    text = text.strip()
    if text in NO_TIME:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        log.debug("not a SLURM time: %r", text)
        return None


def parse_squeue(stdout: str) -> dict[str, WorkerJob]:
    """Lines of ``squeue -h -o SQUEUE_FORMAT`` -> {id: WorkerJob}."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        jid, state, reason, end, limit, nodes = parts
        found[jid] = WorkerJob(jid, state, reason, None if limit == "UNLIMITED" else
                               parse_time(end), "" if nodes in ("", "(null)") else nodes)
    return found


# ------------------------------------------------------------------ submit and cancel
def submit_workers(n: int, script: str, options: Sequence[str] = (),
                   name: str = JOB_ADAPT) -> list[str]:
    """Submit ``n`` worker processes as ONE array job of one-task jobs running ``script``
    (``cw.launch.slurm.worker_script()``); ``options`` (the launcher's ``--Xworkers``) go to
    sbatch as they are. Returns the array tasks' ids, ``["123_0", ..., "123_<n-1>"]``.
    Output goes to ``$CW_HOME/logs/<name>-<array>_<task>.log``."""
    if n <= 0:
        return []
    logs = address.private_mkdir(address.cw_home() / "logs")
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--array=0-{n - 1}",
            "--ntasks=1", f"--output={logs}/{name}-%A_%a.log", *options]
    proc = _run(argv, input=script, env=_environment())
    if proc.returncode != 0:
        raise LaunchError(f"sbatch of {n} {name} workers failed: {proc.stderr.strip()}")
    array = proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not array.isdigit():
        raise LaunchError(f"sbatch of {n} {name} workers said {proc.stdout.strip()!r}")
    log.info("submitted %d %s workers as array job %s", n, name, array)
    return [f"{array}_{i}" for i in range(n)]


def cancel(ids: Sequence[str], signal: str | None = None) -> bool:
    """One ``scancel`` for all of ``ids`` (jobs, arrays or array tasks such as "123_4").

    No ``signal``: the jobs end (pending ones never start). ``signal="INT"``: running
    workers are sent SIGINT in their steps, so they finish the job they run, say BYE and
    leave, and their jobs end with them. False (logged) if scancel failed, e.g. because a
    job had already ended."""
    if not ids:
        return True
    argv = ["scancel", *([f"--signal={signal}"] if signal else []), *ids]
    proc = _run(argv)
    if proc.returncode != 0:
        log.info("scancel %s: %s", " ".join(ids), proc.stderr.strip())
        return False
    log.info("%s %s", f"sent SIG{signal} to" if signal else "cancelled", " ".join(ids))
    return True


# ------------------------------------------------------------------ the poller
class Poller:
    """Asks squeue about ALL of this user's jobs named ``name`` in one call, at most once
    per ``interval`` seconds, whatever the number of jobs; in between ``poll()`` returns
    the last snapshot. Thread-safe (one call runs at a time)."""

    def __init__(self, name: str = JOB_ADAPT, interval: float = POLL_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.interval = interval
        self.clock = clock
        self.calls = 0                    # squeue calls made, for status and tests
        self.last = Snapshot({}, float("-inf"), ok=False)
        self._lock = threading.Lock()
        self._reasons: dict[str, str] = {}  # last pending reason logged per job

    def due(self) -> bool:
        """True if the next ``poll()`` would ask squeue."""
        return self.clock() - self.last.taken >= self.interval

    def poll(self, force: bool = False) -> Snapshot:
        """The jobs as squeue sees them, asking it only if the last call is ``interval``
        old (or ``force``; even then never twice at once)."""
        with self._lock:
            if not force and not self.due():
                return self.last
            taken = self.clock()
            self.calls += 1
            try:
                proc = _run(["squeue", "-h", "-r", "--me", "-n", self.name,
                             "-o", SQUEUE_FORMAT], env=_squeue_environment())
                problem = "" if proc.returncode == 0 else proc.stderr.strip()
            except LaunchError as exc:
                problem = str(exc)
            if problem:  # keep what we knew; ask again after the interval, not sooner
                log.warning("squeue about %s jobs failed: %s", self.name, problem)
                self.last = Snapshot(self.last.jobs, taken, ok=False)
                return self.last
            self.last = Snapshot(parse_squeue(proc.stdout), taken)
            self._log_reasons(self.last.jobs)
            return self.last

    def _log_reasons(self, jobs: dict[str, WorkerJob]) -> None:
        """Log a pending reason when it changes (one line per reason, not per job)."""
        changed: dict[str, list[str]] = {}
        for job in jobs.values():
            if job.pending and self._reasons.get(job.id) != job.reason:
                changed.setdefault(job.reason, []).append(job.id)
        self._reasons = {j.id: j.reason for j in jobs.values() if j.pending}
        for reason, ids in changed.items():
            log.info("%d %s worker jobs PENDING (reason: %s)", len(ids), self.name, reason)


async def poll_forever(poller: Poller, on_snapshot: Callable[[Snapshot], None],
                       executor: Executor | None = None) -> None:
    """The master's watch on its worker jobs, a coroutine for its IOLoop (tornado runs on
    asyncio: ``IOLoop.current().spawn_callback(poll_forever, poller, cb)``, or keep the
    task to cancel it). Each interval the squeue call runs in ``executor`` (a thread, so
    the loop never blocks on SLURM) and ``on_snapshot`` gets the result on the loop."""
    loop = asyncio.get_running_loop()
    while True:
        snap = await loop.run_in_executor(executor, poller.poll)
        try:
            on_snapshot(snap)
        except Exception:
            log.exception("handling a squeue snapshot failed")
        await asyncio.sleep(max(0.0, poller.interval - (poller.clock() - snap.taken)))


def pending_reasons(snapshot: Snapshot) -> dict[str, int]:
    """{reason: number of pending jobs}: what the master's status shows."""
    counts: dict[str, int] = {}
    for job in snapshot.jobs.values():
        if job.pending:
            counts[job.reason] = counts.get(job.reason, 0) + 1
    return counts


# ------------------------------------------------------------------ a worker's allocation
def this_job(env: Mapping[str, str] | None = None) -> str | None:
    """The id of the SLURM job (``"123_4"`` for an array task) this process runs in, as
    the poller names it and ``cancel`` takes it: what a worker tells the master in its
    HELLO so the master can cancel it. None outside SLURM."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID", ""), env.get("SLURM_ARRAY_TASK_ID", "")
    if array and task:  # an array task: its array's id may be its own, naming them all
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID", "").strip() or None


def allocation_end(env: Mapping[str, str] | None = None) -> float | None:
    """When this process's SLURM allocation ends (a ``time.time()`` value), asked once:
    ``$SLURM_JOB_END_TIME`` if SLURM set it, else one ``squeue -j $SLURM_JOB_ID``. None
    when the job has no time limit, when not in a SLURM job, or when SLURM cannot say."""
    env = os.environ if env is None else env
    raw = env.get("SLURM_JOB_END_TIME", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return float(raw)
    job = this_job(env)
    if job is None:
        return None
    try:
        proc = _run(["squeue", "-h", "-j", job, "-o", "%e|%l"], env=_squeue_environment())
    except LaunchError as exc:
        log.warning("cannot ask SLURM when job %s ends: %s", job, exc)
        return None
    line = proc.stdout.strip().splitlines()[:1]
    if proc.returncode != 0 or not line or "|" not in line[0]:
        log.warning("squeue does not say when job %s ends: %s", job,
                    proc.stderr.strip() or proc.stdout.strip())
        return None
    end, limit = line[0].split("|", 1)
    when = None if limit.strip() == "UNLIMITED" else parse_time(end)
    log.info("allocation of job %s ends %s", job, "never" if when is None else
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)))
    return when
