"""A send-only second socket of a connected peer, for exactly one owner thread.

    worker main thread --results, BYE--> Alias (DEALER, identity = peer's + "+") --> master
    client submitting thread --a lone job--> Alias --> master

It sends without waking the I/O thread: one thread handoff less on the latency path. The
master maps it to its peer through HELLO's "alias" and never writes to it (not even WHO:
that goes to the main socket), so nothing stale can arrive here after a master restart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import zmq

from cw.conn import local, security

if TYPE_CHECKING:
    from cw.conn.peer import Connection


class Alias:
    """A send-only second socket of a connected peer, for exactly one owner thread.

    The master never writes to it (not even WHO: that goes to the main socket), so
    nothing stale can arrive here after a master restart.
    """

    def __init__(self, conn: Connection):
        self.conn = conn
        self.sock: zmq.Socket | None = None
        self.check: local.PeerCheck | None = None
        self.route: security.Route | None = None

    def send(self, frames: list) -> None:
        if self.sock is None or self.route is not self.conn.route:
            self._open()
        elif self.check is not None and self.check.strangers():
            self.conn.log.error("another user answers on the local socket; sending by TCP")
            self._open(tcp=True)
        elif self.check is not None and self.check.ended:
            self._open()  # the local connection is over: dial again, checking the path
        assert self.sock is not None  # _open() made it
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # no peer (the local connection ended): dial again, checking it
            self._open()
            assert self.sock is not None  # _open() made it
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                self.conn.log.warning("cannot send to the master: %s", exc)
        except zmq.ZMQError as exc:
            self.conn.log.warning("cannot send to the master: %s", exc)

    def close(self, linger: int = 2000) -> None:
        if self.check is not None:
            self.check.close()
            self.check = None
        if self.sock is not None:
            self.sock.close(linger=linger)
            self.sock = None

    def _open(self, tcp: bool = False) -> None:
        """Connect as our peer did, unless its local socket has gone since (a tmp cleaner)
        or is not ours: a socket file that is not there would take our messages and never
        deliver them. The master maps an alias to its peer whatever socket either came in
        on."""
        self.close(linger=0)
        self.route = route = self.conn.route
        assert route is not None  # the peer is connected
        if route.endpoint.startswith("ipc://") and (tcp or not local.present(route.endpoint)):
            route = self.conn._find_route(allow_local=False) or route
        self.sock, self.check = self.conn._connect(self.conn.info["alias"], rcvhwm=1,
                                                   route=route)
