"""A worker that drains (cw.worker.drain): its allocation ends, or SLURM signalled it.

    worker --DRAIN reason [[cid, seq]]--> drain(): the worker gets nothing more (``free()``
        is 0), the unstarted jobs it gives back go to the front of the queue, uncharged and
        not suspect; what it runs stays with it until its result and its BYE
    its BYE, or its loss while draining or at/after its announced allocation end -->
        Peers._worker_gone: an eviction (WorkerRecord.evicted), its jobs re-queued
        uncharged, and the log says why
"""
from __future__ import annotations

import logging

from cw import protocol as P
from cw.errors import ProtocolError
from cw.master.records import JobRecord, WorkerRecord
from cw.master.scheduler import Scheduler

log = logging.getLogger(__name__)


def drain(sched: Scheduler, worker: WorkerRecord, reason, keys) -> None:
    """Handle a worker's DRAIN: it takes nothing more; the jobs it gives back are queued."""
    if not isinstance(reason, str) or not isinstance(keys, list):
        raise ProtocolError("DRAIN needs a reason and a list of jobs")
    first = not worker.draining
    worker.draining = reason[:512] or "draining"
    back: list[JobRecord] = []
    left: list[JobRecord] = []
    for entry in keys:
        key = P.parse_key(entry)
        job = worker.assigned.get(key)
        worker.stealing.discard(key)
        if job is None or job.started:
            continue  # not ours any more, or it runs there (it finishes)
        del worker.assigned[key]
        job.worker = None
        left.append(job)
        if job.client.ident in sched.clients and job.client.jobs.get(job.seq) is job:
            back.append(job)
    worker.isolated = worker.isolated and bool(worker.assigned)
    sched._left(worker, left)  # its client's use and its resources, released once
    sched.queue.give_back(back, taken=False)  # to the front, uncharged, not suspect
    if back:
        sched._wake()
    log.log(logging.INFO if first or back else logging.DEBUG,
            "worker %s on %s drains (%s): %d jobs given back, %d still held", worker.name,
            worker.host, worker.draining, len(back), len(worker.assigned))
