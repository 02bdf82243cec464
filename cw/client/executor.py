"""``ClusterExecutor``: a true ``concurrent.futures.Executor`` over a cw Session.

    submit(fn, *a) -> CwFuture --Session.submit--> master --> worker
    Session's I/O thread: started -> future.set_running_or_notify_cancel()
                          done    -> future.set_result / set_exception (remote traceback
                                     chained as the cause)
    map(): chunks (chunksize), at most DEFAULT_MAP_WINDOW jobs in flight, results in order
    shutdown(wait, cancel_futures): as ProcessPoolExecutor
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import wait as wait_futures
from functools import partial
from typing import Any

from cw.client.session import DEFAULT_MASTER_TIMEOUT, Session
from cw.conn.peer import DEFAULT_CONNECT_TIMEOUT
from cw.defaults import DEFAULT_MAP_WINDOW, DEFAULT_MAX_RETRIES
from cw.errors import SerializationError
from cw.resources import check_need

log = logging.getLogger(__name__)



class CwFuture(Future):
    """A Future whose ``cancel()`` asks the cluster: True only if the job never runs."""

    def __init__(self, executor: ClusterExecutor):
        super().__init__()
        self._executor = executor
        self._seq: int | None = None

    def cancel(self) -> bool:
        if self.cancelled():
            return True
        if self.running() or self.done():
            return False
        if self._seq is not None and \
                not self._executor._session.cancel([self._seq]).get(self._seq):
            return False
        return self._cancelled_by_cluster()

    def _cancelled_by_cluster(self) -> bool:
        """Mark cancelled (the cluster confirmed it will never run) and wake waiters."""
        if not super().cancel():
            return False
        _notify(self)  # wait() and as_completed() learn of it only from this call
        if self._seq is not None:  # else it was never submitted
            self._executor._futures.pop(self._seq, None)
        return True


def _notify(future: Future) -> bool:
    """``set_running_or_notify_cancel``, once: False if the future was cancelled (its
    waiters are told now) or was already running or done."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # running or done already (the other thread came first)
        return False


class ClusterExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose calls run on cw workers.

    ``host``/``port`` name the master (``host=None``: see ``cw.conn.address.resolve``).
    Construction fails with ``MasterUnreachable`` if no master answers within
    ``connect_timeout`` seconds (``NoKeys``, a subclass, if this user has no connection
    file with its keys); pending futures fail with ``MasterLost`` if the master is
    silent for ``master_timeout`` seconds. ``insecure=True`` allows plain TCP to a
    loopback master started with ``--insecure`` (any local user could pose as it).
    ``share`` weighs this client in the master's fair share (2.0: twice a default client's
    part of the workers while both have queued jobs).
    """

    def __init__(self, host: str | None = None, port: int | None = None, *,
                 max_retries: int = DEFAULT_MAX_RETRIES, timeout: float | None = None,
                 map_window: int = DEFAULT_MAP_WINDOW,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 master_timeout: float = DEFAULT_MASTER_TIMEOUT, insecure: bool = False,
                 batch: str | None = None, share: float = 1.0):
        if isinstance(share, bool) or not isinstance(share, (int, float)) or \
                not 0 < share < float("inf"):
            raise ValueError("share must be a finite number > 0")
        self._opts = job_options(max_retries, timeout)
        self.map_window = map_window
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._futures: dict[int, CwFuture] = {}
        self.batch = batch
        if batch is None:
            self._session = Session(host, port, self._started, self._done,
                                    connect_timeout, master_timeout, insecure, share)
        else:  # a named, durable batch (cw.client.batched)
            from cw.client.batched import BatchSession
            self._session = BatchSession(host, port, self._started, self._done,
                                         connect_timeout, master_timeout, insecure, share,
                                         batch=batch)

    # ---------------------------------------------------------------- Executor API
    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; a pickling failure fails the future."""
        return self._submit(fn, args, kwargs, self._opts)

    def options(self, *, max_retries: int | None = None, timeout: float | None = None,
                expected: float | None = None, priority: int | None = None,
                resources: dict[str, float] | None = None) -> ExecutorOptions:
        """A view of this executor whose ``submit``/``map`` use other job options:
        ``priority`` (higher runs first among this client's queued jobs, FIFO among equals;
        default 0), ``resources`` (what a worker process must have, e.g. ``{"gpu": 1}``:
        see cw.resources) and ``expected`` (the seconds each job is expected to take; a
        worker whose SLURM allocation ends sooner does not start it: cw.worker.drain)."""
        base = self._opts or {}
        return ExecutorOptions(self, job_options(
            base.get("max_retries", DEFAULT_MAX_RETRIES) if max_retries is None else max_retries,
            base.get("timeout") if timeout is None else timeout,
            base.get("expected") if expected is None else expected,
            base.get("priority", 0) if priority is None else priority,
            base.get("resources") if resources is None else resources))

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, opts: dict | None) -> Future:
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = CwFuture(self)
            try:
                future._seq = self._session.submit(fn, args, kwargs, future, opts)
            except SerializationError as exc:
                future.set_exception(exc)
            else:
                self._futures[future._seq] = future
                if future.done():  # settled already (a lane result can be that fast)
                    self._futures.pop(future._seq, None)
            return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, progress: bool | dict = False) -> Iterator:
        """Like ``Executor.map``; ``chunksize`` > 1 sends that many calls per job.

        ``progress=True`` draws a tqdm bar on stderr, if it is a terminal, as jobs finish;
        a dict passes ``file``, ``force``, ``desc`` to ``cw.progress.make_bar``.
        """
        return self._map_with(self._opts, fn, iterables, timeout, chunksize, progress)

    def _map_with(self, opts: dict | None, fn: Callable, iterables: tuple,
                  timeout: float | None, chunksize: int,
                  progress: bool | dict = False) -> Iterator:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        bar = None
        if progress:
            from cw.client.progress import map_bar
            bar = map_bar(progress, iterables, chunksize)
        if chunksize == 1:
            return self._map(fn, zip(*iterables), timeout, opts, bar=bar)
        chunks = self._map(partial(run_chunk, fn), chunked(zip(*iterables), chunksize),
                           timeout, opts, star=False, bar=bar)
        return _flatten(chunks)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; wait for it; disconnect.

        ``wait=False`` returns at once, as in ``concurrent.futures``: the unfinished
        futures still settle, and a background thread disconnects once they all have
        (as there, the program does not exit before that).
        ``cancel_futures`` cancels what no worker holds yet, as ProcessPoolExecutor does:
        jobs running, or held by a worker and about to run, complete.
        """
        with self._shutdown_lock:
            already, self._shutdown = self._shutdown, True
        if already and self._session.closed:
            return
        if cancel_futures:
            for seq, ok in self._session.cancel_queued().items():
                future = self._futures.get(seq)
                if ok and future is not None:
                    future._cancelled_by_cluster()
        if wait:
            self._close_when_settled()
        else:
            threading.Thread(target=self._close_when_settled, name="cw-shutdown").start()

    def _close_when_settled(self) -> None:
        """Wait until every future is done or cancelled, then leave the master."""
        wait_futures(list(self._futures.values()))
        self._session.close()

    # ---------------------------------------------------------------- extras
    def detach(self, timeout: float | None = None) -> None:
        """Named batches only: return once the master has journaled every job submitted,
        then disconnect, leaving them running; collect them with ``cw.batch.Batch``.
        Raises JournalFull if the master refused some (their futures fail with it too),
        TimeoutError if not all were acknowledged within ``timeout`` seconds. Futures not
        done by then stay pending."""
        from cw.client.batched import BatchSession
        if not isinstance(self._session, BatchSession):
            raise RuntimeError("detach() needs a named batch: ClusterExecutor(..., batch=NAME)")
        with self._shutdown_lock:
            self._shutdown = True
        self._session.detach(timeout)

    def cancel_many(self, futures: Iterable[Future]) -> int:
        """Cancel many futures in one round trip; return how many were cancelled."""
        mine = [(f._seq, f) for f in futures if isinstance(f, CwFuture) and not f.done()
                and not f.running() and f._seq is not None]
        answers = self._session.cancel([seq for seq, _ in mine])
        cancelled = 0
        for seq, future in mine:
            if answers.get(seq) and future._cancelled_by_cluster():
                cancelled += 1
        return cancelled

    def _map(self, fn: Callable, arg_tuples: Iterable, timeout: float | None,
             opts: dict | None, star: bool = True, bar=None) -> Iterator:
        """Submit lazily, at most ``map_window`` jobs in flight; yield results in order."""
        end = None if timeout is None else time.monotonic() + timeout
        pending = iter(arg_tuples)
        futures: deque = deque()

        def submit(n: int) -> None:
            for args in itertools.islice(pending, n):
                futures.append(self._submit(fn, args if star else (args,), {}, opts))
                if bar is not None:
                    bar.watch(futures[-1])

        submit(self.map_window)  # like Executor.map, the first calls go out at once

        def results() -> Iterator:
            try:
                while futures:
                    left = None if end is None else end - time.monotonic()
                    futures[0].result(left)  # wait (or raise) with the future still ours
                    submit(1)
                    # nothing here keeps the value (or its future) once it is yielded
                    yield _pop_result(futures)
            finally:
                if futures:
                    self.cancel_many(futures)
                if bar is not None:
                    bar.close()
        return results()

    # ---------------------------------------------------------------- I/O thread
    def _started(self, future: CwFuture) -> None:
        if not future.done() and not future.running():
            _notify(future)

    def _done(self, future: CwFuture, error: BaseException | None, value: Any) -> None:
        try:  # settle first: _submit drops it from _futures if done
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        except InvalidStateError:
            pass  # cancelled meanwhile
        if future._seq is not None:
            self._futures.pop(future._seq, None)

    def __repr__(self) -> str:
        return f"<ClusterExecutor master={self._session.conn.endpoint}>"


class ExecutorOptions:
    """``executor.options(max_retries=..., timeout=...)``: submit and map with those."""

    def __init__(self, executor: ClusterExecutor, opts: dict | None):
        self._executor = executor
        self._opts = opts

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        return self._executor._submit(fn, args, kwargs, self._opts)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, progress: bool | dict = False) -> Iterator:
        return self._executor._map_with(self._opts, fn, iterables, timeout, chunksize,
                                        progress)


def _pop_result(futures: deque) -> Any:
    """The result of the first future (done), which leaves ``futures``."""
    return futures.popleft().result()


def run_chunk(fn: Callable, chunk: tuple) -> list:
    """Runs on a worker: ``fn(*args)`` for each argument tuple of a ``map`` chunk."""
    return [fn(*args) for args in chunk]


def chunked(arg_tuples: Iterator, size: int) -> Iterator[tuple]:
    """Tuples of up to ``size`` items of ``arg_tuples``, in order."""
    while True:
        chunk = tuple(itertools.islice(arg_tuples, size))
        if not chunk:
            return
        yield chunk


def _flatten(chunks: Iterator[list]) -> Iterator:
    """The items of each chunk's result list, which keeps none of them once yielded."""
    for results in chunks:
        results.reverse()
        while results:
            yield results.pop()


def job_options(max_retries: int = DEFAULT_MAX_RETRIES, timeout: float | None = None,
                expected: float | None = None, priority: int = 0,
                resources: dict[str, float] | None = None) -> dict | None:
    """The options a job carries on the wire (None when all are defaults)."""
    if not isinstance(max_retries, int) or max_retries < 1:
        raise ValueError("max_retries must be an int >= 1")
    if timeout is not None and not timeout > 0:
        raise ValueError("timeout must be > 0 seconds or None")
    if expected is not None and not expected >= 0:
        raise ValueError("expected must be >= 0 seconds or None")
    if isinstance(priority, bool) or not isinstance(priority, int) or \
            not -1 << 31 <= priority < 1 << 31:
        raise ValueError("priority must be an int (32 bits)")
    need = check_need(resources)  # ResourceError (a ValueError) if it is not a map of numbers
    opts: dict = {}
    if priority:
        opts["priority"] = priority
    if need:
        opts["resources"] = need
    if max_retries != DEFAULT_MAX_RETRIES:
        opts["max_retries"] = max_retries
    if timeout is not None:
        opts["timeout"] = float(timeout)
    if expected is not None:
        opts["expected"] = float(expected)
    return opts or None
