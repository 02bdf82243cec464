"""The Scheduler in-process: a recording ``send`` and an explicit clock, no sockets, no
processes, no sleeps; each test runs in milliseconds. The real-process tests
(test_master.py, test_faults.py, test_lane.py, ...) cover the same rules end to end.

Peers register through ``hello`` as cw.master does; a client's jobs arrive as the SUBMIT
``cw.session._message`` builds (``fns``: digests sent along, ``jobs``: [seq, digest,
nframes, opts], then the function frames and each job's frames); a worker answers with
``results`` / ``cancelled`` as its RESULTS and CANCELLED messages would.
"""
from __future__ import annotations

import pytest

from cw import protocol as P
from cw.errors import ProtocolError, QuotaExceeded, WorkerLost
from cw.master import scheduler as S
from cw.serialize import loads

F = b"f" * 16           # a function digest
G = b"g" * 16
LANE = "/tmp/cw-test/lane-1.sock"


class Rig:
    """A Scheduler, the messages it sent, and helpers that speak for its peers."""

    def __init__(self, **kw):
        self.sent: list[tuple[bytes, list, list]] = []   # (ident, header, payload frames)
        self.answer: dict[bytes, object] = {}  # ident -> what send returns (default True)
        self.now = 1000.0
        self.state = S.Scheduler(self._send, **kw)
        self._seq: dict[bytes, int] = {}

    def _send(self, ident: bytes, frames: list):
        answer = self.answer.get(ident, True)
        if answer:
            self.sent.append((ident, P.unpack(frames[0]), list(frames[1:])))
        return answer

    # ---- peers
    def client(self, name: str, **info) -> S.ClientRecord:
        return self.state.hello(name.encode(), "client", {"name": name, **info}, self.now)

    def worker(self, name: str, slots: int = 64, **info) -> S.WorkerRecord:
        return self.state.hello(name.encode(), "worker",
                                {"name": name, "slots": slots, **info}, self.now)

    def submit(self, client: S.ClientRecord, n: int = 1, digest: bytes = F, opts=None,
               arg: bytes = b"args", fn_sent: bool = True) -> list[int]:
        """``n`` jobs as one SUBMIT; the function goes along the first time (like Session)."""
        first = self._seq.setdefault(client.ident, 1)
        seqs = list(range(first, first + n))
        self._seq[client.ident] = first + n
        fns = [digest] if fn_sent and digest not in client.functions else []
        frames = [b"fn:" + digest for _ in fns] + [arg] * n
        self.state.submit(client, fns, [[s, digest, 1, opts] for s in seqs], frames)
        return seqs

    def done(self, worker: S.WorkerRecord, seqs, client: S.ClientRecord, status: int = P.OK,
             started=(), busy: float = -1.0, lane=(), payload=None) -> None:
        """A worker's RESULTS: ``seqs`` of ``client`` done (one frame each)."""
        frames = [payload if payload is not None else b"r%d" % s for s in seqs]
        self.state.results(worker, [[client.cid, s] for s in started],
                           [[client.cid, s, status, 1] for s in seqs], frames, self.now,
                           busy, [[client.cid, s] for s in lane])

    def start(self, worker: S.WorkerRecord, seqs, client: S.ClientRecord) -> None:
        self.state.results(worker, [[client.cid, s] for s in seqs], [], [], self.now)

    def fast(self, worker: S.WorkerRecord, client: S.ClientRecord) -> None:
        """Teach ``worker`` that jobs are short: run two of them now (it then holds more)."""
        seqs = self.submit(client, 2)
        self.flush()
        self.done(worker, seqs, client, busy=2e-5)
        self.flush()
        self.take(P.JOBS, worker)
        self.take(P.RESULTS, client)

    # ---- what was sent
    def flush(self) -> None:
        self.state.flush()

    def take(self, kind: int, peer=None) -> list[tuple[bytes, list, list]]:
        """The messages of ``kind`` (to ``peer``) sent since the last take; forgets them."""
        ident = peer.ident if peer is not None else None
        hits = [m for m in self.sent if m[1][0] == kind and ident in (None, m[0])]
        self.sent = [m for m in self.sent if m not in hits]
        return hits

    def jobs_to(self, worker: S.WorkerRecord) -> list[int]:
        """Seqs sent to ``worker`` in JOBS messages since the last take."""
        return [e[1] for _, h, _ in self.take(P.JOBS, worker) for e in h[3]]

    def outcomes(self, client: S.ClientRecord) -> dict[int, tuple[int, list]]:
        """seq -> (status, payload) of every RESULTS done entry sent to ``client``."""
        out = {}
        for _, header, frames in self.take(P.RESULTS, client):
            pos = 0
            for seq, status, n in header[2]:
                assert seq not in out, f"job {seq} settled twice"
                out[seq] = (status, frames[pos:pos + n])
                pos += n
        return out


