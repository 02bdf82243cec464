"""The batch scripts of the SLURM launcher's jobs (cw.launch.slurm) and of the master's
adaptive worker jobs (cw.master.elastic, through cw.launch.slurm_jobs).

    _script(command): #!/bin/sh, export CW_HOME and PYTHONPATH, exec command (so that
                      scancel --batch signals the command itself)
    worker_script():  _script(srun python -m cw.worker --slurm [worker args]), or srun
                      docker run ... IMAGE python -m cw.worker MASTER --port P
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from cw.conn import address
from cw.launch.common import pythonpath


def job_script(command: list[str]) -> str:
    """A batch script that exports what jobs need (``exports``) and execs ``command``, so
    that ``scancel --batch`` signals the command itself."""
    lines = ["#!/bin/sh", *(f"export {k}={shlex.quote(v)}" for k, v in exports().items()),
             "exec " + shlex.join(command)]
    return "\n".join(lines) + "\n"


def exports() -> dict:
    """Variables every job needs: the same CW_HOME, and cw importable from this clone."""
    return {"CW_HOME": str(address.cw_home()), "PYTHONPATH": pythonpath()}


def worker_command(docker_image: str | None, docker_args: str, master: tuple,
                   log_level: str, worker_args: Sequence[str] = ()) -> list[str]:
    """``python -m cw.worker`` as a workers job's srun runs it (``worker_args`` last)."""
    if not docker_image:
        return [sys.executable, "-m", "cw.worker", "--slurm", "--log-level", log_level,
                *worker_args]
    home = str(address.cw_home())
    return ["docker", "run", "-i", "--rm", "--init", "--network=host", "-e", f"CW_HOME={home}",
            "-v", f"{home}:{home}", *shlex.split(docker_args or ""), docker_image,
            "python", "-m", "cw.worker", master[0], "--port", str(master[1]),
            "--log-level", log_level, *worker_args]


def worker_script(docker_image: str | None = None, docker_args: str = "",
                  master: tuple = ("", 0), log_level: str = "INFO",
                  worker_args: Sequence[str] = ()) -> str:
    """The batch script of a workers job: ``srun`` starts one cw worker per task, found
    through SLURM (``--slurm``) or, in ``docker_image``, at ``master``. The launcher's
    cworkers job and the master's adaptive worker jobs (cw.slurm_jobs) run the same."""
    return job_script(["srun", *worker_command(docker_image, docker_args, master, log_level,
                                               worker_args)])
