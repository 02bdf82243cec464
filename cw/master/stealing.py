"""Work stealing and cancel answers: jobs a worker gives back.

    queue empty, a worker idle --> _steal(): the busiest worker is asked (CANCEL, sent by
        the master) for the newer half of its unstarted jobs (all of them behind a long
        lane job); the keys asked are kept per worker (``stealing``), never counted
    worker --CANCELLED [[cid, seq, ok]]--> cancelled(): a steal given back goes to the
        front of the queue in its order; a client's cancel is answered to the client;
        answers nobody asked for are ignored
"""
from __future__ import annotations

from cw.master.peers import Peers
from cw.master.records import JobRecord, WorkerRecord


class Stealing(Peers):
    """Taking prefetched jobs back, and the answers to cancels."""

    def cancelled(self, worker: WorkerRecord, entries: list) -> None:
        """A worker answered cancel requests: ok means it dropped the job unstarted.
        Answers nobody asked for are ignored (they would drop a client's job unsettled)."""
        stolen: list[JobRecord] = []
        for entry in entries:
            cid, seq, ok = entry
            if (cid, seq) in worker.stealing:
                stolen.extend(self._stolen(worker, (cid, seq), bool(ok)))
                continue
            job = worker.assigned.get((cid, seq))
            if (cid, seq) not in worker.cancelling:
                continue
            worker.cancelling.discard((cid, seq))
            if job is None:
                continue
            if ok:  # dropped unstarted: the worker no longer holds it, whoever asked
                del worker.assigned[(cid, seq)]
                self._left(worker, (job,))
                if job.client.jobs.pop(seq, None) is job:
                    job.client.arg_bytes -= job.size
                worker.isolated = worker.isolated and bool(worker.assigned)
            client = self.by_cid.get(cid)
            if client is not None:
                client.out_cancelled.append([seq, bool(ok)])
                self._dirty[client.ident] = client
        self.queue.give_back(stolen, taken=False)  # the front, in their order

    def _stolen(self, worker: WorkerRecord, key: tuple[int, int], ok: bool) -> list[JobRecord]:
        """A steal answered: the job given back, to queue again (none if it stays)."""
        worker.stealing.discard(key)
        job = worker.assigned.get(key)
        if job is None or not ok:
            return []  # finished meanwhile, or started: it stays where it runs
        del worker.assigned[key]
        self._left(worker, (job,))
        job.worker = None
        worker.isolated = worker.isolated and bool(worker.assigned)
        if job.client.ident in self.clients and job.seq in job.client.jobs:
            return [job]
        return []

    def _steal(self) -> None:
        """Queue empty, a worker idle: take back half the unstarted jobs of the busiest."""
        if all(w.assigned for w in self.workers.values()):
            return
        victim = max((w for w in self.workers.values() if not w.stealing and not w.isolated),
                     key=lambda w: len(w.assigned) + 2 * _on_lane(w), default=None)
        if victim is None or len(victim.assigned) < (1 if _on_lane(victim) else 2):
            return
        # jobs that need resources stay where they fit (the thief may lack them)
        waiting = [j for j in victim.assigned.values()
                   if not j.started and not (j.opts and "resources" in j.opts)]
        # the newer half, rounded up (all of them behind a long lane job); the worker's
        # answer is exact (a job it already started stays), so even the oldest may be asked
        for job in waiting[0 if _on_lane(victim) else len(waiting) // 2:]:
            victim.stealing.add((job.client.cid, job.seq))
            self._ask_cancel(victim, job.client.cid, job.seq, steal=True)


def _on_lane(worker: WorkerRecord) -> bool:
    """The worker runs a long lane job (it said LANE_BUSY)."""
    return worker.lane is not None and worker.lane.job is not None