def one_worker(jobs: int) -> tuple[Rig, S.WorkerRecord, S.ClientRecord]:
    """A rig with one worker ("w") and one client ("c") whose ``jobs`` were dispatched."""
    rig = Rig()
    w, c = rig.worker("w"), rig.client("c")
    rig.submit(c, jobs)
    rig.flush()
    return rig, w, c


def error_of(outcome: tuple[int, list]) -> Exception:
    status, payload = outcome
    assert status == P.FAILED
    return loads(payload, "the master's error")


# ------------------------------------------------------------------- dispatch

def test_jobs_go_fifo_to_idle_workers_and_a_function_travels_once_per_worker():
    rig = Rig()
    a, b = rig.worker("a", slots=1), rig.worker("b", slots=1)
    c = rig.client("c", cwd="/here", path=["/lib"])
    rig.submit(c, 3)
    rig.flush()
    (_, ha, fa), = rig.take(P.JOBS, a)
    (_, hb, fb), = rig.take(P.JOBS, b)
    assert [e[1] for e in ha[3]] == [1] and [e[1] for e in hb[3]] == [2]
    assert ha[1] == [[c.cid, "/here", ["/lib"]]] and ha[2] == [[c.cid, F]]
    assert fa == [b"fn:" + F, b"args"]  # function frame, then the job's
    rig.done(a, [1], c)
    rig.flush()
    assert rig.outcomes(c) == {1: (P.OK, [b"r1"])}
    (_, h, frames), = rig.take(P.JOBS, a)
    assert [e[1] for e in h[3]] == [3] and h[1] == [] and h[2] == [] and frames == [b"args"]
    rig.done(b, [2], c, started=[2])  # started and done in one note: one outcome
    rig.done(a, [3], c)
    rig.flush()
    assert rig.outcomes(c) == {2: (P.OK, [b"r2"]), 3: (P.OK, [b"r3"])}
    assert rig.state.status(rig.now)["routed"] == 3


def test_prefetch_starts_at_two_and_grows_only_for_short_jobs():
    rig = Rig()
    quick, slow = rig.worker("quick"), rig.worker("slow")
    c = rig.client("c")
    rig.submit(c, 4)
    rig.flush()
    assert len(rig.jobs_to(quick)) == 2 and len(rig.jobs_to(slow)) == 2  # MIN_HOLD each
    rig.done(quick, [1, 2], c, busy=2e-5)  # 10 µs a job: hold all 64 slots
    rig.done(slow, [3, 4], c, busy=20.0)   # 10 s a job: keep holding two
    rig.submit(c, 200)
    rig.flush()
    assert len(rig.jobs_to(quick)) == 64
    assert len(rig.jobs_to(slow)) == 2
    assert rig.state.queued == 200 - 66


def test_many_idle_workers_share_a_small_queue_evenly():
    rig = Rig()
    workers = [rig.worker(f"w{i}") for i in range(4)]
    c = rig.client("c")
    rig.submit(c, 4)
    rig.flush()
    assert [len(rig.jobs_to(w)) for w in workers] == [1, 1, 1, 1]


