"""What ``./slurm.py start --adapt`` gives the master job, and the workers' drain options.

    start(n, adapt=True, min_workers=M, idle_timeout=S, ...)
      worker_script(...) ---> $CW_HOME/slurm/adapt-worker.sh (0600; the master reads it)
      master_args() ---> python -m cw.master ... --adapt n --min-workers M --idle-timeout S
                         --worker-script PATH --worker-option=ARG ... (every --Xworkers)
      the master (cw.master.elastic), inside its allocation, submits the workers itself:
      M at once, more with the work, as one array job per decision

    drain_options(signal, margin) ---> the workers' sbatch ``--signal=SIG@SECS`` (SLURM
      sends SIG to the step SECS before the end) and the worker's ``--drain-signal SIG``
      and ``--drain-margin M`` (cw.worker.drain)
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from cw.conn import address
from cw.launch import adapt

log = logging.getLogger(__name__)


def drain_options(signal: str | None = None,
                  margin: float | None = None) -> tuple[list[str], list[str]]:
    """(sbatch options, worker arguments) for the workers' drain: ``signal`` is
    ``SIG``, ``SIG@SECS`` or ``B:SIG@SECS`` (to the batch shell, the workers' srun, which
    passes it to them; SECS defaults to the margin), ``margin`` the seconds before
    the allocation's end a worker stops taking jobs it may not finish."""
    sbatch: list[str] = []
    worker: list[str] = []
    if margin is not None:
        worker += ["--drain-margin", f"{margin:g}"]
    if signal:
        name, _, secs = signal.partition("@")
        batch = name.upper().startswith("B:")  # to the batch shell: srun passes it on
        name = name[2 * batch:].upper().removeprefix("SIG") or "TERM"
        secs = secs or f"{int(adapt.MARGIN if margin is None else margin)}"
        sbatch.append(f"--signal={'B:' * batch}{name}@{secs}")
        worker += ["--drain-signal", name]
    return sbatch, worker


def master_args(max_workers: int, min_workers: int, idle_timeout: float, script: str,
                options: Sequence[str], margin: float | None = None,
                interval: float | None = None, lead: float | None = None) -> list[str]:
    """The master's ``--adapt`` arguments; the worker script goes to a file it reads."""
    if not 0 <= min_workers <= max_workers:
        raise ValueError(f"need 0 <= --min-workers ({min_workers}) <= -n ({max_workers})")
    folder = address.private_mkdir(address.cw_home() / "slurm")
    path = folder / "adapt-worker.sh"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(script)
    args = ["--adapt", str(max_workers), "--min-workers", str(min_workers),
            "--idle-timeout", f"{idle_timeout:g}", "--worker-script", str(path),
            *(f"--worker-option={o}" for o in options)]
    for flag, value in (("--drain-margin", margin), ("--adapt-interval", interval),
                        ("--adapt-lead", lead)):
        if value is not None:
            args += [flag, f"{value:g}"]
    return args
