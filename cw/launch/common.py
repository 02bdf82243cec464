"""What the launchers share: the PYTHONPATH children need, log tails, and the bounded
waits that make ``start`` return only once the master answers and the workers registered::

    wait_until_up(host, port, n) --STATUS--> master --{workers: [...]}--> n new workers? done
                                 <-- retry with backoff, fail naming what is missing ----'
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

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
    return run_sync(until_up(host, port, nworkers, timeout, known, check))


async def until_up(host: str, port: int, nworkers: int, timeout: float,
                   known: frozenset = frozenset(),
                   check: Callable[[], object] | None = None) -> dict:
    """``wait_until_up`` as a coroutine: ask (in a thread: a status round trip blocks),
    check, back off, until the master and the workers are there or the time is up."""
    from cw.conn.ask import status  # late: keeps this module importable without zmq

    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    delay, info = 0.05, None
    while True:
        left = deadline - time.monotonic()
        try:
            info = await loop.run_in_executor(None, partial(
                status, host, port, timeout=max(0.2, min(2.0, left))))
            if len([w for w in info["workers"] if w["name"] not in known]) >= nworkers:
                return info
        except MasterUnreachable:
            info = None
        if check is not None:
            check()
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 1.0)
    if info is None:
        raise LaunchError(f"the cw master at {host}:{port} did not answer within {timeout:g} s")
    got = len([w for w in info["workers"] if w["name"] not in known])
    raise LaunchError(f"only {got} of {nworkers} workers registered with the cw master at "
                      f"{host}:{port} within {timeout:g} s")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a launcher's coroutine to its end from plain code: on a loop of its own, or, if
    this thread already runs one (a notebook), on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def worker_names(host: str, port: int) -> frozenset:
    """Names of the workers already registered with the master (none if it is silent)."""
    from cw.conn.ask import status
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
