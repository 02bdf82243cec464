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

Only one cw cluster per user runs at a time: jobs are found by name and user.
"""
from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

from cw.conn import address
from cw.errors import LaunchError, MasterNotFound, MasterUnreachable
from cw.launch.common import (
    allocated,
    journal_flags,
    log_tail,
    print_master_status,
    pythonpath,
    wait_until_up,
    worker_names,
)
from cw.protocol import DEFAULT_PORT

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # cw.x under python -m too

JOB_MASTER = "cmaster"
JOB_WORKERS = "cworkers"
PORT_TAG = "cw-port="       # the master job's --comment carries its port
START_TIMEOUT = 120.0       # seconds start() waits for the master and the workers
STOP_TIMEOUT = 20.0         # seconds stop() waits for SIGINT to end the jobs
POLL_MIN, POLL_MAX = 0.1, 2.0  # squeue backoff bounds, seconds


@dataclasses.dataclass
class Job:
    """One line of ``squeue``."""
    id: str
    name: str
    state: str      # PENDING, RUNNING, COMPLETING, ...
    node: str       # first node of the job's node list ("" while pending)
    comment: str
    reason: str     # why it is pending ("None" when running)

    def describe(self) -> str:
        where = f"on {self.node}" if self.node else f"reason {self.reason}"
        return f"{self.name} job {self.id} ({self.state}, {where})"


@dataclasses.dataclass
class SlurmCluster:
    """What ``start`` brought up: the master's address and the job ids it submitted."""
    host: str
    port: int
    jobs: dict[str, str]       # job name -> job id, for the jobs this start submitted
    status: dict | None = None


# ------------------------------------------------------------------ squeue
def _run(argv: list[str], input: str | None = None) -> subprocess.CompletedProcess:
    """Run a SLURM command (bounded); LaunchError if it is missing or hangs."""
    log.debug("running %s", shlex.join(argv))
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot run {argv[0]}: {exc}") from exc


def _first_node(nodelist: str) -> str:
    """``node[01-03],x`` -> ``node01``; a cmaster job has one node, usually plain."""
    proc = _run(["scontrol", "show", "hostnames", nodelist]) if "[" in nodelist else None
    if proc is not None and proc.returncode == 0 and proc.stdout.split():
        return proc.stdout.split()[0]
    return nodelist.split(",")[0]


def jobs(names: Sequence[str] = (JOB_MASTER, JOB_WORKERS)) -> list[Job]:
    """The current user's queued or running jobs with these names: one ``squeue`` call."""
    proc = _run(["squeue", "-h", "-u", getpass.getuser(), "-n", ",".join(names),
                 "-o", "%i|%j|%T|%N|%k|%r"])
    if proc.returncode != 0:
        raise LaunchError(f"squeue failed: {proc.stderr.strip()}")
    found = []
    for line in proc.stdout.splitlines():
        jid, name, state, nodes, comment, reason = line.split("|", 5)
        found.append(Job(jid, name, state, _first_node(nodes) if nodes else "", comment,
                         reason))
    return found


def _port_of(job: Job) -> int:
    tags = [w for w in job.comment.split() if w.startswith(PORT_TAG)]
    return int(tags[0][len(PORT_TAG):]) if tags else DEFAULT_PORT


def _poll(timeout: float) -> Iterator[float]:
    """Yield the time left, at least once, sleeping with backoff between yields."""
    deadline = time.monotonic() + timeout
    delay = POLL_MIN
    while True:
        yield deadline - time.monotonic()
        if time.monotonic() >= deadline:
            return
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, POLL_MAX)


def _running_master(timeout: float) -> Job | None:
    """The user's RUNNING cmaster job, polling squeue up to ``timeout`` seconds."""
    for _ in _poll(timeout):
        try:
            found = [j for j in jobs([JOB_MASTER]) if j.state == "RUNNING" and j.node]
        except LaunchError as exc:
            log.debug("cannot ask squeue: %s", exc)
            return None
        if found:
            return found[0]
    return None


def master_host(timeout: float = 0.0) -> str | None:
    """The node the user's running cmaster job runs on (asking squeue, polling up to
    ``timeout`` seconds with backoff); None if there is none or SLURM is absent."""
    job = _running_master(timeout)
    return job.node if job else None


def master_address(timeout: float = 0.0) -> str | None:
    """``"node:port"`` of the user's running cmaster job (see master_host), else None."""
    job = _running_master(timeout)
    return f"{job.node}:{_port_of(job)}" if job else None


