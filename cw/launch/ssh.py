"""``python -m cw.ssh``: start, stop and list cw workers on other machines over ssh.

    cw.ssh start --hosts cl-1:8,cl-2:8          (one ssh per host, in parallel)
      ssh [user@]host PYTHON -  <-- START script on stdin: checks ``import cw.worker``, then
                                    runs ``PYTHON -m cw.worker MASTER --port P -n N`` in a new
                                    session (setsid), stdin /dev/null, output to a log file
                                --> {"pid": supervisor pid, "hostname", "log"} on stdout
      $CW_HOME/ssh.json  <-- one record per started supervisor, under its master's address,
                             with the ssh target, port, options and interpreter used
    cw.ssh stop     ssh host PYTHON -  <-- STOP script: SIGTERM each recorded supervisor
                    (only if its command line still says cw.worker), wait for its process
                    group to go (bounded), SIGKILL the group if not; records are removed
    cw.ssh status   ssh host PYTHON -  <-- STATUS script: which recorded pids still run, plus
                    how many workers the master sees from each host

Host syntax: ``[user@]host[:N]``, N worker processes there (default ``-n``, else 1), comma
separated. The ssh port is not part of it (``:`` already means N): ``--port 2222`` sets it for
every host, ``--port cl-2=2222`` for one host. ``--ssh-option`` takes an ssh ``-o`` option
(``StrictHostKeyChecking=no``) or, starting with ``-``, raw ssh arguments (``"-i ~/.ssh/k"``;
write ``--ssh-option=-v`` for a lone flag, or argparse takes it for one of ours).

Remote hosts need Python with cw installed (``--python``, default python3) and must reach the
master's address. Workers are supervised there (restarted if they die) until ``stop``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cw import cli
from cw.conn import address
from cw.conn.ask import status as master_status
from cw.errors import MasterUnreachable, SshError
from cw.launch.ssh_remote import (  # noqa: F401
    SSH_TIMEOUT,
    START,
    STATUS,
    STOP,
    run_remote,
    ssh_command,
    ssh_options,
)

log = logging.getLogger(__name__)

STOP_TIMEOUT = 20.0     # seconds a supervisor gets to stop its workers before SIGKILL


@dataclass
class HostSpec:
    """One ``[user@]host[:N]`` entry of ``--hosts``."""

    host: str
    processes: int = 1
    user: str | None = None
    ssh_port: int | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass
class Record:
    """One started supervisor, as kept in ``$CW_HOME/ssh.json``."""

    target: str
    pid: int
    processes: int
    hostname: str
    log: str
    ssh_port: int | None = None
    ssh_options: list = field(default_factory=list)
    python: str = "python3"
    started: float = 0.0


# ---------------------------------------------------------------- parsing
def parse_hosts(text: str, processes: int = 1) -> list[HostSpec]:
    """``"a:8,u@b,c:2"`` -> HostSpecs; a host without ``:N`` gets ``processes``."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        user, _, rest = item.rpartition("@")
        host, sep, n = rest.partition(":")
        if not host or (sep and not n.isdigit()) or (sep and int(n) < 1):
            raise SshError(f"bad host {item!r}: expected [user@]host[:N] with N >= 1")
        if host.startswith("-") or user.startswith("-"):  # ssh would take it for an option
            raise SshError(f"bad host {item!r}: a host or user name cannot start with '-'")
        specs.append(HostSpec(host, int(n) if sep else processes, user or None))
    if not specs:
        raise SshError("no hosts given")
    return specs


def parse_ports(values: list[str], specs: list[HostSpec]) -> None:
    """Apply ``--port PORT`` (every host) and ``--port HOST=PORT`` (that host) to ``specs``."""
    default, per_host = None, {}
    for value in values:
        host, sep, port = value.rpartition("=")
        if not port.isdigit():
            raise SshError(f"bad --port {value!r}: expected PORT or HOST=PORT")
        if sep:
            per_host[host] = int(port)
        else:
            default = int(port)
    unknown = set(per_host) - {s.host for s in specs} - {s.target for s in specs}
    if unknown:
        raise SshError(f"--port names hosts not in --hosts: {', '.join(sorted(unknown))}")
    for spec in specs:
        spec.ssh_port = per_host.get(spec.target, per_host.get(spec.host, default))


