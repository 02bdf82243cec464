"""The master daemon: its command line, lifecycle, protocol checks and survival of bad input."""
from __future__ import annotations

import json
import signal
import sys
import uuid

import msgpack
import pytest
import zmq
from conftest import Master, gated, wait_for

from cw import protocol as P
from cw.client import ClientThread, ClusterExecutor
from cw.conn import security
from cw.errors import ProtocolError


def dealer(master):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    security.secure_client(sock, security.keys_for(master.host, master.port))
    sock.connect(f"tcp://{master.host}:{master.port}")
    return sock


def recv(sock, timeout=10.0):
    assert sock.poll(timeout * 1000), "no answer from the master"
    return P.unpack(sock.recv_multipart()[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_master_writes_connection_file_and_stops_cleanly(cw_home, sig):
    master = Master("--connection-file", str(cw_home / "default.json"))
    try:
        files = [cw_home / "default.json", *(cw_home / "masters").glob("*.json")]
        assert len(files) == 2
        for path in files:
            info = json.loads(path.read_text())
            assert info["port"] == master.port and info["pid"] == master.pid
            assert path.stat().st_mode & 0o777 == 0o600
        master.signal(sig)
        assert master.popen.wait(10) == 0
        assert not any(path.exists() for path in files)
        assert "shutting down" in master.stderr()
    finally:
        master.stop()


def test_master_help_lists_every_option():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "cw.master", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    for flag in ("--host", "--port", "--connection-file", "--heartbeat-interval",
                 "--heartbeat-timeout", "--max-message-size", "--log-level", "--log-file"):
        assert flag in out
    assert "CW_PORT" in out


def test_version_mismatch_is_refused_with_a_log_line(master):
    sock = dealer(master)
    sock.send(P.pack(P.HELLO, P.VERSION + 99, "client", {"name": "old-client"}))
    header = recv(sock)
    assert header[0] == P.REFUSE and "version" in header[1]
    wait_for(lambda: "refused client old-client" in master.stderr(), what="refusal log")
    sock.close()


def test_client_with_wrong_version_raises_protocol_error(master, monkeypatch):
    monkeypatch.setattr(P, "VERSION", P.VERSION + 1)
    with pytest.raises(ProtocolError, match="refused"):
        ClusterExecutor(master.host, master.port, connect_timeout=10)


def test_garbage_is_logged_and_dropped_while_jobs_flow(cluster):
    junk = [
        [b""],                                   # empty header
        [b"\xc1\xc1\xc1"],                       # invalid msgpack
        [msgpack.packb({"not": "a list"})],
        [msgpack.packb([P.SUBMIT, [], []])],     # before HELLO: answered WHO
        [P.pack(999)],
        [P.pack(P.HELLO, P.VERSION, "client", {"name": "fuzz"})],
        [P.pack(P.SUBMIT, "x", None)],
        [P.pack(P.SUBMIT, [b"short"], [[1, b"short", 1, None]]), b"f", b"a"],
        [P.pack(P.SUBMIT, [], [[1, b"0" * 16, 1, None]]), b"a"],   # unknown function
        [P.pack(P.SUBMIT, [], [[1, b"0" * 16, 5, None]])],           # frames missing
        [P.pack(P.CANCEL, [None, "x", 2 ** 63])],
        [P.pack(P.RESULTS, [], [])],             # a client pretending to be a worker
        [P.pack(P.HELLO, P.VERSION, "nobody", {})],
        [P.pack(P.HELLO, P.VERSION)],
    ]
    sock = dealer(cluster)
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        for frames in junk:
            sock.send_multipart(frames)
            assert ex.submit(abs, -4).result(timeout=30) == 4
    assert cluster.popen.poll() is None
    assert "dropped a bad message" in cluster.stderr()
    sock.close()


def test_status_reports_workers_and_clients(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert list(ex.map(abs, range(-10, 0))) == list(range(10, 0, -1))
        import cw
        info = cw.status(cluster.address)  # the Python API, as the module's function
        assert len(info["workers"]) == 2
        assert info["throughput_last_minute"] > 0
        assert sum(w["done"] for w in info["workers"]) == 10
        assert info["clients"][0]["done"] == 10 and info["queue"] == 0


def test_a_gone_clients_queued_jobs_are_dropped_and_late_results_discarded(cluster, tmp_path):
    gate = tmp_path / "gate"

    first = ClientThread(lambda jobid, result: None, cluster.host, cluster.port).start()
    for i in range(22):
        first.submit(i, gated, str(gate), i)
    wait_for(lambda: sum(bool(w["job"]) for w in cluster.status()["workers"]) == 2,
             what="blockers running")
    first.stop()  # leaves: 2 running, the rest queued
    wait_for(lambda: not cluster.status()["clients"], what="client gone")
    assert cluster.status()["queue"] == 0
    with ClusterExecutor(cluster.host, cluster.port) as second:
        later = [second.submit(str, i) for i in range(30)]
        gate.touch()
        assert [f.result(timeout=30) for f in later] == [str(i) for i in range(30)]
    wait_for(lambda: cluster.status()["discarded"] == 2, what="2 late results discarded")


def test_function_is_shipped_and_unpickled_once_per_worker(cluster, tmp_path):
    """A callable whose unpickling leaves a trace: 50 calls, at most one unpickle per worker."""
    trace = tmp_path / "unpickled"

    class Counted:
        def __init__(self, path):
            self.path = str(path)

        def __reduce__(self):
            return (_revive, (self.path,))

        def __call__(self, x):
            return x + 1

    counted = Counted(trace)
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert list(ex.map(counted, range(50))) == list(range(1, 51))
    unpickles = trace.read_text().count("x") if trace.exists() else 0
    assert 1 <= unpickles <= 2


def _revive(path):
    with open(path, "a") as f:
        f.write("x")
    obj = object.__new__(_Plain)
    return obj


class _Plain:
    def __call__(self, x):
        return x + 1


def test_job_naming_an_unknown_function_fails_instead_of_vanishing(master):
    """A client must hear about every job it submitted, even one the master cannot run."""
    from cw.serialize import loads
    sock = dealer(master)
    sock.send(P.pack(P.HELLO, P.VERSION, "client", {"name": "raw"}))
    assert recv(sock)[0] == P.WELCOME
    sock.send_multipart([P.pack(P.SUBMIT, [], [[7, b"0" * 16, 1, None]]), b"args"])
    while True:
        assert sock.poll(10000), "no answer for the job"
        frames = sock.recv_multipart()
        header = P.unpack(frames[0])
        if header[0] == P.RESULTS:
            break
    (seq, status, n), = header[2]
    assert (seq, status) == (7, P.FAILED)
    assert "never sent" in str(loads(frames[1:1 + n], "error"))
    sock.close()
