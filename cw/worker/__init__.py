"""Workers: ``python -m cw.worker [HOST] [-n N]``, long-lived processes that run jobs.

    process.py      one worker process: the job loop in the main thread, I/O beside it
    supervisor.py   the command you start: spawns, watches and restarts N processes
"""
from cw.worker.process import Worker, main, parse_args

__all__ = ["Worker", "main", "parse_args"]
