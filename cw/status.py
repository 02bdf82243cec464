"""``python -m cw.status [HOST]`` and ``cw.status.status()``: what the master is doing.

    status() --DEALER: [STATUS]--> master --[STATUS_REPLY, {...}]--> dict

The dict: ``master_id``, ``queue`` (jobs waiting), ``routed`` (results delivered),
``throughput_last_minute`` (results/s), ``time`` (the master's clock),
``discarded`` (results dropped because their client had gone), ``workers`` (name, host, pid,
state, current job and for how long, jobs held, done, failures, seconds since last heard)
and ``clients`` (name, host, pid, queued, running, done, submitted).
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid

import zmq

from cw import protocol as P
from cw.conn import address, security
from cw.errors import MasterUnreachable, SecurityError


def status(host: str | None = None, port: int | None = None,
           timeout: float = 5.0, insecure: bool = False) -> dict:
    """Ask the master for its state; raise MasterUnreachable if it does not answer in time
    (NoKeys, at once, if this user has no connection file with its keys; ``insecure``
    allows plain TCP to a loopback master started with --insecure)."""
    host, port = address.resolve(host, port)
    route = security.route_for(host, port, insecure=insecure)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"status-" + uuid.uuid4().bytes)
    try:
        security.secure_client(sock, route.keys)
        sock.connect(route.endpoint)
        sock.send(P.pack(P.STATUS))
        if not sock.poll(int(timeout * 1000)):
            raise MasterUnreachable(f"no cw master answered at {host}:{port} within "
                                    f"{timeout:g} s")
        header = P.unpack(sock.recv())
        if header[0] != P.STATUS_REPLY:
            raise MasterUnreachable(f"{host}:{port} answered with message kind {header[0]}")
        return header[1]
    finally:
        sock.close()


def format_table(info: dict) -> str:
    """A human-readable summary of ``status()``'s dict."""
    lines = [f"master {info['master_id'][:8]}: {len(info['workers'])} workers, "
             f"{len(info['clients'])} clients, {info['queue']} jobs queued, "
             f"{info['routed']} results routed, "
             f"{info.get('throughput_last_minute', 0):.1f}/s over the last minute"]
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
