"""The master's resources are bounded: descriptors, memory per client (issue 12, points 5-6).

    another user: 300 idle TCP connections  --> master (soft fd limit 256 at start)
      the master raises its limit, closes them after --handshake-timeout, logs a few lines
    a client gone rogue (raw zmq, the keys): SUBMITs past its byte window, stops reading
      results, floods functions --> typed errors, back-pressure, a bounded master RSS
"""
from __future__ import annotations

import encodings.idna  # noqa: F401  (the other user cannot import it: /root is 0700)
import os
import resource
import select
import socket
import time

import pytest

from cw.client import ClusterExecutor

from conftest import wait_for

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
