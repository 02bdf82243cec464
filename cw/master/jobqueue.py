"""The master's queue of jobs not yet given to a worker: who goes next.

    submit       --> push(job)                   to the back of its client's queue
    re-queue     --> give_back(jobs)             to the front of their clients' queues, in order
    a worker     --> take(n, idle, capacity)     up to n jobs for one worker
    job leaves a worker (result, cancel, death)  --> release(job)    (fair: its client's use)
    client gone  --> drop(client);  cancel(job) for one queued job (skipped lazily)

Policies:
  fair (default): each client with queued work gets an equal share of the workers, weighted
    by its ``share`` (set_share; ClusterExecutor(host, share=2.0)). A client's *use* is the
    number of its jobs handed out and not yet released (prefetched or running); the next
    batch comes from the client with the lowest use/share, ties in round robin (the one
    served longest ago). Fairness is decided per batch (one worker's take), not per job: the
    chosen client fills the batch from its queue at a deque's cost. A worker's batch is
    what it may hold (~5 ms of work, at least one job), so a client that arrives while
    another's backlog fills every worker gets the very next slots that free up, behind at
    most what each worker already holds. Releases only mark a client (re-keyed once at the
    next take), so a result costs no heap work.
  fifo: one queue for all clients, in arrival order (``--policy fifo``; today's behaviour).

Within a client (fair) or the whole queue (fifo): higher ``priority`` (job option, default 0)
first, FIFO among equals; a job given back goes to the front of its priority. Jobs are kept
in one deque per (resources needed, priority), so one client with priority 0 costs about a
deque: push and take are O(1) plus, per batch, the choice between clients: a scan of up to
SMALL (8) clients with queued work, else a heap of (use/share, last served) with lazily
dropped stale entries (O(log clients)); O(log priorities) for a new priority, O(resource
classes) to find a head that fits.

Resources: a job's ``resources`` option; take() given a worker's Capacity hands out only
jobs that fit it (cw.resources) and charges them to it; jobs that fit nowhere wait.

Suspects (jobs held by a worker that died) go alone, and only to an idle worker: a suspect at
the head ends the batch (as in the Scheduler before). Parking: ``held(client)`` (the client's
results back up) is asked when a client is chosen; a held client's jobs stay queued but are
not handed out until unpark(client).
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from cw.master.jobgroups import FIFO, SMALL, Group, Lane, QueueBase, describe_group
from cw.resources import Capacity, need_key

log = logging.getLogger(__name__)

POLICIES = ("fair", "fifo")


class QueuedJob(Protocol):
    """What the queue reads of a job (cw.scheduler.Job has it)."""

    cancelled: bool

    @property
    def client(self) -> Hashable: ...
    @property
    def seq(self) -> int: ...
    @property
    def suspect(self) -> bool: ...
    @property
    def opts(self) -> Any: ...


J = TypeVar("J", bound=QueuedJob)


class JobQueue(QueueBase, Generic[J]):
    """Queued jobs of all clients; see the module docstring for the policies."""

    def __init__(self, policy: str = "fair",
                 held: Callable[[Any], bool] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self.fair = policy == "fair"
        self._held = held
        self._live = 0
        self._stamp = 0
        self._groups: dict[Any, Group] = {}
        self._active: dict[Group, None] = {}    # groups with live, unparked jobs (ordered)
        self._heap: list[list] = []              # fair, with >= 2 active groups only
        self._parked: dict[Any, list] = {}       # fifo: a held client's jobs, taken out
        self._needs = 0                          # lanes that need resources (0: skip fits)
        self._released: dict[Group, None] = {}   # groups whose use dropped since a take
        if not self.fair:
            self._fifo = Group(FIFO, 1.0, 0)
            self._groups[FIFO] = self._fifo

    def __len__(self) -> int:
        """Live (not cancelled) jobs queued, parked ones included."""
        return self._live

    # ---------------------------------------------------------------- shares
    def set_share(self, client: Hashable, share: float) -> None:
        """Weigh a client: it gets ``share`` times a default client's part of the workers."""
        if not share > 0 or share == float("inf"):
            raise ValueError(f"a client's share must be a finite number > 0, not {share!r}")
        if not self.fair:
            return  # one queue in arrival order: shares do not apply
        group = self._group(client)
        group.share = float(share)
        self._rekey(group)

    def use(self, client: Hashable) -> int:
        """The client's jobs handed out and not released (fair policy; 0 under fifo)."""
        group = self._groups.get(client) if self.fair else None
        return group.use if group else 0

    def _group(self, client: Hashable) -> Group:
        key = client if self.fair else FIFO
        group = self._groups.get(key)
        if group is None:
            self._stamp += 1
            group = self._groups[key] = Group(client, 1.0, self._stamp)
        return group

    # ---------------------------------------------------------------- in
    def push(self, job: J) -> None:
        """Queue a new job at the back (of its priority)."""
        group = self._groups.get(job.client if self.fair else FIFO)
        if group is not None and group.plain is not None and not job.opts:
            group.plain.append(job)   # the common case: priority 0, no resources
            self._live += 1
            group.live += 1
            if not group.active and not group.parked:
                self._activate(group)
            return
        self._add(job, False)

    def give_back(self, jobs: Iterable[J], taken: bool = True) -> None:
        """Put jobs back at the front of their clients' queues, in the order given (each at
        the front of its priority); ``taken``: they were handed out, so release them too."""
        for job in reversed(list(jobs)):
            if taken:
                self.release(job)
            self._add(job, True)

    def _add(self, job: J, front: bool) -> None:
        group = self._group(job.client)
        opts = job.opts
        if opts:
            prio = opts.get("priority", 0) or 0
            need = opts.get("resources") or None
        else:
            prio, need = 0, None
        lanekey = need_key(need)
        lane = group.lanes.get(lanekey)
        if lane is None:
            lane = group.lanes[lanekey] = Lane(need, group)
            self._needs += need is not None
        lane.add(job, prio, front)
        self._live += 1
        group.live += 1
        if not group.active and not group.parked:
            self._activate(group)

    # ---------------------------------------------------------------- out
    def cancel(self, job: J) -> None:
        """A queued job is cancelled: it no longer counts and is skipped when reached."""
        if job.cancelled:
            return
        job.cancelled = True
        self._live -= 1
        group = self._groups.get(job.client if self.fair else FIFO)
        if group is None:
            return
        group.live -= 1
        if group.live <= 0 and self.fair:
            self._deactivate(group)
            self._clear(group)

    def drop(self, client: Hashable) -> int:
        """Forget a client (it left): its queued jobs are cancelled; returns how many."""
        if self.fair:
            group = self._groups.pop(client, None)
            if group is None:
                return 0
            self._deactivate(group)
            dropped = group.live
            self._clear(group)
        else:
            dropped = 0
            parked = self._parked.pop(client, [])
            lanes = self._fifo.lanes.values()
            for job in (*parked, *(j for lane in lanes for j in lane.jobs())):
                if job.client == client and not job.cancelled:
                    job.cancelled = True
                    dropped += 1
            self._fifo.live -= dropped   # parked jobs count as queued too
        self._live -= dropped
        return dropped

    def _clear(self, group: Group) -> None:
        self._needs -= sum(lane.need is not None for lane in group.lanes.values())
        group.lanes.clear()
        group.live = 0
        group.plain = None
        group.nbuckets = 0

    def release(self, job: QueuedJob) -> None:
        """A handed-out job left its worker (result, cancelled, stolen, worker lost): its
        client's use drops (fair policy; nothing to do under fifo)."""
        if not self.fair:
            return
        group = self._groups.get(job.client)
        if group is not None and group.use > 0:
            group.use -= 1
            if group.active and len(self._active) > SMALL:
                self._released[group] = None  # re-keyed once, at the next take

    def unpark(self, client: Hashable) -> None:
        """A held client reads its results again: its jobs may go out again."""
        if self.fair:
            group = self._groups.get(client)
            if group is not None and group.parked:
                group.parked = False
                if group.live:
                    self._activate(group)
            return
        live = [job for job in self._parked.pop(client, ()) if not job.cancelled]
        self._fifo.live -= len(live)   # _add counts them again
        self._live -= len(live)
        for job in reversed(live):
            self._add(job, True)

    def take(self, n: int, idle: bool = True, capacity: Capacity | None = None) -> list[J]:
        """Up to ``n`` jobs for one worker, in policy order; with ``capacity`` only jobs that
        fit it, each charged to it (capacity.take). A suspect job goes alone, and only to an
        idle worker (``idle``: it holds nothing); one at the head ends the batch."""
        batch: list[J] = []
        if not self._live:
            return batch
        if capacity is not None and not self._needs:
            capacity = None
        active = self._active
        if len(active) == 1 and capacity is None:
            group = next(iter(active))
            bucket = group.plain
            if bucket and group.nbuckets == 1 and \
                    (self._held is None or not self._held(group.client)):
                # the common case: one client, priority 0, no resources: a deque's work
                while bucket and len(batch) < n:
                    job = bucket[0]
                    if job.cancelled:
                        bucket.popleft()
                    elif job.suspect:
                        break
                    else:
                        batch.append(bucket.popleft())
                if batch:
                    k = len(batch)
                    self._live -= k
                    group.live -= k
                    group.use += k
                    self._stamp += 1
                    group.stamp = self._stamp
                    if group.live <= 0:
                        self._deactivate(group)
                    return batch
        if not self.fair:
            self._take_fifo(n, idle, capacity, batch)
            return batch
        skipped: list[list] = []
        passed: set[Group] = set()    # chosen, but nothing of theirs fits this batch
        heap = self._heap
        if self._released:  # their use dropped since the last take: fresh heap keys
            for released in self._released:
                self._rekey(released)
            self._released.clear()
        while len(batch) < n and self._live:
            entry: list | None = None
            if len(active) == 1:
                group = next(iter(active))
            elif len(active) <= SMALL:
                # a few clients: the lowest use/share (then served longest ago) by a scan,
                # with no heap to keep up to date on every result
                found: Group | None = None
                low = 0.0
                for candidate in active:
                    if candidate in passed:
                        continue
                    key = candidate.use / candidate.share
                    if found is None or key < low or \
                            (key == low and candidate.stamp < found.stamp):
                        found, low = candidate, key
                if found is None:
                    break
                group = found
                entry = [low, group.stamp, group.version, group]  # pushed back only in a heap
            else:
                while heap and (heap[0][2] != heap[0][3].version or not heap[0][3].active):
                    heapq.heappop(heap)
                if not heap:
                    break
                entry = heapq.heappop(heap)
                group = entry[3]
            if self._held is not None and self._held(group.client):
                group.parked = True
                self._deactivate(group)
                continue
            lane, job = self._head(group, capacity)
            if job is None:
                if not group.active:
                    continue       # it had only cancelled jobs: gone from the heap
                if entry is None:
                    break          # the only client has nothing that fits
                skipped.append(entry)
                passed.add(group)
                continue
            if job.suspect and (batch or not idle):
                if entry is not None:
                    skipped.append(entry)
                break
            if len(group.lanes) == 1 and lane.need is None and not job.suspect:
                # fairness per batch, not per job: the chosen client fills the batch from
                # its lane (a worker holds ~5 ms of work, so a client that arrives later
                # waits behind at most that on each worker)
                self._run(group, lane, n, batch)
                continue
            lane.pop()
            batch.append(job)
            self._served(group, 1)
            if lane.need is not None and capacity is not None:
                capacity.take(lane.need)
            if job.suspect:
                break
        if len(active) > SMALL:
            for entry in skipped:
                heapq.heappush(heap, entry)
        return batch

    def _head(self, group: Group, capacity: Capacity | None) -> tuple[Any, Any]:
        """The group's next job that fits (and its lane); (None, None) if none does."""
        lanes = group.lanes
        if len(lanes) == 1:
            for key, lane in lanes.items():
                job = lane.head()
                if job is None:
                    del lanes[key]
                    self._needs -= lane.need is not None
                    self._deactivate(group)
                    return None, None
                if capacity is not None and not capacity.fits(lane.need):
                    return None, None
                return lane, job
        best = best_lane = None
        best_key: tuple = ()
        for key, lane in list(lanes.items()):
            job = lane.head()
            if job is None:
                del lanes[key]
                self._needs -= lane.need is not None
                continue
            if capacity is not None and not capacity.fits(lane.need):
                continue
            rank = (lane.prios[0], job.seq)
            if best is None or rank < best_key:
                best, best_lane, best_key = job, lane, rank
        if not lanes:
            self._deactivate(group)
        return best_lane, best

    def _run(self, group: Group, lane: Lane, n: int, batch: list) -> None:
        """Take the lane's jobs of its first priority up to the batch's size, stopping
        before a suspect (fairness is per batch: see the module docstring)."""
        bucket = lane.buckets[lane.prios[0]]
        got = 0
        want = n - len(batch)
        while got < want and bucket:
            job = bucket[0]
            if job.cancelled:
                bucket.popleft()
                continue
            if job.suspect:
                break
            batch.append(bucket.popleft())
            got += 1
        if not bucket:
            lane.drop_top()
        self._served(group, got)

    # ---------------------------------------------------------------- status
    def describe(self) -> list[dict]:
        """Per client (fair) or for all (fifo): share, use, queued jobs by priority and by
        the resources they wait for (a scan of the queue: for status, not for routing)."""
        return [describe_group(group, None if group.client is FIFO else group.client)
                for group in self._groups.values()]