def slurm_master_host() -> str:
    """The host of this user's running cw master, to pass to ``ClientThread`` or
    ``ClusterExecutor`` as their host (the original cluster-workers' API, also
    ``cw.slurm_master_host()``).

    The connection file ``$CW_HOME/default.json`` the master job wrote comes first, else
    the node of the user's RUNNING ``cmaster`` job in squeue. A master that does not listen
    on ``cw.PORT`` (5494) is given as ``"host:port"``, which those constructors accept.
    Raises MasterNotFound, naming both places, when neither knows a master.
    """
    info = address.read_connection_file(address.default_connection_file())
    if info:
        host, port = str(info["host"]), int(info["port"])
    else:
        job = _running_master(0.0) if shutil.which("squeue") else None
        if job is None:
            raise MasterNotFound(
                f"no cw master found: no connection file {address.default_connection_file()} "
                f"and no RUNNING {JOB_MASTER} job of {getpass.getuser()} in squeue"
                f"{'' if shutil.which('squeue') else ' (squeue is not on PATH)'}; start one "
                f"with ./slurm.py -n N start")
        host, port = job.node, _port_of(job)
    return host if port == DEFAULT_PORT else f"{host}:{port}"


def find_master(timeout: float = 300.0) -> tuple[str, int]:
    """Where a worker started with ``--slurm`` should connect, waiting up to ``timeout`` s:
    the connection file ``$CW_HOME/default.json`` first, else squeue's cmaster job."""
    for _ in _poll(timeout):
        info = address.read_connection_file(address.default_connection_file())
        if info:
            return info["host"], int(info["port"])
        job = _running_master(0.0)
        if job and _port_of(job):  # port 0: only the connection file knows it
            return job.node, _port_of(job)
    raise LaunchError(f"no cw master found within {timeout:g} s: no "
                      f"{address.default_connection_file()} and no running {JOB_MASTER} job "
                      f"for {getpass.getuser()} in squeue")


# ------------------------------------------------------------------ start
def _script(command: list[str]) -> str:
    """A batch script that exports what jobs need (``_exports``) and execs ``command``, so
    that ``scancel --batch`` signals the command itself."""
    lines = ["#!/bin/sh", *(f"export {k}={shlex.quote(v)}" for k, v in _exports().items()),
             "exec " + shlex.join(command)]
    return "\n".join(lines) + "\n"


def _exports() -> dict:
    """Variables every job needs: the same CW_HOME, and cw importable from this clone."""
    return {"CW_HOME": str(address.cw_home()), "PYTHONPATH": pythonpath()}


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
    from cw.status import status
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


def _submit_master(port: int, options: Sequence[str], log_level: str) -> str:
    existing = jobs([JOB_MASTER])
    if existing:
        raise LaunchError(f"{existing[0].describe()} already exists for "
                          f"{getpass.getuser()}; run `slurm.py stop` first")
    _clear_stale_connection_file()
    command = [sys.executable, "-m", "cw.master", "--port", str(port), "--connection-file",
               str(address.default_connection_file()), "--log-level", log_level,
               *journal_flags(f"slurm-{port}")]
    return _sbatch(JOB_MASTER, _script(command),
                   ["--ntasks=1", f"--comment={PORT_TAG}{port}", *options])


def _worker_command(docker_image: str | None, docker_args: str, master: tuple,
                    log_level: str) -> list[str]:
    if not docker_image:
        return [sys.executable, "-m", "cw.worker", "--slurm", "--log-level", log_level]
    home = str(address.cw_home())
    return ["docker", "run", "-i", "--rm", "--init", "--network=host", "-e", f"CW_HOME={home}",
            "-v", f"{home}:{home}", *shlex.split(docker_args or ""), docker_image,
            "python", "-m", "cw.worker", master[0], "--port", str(master[1]),
            "--log-level", log_level]


def worker_script(docker_image: str | None = None, docker_args: str = "",
                  master: tuple = ("", 0), log_level: str = "INFO") -> str:
    """The batch script of a workers job: ``srun`` starts one cw worker per task, found
    through SLURM (``--slurm``) or, in ``docker_image``, at ``master``. The launcher's
    cworkers job and the master's adaptive worker jobs (cw.slurm_jobs) run the same."""
    return _script(["srun", *_worker_command(docker_image, docker_args, master, log_level)])


def _submit_workers(n: int, options: Sequence[str], script: str) -> str:
    return _sbatch(JOB_WORKERS, script, [f"--ntasks={n}", *options])