def test_a_batch_to_an_unreachable_worker_goes_elsewhere_uncharged():
    rig = Rig()
    gone, full, ok = rig.worker("gone", slots=1), rig.worker("full", slots=1), \
        rig.worker("ok", slots=1)
    c = rig.client("c")
    rig.answer[gone.ident] = False  # its connection is lost
    rig.answer[full.ident] = None   # its queue is full: later, not a death
    rig.submit(c, 1, opts={"max_retries": 1})
    rig.flush()
    assert gone.ident not in rig.state.workers and full.ident in rig.state.workers
    assert rig.jobs_to(ok) == [1]  # not failed (max_retries=1): the batch was never held
    assert rig.jobs_to(full) == []  # a full queue never received it
    rig.done(ok, [1], c)
    rig.flush()
    assert rig.outcomes(c)[1][0] == P.OK


def test_bad_submits_and_results_raise_protocol_error_and_queue_nothing():
    rig = Rig()
    c, w = rig.client("c"), rig.worker("w")
    bad = [
        ([F], [[1, F, 1, None]], [b"fn"]),              # frames missing
        ([], [[1, b"short", 1, None]], [b"x"]),          # digest not 16 bytes
        ([], [[1, F, 0, None]], []),                     # no argument frame
        ([], [[1, F, 1, {"max_retries": 0}]], [b"x"]),  # retries < 1
        ([], [[1, F, 1, {"timeout": -1}]], [b"x"]),
        ([], [[1, F, 1, {"losses": [3]}]], [b"x"]),
        ([], [[1, F, 1]], [b"x"]),                       # short entry
        ("x", [], []),
    ]
    for fns, jobs, frames in bad:
        with pytest.raises(ProtocolError):
            rig.state.submit(c, fns, jobs, frames)
    assert rig.state.queued == 0 and not c.jobs
    with pytest.raises(ProtocolError):
        rig.state.results(w, [], [[c.cid, 1, P.OK, 2]], [b"one"], rig.now)
    with pytest.raises(ProtocolError):
        rig.state.results(w, [], [], [], rig.now, float("nan"))


def test_a_job_naming_an_unknown_function_fails_at_once():
    rig = Rig()
    c = rig.client("c")
    rig.submit(c, 1, fn_sent=False)
    rig.flush()
    error = error_of(rig.outcomes(c)[1])
    assert isinstance(error, ProtocolError) and "never sent" in str(error)


# ------------------------------------------------------------------- deaths, suspects

def test_a_death_is_charged_only_to_the_running_job_and_suspects_run_alone():
    rig = Rig()
    dead = rig.worker("dead")
    c = rig.client("c")
    rig.submit(c, 2, opts={"max_retries": 1})  # one death charged fails a job
    rig.flush()
    assert rig.jobs_to(dead) == [1, 2]
    rig.start(dead, [1], c)
    rig.state.peer_gone(dead.ident, "killed by SIGKILL")
    rig.flush()
    outcomes = rig.outcomes(c)
    assert list(outcomes) == [1]  # job 2 had not started: not charged
    assert error_of(outcomes[1]).workers == ["dead on ? (pid None): killed by SIGKILL"]
    a, b, d = rig.worker("a"), rig.worker("b"), rig.worker("d")
    rig.submit(c, 3)  # 3, 4, 5: innocent newcomers
    rig.flush()
    assert [rig.jobs_to(w) for w in (a, b, d)] == [[2], [3, 4], [5]]  # the suspect alone
    rig.submit(c, 10)
    rig.flush()
    assert rig.jobs_to(a) == []  # nothing joins a suspect
    rig.done(a, [2], c)
    rig.flush()
    assert rig.outcomes(c) == {2: (P.OK, [b"r2"])}
    assert len(rig.jobs_to(a)) == 2  # out of isolation: fed as before


