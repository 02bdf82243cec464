"""The lane: a lone job goes straight from a client to a worker on its machine, and back.

    client (user thread)               worker                           client
    submit, nothing else in flight     lane thread (a Listener)         inbox thread (a Listener)
      --LJOB + frames-------------->   idle and knows the client?
                                         yes: pending; the main thread runs it
                                              --LRESULT + frames-------> _results --> future
                                         no:  (I/O thread) --BOUNCE---> resend it through
                                                                        the master
    master: grants a lane (LANE) once it has sent that client's job to that worker; says
    LANE_LOST when the worker leaves or dies, and the client resends what was on the lane.

Two hops instead of four (client -> master -> worker -> master -> client) and no master on
the path: that is what lone-job latency is made of. Everything else stays with the master:
batches, retries, cancels, stealing. A job on the lane is still the client's until settled,
so whatever happens to the lane (worker gone, master restarted) it is sent again through the
master, and the first outcome to arrive wins.

The hop is most of a lone job's round trip, so the lane is a plain Unix stream socket, not
zmq: a zmq hop wakes both sides' zmq I/O threads as well (a lone round trip measured ~147 µs
through zmq, ~70 µs through these sockets, same threads otherwise). Each receiving end (a
worker's lane, a client's inbox) is a ``Listener``: a thread of its own in ``select``.

    message = count (u32) + one length (u64) per frame + the frames; zero frames is invalid
    a connection starts with HELLO_TAG + the sender's own endpoint (whom EOF concerns)

A sender is an ``Outlets``: one thread's connections, each send bounded by a timeout. A
send that fails closes the connection; the client's inbox sees it close, and what was on
that worker's lane goes through the master (at LANE_LOST, or after a grace if the worker
lives on). So a stuck or vanished peer costs a resend, never a hang. Sockets live in the
same private directory as the master's local socket (cw.conn.local): only the user can connect
to them. Both ends check that: ``connect`` goes only to a socket ``local.trusted`` vouches
for and whose listener runs as this user, and a listener closes at once a connection from
any other user (``SO_PEERCRED``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from typing import cast

from cw import cli
from cw.conn import local
from cw.errors import ProtocolError

log = logging.getLogger(__name__)

COUNT = struct.Struct("<I")
LENGTH = struct.Struct("<Q")
MAX_FRAMES = 1 << 16
MAX_MESSAGE = 64 << 20     # bytes in one message (a peer announcing more is cut off); lane
                           # traffic is far smaller (1 MB of arguments, 64 KB of result)
HELLO_TAG = b"cw-lane-hello"
JOIN_BELOW = 1 << 16       # messages smaller than this go out in one write
READ_SIZE = 1 << 20


def new_endpoint(kind: str) -> str | None:
    """A fresh socket path in the private directory (None if there is none)."""
    return local.socket_path(f"{kind}-{uuid.uuid4().hex[:12]}.sock")


class Untrusted(ConnectionRefusedError):
    """A lane or inbox socket, or the process behind it, is not this user's own."""


def unreachable(error: OSError | None) -> bool:
    """True if a send failed because nothing listens there (as opposed to a slow peer)."""
    return isinstance(error, (FileNotFoundError, ConnectionRefusedError))


