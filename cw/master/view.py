"""The master's state as plain data: what ``STATUS`` answers and the dashboard draws.

    Scheduler --status(now)--> {"master_id", "queue", "routed", "discarded", "policy",
                                "workers": [worker_status], "clients": [client_status],
                                "shares": [per client: share, use, queued by priority],
                                "waiting": [jobs waiting for resources no worker offers]}
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from cw.resources import describe, fits

if TYPE_CHECKING:
    from cw.master.records import ClientRecord, WorkerRecord


def worker_status(w: WorkerRecord, now: float) -> dict:
    """One worker's row: what it runs (a held job or a long lane job), holds and did."""
    job = w.running()
    lane_job = w.lane.job if w.lane is not None else None
    return {
        "name": w.name, "host": w.host, "pid": w.pid,
        "state": "busy" if w.assigned or lane_job else "idle",
        "job": [job.client.name, job.seq] if job else
               ([w.lane.job_client, lane_job[1]] if w.lane is not None and lane_job else None),
        "job_seconds": round(now - job.started, 3) if job else None,
        "held": len(w.assigned), "hold": w.hold, "done": w.done, "failures": w.failures,
        "last_heartbeat": round(now - w.last_seen, 3),
        "resources": dict(w.capacity.total), "resources_used": dict(w.capacity.used),
        # who holds its resources: the held jobs that asked for some, as [client, seq, need]
        "resources_held_by": [[j.client.name, j.seq, describe(j.opts["resources"])]
                              for j in w.assigned.values()
                              if j.opts and "resources" in j.opts],
    }


def client_status(c: ClientRecord) -> dict:
    """One client's row: its jobs here by state, and what it sent and got."""
    running = sum(1 for j in c.jobs.values() if j.started)
    return {
        "name": c.name, "host": c.host, "pid": c.pid,
        "queued": len(c.jobs) - running, "running": running, "done": c.done,
        "submitted": c.submitted,
    }


def sharing_status(groups: list[dict], workers: Iterable[WorkerRecord],
                   rows: dict | None = None) -> dict:
    """The queue's part (JobQueue.describe): each client's share, use and queued jobs by
    priority (also added to its row in ``rows``, client -> client_status); and the jobs whose
    resources no connected worker offers, with what they ask."""
    totals = [w.capacity.total for w in workers]
    shares, waiting = [], []
    for g in groups:
        client = g["client"]
        name = client.name if client is not None else "*"  # fifo: one queue for all
        row = rows.get(client) if rows else None
        shares.append({"client": name, "share": g["share"], "use": g["use"],
                       "queued": g["queued"], "parked": g["parked"],
                       "by_priority": {str(int(p) if p == int(p) else p): n
                                       for p, n in sorted(g["by_priority"].items(),
                                                          reverse=True)},
                       "waiting_for": g["waiting_for"]})
        if row is not None:
            row.update(share=g["share"], by_priority=shares[-1]["by_priority"])
        for need, n in g["waiting_for"].items():
            asked = _need_of(need)
            if not any(fits(asked, total) for total in totals):
                waiting.append({"client": name, "jobs": n, "resources": need,
                                "reason": f"no connected worker offers {need}"})
    return {"shares": shares, "waiting": waiting}


def _need_of(text: str) -> dict[str, float]:
    """``"gpu=1,mem=64"`` (cw.resources.describe) back to a map."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        out[name] = float(value)
    return out
