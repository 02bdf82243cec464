"""Workers: ``python -m cw.worker [HOST] [-n N]``, long-lived processes that run jobs.

    supervisor.py   the command you start: spawns, watches and restarts N processes
    process.py      one worker process: the job loop in the main thread, I/O beside it
    outbox.py       its notes to the master (started, done, results), flushed in batches
    deadline.py     job timeouts: interrupt, or replace a worker whose job will not yield
    lane.py         lone jobs straight from clients on this machine (LaneServer)
    options.py      flags and main
"""
from cw.worker.options import main, parse_args
from cw.worker.process import Worker

__all__ = ["Worker", "main", "parse_args"]
