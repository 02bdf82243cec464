"""The same-machine path: peers on the master's machine use a private Unix socket."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat

import pytest
import zmq
from conftest import gated, wait_for

from cw import protocol as P
from cw.client import ClusterExecutor
from cw.conn import lane, security


def connection_file(cw_home) -> tuple:
    path, = (cw_home / "masters").glob("*.json")
    return path, json.loads(path.read_text())


def test_local_peers_use_a_socket_only_the_user_can_reach(cluster, cw_home):
    _, info = connection_file(cw_home)
    path = info["local"]["endpoint"][len("ipc://"):]
    folder = os.stat(os.path.dirname(path))
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert folder.st_uid == os.getuid() and folder.st_mode & 0o777 == 0o700
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex._session.conn.endpoint == info["local"]["endpoint"]
        assert list(ex.map(abs, [-1, -2, -3], timeout=30)) == [1, 2, 3]
    assert cluster.status()["workers"]  # status() takes the same path


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("which", ["master", "lane", "inbox"])
def test_another_user_cannot_connect_to_the_local_sockets(cluster, cw_home, which):
    """The master's local socket, a worker's lane and a client's inbox all refuse."""
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        lane = wait_for(lambda: ex._session.lane.endpoint, 10, "a lane")
        _, info = connection_file(cw_home)
        path = {"master": info["local"]["endpoint"][len("ipc://"):], "lane": lane,
                "inbox": ex._session.lane.inbox}[which]
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert_refused_to_nobody(path)


def assert_refused_to_nobody(path: str) -> None:
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # the child: become another user, try to connect, exit with the outcome
        code = 3
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            socket.socket(socket.AF_UNIX).connect(path)
            code = 1
        except PermissionError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "another user reached the socket"


def test_a_connection_file_from_another_machine_means_tcp_with_keys(cluster, cw_home):
    path, info = connection_file(cw_home)
    info["local"]["machine"] = "elsewhere/" + info["local"]["machine"]
    path.write_text(json.dumps(info))
    route = security.route_for(cluster.host, cluster.port)
    assert route.endpoint == f"tcp://{cluster.host}:{cluster.port}" and route.keys
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(abs, -4).result(timeout=30) == 4


def test_without_the_local_socket_everything_goes_over_tcp(procs, cw_home):
    master = procs.master("--no-local-socket")
    procs.workers(master, 1)
    _, info = connection_file(cw_home)
    assert "local" not in info
    with ClusterExecutor(master.host, master.port) as ex:
        assert ex._session.conn.endpoint.startswith("tcp://")
        assert ex.submit(abs, -5).result(timeout=30) == 5


def test_the_socket_file_goes_when_the_master_stops(procs, cw_home):
    master = procs.master()
    _, info = connection_file(cw_home)
    path = info["local"]["endpoint"][len("ipc://"):]
    assert os.path.exists(path)
    assert master.stop() == 0
    assert not os.path.exists(path)


def test_a_removed_socket_file_means_tcp_for_new_peers(cluster, cw_home):
    """A tmp cleaner or a logout may remove the socket while the master runs: peers that
    come later use TCP with the keys, peers already connected keep working."""
    _, info = connection_file(cw_home)
    with ClusterExecutor(cluster.host, cluster.port) as early:
        os.unlink(info["local"]["endpoint"][len("ipc://"):])
        with ClusterExecutor(cluster.host, cluster.port) as late:
            assert late._session.conn.endpoint.startswith("tcp://")
            assert late.submit(abs, -6).result(timeout=30) == 6
        assert early.submit(abs, -7).result(timeout=30) == 7


# ---------------------------------------------------------------- another user squats
def squat(ready, folder: str, path: str) -> None:
    """Another user's fake master at ``path``: a ROUTER in a directory it made, that welcomes
    whoever says HELLO and records the kinds of what it is sent; a "?" message from anyone
    gets that record back."""
    os.mkdir(folder, 0o755)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"ipc://{path}")
    os.chmod(path, 0o777)
    ready("bound")
    kinds = []
    while True:
        frames = sock.recv_multipart()
        if frames[1] == b"?":
            sock.send_multipart([frames[0], P.pack(0, *kinds)])
            continue
        try:
            kind = P.unpack(frames[1])[0]
        except Exception:
            continue
        kinds.append(kind)
        if kind == P.HELLO:
            sock.send_multipart([frames[0], P.pack(P.WELCOME, P.VERSION, "f" * 32, {
                "heartbeat_interval": 0.2, "heartbeat_timeout": 2, "workers": 1})])


