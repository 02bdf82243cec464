"""A client's or worker's connection to the master, on a tornado IOLoop in its own thread.

    owner thread ----call(fn)----> [ I/O thread: IOLoop ]
                                     | DEALER socket (identity = uuid4)
                                     |   HELLO --> WELCOME | REFUSE | WHO (say HELLO again)
                                     |   HEARTBEAT every interval, both ways
                                     |   master silent > timeout: say HELLO again, tell owner
                                     v
                         handler(kind, header, frames)   (runs in the I/O thread)

The owner never touches the socket: it hands work to the I/O thread with ``call``.
A WELCOME carrying a new master id means the master restarted, and a WHO means it forgot
us (it timed us out); either way ``on_welcome(resync=True)`` lets the owner resubmit what it
held. A HELLO to a master that knows us only refreshes us there.

``listen(kind, handler)`` opens a further receiving socket with a thread of its own (a
worker's lane, a client's inbox: see cw.conn.lane), stopped and removed with the connection.

A peer may also send on an ``Alias`` (cw.conn.alias), a second socket owned by one other
thread: one thread handoff less on the latency path.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import zmq
from tornado.ioloop import IOLoop

from cw import protocol as P
from cw.conn import lane, local, security
from cw.conn.zloop import SocketLoop
from cw.defaults import DEFAULT_CONNECT_TIMEOUT
from cw.errors import MasterUnreachable, NoKeys, ProtocolError, TooLarge

T = TypeVar("T")
KEYS_POLL = 0.2  # seconds between looks for a master's connection file
LOCAL_RECONNECT_MS = 30_000  # zmq's own reconnect on the local socket (we redial first)


def peer_info(**extra) -> dict:
    """What a peer tells the master about itself in HELLO."""
    host = socket.gethostname()
    return {"host": host, "pid": os.getpid(), "name": f"{host}:{os.getpid()}",
            "python": sys.version.split()[0], "machine": local.machine_id(), **extra}


class Connection:
    """A registered DEALER connection to the master, serviced by a background thread."""

    def __init__(self, host: str, port: int, role: str, info: dict,
                 handler: Callable[[int, list, list], None],
                 on_welcome: Callable[[bool], None] = lambda restarted: None,
                 on_silence: Callable[[float], None] = lambda seconds: None,
                 logger: logging.Logger | None = None,
                 on_begin: Callable[[], None] = lambda: None, insecure: bool = False):
        self.host, self.port = host, port
        self.role = role
        self.insecure = insecure
        self.route = self._find_route()
        self.handler = handler
        self.on_welcome = on_welcome
        self.on_silence = on_silence
        self.on_begin = on_begin
        self.listening: list[lane.Listener] = []
        self.log = logger or logging.getLogger(__name__)
        self.identity = uuid.uuid4().bytes
        self.info = {**info, "alias": P.alias_of(self.identity)}
        self.forgotten = False
        self.master_id: str | None = None
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 10.0
        self.max_message_size = 0  # largest frame the master accepts (0: no limit)
        self.master_workers = 0    # workers connected to the master, as it last said
        self.welcomed = threading.Event()
        self.refused: str | None = None
        self.last_heard = time.monotonic()
        self.loop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = False
        self._said_hello = time.monotonic()
        self._redialed = 0.0

    @property
    def endpoint(self) -> str:
        """Where we dial the master: its local socket on its machine, else tcp://host:port."""
        return self.route.endpoint if self.route else f"tcp://{self.host}:{self.port}"

    def _find_route(self, allow_local: bool = True) -> security.Route | None:
        """How to reach the master with our role's keys; None while we have none."""
        try:
            return security.route_for(self.host, self.port, allow_local, self.role,
                                      self.insecure)
        except NoKeys as exc:
            self.no_keys = exc
            return None

    def _wait_for_keys(self, timeout: float | None) -> None:
        """Never dial a master without its keys: wait (bounded by ``timeout``, None: for
        ever) until its connection file appears, else raise NoKeys."""
        if self.route is not None:
            return
        self.log.warning("%s; waiting for it", self.no_keys)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.route is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise self.no_keys
            time.sleep(KEYS_POLL)
            self.route = self._find_route()
        self.log.info("found the keys of the master at %s:%s", self.host, self.port)

    # ---------------------------------------------------------------- owner side
    def open(self, keys_timeout: float | None = None) -> None:
        """Wait (up to ``keys_timeout``, None: for ever) for the master's keys, else raise
        NoKeys; then start the I/O thread: it registers (and re-registers) in the
        background."""
        self._wait_for_keys(keys_timeout)
        self._thread = threading.Thread(target=self._run, name=f"cw-{self.role}-io",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()

    def start(self, timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Start the I/O thread and wait until the master welcomes us (None: for ever)."""
        started = time.monotonic()
        self.open(timeout)
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - started))
        if not self.welcomed.wait(timeout):
            self.close()
            assert self.route is not None  # open() waited for it
            hint = ("" if self.route.known else "; it runs without keys, as we were told: "
                    "insecure")
            raise MasterUnreachable(f"no cw master answered at {self.endpoint} within "
                                    f"{timeout:g} s (is `python -m cw.master` running "
                                    f"there?{hint})")
        if self.refused:
            self.close()
            raise ProtocolError(f"the master at {self.endpoint} refused us: {self.refused}")

    def call(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` in the I/O thread (thread-safe, returns at once)."""
        assert self.loop is not None, "call() before open()"
        self.loop.add_callback(fn, *args)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a coroutine on the I/O thread's loop and wait (``timeout`` s) for its result:
        for a flow that waits on the master (a cancel round trip). Raises TimeoutError, or
        RuntimeError if the connection is closed."""
        if self.loop is None or self._closing:
            coro.close()
            raise RuntimeError("the connection is closed")
        loop = self.loop.asyncio_loop  # type: ignore[attr-defined]  # tornado's AsyncIOLoop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def in_io_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self, timeout: float = 5.0, bye: bool = True) -> None:
        """Say goodbye (unless the owner did), stop the I/O thread, close the socket."""
        if self._thread is None or not self._thread.is_alive() or self._closing:
            return
        self._closing = True
        self.call(self._shutdown, bye)
        if not self.in_io_thread():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- I/O thread
    def send(self, frames: list) -> None:
        """Send a message to the master (I/O thread only)."""
        if self.check is not None and not self._stranger() and self.check.ended:
            self._redial()  # the local connection is over (the master stopped)
        try:  # never blocks: a socket without a peer says EAGAIN (see _connect)
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self._redial():
                self.send(frames)
            else:
                self.log.debug("no connection to the master; a message was not sent")
        except zmq.ZMQError as exc:
            self.log.warning("cannot send to the master: %s", exc)
        self.reader.kick()

    def _redial(self) -> bool:
        """Our socket has no peer (its local connection ended, or a handshake failed): dial
        again as the connection file says now, at most once per heartbeat interval."""
        now = time.monotonic()
        if now - self._redialed < self.heartbeat_interval:
            return False
        self._redialed = now
        route = self._find_route()  # our role's keys; None if the file is gone for now
        if route is None:
            return False
        self._switch(route)
        return True

    def listen(self, kind: str, handler: Callable[[list], None],
               on_close: Callable[[str], None] = lambda peer: None) -> str | None:
        """Listen on a Unix socket in the private directory, read by a thread of its own
        (cw.conn.lane.Listener); return its path, or None if there can be none here."""
        try:
            listener = lane.Listener(kind, handler, self.log, on_close)
        except OSError as exc:
            self.log.warning("no %s socket: %s", kind, exc)
            return None
        self.listening.append(listener)
        return listener.endpoint

    def _stop_listening(self) -> None:
        for listener in self.listening:
            listener.stop()
        self.listening.clear()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.loop = loop = IOLoop(make_current=False)
        self.ctx = zmq.Context()
        self.sock, self.check = self._connect()
        loop.add_callback(self._begin)
        self._ready.set()
        try:
            loop.start()
        finally:  # linger only to deliver BYE to a master that knows us
            self._stop_listening()
            if self.check is not None:
                self.check.close()
            self.sock.close(linger=2000 if self.welcomed.is_set() and not self.refused else 0)
            self.ctx.term()
            loop.close(all_fds=False)

    def _connect(self, identity: bytes | None = None, rcvhwm: int = 0,
                 route: security.Route | None = None
                 ) -> tuple[zmq.Socket, local.PeerCheck | None]:
        """A DEALER to the master (``identity``: ours unless an alias's; ``route``: ours
        unless the alias needs another), and on the local socket the check of who is at
        the other end of the connection it makes."""
        route = route or self.route
        assert route is not None  # open() waited for the keys
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity or self.identity)
        ipc = route.endpoint.startswith("ipc://")
        # on the local socket zmq must not reconnect by itself before we do: what it queued
        # meanwhile would go to whoever then holds the path; we dial again, checking it, at
        # the next send (_redial). Not -1 (never): libzmq 4.3 then drops the connection's
        # pipe, and one dropped while a message is being read aborts (fq.cpp: !_more).
        for opt, value in ((zmq.SNDHWM, 0), (zmq.RCVHWM, rcvhwm), (zmq.LINGER, 2000),
                           (zmq.RECONNECT_IVL, LOCAL_RECONNECT_MS if ipc else 100),
                           (zmq.RECONNECT_IVL_MAX, LOCAL_RECONNECT_MS if ipc else 2000)):
            sock.setsockopt(opt, value)
        security.secure_client(sock, route.keys)
        check = local.PeerCheck(sock) if ipc else None
        sock.connect(route.endpoint)
        return sock, check

    def _stranger(self) -> bool:
        """True (and we switch to TCP) if another user answers on the local socket."""
        uids = self.check.strangers() if self.check is not None else ()
        if not uids:
            return False
        self.log.error("uid %d answers on the local socket %s, not this user: someone else "
                       "took the master's path; leaving it", uids[0], self.endpoint)
        route = self._find_route()  # the squatted path is not trusted now: TCP with our keys
        if route is not None:  # (None: no keys for now; say nothing until a redial finds them)
            self._switch(route)
            self._hello()
        return True

    def _begin(self) -> None:
        assert self.loop is not None  # the I/O thread's, set before it runs us
        self.reader = SocketLoop(self.loop, self.sock, self._on_message, lambda: None)
        self.on_begin()
        self.loop.spawn_callback(self._converse)

    async def _converse(self) -> None:
        """Our side of the conversation with the master, top to bottom: HELLO, then a
        heartbeat each interval (the master's WELCOME may change it). Silent past the
        timeout: once per timeout, reconnect if its connection file changed and say HELLO
        again; each tick, tell the owner how long it has been (it may give up). The
        master's answers (WELCOME, WHO, REFUSE) are handled as they come (_on_message)."""
        self._hello()
        while not self._closing:
            await asyncio.sleep(self.heartbeat_interval)
            if self._closing:
                return
            now = time.monotonic()
            silent = now - self.last_heard
            if silent <= self.heartbeat_timeout:
                self.send([P.pack(P.HEARTBEAT)])
                continue
            if now - self._said_hello > self.heartbeat_timeout:
                self._said_hello = now
                self._reroute_if_changed()
                self.log.warning("master %s silent for %.0f s; saying HELLO again",
                                 self.endpoint, silent)
                self._hello()
            self.on_silence(silent)

    def _reroute_if_changed(self) -> None:
        """A master restarted with new keys or sockets: reconnect as its new file says."""
        route = self._find_route()
        if route is None or not route.known or route == self.route:
            return
        self.log.info("the master's connection file changed; reconnecting to %s",
                      route.endpoint)
        self._switch(route)

    def _switch(self, route: security.Route) -> None:
        """Dial the master by ``route`` from now on, on a new socket."""
        self.route = route
        self.reader.close()
        if self.check is not None:
            self.check.close()
        self.sock.close(linger=0)
        self.sock, self.check = self._connect()
        assert self.loop is not None  # the I/O thread's: we run in it
        self.reader = SocketLoop(self.loop, self.sock, self._on_message, lambda: None)

    def _hello(self) -> None:
        self.send([P.pack(P.HELLO, P.VERSION, self.role, self.info)])

    def _shutdown(self, bye: bool = True) -> None:
        if bye and self.welcomed.is_set() and not self.refused:
            self.send([P.pack(P.BYE)])
        self._closing = True  # ends _converse
        self.reader.close()
        self._stop_listening()
        assert self.loop is not None  # the I/O thread's: we run in it
        self.loop.stop()

    def _on_message(self, frames: list) -> None:
        if self.check is not None and self._stranger():
            return  # never read what a stranger sent
        self.last_heard = time.monotonic()
        try:
            header = P.unpack(frames[0])
        except ProtocolError as exc:
            self.log.warning("dropped a bad message from the master: %s", exc)
            return
        kind = header[0]
        if kind == P.HEARTBEAT:
            if len(header) > 1 and isinstance(header[1], int):
                self.master_workers = header[1]
            return
        if kind == P.WELCOME:
            return self._welcome(header)
        if kind == P.WHO:
            return self.forgot()
        if kind == P.REFUSE:
            self.refused = str(header[1])
            self.log.error("the master at %s refused us: %s", self.endpoint, self.refused)
            self.welcomed.set()
            return
        self.handler(kind, header, frames[1:])

    def forgot(self) -> None:
        """The master does not know us (restarted, or timed us out): register again."""
        if not self.forgotten:
            self.log.info("the master does not know us (restarted?); saying HELLO again")
        self.forgotten = True
        self._hello()

    def _welcome(self, header: list) -> None:
        _, version, master_id, info = header
        P.check_version(version)
        restarted = self.master_id is not None and (master_id != self.master_id
                                                    or self.forgotten)
        self.forgotten = False
        self.master_id = master_id
        self.heartbeat_interval = float(info.get("heartbeat_interval", self.heartbeat_interval))
        self.heartbeat_timeout = float(info.get("heartbeat_timeout", self.heartbeat_timeout))
        self.max_message_size = int(info.get("max_message_size", 0))
        self.master_workers = int(info.get("workers", 0))
        self.log.info("registered with master %s at %s%s", master_id[:8], self.endpoint,
                      " (it restarted)" if restarted else "")
        self.welcomed.set()
        self.on_welcome(restarted)


def check_size(frames: list, limit: int, what: str) -> None:
    """Raise TooLarge if a frame exceeds the master's limit (it would drop our connection)."""
    if limit <= 0:
        return
    for frame in frames:
        size = memoryview(frame).nbytes
        if size > limit:
            raise TooLarge(f"{what} is {size} bytes, larger than the master's "
                           f"--max-message-size of {limit} bytes")