def test_a_poison_job_fails_with_worker_lost_naming_every_death():
    rig = Rig()
    sup = rig.state.hello(b"sup", "supervisor", {"host": "n1", "pid": 7, "machine": "m"},
                          rig.now)
    c = rig.client("c")
    rig.submit(c, 1)
    how = []
    for i, code in enumerate((-9, 3, -11)):
        w = rig.worker(f"w{i}", host="n1", pid=100 + i, machine="m", supervisor=7)
        rig.flush()
        assert rig.jobs_to(w) == [1]
        if i == 0:  # later it runs alone (a suspect): charged with or without this note
            rig.start(w, [1], c)
        rig.state.died(sup, 100 + i, code, 1.5)
        how.append(P.describe_exit(code))
        assert w.ident not in rig.state.workers
    rig.flush()
    error = error_of(rig.outcomes(c)[1])
    assert isinstance(error, WorkerLost) and "max_retries=3" in str(error)
    assert [reason.split(": ", 1)[1] for reason in error.workers] == \
        [f"{h} after 1.5 s" for h in how]
    assert "killed by SIGKILL" in error.workers[0] and "killed by SIGSEGV" in error.workers[2]
    assert rig.state.queued == 0 and not c.jobs


def test_died_names_a_worker_by_host_and_pid_only():
    rig = Rig()
    sup = rig.state.hello(b"sup", "supervisor", {"host": "n1", "pid": 7, "machine": "m"},
                          rig.now)
    here = rig.worker("here", host="n1", pid=42, machine="m", supervisor=7)
    other_host = rig.worker("there", host="n2", pid=42, machine="m2")
    other_sup = rig.worker("other-sup", host="n1", pid=43, machine="m", supervisor=8)
    rig.state.died(sup, 43, -9, 1.0)   # a worker of another supervisor on that node
    rig.state.died(sup, 999, -9, 1.0)  # not registered (died before its HELLO)
    assert set(rig.state.workers) == {here.ident, other_host.ident, other_sup.ident}
    rig.state.died(sup, 42, -9, 1.0)
    assert set(rig.state.workers) == {other_host.ident, other_sup.ident}
    with pytest.raises(ProtocolError):
        rig.state.died(sup, 42, 999, 1.0)


def test_a_graceful_leave_requeues_without_charge_or_suspicion():
    rig = Rig()
    leaving = rig.worker("leaving")
    c = rig.client("c")
    rig.submit(c, 2, opts={"max_retries": 1})
    rig.flush()
    rig.start(leaving, [1], c)
    rig.state.peer_gone(leaving.ident, "said goodbye", graceful=True)
    w = rig.worker("w")
    rig.flush()
    assert rig.jobs_to(w) == [1, 2]  # one batch again: not suspects
    rig.done(w, [1, 2], c)
    rig.flush()
    assert {s: o[0] for s, o in rig.outcomes(c).items()} == {1: P.OK, 2: P.OK}


def test_silent_peers_are_dropped_at_tick_and_the_heard_ones_kept():
    rig = Rig(heartbeat_timeout=10.0)
    silent, alive = rig.worker("silent", slots=1), rig.worker("alive", slots=1)
    c = rig.client("c")
    rig.submit(c, 1)
    rig.flush()
    assert rig.jobs_to(silent) == [1]
    rig.start(silent, [1], c)
    rig.state.tick(rig.now + 9)
    assert silent.ident in rig.state.workers
    alive.last_seen = c.last_seen = rig.now + 9
    rig.state.tick(rig.now + 11)
    assert set(rig.state.workers) == {alive.ident} and c.ident in rig.state.clients
    assert "silent for 10 s" in c.jobs[1].losses[0]
    rig.flush()
    assert rig.jobs_to(alive) == [1]
    rig.state.tick(rig.now + 30)  # nobody heard from: all gone, the job dropped
    assert not rig.state.workers and not rig.state.clients and rig.state.queued == 0


# ------------------------------------------------------------------- stealing

