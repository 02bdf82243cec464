"""Which connection each peer talks on, and what its closing means.

    HELLO (its SRCFD) --bind()--> fd_of[peer] = fd, peer_at[fd] = peer
    socket monitor: EVENT_DISCONNECTED fd --closed(fd)--> the peer on it, if any:
        async gone_unless_back(peer): wait a grace (a worker's supervisor says DIED first),
            then probe it (a heartbeat): sent  -> it reconnected (zmq redials at once), its
                                                  next message tells the new descriptor
                                             not -> it is gone: Scheduler.peer_gone

A reconnect is not a death, and the close of a descriptor's previous owner never counts
for its new one (``drain()`` handles reported events before a descriptor is bound).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
from tornado.ioloop import IOLoop

from cw import protocol as P
from cw.master.scheduler import Scheduler

log = logging.getLogger(__name__)

CLOSE_GRACE = 0.5          # seconds a peer whose connection closed has to reconnect (zmq
#                            redials within 0.1 s) before it is gone: a killed client's jobs
WORKER_CLOSE_GRACE = 2.0   # the same for a worker: its supervisor's DIED, naming how it
#                            ended, normally comes first
SNDHWM = 64    # messages queued to one peer; then sends say EAGAIN (ROUTER_MANDATORY) and
               # the scheduler keeps what it could not send (back-pressure, no drops)
RCVHWM = 256   # messages read ahead from one peer; then zmq stops reading its connection


def router(ctx: zmq.Context, max_message_size: int, handshake_timeout: float) -> zmq.Socket:
    """A master's ROUTER: sends to a gone peer fail (not dropped silently), a reconnecting
    peer takes its identity over, queues bounded both ways, strangers cut off in time."""
    sock = ctx.socket(zmq.ROUTER)
    for opt, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.ROUTER_HANDOVER, 1),
                       (zmq.SNDHWM, SNDHWM), (zmq.RCVHWM, RCVHWM), (zmq.LINGER, 0),
                       (zmq.MAXMSGSIZE, max_message_size),
                       (zmq.HANDSHAKE_IVL, int(handshake_timeout * 1000))):
        sock.setsockopt(opt, value)
    return sock


class Connections:
    """Peers' descriptors, for the master's event loop (its only caller)."""

    def __init__(self, scheduler: Scheduler, send: Callable[[bytes, list], bool | None],
                 changed: Callable[[], None]):
        self.scheduler = scheduler
        self.send = send
        self.changed = changed          # flush after a change outside a message batch
        self.monitors: list[tuple[zmq.Socket, Callable]] = []  # each ROUTER's events, and
        #                                                        what handles them
        self.fd_of: dict[bytes, int] = {}   # peer -> its connection's descriptor
        self.peer_at: dict[int, bytes] = {}  # ... and back
        self.unbound: set[bytes] = set()    # reconnected: descriptor not known yet

    def drain(self) -> None:
        """Handle every connection event already reported."""
        for monitor, handle in self.monitors:
            while True:
                try:
                    frames = monitor.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                handle(frames)

    def bind(self, ident: bytes, frame: zmq.Frame) -> None:
        """Learn which connection a peer talks on, from a message it sent on it."""
        self.drain()
        self.unbound.discard(ident)
        old = self.fd_of.pop(ident, None)
        if old is not None and self.peer_at.get(old) == ident:
            del self.peer_at[old]
        fd = frame.get(zmq.SRCFD)
        self.fd_of[ident], self.peer_at[fd] = fd, ident

    def closed(self, fd: int) -> None:
        """A connection closed: if a peer talked on it, it is gone unless it comes back."""
        ident = self.peer_at.pop(fd, None)
        if ident is None or self.fd_of.get(ident) != fd:
            return
        del self.fd_of[ident]
        IOLoop.current().spawn_callback(self.gone_unless_back, ident)

    async def gone_unless_back(self, ident: bytes) -> None:
        """The flow after a close, top to bottom: grace, probe, then gone or rebound."""
        sched = self.scheduler
        await asyncio.sleep(WORKER_CLOSE_GRACE if ident in sched.workers else CLOSE_GRACE)
        if sched.peer(ident) is None or ident in self.fd_of:
            return  # gone already (DIED, BYE), or registered again on a new connection
        if self.send(ident, [P.pack(P.HEARTBEAT, len(sched.workers))]) is not False:
            name = getattr(sched.peer(ident), "name", ident.hex()[:8])
            log.info("%s reconnected after its connection closed", name)
            self.unbound.add(ident)  # its next message tells the new descriptor
            return
        sched.peer_gone(ident, "its connection closed")
        self.changed()

    def forget_gone(self) -> None:
        """Drop the descriptors of peers the scheduler no longer knows (once per tick)."""
        sched = self.scheduler
        for ident in [i for i in self.fd_of if sched.peer(i) is None]:
            fd = self.fd_of.pop(ident)
            if self.peer_at.get(fd) == ident:
                del self.peer_at[fd]
        self.unbound = {i for i in self.unbound if sched.peer(i) is not None}
