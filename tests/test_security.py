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
import uuid
from pathlib import Path

import pytest
import zmq
from conftest import gated, wait_for

from cw import protocol as P
from cw import serialize
from cw.client import ClusterExecutor
from cw.conn import address, security
from cw.errors import MasterUnreachable, NoKeys, SecurityError
from cw.launch import local as mp
from cw.status import status


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



def test_an_insecure_worker_for_a_master_off_loopback_is_refused_in_one_line():
    out = subprocess.run([sys.executable, "-m", "cw.worker", "--insecure", "192.0.2.1:5494"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("cw-worker: insecure:") and "loopback" in out.stderr

def test_insecure_off_loopback_is_refused():
    out = subprocess.run([sys.executable, "-m", "cw.master", "--insecure", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "only allowed" in out.stderr


# ---------------------------------------------------------------- attacks by another user
class Touch:
    """Unpickling it creates ``path``: a pickle that runs code as whoever loads it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def fake_master(ready, evil: bytes) -> None:
    """Another user's listener where the victim expects its master (not started yet, or
    gone): it answers like a master and hands out a pickle of its own."""
    sock = zmq.Context().socket(zmq.ROUTER)
    ready(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        frames = sock.recv_multipart()
        ident, header = frames[0], P.unpack(frames[1])
        ready(header[0])
        if header[0] == P.HELLO:
            sock.send_multipart([ident, P.pack(P.WELCOME, P.VERSION, "x" * 32, {})])
            if header[2] == "worker":  # a function pickle of its own
                sock.send_multipart([ident, P.pack(P.JOBS, [[1, "/", []]], [[1, b"0" * 16]],
                                                   [[1, 1, b"0" * 16, 1, None]]), evil, evil])
        elif header[0] == P.SUBMIT:  # a result pickle of its own
            seq = header[2][0][0]
            sock.send_multipart([ident, P.pack(P.RESULTS, [], [[seq, P.OK, 1]]), evil])
        elif header[0] == P.STATUS:
            sock.send_multipart([ident, P.pack(P.STATUS_REPLY, {"workers": []})])


def heard_nothing(child, seconds: float = 1.5) -> bool:
    try:
        said = child.ready(timeout=seconds)
    except AssertionError as exc:
        if "not ready within" in str(exc):
            return True
        raise
    raise AssertionError(f"the other user's listener got message kind {said}")


@pytest.mark.parametrize("victim", ["client", "client-host-none", "status", "status-cli",
                                    "worker"])
def test_no_keys_no_connection_to_another_users_listener(procs, other_user, tmp_path, victim):
    """Issue 12.1: with no connection file for the master, a peer used to dial plain TCP,
    run the listener's function pickle (worker) or its result pickle (client)."""
    marker = tmp_path / "ran-the-other-users-pickle"
    listener = other_user.start(fake_master, pickle.dumps(Touch(str(marker))))
    port = listener.ready()
    expected = str(address.master_connection_file("127.0.0.1", port))
    if victim == "worker":
        worker = procs.run([sys.executable, "-m", "cw.worker", "127.0.0.1", "--port", str(port)])
        wait_for(lambda: "waiting for it" in worker.stderr(), 20, "the worker to wait for keys")
        assert str(address.master_connection_file("127.0.0.1", port, "workers")) in \
            worker.stderr()
    elif victim == "status-cli":
        out = subprocess.run([sys.executable, "-m", "cw.status", f"127.0.0.1:{port}", "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and expected in out.stderr, out.stderr
    else:
        with pytest.raises(NoKeys) as info:
            if victim == "status":
                status("127.0.0.1", port)
            elif victim == "client":
                ClusterExecutor("127.0.0.1", port, connect_timeout=1).submit(abs, -1).result(5)
            else:
                ClusterExecutor(port=port, connect_timeout=1).submit(abs, -1).result(5)
        assert info.value.path.endswith(f"-{port}.json") and "CW_HOME" in str(info.value)
    assert heard_nothing(listener)
    if victim == "worker":
        assert worker.popen.poll() is None  # still waiting for keys, never keyless
    assert not marker.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_started_before_its_master_waits_for_the_keys_then_joins(procs):
    port = free_port()
    worker = procs.run([sys.executable, "-m", "cw.worker", "127.0.0.1", "--port", str(port)])
    wait_for(lambda: "waiting for it" in worker.stderr(), 20, "the worker to wait for keys")
    master = procs.master(port=port)
    master.wait_workers(1)
    with ClusterExecutor(master.host, master.port) as ex:
        assert ex.submit(abs, -2).result(timeout=30) == 2


@pytest.fixture
def open_home(monkeypatch):
    """A CW_HOME not created yet, in a folder anyone may enter (like a 0755 home)."""
    parent = Path(tempfile.mkdtemp(prefix="cw-victim-"))
    parent.chmod(0o755)
    home = parent / "home" / ".cw"
    monkeypatch.setenv("CW_HOME", str(home))
    yield home
    shutil.rmtree(parent, ignore_errors=True)


def snoop(paths: list) -> dict:
    """What another user can read of ``paths`` (folders: list them)."""
    seen = {}
    for path in paths:
        try:
            os.listdir(path) if os.path.isdir(path) else open(path, "rb").read()
            seen[path] = "read"
        except PermissionError:
            seen[path] = "denied"
        except FileNotFoundError:
            seen[path] = "missing"
    return seen


def test_every_folder_and_file_cw_creates_is_private(open_home, other_user):
    """Issue 12.3: ~/.cw was 0755, launcher logs (with what jobs print) and mp.json 0644."""
    token = uuid.uuid4().hex
    try:
        mp.start(1, port=0, bind="127.0.0.1")
        with ClusterExecutor() as ex:
            ex.submit(print, token, flush=True).result(timeout=30)
        log = open_home / "logs" / "mp-workers.log"
        wait_for(lambda: token in log.read_text(), 10, "the token in the workers' log")
        created = [open_home.parent, *sorted(open_home.rglob("*"))]
        for path in created:
            want = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == want, path
        assert (open_home / "mp.json").exists() and (open_home / "secrets").is_dir()
        seen = other_user.run(snoop, [str(p) for p in (*created, open_home / "mp.json", log)])
        assert set(seen.values()) == {"denied"}, seen
    finally:
        mp.stop()


def test_a_connection_file_others_can_read_is_refused_like_an_ssh_key(cluster, cw_home):
    path = files_of(cw_home, cluster.host, cluster.port)["masters"]
    path.chmod(0o644)
    with pytest.raises(SecurityError, match=re.escape(f"chmod 600 {path}")):
        ClusterExecutor(cluster.host, cluster.port, connect_timeout=1)
    path.chmod(0o600)
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(abs, -8).result(timeout=30) == 8


def field_names(path: str) -> list:
    with open(path) as f:
        return sorted(json.load(f))


def test_a_leaked_client_file_holds_no_key_to_pose_as_the_master(master, cw_home, other_user):
    leaked = Path(other_user.home) / "leaked.json"
    shutil.copy(files_of(cw_home, master.host, master.port)["masters"], leaked)
    os.chown(leaked, other_user.uid, other_user.gid)
    fields = other_user.run(field_names, str(leaked))
    assert "server_public" in fields and "server_secret" not in fields
    assert "worker_secret" not in fields


def test_keys_rotate_when_a_master_restarts_where_others_could_read_its_files(procs,
                                                                              cw_home):
    def killed(m):
        m.signal(signal.SIGKILL)
        m.popen.wait(10)  # a crash: its files stay behind

    first = procs.master()
    files = files_of(cw_home, first.host, first.port)
    key = lambda: json.loads(files["masters"].read_text())["server_public"]  # noqa: E731
    old = key()
    killed(first)
    again = procs.master(port=first.port)
    assert key() == old  # restarted: the same keys, so its peers reconnect
    killed(again)
    files["masters"].chmod(0o644)
    third = procs.master(port=first.port)
    assert key() != old and "may have leaked" in third.stderr()
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
    procs.workers(third, 1)
    with ClusterExecutor(third.host, third.port) as ex:
        assert ex.submit(abs, -9).result(timeout=30) == 9


def dealer_as(port: int, keys: dict, role: str, info=None) -> zmq.Socket:
    """A raw peer (in the other user's process) registered as ``role``; None if refused."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
    security.secure_client(sock, keys)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(P.pack(P.HELLO, P.VERSION, role, info or {"name": "intruder", "slots": 1}))
    while sock.poll(10_000):
        header = P.unpack(sock.recv_multipart()[0])
        if header[0] in (P.WELCOME, P.REFUSE):
            return (header[0], sock)
    raise AssertionError("no answer to HELLO")


def registers(port: int, keys: dict, role: str) -> str:
    kind, sock = dealer_as(port, keys, role)
    sock.close()
    return "welcome" if kind == P.WELCOME else "refused"


def test_a_client_key_cannot_register_as_a_worker_nor_a_worker_key_as_a_client(
        master, other_user):
    """Issue 12.4: all peers shared one key pair, so any client could register as a worker
    and receive everyone's functions and arguments."""
    client = security.keys_for(master.host, master.port, "client")
    worker = security.keys_for(master.host, master.port, "worker")
    assert other_user.run(registers, master.port, client, "worker") == "refused"
    assert other_user.run(registers, master.port, worker, "client") == "refused"
    assert other_user.run(registers, master.port, client, "client") == "welcome"
    assert other_user.run(registers, master.port, worker, "worker") == "welcome"
    assert "key cannot register as a worker" in master.stderr()


def round_trip(sock) -> None:
    """A STATUS after what was sent: once answered, the master has handled it all."""
    sock.send(P.pack(P.STATUS))
    while sock.poll(10_000):
        if P.unpack(sock.recv_multipart()[0])[0] == P.STATUS_REPLY:
            return
    raise AssertionError("no STATUS_REPLY")


def forge_lane_result(port: int, keys: dict, cid: int, seq: int, frames: list) -> bool:
    _, sock = dealer_as(port, keys, "worker")
    sock.send_multipart([P.pack(P.LANE_RESULT, cid, seq, P.OK, len(frames)), *frames])
    round_trip(sock)
    sock.send(P.pack(P.BYE))
    round_trip(sock)
    sock.close()
    return True


def test_a_forged_lane_result_never_reaches_another_clients_future(cluster, other_user,
                                                                   tmp_path):
    """Issue 12.4: any worker could send LANE_RESULT for any client's job."""
    gate = str(tmp_path / "gate")
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        wait_for(lambda: ex._session.lane.sock is not None, 10, "a lane")
        future = ex.submit(gated, gate, "real")
        forged = serialize.dumps_result("forged", "the forged result")
        worker_keys = security.keys_for(cluster.host, cluster.port, "worker")
        assert other_user.run(forge_lane_result, cluster.port, worker_keys,
                              ex._session.lane.cid, future._seq, forged)
        assert not future.done()
        assert "does not hold" in cluster.stderr()
        open(gate, "w").close()
        assert future.result(timeout=30) == "real"


def hold_and_cancel(ready, port: int, keys: dict) -> None:
    """A worker that answers "cancelled" for the job it is handed, unasked, and leaves."""
    _, sock = dealer_as(port, keys, "worker")
    ready("registered")
    while sock.poll(30_000):
        header = P.unpack(sock.recv_multipart()[0])
        if header[0] == P.JOBS:
            cid, seq = header[3][0][:2]
            sock.send(P.pack(P.CANCELLED, [[cid, seq, True]]))
            sock.send(P.pack(P.BYE))
            round_trip(sock)
            ready("cancelled it unasked")
            return


def test_an_unsolicited_cancel_answer_does_not_strand_a_job(procs, other_user):
    """Issue 12.4: an unasked "cancelled" made the client drop a job whose future then
    stayed pending for ever."""
    master = procs.master()
    keys = security.keys_for(master.host, master.port, "worker")
    intruder = other_user.start(hold_and_cancel, master.port, keys)
    assert intruder.ready() == "registered"
    with ClusterExecutor(master.host, master.port) as ex:
        future = ex.submit(abs, -3)
        assert intruder.ready() == "cancelled it unasked"
        procs.workers(master, 1)
        assert future.result(timeout=20) == 3