def test_an_idle_worker_steals_the_newer_half_of_the_busiest():
    rig = Rig()
    busy = rig.worker("busy", slots=8)
    c = rig.client("c")
    rig.fast(busy, c)  # busy learned short jobs: it holds 8
    idle = rig.worker("idle", slots=8)
    rig.submit(c, 16)  # 3..18
    rig.flush()
    assert rig.jobs_to(busy) == list(range(3, 11)) and rig.jobs_to(idle) == [11, 12]
    rig.done(idle, [11, 12], c, busy=2e-5)  # idle learns too, and takes the rest
    rig.flush()
    assert rig.jobs_to(idle) == list(range(13, 19))
    rig.start(busy, [3], c)
    rig.done(idle, list(range(13, 19)), c)  # idle emptied: steal from busy
    rig.flush()
    (_, cancel, _), = rig.take(P.CANCEL, busy)
    assert [seq for _, seq in cancel[1]] == [7, 8, 9, 10]  # the newer half of its 8
    rig.state.cancelled(busy, [[c.cid, 7, True], [c.cid, 8, True], [c.cid, 9, False]])
    rig.done(busy, [10], c)  # finished before its steal answer came
    rig.flush()
    assert rig.jobs_to(idle) == [7, 8]  # given back, in their order
    rig.state.cancelled(busy, [[c.cid, 10, True]])  # late: ignored, job 10 is done
    rig.flush()
    assert 10 in rig.outcomes(c) and rig.jobs_to(idle) == []
    rig.done(idle, [7, 8], c)
    rig.flush()
    (_, again, _), = rig.take(P.CANCEL, busy)  # tracked by key: stealing goes on
    assert [seq for _, seq in again[1]] == [6, 9]


def test_a_worker_that_joins_after_the_queue_emptied_steals():
    rig = Rig()
    first = rig.worker("first")
    c = rig.client("c")
    rig.submit(c, 2)   # long jobs: first holds two, one waiting behind the running one
    rig.flush()
    rig.start(first, [1], c)
    late = rig.worker("late")
    rig.flush()
    (_, cancel, _), = rig.take(P.CANCEL, first)
    assert cancel[1] == [[c.cid, 2]]
    rig.state.cancelled(first, [[c.cid, 2, True]])
    rig.flush()
    assert rig.jobs_to(late) == [2]


# ------------------------------------------------------------------- cancels

def test_cancel_queued_held_and_started_jobs():
    rig, w, c = one_worker(3)
    assert rig.jobs_to(w) == [1, 2]
    rig.start(w, [1], c)
    rig.state.cancel(c, [1, 2, 3, 99, "x"])
    rig.flush()
    (_, cancel, _), = rig.take(P.CANCEL, w)
    assert cancel[1] == [[c.cid, 2]]
    (_, answer, _), = rig.take(P.CANCELLED, c)
    assert sorted(answer[1], key=str) == sorted([[1, False], [3, True], [99, False],
                                                 ["x", False]], key=str)
    rig.state.cancelled(w, [[c.cid, 2, True], [c.cid, 1, True]])  # 1 was never asked
    rig.flush()
    (_, answer, _), = rig.take(P.CANCELLED, c)
    assert answer[1] == [[2, True]]
    rig.done(w, [1], c)
    rig.flush()
    assert rig.outcomes(c) == {1: (P.OK, [b"r1"])}  # the unasked answer dropped nothing
    assert not c.jobs and c.arg_bytes == 0 and rig.state.queued == 0


def test_cancel_queued_only_keeps_what_runs_or_runs_next():
    rig = Rig()
    w = rig.worker("w", slots=8)
    c = rig.client("c")
    rig.fast(w, c)
    rig.take(P.RESULTS)
    seqs = rig.submit(c, 12)
    rig.flush()
    held = rig.jobs_to(w)
    assert len(held) == 8
    rig.start(w, held[:1], c)
    rig.state.cancel(c, seqs, queued_only=True)
    rig.flush()
    (_, answer, _), = rig.take(P.CANCELLED, c)
    assert dict(answer[1]) == {**{s: False for s in held[:2]},
                               **{s: True for s in seqs[8:]}}
    (_, cancel, _), = rig.take(P.CANCEL, w)
    assert [seq for _, seq in cancel[1]] == held[2:]


