"""cw.jobqueue in-process: a pure data structure, so plain objects stand in for the master's
jobs and clients, and the issue's example runs on a tiny event loop with a fake clock (no
processes, no sleeps); each test runs in milliseconds."""
from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from cw.master.jobqueue import JobQueue
from cw.resources import Capacity


class Job:
    __slots__ = ("client", "seq", "cancelled", "suspect", "opts")

    def __init__(self, client: str, seq: int, opts: dict | None = None, suspect=False):
        self.client = client
        self.seq = seq
        self.cancelled = False
        self.suspect = suspect
        self.opts = opts

    def __repr__(self) -> str:
        return f"{self.client}{self.seq}"


def jobs(client: str, n: int, first: int = 1, **opts) -> list[Job]:
    return [Job(client, s, opts or None) for s in range(first, first + n)]


def names(batch) -> list[str]:
    return [repr(j) for j in batch]


def ones(q: JobQueue, n: int) -> list[str]:
    """``n`` batches of one job each (n workers asking for one): the order they go in."""
    return [repr(j) for _ in range(n) for j in q.take(1)]


def test_fifo_order_is_a_deques():
    rng = random.Random(16)
    q: JobQueue[Job] = JobQueue("fifo")
    ref: deque[Job] = deque()
    seq = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.5:
            seq += 1
            job = Job(rng.choice("ABC"), seq)
            q.push(job)
            ref.append(job)
        elif op < 0.8:
            n = rng.randint(1, 8)
            want = [ref.popleft() for _ in range(min(n, len(ref)))]
            assert q.take(n) == want
            if want and rng.random() < 0.3:
                back = want[rng.randint(0, len(want) - 1):]
                q.give_back(back)
                ref.extendleft(reversed(back))
        elif ref and op < 0.9:
            job = rng.choice(ref)
            if not job.cancelled:
                q.cancel(job)
                ref.remove(job)
        assert len(q) == len(ref)
    assert q.take(len(ref) + 1) == list(ref)


def test_two_clients_take_turns():
    q: JobQueue[Job] = JobQueue()
    for job in jobs("A", 6):
        q.push(job)
    for job in jobs("B", 3):
        q.push(job)
    # fairness is decided per batch (one worker's take): turns between batches
    assert ones(q, 6) == ["A1", "B1", "A2", "B2", "A3", "B3"]
    assert names(q.take(6)) == ["A4", "A5", "A6"]  # only A has work left
    assert q.use("A") == 6 and q.use("B") == 3 and len(q) == 0


def test_a_batch_comes_from_the_client_with_the_lowest_use():
    q: JobQueue[Job] = JobQueue()
    for job in jobs("A", 6) + jobs("B", 6):
        q.push(job)
    assert names(q.take(3)) == ["A1", "A2", "A3"]   # one client's run: a deque's cost
    assert names(q.take(3)) == ["B1", "B2", "B3"]   # the next worker's batch: B's turn
    assert names(q.take(2)) == ["A4", "A5"]


def test_use_counts_what_runs_until_released():
    q: JobQueue[Job] = JobQueue()
    a = jobs("A", 10)
    for job in a:
        q.push(job)
    running = q.take(4)               # A alone: a batch
    assert names(running) == ["A1", "A2", "A3", "A4"]
    for job in jobs("B", 10):
        q.push(job)
    # B is below its share while A holds 4 jobs: B's jobs go first, then turns
    assert ones(q, 6) == ["B1", "B2", "B3", "B4", "A5", "B5"]
    for job in running:
        q.release(job)                # A's 4 are done: A is now far below B
    assert names(q.take(3)) == ["A6", "A7", "A8"]


def test_share_two_gets_twice():
    q: JobQueue[Job] = JobQueue()
    q.set_share("A", 2.0)
    for job in jobs("A", 100) + jobs("B", 100):
        q.push(job)
    batch = [job for _ in range(60) for job in q.take(1)]
    assert sum(j.client == "A" for j in batch) == 40
    with pytest.raises(ValueError):
        q.set_share("B", 0)


def test_priorities_within_a_client_fifo_among_equals():
    q: JobQueue[Job] = JobQueue()
    q.push(Job("A", 1))
    q.push(Job("A", 2, {"priority": 10}))
    q.push(Job("A", 3, {"priority": -1}))
    q.push(Job("A", 4, {"priority": 10}))
    q.push(Job("A", 5))
    assert names(q.take(10)) == ["A2", "A4", "A1", "A5", "A3"]


