"""``python -m bench``: cw versus ProcessPoolExecutor, loky, dask.distributed
and ipyparallel, each with 2 worker processes on loopback.

The parent process runs every (repetition, system) pair in a fresh child
process (``--child``), taking turns between systems and rotating their order
each repetition.  The child starts the system, warms it up, runs the six
workloads of :mod:`bench.workloads`, tears the system down and writes its
measurements as JSON.  The parent is a Linux child subreaper, so anything a
child leaves running is found and killed after each turn.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs, report
from bench.systems import CW_WORKER_ARGS, SYSTEMS
from bench.workloads import WORKLOADS, Sizes, WrongResult, warmup

CW_PATH = "BENCH_CW_PATH"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START_TIMEOUT = 60.0


# ---------------------------------------------------------------- child side


def run_workloads(system, sizes: Sizes, record: dict) -> None:
    """Run every workload; after an error other than a wrong result the
    system's state is unknown, so the remaining workloads are skipped."""
    for i, (name, workload) in enumerate(WORKLOADS):
        try:
            record["metrics"].update(workload(system, sizes))
        except WrongResult as exc:
            record["errors"][name] = f"wrong result: {exc}"
        except Exception as exc:
            record["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
            for later, _ in WORKLOADS[i + 1:]:
                record["errors"][later] = f"skipped after {name} failed"
            return


def child(name: str, rep: int, sizes: Sizes, out: Path, remote: bool = False) -> None:
    """Measure one system once and write the record to ``out`` (``remote``: the system
    runs on other hosts, see bench.hosts)."""
    record: dict[str, Any] = {"system": name, "rep": rep, "metrics": {}, "errors": {}}
    if remote:
        from bench.hosts import REMOTE_SYSTEMS
        system = REMOTE_SYSTEMS[name]()
    else:
        system = SYSTEMS[name]()
    workdir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    try:
        record["versions"] = system.versions()
        t0 = time.perf_counter()
        try:
            system.start(sizes.workers, workdir, START_TIMEOUT)
        except ImportError as exc:
            record["unavailable"] = f"ImportError: {exc}"
            return
        except Exception as exc:
            record["unavailable"] = f"failed to start: {type(exc).__name__}: {exc}"[:500]
            return
        try:
            warmup(system, sizes)
        except Exception as exc:
            record["unavailable"] = f"warm-up failed: {type(exc).__name__}: {exc}"[:500]
            return
        record["metrics"]["ready_s"] = time.perf_counter() - t0
        run_workloads(system, sizes, record)
    finally:
        system.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        out.write_text(json.dumps(record))


# ---------------------------------------------------------------- parent side


def child_env(cw_path: str = "") -> dict[str, str]:
    """Environment for children and workers: the repo first on PYTHONPATH so
    every worker can import ``bench.workloads`` (and ``cw`` from source);
    ``cw_path``, if given, goes before it to use another copy of cw."""
    env = dict(os.environ)
    path = [p for p in (cw_path, str(REPO), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_turn(name: str, rep: int, sizes: Sizes, tmp: Path) -> dict:
    """Run one child; never raises, always returns a record."""
    out = tmp / f"{name}-{rep}.json"
    log = tmp / f"{name}-{rep}.log"
    limit = START_TIMEOUT + 60 + sizes.timeout * (len(WORKLOADS) + 1)
    foreign = procs.ForeignLoad()
    cmd = [sys.executable, "-m", "bench", "--child", name, "--child-rep", str(rep),
           "--child-out", str(out), "--child-sizes", json.dumps(sizes.to_dict())]
    with open(log, "wb") as fh:
        # cwd is not the repo: "-m" puts the cwd first on sys.path, before --cw-path
        proc = subprocess.Popen(cmd, cwd=tmp, env=child_env(os.environ.get(CW_PATH, "")),
                                stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            procs.terminate_tree(proc.pid, grace=5)
    # ipyparallel's engine nannies detach and exit ~3 s after the cluster
    # stops; as subreaper we see them, so wait for them before the next turn
    procs.wait_descendants_gone(timeout=15)
    leftovers = procs.kill_leftovers()
    try:
        record = json.loads(out.read_text())
    except (OSError, ValueError):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        record = {"system": name, "rep": rep, "metrics": {}, "errors": {},
                  "unavailable": f"child exited {proc.returncode} without a result: {tail}"}
    if leftovers:
        record["leftover_pids"] = leftovers
    record["foreign_load_cores"] = round(foreign.cores(), 3)
    return record


def progress(record: dict) -> str:
    """One line per turn for stderr."""
    if record.get("unavailable"):
        return f"unavailable ({record['unavailable'][:120]})"
    shown = [f"{m.key}={m.show(record['metrics'][m.key])}" for m in report.METRICS
             if m.key in record["metrics"]]
    errors = f" ERRORS: {record['errors']}" if record["errors"] else ""
    return f"[other load {record['foreign_load_cores']:.2f} cores] " + " ".join(shown) + errors


def wait_quiet(limit: float) -> float:
    """Wait up to ``limit`` s until a 1 s sample shows no other load; return the wait."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        sample = procs.ForeignLoad()
        time.sleep(1.0)
        if sample.cores() < report.BUSY_CORES:
            break
    return time.monotonic() - t0


def run_all(systems: list[str], reps: int, sizes: Sizes, quiet_wait: float = 0.0) -> list[dict]:
    """Take turns: every repetition runs every system, in rotated order."""
    records: list[dict] = []
    gone: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for rep in range(reps):
            shift = rep % len(systems)
            for name in systems[shift:] + systems[:shift]:
                if name in gone:
                    continue
                waited = wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
                t0 = time.monotonic()
                record = run_turn(name, rep, sizes, Path(tmp))
                record["waited_for_quiet_s"] = round(waited, 1)
                report.stderr(f"[rep {rep + 1}/{reps}] {name:<11} "
                              f"{time.monotonic() - t0:5.1f}s {progress(record)}")
                if str(record.get("unavailable", "")).startswith("ImportError"):
                    gone.add(name)  # a missing package will not appear later
                records.append(record)
    return records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of: " + ", ".join(SYSTEMS))
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: few jobs, 1 rep (< ~60 s)")
    p.add_argument("--json", type=Path, default=None,
                   help="JSON output (default bench/results.json, "
                        "bench/results-quick.json with --quick)")
    p.add_argument("--png", type=Path, default=None, help="PNG chart (defaults as for --json)")
    p.add_argument("--no-png", action="store_true", help="skip the chart")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                   help="before each turn, wait up to S seconds for other load to stop")
    p.add_argument("--cw-path", default="", metavar="DIR",
                   help="import cw from DIR instead of this checkout, e.g. a "
                        "'git archive HEAD cw' snapshot, so edits in progress do not leak in")
    p.add_argument("--cw-worker-args", default="",
                   help='extra flags for "python -m cw.worker", e.g. "--slots 1"')
    p.add_argument("--hosts", action="store_true",
                   help="cw and dask across hosts made of network namespaces (root only; "
                        "see bench/hosts.py); writes bench/results-hosts.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-remote", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-sizes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        p.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.reps < 1:
        p.error("--reps must be at least 1")
    suffix = "-quick" if args.quick else ""
    args.json = args.json or HERE / f"results{'-hosts' if args.hosts else ''}{suffix}.json"
    args.png = args.png or HERE / f"results{suffix}.png"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.child_rep, Sizes(**json.loads(args.child_sizes)), args.child_out,
              args.child_remote)
        return 0
    procs.become_subreaper()
    if args.hosts:
        from bench import hosts
        return hosts.main(args.systems, args.reps, Sizes.quick() if args.quick else Sizes(),
                          args.json, os.path.abspath(args.cw_path) if args.cw_path else "",
                          args.quiet_wait)
    os.environ[CW_WORKER_ARGS] = args.cw_worker_args  # read by the cw children
    os.environ[CW_PATH] = os.path.abspath(args.cw_path) if args.cw_path else ""
    sizes = Sizes.quick() if args.quick else Sizes()
    machine = report.machine_info(REPO)
    report.stderr(report.describe_machine(machine))
    t0 = time.monotonic()
    records = run_all(args.systems, args.reps, sizes, args.quiet_wait)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = report.summarize(records, args.systems)
    rats = report.ratios(summary)
    duration = time.monotonic() - t0
    print(report.describe_machine(machine))
    print(f"reps: {args.reps}, quick: {args.quick}, wall: {duration:.0f}s; "
          f"median [min - max] over reps; cw/peer = cw median / peer median\n")
    print(report.table(summary, rats))
    report.write_json(args.json, {
        "machine": machine, "sizes": sizes.to_dict(), "reps": args.reps,
        "quick": args.quick, "systems": args.systems,
        "cw_worker_args": args.cw_worker_args, "cw_path": args.cw_path, "quiet_wait_s": args.quiet_wait, "duration_s": duration,
        "metrics": {m.key: {"label": m.label, "unit": m.unit,
                            "higher_is_better": m.higher_is_better} for m in report.METRICS},
        "summary": summary, "cw_over_peer": rats, "records": records})
    print(f"\njson: {args.json}")
    if not args.no_png:
        title = (f"cw / peer, median of {args.reps} reps, 2 workers each — "
                 f"{machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}")
        busiest = max((r.get("foreign_load_cores", 0.0) for r in records), default=0.0)
        if busiest > report.BUSY_CORES:
            title += f"\nmachine not quiet: other load up to {busiest:.2f} cores in a turn"
        problem = report.write_png(args.png, rats, title)
        print(problem or f"png: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
