"""The lane: a lone job goes straight from a client to a worker on its machine, and back.

    client (user thread)                 worker                         client (I/O thread)
    submit, nothing else in flight       lane: PULL, its I/O thread
      --LJOB + frames--> PUSH ------->   idle and knows the client?
                                           yes: run next in the main thread
                                             --LRESULT + frames--> PUSH --> inbox: PULL --> future
                                           no:  --BOUNCE seq------> PUSH --> inbox --> resend it
                                                                             through the master
    master: grants a lane (LANE) once it has sent that client's job to that worker; says
    LANE_LOST when the worker leaves or dies, and the client resends what was on the lane.

Two hops instead of four (client -> master -> worker -> master -> client) and no master on
the path: that is what lone-job latency is made of. Everything else stays with the master:
batches, retries, cancels, stealing. A job on the lane is still the client's until settled,
so whatever happens to the lane (worker gone, master restarted) it is sent again through the
master, and the first outcome to arrive wins.

Each receiving end (a worker's lane, a client's inbox) has a thread of its own blocked in
``recv``: waking it costs one thread switch, where an event loop costs several, and the
hop is most of a lone job's round trip.

Sockets live in the same private directory as the master's local socket (cw.local): only the
user can connect to them. A PUSH socket belongs to one thread; an ``Outlets`` is one thread's
set of them.
"""
from __future__ import annotations

import logging
import threading
import uuid
from typing import Callable, Optional

import zmq

from . import local

log = logging.getLogger("cw.lane")

SNDHWM = 10_000  # messages queued to one peer that is not reading (then dropped, logged)
LINGER = 1000    # ms a closing socket may take to deliver what it queued (a last result)


def new_endpoint(kind: str) -> Optional[str]:
    """A fresh ``ipc://`` endpoint in the private directory (None if there is none)."""
    if not zmq.has("ipc"):
        return None
    folder = local.private_dir()
    if folder is None:
        return None
    path = folder / f"{kind}-{uuid.uuid4().hex[:12]}.sock"
    return f"ipc://{path}" if len(str(path)) <= local.MAX_PATH else None


class Listener:
    """A PULL socket in the private directory and the thread that reads it, calling
    ``handler(frames)`` for each message (exceptions are logged, the thread lives on)."""

    def __init__(self, ctx: zmq.Context, kind: str, handler: Callable[[list], None],
                 logger: logging.Logger = log):
        endpoint = new_endpoint(kind)
        if endpoint is None:
            raise OSError(f"no private directory for a {kind} socket")
        self.ctx, self.endpoint, self.handler, self.log = ctx, endpoint, handler, logger
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self._token = uuid.uuid4().bytes  # the stop message; only we know it
        self.thread = threading.Thread(target=self._run, name=f"cw-{kind}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sock = self.sock
        try:
            while True:
                frames = sock.recv_multipart(copy=False)
                if len(frames) == 1 and frames[0].bytes == self._token:
                    break
                try:
                    self.handler(frames)
                except Exception:
                    self.log.exception("message handler failed; message dropped")
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(linger=0)
            local.remove(self.endpoint)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (it closes the socket and removes its file)."""
        if not self.thread.is_alive():
            return
        stopper = push(self.ctx, self.endpoint, immediate=False)
        stopper.send(self._token)
        stopper.close()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


def push(ctx: zmq.Context, endpoint: str, immediate: bool) -> zmq.Socket:
    """A sending end; ``immediate``: refuse to queue while not connected (then the caller
    takes the master's path instead)."""
    sock = ctx.socket(zmq.PUSH)
    for opt, value in ((zmq.SNDHWM, SNDHWM), (zmq.LINGER, LINGER),
                       (zmq.IMMEDIATE, int(immediate))):
        sock.setsockopt(opt, value)
    sock.connect(endpoint)
    return sock


class Outlets:
    """One thread's PUSH sockets to client inboxes, opened on first use."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.socks: dict[str, zmq.Socket] = {}

    def send(self, endpoint: str, frames: list) -> bool:
        """Queue a message for an inbox; False (logged) if it cannot take more."""
        sock = self.socks.get(endpoint)
        if sock is None:
            if not local.present(endpoint):
                log.debug("inbox %s is gone; dropped a message", endpoint)
                return False
            sock = self.socks[endpoint] = push(self.ctx, endpoint, immediate=False)
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            log.warning("dropped a message to the client inbox %s: %s", endpoint, exc)
            return False

    def close(self, endpoint: str) -> None:
        """Close the outlet to one inbox (its client is gone)."""
        sock = self.socks.pop(endpoint, None)
        if sock is not None:
            sock.close()

    def close_all(self) -> None:
        for endpoint in list(self.socks):
            self.close(endpoint)
