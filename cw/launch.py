"""Start, stop and allocate a cw cluster with whichever launcher fits this machine.

    cw.launch.start(n)  --sbatch/salloc on PATH?--yes--> cw.slurm.start(n)  (jobs cmaster, cworkers)
                                                 --no---> cw.mp.start(n)     (local processes)

Both launchers share what lives here: ``LaunchError``, ``allocated``, the PYTHONPATH that
makes ``python -m cw.*`` work from a clone, and ``wait_until_up``, the bounded
poll of ``cw.status.status`` that makes ``start`` return only once the master answers and
the workers have registered::

    wait_until_up(host, port, n) --STATUS--> master --{workers: [...]}--> n new workers? done
                                 <-- retry with backoff, fail naming what is missing ----'
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable, Iterator

from .errors import CwError, MasterUnreachable

log = logging.getLogger(__name__)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent  # the folder holding the cw package


class LaunchError(CwError):
    """A launcher could not bring up (or find) the master or the workers it was asked for."""


def slurm_available() -> bool:
    """True when SLURM's submit commands are on PATH."""
    return bool(shutil.which("sbatch") or shutil.which("salloc"))


def _launcher():
    from . import mp, slurm  # imported late: both modules import this one
    return slurm if slurm_available() else mp


def start(nworkers: int, master: bool = True, workers: bool = True, **options):
    """Start a master and ``nworkers`` workers with SLURM if present, else locally."""
    return _launcher().start(nworkers, master=master, workers=workers, **options)


def stop(master: bool = True, workers: bool = True, **options) -> list[str]:
    """Stop what ``start`` started (SLURM jobs or local processes); return what was stopped."""
    return _launcher().stop(master=master, workers=workers, **options)


def allocate(nworkers: int, master: bool = True, workers: bool = True,
             **options) -> contextlib.AbstractContextManager:
    """``with allocate(n):`` a cluster that is stopped when the block ends, even on error."""
    return _launcher().allocate(nworkers, master=master, workers=workers, **options)


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
    from .status import status  # late: keeps this module importable without zmq

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
    from .status import status
    try:
        return frozenset(w["name"] for w in status(host, port, timeout=2.0)["workers"])
    except MasterUnreachable:
        return frozenset()


def print_master_status(host: str | None, port: int | None = None) -> int:
    """For the launchers' ``status`` commands: print the master's table; 1 if it is silent."""
    from .status import format_table, status
    try:
        print(format_table(status(host, port, timeout=2.0)))
    except MasterUnreachable as exc:
        print(exc)
        return 1
    return 0
