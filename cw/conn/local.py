"""The same-machine path to a master: a Unix socket in a directory only its user can enter.

    master (binds tcp first, so host:port is its own)     client / worker / status
      tcp://host:port    CurveZMQ, for every machine        route_for(host, port):
      ipc://<rundir>/master-<host>-<port>.sock               connection file says "local":
           rundir: $XDG_RUNTIME_DIR/cw or /tmp/cw-<uid>,       same machine and the socket is
           mode 0700, owned by the user                        there -> ipc, no keys needed
      connection file: "local": {endpoint, machine}          else -> tcp with the keys

A Unix socket's peers are processes of this machine that can enter ``rundir``: the user
(and root), the same people who can read the connection file with the keys. So the local
path needs no encryption, and large arguments are not encrypted and decrypted on each hop.

That holds only while ``rundir`` is ours: a tmp cleaner may remove it while the master runs,
and another user may then create it and bind a socket at the master's (predictable) path.
So nothing trusts the directory by its name:

    before every connect (master socket, lane, inbox): ``trusted(path)``: the directory is a
      real directory (not a symlink) of this user with mode 0700, the socket is this user's,
      and the path lies directly inside that directory; else the peer uses TCP with keys
    after every connect: the process at the other end runs as this user (``SO_PEERCRED``;
      for zmq ipc, from the connected descriptor a socket monitor reports: ``PeerCheck``)
    rundir already taken by someone else at start: logged, and this process uses a fresh
      private directory (``mkdtemp``) instead; the paths it offers say where it is
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import stat
import struct
import tempfile
from pathlib import Path

import zmq
from zmq.utils.monitor import parse_monitor_message

MAX_PATH = 100  # a Unix socket path must fit in sun_path (108 bytes on Linux)

log = logging.getLogger(__name__)


def machine_id() -> str:
    """This machine's name plus its boot id: equal only for processes on one running kernel."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


_warned: set[str] = set()  # untrusted socket paths already logged
_fresh: Path | None = None  # this process's own private directory, if rundir was taken


def private_dir() -> Path | None:
    """The user's private directory for sockets, created if needed; if someone else holds
    it, a fresh private directory of this process (logged); None if neither can be had."""
    global _fresh
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "cw" if runtime and os.path.isdir(runtime) else \
        Path("/tmp") / f"cw-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        log.warning("cannot create %s (%s)", base, exc)
    if is_private(str(base)):
        return base
    if _fresh is not None and is_private(str(_fresh)):
        return _fresh
    try:
        _fresh = Path(tempfile.mkdtemp(prefix=f"cw-{os.getuid()}-", dir="/tmp"))
    except OSError as exc:
        log.warning("no local socket: %s is not a directory private to this user, and no "
                    "fresh one can be made (%s)", base, exc)
        return None
    atexit.register(_remove_fresh, _fresh)
    log.warning("%s is not a directory private to this user (another user or a symlink "
                "holds it); using %s for local sockets instead", base, _fresh)
    return _fresh


def _remove_fresh(folder: Path) -> None:
    try:
        folder.rmdir()  # only if empty: a socket in it may still be in use elsewhere
    except OSError:
        pass


def is_private(folder: str) -> bool:
    """True if ``folder`` is a real directory (not a symlink) of this user, mode 0700."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def trusted(path: str) -> bool:
    """True if ``path`` is a socket of this user directly inside a private directory of this
    user (``is_private``): only then may a peer connect to it without keys."""
    folder = os.path.dirname(path)
    if not os.path.isabs(path) or os.path.normpath(path) != path or not is_private(folder):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()


_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1]


def fd_peer_uid(fd: int) -> int | None:
    """``peer_uid`` of the connection on descriptor ``fd`` (None: not one any more)."""
    sock = _dup(fd)
    if sock is None:
        return None
    with sock:
        try:
            return peer_uid(sock) if sock.family == socket.AF_UNIX else None
        except OSError:
            return None


def _dup(fd: int) -> socket.socket | None:
    """A socket object on a copy of descriptor ``fd`` (None: it is no socket now)."""
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return None


class PeerCheck:
    """Checks who is at the other end of every connection a zmq socket makes to an ipc
    endpoint: a socket monitor reports each connected descriptor (EVENT_CONNECTED, or
    EVENT_ACCEPTED on a bound socket), and ``strangers()`` reads those reports and returns
    the uids of peers that are not this user.

    Call ``strangers()`` before handling what the socket received: a connection's event is
    reported before any message can arrive on it. ``ended`` says the connection is over
    (disconnected, or a connect failed): a socket that does not reconnect by itself must be
    replaced.
    """

    ENDS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED

    def __init__(self, sock: zmq.Socket, events: int = zmq.EVENT_CONNECTED | ENDS):
        self.sock = sock
        self.ended = False
        self.monitor = sock.get_monitor_socket(events)

    def strangers(self, shut: bool = False) -> list[int]:
        """Uids of new peers that are not this user; ``shut``: cut their connections."""
        found: list[int] = []
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return found
            uid = self.stranger(frames, shut)
            if uid is not None:
                found.append(uid)

    def stranger(self, frames: list, shut: bool = False) -> int | None:
        """The uid behind one monitor event if it is not this user (``shut``: cut it)."""
        event = parse_monitor_message([getattr(f, "bytes", f) for f in frames])
        if event["event"] & self.ENDS:
            self.ended = True
            return None
        fd = event["value"]
        uid = fd_peer_uid(fd)
        if uid is None or uid == os.getuid():
            return None
        if shut:
            _shut(fd)
        return uid

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


def _shut(fd: int) -> None:
    """Shut a connection down under zmq's feet: it sees the end and drops that peer."""
    sock = _dup(fd)
    if sock is not None:
        with sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def endpoint_for(bind_host: str, port: int) -> str | None:
    """The ``ipc://`` endpoint a master bound to ``bind_host:port`` offers (None: none)."""
    if not zmq.has("ipc"):
        return None
    name = re.sub(r"[^A-Za-z0-9.-]", "_", bind_host or "all")
    path = socket_path(f"master-{name}-{port}.sock")
    return f"ipc://{path}" if path else None


def socket_path(name: str) -> str | None:
    """The path of a socket called ``name`` in the private directory (None: none fits)."""
    folder = private_dir()
    if folder is None:
        return None
    path = str(folder / name)
    if len(path) > MAX_PATH:
        log.warning("no local socket: the path %s is too long for a Unix socket", path)
        return None
    return path


def usable(local: object) -> str | None:
    """The endpoint recorded in a connection file's "local" entry, if it works from here."""
    if not isinstance(local, dict) or local.get("machine") != machine_id():
        return None
    endpoint = local.get("endpoint")
    return endpoint if isinstance(endpoint, str) and present(endpoint) else None


def present(endpoint: str) -> bool:
    """True if ``endpoint`` is an ``ipc://`` endpoint whose socket is there and ours to
    use (``trusted``): a socket file someone else made must not take our messages."""
    if not endpoint.startswith("ipc://"):
        return False
    path = _path(endpoint)
    if trusted(path):
        return True
    folder = os.path.dirname(path)
    if (os.path.lexists(path) or (os.path.lexists(folder) and not is_private(folder))) \
            and path not in _warned:
        _warned.add(path)
        log.warning("not using the local socket %s: it or its directory is not this "
                    "user's own (a tmp cleaner removed it and someone else made it?); "
                    "using TCP with the keys", path)
    return False


def remove(endpoint: str | None) -> None:
    """Remove a closed master's socket file (zmq leaves it behind)."""
    if endpoint:
        try:
            os.unlink(_path(endpoint))
        except OSError:
            pass


def _path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]
