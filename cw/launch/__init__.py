"""Start, stop and allocate a cw cluster with whichever launcher fits this machine.

    cw.launch.start(n)  --sbatch/salloc on PATH?--yes--> cw.launch.slurm.start(n)  (jobs)
                                                 --no---> cw.launch.local.start(n)  (processes)

    cw.launch.common   what the launchers share: state files, waits, logs, PYTHONPATH
    cw.launch.local    ``./mp.py``, ``cw.mp``: a master and workers on this machine
    cw.launch.slurm    ``./slurm.py``, ``cw.slurm``: the master and workers as SLURM jobs
    cw.launch.ssh      ``python -m cw.ssh``: workers on other machines over ssh

This package also gives ``cw.conn.address.resolve`` its SLURM finder (the master of this
user's running SLURM job), so that the wire code never imports a launcher.
"""
from __future__ import annotations

import contextlib
import shutil

from cw.conn import address
from cw.errors import LaunchError

__all__ = ["LaunchError", "allocate", "slurm_available", "start", "stop"]


def slurm_available() -> bool:
    """True when SLURM's submit commands are on PATH."""
    return bool(shutil.which("sbatch") or shutil.which("salloc"))


def _launcher():
    from cw.launch import local, slurm  # late: they import cw.launch.common
    return slurm if slurm_available() else local


def start(nworkers: int, master: bool = True, workers: bool = True, **options):
    """Start a master and ``nworkers`` workers with SLURM if present, else locally
    (``adapt=True``, workers that come and go with the work, needs SLURM)."""
    if options.get("adapt") and not slurm_available():
        raise LaunchError("adapt=True needs SLURM (no sbatch on PATH): the master submits "
                          "its workers as SLURM jobs")
    return _launcher().start(nworkers, master=master, workers=workers, **options)


def stop(master: bool = True, workers: bool = True, **options) -> list[str]:
    """Stop what ``start`` started (SLURM jobs or local processes); return what was stopped."""
    return _launcher().stop(master=master, workers=workers, **options)


def allocate(nworkers: int, master: bool = True, workers: bool = True,
             **options) -> contextlib.AbstractContextManager:
    """``with allocate(n):`` a cluster that is stopped when the block ends, even on error."""
    return _launcher().allocate(nworkers, master=master, workers=workers, **options)


def _slurm_finder() -> str | None:
    """The master of this user's running ``cmaster`` SLURM job, if any (no waiting)."""
    if not shutil.which("squeue"):
        return None
    from cw.launch import slurm
    return slurm.master_address()


address.add_finder(_slurm_finder)
