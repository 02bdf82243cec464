"""The same-machine path: peers on the master's machine use a private Unix socket."""
from __future__ import annotations

import json
import os
import socket
import stat
import pwd

import pytest

from cw import security
from cw.client import ClusterExecutor

from conftest import wait_for


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
        lane = wait_for(lambda: ex._session.lane, 10, "a lane")
        _, info = connection_file(cw_home)
        path = {"master": info["local"]["endpoint"][len("ipc://"):], "lane": lane,
                "inbox": ex._session.inbox}[which]
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