def test_a_gone_clients_held_jobs_are_released_on_its_worker():
    rig = Rig()
    w = rig.worker("w")
    gone, other = rig.client("gone"), rig.client("other")
    rig.submit(gone, 3)
    rig.flush()
    assert rig.jobs_to(w) == [1, 2]
    rig.start(w, [1], gone)
    rig.state.peer_gone(gone.ident, "killed")
    rig.flush()
    (_, cancel, _), = rig.take(P.CANCEL, w)
    assert cancel[1] == [[gone.cid, 2]]
    (_, forget, _), = rig.take(P.FORGET, w)
    assert forget[1] == [gone.cid]
    rig.state.cancelled(w, [[gone.cid, 2, True]])  # answered after its client left
    rig.done(w, [1], gone)
    assert rig.state.discarded == 1
    rig.submit(other, 2)
    rig.flush()
    assert rig.jobs_to(w) == [1, 2]  # both slots free again: nothing of job 2 stays
    assert rig.take(P.RESULTS) == [] and rig.state.queued == 0


# ------------------------------------------------------------------- lanes

def lane_rig(**kw):
    rig = Rig(**kw)
    w = rig.worker("w", slots=2, lane=LANE, machine="m1")
    c = rig.client("c", inbox=True, machine="m1")
    return rig, w, c


def test_a_lane_is_granted_once_on_the_same_machine_and_lost_with_its_worker():
    rig, w, c = lane_rig()
    far = rig.client("far", inbox=True, machine="m2")
    no_inbox = rig.client("no-inbox", machine="m1")
    for client in (c, far, no_inbox):
        rig.submit(client, 1)
    rig.flush()
    (_, grant, _), = rig.take(P.LANE)
    assert grant == [P.LANE, LANE, c.cid] and len(rig.jobs_to(w)) == 2
    w2 = rig.worker("w2", lane="/tmp/cw-test/lane-2.sock", machine="m1")
    rig.submit(c, 2)
    rig.flush()
    assert rig.jobs_to(w2) and rig.take(P.LANE) == []  # one lane per client
    rig.state.peer_gone(w.ident, "killed by SIGKILL")
    (_, lost, _), = rig.take(P.LANE_LOST, c)
    assert lost[1] == LANE and "killed by SIGKILL" in lost[2] and lost[3] is False


def test_no_lanes_when_they_are_off():
    rig, w, c = lane_rig(lanes=False)
    rig.submit(c, 1)
    rig.flush()
    assert rig.jobs_to(w) == [1] and rig.take(P.LANE) == []


def test_a_refused_lane_is_taken_back_for_good():
    rig, w, c = lane_rig()
    rig.submit(c, 1)
    rig.flush()
    assert rig.take(P.LANE)
    rig.state.lane_refused(w, c.cid)
    (_, lost, _), = rig.take(P.LANE_LOST, c)
    assert lost[3] is True
    rig.done(w, [1], c)
    rig.submit(c, 1)
    rig.flush()
    assert rig.jobs_to(w) and rig.take(P.LANE) == []


