"""Malformed input from authenticated peers: the master logs, survives and keeps routing.

A raw DEALER socket holding its role's keys says a valid HELLO (as a client, or as a worker
that says BYE before the check), or none (a stranger), then sends what hypothesis draws:
invalid msgpack, truncated headers, wrong types, huge ints, every message kind of
cw.protocol (the lane's too), wrong frame counts, well-shaped SUBMITs with garbage payloads.
After every example a well-behaved client's job must come back with the right value, the
master process must still be running and its status must still turn into JSON. HELLOs with
fields of any type, each from a new peer, must leave ``/status.json`` and
``python -m cw.status --json`` working.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
import uuid

import pytest
import zmq
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults import executor

from cw import protocol as P
from cw.client import ClusterExecutor
from cw.conn import security
from cw.errors import CwError

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies
KINDS = [P.HELLO, P.WELCOME, P.REFUSE, P.WHO, P.HEARTBEAT, P.BYE, P.SUBMIT, P.CANCEL,
         P.CANCELLED, P.JOBS, P.RESULTS, P.FORGET, P.LANE, P.LANE_LOST, P.LANE_BUSY,
         P.LANE_REFUSED, P.LANE_RESULT, P.LJOB, P.LRESULT, P.LSTARTED, P.BOUNCE, P.STATUS,
         P.STATUS_REPLY, P.DIED, P.DRAIN, P.BATCH_OPEN, P.BATCH_SUBMIT, P.ACKED, P.BATCH_LIST,
         P.BATCH_STATUS, P.BATCH_FETCH, P.BATCH_CANCEL, P.BATCH_FORGET, P.BATCH_REPLY]
NOT_KINDS = {"VERSION", "DEFAULT_PORT", "OK", "ERROR", "FAILED", "MAX_PATH_ENTRY",
             "WINDOW_PER_WORKER", "WINDOW_MIN"}
huge_ints = st.one_of(st.integers(-2 ** 63, 2 ** 64 - 1),
                      st.sampled_from([0, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 64 - 1, -2 ** 63]))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(), st.text(max_size=20),
                    st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=5), huge_ints),
                                                 inner, max_size=4)), max_leaves=20)
kinds = st.one_of(st.sampled_from(KINDS), huge_ints)
digests = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20))
opts = st.one_of(st.none(), values,
                 st.fixed_dictionaries({}, optional={"max_retries": values, "timeout": values}))
job_entries = st.one_of(st.tuples(huge_ints, digests, st.integers(-1, 3), opts).map(list),
                        st.lists(values, max_size=6))
payload = st.lists(st.binary(max_size=64), max_size=6)


@st.composite
def well_shaped_submits(draw):
    """A SUBMIT whose frame count adds up: its jobs reach workers with garbage payloads."""
    fns = draw(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=2))
    jobs = [[draw(huge_ints), draw(st.sampled_from(fns)), draw(st.integers(1, 3)), None]
            for _ in range(draw(st.integers(0, 3)))]
    frames = [draw(st.binary(max_size=64)) for _ in range(len(fns) + sum(j[2] for j in jobs))]
    return [P.pack(P.SUBMIT, fns, jobs), *frames]


@st.composite
def truncated(draw):
    header = P.pack(draw(kinds), *draw(st.lists(values, max_size=4)))
    return [header[:draw(st.integers(0, max(0, len(header) - 1)))], *draw(payload)]


def header_then(kind_items):
    return st.tuples(kind_items, payload).map(lambda t: [P.pack(*t[0]), *t[1]])


client_messages = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),            # not msgpack at all
    truncated(),
    header_then(st.tuples(kinds).map(list) | st.lists(values, min_size=1, max_size=5)
                .map(lambda v: [v[0], *v[1:]])),                          # any header shape
    header_then(st.tuples(kinds, values, values).map(list)),
    header_then(st.tuples(st.just(P.SUBMIT), st.lists(digests, max_size=3),
                          st.lists(job_entries, max_size=4)).map(list)),
    well_shaped_submits(),
    header_then(st.tuples(st.just(P.CANCEL), values).map(list)),
    # named batches: any fields, and well-typed ones with huge or odd values
    header_then(st.tuples(st.sampled_from([P.BATCH_OPEN, P.BATCH_LIST, P.BATCH_STATUS,
                                           P.BATCH_FETCH, P.BATCH_CANCEL, P.BATCH_FORGET]),
                          st.lists(values, max_size=4)).map(lambda t: [t[0], *t[1]])),
    header_then(st.tuples(st.just(P.BATCH_OPEN), huge_ints, st.text(max_size=300)).map(list)),
    header_then(st.tuples(st.sampled_from([P.BATCH_STATUS, P.BATCH_FETCH]), huge_ints,
                          st.text(max_size=20), huge_ints, st.one_of(huge_ints, st.floats()))
                .map(list)),
    header_then(st.tuples(st.just(P.BATCH_SUBMIT), st.text(max_size=20),
                          st.lists(digests, max_size=3), st.lists(job_entries, max_size=4))
                .map(list)),
    header_then(st.tuples(st.just(P.CANCEL), st.lists(values, max_size=5)).map(list)),
    header_then(st.tuples(st.just(P.HELLO), values, values, values).map(list)),
    st.just([]),                                                          # no frames at all
)
lane_messages = st.one_of(
    header_then(st.tuples(st.just(P.LANE_BUSY), values, values).map(list)),
    header_then(st.tuples(st.just(P.LANE_BUSY), huge_ints, huge_ints).map(list)),
    header_then(st.tuples(st.just(P.LANE_REFUSED), values).map(list)),
    header_then(st.tuples(st.just(P.LANE_REFUSED), huge_ints).map(list)),
    header_then(st.tuples(st.just(P.LANE_RESULT), values, values, values, values).map(list)),
    header_then(st.tuples(st.just(P.LANE_RESULT), huge_ints, huge_ints, st.integers(0, 2),
                          st.integers(-1, 4)).map(list)),
    header_then(st.tuples(st.sampled_from([P.LANE, P.LANE_LOST, P.LJOB, P.LRESULT,
                                           P.LSTARTED, P.BOUNCE]),
                          st.lists(values, max_size=6)).map(lambda t: [t[0], *t[1]])),
)
worker_messages = st.one_of(
    client_messages,
    lane_messages,
    header_then(st.tuples(st.just(P.DRAIN), values, values).map(list)),
    header_then(st.tuples(st.just(P.DRAIN), st.text(max_size=20),
                          st.lists(st.lists(huge_ints, max_size=3), max_size=4)).map(list)),
    header_then(st.tuples(st.just(P.RESULTS), st.lists(st.lists(values, max_size=3),
                                                       max_size=4),
                          st.lists(st.lists(values, max_size=5), max_size=4)).map(list)),
    header_then(st.tuples(st.just(P.RESULTS), st.lists(st.tuples(huge_ints, huge_ints)
                                                       .map(list), max_size=3),
                          st.lists(st.tuples(huge_ints, huge_ints, huge_ints,
                                             st.integers(0, 3)).map(list), max_size=3))
                .map(list)),
    header_then(st.tuples(st.just(P.CANCELLED), st.lists(st.lists(values, max_size=4),
                                                         max_size=4)).map(list)),
    header_then(st.tuples(st.just(P.CANCELLED), st.lists(st.tuples(
        huge_ints, huge_ints, st.booleans()).map(list), max_size=4)).map(list)),
    header_then(st.tuples(st.just(P.RESULTS), st.lists(values, max_size=3),
                          st.lists(values, max_size=3), values, values).map(list)),
)
stranger_messages = st.one_of(client_messages, lane_messages)
supervisor_messages = st.one_of(
    worker_messages,
    header_then(st.tuples(st.just(P.DIED), huge_ints, huge_ints, st.one_of(st.floats(),
                                                                           values)).map(list)),
    header_then(st.tuples(st.just(P.DIED), st.lists(values, max_size=4))
                .map(lambda t: [t[0], *t[1]])),
)
MESSAGES = {"client": client_messages, "worker": worker_messages,
            "stranger": stranger_messages, "supervisor": supervisor_messages}
# what a HELLO's info may say: every known field with any value, or with its own type
typed = {"name": st.text(max_size=300), "host": st.text(max_size=300), "pid": huge_ints,
         "python": st.text(max_size=70), "machine": st.text(max_size=20),
         "alias": st.binary(max_size=70), "slots": huge_ints, "lane": st.text(max_size=50),
         "inbox": st.booleans(), "cwd": st.text(max_size=50),
         "path": st.lists(st.one_of(st.text(max_size=10), values), max_size=4),
         "slurm_job": st.text(max_size=70), "alloc_end": st.floats()}
infos = st.one_of(
    values,
    st.fixed_dictionaries({}, optional={name: values for name in P.HELLO_FIELDS}),
    st.fixed_dictionaries({}, optional={name: st.one_of(typed.get(name, values), values)
                                        for name in P.HELLO_FIELDS}),
    st.fixed_dictionaries({}, optional=typed),
)


# ---------------------------------------------------------------- the fuzzing peer
class Peer:
    """A raw DEALER with the cluster's keys, speaking as ``role``."""

    def __init__(self, master, role: str, keys_of: str = ""):
        self.role = role
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        keys_of = keys_of or ("worker" if role in ("worker", "supervisor") else "client")
        security.secure_client(self.sock, security.keys_for(master.host, master.port, keys_of))
        self.sock.connect(f"tcp://{master.host}:{master.port}")

    def hello(self, info=None) -> int:
        """Say HELLO and wait for the WELCOME or REFUSE (dropping whatever else came)."""
        if self.role == "stranger":
            return P.WHO
        self.sock.send(P.pack(P.HELLO, P.VERSION, self.role,
                              {"name": f"fuzz-{self.role}", "slots": 1} if info is None
                              else info))
        while True:
            assert self.sock.poll(10_000), "the master did not answer the fuzzing peer"
            header = P.unpack(self.sock.recv_multipart()[0])
            if header[0] in (P.WELCOME, P.REFUSE):
                return header[0]

    def send(self, frames: list) -> None:
        if frames:
            self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close()


