"""Where the master is: explicit host/port, ``CW_MASTER``, connection files, or localhost.

    resolve(host, port)
      host given ............................ (host, port or 5494)   ("host:port" accepted too)
      else $CW_MASTER="host[:port]" ......... that
      else $CW_HOME/default.json ............ the address the launcher's master recorded
      else extra finders (SLURM's squeue) ... first answer
      else .................................. ("localhost", 5494)

A master writes, per master (``<host>-<port>.json``, JSON, mode 0600, in folders of mode 0700):

    $CW_HOME/masters/   what clients (and status) read: address, the master's public key,
                        the clients' key pair
    $CW_HOME/workers/   what workers read: the same with the workers' key pair
    $CW_HOME/secrets/   what only the master reads: its secret key (and the key pairs, so
                        a restarted master can write the same files again)

and, when told to, one more client file at a given path (launchers use
``$CW_HOME/default.json``). ``CW_HOME`` defaults to ``~/.cw``, which on clusters is the
shared home directory. Every folder and file cw creates there is private to the user.
"""
from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from cw.errors import SecurityError
from cw.protocol import DEFAULT_PORT

Finder = Callable[[], "str | None"]

# finders tried when nothing explicit names the master; a launcher adds its own
# (cw.launch adds SLURM's), so this module never imports one
FINDERS: list[Finder] = []


def add_finder(finder: Finder) -> None:
    """Try ``finder()`` (an address or None) when nothing explicit names the master."""
    if finder not in FINDERS:
        FINDERS.append(finder)


def cw_home() -> Path:
    """The per-user folder for connection and state files (``$CW_HOME``, else ``~/.cw``)."""
    return Path(os.environ.get("CW_HOME") or "~/.cw").expanduser()


def default_connection_file() -> Path:
    """The connection file a launcher's master writes and ``host=None`` clients read."""
    return cw_home() / "default.json"


def master_connection_file(host: str, port: int, folder: str = "masters") -> Path:
    """The per-master connection file (one per host and port, so masters never clash):
    ``folder`` "masters" for clients, "workers" for workers, "secrets" for the master."""
    return cw_home() / folder / f"{host}-{port}.json"


def private_mkdir(path: os.PathLike | str) -> Path:
    """Create ``path`` and every missing folder above it with mode 0700 (``mkdir -p``
    gives the mode to the last folder only)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
    return path


def open_private(path: os.PathLike | str, mode: str = "ab"):
    """Open a file for writing, created with mode 0600 (its folders 0700) whatever the
    umask: for logs and state files, which may hold tokens, keys or paths."""
    path = Path(path)
    private_mkdir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


def exposed(path: os.PathLike | str) -> os.stat_result | None:
    """The file's status if others may read or write it (group or other bits, or not ours);
    None if it is private or missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if st.st_mode & 0o077 or st.st_uid != os.getuid() else None


def check_private(path: os.PathLike | str) -> None:
    """Refuse, like ssh with a private key, a file with keys that others can read."""
    st = exposed(path)
    if st is not None:
        owner = "" if st.st_uid == os.getuid() else f", owned by uid {st.st_uid}, not us"
        raise SecurityError(
            f"the connection file {path} holds keys but is readable or writable by others "
            f"(mode {stat.filemode(st.st_mode)}{owner}); cw will not use it. Fix it with "
            f"`chmod 600 {path}`, or restart the master, which writes new keys")


def parse_address(text: str, port: int | None = None) -> tuple[str, int]:
    """Split ``"host[:port]"``; an explicit ``port`` argument wins over none in the text."""
    text = text.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    if text.count(":") == 1:
        host, _, p = text.partition(":")
        return host or "localhost", int(p) if port is None else port
    return text or "localhost", DEFAULT_PORT if port is None else port


def resolve(host: str | None = None, port: int | None = None,
            finders: list[Finder] | None = None) -> tuple[str, int]:
    """Find the master's ``(host, port)`` as the module docstring describes; ``finders``
    (default: those added with ``add_finder``) are asked last, in order."""
    if host:
        return parse_address(host, port)
    env = os.environ.get("CW_MASTER")
    if env:
        return parse_address(env, port)
    info = read_connection_file(default_connection_file())
    if info:
        return info["host"], int(port or info["port"])
    for finder in FINDERS if finders is None else finders:
        found = finder()
        if found:
            return parse_address(found, port)
    return "localhost", port or DEFAULT_PORT


def read_connection_file(path: os.PathLike | str) -> dict | None:
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
    private_mkdir(path.parent)
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
