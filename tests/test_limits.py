"""The master's resources are bounded: descriptors, memory per client (issue 12, points 5-6).

    another user: 300 idle TCP connections  --> master (soft fd limit 256 at start)
      the master raises its limit, closes them after --handshake-timeout, logs a few lines
    a client gone rogue (raw zmq, the keys): SUBMITs past its byte window, stops reading
      results, floods functions --> typed errors, back-pressure, a bounded master RSS
"""
from __future__ import annotations

import encodings.idna  # noqa: F401  (the other user cannot import it: /root is 0700)
import resource
import select
import socket
import time

import psutil
import pytest
import zmq
from conftest import wait_for

from cw import protocol as P
from cw import serialize
from cw.client import ClusterExecutor
from cw.client.session import decode_outcome
from cw.conn import security
from cw.errors import QuotaExceeded

MB = 1 << 20

STRANGERS = 300


def hold_connections(ready, port: int, n: int) -> None:
    """Open ``n`` idle TCP connections to ``port``, report, then report how many the other
    end closed within 30 s."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    ready(len(socks))
    open_ = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + 30
    while open_ and time.monotonic() < deadline:
        for fd in select.select(list(open_), [], [], 1)[0]:
            try:
                data = open_[fd].recv(4096)
            except OSError:
                data = b""
            if not data:
                del open_[fd]
    ready(n - len(open_))


@pytest.mark.timeout(120)
def test_idle_strangers_cannot_use_up_the_masters_descriptors(procs, other_user):
    """300 idle unauthenticated connections against a soft limit of 256 descriptors: a
    keyholder's client and a new worker still get in, the master closes the strangers
    after its handshake timeout, and logs a bounded number of lines about them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * STRANGERS:
        pytest.skip(f"the hard descriptor limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        master = procs.master(env={"CW_HANDSHAKE_TIMEOUT": "2"})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    child = other_user.start(hold_connections, master.port, STRANGERS)
    assert child.ready() == STRANGERS
    procs.workers(master, 1)
    with ClusterExecutor(master.host, master.port, connect_timeout=10) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
    started = time.monotonic()
    assert child.ready(timeout=40) == STRANGERS, "the master kept idle connections open"
    print(f"strangers closed {time.monotonic() - started:.1f} s after the client's job")
    lines = [line for line in master.stderr().splitlines() if "refused a connection" in line]
    print(f"{len(lines)} log lines about them: {lines}")
    assert 1 <= len(lines) <= 5


# ---------------------------------------------------------------- a client gone rogue
class RawClient:
    """A keyholder's client that ignores the byte window: a bare DEALER on the user's route
    to the master (its local socket, or TCP with the keys)."""

    def __init__(self, master, rcvhwm: int = 0):
        route = security.route_for(master.host, master.port)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(self.sock, route.keys)
        self.sock.connect(route.endpoint)
        self.send(P.HELLO, P.VERSION, "client", {"name": "rogue", "host": "here", "pid": 1})
        header, _ = self.recv()
        assert header[0] == P.WELCOME, header
        self.outcomes: dict[int, tuple] = {}

    def send(self, *header, frames: list = ()) -> None:
        self.sock.send_multipart([P.pack(*header), *frames], copy=False)

    def submit(self, fns: list, jobs: list, frames: list) -> None:
        """SUBMIT ``fns`` [(digest, blob)] and ``jobs`` [(seq, digest, arg frames)]."""
        self.send(P.SUBMIT, [d for d, _ in fns], [[seq, d, len(f), None] for seq, d, f in jobs],
                  frames=[b for _, b in fns] + [x for _, _, f in jobs for x in f])

    def recv(self, timeout: float = 10.0) -> tuple[list, list]:
        assert self.sock.poll(timeout * 1000), "the master said nothing"
        frames = self.sock.recv_multipart(copy=False)
        return P.unpack(frames[0]), frames[1:]

    def read(self) -> None:
        """Read what has come (RESULTS into ``outcomes``) and say we are alive."""
        self.send(P.HEARTBEAT)
        while self.sock.poll(0):
            header, frames = self.recv()
            if header[0] != P.RESULTS:
                continue
            pos = 0
            for seq, status, n in header[2]:
                assert seq not in self.outcomes, f"job {seq} settled twice"
                self.outcomes[seq] = decode_outcome(status, frames[pos:pos + n], seq)
                pos += n

    def wait(self, n: int, timeout: float = 30.0) -> dict[int, tuple]:
        wait_for(lambda: self.read() or len(self.outcomes) >= n, timeout,
                 f"{n} outcomes", interval=0.1)
        return self.outcomes

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def peak_rss(proc) -> int:
    for line in open(f"/proc/{proc.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.timeout(120)
def test_the_master_holds_a_rogue_clients_jobs_only_up_to_its_quota(master):
    """12 submits of 128 MB with no worker: the first is kept (one job always fits), the
    rest fail with QuotaExceeded, and the master does not grow by their 1.5 GB."""
    before = rss(master)
    rogue = RawClient(master)
    try:
        big = bytes(128 * MB)
        fn = (b"f" * 16, b"not run")
        for seq in range(1, 13):
            rogue.submit([fn] if seq == 1 else [], [(seq, fn[0], [big])], [])
        outcomes = rogue.wait(11)
        assert sorted(outcomes) == list(range(2, 13))
        assert all(isinstance(err, QuotaExceeded) for err, _ in outcomes.values())
        assert "twice its byte window" in str(outcomes[2][0])
        assert master.status()["queue"] == 1
        after = rss(master)
        print(f"master RSS {before / MB:.0f} MB -> {after / MB:.0f} MB "
              f"(peak {peak_rss(master) / MB:.0f} MB)")
        assert after - before < 400 * MB
    finally:
        rogue.close()


@pytest.mark.timeout(120)
def test_a_real_client_never_meets_the_quota(procs, master):
    """cw's client keeps within its byte window, so the quota is never what stops it: 40
    jobs of 8 MB arguments, submitted before any worker is there, all run."""
    with ClusterExecutor(master.host, master.port) as ex:
        futures = [ex.submit(len, bytes(8 * MB)) for _ in range(40)]
        procs.workers(master, 2)
        assert [f.result(timeout=60) for f in futures] == [8 * MB] * 40


@pytest.mark.timeout(120)
def test_results_a_client_does_not_read_wait_at_the_master_within_a_bound(procs, master):
    """A client that stops reading (its socket full): the master keeps its results and
    stops running its jobs, without growing by all of them; once it reads, every result
    comes, exactly once."""
    procs.workers(master, 2)
    before = rss(master)
    rogue = RawClient(master, rcvhwm=1)
    try:
        digest, blob = serialize.dumps_function(bytes)
        args = serialize.dumps_call((MB,), {}, "args")
        jobs = 600  # 600 MB of results
        rogue.submit([(digest, blob)], [(seq, digest, args) for seq in range(1, jobs + 1)], [])

        def parked():
            rogue.send(P.HEARTBEAT)  # alive, but reading nothing
            info = master.status()
            return info["queue"] > 0 and all(w["state"] == "idle" for w in info["workers"]) \
                and info
        info = wait_for(parked, 60, "the master to stop running the jobs of a client that "
                                    "does not read", interval=0.2)
        held = rss(master)
        print(f"master RSS {before / MB:.0f} MB -> {held / MB:.0f} MB with {info['queue']} "
              f"jobs held back (peak {peak_rss(master) / MB:.0f} MB)")
        assert held - before < 250 * MB
        outcomes = rogue.wait(jobs, 60)
        assert sorted(outcomes) == list(range(1, jobs + 1))
        assert all(err is None and len(value) == MB for err, value in outcomes.values())
    finally:
        rogue.close()


@pytest.mark.timeout(120)
def test_the_master_stores_a_bounded_number_of_functions_per_client(procs):
    master = procs.master(env={"CW_MAX_FUNCTION_BYTES": str(50 * MB)})
    rogue = RawClient(master)
    try:
        fns = [(bytes([i]) * 16, bytes([i]) * (20 * MB)) for i in range(1, 4)]
        for seq, fn in enumerate(fns, 1):  # 20, 40, then 60 MB > 50 MB: refused
            rogue.submit([fn], [(seq, fn[0], [b"x"])], [])
        outcomes = rogue.wait(1)
        assert list(outcomes) == [3] and isinstance(outcomes[3][0], QuotaExceeded)
        assert "functions" in str(outcomes[3][0])
        assert master.status()["queue"] == 2

        many = [(i.to_bytes(16, "big"), b"f") for i in range(100_001)]  # past 100,000
        rogue.submit(many, [(4, many[-1][0], [b"x"])], [])
        outcomes = rogue.wait(2)
        assert isinstance(outcomes[4][0], QuotaExceeded)
    finally:
        rogue.close()
