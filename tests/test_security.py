"""CurveZMQ on by default: only holders of the master's keys get in."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import zmq

from cw import protocol as P
from cw import security
from cw.client import ClusterExecutor
from cw.errors import MasterUnreachable
from cw.status import status

from conftest import Master, wait_for


def hello_from(master, keys):
    """Say HELLO with the given keys (None: plain TCP); return the reply header or None."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    security.secure_client(sock, keys)
    sock.connect(f"tcp://{master.host}:{master.port}")
    sock.send(P.pack(P.HELLO, P.VERSION, "client", {"name": "stranger"}))
    try:
        return P.unpack(sock.recv()) if sock.poll(1500) else None
    finally:
        sock.close()


def test_connection_file_holds_keys_and_is_private(master, cw_home):
    path, = (cw_home / "masters").glob("*.json")
    info = json.loads(path.read_text())
    assert security.has_keys(info) and info["insecure"] is False
    assert path.stat().st_mode & 0o777 == 0o600


def test_peers_with_the_keys_work(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1


def test_plain_tcp_stranger_is_refused_and_logged(master):
    assert hello_from(master, None) is None
    wait_for(lambda: "refused a connection" in master.stderr(), what="refusal log")
    assert master.popen.poll() is None


def test_stranger_with_the_server_key_but_its_own_client_key_is_refused(master):
    keys = dict(security.keys_for(master.host, master.port))
    public, secret = zmq.curve_keypair()
    keys["client_public"], keys["client_secret"] = public.decode(), secret.decode()
    assert hello_from(master, keys) is None
    wait_for(lambda: "unknown CURVE key" in master.stderr(), what="ZAP refusal log")
    assert hello_from(master, security.keys_for(master.host, master.port))[0] == P.WELCOME


def test_client_without_the_connection_file_fails_with_a_hint(master, monkeypatch, tmp_path):
    monkeypatch.setenv("CW_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(MasterUnreachable, match="no connection file"):
        ClusterExecutor(master.host, master.port, connect_timeout=1)


def test_two_masters_of_one_user_do_not_clash(procs):
    a, b = procs.master(), procs.master()
    procs.workers(a, 1)
    procs.workers(b, 1)
    with ClusterExecutor(a.host, a.port) as ea, ClusterExecutor(b.host, b.port) as eb:
        assert ea.submit(abs, -1).result(timeout=30) == 1
        assert eb.submit(abs, -2).result(timeout=30) == 2
    assert status(a.host, a.port)["master_id"] != status(b.host, b.port)["master_id"]


def test_insecure_on_loopback_works_with_a_warning(procs):
    master = procs.master("--insecure")
    assert "WITHOUT authentication" in master.stderr()
    assert hello_from(master, None)[0] == P.WELCOME


def test_insecure_off_loopback_is_refused():
    out = subprocess.run([sys.executable, "-m", "cw.master", "--insecure", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "only allowed" in out.stderr
