"""Shared command-line plumbing for the daemons: flags with ``CW_*`` defaults, logging."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def env(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """``$CW_<NAME>`` cast to the flag's type, else ``default``."""
    raw = os.environ.get("CW_" + name.upper().replace("-", "_"))
    return cast(raw) if raw else default


def add_flag(parser: argparse.ArgumentParser, *names: str, default: Any = None,
             cast: Callable[[str], Any] = str, help: str = "", **kw) -> None:
    """Add a flag whose default can come from ``$CW_<LONG_NAME>``; help shows both."""
    long = next(n for n in names if n.startswith("--"))[2:]
    var = "CW_" + long.upper().replace("-", "_")
    if kw.get("action") in ("store_true", "store_false"):
        value = env(long, default, lambda s: s.lower() in ("1", "true", "yes", "on"))
    else:
        value = env(long, default, cast)
        kw.setdefault("type", cast)
    parser.add_argument(*names, default=value, help=f"{help} (default: %(default)s; env {var})",
                        **kw)


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    add_flag(parser, "--log-file", default=None, help="append logs to this file, not stderr")


def setup_logging(level: str, log_file: str | None, name: str = "") -> None:
    """Log to stderr (or a file) with times, the role's logger name and ``name``."""
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    tag = f" {name}" if name else ""
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest; bigger blocks are mapped per allocation


def tune_malloc() -> None:
    """Let glibc reuse freed heap for large message buffers instead of mapping fresh pages.

    A daemon forwards buffers of many MB; with glibc's defaults each one up to 32 MB is
    first a fresh mmap (page faults, zeroed pages), until its dynamic threshold has risen.
    Setting the thresholds up front gives the first large message the same speed as later
    ones; freed memory above 64 MB at the heap's top still goes back to the system.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)        # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 * MALLOC_MMAP_THRESHOLD)    # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: keep its defaults
        pass


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: a daemon holds a descriptor per
    peer, and idle connections from strangers must not use up a low soft limit (often 1024,
    sometimes 256) before its own peers connect."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


class Throttled:
    """A log line that may repeat without bound (one per refused connection): the first is
    logged, then at most one per ``every`` seconds, saying how many were not logged."""

    def __init__(self, logger: logging.Logger, every: float = 10.0):
        self.log, self.every = logger, every
        self.next = 0.0
        self.skipped = 0

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now < self.next:
            self.skipped += 1
            return
        if self.skipped:
            msg += f" (and {self.skipped} more like it in the last {self.every:g} s)"
        self.log.warning(msg, *args)
        self.next, self.skipped = now + self.every, 0
