"""CurveZMQ keys and connection files: only peers holding the master's keys get in.

    master start                                  client / worker (same user)
      keys = keys left by a killed master on       keys_for(host, port): scan the
             this address, else new ones          connection files under $CW_HOME for
      write $CW_HOME/masters/<host>-<port>.json   this port (and host), read the keys
            (mode 0600: address + keys)    --->    DEALER: curve_serverkey + client keys
      ROUTER: curve_server                          |
      ZAP (zmq.auth thread): allow only the  <------' handshake; a peer without the keys
            cluster's client public key                 is refused before any of its bytes
      monitor: log refused handshakes                   reach a decoder

The keys live in files only the user can read, on the (usually shared) home directory, so
every process of that user on the cluster can join and nobody else can. ``route_for``
prefers the master's private Unix socket when it runs on this machine (see ``cw.local``).
``--insecure`` runs plain TCP for experiments on loopback, with a warning.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import NamedTuple, Optional

import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import address, local

KEY_FIELDS = ("server_public", "server_secret", "client_public", "client_secret")


def new_keys() -> dict:
    """A fresh server key pair and a fresh shared client key pair (z85 text)."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {"server_public": server_public.decode(), "server_secret": server_secret.decode(),
            "client_public": client_public.decode(), "client_secret": client_secret.decode()}


def has_keys(info: Optional[dict]) -> bool:
    return bool(info) and all(isinstance(info.get(k), str) for k in KEY_FIELDS)


def secure_server(sock: zmq.Socket, keys: dict) -> None:
    """Make a bound socket a CURVE server (call before bind)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys["server_secret"].encode())
    sock.setsockopt(zmq.ZAP_DOMAIN, b"cw")


def secure_client(sock: zmq.Socket, keys: Optional[dict]) -> None:
    """Give a connecting socket the cluster's client keys (call before connect)."""
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys["server_public"].encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys["client_public"].encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys["client_secret"].encode())


class _OnlyOurClients:
    """ZAP credentials provider: the one client public key of this cluster."""

    def __init__(self, client_public: str, log: logging.Logger):
        self.client_public = client_public.encode()
        self.log = log

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.client_public:
            return True
        self.log.warning("refused a peer with an unknown CURVE key %s", key[:8].decode())
        return False


def start_authenticator(ctx: zmq.Context, keys: dict, log: logging.Logger) -> ThreadAuthenticator:
    """Run the ZAP handler that admits only holders of the cluster's client key."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("cw.master.zap"))
    auth.start()
    auth.configure_curve_callback(domain="cw", credentials_provider=_OnlyOurClients(
        keys["client_public"], log))
    return auth


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def describe_event(event: dict) -> str:
    """A log line for a socket-monitor event of a refused handshake."""
    names = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol: wrong or no keys)",
             zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed (unknown key)"}
    return f"refused a connection: {names.get(event['event'], event['event'])}"


class Route(NamedTuple):
    """How to reach a master: the endpoint to dial and the keys to dial it with."""

    endpoint: str
    keys: Optional[dict]
    known: bool  # a connection file for this master was found


def route_for(host: str, port: int, allow_local: bool = True) -> Route:
    """The local socket if the master offers one this process can use, else TCP with keys."""
    info = connection_info(host, port)
    local_endpoint = local.usable(info.get("local")) if info and allow_local else None
    if local_endpoint:
        return Route(local_endpoint, None, True)
    return Route(f"tcp://{host}:{port}", _keys(info), info is not None)


def keys_for(host: str, port: int) -> Optional[dict]:
    """The keys of the master at ``host:port``, from the user's connection files, if any."""
    return _keys(connection_info(host, port))


def _keys(info: Optional[dict]) -> Optional[dict]:
    return {k: info[k] for k in KEY_FIELDS} if has_keys(info) else None


def connection_info(host: str, port: int) -> Optional[dict]:
    """The connection file of the master at ``host:port`` that this user can see, if any.

    Files for the same port are candidates; one whose recorded host is ``host``, or
    resolves to the same address, wins; else the only candidate. None if there is none
    (a master whose files this machine cannot see).
    """
    home = address.cw_home()
    candidates = [address.default_connection_file(), *sorted((home / "masters").glob("*.json"))]
    matches = []
    for path in candidates:
        info = address.read_connection_file(path)
        if info and int(info.get("port", -1)) == int(port):
            matches.append(info)
    for info in matches:
        if _same_host(info["host"], host):
            return info
    return matches[0] if len(matches) == 1 else None


def master_keys(path: Path) -> dict:
    """Keys for a master about to write ``path``: those a killed master left, else new.

    Reusing them lets clients and workers that hold the old file reconnect to a master
    restarted on the same address.
    """
    info = address.read_connection_file(path)
    if has_keys(info):
        return {k: info[k] for k in KEY_FIELDS}
    return new_keys()


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return _addresses(a) & _addresses(b) != set() or (_is_local(a) and _is_local(b))
    except OSError:
        return False


def _addresses(host: str) -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo(host, None)}


def _is_local(host: str) -> bool:
    return host in ("localhost", socket.gethostname()) or any(
        a.startswith("127.") or a == "::1" for a in _addresses(host))
