"""Local launcher: a master and a worker supervisor as processes on this machine.

    start(n)                                              $CW_HOME/
      Popen python -m cw.master --port P  ---writes-->      default.json   (host, port, pid)
            --connection-file $CW_HOME/default.json
      Popen python -m cw.worker HOST --port P -n n
      record pid + process start time of each --------->    mp.json        (what start started)
      wait_until_up: status() until n workers registered    logs/mp-*.log  (their output)

    stop()
      mp.json --> SIGTERM each recorded pid that is still the same process (start time matches)
              --> wait (bounded) --> SIGKILL its process group if it lingers --> drop the record

Processes are found only through ``mp.json``, never by name, so ``stop`` stops exactly what
``start`` started, and running it twice is harmless.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cw.conn import address
from cw.errors import LaunchError
from cw.launch.common import (
    allocated,
    child_env,
    journal_flags,
    log_tail,
    print_master_status,
    wait_until_up,
    worker_names,
)
from cw.protocol import DEFAULT_PORT

log = logging.getLogger(__spec__.name if __spec__ else __name__)  # cw.x under python -m too

START_TIMEOUT = 30.0   # seconds start() waits for the master and the workers
STOP_TIMEOUT = 10.0    # seconds stop() waits after SIGTERM before SIGKILL

# Popen objects of processes started by this Python process, so stop() can reap them
_children: dict[int, subprocess.Popen] = {}


@dataclasses.dataclass
class Proc:
    """One process ``start`` launched: the master, or a worker supervisor of ``n`` workers."""
    role: str                    # "master" or "workers"
    pid: int
    ident: str | None         # process start time from /proc, guards against pid reuse
    host: str                    # the master's address (its own, or the one workers dial)
    port: int
    n: int = 0
    log: str = ""

    def describe(self) -> str:
        if self.role == "master":
            return f"master pid {self.pid} (tcp://{self.host}:{self.port})"
        return f"{self.n} workers (supervisor pid {self.pid}, master {self.host}:{self.port})"


@dataclasses.dataclass
class Cluster:
    """What ``start`` brought up: where the master is and the processes it launched."""
    host: str
    port: int
    procs: list[Proc]
    status: dict | None = None


# ------------------------------------------------------------------ process identity
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie; reaps it if it is our own child."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_process(proc: Proc) -> bool:
    """True if the recorded process still runs (and is not a new one that reused its pid)."""
    if not _alive(proc.pid):
        return False
    return proc.ident is None or _start_time(proc.pid) in (None, proc.ident)


# ------------------------------------------------------------------ state file
def state_file() -> Path:
    """Where ``start`` records what it started: ``$CW_HOME/mp.json``."""
    return address.cw_home() / "mp.json"


@contextlib.contextmanager
def _state() -> Iterator[list[Proc]]:
    """Lock the state file and yield its records; changes to the list are saved."""
    path = state_file()
    with address.open_private(path.with_name(".mp.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            procs = [Proc(**p) for p in json.loads(path.read_text())["procs"]]
        except (OSError, ValueError, KeyError, TypeError):
            procs = []
        yield procs
        if procs:
            tmp = path.with_name(f".mp.json.{os.getpid()}")
            with address.open_private(tmp, "w") as f:
                f.write(json.dumps({"procs": [dataclasses.asdict(p) for p in procs]}, indent=1))
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------ start
def _launch(role: str, argv: list[str], host: str, port: int, n: int = 0) -> Proc:
    """Start ``argv`` in a session of its own, output to $CW_HOME/logs; record it."""
    log_path = address.cw_home() / "logs" / f"mp-{role}.log"
    with address.open_private(log_path, "ab") as out:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 env=child_env(), start_new_session=True)
    _children[popen.pid] = popen
    proc = Proc(role, popen.pid, _start_time(popen.pid), host, port, n, str(log_path))
    with _state() as procs:
        procs.append(proc)
    log.info("started %s, log %s", proc.describe(), log_path)
    return proc


def _check_running(procs: list[Proc]) -> None:
    """Raise LaunchError with the end of its log if one of ``procs`` has exited."""
    for proc in procs:
        if not _alive(proc.pid):
            raise LaunchError(f"the {proc.describe()} exited during start; end of "
                              f"{proc.log}:\n{log_tail(proc.log)}")


def _start_master(port: int, bind: str, log_level: str, timeout: float,
                  started: list[Proc]) -> Proc:
    """Start the master (appended to ``started`` at once) and wait (bounded) for its
    connection file to name its port."""
    conn = address.default_connection_file()
    argv = [sys.executable, "-m", "cw.master", "--host", bind, "--port", str(port),
            "--connection-file", str(conn), "--log-level", log_level,
            # its named batches outlive it (a free port each time: nothing to resume)
            *(journal_flags(f"{socket.gethostname()}-{port}") if port else [])]
    proc = _launch("master", argv, "?", port)
    started.append(proc)
    deadline = time.monotonic() + timeout
    while True:
        info = address.read_connection_file(conn)
        if info and info.get("pid") == proc.pid:
            break
        _check_running([proc])
        if time.monotonic() > deadline:
            raise LaunchError(f"the cw master (pid {proc.pid}) did not write {conn} within "
                              f"{timeout:g} s; see {proc.log}")
        time.sleep(0.02)
    proc.host, proc.port = info["host"], int(info["port"])
    with _state() as procs:
        procs[:] = [proc if p.pid == proc.pid else p for p in procs]
    return proc


def start(nworkers: int, master: bool = True, workers: bool = True,
          port: int | None = None, host: str | None = None, bind: str = "*",
          timeout: float = START_TIMEOUT, log_level: str = "INFO") -> Cluster:
    """Start a local master and/or one supervisor of ``nworkers`` worker processes.

    Returns once the master answers and the workers have registered. ``port`` is the
    master's (default 5494; 0 picks a free one); with ``master=False`` the workers join
    the master that ``host``/``port`` name (see ``cw.conn.address.resolve``). ``bind`` is the
    address the master binds. Raises LaunchError naming what did not come up, after
    stopping whatever this call had started.
    """
    started: list[Proc] = []
    deadline = time.monotonic() + timeout
    try:
        if master:
            proc = _start_master(DEFAULT_PORT if port is None else port, bind, log_level,
                                 timeout, started)
            host, port = proc.host, proc.port
        else:
            host, port = address.resolve(host, port)
        known: frozenset = frozenset()
        if workers and nworkers > 0:
            if not master:
                known = worker_names(host, port)
            argv = [sys.executable, "-m", "cw.worker", host, "--port", str(port),
                    "-n", str(nworkers), "--log-level", log_level]
            started.append(_launch("workers", argv, host, port, nworkers))
        info = wait_until_up(host, port, nworkers if workers else 0,
                             max(0.5, deadline - time.monotonic()), known,
                             lambda: _check_running(started))
    except BaseException:
        if started:
            stop(only=started)
        raise
    log.info("cw cluster up: master %s:%d, %d workers", host, port, len(info["workers"]))
    return Cluster(host, port, started, info)


# ------------------------------------------------------------------ stop
def _terminate(procs: list[Proc], timeout: float) -> None:
    """SIGTERM each process, wait until all are gone, SIGKILL the process groups of stragglers."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    for proc in procs:  # the group also holds a supervisor's workers
        if _alive(proc.pid):
            log.warning("%s ignored SIGTERM for %g s; killing it", proc.describe(), timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    while any(_alive(p.pid) for p in procs) and time.monotonic() < deadline + 5:
        time.sleep(0.02)


def stop(master: bool = True, workers: bool = True, only: list[Proc] | None = None,
         timeout: float = STOP_TIMEOUT) -> list[str]:
    """Stop the processes ``start`` recorded in the state file (workers before the master).

    ``master``/``workers`` choose the roles; ``only`` limits it to those processes (what
    one ``start`` returned). Returns one line per process saying what happened; stopping
    nothing is fine.
    """
    roles = {r for r, on in (("master", master), ("workers", workers)) if on}
    pids = None if only is None else {p.pid for p in only}
    with _state() as procs:
        chosen = [p for p in procs if p.role in roles and (pids is None or p.pid in pids)]
        chosen.sort(key=lambda p: p.role != "workers")
        running = [p for p in chosen if _same_process(p)]
        for group in ([p for p in running if p.role == "workers"],
                      [p for p in running if p.role == "master"]):
            if group:
                _terminate(group, timeout)
        procs[:] = [p for p in procs if p not in chosen]
    said = [f"stopped {p.describe()}" if p in running else f"{p.describe()} was already gone"
            for p in chosen]
    for line in said:
        log.info("%s", line)
    return said


def allocate(nworkers: int, master: bool = True, workers: bool = True,
             **options) -> contextlib.AbstractContextManager[Cluster]:
    """``with allocate(n) as cluster:`` a local cluster, stopped when the block ends."""
    return allocated(lambda: start(nworkers, master=master, workers=workers, **options),
                     lambda cluster: stop(only=cluster.procs))


# ------------------------------------------------------------------ command line
def describe_state() -> list[str]:
    """One line per recorded process: what it is and whether it still runs."""
    with _state() as procs:
        return [f"{p.describe()}: {'running' if _same_process(p) else 'gone'}" for p in procs]


def main(argv: list[str] | None = None) -> int:
    """``mp.py -n N start|stop|status``: the local launcher's command line."""
    parser = argparse.ArgumentParser(prog="mp.py", description=(
        "Start, stop or show a cw master and workers on this machine (state in "
        "$CW_HOME/mp.json)."))
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("-n", dest="nworkers", type=int, default=os.cpu_count() or 1,
                        help="worker processes to start (default: the CPU count, %(default)s)")
    parser.add_argument("-M", dest="master", action="store_false",
                        help="do not start/stop the master")
    parser.add_argument("-W", dest="workers", action="store_false",
                        help="do not start/stop the workers")
    parser.add_argument("--port", type=int, default=None,
                        help=f"the master's port (default {DEFAULT_PORT}; 0: a free one)")
    parser.add_argument("--host", default=None,
                        help="with -M: the master the workers join (default: cw.conn.address)")
    parser.add_argument("--bind", default="*", help="address the master binds (default all)")
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT,
                        help="seconds start waits for the master and workers")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "start":
        try:
            cluster = start(args.nworkers, args.master, args.workers, args.port, args.host,
                            args.bind, args.timeout, args.log_level)
        except LaunchError as exc:
            print(f"mp.py: {exc}", file=sys.stderr)
            return 1
        for proc in cluster.procs:
            print(f"started {proc.describe()}")
        return 0
    if args.action == "stop":
        said = stop(args.master, args.workers)
        print("\n".join(said) if said else f"nothing to stop (no processes in {state_file()})")
        return 0
    return _print_status(args.host, args.port)


def _print_status(host: str | None, port: int | None) -> int:
    lines = describe_state()
    print("\n".join(lines) if lines else f"no processes recorded in {state_file()}")
    return print_master_status(host, port)


if __name__ == "__main__":
    sys.exit(main())
