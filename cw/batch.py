"""``cw.batch.Batch`` and ``python -m cw.batch``: collect a named batch (a campaign) later.

    Batch(name, host, port) --a client connection (cw.conn.peer)--> master (cw.master.batches)
      status()    BATCH_STATUS                  the counts of its jobs by state
      wait()      BATCH_STATUS seen t (long poll: answered when more jobs settled)
      outcomes() / results()   wait, then BATCH_FETCH pages: outcomes in submission order
      futures()   Futures settled live by a thread: long poll, then fetch what settled
      cancel() / forget()      BATCH_CANCEL / BATCH_FORGET

Every answer reflects what the master's journal holds on disk. A request whose answer does not
come (the master restarted, or was away) is sent again until its deadline. A name the master
does not know raises UnknownBatch (a LookupError), at construction already.

    python -m cw.batch list|status|wait|cancel|forget [NAME] [HOST[:PORT]] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from typing import Any

from cw import protocol as P
from cw.client.batched import error_of
from cw.client.outcomes import decode_outcome
from cw.conn import address
from cw.conn.peer import DEFAULT_CONNECT_TIMEOUT, Connection, peer_info
from cw.errors import CwError, MasterUnreachable, SecurityError, UnknownBatch

log = logging.getLogger(__name__)

PAGE_BYTES = 4 << 20    # outcome bytes asked per BATCH_FETCH
POLL = 30.0             # seconds one long poll may wait at the master
REPLY_SLACK = 30.0      # seconds a reply may take beyond that before we ask again


class Link:
    """A client connection to the master that asks about batches (request, reply by rid)."""

    name = ""

    def __init__(self, host: str | None = None, port: int | None = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, insecure: bool = False):
        self.host, self.port = address.resolve(host, port)
        self._pending: dict[int, list] = {}
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed = False
        self._conn = Connection(self.host, self.port, "client", peer_info(), self._on_message,
                                on_welcome=self._on_welcome, logger=log, insecure=insecure)
        self._conn.start(connect_timeout)

    # ---------------------------------------------------------------- requests
    def _request(self, kind: int, *args: Any, wait: float = 0.0,
                 deadline: float | None = None) -> tuple[Any, list]:
        while True:
            if self._closed:
                raise CwError("this Batch is closed")
            rid = next(self._rids)
            entry: list = [threading.Event(), None, []]
            with self._lock:
                self._pending[rid] = entry
            self._conn.call(self._conn.send, [P.pack(kind, rid, *args)])
            limit = wait + REPLY_SLACK
            if deadline is not None:
                limit = min(limit, max(0.0, deadline - time.monotonic()) + 1.0)
            entry[0].wait(limit)
            with self._lock:
                self._pending.pop(rid, None)
            if entry[1] is not None:
                err, value = entry[1]
                if err is not None:
                    raise error_of(err)  # type: ignore[misc]
                return value, entry[2]
            if deadline is not None and time.monotonic() >= deadline:
                raise MasterUnreachable(f"the master at {self.host}:{self.port} did not "
                                        f"answer about batch {self.name!r}")

    def _on_message(self, kind: int, header: list, frames: list) -> None:
        if kind != P.BATCH_REPLY:
            return
        with self._lock:
            entry = self._pending.get(header[1])
        if entry is not None:
            entry[1], entry[2] = [header[2], header[3]], frames
            entry[0].set()

    def _on_welcome(self, restarted: bool) -> None:
        if restarted:  # what we asked the old master is asked again
            with self._lock:
                for entry in self._pending.values():
                    entry[0].set()

    def close(self) -> None:
        """Disconnect (the batches stay at the master)."""
        if not self._closed:
            self._closed = True
            self._conn.close()


class Batch(Link):
    """A named batch at a master: its progress, outcomes, and control (see the module).
    UnknownBatch (a LookupError) at once if the master has no batch ``name``."""

    def __init__(self, name: str, host: str | None = None, port: int | None = None, *,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, insecure: bool = False):
        self.name = name
        super().__init__(host, port, connect_timeout=connect_timeout, insecure=insecure)
        try:
            self.status()
        except BaseException:
            self.close()
            raise

    def status(self, timeout: float = 60.0) -> dict:
        """``{"jobs", "queued", "running", "done", "failed", "cancelled"}``."""
        value, _ = self._request(P.BATCH_STATUS, self.name, None, 0,
                                 deadline=time.monotonic() + timeout)
        return value

    def wait(self, timeout: float | None = None) -> dict:
        """Block until every job has an outcome (or was cancelled); return the status.
        TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.status()
        while not _complete(status):
            left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"batch {self.name!r}: {_unsettled(status)} jobs still "
                                   f"without an outcome after {timeout} s")
            status, _ = self._request(P.BATCH_STATUS, self.name, _settled(status), left,
                                      wait=left)
        return status

    def _pages(self, after: int | None = None) -> Iterator[tuple[int, int, list, Any]]:
        """``(key, status, frames, id)`` of every job after key ``after``, in order."""
        while True:
            (entries, last, more), frames = self._request(P.BATCH_FETCH, self.name, after,
                                                          PAGE_BYTES)
            pos = 0
            for key, status, n, jobid in entries:
                yield key, status, frames[pos:pos + n], jobid
                pos += n
            if not more:
                return
            after = last

    def outcomes(self, timeout: float | None = None) -> list[tuple[Any, Any]]:
        """``(key, value or exception)`` of every job, in submission order, without
        raising (a ClientThread's batch: its job ids as keys)."""
        self.wait(timeout)
        return [(key, err if err is not None else value)
                for key, err, value in self._decoded()]

    def results(self, timeout: float | None = None) -> list:
        """The values in submission order; raises the first failure, as ``map()`` does."""
        self.wait(timeout)
        values = []
        for _key, err, value in self._decoded():
            if err is not None:
                raise err
            values.append(value)
        return values

    def _decoded(self) -> Iterator[tuple[Any, BaseException | None, Any]]:
        for key, status, frames, jobid in self._pages():
            err, value = _decode(key, status, frames)
            yield (key if jobid is None else jobid), err, value

    def futures(self) -> list[Future]:
        """A ``concurrent.futures.Future`` per job, in submission order; they settle as
        the outcomes become durable at the master (a thread of this Batch watches)."""
        futures: dict[int, Future] = {}
        for key, status, frames, _jobid in self._pages():
            future: Future = Future()
            future.set_running_or_notify_cancel()
            futures[key] = future
            if status != -1:
                _settle(future, key, status, frames)
        keys = list(futures)
        threading.Thread(target=self._watch, args=(futures, keys), daemon=True,
                         name=f"cw-batch-{self.name}").start()
        return [futures[k] for k in keys]

    def _watch(self, futures: dict[int, Future], keys: list[int]) -> None:
        first = 0
        try:
            while not self._closed:
                while first < len(keys) and futures[keys[first]].done():
                    first += 1
                if first >= len(keys):
                    return
                status = self.status()
                if not _complete(status):
                    self._request(P.BATCH_STATUS, self.name, _settled(status), POLL, wait=POLL)
                for key, state, frames, _id in self._pages(keys[first - 1] if first else None):
                    future = futures.get(key)
                    if future is not None and not future.done() and state != -1:
                        _settle(future, key, state, frames)
        except CwError as exc:
            for future in futures.values():
                if not future.done():
                    future.set_exception(exc)

    def cancel(self) -> dict:
        """Queued jobs never run (running ones finish); returns the status."""
        value, _ = self._request(P.BATCH_CANCEL, self.name)
        return value

    def forget(self) -> None:
        """The master drops the batch and its stored outcomes (their space is given back)."""
        self._request(P.BATCH_FORGET, self.name)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Batch {self.name!r} at {self.host}:{self.port}>"


