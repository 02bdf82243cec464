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
"""
from __future__ import annotations

import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Optional

import zmq

MAX_PATH = 100  # a Unix socket path must fit in sun_path (108 bytes on Linux)

log = logging.getLogger("cw.master")


def machine_id() -> str:
    """This machine's name plus its boot id: equal only for processes on one running kernel."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def private_dir() -> Optional[Path]:
    """The user's private directory for sockets, created if needed; None if it is unsafe."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "cw" if runtime and os.path.isdir(runtime) else \
        Path("/tmp") / f"cw-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError as exc:
        log.warning("no local socket: cannot create %s (%s)", base, exc)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        log.warning("no local socket: %s is not a directory private to this user", base)
        return None
    return base


def endpoint_for(bind_host: str, port: int) -> Optional[str]:
    """The ``ipc://`` endpoint a master bound to ``bind_host:port`` offers (None: none)."""
    if not zmq.has("ipc"):
        return None
    name = re.sub(r"[^A-Za-z0-9.-]", "_", bind_host or "all")
    path = socket_path(f"master-{name}-{port}.sock")
    return f"ipc://{path}" if path else None


def socket_path(name: str) -> Optional[str]:
    """The path of a socket called ``name`` in the private directory (None: none fits)."""
    folder = private_dir()
    if folder is None:
        return None
    path = str(folder / name)
    if len(path) > MAX_PATH:
        log.warning("no local socket: the path %s is too long for a Unix socket", path)
        return None
    return path


def usable(local: object) -> Optional[str]:
    """The endpoint recorded in a connection file's "local" entry, if it works from here."""
    if not isinstance(local, dict) or local.get("machine") != machine_id():
        return None
    endpoint = local.get("endpoint")
    return endpoint if isinstance(endpoint, str) and present(endpoint) else None


def present(endpoint: str) -> bool:
    """True if ``endpoint`` is an ``ipc://`` endpoint whose socket file is there."""
    if not endpoint.startswith("ipc://"):
        return False
    try:
        return stat.S_ISSOCK(os.stat(_path(endpoint)).st_mode)
    except OSError:
        return False


def remove(endpoint: Optional[str]) -> None:
    """Remove a closed master's socket file (zmq leaves it behind)."""
    if endpoint:
        try:
            os.unlink(_path(endpoint))
        except OSError:
            pass


def _path(endpoint: str) -> str:
    return endpoint[len("ipc://"):]