def test_a_lane_busy_worker_is_fed_nothing_and_its_jobs_stolen():
    rig, w, c = lane_rig()
    other = rig.worker("other", slots=1)
    rig.submit(c, 3)
    rig.flush()
    assert rig.jobs_to(w) == [1, 2] and rig.jobs_to(other) == [3]
    rig.state.lane_busy(w, c.cid, 50)  # a lane job runs long there
    rig.done(other, [3], c)
    rig.flush()
    (_, cancel, _), = rig.take(P.CANCEL, w)
    assert cancel[1] == [[c.cid, 1], [c.cid, 2]]  # all it holds, even the oldest
    rig.state.cancelled(w, [[c.cid, 1, True], [c.cid, 2, True]])
    rig.flush()
    assert rig.jobs_to(other) == [1]
    rig.done(other, [1], c)
    rig.submit(c, 2)
    rig.flush()
    assert rig.jobs_to(w) == [] and rig.jobs_to(other) == [2]
    rig.done(w, [], c, lane=[50])  # the lane job is done: fed again
    rig.flush()
    assert rig.jobs_to(w) == [4, 5]
    assert rig.state.status(rig.now)["routed"] == 2 + 1  # two results, and the lane job


def test_a_late_lane_busy_for_a_finished_lane_job_is_ignored():
    rig, w, c = lane_rig()
    rig.done(w, [], c, lane=[7])
    rig.state.lane_busy(w, c.cid, 7)  # came after the job's note, on another socket
    rig.submit(c, 1)
    rig.flush()
    assert rig.jobs_to(w) == [1]


def test_a_lane_busy_worker_whose_client_left_is_fed_again():
    rig, w, c = lane_rig()
    rig.state.lane_busy(w, c.cid, 1)
    other = rig.client("other")
    rig.submit(other, 1)
    rig.flush()
    assert rig.jobs_to(w) == []
    rig.state.peer_gone(c.ident, "killed")
    rig.flush()
    assert rig.jobs_to(w) == [1]


def test_a_lane_result_passes_only_from_the_lane_holder():
    rig, w, c = lane_rig()
    stranger = rig.worker("stranger", machine="m1", lane="/tmp/cw-test/lane-3.sock")
    rig.submit(c, 1)
    rig.flush()
    (_, grant, _), = rig.take(P.LANE, c)
    assert grant[1] == LANE
    rig.state.lane_result(stranger, c.cid, 9, P.OK, 1, [b"big"])
    rig.state.lane_result(w, c.cid, 8, P.OK, 1, [b"big"])
    rig.flush()
    assert rig.outcomes(c) == {8: (P.OK, [b"big"])}
    assert rig.state.discarded == 1
    with pytest.raises(ProtocolError):
        rig.state.lane_result(w, c.cid, 8, P.OK, 2, [b"big"])


def test_a_lane_death_reported_by_the_client_is_charged():
    rig = Rig()
    c = rig.client("c")
    rig.submit(c, 1, opts={"max_retries": 2, "losses": ["w on n (pid 1): exit code 1"]})
    a, b = rig.worker("a"), rig.worker("b")
    rig.submit(c, 2)
    rig.flush()
    assert rig.jobs_to(a) == [1]  # a suspect: alone
    assert rig.jobs_to(b) == [2, 3]  # the innocent jobs go elsewhere
    rig.state.peer_gone(a.ident, "exit code 2")
    rig.flush()
    error = error_of(rig.outcomes(c)[1])
    assert isinstance(error, WorkerLost) and len(error.workers) == 2


# ------------------------------------------------------------------- bounds

def test_argument_bytes_past_the_quota_fail_with_quota_exceeded():
    rig = Rig()
    c = rig.client("c")
    big = bytes(P.WINDOW_MIN + 1)  # one job always fits; two pass twice the window
    rig.submit(c, 1, arg=big)
    rig.submit(c, 1, arg=big)
    rig.flush()
    error = error_of(rig.outcomes(c)[2])
    assert isinstance(error, QuotaExceeded) and "job 2 refused" in str(error)
    w = rig.worker("w")
    rig.flush()
    rig.done(w, rig.jobs_to(w), c)
    rig.submit(c, 1, arg=big)  # room again once the first settled
    rig.flush()
    assert rig.jobs_to(w) == [3]