def list_batches(host: str | None = None, port: int | None = None, *,
                 insecure: bool = False) -> list[dict]:
    """Every batch at the master: ``[{"name", "jobs", "queued", ..., "durable"}]``."""
    link = Link(host, port, insecure=insecure)
    try:
        value, _ = link._request(P.BATCH_LIST, deadline=time.monotonic() + 60)
        return value
    finally:
        link.close()


def _settled(status: dict) -> int:
    return status["done"] + status["failed"] + status["cancelled"]


def _unsettled(status: dict) -> int:
    return status["jobs"] - _settled(status)


def _complete(status: dict) -> bool:
    return _settled(status) >= status["jobs"]


def _decode(key: int, status: int, frames: list) -> tuple[BaseException | None, Any]:
    if status == -2:
        return CancelledError(f"job {key} was cancelled"), None
    if status == -1:
        return CwError(f"job {key} has no outcome yet"), None
    return decode_outcome(status, frames, key)


def _settle(future: Future, key: int, status: int, frames: list) -> None:
    err, value = _decode(key, status, frames)
    if err is not None:
        future.set_exception(err)
    else:
        future.set_result(value)


# ---------------------------------------------------------------- python -m cw.batch
def _row(name: str, st: dict) -> str:
    return (f"{name:<24} {st['jobs']:>9} {st['queued']:>8} {st['running']:>8} "
            f"{st['done']:>9} {st['failed']:>7} {st['cancelled']:>9}")


HEADER = (f"{'batch':<24} {'jobs':>9} {'queued':>8} {'running':>8} {'done':>9} "
          f"{'failed':>7} {'cancelled':>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cw.batch",
                                     description="Named batches (campaigns) at a cw master.")
    parser.add_argument("command", choices=("list", "status", "wait", "cancel", "forget"))
    parser.add_argument("args", nargs="*", metavar="[NAME] [HOST[:PORT]]")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--timeout", type=float, default=None, help="for wait: seconds")
    parser.add_argument("--insecure", action="store_true",
                        help="plain TCP to a loopback master started with --insecure")
    args = parser.parse_args(argv)
    rest = list(args.args)
    if args.command == "list":
        if len(rest) > 1:
            parser.error("list takes [HOST[:PORT]]")
        name, host = None, (rest[0] if rest else None)
    else:
        if not 1 <= len(rest) <= 2:
            parser.error(f"{args.command} takes NAME [HOST[:PORT]]")
        name, host = rest[0], (rest[1] if len(rest) > 1 else None)
    try:
        if name is None:
            rows = list_batches(host, args.port, insecure=args.insecure)
            print(json.dumps(rows, indent=1) if args.json else
                  "\n".join([HEADER, *(_row(r["name"], r) for r in rows)]))
            return 0
        with Batch(name, host, args.port, insecure=args.insecure) as batch:
            out: Any
            if args.command == "status":
                out = batch.status()
            elif args.command == "wait":
                out = batch.wait(args.timeout)
            elif args.command == "cancel":
                out = batch.cancel()
            else:
                batch.forget()
                out = {"forgotten": name}
    except UnknownBatch as exc:
        print(f"cw-batch: {exc}", file=sys.stderr)
        return 2
    except (MasterUnreachable, SecurityError, TimeoutError, CwError) as exc:
        print(f"cw-batch: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=1))
    elif "jobs" in out:
        print("\n".join([HEADER, _row(name, out)]))
    else:
        print(f"batch {name!r} forgotten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
