"""CurveZMQ keys and connection files: only peers holding the master's keys get in.

    master start                                  client / worker (same user)
      keys = those a killed master left in         route_for(host, port, role): scan the
             $CW_HOME/secrets/ for this address     connection files of its role for this
             (new ones if any file was readable     port (and host), refuse one others can
             by others), else new ones              read, use its keys; none: NoKeys, never
      write masters/<host>-<port>.json  ------>     plain TCP (unless told insecure=True,
            (clients: server public key +           and then only to a loopback master)
             the clients' key pair)
            workers/<host>-<port>.json  ------>   DEALER: curve_serverkey + its role's keys
            (workers: ... the workers' pair)        |
            secrets/<host>-<port>.json (only the    |
             master reads it: its secret key)       |
      ROUTER: curve_server                          |
      ZAP (zmq.auth thread): allow only the  <------' handshake; a peer without the keys
            clients' and the workers' public          is refused before any of its bytes
            keys; User-Id = the key, so HELLO         reach a decoder
            can check the role it claims
      monitor: log refused handshakes

Every file is 0600 in folders of mode 0700, on the (usually shared) home directory, so every
process of that user on the cluster can join and nobody else can. A client file lets its
holder be a client, not a worker, and never lets it pose as the master. ``route_for``
prefers the master's private Unix socket when it runs on this machine (see ``cw.conn.local``);
there any process of the user is trusted in any role. ``--insecure`` runs plain TCP for
experiments on loopback, with a warning.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import zmq
from zmq.auth.thread import ThreadAuthenticator

from cw import cli
from cw.conn import address, local
from cw.errors import NoKeys, SecurityError

ROLE_KEYS = {"client": ("client_public", "client_secret"),
             "worker": ("worker_public", "worker_secret")}
KEY_FIELDS = ("server_public", "server_secret", "client_public", "client_secret",
              "worker_public", "worker_secret")
PEER_FIELDS = {role: ("server_public", *pair) for role, pair in ROLE_KEYS.items()}
FOLDERS = {"client": "masters", "worker": "workers"}
KEY_ROLE = {"supervisor": "worker"}  # roles that hold another role's keys (a node's
#                                      supervisor reports its workers' deaths)

log = logging.getLogger(__name__)


def new_keys() -> dict:
    """A fresh server key pair, a clients' and a workers' key pair (z85 text)."""
    keys = {}
    for name in ("server", "client", "worker"):
        public, secret = zmq.curve_keypair()
        keys[f"{name}_public"], keys[f"{name}_secret"] = public.decode(), secret.decode()
    return keys


def has_keys(info: dict | None, fields=KEY_FIELDS) -> TypeGuard[dict]:
    if not info:
        return False
    return all(isinstance(info.get(k), str) for k in fields)


def peer_keys(keys: dict, role: str) -> dict:
    """What a ``role`` ("client" or "worker") connection file holds of the master's keys."""
    return {k: keys[k] for k in PEER_FIELDS[role]}


def secure_server(sock: zmq.Socket, keys: dict) -> None:
    """Make a bound socket a CURVE server (call before bind)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys["server_secret"].encode())
    sock.setsockopt(zmq.ZAP_DOMAIN, b"cw")


def secure_client(sock: zmq.Socket, keys: dict | None) -> None:
    """Give a connecting socket its role's keys (call before connect; None: plain)."""
    if keys is None:
        return
    public, secret = next(pair for pair in ROLE_KEYS.values() if pair[0] in keys)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys["server_public"].encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys[public].encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys[secret].encode())


class _OnlyOurClients:
    """ZAP credentials provider: the clients' and the workers' public keys of this master."""

    def __init__(self, keys: dict, log: logging.Logger | cli.Throttled):
        self.allowed = {keys[pair[0]].encode() for pair in ROLE_KEYS.values()}
        self.log = log

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.log.warning("refused a peer with an unknown CURVE key %s", key[:8].decode())
        return False