def test_functions_past_the_store_limit_fail_their_jobs():
    rig = Rig(max_functions=1)
    c = rig.client("c")
    rig.submit(c, 1, digest=F)
    rig.submit(c, 1, digest=G)
    rig.flush()
    error = error_of(rig.outcomes(c)[2])
    assert isinstance(error, QuotaExceeded) and "at most 1 functions" in str(error)
    assert rig.state.queued == 1


def test_results_go_in_messages_of_about_a_megabyte_each_once():
    rig = Rig()
    w = rig.worker("w")
    c = rig.client("c")
    rig.fast(w, c)
    seqs = rig.submit(c, 10)
    rig.flush()
    assert rig.jobs_to(w) == seqs
    rig.done(w, seqs, c, payload=bytes(300_000))
    rig.flush()
    messages = rig.take(P.RESULTS, c)
    sizes = [sum(len(f) for f in frames) for _, _, frames in messages]
    assert len(messages) == 3 and max(sizes) <= S.RESULT_MESSAGE + 300_000
    assert [e[0] for _, h, _ in messages for e in h[2]] == seqs  # each once, in order


def test_a_client_that_stops_reading_has_its_jobs_parked_and_nothing_dropped():
    rig = Rig(policy="fifo")  # arrival order, so which job goes when is the old one
    w = rig.worker("w", slots=1)
    slow, other = rig.client("slow"), rig.client("other")
    rig.submit(slow, 3)
    rig.flush()
    rig.answer[slow.ident] = None  # its queue at the socket is full
    rig.done(w, rig.jobs_to(w), slow, payload=bytes(S.RESULT_BACKLOG + 1))
    rig.submit(other, 1)
    rig.flush()
    assert rig.jobs_to(w) == [2]  # fed once more, before slow was known to be full
    rig.done(w, [2], slow, payload=b"small")
    rig.flush()
    assert rig.jobs_to(w) == [1] and slow.backlogged()  # other's job; slow's 3 parked
    rig.done(w, [1], other)
    rig.flush()
    assert rig.jobs_to(w) == [] and rig.state.queued == 1
    del rig.answer[slow.ident]  # it reads again
    rig.flush()
    assert set(rig.outcomes(slow)) == {1, 2}
    rig.flush()
    assert rig.jobs_to(w) == [3]


# ------------------------------------------------------------------- peers

def test_hello_again_only_refreshes_and_an_alias_resolves_to_its_peer():
    rig = Rig()
    c = rig.client("c", alias=b"c+")
    assert rig.state.peer(b"c+") is c
    rig.now += 5
    assert rig.client("c") is c and c.last_seen == rig.now
    w = rig.worker("w")
    rig.submit(rig.state.peer(b"c+"), 1)  # a lone job that came on the alias
    rig.flush()
    rig.done(w, rig.jobs_to(w), c)
    rig.flush()
    assert rig.outcomes(c) and all(ident != b"c+" for ident, _, _ in rig.sent)
    with pytest.raises(ProtocolError):
        rig.state.hello(b"x", "boss", {}, rig.now)


def test_client_ids_differ_between_master_runs_and_stale_results_are_dropped():
    one, two = Rig(), Rig()
    c1, c2 = one.client("c"), two.client("c")
    assert c1.cid != c2.cid
    w = two.worker("w")
    two.submit(c2, 1)
    two.flush()
    two.take(P.JOBS)
    two.state.results(w, [], [[c1.cid, 1, P.OK, 1]], [b"old"], two.now)  # an old run's
    two.flush()
    assert two.outcomes(c2) == {} and two.state.status(two.now)["clients"][0]["queued"] == 1


def test_status_shows_who_runs_what():
    rig, w, c = one_worker(3)
    rig.start(w, [1], c)
    status = rig.state.status(rig.now + 2.5)
    (worker,), (client,) = status["workers"], status["clients"]
    assert worker["state"] == "busy" and worker["job"] == ["c", 1]
    assert worker["job_seconds"] == 2.5 and worker["held"] == 2
    assert client["running"] == 1 and client["queued"] == 2 and status["queue"] == 1
