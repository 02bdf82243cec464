"""ClientThread, the callback API, against real processes."""
from __future__ import annotations

import threading

import pytest

from cw.client import ClientThread
from cw.errors import RemoteException


def test_callback_receives_every_result(cluster):
    got = {}
    lock = threading.Lock()

    def callback(jobid, result):
        with lock:
            got[jobid] = result

    with ClientThread(callback, cluster.host, cluster.port) as client:
        for i in range(300):
            client.submit(f"job-{i}", pow, i, 2)
    assert got == {f"job-{i}": i * i for i in range(300)}


def test_wait_reraises_failure_as_remote_exception_with_traceback(cluster):
    got = []

    def boom(x):
        if x == 3:
            raise KeyError("three")
        return x

    client = ClientThread(lambda j, r: got.append(r), cluster.host, cluster.port).start()
    try:
        for i in range(6):
            client.submit(i, boom, i)
        with pytest.raises(RemoteException) as info:
            client.wait(timeout=30)
        assert info.value.type_name == "builtins.KeyError"
        assert "boom" in info.value.remote_traceback
        assert isinstance(info.value.__cause__, KeyError)
        assert sorted(got) == [0, 1, 2, 4, 5]  # the others were delivered
        client.submit("again", abs, -1)       # the client goes on after a failure
        client.wait(timeout=30)
        assert got[-1] == 1
    finally:
        client.stop()


def test_context_manager_waits_for_all_jobs(cluster):
    results = []
    with ClientThread(lambda j, r: results.append(j), cluster.host, cluster.port) as client:
        for i in range(50):
            client.submit(i, sum, [i, i])
    assert sorted(results) == list(range(50))


def test_wait_is_bounded(procs, master):
    client = ClientThread(lambda j, r: None, master.host, master.port).start()
    try:
        client.submit(1, abs, 1)  # no worker: it cannot finish
        with pytest.raises(TimeoutError, match="1 jobs still outstanding"):
            client.wait(timeout=0.3)
    finally:
        client.stop()