class _Watch:
    """Follows the submitted jobs through squeue: logs pending reasons, fails on timeouts."""

    def __init__(self, submitted: dict[str, str], pending_timeout: float):
        self.submitted = submitted
        self.pending_deadline = time.monotonic() + pending_timeout
        self.pending_timeout = pending_timeout
        self.said: dict[str, str] = {}

    def check(self) -> dict[str, Job]:
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

    def master(self, timeout: float) -> Job:
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
          log_level: str = "INFO") -> SlurmCluster:
    """Submit a cmaster job and/or a cworkers job of ``nworkers`` tasks; return once the
    master answers and the workers have registered.

    ``master_options``/``worker_options`` go to sbatch as they are; ``isolated`` puts one
    worker per node; ``docker_image`` runs the workers in that image (``docker_args`` go
    to ``docker run``). A job still PENDING after ``pending_timeout`` (default ``timeout``)
    seconds fails the start with SLURM's reason. On any failure the jobs this call
    submitted are cancelled before LaunchError is raised.
    """
    common = [f"--partition={partition}"] if partition else []
    common += [f"--time={time_limit}"] if time_limit else []
    submitted: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    watch = _Watch(submitted, timeout if pending_timeout is None else pending_timeout)
    try:
        host = None
        if master:
            port = DEFAULT_PORT if port is None else port
            submitted[JOB_MASTER] = _submit_master(port, [*common, *master_options], log_level)
            if docker_image:  # the docker command names the master: wait for it first
                host, port = _master_up(watch, port, deadline)
        else:
            host, port = find_master(timeout) if port is None else (master_host(timeout), port)
            if host is None:
                raise LaunchError(f"no running {JOB_MASTER} job found for the workers")
        known = frozenset() if master or host is None else worker_names(host, port)
        if workers and nworkers > 0:  # submitted before the master runs: scheduled together
            script = worker_script(docker_image, docker_args, (host, port), log_level)
            submitted[JOB_WORKERS] = _submit_workers(
                nworkers, [*common, *["--ntasks-per-node=1"] * isolated, *worker_options],
                script)
        if host is None:
            host, port = _master_up(watch, port, deadline)
        info = wait_until_up(host, port, nworkers if workers else 0,
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


def _cancel(ids: list[str], timeout: float = STOP_TIMEOUT) -> list[Job]:
    """End these jobs: SIGINT to running ones (steps and batch shell), cancel pending ones;
    wait until squeue no longer lists them, escalating to SIGKILL. Returns the jobs seen."""
    if not ids:
        return []
    seen: dict[str, Job] = {}
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
    names = [n for n, on in ((JOB_WORKERS, workers), (JOB_MASTER, master)) if on]
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
    """``slurm.py -n N start|stop|status``: the SLURM launcher's command line."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    try:
        if args.action == "start":
            cluster = start(
                args.nworkers, args.master, args.workers, args.port, args.partition,
                args.time, args.master_options, args.worker_options, args.isolated,
                args.docker_image, args.docker_args, args.timeout, args.pending_timeout)
            print(f"cw master at {cluster.host}:{cluster.port}; jobs: " +
                  ", ".join(f"{n} {i}" for n, i in cluster.jobs.items()))
        elif args.action == "stop":
            said = stop(args.master, args.workers)
            print("\n".join(said) if said else "nothing to stop: no cw jobs in squeue")
        else:
            return _print_status()
    except LaunchError as exc:
        print(f"slurm.py: {exc}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slurm.py", description=(
        f"Start, stop or show a cw master ({JOB_MASTER} job) and workers ({JOB_WORKERS} "
        "job) on a SLURM cluster."))
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("-n", dest="nworkers", type=int, default=32,
                   help="worker tasks to start (default %(default)s)")
    p.add_argument("-M", dest="master", action="store_false", help="do not start/stop the master")
    p.add_argument("-W", dest="workers", action="store_false",
                   help="do not start/stop the workers")
    p.add_argument("--Xworkers", dest="worker_options", metavar="ARG", action="append",
                   default=[], help="pass ARG to the workers' sbatch (repeatable; write "
                        "--Xworkers=--mem=2G when ARG starts with -)")
    p.add_argument("--Xmaster", dest="master_options", metavar="ARG", action="append",
                   default=[],
                   help="pass ARG to the master's sbatch (repeatable, as --Xmaster=ARG)")
    p.add_argument("-i", "--isolated", action="store_true", help="one worker per node")
    p.add_argument("-d", "--docker-image", default=None, help="run the workers in this image")
    p.add_argument("--docker-args", default="", help="extra arguments for `docker run`")
    p.add_argument("--partition", default=None, help="SLURM partition of both jobs")
    p.add_argument("--time", default=None, help="SLURM time limit of both jobs")
    p.add_argument("--port", type=int, default=None,
                   help=f"the master's port (default {DEFAULT_PORT})")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT,
                   help="seconds start waits for the master and the workers")
    p.add_argument("--pending-timeout", type=float, default=None,
                   help="seconds a job may stay PENDING during start (default: --timeout)")
    return p


def _print_status() -> int:
    found = jobs()
    print("\n".join(j.describe() for j in found) if found else "no cw jobs in squeue")
    has_file = address.read_connection_file(address.default_connection_file())
    return print_master_status(None if has_file else master_address())


if __name__ == "__main__":
    sys.exit(main())