def check_alive(master, ex, n: int) -> None:
    assert master.popen.poll() is None, master.stderr()[-2000:]
    assert ex.submit(pow, n, 2).result(timeout=15) == n * n
    json.dumps(master.status())  # what `python -m cw.status --json` prints


def test_the_fuzzers_know_every_message_kind():
    kinds = {v for k, v in vars(P).items() if k.isupper() and isinstance(v, int)
             and k not in NOT_KINDS}
    assert kinds <= set(KINDS)


# ---------------------------------------------------------------- tests
@pytest.mark.timeout(120)
@pytest.mark.parametrize("role", ["client", "worker", "supervisor", "stranger"])
def test_fuzzed_messages_never_stop_the_master(cluster, role):
    peer = Peer(cluster, role)
    messages = MESSAGES[role]
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        count = iter(range(10 ** 6))

        @FUZZ
        @given(batch=st.lists(messages, min_size=1, max_size=3))
        def run(batch):
            peer.hello()
            for message in batch:
                peer.send(message)
            if role == "worker":  # say BYE before the check: it must not be handed jobs
                peer.send([P.pack(P.BYE)])
                wait_for(lambda: len(cluster.status()["workers"]) == 2, 10, "the fuzzer's BYE")
            check_alive(cluster, ex, next(count))

        try:
            run()
        finally:
            peer.close()
        check_alive(cluster, ex, -7)
        assert len(cluster.status()["workers"]) == 2
    assert "dropped a bad message" in cluster.stderr() or role == "stranger"


