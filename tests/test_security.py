"""CurveZMQ on by default: only holders of the master's keys get in, in their own role.

The attacks of issue 12 are played by another local user (``other_user``: a throwaway
account, so these tests skip unless run as root). Its processes can use only modules this
module imported (zmq, msgpack, cw.protocol, ...), so they speak the wire protocol raw.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq

from cw import address, mp, security, serialize
from cw import protocol as P
from cw.client import ClusterExecutor
from cw.errors import MasterUnreachable, NoKeys, SecurityError
from cw.status import status

from conftest import Master, gated, wait_for


def hello_from(master, keys, role="client", info=None):
    """Say HELLO with the given keys (None: plain TCP); return the reply header or None."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    security.secure_client(sock, keys)
    sock.connect(f"tcp://{master.host}:{master.port}")
    sock.send(P.pack(P.HELLO, P.VERSION, role, info or {"name": "stranger"}))
    try:
        return P.unpack(sock.recv()) if sock.poll(1500) else None
    finally:
        sock.close()


def files_of(cw_home, host, port) -> dict:
    name = f"{host}-{port}.json"
    return {folder: cw_home / folder / name for folder in ("masters", "workers", "secrets")}


def test_each_role_reads_only_its_keys_and_no_file_but_the_masters_has_its_secret(
        master, cw_home):
    files = files_of(cw_home, master.host, master.port)
    client, worker, secret = (json.loads(p.read_text()) for p in files.values())
    assert security.has_keys(client, security.PEER_FIELDS["client"])
    assert security.has_keys(worker, security.PEER_FIELDS["worker"])
    assert security.has_keys(secret) and client["insecure"] is False
    assert not {"server_secret", "worker_public", "worker_secret"} & client.keys()
    assert not {"server_secret", "client_public", "client_secret"} & worker.keys()
    for path in files.values():
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700


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


def test_client_without_the_connection_file_fails_naming_the_file(master, monkeypatch,
                                                                  tmp_path):
    home = tmp_path / "elsewhere"
    monkeypatch.setenv("CW_HOME", str(home))
    with pytest.raises(NoKeys, match="no client connection file") as info:
        ClusterExecutor(master.host, master.port, connect_timeout=1)
    assert info.value.path == str(home / "masters" / f"{master.host}-{master.port}.json")
    assert info.value.path in str(info.value) and "CW_HOME" in str(info.value)
    assert isinstance(info.value, MasterUnreachable)  # as before: nothing to talk to


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


def test_peers_talk_plain_tcp_only_when_told_insecure(procs):
    """A master without keys (--insecure) is reached over TCP only by a peer that was told
    insecure too; without it the peer refuses, naming the flag."""
    master = procs.master("--insecure", "--no-local-socket")
    with pytest.raises(NoKeys, match="insecure"):
        ClusterExecutor(master.host, master.port, connect_timeout=1)
    with pytest.raises(NoKeys):
        status(master.host, master.port)
    procs.workers(master, 1, "--insecure", wait=False)
    wait_for(lambda: status(master.host, master.port, insecure=True)["workers"], 20,
             "the insecure worker")
    with ClusterExecutor(master.host, master.port, insecure=True) as ex:
        assert ex.submit(abs, -3).result(timeout=30) == 3


def test_insecure_peers_only_reach_a_loopback_master():
    with pytest.raises(SecurityError, match="loopback"):
        ClusterExecutor("192.0.2.1", 5494, insecure=True, connect_timeout=1)


def test_insecure_off_loopback_is_refused():
    out = subprocess.run([sys.executable, "-m", "cw.master", "--insecure", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "only allowed" in out.stderr
