"""Ask the master for its state: one STATUS round trip on a socket of its own.

    status() --DEALER: [STATUS]--> master --[STATUS_REPLY, {...}]--> dict

``cw.status`` (the module users run and import) shows and documents the dict; this is the
round trip itself, for every role that needs it (launchers' waits, joblib's sizing).
"""
from __future__ import annotations

import uuid

import zmq

from cw import protocol as P
from cw.conn import address, security
from cw.errors import MasterUnreachable


def status(host: str | None = None, port: int | None = None,
           timeout: float = 5.0, insecure: bool = False) -> dict:
    """Ask the master for its state; raise MasterUnreachable if it does not answer in time
    (NoKeys, at once, if this user has no connection file with its keys; ``insecure``
    allows plain TCP to a loopback master started with --insecure)."""
    host, port = address.resolve(host, port)
    route = security.route_for(host, port, insecure=insecure)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"status-" + uuid.uuid4().bytes)
    try:
        security.secure_client(sock, route.keys)
        sock.connect(route.endpoint)
        sock.send(P.pack(P.STATUS))
        if not sock.poll(int(timeout * 1000)):
            raise MasterUnreachable(f"no cw master answered at {host}:{port} within "
                                    f"{timeout:g} s")
        header = P.unpack(sock.recv())
        if header[0] != P.STATUS_REPLY:
            raise MasterUnreachable(f"{host}:{port} answered with message kind {header[0]}")
        return header[1]
    finally:
        sock.close()
