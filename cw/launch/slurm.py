"""SLURM launcher: the master and the workers as two batch jobs of the current user.

    start(n)
      sbatch -J cmaster  --comment=cw-port=P   exec python -m cw.master --port P
                                                 --connection-file $CW_HOME/default.json
      sbatch -J cworkers --ntasks=n            exec srun python -m cw.worker --slurm
      poll squeue (one call for both jobs, backoff): PENDING -> log SLURM's reason,
           fail with it after pending_timeout; RUNNING -> master at (node, P)
      wait_until_up: cw.status until the master answers and n workers registered

    a worker task (--slurm) or a client finds the master:
      $CW_HOME/default.json (shared home) --else--> squeue: node of RUNNING cmaster + port
                                                    from its comment  (master_address)

    stop()
      squeue -> PENDING jobs: scancel; RUNNING jobs: scancel -s INT (reaches the steps:
      the srun'd workers) and scancel -s INT --batch (reaches the batch shell: the master,
      exec'd) -> poll squeue until they are gone -> scancel -s KILL --full if they linger

    start(n, adapt=True): no cworkers job; the master job gets --adapt n and the worker
      script (cw.launch.slurm_adapt) and submits cwadapt array jobs itself (cw.master.elastic)

Only one cw cluster per user runs at a time: jobs are found by name and user. Here: start
and stop; squeue and finding the master in cw.launch.slurm_queue, the batch scripts in
cw.launch.slurm_script, the command line in cw.launch.slurm_cli.
"""
from __future__ import annotations

import dataclasses
import getpass
import logging
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager

from cw.conn import address
from cw.errors import LaunchError, MasterUnreachable
from cw.launch.common import (
    allocated,
    journal_flags,
    log_tail,
    wait_until_up,
    worker_names,
)
from cw.launch.slurm_adapt import drain_options, master_args
from cw.launch.slurm_jobs import JOB_ADAPT
from cw.launch.slurm_queue import (
    JOB_MASTER,
    JOB_WORKERS,
    PORT_TAG,
    SlurmJob,
    _poll,
    _run,
    find_master,
    jobs,
    master_address,
    master_host,
    slurm_master_host,
)
from cw.launch.slurm_script import job_script, worker_script
from cw.protocol import DEFAULT_PORT

__all__ = [
    "JOB_ADAPT",
    "JOB_MASTER",
    "JOB_WORKERS",
    "SlurmCluster",
    "SlurmJob",
    "allocate",
    "find_master",
    "jobs",
    "main",
    "master_address",
    "master_host",
    "slurm_master_host",
    "start",
    "stop",
    "worker_script",
]

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # cw.x under python -m too

IDLE_TIMEOUT = 60.0         # seconds an adaptive worker may idle (--idle-timeout)
START_TIMEOUT = 120.0       # seconds start() waits for the master and the workers
STOP_TIMEOUT = 20.0         # seconds stop() waits for SIGINT to end the jobs


@dataclasses.dataclass
class SlurmCluster:
    """What ``start`` brought up: the master's address and the job ids it submitted."""
    host: str
    port: int
    jobs: dict[str, str]       # job name -> job id, for the jobs this start submitted
    status: dict | None = None


# ------------------------------------------------------------------ start
def _sbatch(name: str, script: str, options: Sequence[str]) -> str:
    """Submit ``script`` as job ``name``; return its id. Output goes to $CW_HOME/logs."""
    logs = address.private_mkdir(address.cw_home() / "logs")  # 0700: the logs inside are
    # the job's umask (kept for the user's own files), so the folder keeps them private
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--output={logs}/{name}-%j.log",
            *options]
    proc = _run(argv, input=script)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch of the {name} job failed: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    log.info("submitted %s job %s", name, job_id)
    return job_id


def _clear_stale_connection_file() -> None:
    """Remove a default.json left by a master that died; refuse if that master answers."""
    from cw.conn.ask import status
    path = address.default_connection_file()
    info = address.read_connection_file(path)
    if not info:
        return
    try:
        status(info["host"], int(info["port"]), timeout=1.0)
    except MasterUnreachable:
        log.info("removing stale %s (no master answers at %s:%s)", path, info["host"],
                 info["port"])
        path.unlink(missing_ok=True)
        return
    raise LaunchError(f"a cw master already answers at {info['host']}:{info['port']} "
                      f"(from {path}); stop it first")


def _submit_master(port: int, options: Sequence[str], log_level: str,
                   extra: Sequence[str] = ()) -> str:
    existing = jobs([JOB_MASTER])
    if existing:
        raise LaunchError(f"{existing[0].describe()} already exists for "
                          f"{getpass.getuser()}; run `slurm.py stop` first")
    _clear_stale_connection_file()
    command = [sys.executable, "-m", "cw.master", "--port", str(port), "--connection-file",
               str(address.default_connection_file()), "--log-level", log_level,
               *extra, *journal_flags(f"slurm-{port}")]
    return _sbatch(JOB_MASTER, job_script(command),
                   ["--ntasks=1", f"--comment={PORT_TAG}{port}", *options])