# ---------------------------------------------------------------- state
def state_file() -> Path:
    return address.cw_home() / "ssh.json"


def load_state() -> dict[str, list[Record]]:
    """``{master address: [Record, ...]}`` from ``$CW_HOME/ssh.json`` (empty if none)."""
    try:
        raw = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
    return {m: [Record(**r) for r in recs] for m, recs in raw.get("masters", {}).items()}


def save_state(state: dict[str, list[Record]]) -> None:
    masters = {m: [asdict(r) for r in recs] for m, recs in state.items() if recs}
    address.write_connection_file(state_file(), {"masters": masters})


def master_key(master: str | None) -> tuple[str, int, str]:
    """``(host, port, "host:port")`` of the master, as remote workers are told to dial it."""
    host, port = address.resolve(master)
    return host, port, f"{host}:{port}"


# ---------------------------------------------------------------- commands
T = TypeVar("T")
R = TypeVar("R")


def _each(items: list[T], fn: Callable[[T], R]) -> list[tuple[T, R | SshError]]:
    """``fn(item)`` for every item on a few threads: ``[(item, result or SshError)]``."""
    def safe(item):
        try:
            return fn(item)
        except SshError as exc:
            return exc
    with ThreadPoolExecutor(min(16, max(1, len(items)))) as pool:
        return list(zip(items, pool.map(safe, items)))


def start(master: str | None, specs: list[HostSpec], options: Sequence[str] = (),
          python: str = "python3", env: dict | None = None, cwd: str | None = None,
          worker_args: Sequence[str] = ()) -> list[tuple[HostSpec, Record | SshError]]:
    """Start workers on every host; record the ones started. ``[(spec, Record|SshError)]``."""
    host, port, key = master_key(master)
    if _loopback(host) and not all(_loopback(s.host) for s in specs):
        log.warning("workers on other hosts are told to dial the master at %s, which is "
                    "this machine's loopback address; pass --master with a reachable name",
                    host)
    base = {"env": env or {}, "cwd": cwd}

    def one(spec: HostSpec) -> Record:
        argv = [host, "--port", str(port), "-n", str(spec.processes), *worker_args]
        answer = run_remote(spec.target, spec.ssh_port, list(options), python, START,
                            {**base, "argv": argv})
        return Record(spec.target, int(answer["pid"]), spec.processes, answer["hostname"],
                      answer["log"], spec.ssh_port, list(options), python, time.time())
    results = _each(specs, one)
    state = load_state()
    state.setdefault(key, []).extend(r for _, r in results if isinstance(r, Record))
    save_state(state)
    return results


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _by_target(records: list[Record]) -> list[list[Record]]:
    groups: dict[tuple, list[Record]] = {}
    for rec in records:
        groups.setdefault((rec.target, rec.ssh_port), []).append(rec)
    return list(groups.values())


def _selected(key: str, specs: list[HostSpec] | None) -> list[Record]:
    records = load_state().get(key, [])
    if specs is None:
        return records
    names = {s.target for s in specs} | {s.host for s in specs}
    return [r for r in records if r.target in names]


def _ask(records: list[Record], script: str, extra: dict, timeout: float) -> list:
    """Run ``script`` once per target over its records' pids: ``[(Record, state|SshError)]``."""
    def one(group: list[Record]) -> dict:
        first = group[0]
        return run_remote(first.target, first.ssh_port, first.ssh_options, first.python,
                          script, {"pids": [r.pid for r in group], **extra}, timeout)
    out = []
    for group, answer in _each(_by_target(records), one):
        for rec in group:
            out.append((rec, answer if isinstance(answer, SshError)
                        else answer.get(str(rec.pid), "gone")))
    return out


def stop(master: str | None, specs: list[HostSpec] | None = None,
         timeout: float = STOP_TIMEOUT) -> list[tuple[Record, object]]:
    """Stop the recorded supervisors (of ``specs``' hosts, else all) of this master.

    Returns ``[(record, "stopped" | "killed" | "gone" | SshError)]``; records whose host
    answered are forgotten, the others kept for another try.
    """
    key = master_key(master)[2]
    results = _ask(_selected(key, specs), STOP, {"timeout": timeout}, timeout + SSH_TIMEOUT)
    settled = {(r.target, r.pid) for r, outcome in results if not isinstance(outcome, SshError)}
    state = load_state()
    state[key] = [r for r in state.get(key, []) if (r.target, r.pid) not in settled]
    save_state(state)
    return results


def status(master: str | None, specs: list[HostSpec] | None = None
           ) -> list[tuple[Record, object]]:
    """``[(record, "running" | "gone" | SshError)]`` for the recorded supervisors."""
    return _ask(_selected(master_key(master)[2], specs), STATUS, {}, SSH_TIMEOUT)


# ---------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cw-ssh", description=(
        "Start, stop or list cw workers on other machines over ssh; started workers are "
        "recorded in $CW_HOME/ssh.json so that stop and status find them."))
    parser.add_argument("command", choices=["start", "stop", "status"])
    cli.add_flag(parser, "--master", default=None,
                 help="the master's HOST[:PORT] as the remote hosts reach it (else "
                      "$CW_MASTER or the connection file $CW_HOME/default.json)")
    cli.add_flag(parser, "--hosts", default=None,
                 help="comma-separated [user@]host[:N], N worker processes on that host "
                      "(stop/status: all recorded hosts if omitted)")
    parser.add_argument("-n", "--processes", type=int, default=1,
                        help="worker processes on hosts given without :N")
    parser.add_argument("--port", action="append", default=[], metavar="[HOST=]PORT",
                        help="ssh port for every host, or HOST=PORT for one (repeatable)")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                        help="ssh -o option like StrictHostKeyChecking=no, or raw ssh "
                             "arguments starting with '-' like '-i ~/.ssh/key' (repeatable)")
    parser.add_argument("--python", default="python3",
                        help="the Python interpreter on the remote hosts, with cw installed "
                             "(default: python3)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the remote workers (repeatable)")
    parser.add_argument("--chdir", default=None, help="remote working directory of workers")
    parser.add_argument("--worker-args", default="",
                        help="more cw.worker arguments, e.g. '--slots 2 --log-level DEBUG'")
    parser.add_argument("--timeout", type=float, default=STOP_TIMEOUT,
                        help="stop: seconds workers get to finish before SIGKILL")
    cli.add_logging_flags(parser)
    return parser.parse_args(argv)


def _env(values: list[str]) -> dict[str, str]:
    env = {}
    for value in values:
        name, sep, val = value.partition("=")
        if not sep or not name:
            raise SshError(f"bad --env {value!r}: expected NAME=VALUE")
        env[name] = val
    return env


def _seen_by_master(master: str | None) -> dict[str, int] | None:
    try:
        info = master_status(master, timeout=3.0)
    except MasterUnreachable:
        return None
    seen: dict[str, int] = {}
    for worker in info["workers"]:
        seen[worker["host"]] = seen.get(worker["host"], 0) + 1
    return seen


def _report(rows: Sequence[tuple[Any, Any]], line: Callable[[Any, Any], str]) -> int:
    failed = 0
    for item, outcome in rows:
        if isinstance(outcome, SshError):
            failed += 1
            print(f"cw-ssh: {outcome}", file=sys.stderr)
        else:
            print(line(item, outcome))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level, args.log_file, "ssh")
    try:
        specs = parse_hosts(args.hosts, args.processes) if args.hosts else None
        if specs is not None:
            parse_ports(args.port, specs)
        if args.command == "start":
            if specs is None:
                raise SshError("start needs --hosts")
            started = start(args.master, specs, ssh_options(args.ssh_option), args.python,
                            _env(args.env), args.chdir, shlex.split(args.worker_args))
            return _report(started, lambda s, r: f"{s.target}: started {r.processes} workers "
                                              f"(supervisor pid {r.pid} on {r.hostname}), "
                                              f"log {r.log}")
        if args.command == "stop":
            rows = stop(args.master, specs, args.timeout)
            if not rows:
                print("no recorded workers to stop")
            return _report(rows, lambda r, o: f"{r.target}: supervisor {r.pid} {o}")
        rows = status(args.master, specs)
        seen = _seen_by_master(args.master)
        print(f"master {master_key(args.master)[2]}: " + (
            "unreachable" if seen is None else
            ", ".join(f"{n} workers on {h}" for h, n in sorted(seen.items())) or "no workers"))
        return _report(rows, lambda r, o: f"{r.target}: supervisor {r.pid} of {r.processes} "
                                          f"workers on {r.hostname}: {o}")
    except SshError as exc:
        print(f"cw-ssh: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