def test_priority_does_not_jump_other_clients_share():
    q: JobQueue[Job] = JobQueue()
    for job in jobs("A", 3, priority=100):
        q.push(job)
    for job in jobs("B", 3):
        q.push(job)
    assert ones(q, 4) == ["A1", "B1", "A2", "B2"]


def test_give_back_goes_to_the_front_in_order():
    for policy in ("fair", "fifo"):
        q: JobQueue[Job] = JobQueue(policy)
        for job in jobs("A", 6):
            q.push(job)
        first = q.take(4)
        q.give_back(first[1:])        # e.g. stolen: the newer three
        assert names(q.take(10)) == ["A2", "A3", "A4", "A5", "A6"], policy
        if policy == "fair":
            assert q.use("A") == 6   # 4 taken, 3 released by give_back, 5 taken


def test_cancelled_jobs_are_skipped_and_not_counted():
    q: JobQueue[Job] = JobQueue()
    a, b = jobs("A", 4), jobs("B", 2)
    for job in a + b:
        q.push(job)
    q.cancel(a[0])
    q.cancel(a[2])
    q.cancel(b[0])
    q.cancel(b[1])                    # B has nothing left: it no longer competes
    assert len(q) == 2
    assert names(q.take(5)) == ["A2", "A4"]
    assert len(q) == 0 and q.take(1) == []


def test_drop_client():
    for policy in ("fair", "fifo"):
        q: JobQueue[Job] = JobQueue(policy)
        for job in jobs("A", 3) + jobs("B", 3):
            q.push(job)
        assert q.drop("A") == 3, policy
        assert len(q) == 3
        assert names(q.take(10)) == ["B1", "B2", "B3"]
        assert q.drop("A") == 0


def test_parked_client_waits_others_go_on():
    held: set[str] = set()
    for policy in ("fair", "fifo"):
        q: JobQueue[Job] = JobQueue(policy, held=held.__contains__)
        for job in jobs("A", 3) + jobs("B", 3):
            q.push(job)
        held.add("A")
        assert names(q.take(10)) == ["B1", "B2", "B3"], policy
        assert len(q) == 3            # A's jobs are still queued
        held.clear()
        q.unpark("A")
        assert names(q.take(10)) == ["A1", "A2", "A3"], policy


def test_suspect_goes_alone_to_an_idle_worker():
    for policy in ("fair", "fifo"):
        q: JobQueue[Job] = JobQueue(policy)
        q.push(Job("A", 1))
        q.give_back([Job("A", 0, suspect=True)], taken=False)
        assert q.take(5, idle=False) == [], policy
        assert names(q.take(5, idle=True)) == ["A0"]
        assert names(q.take(5, idle=False)) == ["A1"]


def test_a_gpu_job_waits_for_a_worker_with_a_gpu():
    for policy in ("fair", "fifo"):
        q: JobQueue[Job] = JobQueue(policy)
        q.push(Job("A", 1, {"resources": {"gpu": 1}}))
        q.push(Job("A", 2))
        q.push(Job("A", 3, {"resources": {"gpu": 1}}))
        cpu = Capacity({"mem": 64})
        assert names(q.take(5, capacity=cpu)) == ["A2"], policy
        assert q.take(5, capacity=cpu) == [] and len(q) == 2   # they wait, queued
        gpu = Capacity({"gpu": 1})
        assert names(q.take(5, capacity=gpu)) == ["A1", "A3"]  # one at a time, both held
        assert gpu.used == {"gpu": 2.0}


def test_concurrent_worker_takes_only_what_is_free():
    q: JobQueue[Job] = JobQueue()
    for job in jobs("A", 4, resources={"mem": 32}):
        q.push(job)
    cap = Capacity({"mem": 64}, concurrency=4)
    got = q.take(4, capacity=cap)
    assert names(got) == ["A1", "A2"] and cap.free() == {"mem": 0.0}
    cap.give({"mem": 32})
    q.release(got[0])
    assert names(q.take(4, capacity=cap)) == ["A3"]


def test_a_client_that_fits_nowhere_does_not_block_others():
    q: JobQueue[Job] = JobQueue()
    for job in jobs("A", 3, resources={"gpu": 1}):
        q.push(job)
    for job in jobs("B", 3):
        q.push(job)
    assert names(q.take(5, capacity=Capacity({}))) == ["B1", "B2", "B3"]
    assert len(q) == 3