def _submit_workers(n: int, options: Sequence[str], script: str) -> str:
    return _sbatch(JOB_WORKERS, script, [f"--ntasks={n}", *options])


class _Watch:
    """Follows the submitted jobs through squeue: logs pending reasons, fails on timeouts."""

    def __init__(self, submitted: dict[str, str], pending_timeout: float):
        self.submitted = submitted
        self.pending_deadline = time.monotonic() + pending_timeout
        self.pending_timeout = pending_timeout
        self.said: dict[str, str] = {}

    def check(self) -> dict[str, SlurmJob]:
        """One squeue call; raise LaunchError if a job ended or pends for too long."""
        found = {j.id: j for j in jobs()}
        for name, jid in self.submitted.items():
            job = found.get(jid)
            if job is None:
                path = address.cw_home() / "logs" / f"{name}-{jid}.log"
                raise LaunchError(f"{name} job {jid} ended during start; end of {path}:\n"
                                  f"{log_tail(path)}")
            if job.state == "PENDING":
                if self.said.get(jid) != job.reason:
                    log.info("%s job %s is PENDING (reason: %s)", name, jid, job.reason)
                    self.said[jid] = job.reason
                if time.monotonic() > self.pending_deadline:
                    raise LaunchError(f"{name} job {jid} still PENDING after "
                                      f"{self.pending_timeout:g} s (reason: {job.reason})")
        return found

    def master(self, timeout: float) -> SlurmJob:
        """Wait until the submitted master job runs; return it."""
        for _ in _poll(timeout):
            job = self.check()[self.submitted[JOB_MASTER]]  # check() raises if it is gone
            if job.state == "RUNNING" and job.node:
                log.info("%s", job.describe())
                return job
        raise LaunchError(f"{JOB_MASTER} job {self.submitted[JOB_MASTER]} not RUNNING after "
                          f"{timeout:g} s")


def start(nworkers: int, master: bool = True, workers: bool = True,
          port: int | None = None, partition: str | None = None,
          time_limit: str | None = None, master_options: Sequence[str] = (),
          worker_options: Sequence[str] = (), isolated: bool = False,
          docker_image: str | None = None, docker_args: str = "",
          timeout: float = START_TIMEOUT, pending_timeout: float | None = None,
          log_level: str = "INFO", adapt: bool = False, min_workers: int = 0,
          idle_timeout: float = IDLE_TIMEOUT, signal: str | None = None,
          margin: float | None = None, interval: float | None = None,
          lead: float | None = None) -> SlurmCluster:
    """Submit a cmaster job and/or a cworkers job of ``nworkers`` tasks; return once the
    master answers and the workers have registered.

    ``adapt``: no cworkers job; the master (inside its allocation) submits and cancels
    worker jobs with the work, at most ``nworkers``, at least ``min_workers``, cancelling
    workers idle for ``idle_timeout`` s, asking squeue every ``interval`` s (start waits
    for ``min_workers``). ``signal`` (``SIG[@SECS]``) makes SLURM send SIG to the workers
    SECS before their end, and the workers drain on it; ``margin``: the seconds before
    their allocation's end workers stop taking jobs they may not finish (cw.worker.drain);
    ``lead``: the seconds a worker job is assumed to take to start (its replacement is
    asked for that long before a worker drains).

    ``master_options``/``worker_options`` go to sbatch as they are; ``isolated`` puts one
    worker per node; ``docker_image`` runs the workers in that image (``docker_args`` go
    to ``docker run``). A job still PENDING after ``pending_timeout`` (default ``timeout``)
    seconds fails the start with SLURM's reason. On any failure the jobs this call
    submitted are cancelled before LaunchError is raised.
    """
    common = [f"--partition={partition}"] if partition else []
    common += [f"--time={time_limit}"] if time_limit else []
    if adapt and docker_image:  # its command names the master, unknown before it runs
        raise LaunchError("--adapt with -d/--docker-image is not supported yet")
    drain_sbatch, worker_args = drain_options(signal, margin)
    spread = (["--exclusive"] if adapt else ["--ntasks-per-node=1"]) * isolated  # 1/node
    worker_sbatch = [*common, *spread, *drain_sbatch, *worker_options]
    extra = master_args(nworkers, min_workers, idle_timeout, worker_script(
        docker_image, docker_args, ("", 0), log_level, worker_args), worker_sbatch, margin,
        interval, lead) if adapt and master else []
    if adapt:
        nworkers, workers = min_workers, False  # the master submits them
    submitted: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    watch = _Watch(submitted, timeout if pending_timeout is None else pending_timeout)
    try:
        host = None
        if master:
            port = DEFAULT_PORT if port is None else port
            submitted[JOB_MASTER] = _submit_master(port, [*common, *master_options], log_level,
                                                   extra)
            if docker_image:  # the docker command names the master: wait for it first
                host, port = _master_up(watch, port, deadline)
        else:
            host, port = find_master(timeout) if port is None else (master_host(timeout), port)
            if host is None:
                raise LaunchError(f"no running {JOB_MASTER} job found for the workers")
        known = frozenset() if master or host is None else worker_names(host, port)
        if workers and nworkers > 0:  # submitted before the master runs: scheduled together
            script = worker_script(docker_image, docker_args, (host, port), log_level,
                                   worker_args)
            submitted[JOB_WORKERS] = _submit_workers(nworkers, worker_sbatch, script)
        if host is None:
            host, port = _master_up(watch, port, deadline)
        info = wait_until_up(host, port, nworkers if workers or adapt else 0,
                             max(0.5, deadline - time.monotonic()), known, watch.check)
    except BaseException:
        _cancel(list(submitted.values()))
        raise
    log.info("cw cluster up: master %s:%d, %d workers", host, port, len(info["workers"]))
    return SlurmCluster(host, port, dict(submitted), info)