@pytest.fixture
def squatted():
    """``squatted(folder)`` -> folder, removed at teardown (another user will hold it)."""
    folders = []
    yield lambda folder: folders.append(folder) or folder
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def squatter_saw(path: str) -> list:
    """The kinds of the messages the squatter at ``path`` was sent."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{path}")
        sock.send(b"?")
        assert sock.poll(10000), "the squatter does not answer"
        return P.unpack(sock.recv())[1:]


def local_path(cw_home) -> str:
    return connection_file(cw_home)[1]["local"]["endpoint"][len("ipc://"):]


@pytest.mark.timeout(120)
def test_a_squatted_socket_directory_is_not_trusted(cluster, procs, cw_home, other_user,
                                                    squatted):
    """A tmp cleaner removes the private directory while the master runs; another user makes
    it again and binds a socket at the master's path. New clients and workers must use TCP
    with the keys, never that socket; a worker's lane moves to a fresh private directory."""
    path = local_path(cw_home)
    folder = squatted(os.path.dirname(path))
    shutil.rmtree(folder)  # the tmp cleaner
    assert other_user.start(squat, folder, path).ready() == "bound"
    worker = procs.workers(cluster, 1)
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex._session.conn.endpoint.startswith("tcp://")
        assert list(ex.map(abs, range(-20, 0), timeout=30)) == list(range(20, 0, -1))
        assert ex._session.lane.inbox and not ex._session.lane.inbox.startswith(folder + "/")
    assert squatter_saw(path) == []
    assert "not this user's own" in worker.stderr()
    assert "using /tmp/cw-" in worker.stderr()  # its lane: a fresh private directory


@pytest.mark.timeout(120)
def test_a_peer_reconnecting_to_a_squatted_path_leaves_it(procs, cw_home, other_user,
                                                          squatted):
    """The master restarts after a tmp cleaner removed its directory, and another user has
    bound a fake master at the old path: the client and the worker, which were connected
    there, dial again only after checking the path (zmq must not reconnect by itself), and
    reach the real master (its fresh private directory); the fake one gets nothing."""
    master = procs.master()
    procs.workers(master, 1)
    path = local_path(cw_home)
    folder = squatted(os.path.dirname(path))
    gate = str(cw_home / "gate")
    with ClusterExecutor(master.host, master.port) as ex:
        assert ex._session.conn.endpoint == f"ipc://{path}"
        future = ex.submit(gated, gate, 7)
        wait_for(lambda: master.status()["workers"][0]["state"] == "busy", 10, "the job")
        master.stop()
        shutil.rmtree(folder, ignore_errors=True)  # the tmp cleaner
        assert other_user.start(squat, folder, path).ready() == "bound"
        again = procs.master(port=master.port)
        fresh = local_path(cw_home)
        assert not fresh.startswith(folder + "/") and security.local.trusted(fresh)
        open(gate, "w").close()
        assert future.result(timeout=60) == 7
        assert ex.submit(abs, -3).result(timeout=30) == 3
        assert ex._session.conn.endpoint != f"ipc://{path}"
        assert again.wait_workers(1)
    # it welcomes everyone: a client that believed it would resubmit its job there
    assert squatter_saw(path) == []


def test_a_lane_listener_cuts_off_another_user(cluster, cw_home, other_user):
    """Even if another user reaches a lane socket (a loosened directory), the listener closes
    the connection at once (SO_PEERCRED) and reads nothing from it."""
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        inbox = ex._session.lane.inbox
        folder = os.path.dirname(inbox)
        mode = os.stat(folder).st_mode & 0o777
        os.chmod(folder, 0o711)
        os.chmod(inbox, 0o777)
        try:
            got = other_user.run(talk_to, inbox)
        finally:
            os.chmod(folder, mode)
        assert got == b"", "the inbox kept a stranger's connection open"
        assert ex.submit(abs, -2).result(timeout=30) == 2


def talk_to(path: str) -> bytes:
    """Connect, send a lane message, and return what comes back before the end (b"")."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    try:
        sock.sendall(b"".join(lane.encode([lane.HELLO_TAG, b"/x"])))
    except OSError:
        return b""
    try:
        return sock.recv(100)
    except ConnectionResetError:
        return b""


@pytest.mark.timeout(90)
def test_a_local_worker_redials_by_tcp_with_its_own_key_when_the_socket_is_gone(procs):
    """A worker on the local socket whose master comes back without one dials again by TCP,
    as a worker (the workers' key: a client key would be refused), and runs jobs."""
    first = procs.master()
    procs.workers(first, 1)
    first.signal(signal.SIGKILL)
    first.popen.wait(10)
    second = procs.master("--no-local-socket", port=first.port)
    second.wait_workers(1, timeout=40)
    with ClusterExecutor(second.host, second.port) as ex:
        assert ex.submit(abs, -5).result(timeout=30) == 5
    assert "cannot register" not in second.stderr()
