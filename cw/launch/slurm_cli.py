"""``./slurm.py`` (``python -m cw.launch.slurm``): the SLURM launcher's command line.

    slurm.py -n N [options] start|stop|status --> cw.launch.slurm.start / stop / jobs + the
                                                  master's status table
"""
from __future__ import annotations

import argparse
import logging
import sys

from cw.conn import address
from cw.errors import LaunchError
from cw.launch.common import print_master_status
from cw.launch.slurm import (
    IDLE_TIMEOUT,
    JOB_ADAPT,
    JOB_MASTER,
    JOB_WORKERS,
    START_TIMEOUT,
    jobs,
    master_address,
    start,
    stop,
)
from cw.protocol import DEFAULT_PORT


def main(argv: list[str] | None = None) -> int:
    """``slurm.py -n N start|stop|status``: the SLURM launcher's command line."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger(__name__.rpartition(".")[0]).setLevel(logging.INFO)  # cw.launch.*
    try:
        if args.action == "start":
            cluster = start(
                args.nworkers, args.master, args.workers, args.port, args.partition,
                args.time, args.master_options, args.worker_options, args.isolated,
                args.docker_image, args.docker_args, args.timeout, args.pending_timeout,
                adapt=args.adapt, min_workers=args.min_workers,
                idle_timeout=args.idle_timeout, signal=args.signal, margin=args.margin,
                interval=args.adapt_interval, lead=args.lead)
            print(f"cw master at {cluster.host}:{cluster.port}; jobs: " +
                  ", ".join(f"{n} {i}" for n, i in cluster.jobs.items()))
        elif args.action == "stop":
            said = stop(args.master, args.workers)
            print("\n".join(said) if said else "nothing to stop: no cw jobs in squeue")
        else:
            return _print_status()
    except LaunchError as exc:
        print(f"slurm.py: {exc}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slurm.py", description=(
        f"Start, stop or show a cw master ({JOB_MASTER} job) and workers ({JOB_WORKERS} "
        "job) on a SLURM cluster."))
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("-n", dest="nworkers", type=int, default=32,
                   help="worker tasks to start (default %(default)s)")
    p.add_argument("-M", dest="master", action="store_false", help="do not start/stop the master")
    p.add_argument("-W", dest="workers", action="store_false",
                   help="do not start/stop the workers")
    p.add_argument("--Xworkers", dest="worker_options", metavar="ARG", action="append",
                   default=[], help="pass ARG to the workers' sbatch (repeatable; write "
                        "--Xworkers=--mem=2G when ARG starts with -)")
    p.add_argument("--Xmaster", dest="master_options", metavar="ARG", action="append",
                   default=[],
                   help="pass ARG to the master's sbatch (repeatable, as --Xmaster=ARG)")
    p.add_argument("-i", "--isolated", action="store_true", help="one worker per node")
    p.add_argument("-d", "--docker-image", default=None, help="run the workers in this image")
    p.add_argument("--docker-args", default="", help="extra arguments for `docker run`")
    p.add_argument("--partition", default=None, help="SLURM partition of both jobs")
    p.add_argument("--time", default=None, help="SLURM time limit of both jobs")
    p.add_argument("--port", type=int, default=None,
                   help=f"the master's port (default {DEFAULT_PORT})")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT,
                   help="seconds start waits for the master and the workers")
    p.add_argument("--pending-timeout", type=float, default=None,
                   help="seconds a job may stay PENDING during start (default: --timeout)")
    a = p.add_argument_group("adaptive workers, walltime and preemption")
    a.add_argument("--adapt", action="store_true", help=(
        "the master submits worker jobs (an array job at a time, all --Xworkers options) "
        "when work is queued, at most -n, and cancels idle ones"))
    a.add_argument("--min-workers", type=int, default=0,
                   help="with --adapt: workers kept even when idle (default %(default)s)")
    a.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                   help="with --adapt: seconds before an idle worker is cancelled "
                        "(default %(default)s)")
    a.add_argument("--adapt-interval", type=float, default=None,
                   help="with --adapt: seconds between the master's squeue calls (one "
                        "call for all its worker jobs; default 10)")
    a.add_argument("--lead", type=float, default=None,
                   help="with --adapt: seconds a worker job takes to start; a replacement "
                        "is asked for that long before a worker drains (default 60)")
    a.add_argument("--margin", type=float, default=None,
                   help="seconds before its allocation ends a worker takes no job it may "
                        "not finish, gives back what it holds and leaves (default 60)")
    a.add_argument("--signal", default=None, metavar="SIG[@SECS]",
                   help="SLURM sends SIG to the workers SECS before their end (sbatch "
                        "--signal) and they drain on it; without it they drain on SIGTERM "
                        "(preemption, the walltime)")
    return p


def _print_status() -> int:
    found = jobs()
    adaptive = [j for j in found if j.name == JOB_ADAPT]
    lines = [j.describe() for j in found if j.name != JOB_ADAPT]
    if adaptive:
        counts: dict[str, int] = {}
        for j in adaptive:
            key = j.state if j.state != "PENDING" else f"PENDING ({j.reason})"
            counts[key] = counts.get(key, 0) + 1
        lines.append(f"{JOB_ADAPT} worker jobs: " +
                     ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    print("\n".join(lines) if lines else "no cw jobs in squeue")
    has_file = address.read_connection_file(address.default_connection_file())
    return print_master_status(None if has_file else master_address())
