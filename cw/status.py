"""``python -m cw.status [HOST]`` and ``cw.status.status()``: what the master is doing.

    status() --DEALER: [STATUS]--> master --[STATUS_REPLY, {...}]--> dict

The dict: ``master_id``, ``queue`` (jobs waiting), ``routed`` (results delivered),
``throughput_last_minute`` (results/s), ``time`` (the master's clock),
``discarded`` (results dropped because their client had gone), ``workers`` (name, host, pid,
state, current job and for how long, jobs held, done, failures, seconds since last heard)
and ``clients`` (name, host, pid, queued, running, done, submitted; a named batch's jobs are
those of its pseudo-client "batch:NAME"), ``batches`` (name, jobs, queued, running, done,
failed, cancelled, durable), ``journal`` (its path; None: batches do not outlive the
master) and, with ``--adapt``, ``adapt`` (cw.master.elastic.Elastic.status: limits, workers
wanted, worker jobs, SLURM's pending reasons, squeue calls made).
"""
from __future__ import annotations

import argparse
import json
import sys

from cw.conn.ask import status
from cw.errors import MasterUnreachable, SecurityError


def format_table(info: dict) -> str:
    """A human-readable summary of ``status()``'s dict."""
    lines = [f"master {info['master_id'][:8]}: {len(info['workers'])} workers, "
             f"{len(info['clients'])} clients, {info['queue']} jobs queued, "
             f"{info['routed']} results routed, "
             f"{info.get('throughput_last_minute', 0):.1f}/s over the last minute"]
    if "adapt" in info:  # --adapt (cw.master.elastic)
        a = info["adapt"]
        reasons = ", ".join(f"{n} {r}" for r, n in a["pending_reasons"].items())
        lines.append(f"adapt: {a['min_workers']}-{a['max_workers']} SLURM workers, "
                     f"{a['wanted']} wanted, {a['worker_jobs']} worker jobs "
                     f"({a['pending']} not connected{'; pending: ' + reasons if reasons else ''}"
                     f"), {a['leaving']} leaving, idle timeout {a['idle_timeout']:g} s, "
                     f"{a['squeue_calls']} squeue calls (every {a['interval']:g} s)")
    if info["workers"]:
        lines.append(f"{'worker':<24} {'state':<5} {'held':>4} {'done':>8} {'fail':>5} "
                     f"{'job s':>7} {'heard s':>7}")
        for w in info["workers"]:
            job_s = "" if w["job_seconds"] is None else f"{w['job_seconds']:.1f}"
            lines.append(f"{w['name']:<24} {w['state']:<5} {w['held']:>4} {w['done']:>8} "
                         f"{w['failures']:>5} {job_s:>7} {w['last_heartbeat']:>7.1f}")
    if info["clients"]:
        lines.append(f"{'client':<24} {'queued':>7} {'running':>7} {'done':>8}")
        for c in info["clients"]:
            lines.append(f"{c['name']:<24} {c['queued']:>7} {c['running']:>7} {c['done']:>8}")
    batches = info.get("batches") or []
    if batches:
        where = info.get("journal") or "none: batches do not outlive the master"
        lines.append(f"{'batch':<24} {'jobs':>9} {'done':>9} {'failed':>7} {'queued':>8} "
                     f"{'running':>7} {'progress':>8}   (journal: {where})")
        for b in batches:
            settled = b["done"] + b["failed"] + b["cancelled"]
            share = 100.0 * settled / b["jobs"] if b["jobs"] else 100.0
            lines.append(f"{b['name']:<24} {b['jobs']:>9} {b['done']:>9} {b['failed']:>7} "
                         f"{b['queued']:>8} {b['running']:>7} {share:>7.1f}%")
    lines.extend(sharing_lines(info))
    return "\n".join(lines)


def sharing_lines(info: dict) -> list[str]:
    """The fair share's part of the table: each client's share, use and queued jobs by
    priority; each worker's resources and who holds them; jobs no worker can run."""
    lines = []
    shares = [s for s in info.get("shares", ()) if s["queued"] or s["use"]]
    if shares:
        lines.append(f"policy {info.get('policy', 'fifo')}: {'client':<17} {'share':>6} "
                     f"{'use':>5} {'queued':>7}  by priority")
        for s in shares:
            prios = ", ".join(f"{p}: {n}" for p, n in s["by_priority"].items())
            lines.append(f"{'':<14}{s['client']:<17} {s['share']:>6g} {s['use']:>5} "
                         f"{s['queued']:>7}  {prios}{'  (parked)' if s['parked'] else ''}")
    for w in info["workers"]:
        if w.get("resources"):
            have = ",".join(f"{k}={v:g}" for k, v in sorted(w["resources"].items()))
            held = "; ".join(f"{c} job {q} ({need})" for c, q, need in w["resources_held_by"])
            lines.append(f"worker {w['name']} has {have}; held by: {held or 'nothing'}")
    for wait in info.get("waiting", ()):
        lines.append(f"waiting: {wait['jobs']} jobs of {wait['client']} need "
                     f"{wait['resources']}: {wait['reason']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cw-status", description="Show a cw master's state.")
    parser.add_argument("host", nargs="?", default=None, help="the master's host[:port]")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--insecure", action="store_true",
                        help="plain TCP to a loopback master started with --insecure")
    args = parser.parse_args(argv)
    try:
        info = status(args.host, args.port, args.timeout, args.insecure)
    except (MasterUnreachable, SecurityError) as exc:
        print(f"cw-status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=1) if args.json else format_table(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