def start_authenticator(ctx: zmq.Context, keys: dict,
                        log: logging.Logger | cli.Throttled) -> ThreadAuthenticator:
    """Run the ZAP handler that admits only holders of a client or a worker key."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve_callback(domain="cw", credentials_provider=_OnlyOurClients(keys, log))
    return auth


def role_of(frame: zmq.Frame, keys: dict | None) -> str | None:
    """The role whose key the sender of ``frame`` presented (ZAP's User-Id is the z85
    public key); None if it came in without CURVE (the local socket, --insecure)."""
    if keys is None:
        return None
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    for role, (public, _) in ROLE_KEYS.items():
        if user == keys[public]:
            return role
    return "?"


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def describe_event(event: Mapping[str, Any]) -> str:
    """A log line for a socket-monitor event of a refused handshake."""
    names = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol: wrong or no keys)",
             zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed (unknown key)"}
    return f"refused a connection: {names.get(event['event'], event['event'])}"


class Route(NamedTuple):
    """How to reach a master: the endpoint to dial and the keys to dial it with."""

    endpoint: str
    keys: dict | None
    known: bool  # a connection file for this master was found


def route_for(host: str, port: int, allow_local: bool = True, role: str = "client",
              insecure: bool = False) -> Route:
    """The local socket if the master offers one this process can use, else TCP with the
    keys of ``role`` ("client", also for status, or "worker").

    Raise NoKeys if this user has no connection file with those keys (plain TCP only with
    ``insecure``, to a loopback master), SecurityError if the file is readable by others.
    """
    role = KEY_ROLE.get(role, role)
    if insecure and not is_loopback(host):
        raise SecurityError(f"insecure: plain TCP only reaches a master on loopback, not "
                            f"{host}:{port} (anyone on the way could run code as you)")
    info = connection_info(host, port, role)
    local_endpoint = local.usable(info.get("local")) if info and allow_local else None
    if local_endpoint:
        return Route(local_endpoint, None, True)
    keys = _keys(info, role)
    if keys is None and not insecure:
        raise _no_keys(host, port, role, info)
    if keys is None:
        log.warning(
            "talking to %s:%d over plain TCP without keys (insecure): any local user "
            "listening there could run code as you", host, port)
    return Route(f"tcp://{host}:{port}", keys, info is not None)


def keys_for(host: str, port: int, role: str = "client") -> dict | None:
    """The ``role`` keys of the master at ``host:port``, from this user's connection files."""
    return _keys(connection_info(host, port, role), role)


def _keys(info: dict | None, role: str) -> dict | None:
    fields = PEER_FIELDS[role]
    return {k: info[k] for k in fields} if has_keys(info, fields) else None


def _no_keys(host: str, port: int, role: str, info: dict | None) -> NoKeys:
    path = address.master_connection_file(host, port, FOLDERS[role])
    if info is not None and info.get("insecure"):
        why = (f"the master at {host}:{port} runs --insecure (no keys): pass insecure=True "
               f"(--insecure) to talk plain TCP to it on loopback")
    else:
        why = (f"no {role} connection file for the master at {host}:{port}: looked for "
               f"{path} (or any file in {path.parent} for port {port}). Point this process "
               f"where the master wrote its files (set CW_HOME to the master's, which "
               f"defaults to ~/.cw), or name the right master (host=/port=, CW_MASTER). cw "
               f"never talks to a master whose keys it does not have")
    return NoKeys(why, str(path))


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def connection_info(host: str, port: int, role: str = "client") -> dict | None:
    """The ``role`` connection file of the master at ``host:port`` this user can see.

    Files for the same port are candidates; one whose recorded host is ``host``, or
    resolves to the same address, wins; else the only candidate. None if there is none
    (a master whose files this machine cannot see). A candidate that others can read
    raises SecurityError (see ``address.check_private``).
    """
    home = address.cw_home()
    extra = [address.default_connection_file()] if role == "client" else []
    candidates = [*extra, *sorted((home / FOLDERS[role]).glob("*.json"))]
    matches = []
    for path in candidates:
        info = address.read_connection_file(path)
        if info and _port(info) == int(port):
            if has_keys(info, PEER_FIELDS[role]):
                address.check_private(path)
            matches.append(info)
    for info in matches:
        if _same_host(str(info["host"]), host):
            return info
    return matches[0] if len(matches) == 1 else None


def _port(info: dict) -> int:
    try:
        return int(info.get("port", -1))
    except (TypeError, ValueError):
        return -1


def master_keys(host: str, port: int) -> tuple[dict, str]:
    """Keys for a master about to write its files: those a killed master left, else new;
    with a reason for the log.

    Reusing them lets clients and workers that hold the old files reconnect to a master
    restarted on the same address. Keys that may have leaked (a file of the address
    readable or writable by others) are rotated.
    """
    secret = address.master_connection_file(host, port, "secrets")
    info = address.read_connection_file(secret)
    if not has_keys(info):
        return new_keys(), "new keys"
    paths = [secret, *(address.master_connection_file(host, port, f)
                       for f in FOLDERS.values())]
    leaky = [str(p) for p in paths if address.exposed(p)]
    if leaky:
        return new_keys(), f"new keys: the old ones may have leaked ({', '.join(leaky)} " \
                           f"readable by others)"
    return {k: info[k] for k in KEY_FIELDS}, f"the keys of {secret}"


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


def write_master_files(info: dict, keys: dict | None, extra: str | None = None) -> list[Path]:
    """A master's connection files, one per role (see cw.conn.address): clients never see
    its secret key nor the workers' keys. ``extra``: one more client file (a launcher's).
    Returns the files written; one that cannot be written is logged and skipped."""
    host, port = info["host"], info["port"]
    keys = keys or {}
    client = {**info, **(peer_keys(keys, "client") if keys else {})}
    files = [(address.master_connection_file(host, port), client),
             (address.master_connection_file(host, port, "workers"),
              {**info, **(peer_keys(keys, "worker") if keys else {})})]
    if keys:
        files.append((address.master_connection_file(host, port, "secrets"), {**info, **keys}))
    if extra:
        files.append((Path(extra).expanduser(), client))
    written = []
    for path, content in files:
        try:
            written.append(address.write_connection_file(path, content))
        except OSError as exc:
            log.warning("cannot write connection file %s: %s", path, exc)
    return written

