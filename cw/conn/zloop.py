"""A zmq socket driven by a tornado IOLoop: drain on readable, one callback per message.

    zmq FD readable --> drain(): recv NOBLOCK until EAGAIN (at most BATCH per turn)
                         |  on_message(frames) for each
                         v
                        after_batch()          (the owner flushes its outboxes here)

The zmq FD is edge-triggered and a send can consume the edge, so after every batch (and
after any send the owner makes outside a batch, via ``kick()``) the socket's EVENTS are
re-checked and the drain is re-scheduled if messages are waiting.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import zmq
from tornado.ioloop import IOLoop

BATCH = 1000

log = logging.getLogger(__name__)


class SocketLoop:
    """Calls ``on_message(frames)`` for every message on ``sock``, then ``after_batch()``."""

    def __init__(self, loop: IOLoop, sock: zmq.Socket, on_message: Callable[[list], None],
                 after_batch: Callable[[], None]):
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.after_batch = after_batch
        self._scheduled = False
        loop.add_handler(sock, self._on_events, IOLoop.READ)
        self.kick()

    def kick(self) -> None:
        """Schedule a drain if messages are waiting (call after sending)."""
        # pyzmq's stubs say int | bytes for every option; EVENTS is an int
        if not self._scheduled and cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._scheduled = True
            self.loop.add_callback(self._drain)

    def close(self) -> None:
        self.loop.remove_handler(self.sock)

    def _on_events(self, fd, events) -> None:
        self._drain()

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        if sock.closed:
            return
        for _ in range(BATCH):
            if sock.closed:  # a handler closed it (a peer moving to another socket)
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self.on_message(frames)
            except Exception:
                log.exception("message handler failed; message dropped")
        try:
            self.after_batch()
        except Exception:
            log.exception("flush failed")
        if not sock.closed:
            self.kick()
