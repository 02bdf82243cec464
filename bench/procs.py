"""Process helpers for the benchmark: spawning, reading a ready line, and
tearing down whole process trees (Linux ``/proc`` based, no psutil needed).

Every wait here is bounded; every kill is by pid, never by name.
"""
from __future__ import annotations

import ctypes
import os
import queue
import resource
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux only).

    Peers such as ipyparallel start their engines in new sessions; as
    subreaper we still see them as descendants and can kill what a crashed
    run left behind.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_map() -> dict[int, int]:
    """Map pid -> ppid for every process visible in /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # comm may contain spaces/parens: fields after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first, breadth-first)."""
    parents = _parent_map()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = deque(children.get(pid, []))
    while todo:
        cur = todo.popleft()
        found.append(cur)
        todo.extend(children.get(cur, []))
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def reap_zombies() -> None:
    """Collect exited children (including adopted orphans) without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def terminate_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, then SIGKILL the rest."""
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        reap_zombies()
        time.sleep(0.05)
    _signal_all([p for p in pids if _alive(p)], signal.SIGKILL)
    reap_zombies()


def terminate_tree(root: int, grace: float = 5.0) -> None:
    """Terminate ``root`` and every descendant it has right now."""
    terminate_pids([root] + descendants(root), grace)


def wait_descendants_gone(timeout: float) -> bool:
    """Wait (bounded) until this process has no live descendants left."""
    deadline = time.monotonic() + timeout
    while True:
        reap_zombies()
        if not any(_alive(p) for p in descendants(os.getpid())):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def cmdline(pid: int) -> str:
    """The command line of ``pid`` (shortened), or '?' if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def kill_leftovers(grace: float = 2.0) -> list[str]:
    """Kill every live descendant of this process; describe what was found."""
    left = [p for p in descendants(os.getpid()) if _alive(p)]
    found = [f"{p}: {cmdline(p)}" for p in left]
    if left:
        terminate_pids(left, grace)
    reap_zombies()
    return found


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's waited-for descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ForeignLoad:
    """Measure how busy the machine was with work that is *not* ours.

    Everything our children (and the orphans we reap as subreaper) use is
    subtracted from the machine's busy time; what is left, per wall second,
    is the other load in cores (about 0 on a quiet machine).
    """

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = machine_busy_seconds()
        self._ours0 = children_cpu_seconds() + time.process_time()

    def cores(self) -> float:
        wall = time.monotonic() - self._t0
        busy = machine_busy_seconds() - self._busy0
        ours = children_cpu_seconds() + time.process_time() - self._ours0
        return max(0.0, busy - ours) / wall if wall > 0 else 0.0


class LineReader:
    """Drain a pipe in a daemon thread; wait for a matching line, keep a tail."""

    def __init__(self, stream, keep: int = 50) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._drain, args=(stream,),
                                         daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            self._lines.put(line)

    def wait_for(self, needle: str, timeout: float) -> str:
        """Return the first line containing ``needle``; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line containing {needle!r} within "
                                   f"{timeout:.0f}s; last output: {list(self.tail)[-5:]}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if needle in line:
                return line


def spawn(cmd: list[str], log_path: str | None = None) -> subprocess.Popen:
    """Start ``cmd`` with stdin closed; stdout piped (or to ``log_path``)."""
    if log_path is None:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
