"""What the launchers share: the PYTHONPATH children need, log tails, and the bounded
waits that make ``start`` return only once the master answers and the workers registered::

    wait_until_up(host, port, n) --STATUS--> master --{workers: [...]}--> n new workers? done
                                 <-- retry with backoff, fail naming what is missing ----'
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cw.errors import LaunchError, MasterUnreachable

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the cw package


@contextlib.contextmanager
def allocated(start_: Callable[[], T], release: Callable[[T], object]) -> Iterator[T]:
    """Yield what ``start_()`` returns; ``release`` it when the block ends, even on error."""
    cluster = start_()
    try:
        yield cluster
    finally:
        release(cluster)


def pythonpath() -> str:
    """$PYTHONPATH with the cw package's folder in front, so ``python -m cw.*`` works in
    child processes and jobs when cw runs from a clone rather than an install."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(paths))


def journal_flags(name: str) -> list[str]:
    """``--journal $CW_HOME/journal/NAME`` for a launcher's master, so its named batches
    outlive it; none if $CW_JOURNAL names one already (the master reads it itself)."""
    if os.environ.get("CW_JOURNAL"):
        return []
    from cw.conn import address
    return ["--journal", str(address.cw_home() / "journal" / name)]


def child_env() -> dict:
    """This environment, with ``pythonpath()``: for local child processes."""
    return {**os.environ, "PYTHONPATH": pythonpath()}


def log_tail(path: os.PathLike | str, lines: int = 10) -> str:
    """The last ``lines`` lines of a log file, indented, for error messages."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"    (cannot read {path}: {exc})"
    return "\n".join("    " + line for line in text)


def wait_until_up(host: str, port: int, nworkers: int, timeout: float,
                  known: frozenset = frozenset(),
                  check: Callable[[], object] | None = None) -> dict:
    """Poll the master until it answers and ``nworkers`` workers not in ``known`` (names)
    have registered; return its last status.

    ``check`` is called between polls and may raise to fail early (e.g. a process died).
    Raises LaunchError naming the master or the missing workers after ``timeout`` seconds.
    """
    from cw.status import status  # late: keeps this module importable without zmq

    deadline = time.monotonic() + timeout
    delay, info = 0.05, None
    while True:
        left = deadline - time.monotonic()
        try:
            info = status(host, port, timeout=max(0.2, min(2.0, left)))
            new = [w for w in info["workers"] if w["name"] not in known]
            if len(new) >= nworkers:
                return info
        except MasterUnreachable:
            info = None
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            break
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 1.0)
    if info is None:
        raise LaunchError(f"the cw master at {host}:{port} did not answer within {timeout:g} s")
    got = len([w for w in info["workers"] if w["name"] not in known])
    raise LaunchError(f"only {got} of {nworkers} workers registered with the cw master at "
                      f"{host}:{port} within {timeout:g} s")


def worker_names(host: str, port: int) -> frozenset:
    """Names of the workers already registered with the master (none if it is silent)."""
    from cw.status import status
    try:
        return frozenset(w["name"] for w in status(host, port, timeout=2.0)["workers"])
    except MasterUnreachable:
        return frozenset()


def print_master_status(host: str | None, port: int | None = None) -> int:
    """For the launchers' ``status`` commands: print the master's table; 1 if it is silent."""
    from cw.status import format_table, status
    try:
        print(format_table(status(host, port, timeout=2.0)))
    except MasterUnreachable as exc:
        print(exc)
        return 1
    return 0
