"""A joblib backend: ``with joblib.parallel_config(backend="cw"):`` runs Parallel on the cluster.

    joblib.Parallel --BatchedCalls--> ClusterBackend.submit --> ClusterExecutor.submit(_run, b)
                                                                   |  master --> a cw worker:
                                                                   |  _run(b) = b() there
    Parallel's callback <-- one "cw-joblib" thread <-- future done (cw's I/O thread)
       (retrieve_result_callback, then joblib dispatches the next batch from that thread)

``register()`` once, then ``parallel_config(backend="cw")`` (``host=``, ``port=``,
``connect_timeout=``, ``master_timeout=`` are passed on to ``ClusterExecutor``). n_jobs=-1
(and joblib's default) means one job per registered worker; n_jobs=1 runs locally, as with
every joblib backend. Workers need joblib (and whatever the calls use) installed.

joblib's callbacks run on a thread of this backend, not cw's I/O thread, so a slow pickle of
the next batch never delays heartbeats. Nested Parallel calls on a worker run sequentially.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import joblib
from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

from cw.client import ClusterExecutor
from cw.conn.ask import status

log = logging.getLogger(__name__)

NAME = "cw"


def _run(batch: Callable[[], Any]) -> Any:
    """Run one joblib batch on a worker (a module function, so it is pickled by name once)."""
    return batch()


class ClusterBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase over a ``cw.client.ClusterExecutor``."""

    default_n_jobs = -1              # Parallel(n_jobs=None): every worker
    supports_retrieve_callback = True
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, host: str | None = None, port: int | None = None, *,
                 connect_timeout: float | None = None,
                 master_timeout: float | None = None,
                 nesting_level: int | None = None, inner_max_num_threads=None, **kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **kwargs)
        self.host, self.port = host, port
        # keyword arguments of ClusterExecutor (Any: mypy checks **a dict against all of them)
        self.executor_options: dict[str, Any] = {
            k: v for k, v in (("connect_timeout", connect_timeout),
                              ("master_timeout", master_timeout)) if v is not None}
        self.executor: ClusterExecutor | None = None
        self.callbacks: ThreadPoolExecutor | None = None
        self.pending: set[Future] = set()
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- sizing
    def workers(self) -> int:
        """How many cw workers the master has registered now."""
        return len(status(self.host, self.port)["workers"])

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """Negative n_jobs count from the number of workers (-1: all); positive ones stand."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or n_jobs < 0:
            return max(1, self.workers() + 1 + (n_jobs or -1))
        return n_jobs

    def configure(self, n_jobs: int = 1, parallel=None, prefer=None, require=None,
                  **backend_kwargs) -> int:
        """Connect (once per Parallel call) and return how many jobs to keep in flight."""
        n = self.effective_n_jobs(n_jobs)
        if n == 1 and n_jobs != 1:
            n = 2  # a one-worker cluster: joblib would run n_jobs=1 locally, so ask for 2
        self.parallel = parallel
        if self.executor is None:
            self.executor = ClusterExecutor(self.host, self.port, **self.executor_options)
            self.callbacks = ThreadPoolExecutor(1, thread_name_prefix="cw-joblib")
        return n

    # ---------------------------------------------------------------- jobs
    def submit(self, func: Callable[[], Any], callback: Callable | None = None) -> Future:
        """Send one batch to the cluster; ``callback(future)`` runs on the backend's thread."""
        assert self.executor is not None and self.callbacks is not None  # configure() ran
        future = self.executor.submit(_run, func)
        with self.lock:
            self.pending.add(future)
        callbacks = self.callbacks

        def done(f: Future) -> None:
            with self.lock:
                self.pending.discard(f)
            if callback is not None:
                try:
                    callbacks.submit(callback, f)
                except RuntimeError:  # terminated meanwhile: nobody waits for it
                    pass
        future.add_done_callback(done)
        return future

    apply_async = submit  # the name joblib < 1.5 calls

    def retrieve_result_callback(self, future: Future) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel what has not started (a call failed); keep the connection if asked."""
        with self.lock:
            pending, self.pending = list(self.pending), set()
        if self.executor is not None and pending:
            cancelled = self.executor.cancel_many(pending)
            log.info("joblib aborted: cancelled %d of %d pending batches", cancelled,
                     len(pending))
        if not ensure_ready:
            self.terminate()

    def terminate(self) -> None:
        """Leave at the end of a Parallel call: jobs still queued are cancelled, the
        connection closes in the background once the running ones have finished."""
        executor, self.executor = self.executor, None
        callbacks, self.callbacks = self.callbacks, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if callbacks is not None:
            callbacks.shutdown(wait=False)
        self.reset_batch_stats()

    def get_nested_backend(self):
        """Parallel calls inside a job run sequentially on its worker."""
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


def register(name: str = NAME, make_default: bool = False) -> None:
    """Make ``joblib.parallel_config(backend="cw")`` (or ``name``) use the cluster."""
    joblib.register_parallel_backend(name, ClusterBackend, make_default=make_default)
