"""What the master sends the clients of named batches (cw.master.batches), in order.

    send(ident, frames): sent now, or, while that client's socket queue is full (it reads
        slower than outcomes come), kept in its backlog and tried again every RETRY seconds;
        dropped once the client is gone. ACKED and outcomes are never lost to a slow reader.
    _fail(ident, keys, error): jobs that were never journaled fail at their client
    _resend(ident, name, keys): outcomes a resubmitting client missed while we restarted
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from cw import protocol as P
from cw.master.batch_requests import unpack
from cw.serialize import dumps

if TYPE_CHECKING:
    from cw.master.daemon import Master
    from cw.master.journal import Journal

RETRY = 0.005              # seconds before a client's full queue is tried again


class BatchOutbox:
    """The sending side of ``Batches``."""

    master: Master
    journal: Journal
    loop: Any
    _backlog: dict[bytes, deque[list]]
    _retrying: bool

    def send(self, ident: bytes, frames: list) -> None:
        """Send to a client in order; what its full queue does not take waits here (and is
        tried again shortly) until it reads, or is dropped once it is gone."""
        backlog = self._backlog.get(ident)
        if backlog is not None:
            backlog.append(frames)
            return
        if self.master._send(ident, frames) is None:
            self._backlog[ident] = deque([frames])
            self._retry_soon()

    def _retry_soon(self) -> None:
        if not self._retrying and self.loop is not None:
            self._retrying = True
            self.loop.call_later(RETRY, self._retry)

    def _retry(self) -> None:
        self._retrying = False
        for ident, backlog in list(self._backlog.items()):
            while backlog:
                sent = self.master._send(ident, backlog[0])
                if sent is None:
                    break
                backlog.popleft()
                if sent is False:
                    backlog.clear()  # gone
            if not backlog:
                del self._backlog[ident]
        if self._backlog:
            self._retry_soon()

    def _fail(self, ident: bytes, keys: list[int], error: Exception) -> None:
        """Fail a client's jobs that were never journaled."""
        if keys:
            payload = dumps(error, "error")
            done = [[k, P.FAILED, len(payload)] for k in keys]
            self.send(ident, [P.pack(P.RESULTS, [], done),
                                      *(f for _ in keys for f in payload)])

    def _resend(self, ident: bytes, name: str, keys: list[int]) -> None:
        """Outcomes a resubmitting client missed (while we restarted)."""
        done, frames = [], []
        for key in keys:
            out = self.journal.read_outcome(name, key)
            if out is not None:
                _id, payload = unpack(out.payload)
                done.append([key, out.status, len(payload)])
                frames += payload
        if done:
            self.send(ident, [P.pack(P.RESULTS, [], done), *frames])
