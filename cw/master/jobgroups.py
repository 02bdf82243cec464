"""One client's queued jobs in the JobQueue (cw.master.jobqueue): lanes and groups.

    QueueBase  the fair heap of groups and the fifo take (JobQueue builds on it)
    Group   one client's queue (fair policy) or everyone's (fifo) and its use of workers
      Lane  the group's jobs that need the same resources: one deque per priority

The JobQueue owns every Group and Lane and decides who goes next; here only the containers
and the status scan (describe_group).
"""
from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from cw.resources import Capacity, describe

log = logging.getLogger(__name__)

FIFO = object()  # the client key of the fifo policy's one group
SMALL = 8         # up to this many clients with queued work, the next is found by a scan


class Lane:
    """One group's jobs that need the same resources: a deque per priority."""

    __slots__ = ("need", "buckets", "prios", "owner")

    def __init__(self, need: dict | None, owner: Group):
        self.need = need
        self.owner = owner
        self.buckets: dict[float, deque] = {}
        self.prios: list[float] = []          # heap of -priority, one per bucket

    def add(self, job: Any, prio: float, front: bool) -> None:
        bucket = self.buckets.get(-prio)
        if bucket is None:
            bucket = self.buckets[-prio] = deque()
            heapq.heappush(self.prios, -prio)
            self.owner.nbuckets += 1
            if prio == 0 and self.need is None:
                self.owner.plain = bucket
        if front:
            bucket.appendleft(job)
        else:
            bucket.append(job)

    def head(self) -> Any:
        """The next live job (cancelled ones are dropped here), None if there is none."""
        while self.prios:
            bucket = self.buckets[self.prios[0]]
            while bucket:
                job = bucket[0]
                if not job.cancelled:
                    return job
                bucket.popleft()
            self.drop_top()
        return None

    def pop(self) -> None:
        """Remove the head that head() returned."""
        bucket = self.buckets[self.prios[0]]
        bucket.popleft()
        if not bucket:
            self.drop_top()

    def drop_top(self) -> None:
        """Forget the (empty) bucket of the highest priority."""
        bucket = self.buckets.pop(heapq.heappop(self.prios))
        self.owner.nbuckets -= 1
        if bucket is self.owner.plain:
            self.owner.plain = None

    def jobs(self) -> Iterable[Any]:
        for bucket in self.buckets.values():
            yield from bucket


class Group:
    """One client's queue (fair), or everyone's (fifo), and its use of the workers."""

    __slots__ = ("client", "share", "use", "live", "lanes", "stamp", "version", "active",
                 "parked", "plain", "nbuckets")

    def __init__(self, client: Hashable, share: float, stamp: int):
        self.client = client
        self.share = share
        self.use = 0          # jobs handed out, not yet released
        self.live = 0         # live jobs queued
        self.lanes: dict[Any, Lane] = {}
        self.stamp = stamp    # when last served (round robin among equal use/share)
        self.version = 0      # bumped when its heap key changes: older entries are stale
        self.active = False   # in the fair heap: has live jobs and is not parked
        self.parked = False
        self.plain: deque | None = None  # the bucket of priority 0, no resources, if any
        self.nbuckets = 0     # buckets in all its lanes (1 and plain: the fast paths)

    def key(self) -> list:
        return [self.use / self.share, self.stamp, self.version, self]


class QueueBase:
    """The JobQueue's bookkeeping: the fair heap of groups, and the fifo policy's take."""

    fair: bool
    _held: Callable[[Any], bool] | None
    _live: int
    _stamp: int
    _active: dict[Group, None]
    _heap: list[list]
    _parked: dict[Any, list]
    _fifo: Group

    def _head(self, group: Group, capacity: Capacity | None) -> tuple[Any, Any]:
        raise NotImplementedError

    def _take_fifo(self, n: int, idle: bool, capacity: Capacity | None, batch: list) -> None:
        group, held = self._fifo, self._held
        bucket = group.plain
        if bucket is not None and group.nbuckets == 1:
            # no priorities, no resources: the Scheduler's old _take on its deque
            parked = self._parked
            while bucket and len(batch) < n:
                job = bucket[0]
                if job.suspect and not job.cancelled and (batch or not idle):
                    break
                bucket.popleft()
                if job.cancelled:
                    continue
                if held is not None and held(job.client):
                    parked.setdefault(job.client, []).append(job)  # still counted live
                    continue
                batch.append(job)
                if job.suspect:
                    break
            group.live -= len(batch)
            self._live -= len(batch)
            return
        while len(batch) < n and group.live:
            lane, job = self._head(group, capacity)
            if job is None:
                break
            if job.suspect and (batch or not idle):
                break
            lane.pop()
            if held is not None and held(job.client):
                self._parked.setdefault(job.client, []).append(job)  # still counted live
                continue
            group.live -= 1
            self._live -= 1
            batch.append(job)
            if lane.need is not None and capacity is not None:
                capacity.take(lane.need)
            if job.suspect:
                break
        if not group.live:
            group.active = False

    def _served(self, group: Group, k: int) -> None:
        self._live -= k
        group.live -= k
        group.use += k
        self._stamp += 1
        group.stamp = self._stamp
        if group.live <= 0:
            self._deactivate(group)
        else:
            self._rekey(group)

    # ---------------------------------------------------------------- the fair heap
    def _activate(self, group: Group) -> None:
        group.active = True
        if not self.fair:
            return
        self._active[group] = None
        if len(self._active) == SMALL + 1:
            self._rebuild()
        elif len(self._active) > SMALL + 1:
            group.version += 1
            heapq.heappush(self._heap, group.key())

    def _deactivate(self, group: Group) -> None:
        if group.active:
            group.active = False
            self._active.pop(group, None)
            if len(self._active) <= SMALL:
                self._heap.clear()

    def _rekey(self, group: Group) -> None:
        if group.active and len(self._active) > SMALL:
            group.version += 1
            heapq.heappush(self._heap, group.key())
            if len(self._heap) > 4 * len(self._active) + 64:
                self._rebuild()

    def _rebuild(self) -> None:
        for group in self._active:
            group.version += 1
        self._heap[:] = [group.key() for group in self._active]
        heapq.heapify(self._heap)


def describe_group(group: Group, client: Any) -> dict:
    """A group's share, use and queued jobs by priority and by the resources they wait for
    (a scan of its queue: for status, not for routing)."""
    by_prio: dict[float, int] = {}
    by_need: dict[str, int] = {}
    for lane in group.lanes.values():
        for negp, bucket in lane.buckets.items():
            live = sum(not j.cancelled for j in bucket)
            if live:
                by_prio[-negp] = by_prio.get(-negp, 0) + live
                if lane.need:
                    name = describe(lane.need)
                    by_need[name] = by_need.get(name, 0) + live
    return {"client": client, "share": group.share, "use": group.use, "queued": group.live,
            "parked": group.parked, "by_priority": by_prio, "waiting_for": by_need}
