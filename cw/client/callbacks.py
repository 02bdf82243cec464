"""``ClientThread``: the original cluster-workers' callback API over a cw Session.

    ct.submit(jobid, func, *a) --Session--> master --> worker
    Session's I/O thread: done --> callback(jobid, result) for a success; a failure is kept
                          and re-raised by wait() (as RemoteException, the first one)
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from cw.client.session import DEFAULT_MASTER_TIMEOUT, Session
from cw.conn.peer import DEFAULT_CONNECT_TIMEOUT
from cw.errors import RemoteException, SerializationError

log = logging.getLogger(__name__)


class ClientThread:
    """The callback API: ``callback(jobid, result)`` is called for each successful job.

    ``wait()`` blocks until every submitted job is done, then re-raises the first
    failure as ``RemoteException`` (remote traceback included, the original exception
    chained as its cause where it could be re-created). Use as a context manager, or
    call ``start()`` and ``stop()``.
    """

    def __init__(self, callback: Callable[[Any, Any], None], host: str | None = None,
                 port: int | None = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 master_timeout: float = DEFAULT_MASTER_TIMEOUT, insecure: bool = False,
                 batch: str | None = None):
        self.callback = callback
        self.batch = batch
        self.insecure = insecure
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.master_timeout = master_timeout
        self._session: Session | None = None
        self._cond = threading.Condition()
        self._outstanding = 0
        self._failures: list[tuple[Any, BaseException]] = []

    def start(self) -> ClientThread:
        """Connect to the master (raises MasterUnreachable if none answers)."""
        if self._session is None and self.batch is not None:
            from cw.client.batched import BatchSession  # a named, durable batch
            self._session = BatchSession(self.host, self.port, lambda jobid: None, self._done,
                                         self.connect_timeout, self.master_timeout,
                                         self.insecure, batch=self.batch)
        if self._session is None:
            self._session = Session(self.host, self.port, lambda jobid: None, self._done,
                                    self.connect_timeout, self.master_timeout, self.insecure)
        return self

    def submit(self, jobid: Any, func: Callable, *args, **kwargs) -> None:
        """Run ``func(*args, **kwargs)`` on a worker; ``callback(jobid, result)`` follows."""
        if self._session is None:
            self.start()
        if self.batch is not None:
            _check_jobid(jobid)
        with self._cond:
            self._outstanding += 1
        assert self._session is not None  # start() made it
        try:
            # a batch keeps the job id with the job: Batch(name).outcomes() gives it back
            self._session.submit(func, args, kwargs, jobid,
                                 None if self.batch is None else {"id": jobid})
        except SerializationError as exc:
            self._done(jobid, exc, None)

    def wait(self, timeout: float | None = None) -> None:
        """Block until all submitted jobs are done; re-raise the first failure.

        Raises TimeoutError if jobs are still outstanding after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._outstanding == 0, timeout):
                raise TimeoutError(f"{self._outstanding} jobs still outstanding")
            failures, self._failures = self._failures, []
        if failures:
            jobid, error = failures[0]
            raise _as_remote(jobid, error, len(failures)) from error

    def detach(self, timeout: float | None = None) -> None:
        """Named batches only: return once the master has journaled every job, then
        disconnect leaving them running (see ``ClusterExecutor.detach``)."""
        from cw.client.batched import BatchSession
        if not isinstance(self._session, BatchSession):
            raise RuntimeError("detach() needs a named batch: ClientThread(..., batch=NAME)")
        self._session.detach(timeout)

    def stop(self) -> None:
        """Disconnect from the master; unfinished jobs are dropped there."""
        if self._session is not None:
            self._session.close()

    def __enter__(self) -> ClientThread:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self.stop()

    def _done(self, jobid: Any, error: BaseException | None, value: Any) -> None:
        if error is None:
            try:
                self.callback(jobid, value)
            except Exception as exc:
                log.exception("the callback raised for job %r", jobid)
                error = exc
        with self._cond:
            if error is not None:
                self._failures.append((jobid, error))
            self._outstanding -= 1
            self._cond.notify_all()


def _as_remote(jobid: Any, error: BaseException, count: int) -> RemoteException:
    if isinstance(error, RemoteException):
        remote = RemoteException(error.type_name, error.message, error.remote_traceback)
    else:
        kind = f"{type(error).__module__}.{type(error).__qualname__}"
        remote = RemoteException(kind, str(error), getattr(error, "remote_traceback", ""))
    remote.jobid = jobid
    remote.failures = count
    if count > 1:
        remote.message += f" (job {jobid!r}; {count - 1} more jobs failed too)"
    return remote


def _check_jobid(jobid: Any) -> None:
    """A batch journals the job id: it must be plain data (msgpack: str, int, bytes...)."""
    import msgpack
    try:
        msgpack.packb(jobid, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"job id {jobid!r} of a batch must be a str, int, bytes, float, or "
                        f"a list or dict of those") from None
