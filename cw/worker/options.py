"""``python -m cw.worker``'s flags and main: a supervisor, or (``--child``) one worker process.

Resources (cw.resources): ``--resources gpu=1,mem=64`` is what *each* worker process offers;
``--gpus 0,1`` (or ``auto``) starts one process per GPU instead of ``-n``, each with
CUDA_VISIBLE_DEVICES set to its GPU and gpu=1 added to its resources. A process runs one job
at a time, each job with all of the process's resources; ``--slots`` keeps its meaning (jobs
held: the running one plus prefetched ones, each of which must fit). To run several small
jobs at once on a node, start several processes (``-n 4 --resources mem=16``).

A SIGTERM/SIGINT stops a worker process (its running job goes back to the queue) when it is a
stop: the supervisor said so first, or there is none. Otherwise the job sent it to its own
process: a crash like any other, and the process dies of it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cw import cli
from cw.defaults import DEFAULT_SLOTS
from cw.errors import MasterUnreachable, ProtocolError, ResourceError, SecurityError
from cw.launch.adapt import MARGIN
from cw.resources import ProcessSpec, gpu_processes, parse_gpus, parse_resources
from cw.worker.deadline import JobInterrupted
from cw.worker.drain import Drain
from cw.worker.process import Worker, WorkerShutdown
from cw.worker.supervisor import (
    NOTE_DRAINED,
    NOTE_RECYCLE,
    NOTE_REFUSED,
    STOP_GRACE,
    Supervisor,
    SupervisorLink,
)

log = logging.getLogger(__name__)


def run_child(args: argparse.Namespace) -> None:
    """Body of one worker process. A SIGTERM/SIGINT stops it (the running job goes back to
    the queue) when it is a stop: the supervisor said so, or there is none. Otherwise the
    job sent it to its own process: that is a crash like any other, and we die of it."""
    link = SupervisorLink(args.supervisor_fd) if args.supervisor_fd is not None else None

    def interrupt(signum, frame):
        # a Python no-op, not SIG_IGN: a second signal already caught (SLURM's SIGINT to the
        # step and the supervisor's SIGTERM) would find SIG_IGN and print "Signal 15
        # ignored due to race condition"
        signal.signal(signal.SIGTERM, _ignore)
        signal.signal(signal.SIGINT, _ignore)
        if link is not None and not link.stop_asked(STOP_GRACE):
            log.warning("got %s that nobody stopping us sent; dying of it",
                        signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise WorkerShutdown(signal.Signals(signum).name)

    def time_up(signum, frame):
        if worker.in_job:
            raise JobInterrupted()

    def drain(signum, frame):  # SLURM ends or preempts the job: finish, then leave
        threading.Thread(target=worker.start_drain, daemon=True, args=(
            f"got {signal.Signals(signum).name} (SLURM preempts or ends the job)",)).start()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGUSR1, time_up)
    drain_signal = _signal(args.drain_signal)
    worker = Worker(args.host, args.port, args.slots, args.max_jobs, args.max_memory, link,
                    args.insecure, Drain(args.drain_margin), parse_resources(args.resources or ""))
    if drain_signal is not None:
        signal.signal(drain_signal, drain)
    try:
        worker.run(args.connect_timeout or None)
    except (ProtocolError, MasterUnreachable, SecurityError) as exc:
        log.error("%s", exc)
        note = NOTE_REFUSED
    except WorkerShutdown:
        note = b""
    else:
        note = NOTE_DRAINED if worker.drain.reason else NOTE_RECYCLE if worker.recycle else b""
    if link is not None and note:
        link.tell(note)


def _ignore(signum, frame) -> None:
    """A stop is under way: later SIGINT/SIGTERM change nothing."""


def _signal(name: str | None) -> signal.Signals | None:
    """``TERM``, ``SIGTERM`` or ``15`` -> signal.SIGTERM; None stays None."""
    if not name:
        return None
    name = name.strip().upper()
    if name.isdigit():
        return signal.Signals(int(name))
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cw-worker", description=(
        "Run cw worker processes that take jobs from a cw master."))
    parser.add_argument("host", nargs="?", default=None,
                        help="the master's host[:port] (default: $CW_MASTER, else the "
                             "connection file $CW_HOME/default.json, else localhost)")
    cli.add_flag(parser, "--port", default=None, cast=int, help="the master's port (5494)")
    cli.add_flag(parser, "-n", "--processes", default=1, cast=int,
                 help="worker processes to run on this node")
    cli.add_flag(parser, "--slots", default=DEFAULT_SLOTS, cast=int,
                 help="jobs one worker holds at once: the running one plus prefetched ones")
    cli.add_flag(parser, "--resources", default="",
                 help="what each worker process offers, name=number items: gpu=1,mem=64 "
                      "(gpu: GPUs, mem: GB, cpu: cores, any other name: a counter of yours); "
                      "jobs ask with ex.options(resources={'gpu': 1})")
    cli.add_flag(parser, "--gpus", default="",
                 help="one worker process per GPU, each seeing only its own "
                      "(CUDA_VISIBLE_DEVICES) with resource gpu=1: a list like 0,1 (trusted "
                      "as given) or auto (CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    cli.add_flag(parser, "--max-jobs", default=0, cast=int,
                 help="restart a worker process after this many jobs (0: never)")
    cli.add_flag(parser, "--max-memory", default=0.0, cast=float,
                 help="restart a worker process, between jobs, once its RSS passes this "
                      "many MB (0: never)")
    cli.add_flag(parser, "--connect-timeout", default=0.0, cast=float,
                 help="give up if no master answers within this many seconds; 0 waits "
                      "for ever (also for its connection file: a worker never dials a "
                      "master without its keys)")
    cli.add_flag(parser, "--insecure", default=False, action="store_true",
                 help="if no connection file has the master's keys, talk plain TCP to it "
                      "(a loopback master started with --insecure only)")
    cli.add_logging_flags(parser)
    parser.add_argument("--slurm", action="store_true",
                        help="find the master through SLURM: $CW_HOME/default.json, else the "
                             "node of this user's running cmaster job in squeue")
    cli.add_flag(parser, "--drain-signal", default=None,
                 help="the signal (TERM, USR1, ...) that makes a worker drain: finish what "
                      "it runs, give back what it holds, leave (with --slurm: TERM)")
    cli.add_flag(parser, "--drain-margin", default=MARGIN, cast=float,
                 help="seconds before its SLURM allocation ends a worker starts draining")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one worker process, from the supervisor's."""
    argv = [args.host] if args.host else []
    for flag, value in (("--port", args.port), ("--slots", args.slots),
                        ("--max-jobs", args.max_jobs), ("--max-memory", args.max_memory),
                        ("--connect-timeout", args.connect_timeout),
                        ("--drain-signal", args.drain_signal),
                        ("--drain-margin", args.drain_margin),
                        ("--log-level", args.log_level), ("--log-file", args.log_file)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + ["--insecure"] * args.insecure


def process_specs(args: argparse.Namespace) -> list[ProcessSpec]:
    """What each worker process offers and its environment: ``-n`` alike, or one per GPU."""
    resources = parse_resources(args.resources or "")
    if not args.gpus:
        return [ProcessSpec({}, resources)] * max(1, args.processes)
    if args.processes != 1:
        raise ResourceError("--gpus starts one process per GPU: give it without -n")
    specs = gpu_processes(parse_gpus(args.gpus), resources)
    log.info("one worker process per GPU: %s", ", ".join(s.env["CUDA_VISIBLE_DEVICES"]
                                                        for s in specs))
    return specs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.tune_malloc()
    cli.raise_fd_limit()
    role = "worker" if args.child else "supervisor"
    cli.setup_logging(args.log_level, args.log_file, f"{role} {os.uname().nodename}:{os.getpid()}")
    if args.child:
        run_child(args)
        sys.exit(0)
    if args.slurm and not args.host:
        from cw.launch import slurm
        args.host, args.port = slurm.find_master(args.connect_timeout or 300.0)
    if args.slurm and args.drain_signal is None:
        args.drain_signal = "TERM"  # what SLURM sends at the walltime and on preemption
    try:
        specs = process_specs(args)
        supervisor = Supervisor(child_argv(args), max(1, args.processes), args.host,
                                args.port, args.insecure, _signal(args.drain_signal), specs)
    except ResourceError as exc:
        sys.exit(f"cw-worker: {exc}")
    except SecurityError as exc:  # e.g. --insecure to a master that is not on loopback
        sys.exit(f"cw-worker: {exc}")
    sys.exit(supervisor.run())