def status_cli(master) -> dict:
    out = subprocess.run([sys.executable, "-m", "cw.status", master.address, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("info", [{"pid": b"\x01\x02"}, {"name": 7}, {"host": [1]},
                                  {"slots": "many"}, {"slots": 0}, {"path": [b"/x"]},
                                  {"alias": "x"}, {"inbox": 1}, {"name": "x" * 10_000}])
def test_a_hello_with_fields_of_the_wrong_type_is_refused(procs, info):
    """A HELLO whose pid was bytes once made /status.json answer 500 and
    `python -m cw.status --json` crash."""
    master = procs.master("--dashboard", "0")
    url = wait_for(lambda: (m := re.search(r"dashboard on (http://\S+)", master.stderr()))
                   and m.group(1), 10, "the dashboard")
    for role in ("client", "worker"):
        peer = Peer(master, role)
        assert peer.hello({"name": "odd", **info}) == P.REFUSE
        peer.close()
    assert status_cli(master)["clients"] == []
    with urllib.request.urlopen(url + "status.json", timeout=10) as reply:
        assert reply.status == 200


@pytest.mark.timeout(120)
def test_fuzzed_hellos_never_break_the_status(procs):
    master = procs.master("--dashboard", "0")
    procs.workers(master, 1)
    url = wait_for(lambda: (m := re.search(r"dashboard on (http://\S+)", master.stderr()))
                   and m.group(1), 10, "the dashboard") + "status.json"
    with ClusterExecutor(master.host, master.port) as ex:
        count = iter(range(10 ** 6))

        @FUZZ
        @given(role=st.sampled_from(["client", "worker"]), info=infos)
        def run(role, info):
            peer = Peer(master, role)
            try:
                if isinstance(info, dict):  # else it is dropped unanswered
                    peer.hello(info)
                else:
                    peer.send([P.pack(P.HELLO, P.VERSION, role, info)])
                with urllib.request.urlopen(url, timeout=10) as reply:  # while it is in
                    assert reply.status == 200
                    json.loads(reply.read())
                json.dumps(master.status())
                peer.send([P.pack(P.BYE)])  # a fuzzing worker must not be handed jobs
                wait_for(lambda: len(master.status()["workers"]) == 1, 10, "the BYE")
                check_alive(master, ex, next(count))
            finally:
                peer.close()

        run()
    status_cli(master)


@pytest.mark.timeout(60)
def test_oversized_frame_disconnects_the_sender_and_the_master_survives(procs):
    master = procs.master("--max-message-size", "100000")
    procs.workers(master, 1)
    peer = Peer(master, "client")
    with ClusterExecutor(master.host, master.port) as ex:
        peer.hello()
        for size in (100_001, 1_000_000, 5_000_000):
            peer.send([P.pack(P.SUBMIT, [], []), b"x" * size])
            peer.send([P.pack(P.HEARTBEAT)])
            check_alive(master, ex, size)
        # just under the limit is fine
        assert ex.submit(len, b"x" * 90_000).result(timeout=30) == 90_000
    peer.close()
    assert master.popen.poll() is None


@pytest.mark.timeout(60)
def test_job_larger_than_the_masters_limit_fails_instead_of_hanging(procs):
    """A client whose SUBMIT exceeds --max-message-size is disconnected by zmq: the job (and
    any job batched with it) must fail with a clear error, not wait for ever."""
    master = procs.master("--max-message-size", "100000")
    procs.workers(master, 1)
    with executor(master) as ex:
        small = ex.submit(abs, -1)
        big = ex.submit(len, b"x" * 1_000_000)
        with pytest.raises((CwError, ValueError)) as info:
            big.result(timeout=20)
        assert "max-message-size" in str(info.value) or "too large" in str(info.value)
        assert small.result(timeout=20) == 1
        assert ex.submit(abs, -2).result(timeout=20) == 2


@pytest.mark.timeout(60)
def test_result_larger_than_the_masters_limit_fails_instead_of_hanging(procs):
    """A worker whose RESULTS carry a frame above --max-message-size is disconnected: the
    job must fail with a clear error (and the worker stay), not be lost."""
    master = procs.master("--max-message-size", "100000")
    procs.workers(master, 1)
    with executor(master) as ex:
        big = ex.submit(bytes, 1_000_000)
        with pytest.raises((CwError, ValueError)) as info:
            big.result(timeout=20)
        assert "max-message-size" in str(info.value) or "too large" in str(info.value)
        assert ex.submit(abs, -2).result(timeout=20) == 2
    master.wait_workers(1)
