"""``python -m cw.master``: the routing daemon.

    peers on other machines (DEALER) --tcp, CurveZMQ--> ROUTER --.
    peers on this machine --ipc, a private Unix socket--> ROUTER --+--> Master.on_message
                                   (cw.conn.local)                        | parse, check role
                                                                 v
                          PeriodicCallback(tick) ----------> Scheduler (all routing state)
                          heartbeats out, silent peers out       | flush() after every batch
                                                                 v
                                  the ROUTER each peer said HELLO on --> peers

One process, one tornado IOLoop, one thread: the Scheduler has exactly one owner.
A message that does not parse is logged and dropped; the master never dies of its input.

A peer that dies is known without waiting for its heartbeats: a socket monitor on each
ROUTER reports every closed connection (EVENT_DISCONNECTED, by file descriptor), and each
peer's descriptor is learnt from its HELLO (the message's SRCFD). A peer whose connection
closed and that has not reconnected (zmq redials at once) within a grace is gone. The node's
supervisor says how a worker process died (DIED) before that, for WorkerLost to name it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import zmq
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from cw import cli
from cw import protocol as P
from cw.conn import address, local, security
from cw.conn.zloop import SocketLoop
from cw.defaults import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
)
from cw.errors import ProtocolError
from cw.master import dispatch, elastic
from cw.master.batches import Batches
from cw.master.connections import Connections, router
from cw.master.peers import MAX_FUNCTION_BYTES
from cw.master.scheduler import Scheduler
from cw.master.throughput import SAMPLE_INTERVAL, Throughput

log = logging.getLogger(__name__)



class Master:
    """The master daemon: binds, routes until stopped, removes its connection files."""

    def __init__(self, host: str = "*", port: int = P.DEFAULT_PORT,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 connection_file: str | None = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 insecure: bool = False, local_socket: bool = True,
                 dashboard_port: int | None = None, dashboard_host: str = "127.0.0.1",
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_function_bytes: int = MAX_FUNCTION_BYTES, policy: str = "fair",
                 adapt: elastic.Config | None = None,
                 journal: str | None = None, journal_max_bytes: int | None = None):
        self.bind_host = host
        self.handshake_timeout = handshake_timeout
        self.refusals = cli.Throttled(log)
        self.port = port
        self.heartbeat_interval = heartbeat_interval
        self.extra_connection_file = connection_file
        self.max_message_size = max_message_size
        self.insecure = insecure
        self.local_socket = local_socket
        self.local_endpoint: str | None = None
        self.local_sock: zmq.Socket | None = None
        self.local_check: local.PeerCheck | None = None
        self.routes: dict[bytes, zmq.Socket] = {}  # peer -> the socket it registered on
        self.keys: dict | None = None
        self.auth: ThreadAuthenticator | None = None
        self.scheduler = Scheduler(self._send, heartbeat_timeout, lanes=local_socket,
                               max_function_bytes=max_function_bytes, policy=policy)
        # --adapt: SLURM worker jobs that come and go with the work (cw.master.elastic)
        self.elastic = elastic.Elastic(self.scheduler, adapt) if adapt else None
        self.batches = Batches(self, journal, journal_max_bytes)  # named batches
        self.conns = Connections(self.scheduler, self._send, self._changed)
        self.monitors = self.conns.monitors  # each ROUTER's connection events, and handlers
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.loop: IOLoop | None = None
        self.dashboard_port = dashboard_port  # None: no dashboard; 0: any free port
        self.dashboard_host = dashboard_host
        self.dashboard: HTTPServer | None = None
        self.throughput = Throughput()
        self.files: list[Path] = []
        self.welcome_info = {"heartbeat_interval": heartbeat_interval,
                             "heartbeat_timeout": heartbeat_timeout,
                             "max_message_size": max_message_size}

    # ---------------------------------------------------------------- life cycle
    def bind(self) -> str:
        """Bind the ROUTER sockets; return the ``tcp://host:port`` peers should dial.

        TCP first: once it is bound, host and port are ours, and so is the local socket
        named after them.
        """
        sock = self._router()
        host = "*" if self.bind_host in ("", "0.0.0.0", "*") else self.bind_host
        reachable = address.reachable_hostname(self.bind_host)
        self._secure(sock, reachable)
        sock.bind(f"tcp://{host}:{self.port or '*'}")
        self.port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.sock = sock
        self.monitors.append((sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | (security.HANDSHAKE_FAILURES if self.keys else 0)),
            self._on_monitor))
        self.address = f"{reachable}:{self.port}"
        if self.local_socket:
            self._bind_local()
        self._write_connection_files()
        return f"tcp://{self.address}"

    def _router(self) -> zmq.Socket:
        return router(self.ctx, self.max_message_size, self.handshake_timeout)

    def _bind_local(self) -> None:
        """The same-machine socket (see cw.conn.local): no keys, its directory is private."""
        endpoint = local.endpoint_for(self.bind_host, self.port)
        if endpoint is None:
            return
        sock = self._router()
        check = local.PeerCheck(sock, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            log.warning("no local socket: cannot bind %s (%s)", endpoint, exc)
            check.close()
            sock.close(linger=0)
            return
        self.local_sock, self.local_endpoint, self.local_check = sock, endpoint, check
        self.monitors.append((check.monitor, self._on_local_monitor))

    def _on_local_monitor(self, frames: list) -> None:
        """A connection to the local socket: cut it off unless it is this user's; one that
        closed may be a peer gone."""
        event = parse_monitor_message([f.bytes for f in frames])
        if event["event"] == zmq.EVENT_DISCONNECTED:
            return self.conns.closed(int(event["value"]))
        assert self.local_check is not None  # it watches the local socket
        uid = self.local_check.stranger(frames, shut=True)
        if uid is not None:
            log.warning("cut off a connection from uid %d to the local socket", uid)

    def _secure(self, sock: zmq.Socket, reachable: str) -> None:
        """CURVE keys and the ZAP handler, or a loud warning with --insecure."""
        if self.insecure:
            if not security.is_loopback(self.bind_host):
                raise SystemExit("cw-master: --insecure is only allowed when bound to loopback "
                                 "(--host 127.0.0.1): anyone reaching the port could run code")
            log.warning("running WITHOUT authentication or encryption (--insecure): any "
                        "local user can submit code to this master")
            return
        self.keys, source = security.master_keys(reachable, self.port) if self.port else \
            (security.new_keys(), "new keys")
        log.log(logging.WARNING if "leaked" in source else logging.INFO, "CurveZMQ with %s",
                source)
        self.auth = security.start_authenticator(self.ctx, self.keys, cli.Throttled(log))
        security.secure_server(sock, self.keys)

    def _on_monitor(self, frames: list) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.conns.closed(int(event["value"]))
        else:
            self.refusals.warning("%s", security.describe_event(event))

    def died(self, supervisor, pid: int, code: int, lived: float) -> None:
        """A supervisor's DIED, once the dead worker's last messages had time to come."""
        if supervisor.ident in self.scheduler.supervisors:
            self.scheduler.died(supervisor, pid, code, lived)
            self._changed()

    def _changed(self) -> None:
        """After a change outside a message batch: flush, then look for messages again."""
        self.scheduler.flush()
        for reader in self.readers:
            reader.kick()

    def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Route until ``stop()`` (or SIGINT/SIGTERM); blocks the calling thread.

        ``ready(endpoint)`` is called once the socket is bound and the signal handlers are in
        place, so a caller that waits for it can stop the master cleanly right away.
        """
        if self.sock is None:
            self.bind()
        self.loop = IOLoop.current()
        aio = asyncio.get_event_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                aio.add_signal_handler(sig, self.stop, sig)
            except (ValueError, RuntimeError):  # not the main thread
                pass
        self.readers = [SocketLoop(self.loop, sock, partial(self.on_message, sock=sock),
                                   self.scheduler.flush)
                        for sock in (self.sock, self.local_sock) if sock is not None]
        self.batches.open(self.loop)  # the journal: its batches' pending jobs queue again
        self.monitor_readers = [SocketLoop(self.loop, monitor, handle, lambda: None)
                                for monitor, handle in self.monitors]
        ticker = PeriodicCallback(self.tick, self.heartbeat_interval * 1000)
        ticker.start()
        self.sample()
        sampler = PeriodicCallback(self.sample, SAMPLE_INTERVAL * 1000)
        sampler.start()
        if self.elastic is not None:
            self.loop.add_callback(self.elastic.start)
        log.info("master %s listening on tcp://%s%s", self.scheduler.master_id[:8], self.address,
                 f" and {self.local_endpoint}" if self.local_endpoint else "")
        try:
            if self.dashboard_port is not None:
                from cw.master.dashboard import start_dashboard
                self.dashboard = start_dashboard(self, self.dashboard_port, self.dashboard_host)
            if ready is not None:
                ready(f"tcp://{self.address}")
            self.loop.start()
        finally:
            ticker.stop()
            sampler.stop()
            if self.dashboard is not None:
                self.dashboard.stop()
            if self.elastic is not None:
                self.elastic.close()
            self.close()

    def stop(self, sig: int | None = None) -> None:
        """Stop routing (thread-safe)."""
        if sig is not None:
            log.info("received %s, shutting down", signal.Signals(sig).name)
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)

    def close(self) -> None:
        for path in self.files:
            info = address.read_connection_file(path)
            if info and info.get("master_id") == self.scheduler.master_id:
                path.unlink(missing_ok=True)
        if self.sock is not None:
            for reader in [*self.readers, *getattr(self, "monitor_readers", ())]:
                reader.close()
            for sock in (self.sock, self.local_sock):
                if sock is not None:
                    sock.disable_monitor()
            for monitor, _ in self.monitors:
                monitor.close(linger=0)
            if self.local_sock is not None:
                self.local_sock.close(linger=0)
                local.remove(self.local_endpoint)
            self.sock.close(linger=0)
        self.batches.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        log.info("master stopped after routing %d results", self.scheduler.routed)

    def _write_connection_files(self) -> None:
        """One file per role (cw.conn.security.write_master_files)."""
        info = {"host": self.address.rsplit(":", 1)[0], "port": self.port, "pid": os.getpid(),
                "master_id": self.scheduler.master_id, "started": time.time(),
                "insecure": self.insecure}
        if self.local_endpoint:
            info["local"] = {"endpoint": self.local_endpoint, "machine": local.machine_id()}
        self.files += security.write_master_files(info, self.keys, self.extra_connection_file)

    # ---------------------------------------------------------------- traffic
    def _send(self, ident: bytes, frames: list,
              sock: zmq.Socket | None = None) -> bool | None:
        """Send to a peer: on ``sock``, else on the socket it registered on. True: sent;
        None: its queue is full (it does not read), send again later; False: it is gone."""
        target = sock or self.routes.get(ident, self.sock)
        assert target is not None  # bound before any peer could talk
        try:
            target.send_multipart([ident, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone
            log.debug("cannot send to %s: %s", ident.hex()[:8], exc)
            return False

    def sample(self) -> None:
        """Record the routed count for the throughput figures."""
        sched = self.scheduler
        self.throughput.add(time.time(), time.monotonic(), sched.routed, sched.queued)

    def status(self) -> dict:
        """The state snapshot a status request gets: ``Scheduler.status`` plus throughput."""
        mono = time.monotonic()
        info = self.scheduler.status(mono)
        info["time"] = time.time()
        info["throughput_last_minute"] = round(self.throughput.rate(mono, info["routed"]), 3)
        if self.elastic is not None:
            info["adapt"] = self.elastic.status()
        info["batches"] = self.batches.rows()
        info["journal"] = self.batches.path  # None: batches do not outlive this master
        return info

    def tick(self) -> None:
        """Heartbeat every peer, drop the silent ones, flush what that changed."""
        sched = self.scheduler
        sched.tick(time.monotonic())
        beat = P.pack(P.HEARTBEAT, len(sched.workers))
        for ident in [*sched.workers, *sched.clients, *sched.supervisors]:
            self._send(ident, [beat])
        for ident in [i for i in self.routes if sched.peer(i) is None]:
            del self.routes[ident]
        self.conns.forget_gone()
        self._changed()

    def on_message(self, frames: list, sock: zmq.Socket) -> None:
        """Handle one message that came in on ``sock``; log and drop anything malformed."""
        ident = frames[0].bytes
        try:
            if len(frames) < 2:
                raise ProtocolError("message without header")
            header = P.unpack(frames[1])
            self._handle(ident, header, frames[2:], sock, frames[1])
        except (ProtocolError, ValueError, TypeError, KeyError, IndexError) as exc:
            log.warning("dropped a bad message from %s: %s", self._name(ident), exc)

    def _handle(self, ident: bytes, header: list, frames: list, sock: zmq.Socket,
                head: zmq.Frame) -> None:
        kind = header[0]
        sched = self.scheduler
        if kind == P.HELLO:
            return self._hello(ident, header, sock, head,
                               security.role_of(head, self.keys) if sock is self.sock else None)
        if kind == P.STATUS:
            self._send(ident, [P.pack(P.STATUS_REPLY, self.status())], sock)
            return
        peer = sched.peer(ident)
        if peer is None:
            # an unknown alias (send-only) is never answered: its peer's main socket
            # heartbeats, gets the WHO there, and re-registers
            if kind != P.BYE and not P.is_alias(ident):
                self._send(ident, [P.pack(P.WHO)], sock)
            return
        now = time.monotonic()
        peer.last_seen = now
        if self.conns.unbound and ident in self.conns.unbound:
            self.conns.bind(ident, head)
            log.info("%s talks on its new connection", peer.name)
        if kind == P.HEARTBEAT:
            return
        dispatch.route(self, peer, kind, header, frames, now)

    def _hello(self, ident: bytes, header: list, sock: zmq.Socket, head: zmq.Frame,
               key_role: str | None) -> None:
        """Register a peer. Over TCP its role is the one of the key it presented (ZAP):
        a client key never registers a worker, nor a worker key a client (a node's
        supervisor holds the workers' key). On the local socket (and with --insecure) the
        role is what the peer says."""
        if len(header) != 4 or not isinstance(header[3], dict):
            raise ProtocolError("HELLO must be [HELLO, version, role, info]")
        _, version, role, info = header
        try:
            P.check_hello(version, role, info, key_role, security.KEY_ROLE)
        except ProtocolError as exc:
            log.warning("refused %s %s from %s: %s", str(role)[:32], str(info.get("name"))[:64],
                        str(info.get("host"))[:64], exc)
            self._send(ident, [P.pack(P.REFUSE, str(exc))], sock)
            return
        self.routes[ident] = sock
        self.scheduler.hello(ident, role, info, time.monotonic())
        if not P.is_alias(ident):  # an alias's close is not its peer's
            self.conns.bind(ident, head)
        self._send(ident, [P.pack(P.WELCOME, P.VERSION, self.scheduler.master_id,
                                  {**self.welcome_info, "workers": len(self.scheduler.workers)})])

    def _name(self, ident: bytes) -> str:
        peer = self.scheduler.peer(ident)
        return peer.name if peer else f"unknown peer {ident.hex()[:8]}"
