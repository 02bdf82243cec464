"""The master's state as plain data: what ``STATUS`` answers and the dashboard draws.

    Scheduler --status(now)--> {"master_id", "queue", "routed", "discarded",
                                "workers": [worker_status], "clients": [client_status]}
"""
from __future__ import annotations

from typing import TYPE_CHECKING

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
    }


def client_status(c: ClientRecord) -> dict:
    """One client's row: its jobs here by state, and what it sent and got."""
    running = sum(1 for j in c.jobs.values() if j.started)
    return {
        "name": c.name, "host": c.host, "pid": c.pid,
        "queued": len(c.jobs) - running, "running": running, "done": c.done,
        "submitted": c.submitted,
    }
