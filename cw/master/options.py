"""``python -m cw.master``'s flags (each with a ``CW_*`` environment default) and main."""
from __future__ import annotations

import argparse
import os
import socket

from cw import cli
from cw import protocol as P
from cw.defaults import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
)
from cw.errors import CwError
from cw.master import elastic
from cw.master.daemon import Master
from cw.master.peers import MAX_FUNCTION_BYTES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cw-master", description=(
        "Route jobs FIFO from cw clients to idle cw workers and results back."))
    cli.add_flag(parser, "--host", default="*",
                 help="address to bind (all interfaces by default)")
    cli.add_flag(parser, "--port", default=P.DEFAULT_PORT, cast=int,
                 help="port to listen on; 0 picks a free one")
    cli.add_flag(parser, "--connection-file", default=None,
                 help="also record the master's address in this file "
                      "(one per master is always kept under $CW_HOME/masters, "
                      "CW_HOME defaulting to ~/.cw)")
    cli.add_flag(parser, "--heartbeat-interval", default=DEFAULT_HEARTBEAT_INTERVAL,
                 cast=float, help="seconds between heartbeats to and from peers")
    cli.add_flag(parser, "--heartbeat-timeout", default=DEFAULT_HEARTBEAT_TIMEOUT,
                 cast=float, help="seconds of silence after which a peer is dropped and a "
                                  "worker's running job re-queued")
    cli.add_flag(parser, "--max-message-size", default=DEFAULT_MAX_MESSAGE_SIZE, cast=int,
                 help="largest message frame accepted, in bytes; a peer sending more is "
                      "disconnected")
    cli.add_flag(parser, "--handshake-timeout", default=DEFAULT_HANDSHAKE_TIMEOUT, cast=float,
                 help="seconds a new connection gets to complete its CurveZMQ handshake "
                      "before it is closed (idle strangers cannot hold descriptors)")
    cli.add_flag(parser, "--max-function-bytes", default=MAX_FUNCTION_BYTES, cast=int,
                 help="bytes of pickled functions the master keeps per client; jobs of "
                      "functions past it fail with QuotaExceeded")
    cli.add_flag(parser, "--insecure", default=False, action="store_true",
                 help="plain TCP without CurveZMQ keys, for experiments; only with a "
                      "loopback --host")
    cli.add_flag(parser, "--no-local-socket", default=False, action="store_true",
                 help="do not offer peers on this machine a private Unix socket (they then "
                      "use TCP with CurveZMQ like everyone else)")
    cli.add_flag(parser, "--policy", default="fair", choices=("fair", "fifo"),
                 help="who gets the next idle worker: fair (each client with queued jobs "
                      "in turn, weighed by its share) or fifo (one queue for all clients, "
                      "in arrival order)")
    cli.add_flag(parser, "--dashboard", default=None, cast=int, metavar="PORT",
                 help="serve a read-only web dashboard on this port (0: any free port, "
                      "logged at start); off unless given")
    cli.add_flag(parser, "--dashboard-host", default="127.0.0.1",
                 help="address the dashboard binds; it has no authentication, so keep it "
                      "local and tunnel with ssh -L")
    cli.add_flag(parser, "--journal", default=None, metavar="PATH",
                 help="keep named batches (campaigns) in this journal directory, so they "
                      "outlive the master; without it they outlive their clients only")
    cli.add_flag(parser, "--journal-max-bytes", default=None, cast=int,
                 help="most bytes the journal may take on disk; durable submits past it "
                      "fail with JournalFull (nothing accepted is lost)")
    cli.add_logging_flags(parser)
    elastic.add_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.tune_malloc()
    cli.raise_fd_limit()
    cli.setup_logging(args.log_level, args.log_file, f"{socket.gethostname()}:{os.getpid()}")
    master = Master(args.host, args.port, args.heartbeat_interval, args.heartbeat_timeout,
                    args.connection_file, args.max_message_size, args.insecure,
                    local_socket=not args.no_local_socket,
                    dashboard_port=args.dashboard, dashboard_host=args.dashboard_host,
                    handshake_timeout=args.handshake_timeout,
                    max_function_bytes=args.max_function_bytes, policy=args.policy,
                    adapt=elastic.config_from(args),
                    journal=args.journal, journal_max_bytes=args.journal_max_bytes)
    master.bind()
    try:
        master.run(lambda endpoint: print(f"cw master listening on {endpoint}", flush=True))
    except CwError as exc:
        raise SystemExit(f"cw-master: {exc}") from None