def _master_up(watch: _Watch, port: int, deadline: float) -> tuple[str, int]:
    """Wait for the submitted master job to run; return its address."""
    node = watch.master(deadline - time.monotonic()).node
    return (node, port) if port else _bound_address(watch, deadline)


def _bound_address(watch: _Watch, deadline: float) -> tuple[str, int]:
    """The address a master started with ``--port 0`` recorded in its connection file."""
    path = address.default_connection_file()
    timeout = deadline - time.monotonic()
    for _ in _poll(timeout):
        info = address.read_connection_file(path)
        if info:
            return info["host"], int(info["port"])
        watch.check()
    raise LaunchError(f"the {JOB_MASTER} job runs but wrote no {path} within {timeout:g} s")


# ------------------------------------------------------------------ stop
def _scancel(*args: str) -> None:
    proc = _run(["scancel", *args])
    if proc.returncode != 0:  # e.g. the job ended meanwhile
        log.debug("scancel %s: %s", " ".join(args), proc.stderr.strip())


def _cancel(ids: list[str], timeout: float = STOP_TIMEOUT) -> list[SlurmJob]:
    """End these jobs: SIGINT to running ones (steps and batch shell), cancel pending ones;
    wait until squeue no longer lists them, escalating to SIGKILL. Returns the jobs seen."""
    if not ids:
        return []
    seen: dict[str, SlurmJob] = {}
    signalled: set[str] = set()
    killed = False
    for left in _poll(timeout + 10):
        current = {j.id: j for j in jobs() if j.id in ids}
        seen.update(current)
        if not current:
            return list(seen.values())
        pending = [i for i, j in current.items() if j.state == "PENDING"]
        fresh = [i for i, j in current.items() if j.state == "RUNNING" and i not in signalled]
        if pending:
            _scancel(*pending)
        if fresh:
            _scancel("-s", "INT", *fresh)           # the steps (srun'd workers)
            _scancel("-s", "INT", "--batch", *fresh)  # the batch shell (the exec'd master)
            signalled.update(fresh)
        if left < 10 and not killed:
            killed = True
            log.warning("jobs %s did not end on SIGINT; killing them", " ".join(current))
            _scancel("-s", "KILL", "--full", *current)
            _scancel(*current)
    raise LaunchError(f"jobs {' '.join(current)} are still in squeue after "
                      f"{timeout + 10:g} s")


def stop(master: bool = True, workers: bool = True,
         timeout: float = STOP_TIMEOUT) -> list[str]:
    """Cancel the current user's cworkers and/or cmaster jobs and wait until they are gone.

    Returns one line per job stopped; stopping nothing is fine.
    """
    names = [n for n, on in ((JOB_WORKERS, workers), (JOB_ADAPT, workers),
                             (JOB_MASTER, master)) if on]
    if not names:
        return []
    found = jobs(names)
    _cancel([j.id for j in found], timeout)
    said = [f"stopped {j.describe()}" for j in found]
    for line in said:
        log.info("%s", line)
    return said


def allocate(nworkers: int, master: bool = True, workers: bool = True,
             **options) -> AbstractContextManager[SlurmCluster]:
    """``with allocate(n) as cluster:`` SLURM jobs that are cancelled when the block ends."""
    return allocated(lambda: start(nworkers, master=master, workers=workers, **options),
                     lambda cluster: _cancel(list(cluster.jobs.values())))


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """``slurm.py -n N start|stop|status``: the SLURM launcher's command line
    (cw.launch.slurm_cli)."""
    from cw.launch.slurm_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
