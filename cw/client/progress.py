"""Progress bars (tqdm) for futures: ``progress(futures)``, ``as_completed``, ``map(progress=)``.

    as_completed(futures): concurrent.futures.as_completed in the calling thread,
                           Bar.tick per future, then yields it; progress() drains it
    map(..., progress=True): map_bar() sizes a Bar from len() of the iterables; map's
                           lazy submitter watch()es each future it sends, so the bar
                           ticks from cw's I/O thread as jobs finish (under Bar's lock)

The bar shows done/total, rate and ETA. It is drawn only on a terminal (``file.isatty()``,
``file`` defaulting to stderr) unless ``force=True``; without tqdm installed
(``pip install 'cw[progress]'``) it is skipped with one logged warning.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import as_completed as futures_as_completed
from typing import IO

log = logging.getLogger(__name__)

_warned = False


class Bar:
    """A tqdm bar advanced once per finished future, from whichever thread finishes it."""

    def __init__(self, bar):
        self.bar = bar
        self.lock = threading.Lock()
        self.closed = False

    def tick(self, _future: Future | None = None) -> None:
        with self.lock:
            if not self.closed:
                self.bar.update(1)

    def watch(self, future: Future) -> None:
        """Tick when ``future`` finishes (at once if it has)."""
        future.add_done_callback(self.tick)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_bar(total: int | None, file: IO | None = None, force: bool = False,
             desc: str = "jobs") -> Bar | None:
    """A Bar writing to ``file`` (stderr), or None: not a terminal and not forced, or no tqdm."""
    global _warned
    file = sys.stderr if file is None else file
    if not force and not _isatty(file):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        if not _warned:
            _warned = True
            log.warning("progress bars need tqdm: pip install 'cw[progress]'")
        return None
    return Bar(tqdm(total=total, file=file, desc=desc, unit="job", dynamic_ncols=True))


def _isatty(file: IO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def as_completed(futures: Iterable[Future], total: int | None = None,
                 file: IO | None = None, force: bool = False, desc: str = "jobs",
                 timeout: float | None = None) -> Iterator[Future]:
    """``concurrent.futures.as_completed`` that draws a bar as the futures finish.

    ``total`` defaults to the number of futures; ``file`` to stderr, drawn on only if it is a
    terminal unless ``force``. Futures that fail or are cancelled count as done.
    """
    futures = list(futures)
    bar = make_bar(len(futures) if total is None else total, file, force, desc)
    try:
        for future in futures_as_completed(futures, timeout):
            if bar is not None:
                bar.tick()
            yield future
    finally:
        if bar is not None:
            bar.close()


def progress(futures: Iterable[Future], total: int | None = None,
             file: IO | None = None, force: bool = False, desc: str = "jobs") -> list[Future]:
    """Wait for every future, drawing a bar as they complete; return them as a list."""
    futures = list(futures)
    for _ in as_completed(futures, total, file, force, desc):
        pass
    return futures


def map_bar(progress: bool | dict, iterables: tuple, chunksize: int = 1) -> Bar | None:
    """The bar of ``ClusterExecutor.map(..., progress=...)``, or None.

    ``progress`` is True or a dict of ``make_bar`` options (``file``, ``force``, ``desc``).
    The total is known when every iterable has a length; the bar counts jobs (chunks).
    """
    if not progress:
        return None
    options = progress if isinstance(progress, dict) else {}
    try:
        total: int | None = min(len(it) for it in iterables)
    except (TypeError, ValueError):  # a generator (or nothing): count without a total
        total = None
    if total is not None and chunksize > 1:
        total = -(-total // chunksize)
    return make_bar(total, **options)
