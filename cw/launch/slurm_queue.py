"""The SLURM launcher's view of squeue: this user's cw jobs, and where the master runs.

    jobs(names) ---- ONE squeue -u USER -n cmaster,cworkers,cwadapt ---> [SlurmJob]
    master_host / master_address / find_master / slurm_master_host: the connection file
        $CW_HOME/default.json first, else the node of the RUNNING cmaster job and the port
        in its --comment (cw-port=P)
"""
from __future__ import annotations

import dataclasses
import getpass
import logging
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence

from cw.conn import address
from cw.errors import LaunchError, MasterNotFound
from cw.launch.slurm_jobs import JOB_ADAPT
from cw.protocol import DEFAULT_PORT

log = logging.getLogger(__name__)

JOB_MASTER = "cmaster"
JOB_WORKERS = "cworkers"
PORT_TAG = "cw-port="       # the master job's --comment carries its port
POLL_MIN, POLL_MAX = 0.1, 2.0  # squeue backoff bounds, seconds


@dataclasses.dataclass
class SlurmJob:
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


def jobs(names: Sequence[str] = (JOB_MASTER, JOB_WORKERS, JOB_ADAPT)) -> list[SlurmJob]:
    """The current user's queued or running jobs with these names: one ``squeue`` call."""
    proc = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-n", ",".join(names),
                 "-o", "%i|%j|%T|%N|%k|%r"])
    if proc.returncode != 0:
        raise LaunchError(f"squeue failed: {proc.stderr.strip()}")
    found = []
    for line in proc.stdout.splitlines():
        jid, name, state, nodes, comment, reason = line.split("|", 5)
        found.append(SlurmJob(jid, name, state, _first_node(nodes) if nodes else "", comment,
                         reason))
    return found


def _port_of(job: SlurmJob) -> int:
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


def _running_master(timeout: float) -> SlurmJob | None:
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


