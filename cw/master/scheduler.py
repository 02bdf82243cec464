"""The master's state and routing rules: one owner, no sockets, no clocks of its own.

    client --SUBMIT--> ClientRecord.jobs + queue (cw.master.jobqueue: fair share between
                                   |      clients by default, --policy fifo; priorities)
                              dispatch(): idle workers first, each up to its free slots,
                                   |      only jobs its resources cover (cw.resources)
                                   v
                         WorkerRecord.assigned --JOBS--> worker
    worker --RESULTS--> job leaves assigned and ClientRecord.jobs --> the client's outbox
    flush(): one RESULTS / CANCELLED message per client with news (cw.master.outbox), one
             JOBS per fed worker
    tick(now): peers silent for longer than the timeout are dropped (a set difference);
               a lost worker's jobs go back to the front of the queue, or fail with
               WorkerLost once they have lost ``max_retries`` workers.

Work stealing: prefetched jobs can strand behind a long one. When the queue is empty and a
worker is idle, the master asks the busiest worker to give back the newer half of its
unstarted jobs (a CANCEL the master sent); what comes back goes to the front of the queue.

Deaths: a supervisor's DIED runs the worker-gone path at once, naming how it ended. Every
job a dead worker held becomes a *suspect*, re-run alone on an idle worker, where a death
is charged to it exactly; innocent jobs are never charged.

Bounds: a client's argument bytes here are at most QUOTA_WINDOWS byte windows (``P.window``
of the most workers seen lately; one job always fits); functions at most ``max_functions``
and ``max_function_bytes`` per client (QuotaExceeded past either); results wait in a
client's outbox while its socket queue is full, and past RESULT_BACKLOG bytes its queued
jobs are parked (kept, not dispatched). Nothing is dropped.

Lanes (cw.master.lanes) are called at five points: offer after a JOBS, count in RESULTS,
and the three departures. Everything sent goes through ``send(ident, frames)``: True once
sent, False if the peer is gone, None if its queue is full (send again later).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence

from cw import protocol as P
from cw.defaults import DEFAULT_MAX_RETRIES  # noqa: F401  (named here too)
from cw.errors import ProtocolError, QuotaExceeded
from cw.master import outbox, view
from cw.master.outbox import RESULT_MESSAGE  # noqa: F401  (named here too)
from cw.master.peers import MAX_FUNCTION_BYTES, MAX_FUNCTIONS, QUOTA_WINDOWS  # noqa: F401
from cw.master.records import (  # noqa: F401
    MIN_HOLD,
    RESULT_BACKLOG,
    ClientRecord,
    JobRecord,
    PeerRecord,
    WorkerRecord,
)
from cw.master.stealing import Stealing

log = logging.getLogger(__name__)

MIN_BATCH = 8              # fewest jobs per JOBS message while the queue allows it


class Scheduler(Stealing):
    """All routing state of one master. Not thread-safe: one owner calls it.

    The state and the peers' comings and goings are ``Peers``'s (cw.master.peers), work
    stealing and cancel answers ``Stealing``'s (cw.master.stealing); here: jobs in and out.
    """

    # ---------------------------------------------------------------- clients
    def submit(self, client: ClientRecord, fns: list, jobs: list, frames: list) -> None:
        """Queue a batch of jobs; ``frames`` holds the function frames, then each job's."""
        if not isinstance(fns, list) or not isinstance(jobs, list):
            raise ProtocolError("SUBMIT needs lists of functions and jobs")
        entries = [P.parse_job(j) for j in jobs]
        need = len(fns) + sum(e[2] for e in entries)
        if need != len(frames):
            raise ProtocolError(f"SUBMIT lists {need} frames but carries {len(frames)}")
        for digest, frame in zip(fns, frames):
            self._store_function(client, P.parse_digest(digest), frame)
        pos = len(fns)
        quota = self.quota()
        for seq, digest, n, opts in entries:
            job = JobRecord(client, seq, digest, frames[pos:pos + n], opts)
            pos += n
            if seq in client.jobs:
                continue  # resubmitted while still live: keep the first
            client.jobs[seq] = job
            if digest not in client.functions:  # fail that job, loudly, never silently
                self._fail(job, self._unknown_function(client, seq))
                continue
            size = sum(len(f) for f in job.frames)
            if client.arg_bytes and client.arg_bytes + size > quota:
                self._fail(job, QuotaExceeded(
                    f"job {seq} refused: its client keeps {client.arg_bytes} argument bytes "
                    f"at the master already, and may keep {quota} (twice its byte window)"))
                continue
            job.size = size
            client.arg_bytes += size
            self.queue.push(job)
            client.submitted += 1

    def cancel(self, client: ClientRecord, seqs: list, queued_only: bool = False) -> None:
        """Cancel jobs not yet started; workers are asked about jobs they hold.

        ``queued_only`` (a client's shutdown with cancel_futures): idle workers are fed
        first, then what runs or is next on its worker (ProcessPoolExecutor's call queue)
        runs; the rest is cancelled, also what a worker prefetched behind its next job.
        """
        if queued_only and self.queued:
            self._dispatch()
        for seq in seqs:
            job = client.jobs.get(seq) if isinstance(seq, int) else None
            if job is None or job.started or (queued_only and _about_to_run(job)):
                client.out_cancelled.append([seq, False])
            elif job.worker is None:
                self.queue.cancel(job)
                del client.jobs[seq]
                client.arg_bytes -= job.size
                client.out_cancelled.append([seq, True])
            else:
                self._ask_cancel(job.worker, client.cid, seq)
                continue
            self._dirty[client.ident] = client

    # ---------------------------------------------------------------- workers
    def results(self, worker: WorkerRecord, started: list, done: list, frames: list,
                now: float, busy: float = -1.0, lane: Sequence = ()) -> None:
        """Record jobs a worker started and finished; pass results to their clients.

        ``busy`` is the seconds the worker spent running the ``done`` jobs; ``lane`` lists
        the lane jobs it ran (their clients have their results already): counted only.
        """
        if not isinstance(started, list) or not isinstance(done, list) or \
                not isinstance(busy, (int, float)) or not isinstance(lane, (list, tuple)) \
                or not math.isfinite(busy):
            raise ProtocolError("RESULTS needs lists and a number")
        self.lanes.count(worker, [P.parse_key(e) for e in lane])
        done = [P.parse_done(d) for d in done]
        worker.measured(busy, len(done))
        if sum(d[3] for d in done) != len(frames):
            raise ProtocolError("RESULTS frame count does not match its header")
        finished = {(cid, seq) for cid, seq, _, _ in done}
        for entry in started:
            key = P.parse_key(entry)
            if key in finished:
                continue  # started and done at once: the result says both
            job = worker.assigned.get(key)
            if job is not None:
                job.started = now
                client = job.client
                client.out_started.append(job.seq)
                self._dirty[client.ident] = client
        pos = 0
        release = self.queue.release
        for cid, seq, status, n in done:
            job = worker.assigned.pop((cid, seq), None)
            payload = frames[pos:pos + n]
            pos += n
            worker.stealing.discard((cid, seq))
            worker.cancelling.discard((cid, seq))
            if not worker.assigned:
                self._went_idle = True
            if job is None:
                continue  # not ours any more (cancelled, re-queued after a timeout)
            release(job)  # its client's use drops (fair share); inline: once per result
            if job.opts and "resources" in job.opts:
                worker.capacity.give(job.opts["resources"])
            if job.client.ident not in self.clients:
                self.discarded += 1
                log.info("discarded the result of job %d: client %s has gone",
                         seq, job.client.name)
                continue
            worker.done += 1
            worker.failures += status != P.OK
            if not worker.assigned:
                worker.isolated = False
            self._deliver(job, status, payload)

    # ---------------------------------------------------------------- lanes (cw.master.lanes)
    def lane_busy(self, worker: WorkerRecord, cid: int, seq: int) -> None:
        """LANE_BUSY: see ``Lanes.busy``."""
        self.lanes.busy(worker, cid, seq)

    def lane_refused(self, worker: WorkerRecord, cid: int) -> None:
        """LANE_REFUSED: see ``Lanes.refused``."""
        self.lanes.refused(worker, cid)

    def lane_result(self, worker: WorkerRecord, cid: int, seq: int, status: int, n: int,
                    frames: list) -> None:
        """LANE_RESULT: a lane job's large result, passed on like any result if the lane
        is that worker's (``Lanes.result``), else dropped."""
        client = self.lanes.result(worker, cid, seq, status, n, frames)
        if client is None:
            self.discarded += 1
            return
        outbox.add_result(client, seq, status, frames)
        self._dirty[client.ident] = client

    # ---------------------------------------------------------------- output
    def flush(self) -> None:
        """Feed workers from the queue, then send every outbox that has news."""
        starved = False
        if self.queued:
            # an idle worker left without jobs while some are queued: those wait for
            # resources it lacks, so it may steal like when the queue is empty
            starved = self._dispatch()
            self._went_idle = True  # some worker may have been left idle: check for steals
        if (starved or not self.queued) and self._went_idle:
            self._went_idle = False
            self._steal()
        cancelling, self._cancelling = self._cancelling, {}
        for worker in cancelling.values():
            entries, worker.out_cancel = worker.out_cancel, []
            if entries and worker.ident in self.workers:
                self.send(worker.ident, [P.pack(P.CANCEL, entries)])
        dirty, self._dirty = self._dirty, {}
        if self._full:  # try again those that could not take more last time
            dirty.update(self._full)
            self._full = {}
        for client in dirty.values():
            self._flush_client(client)

    def _flush_client(self, client: ClientRecord) -> None:
        """Send a client's news (cw.master.outbox); what its full queue does not take waits
        here (``_full``) for the next flush."""
        if not outbox.flush_client(client, self.send):
            self._full[client.ident] = client
            return
        self.queue.unpark(client)  # it reads again: what was held back may go out
        if not outbox.flush_cancelled(client, self.send):
            self._full[client.ident] = client

    def _dispatch(self) -> bool:
        """Hand queued jobs to workers with free slots, idle workers first, evenly; True if
        an idle worker got nothing though jobs are still queued (none it can run)."""
        starved = False
        ready = sorted((w for w in self.workers.values() if w.free() > 0),
                       key=lambda w: len(w.assigned))
        for i, worker in enumerate(ready):
            if not self.queued:
                break
            # spread evenly over the rest (ceil); for a worker known to run short jobs (a
            # large hold) in batches of up to MIN_BATCH, so they still travel in batches when
            # hundreds of workers idle. Fresh workers and long jobs: one each.
            share = max(-(-self.queued // (len(ready) - i)), min(worker.hold // 2, MIN_BATCH))
            batch = self.queue.take(min(worker.free(), share), not worker.assigned,
                                    worker.capacity)
            if batch:
                worker.isolated = batch[0].suspect
                self._send_jobs(worker, batch)
            elif not worker.assigned and self.queued:
                starved = True
        return starved

    def _send_jobs(self, worker: WorkerRecord, batch: list[JobRecord]) -> None:
        ctxs, fns, entries = [], [], []
        fn_frames, job_frames = [], []
        for job in batch:
            client = job.client
            cid = client.cid
            if cid not in worker.ctxs:
                worker.ctxs.add(cid)
                ctxs.append([cid, client.cwd, client.path])
            if (cid, job.digest) not in worker.fns:
                worker.fns.add((cid, job.digest))
                fns.append([cid, job.digest])
                fn_frames.append(client.functions[job.digest])
            entries.append([cid, job.seq, job.digest, len(job.frames), job.opts])
            job_frames.extend(job.frames)
            job.worker = worker
            worker.assigned[(cid, job.seq)] = job
        header = P.pack(P.JOBS, ctxs, fns, entries)
        sent = self.send(worker.ident, [header, *fn_frames, *job_frames])
        if not sent:
            # the batch never reached it: back to the front of the queue, uncharged and not
            # suspect; what it held before is charged as in any other death
            for job in batch:
                del worker.assigned[(job.client.cid, job.seq)]
                job.worker = None
            self._left(worker, batch)
            self.queue.give_back(batch, taken=False)
            worker.isolated = False
            worker.ctxs.difference_update(c[0] for c in ctxs)
            worker.fns.difference_update((f[0], f[1]) for f in fns)
            if sent is None:
                return  # its queue is full: it gets them at a later flush
            # its connection is gone without a goodbye: a death, charged like one
            self.peer_gone(worker.ident, "unreachable: its connection was lost")
            return
        self.lanes.offer(list({job.client.ident: job.client for job in batch}.values()), worker)

    # ---------------------------------------------------------------- status
    def status(self, now: float | None = None) -> dict:
        """A plain-data snapshot of the master's state."""
        now = time.time() if now is None else now
        clients = {c: view.client_status(c) for c in self.clients.values()}
        sharing = view.sharing_status(self.queue.describe(), self.workers.values(), clients)
        return {
            "master_id": self.master_id,
            "queue": self.queued,
            "routed": self.routed,
            "discarded": self.discarded,
            "policy": self.queue.policy,
            "workers": [view.worker_status(w, now) for w in self.workers.values()],
            "clients": list(clients.values()),
            **sharing,
        }




def _about_to_run(job: JobRecord) -> bool:
    """The job is among the first MIN_HOLD its worker holds (running, or next to run)."""
    return job.worker is not None and \
        any(held is job for held in itertools.islice(job.worker.assigned.values(), MIN_HOLD))


