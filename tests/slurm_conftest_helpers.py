"""Helpers for the launcher tests (test_mp.py, test_slurm*.py, test_elastic.py): processes by
pid, SLURM state, the ``./slurm.py`` command line, and the SLURM call counts that
conftest's ``counted`` fixture records (conftest also has ``cw_jobs``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def pids_of(info: dict) -> set[int]:
    """The worker pids a ``cw.status.status()`` answer lists."""
    return {int(w["pid"]) for w in info["workers"]}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def processes_with_env(entry: str) -> list[int]:
    """Live processes (not this one) whose environment holds ``entry``, e.g. ``CW_HOME=/x``:
    what a test started, wherever SLURM put it."""
    found = []
    needle = entry.encode() + b"\0"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes() + b"\0"
        except OSError:
            continue
        if b"\0" + needle in b"\0" + environ and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def slurm_problem() -> str:
    """Why the SLURM tests cannot run here ("" if `sinfo` answers)."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM is not installed (no sinfo/sbatch on PATH)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=10)
    except subprocess.TimeoutExpired:
        return "SLURM is not running (sinfo timed out)"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"SLURM is not running (sinfo: {last}); start it with tests/slurm/local_slurm.sh"
    return ""


def run_cli(*args: str, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    """``./slurm.py ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "slurm.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def count(calls: Path, who: str | None = None) -> dict[str, int]:
    """{command: calls} recorded by ``counted``, made from ``who`` (cmaster, cwadapt,
    launcher; None: from anywhere)."""
    found: dict[str, int] = {}
    for line in calls.read_text().splitlines():
        command, caller = line.split()
        if who is None or caller == who:
            found[command] = found.get(command, 0) + 1
    return found
