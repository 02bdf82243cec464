"""Another local user, for the security tests: a throwaway account that attacks cw.

The test process (root) creates an account with ``useradd`` and runs code as it in forked
children that drop to that account's uid, gid and no supplementary groups. The interpreter's
files may be unreadable to that account (``/root`` is 0700), so a child can use only modules
the test already imported: import ``zmq`` and whatever else the attack needs at the top of the
test module.

    parent (root, the victim)                child (the other user)
      other_user.run(fn, *args)  --fork-->   setuid; fn(*args) --pickle--> pipe --> value
      other_user.start(fn, *args)--fork-->   setuid; fn(ready, *args) ... ready(x) --> pipe
      handle.stop()              --SIGKILL-> the child

Every wait is bounded; every child is killed at teardown.
"""
from __future__ import annotations

import os
import pickle
import pwd
import select
import shutil
import signal
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import pytest


def _read_all(fd: int, timeout: float) -> bytes:
    """Read a pipe until EOF or ``timeout``; raise AssertionError on timeout."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"the other user's process said nothing within {timeout} s")
        data = os.read(fd, 1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class Child:
    """A forked child running as the other user; ``ready()`` gives what it reported."""

    def __init__(self, pid: int, fd: int):
        self.pid = pid
        self.fd = fd
        self._buf = b""

    def ready(self, timeout: float = 15.0) -> Any:
        """Wait for the child's first ``ready(value)`` call and return the value."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"the other user's process was not ready within {timeout} s")
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise AssertionError("the other user's process ended before it was ready")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return pickle.loads(bytes.fromhex(line.decode()))

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


class OtherUser:
    """A throwaway local account; ``run``/``start`` execute Python as it."""

    def __init__(self, name: str):
        self.name = name
        entry = pwd.getpwnam(name)
        self.uid, self.gid, self.home = entry.pw_uid, entry.pw_gid, entry.pw_dir
        self._children: list[Child] = []

    def _become(self) -> None:
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)
        os.environ["HOME"] = self.home
        os.environ["USER"] = os.environ["LOGNAME"] = self.name
        os.environ.pop("XDG_RUNTIME_DIR", None)
        os.environ["CW_HOME"] = os.path.join(self.home, ".cw")
        os.chdir(self.home)

    def _fork(self, body: Callable[[int], Any]) -> tuple[int, int]:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 0
            try:
                os.close(rfd)
                self._become()
                body(wfd)
            except BaseException:
                code = 1
                try:
                    os.write(wfd, b"!" + traceback.format_exc().encode().hex().encode() + b"\n")
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(wfd)
        return pid, rfd

    def run(self, fn: Callable, *args, timeout: float = 20.0) -> Any:
        """Run ``fn(*args)`` as the other user and return its (picklable) value."""
        def body(wfd: int) -> None:
            os.write(wfd, pickle.dumps(fn(*args)).hex().encode() + b"\n")

        pid, rfd = self._fork(body)
        child = Child(pid, rfd)
        try:
            out = _read_all(rfd, timeout)
        finally:
            child.stop()
        if out.startswith(b"!"):
            raise AssertionError("the other user's code raised:\n"
                                 + bytes.fromhex(out[1:].strip().decode()).decode())
        return pickle.loads(bytes.fromhex(out.strip().decode()))

    def start(self, fn: Callable, *args) -> Child:
        """Run ``fn(ready, *args)`` as the other user in the background until teardown.

        ``ready(value)`` reports a picklable value to the parent (``Child.ready()``); it may be
        called more than once.
        """
        def body(wfd: int) -> None:
            def ready(value: Any = None) -> None:
                os.write(wfd, pickle.dumps(value).hex().encode() + b"\n")
            fn(ready, *args)

        child = Child(*self._fork(body))
        self._children.append(child)
        return child

    def cleanup(self) -> None:
        for child in self._children:
            child.stop()


def make_other_user() -> OtherUser | None:
    """Create a throwaway account, or None where that is impossible (not root)."""
    if os.getuid() != 0 or not shutil.which("useradd"):
        return None
    name = "cwx" + uuid.uuid4().hex[:8]
    home = f"/tmp/{name}"
    subprocess.run(["useradd", "--no-user-group", "--home-dir", home, "--create-home",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    os.chmod(home, 0o700)
    return OtherUser(name)


def remove_other_user(user: OtherUser) -> None:
    user.cleanup()
    subprocess.run(["pkill", "-KILL", "-u", user.name], capture_output=True)
    subprocess.run(["userdel", "--remove", user.name], capture_output=True)


@pytest.fixture
def other_user():
    """A throwaway local account (skipped unless the tests run as root)."""
    user = make_other_user()
    if user is None:
        pytest.skip("needs root (useradd) to act as another local user")
    try:
        yield user
    finally:
        remove_other_user(user)