def simulate(q: JobQueue, workers: int, hold: int, submits: list[tuple[float, list[Job]]],
             seconds: float) -> dict[Job, tuple[float, float]]:
    """A master's loop in miniature: each worker holds up to ``hold`` jobs (running one,
    the rest prefetched) and runs them in order for ``seconds`` each; whenever a worker's
    job ends it asks the queue for what it may hold. Returns job -> (taken, finished)."""
    held: list[deque] = [deque() for _ in range(workers)]
    times: dict[Job, tuple[float, float]] = {}
    events: list[tuple[float, int, int, list]] = []   # (time, order, worker or -1, jobs)
    order = 0
    for t, batch in submits:
        heapq.heappush(events, (t, order, -1, batch))
        order += 1

    def feed(now: float) -> None:
        nonlocal order
        for w in sorted(range(workers), key=lambda w: len(held[w])):
            got = q.take(hold - len(held[w]), idle=not held[w])
            for job in got:
                times[job] = (now, 0.0)
            if got and not held[w]:
                heapq.heappush(events, (now + seconds, order, w, []))
                order += 1
            held[w].extend(got)

    while events:
        now, _, w, batch = heapq.heappop(events)
        if w < 0:
            for job in batch:
                q.push(job)
        else:
            job = held[w].popleft()
            q.release(job)
            times[job] = (times[job][0], now)
            if held[w]:
                heapq.heappush(events, (now + seconds, order, w, []))
                order += 1
        feed(now)
    return times


def test_issue_example_a_newcomer_waits_about_one_job_per_worker():
    # 8 workers busy on A's 2,000 jobs of 20 ms; at 1 s B submits 20 such jobs
    workers, hold, job_s = 8, 2, 0.020
    a, b = jobs("A", 2000), jobs("B", 20)
    times = simulate(JobQueue(), workers, hold, [(0.0, a), (1.0, b)], job_s)
    first_b = min(times[j][0] for j in b)
    assert first_b - 1.0 <= job_s + 1e-9           # the next free slot goes to B
    # B gets half the workers: 20 jobs on 4 workers take 5 jobs' time, plus what the
    # workers held when B came (one running, one prefetched each)
    b_done = max(times[j][1] for j in b) - 1.0
    assert b_done <= (20 / (workers / 2) + hold) * job_s + 1e-9
    # A is not starved meanwhile, and all of A still runs
    assert all(times[j][1] for j in a)
    # fifo, for contrast: B waits behind A's backlog
    fifo = simulate(JobQueue("fifo"), workers, hold, [(0.0, jobs("A", 2000)),
                                                       (1.0, jobs("B", 20))], job_s)
    assert min(t for j, (t, _) in fifo.items() if j.client == "B") > 4.0


def test_issue_example_with_prefetch_batches():
    # short jobs travel in batches of 8: B's still wait at most one batch per worker
    workers, hold, job_s = 4, 8, 0.001
    a, b = jobs("A", 4000), jobs("B", 40)
    times = simulate(JobQueue(), workers, hold, [(0.0, a), (0.5, b)], job_s)
    first_b = min(times[j][0] for j in b)
    assert first_b - 0.5 <= job_s + 1e-9
    b_done = max(times[j][1] for j in b) - 0.5
    assert b_done <= (40 / (workers / 2) + hold) * job_s + 1e-9


def test_many_clients_take_turns_through_the_heap():
    # more than SMALL clients with queued work: the choice goes through the heap
    q: JobQueue[Job] = JobQueue()
    names_ = [f"C{i}" for i in range(12)]
    for name in names_:
        for job in jobs(name, 5):
            q.push(job)
    q.set_share("C11", 2.0)
    first = [job for _ in range(12) for job in q.take(1)]
    assert sorted(j.client for j in first) == sorted(names_)   # each once, in turn
    assert q.take(1)[0].client == "C11"     # its share is 2: below the others at use 1
    q.release(first[3])                     # one of C3's jobs is done: C3 is lowest now
    assert q.take(1)[0].client == first[3].client
    taken = [job for _ in range(100) for job in q.take(1)]
    assert len(taken) == 12 * 5 - 14 and len(q) == 0
