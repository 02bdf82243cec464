"""Progress bars (tqdm) for futures: ``progress(futures)`` and ``map(..., progress=True)``.

    futures --add_done_callback--> Bar.tick (any thread, under a lock) --> tqdm.update
       progress(futures): blocks in concurrent.futures.wait(), then closes the bar
       track(results, futures): yields results unchanged; the bar closes when they run out

The bar shows done/total, rate and ETA. It is drawn only on a terminal (``file.isatty()``,
``file`` defaulting to stderr) unless ``force=True``; without tqdm installed
(``pip install 'cw[progress]'``) it is skipped with one logged warning.
"""
from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import Future, wait
from typing import IO, Iterable, Iterator, Optional

log = logging.getLogger("cw.progress")

_warned = False


class Bar:
    """A tqdm bar advanced once per finished future, from whichever thread finishes it."""

    def __init__(self, bar):
        self.bar = bar
        self.lock = threading.Lock()
        self.closed = False

    def tick(self, _future: Optional[Future] = None) -> None:
        with self.lock:
            if not self.closed:
                self.bar.update(1)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_bar(total: Optional[int], file: Optional[IO] = None, force: bool = False,
             desc: str = "jobs") -> Optional[Bar]:
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


def _watch(futures: list[Future], total: Optional[int], file: Optional[IO], force: bool,
           desc: str) -> Optional[Bar]:
    bar = make_bar(len(futures) if total is None else total, file, force, desc)
    if bar is not None:
        for future in futures:
            future.add_done_callback(bar.tick)
    return bar


def progress(futures: Iterable[Future], total: Optional[int] = None,
             file: Optional[IO] = None, force: bool = False, desc: str = "jobs") -> list[Future]:
    """Wait for every future, drawing a bar as they complete; return them as a list.

    ``total`` defaults to the number of futures; ``file`` to stderr, drawn on only if it is a
    terminal unless ``force``. Futures that fail or are cancelled count as done.
    """
    futures = list(futures)
    bar = _watch(futures, total, file, force, desc)
    try:
        wait(futures)
    finally:
        if bar is not None:
            bar.close()
    return futures


def track(results: Iterator, futures: Iterable[Future], total: Optional[int] = None,
          file: Optional[IO] = None, force: bool = False, desc: str = "jobs") -> Iterator:
    """Pass ``results`` through unchanged while a bar counts ``futures`` as they finish.

    The bar closes when the results run out or the iterator is closed. This is what
    ``ClusterExecutor.map(..., progress=True)`` wraps its results in.
    """
    bar = _watch(list(futures), total, file, force, desc)
    if bar is None:
        return results

    def passing() -> Iterator:
        with bar:
            yield from results
    return passing()
