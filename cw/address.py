"""Where the master is: explicit host/port, ``CW_MASTER``, connection files, or localhost.

    resolve(host, port)
      host given ............................ (host, port or 5494)   ("host:port" accepted too)
      else $CW_MASTER="host[:port]" ......... that
      else $CW_HOME/default.json ............ the address the launcher's master recorded
      else extra finders (SLURM's squeue) ... first answer
      else .................................. ("localhost", 5494)

A master writes a connection file (JSON, mode 0600) per master under ``$CW_HOME/masters/``
and, when told to, one more at a given path (launchers use ``$CW_HOME/default.json``).
``CW_HOME`` defaults to ``~/.cw``, which on clusters is the shared home directory.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional

from .protocol import DEFAULT_PORT

def _slurm_finder() -> Optional[str]:
    """The master of this user's running ``cmaster`` SLURM job, if any (no waiting)."""
    if not shutil.which("squeue"):
        return None
    from . import slurm
    return slurm.master_address()


# finders tried when nothing explicit names the master
FINDERS: list[Callable[[], Optional[str]]] = [_slurm_finder]


def cw_home() -> Path:
    """The per-user folder for connection and state files (``$CW_HOME``, else ``~/.cw``)."""
    return Path(os.environ.get("CW_HOME") or "~/.cw").expanduser()


def default_connection_file() -> Path:
    """The connection file a launcher's master writes and ``host=None`` clients read."""
    return cw_home() / "default.json"


def master_connection_file(host: str, port: int) -> Path:
    """The per-master connection file (one per host and port, so masters never clash)."""
    return cw_home() / "masters" / f"{host}-{port}.json"


def parse_address(text: str, port: Optional[int] = None) -> tuple[str, int]:
    """Split ``"host[:port]"``; an explicit ``port`` argument wins over none in the text."""
    text = text.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    if text.count(":") == 1:
        host, _, p = text.partition(":")
        return host or "localhost", int(p) if port is None else port
    return text or "localhost", DEFAULT_PORT if port is None else port


def resolve(host: Optional[str] = None, port: Optional[int] = None) -> tuple[str, int]:
    """Find the master's ``(host, port)`` as the module docstring describes."""
    if host:
        return parse_address(host, port)
    env = os.environ.get("CW_MASTER")
    if env:
        return parse_address(env, port)
    info = read_connection_file(default_connection_file())
    if info:
        return info["host"], int(port or info["port"])
    for finder in FINDERS:
        found = finder()
        if found:
            return parse_address(found, port)
    return "localhost", port or DEFAULT_PORT


def read_connection_file(path: os.PathLike | str) -> Optional[dict]:
    """Read a connection file; None if it is missing or unreadable."""
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "host" in info and "port" in info else None


def write_connection_file(path: os.PathLike | str, info: dict) -> Path:
    """Write ``info`` as JSON to ``path`` atomically, readable by the user only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)
    return path


def reachable_hostname(bind: str) -> str:
    """The name peers should dial for a master bound to ``bind``."""
    if bind in ("", "*", "0.0.0.0", "::"):
        return socket.gethostname()
    return bind