def is_endpoint(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/") and len(value) <= local.MAX_PATH


def encode(frames: list) -> list:
    """The buffers of one message: its prefix, then the frames as they are."""
    views = [memoryview(f).cast("B") for f in frames]
    prefix = COUNT.pack(len(views)) + b"".join(LENGTH.pack(v.nbytes) for v in views)
    return [prefix, *views]


class Decoder:
    """Reassembles messages from a stream's chunks."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> list | None:
        """The next whole message (frames as memoryviews), None if there is none yet;
        ProtocolError if the stream is not made of messages."""
        buf = self.buf
        if len(buf) < COUNT.size:
            return None
        n, = COUNT.unpack_from(buf)
        if not 0 < n <= MAX_FRAMES:
            raise ProtocolError(f"a message of {n} frames")
        head = COUNT.size + n * LENGTH.size
        if len(buf) < head:
            return None
        sizes = [LENGTH.unpack_from(buf, COUNT.size + i * LENGTH.size)[0] for i in range(n)]
        total = head + sum(sizes)
        if total > MAX_MESSAGE:
            raise ProtocolError(f"a message of {total} bytes")
        if len(buf) < total:
            return None
        with memoryview(buf) as view:
            data = memoryview(bytes(view[head:total]))  # one copy, then views into it
        del buf[:total]
        frames, pos = [], 0
        for size in sizes:
            frames.append(data[pos:pos + size])
            pos += size
        return frames


class Listener:
    """A listening socket in the private directory and the thread that reads it:
    ``handler(frames)`` per message, ``on_close(peer)`` when a connection that said HELLO
    closes. Bad input closes that connection (logged); exceptions in handlers are logged."""

    def __init__(self, kind: str, handler: Callable[[list], None],
                 logger: logging.Logger = log,
                 on_close: Callable[[str], None] = lambda peer: None):
        path = new_endpoint(kind)
        if path is None:
            raise OSError(f"no private directory for a {kind} socket")
        self.endpoint, self.handler, self.on_close, self.log = path, handler, on_close, logger
        self.refusals = cli.Throttled(logger)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(64)
        self.server.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server, selectors.EVENT_READ)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, name=f"cw-{kind}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is self.server:
                        self._accept()
                    else:  # a connection _accept registered
                        self._serve(cast(socket.socket, key.fileobj), key.data)
        except Exception:
            self.log.exception("the %s listener failed", self.endpoint)
        finally:
            for key in list(self.sel.get_map().values()):
                cast(socket.socket, key.fileobj).close()  # all ours are sockets
            self.sel.close()
            self._wake_w.close()
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint)

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError as exc:  # EMFILE: the connection waits; do not spin on it
            self.refusals.warning("%s cannot accept a connection: %s", self.endpoint, exc)
            time.sleep(0.1)
            return
        uid = local.peer_uid(conn)
        if uid != os.getuid():
            self.refusals.warning("%s: refused a connection from uid %d (not this user)",
                                  self.endpoint, uid)
            conn.close()
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, [Decoder(), None])

    def _serve(self, conn: socket.socket, state: list) -> None:
        """Read what a connection has; anything going wrong ends that connection only."""
        try:
            self._read(conn, state)
        except Exception:
            self.log.exception("%s: closing a connection after an error", self.endpoint)
            self._close(conn, state)

    def _close(self, conn: socket.socket, state: list) -> None:
        self.sel.unregister(conn)
        conn.close()
        if state[1]:
            try:
                self.on_close(state[1])
            except Exception:
                self.log.exception("the close handler failed")

    def _read(self, conn: socket.socket, state: list) -> None:
        decoder = state[0]
        try:
            data = conn.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # closed by the peer
            return self._close(conn, state)
        decoder.feed(data)
        while True:
            try:
                frames = decoder.next()
            except ProtocolError as exc:  # not speaking our protocol: cut it off
                self.log.warning("dropped a bad message on %s: %s", self.endpoint, exc)
                return self._close(conn, state)
            if frames is None:
                return
            if state[1] is None and len(frames) == 2 and frames[0] == HELLO_TAG:
                state[1] = bytes(frames[1]).decode(errors="replace")
                continue
            try:
                self.handler(frames)
            except Exception:
                self.log.exception("message handler failed; message dropped")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (it closes every socket and removes the file)."""
        if self.thread.is_alive():
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            if self.thread is not threading.current_thread():
                self.thread.join(timeout)


def connect(endpoint: str, me: str, timeout: float | None) -> socket.socket:
    """A connection to a listener of this user, introduced as ``me``; sends wait at most
    ``timeout`` seconds (0: never). Raises Untrusted if it is not ours."""
    if not local.trusted(endpoint):
        raise Untrusted(f"{endpoint} is not a socket in a private directory of this user")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(endpoint)
        uid = local.peer_uid(sock)
        if uid != os.getuid():
            raise Untrusted(f"the process listening at {endpoint} runs as uid {uid}, "
                            f"not as this user")
        send(sock, [HELLO_TAG, me.encode()])
    except OSError:
        sock.close()
        raise
    return sock


def send(sock: socket.socket, frames: list) -> None:
    """Send one message (raises OSError, and then the connection is unusable)."""
    buffers = encode(frames)
    if len(buffers[0]) + sum(v.nbytes for v in buffers[1:]) < JOIN_BELOW:
        sock.sendall(b"".join(buffers))
    else:
        for buf in buffers:
            sock.sendall(buf)


class Outlets:
    """One thread's connections to listeners, opened on first use; sends that fail (the
    peer gone, or not reading for ``timeout`` seconds) drop the message and the connection."""

    def __init__(self, me: str, timeout: float):
        self.me, self.timeout = me, timeout
        self.socks: dict[str, socket.socket] = {}

    def send(self, endpoint: str, frames: list) -> OSError | None:
        """Send a message; None if it went, else the error (logged), see ``unreachable``."""
        try:
            sock = self.socks.get(endpoint)
            if sock is None:
                sock = self.socks[endpoint] = connect(endpoint, self.me, self.timeout)
            send(sock, frames)
            return None
        except OSError as exc:
            log.warning("dropped a message to %s: %s", endpoint, exc)
            self.close(endpoint)
            return exc

    def close(self, endpoint: str) -> None:
        """Close the connection to one listener."""
        sock = self.socks.pop(endpoint, None)
        if sock is not None:
            sock.close()

    def close_all(self) -> None:
        for endpoint in list(self.socks):
            self.close(endpoint)
