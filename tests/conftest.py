"""Fixtures that start real masters and workers as processes on loopback.

Every process is started in its own session and stopped by its process group at teardown,
also when the test fails; every wait is bounded. CW_HOME points at a per-test folder so
connection files never touch the real home directory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hosts import read_line, stop_group  # noqa: E402  (tests/hosts.py)

from cw.status import status  # noqa: E402

# fast failure detection for tests (the defaults are 1 s / 10 s)
HB = ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "2"]


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def gated(gate: str, value=None):
    """A job that runs until the file ``gate`` exists, then returns ``value``.

    Tests hold workers busy with it and release them by creating the file; the wait is
    bounded by the test's timeout.
    """
    while not os.path.exists(gate):
        time.sleep(0.01)
    return value


class Proc:
    """A child process in its own process group, stopped by pid at teardown."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd=None,
                 stdout=subprocess.PIPE):
        self.argv = argv
        self.log = Path(os.environ["CW_HOME"]) / f"proc-{time.monotonic_ns()}.log"
        self.log_file = open(self.log, "wb")
        self.popen = subprocess.Popen(argv, stdout=stdout, stderr=self.log_file,
                                      env={**os.environ, **(env or {})}, cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def readline(self, timeout: float = 15.0) -> str:
        line = read_line(self.popen, timeout)
        if line is None:
            raise AssertionError(f"{self.argv} printed nothing within {timeout} s:\n"
                                 f"{self.stderr()}")
        return line

    def stderr(self) -> str:
        self.log_file.flush()
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``timeout``; return the exit code."""
        stop_group(self.popen, timeout)
        self.log_file.close()
        return self.popen.poll()


class Master(Proc):
    def __init__(self, *extra: str, port: int = 0, env: dict | None = None):
        super().__init__([sys.executable, "-m", "cw.master", "--host", "127.0.0.1",
                          "--port", str(port), *HB, *extra], env=env)
        line = self.readline()
        assert "listening on tcp://" in line, line
        self.port = int(line.rsplit(":", 1)[1])
        self.host = "127.0.0.1"
        self.address = f"{self.host}:{self.port}"

    def status(self, timeout: float = 5.0) -> dict:
        return status(self.host, self.port, timeout)

    def wait_workers(self, n: int, timeout: float = 20.0) -> dict:
        return wait_for(lambda: len((s := self.status())["workers"]) == n and s,
                        timeout, f"{n} workers to register")


class Workers(Proc):
    def __init__(self, master: Master, n: int = 1, *extra: str, env: dict | None = None):
        super().__init__([sys.executable, "-m", "cw.worker", master.host, "--port",
                          str(master.port), "-n", str(n), *extra], env=env,
                         stdout=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def cw_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "cw-home"
    home.mkdir()
    monkeypatch.setenv("CW_HOME", str(home))
    monkeypatch.delenv("CW_MASTER", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return home


@pytest.fixture
def procs():
    """Start processes through this list; all are stopped at teardown."""
    started: list[Proc] = []

    class Starter:
        def master(self, *extra, **kw) -> Master:
            started.append(Master(*extra, **kw))
            return started[-1]

        def workers(self, master: Master, n: int = 1, *extra, wait: bool = True,
                    **kw) -> Workers:
            before = len(master.status()["workers"]) if wait else 0
            started.append(Workers(master, n, *extra, **kw))
            if wait:
                master.wait_workers(before + n)
            return started[-1]

        def run(self, argv, **kw) -> Proc:
            started.append(Proc(argv, **kw))
            return started[-1]

    yield Starter()
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def master(procs) -> Master:
    return procs.master()


@pytest.fixture
def cluster(procs, master) -> Master:
    """A master with 2 worker processes registered."""
    procs.workers(master, 2)
    return master


from otheruser import other_user  # noqa: E402,F401  (the fixture, for the security tests)


# ---------------------------------------------------------------- SLURM tests
@pytest.fixture
def cw_jobs(cw_home):
    """Refuses to touch a user's own cw jobs; stops the test's jobs at teardown."""
    from cw.launch import slurm
    if slurm.jobs():
        pytest.skip("this user already has cw jobs (cmaster, cworkers, cwadapt) in squeue; "
                    "not touching them")
    yield cw_home
    slurm.stop()


@pytest.fixture
def counted(tmp_path, monkeypatch) -> Path:
    """squeue, sbatch and scancel wrappers on PATH (the jobs inherit it) that append
    ``command caller`` to a file (the caller from its parent's command line: cmaster for
    the master, cwadapt for a worker, else launcher), then exec the real command; returns
    that file (read it with ``count``)."""
    calls = tmp_path / "calls"
    calls.touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("squeue", "sbatch", "scancel"):
        real = subprocess.run(["sh", "-c", f"command -v {command}"], capture_output=True,
                              text=True, check=True).stdout.strip()
        wrapper = bin_dir / command
        wrapper.write_text(
            "#!/bin/sh\ncase \"$(tr '\\0' ' ' < /proc/$PPID/cmdline)\" in\n"
            "  *cw.master*) who=cmaster ;;\n  *cw.worker*) who=cwadapt ;;\n"
            "  *) who=launcher ;;\nesac\n"
            f"echo \"{command} $who\" >> {calls}\nexec {real} \"$@\"\n")
        wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls
