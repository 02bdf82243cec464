"""ClusterExecutor against a real master and 2 real worker processes."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from functools import partial

import pytest
from conftest import gated, wait_for

from cw.client import ClusterExecutor, session
from cw.errors import MasterUnreachable, RemoteException, SerializationError


def test_map_squares_with_a_lambda(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert list(ex.map(lambda x: x * x, range(10))) == [x * x for x in range(10)]


def test_closures_kwargs_and_many_jobs(cluster):
    offset = 1000

    def add(x, *, scale=1):
        return offset + x * scale

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        futures = [ex.submit(add, i, scale=3) for i in range(2000)]
        assert [f.result(timeout=60) for f in futures] == [offset + 3 * i for i in range(2000)]


def test_map_chunksize_and_several_iterables(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        got = list(ex.map(pow, range(50), [2] * 50, chunksize=7))
    assert got == [i ** 2 for i in range(50)]


def test_large_arguments_and_results_arrive_intact(cluster):
    """bytes and bytearray buffers of several MB travel as frames of their own;
    each must come back with its type and every byte."""
    blob = os.urandom(3 << 20)

    def echo(data, *, extra):
        return data, type(data).__name__, bytes(extra[:10])

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        for data in (blob, bytearray(blob), blob[:100]):
            got, name, head = ex.submit(echo, data, extra=blob).result(timeout=60)
            assert (type(got), got, name, head) == (type(data), data, type(data).__name__,
                                                     blob[:10])


def test_large_arguments_wait_in_the_client_beyond_the_byte_window(procs, master, tmp_path):
    """The master keeps at most the byte window of a client's arguments; the rest waits in
    the client, leaves as results free room, and can still be cancelled there."""
    procs.workers(master, 1)
    gate = tmp_path / "gate"
    blob = os.urandom(6 << 20)
    with ClusterExecutor(master.host, master.port) as ex:
        window = ex._session.window()
        first = ex.submit(gated, str(gate), "first")
        wait_for(first.running, what="the gated job to start")
        futures = [ex.submit(len, blob[:-i] if i else blob) for i in range(12)]
        # 12 x 6 MB = 72 MB, more than the 32 MB window for 1 worker: the master holds the
        # first ones only, whatever the timing, and the last is cancelled before it left
        assert 12 * len(blob) > window
        assert futures[-1].cancel()
        wait_for(lambda: master.status()["queue"] >= window // len(blob) - 1,
                 what="the jobs in the window to reach the master")
        assert master.status()["queue"] <= window // len(blob)
        gate.touch()
        assert [f.result(timeout=60) for f in futures[:-1]] == \
            [len(blob) - i for i in range(11)]
        assert first.result(timeout=30) == "first" and futures[-1].cancelled()


def test_as_completed_and_wait(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        futures = {ex.submit(str, i): i for i in range(20)}
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == \
            sorted(str(i) for i in range(20))
        done, not_done = cf.wait(list(futures), timeout=30)
        assert len(done) == 20 and not not_done


def test_remote_exception_keeps_its_type_and_remote_traceback(cluster):
    def explode(x):
        raise ValueError(f"bad value {x}")

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        future = ex.submit(explode, 7)
        with pytest.raises(ValueError, match="bad value 7") as info:
            future.result(timeout=30)
        assert "explode" in str(info.value.__cause__)
        assert "Traceback" in str(info.value.__cause__)
        # the worker lives on
        assert ex.submit(abs, -5).result(timeout=30) == 5


class Unrebuildable(Exception):
    def __init__(self, a, b):  # pickles, but cannot be re-created from its args
        super().__init__(f"{a}-{b}")


def test_exception_that_cannot_be_rebuilt_becomes_remote_exception(cluster):
    def fail():
        raise Unrebuildable(1, 2)

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        with pytest.raises(RemoteException) as info:
            ex.submit(fail).result(timeout=30)
    assert info.value.type_name.endswith("Unrebuildable")
    assert "fail" in info.value.remote_traceback


def test_unpicklable_function_arguments_and_result_fail_only_that_job(cluster):
    import threading
    lock = threading.Lock()

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        bad_func = ex.submit(lambda: lock)            # closure over a lock: not picklable
        bad_args = ex.submit(id, lock)
        bad_result = ex.submit(threading.Lock)        # the result is not picklable
        good = ex.submit(abs, -3)
        for future in (bad_func, bad_args):
            with pytest.raises(SerializationError, match="cannot pickle"):
                future.result(timeout=30)
        with pytest.raises(SerializationError, match="result"):
            bad_result.result(timeout=30)
        assert good.result(timeout=30) == 3


def test_result_that_cannot_be_unpickled_by_the_client(cluster, tmp_path):
    """The worker imports a module the client does not have; its result cannot unpickle."""
    remote_only = tmp_path / "remote_only"
    remote_only.mkdir()
    (remote_only / "secretmod.py").write_text("class Thing:\n    pass\n")

    def make(folder):
        sys.path.insert(0, folder)
        import secretmod
        return secretmod.Thing()

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        with pytest.raises(SerializationError, match="unpickle the result"):
            ex.submit(make, str(remote_only)).result(timeout=30)
        assert ex.submit(abs, -1).result(timeout=30) == 1


def test_jobs_run_in_the_clients_directory_with_its_sys_path(cluster, tmp_path, monkeypatch):
    lib = tmp_path / "clientlib"
    lib.mkdir()
    (lib / "clientmod.py").write_text("def where():\n    import os\n    return os.getcwd()\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(lib))
    import clientmod

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert ex.submit(clientmod.where).result(timeout=30) == str(work)


def test_running_only_once_started_and_cancel_of_a_queued_job(cluster, tmp_path):
    """Two blocking jobs occupy both workers; a third waits; cancelling it means it never runs."""
    gate = tmp_path / "gate"
    ran = tmp_path / "ran"

    def mark():
        open(ran, "w").close()

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        busy = [ex.submit(gated, str(gate), i) for i in range(2)]
        wait_for(lambda: all(f.running() for f in busy), what="both blockers running")
        queued = ex.submit(mark)
        assert not queued.running()
        assert queued.cancel() is True
        assert queued.cancelled()
        gate.touch()
        assert [f.result(timeout=30) for f in busy] == [0, 1]
        assert ex.submit(abs, -2).result(timeout=30) == 2  # the queue has moved past it
    assert not ran.exists()


def test_cancel_of_a_running_job_fails(cluster, tmp_path):
    gate = tmp_path / "gate"

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        future = ex.submit(gated, str(gate), "done")
        wait_for(future.running, what="job running")
        assert future.cancel() is False
        gate.touch()
        assert future.result(timeout=30) == "done"


def test_map_timeout(cluster, tmp_path):
    gate = tmp_path / "gate"

    with ClusterExecutor(cluster.host, cluster.port) as ex:
        results = ex.map(partial(gated, str(gate)), range(4), timeout=0.5)
        with pytest.raises(cf.TimeoutError):
            next(results)
        gate.touch()


def test_shutdown_semantics(cluster, tmp_path):
    gate = tmp_path / "gate"

    ex = ClusterExecutor(cluster.host, cluster.port)
    running = [ex.submit(gated, str(gate), i) for i in range(2)]
    wait_for(lambda: all(f.running() for f in running), what="blockers running")
    waiting = [ex.submit(gated, str(gate), i) for i in range(2, 6)]
    gate.touch()
    ex.shutdown(wait=True, cancel_futures=True)
    assert [f.result(timeout=0) for f in running] == [0, 1]
    assert all(f.done() for f in waiting)
    assert any(f.cancelled() for f in waiting)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)


def test_several_clients_share_one_master(cluster, procs, tmp_path):
    script = tmp_path / "other_client.py"
    script.write_text(
        "import sys\n"
        "from cw.client import ClusterExecutor\n"
        "with ClusterExecutor('127.0.0.1', int(sys.argv[1])) as ex:\n"
        "    got = list(ex.map(lambda x: -x, range(500)))\n"
        "assert got == [-x for x in range(500)], got\n"
        "print('ok', flush=True)\n")
    other = procs.run([sys.executable, str(script), str(cluster.port)])
    with ClusterExecutor(cluster.host, cluster.port) as a, \
            ClusterExecutor(cluster.host, cluster.port) as b:
        fa = [a.submit(abs, -i) for i in range(500)]
        fb = [b.submit(str, i) for i in range(500)]
        assert [f.result(timeout=60) for f in fa] == list(range(500))
        assert [f.result(timeout=60) for f in fb] == [str(i) for i in range(500)]
    assert other.readline(60).strip() == "ok"


def test_workers_join_and_leave_while_clients_run(procs, master):
    with ClusterExecutor(master.host, master.port) as ex:
        futures = [ex.submit(abs, -i) for i in range(200)]
        assert not any(f.done() for f in futures)  # no worker yet: all wait
        first = procs.workers(master, 1)
        assert [f.result(timeout=60) for f in futures] == list(range(200))
        second = procs.workers(master, 1)
        first.stop()
        master.wait_workers(1)
        assert list(ex.map(abs, range(-100, 0))) == list(range(100, 0, -1))
        second.stop()
    master.wait_workers(0)  # each left with a goodbye (not a heartbeat timeout)


def test_cw_master_environment_variable(cluster, monkeypatch):
    monkeypatch.setenv("CW_MASTER", cluster.address)
    with ClusterExecutor() as ex:
        assert ex.submit(abs, -9).result(timeout=30) == 9


def test_unreachable_master_fails_fast_and_typed():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(MasterUnreachable, match=str(port)):
        ClusterExecutor("127.0.0.1", port, connect_timeout=1)


def test_map_streams_with_a_bounded_number_in_flight(cluster):
    """Back-pressure: map never has more than map_window jobs outstanding."""
    with ClusterExecutor(cluster.host, cluster.port, map_window=50) as ex:
        most = 0
        total = 0
        for i, value in enumerate(ex.map(abs, range(-3000, 0))):
            assert value == 3000 - i
            most = max(most, ex._session.pending())
            total += 1
    assert total == 3000 and most <= 50


def test_options_validate_and_apply(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        with pytest.raises(ValueError):
            ex.options(max_retries=0)
        with pytest.raises(ValueError):
            ex.options(timeout=-1)
        assert list(ex.options(max_retries=5, timeout=30).map(abs, [-1, -2])) == [1, 2]


def test_short_jobs_never_strand_behind_a_long_one(cluster, tmp_path):
    """Workers prefetch; a worker stuck in a long job gives its queued jobs back to an idle
    one (work stealing), so every short job finishes while the long one still runs."""
    gate = tmp_path / "gate"
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert list(ex.map(abs, range(-500, 0)))  # workers learn that jobs are short
        long_job = ex.submit(gated, str(gate), "long")
        short = [ex.submit(abs, -i) for i in range(40)]
        try:
            assert [f.result(timeout=30) for f in short] == list(range(40))
            assert not long_job.done()
        finally:
            gate.touch()
        assert long_job.result(timeout=30) == "long"


# ------------------------------------------------------------------ nothing kept alive
class Traced:
    """Its bound methods are the submitted functions; each unpickling of one (a worker
    receiving the function) appends an "x" to ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.payload = bytearray(1 << 20)  # what a user's big object drags along

    def __reduce__(self):
        return (_revive_traced, (self.path,))

    def add(self, x):
        return x + 1


def _revive_traced(path: str) -> Traced:
    with open(path, "a") as f:
        f.write("x")
    return Traced(path)


class Box:
    """A result that can be weakly referenced."""

    def __init__(self, n: int):
        self.n = n


def collected(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


@pytest.fixture
def private_runtime_dir(monkeypatch):
    """A private $XDG_RUNTIME_DIR (short: socket paths are limited), so that the lane
    works whatever state /tmp/cw-<uid> is in on a shared machine."""
    path = tempfile.mkdtemp(prefix="cwrt")
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_submitted_bound_methods_object_is_collected_and_shipped_once_per_worker(
        procs, private_runtime_dir, tmp_path):
    """The function cache holds functions weakly: a bound method's object is collectable
    once its futures are done and dropped, on the lane and through the master, while the
    function still reaches each worker once however many jobs use it."""
    cluster = procs.master()
    procs.workers(cluster, 2)
    trace = tmp_path / "unpickled"
    obj = Traced(str(trace))
    ref = weakref.ref(obj)
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        for i in range(5):  # lone jobs: the first through the master, the next on the lane
            assert ex.submit(obj.add, i).result(timeout=30) == i + 1
        wait_for(lambda: ex._session.lane.sock is not None, what="the lane")
        assert ex.submit(obj.add, 5).result(timeout=30) == 6
        futures = [ex.submit(obj.add, i) for i in range(300)]  # a fresh bound method each
        assert [f.result(timeout=60) for f in futures] == list(range(1, 301))
        assert list(ex.map(obj.add, range(300))) == list(range(1, 301))
        unpickles = trace.read_text().count("x")
        assert 1 <= unpickles <= 2, f"{unpickles} unpickles for 2 workers"
        del obj, futures
        wait_for(lambda: collected(ref), 5, "the object to be collected")
        # and the lane path alone: a lone job of a new object, then drop it
        other = Traced(str(trace))
        ref = weakref.ref(other)
        assert ex.submit(other.add, 1).result(timeout=30) == 2
        del other
        wait_for(lambda: collected(ref), 5, "the lane job's object to be collected")


def test_distinct_partials_by_the_thousand_leave_nothing_in_the_client(cluster, tmp_path,
                                                                        monkeypatch):
    """Each distinct partial is a function of its own: the client keeps none of them and
    forgets the digests it sent beyond DIGESTS_KEPT (20 here, 10,000 really), while a
    function in use all along still reaches each worker once."""
    monkeypatch.setattr(session, "DIGESTS_KEPT", 20)
    trace = tmp_path / "unpickled"
    obj = Traced(str(trace))
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        futures = []
        for i in range(300):
            futures += [ex.submit(partial(pow, i), 2), ex.submit(obj.add, i)]
        assert [f.result(timeout=60) for f in futures] == \
            [v for i in range(300) for v in (i * i, i + 1)]
        sent, cached = len(ex._session.master_has), len(ex._session.functions.entries)
    assert sent <= 20 and cached <= 4, (sent, cached)
    assert 1 <= trace.read_text().count("x") <= 2


def test_each_result_map_yielded_is_collectable_once_dropped(cluster):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        for chunksize in (1, 3):
            seen = []
            for value in ex.map(Box, range(10), chunksize=chunksize):
                seen.append(value.n)
                ref = weakref.ref(value)
                del value
                assert collected(ref), f"map keeps a yielded result (chunksize={chunksize})"
            assert seen == list(range(10))


# ------------------------------------------------------------------ shutdown(cancel_futures)
def test_shutdown_cancel_futures_lets_held_jobs_finish_like_process_pool(cluster):
    """50 jobs to 2 workers, then shutdown(cancel_futures=True) at once: as with
    ProcessPoolExecutor, the first few complete, the rest are cancelled, none is left."""
    outcomes = {}
    for name, make in (("cw", lambda: ClusterExecutor(cluster.host, cluster.port)),
                       ("ProcessPool", lambda: cf.ProcessPoolExecutor(
                           2, mp_context=multiprocessing.get_context("spawn")))):
        ex = make()
        futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
        ex.shutdown(wait=True, cancel_futures=True)
        done = [f for f in futures if f.done() and not f.cancelled()]
        cancelled = [f for f in futures if f.cancelled()]
        outcomes[name] = (len(done), len(cancelled))
        assert len(done) + len(cancelled) == 50, f"{name}: a future left pending"
        assert futures[:len(done)] == done, f"{name}: not the first jobs completed"
        assert all(f.result(timeout=0) is None for f in done)
    print("done, cancelled:", outcomes)
    assert outcomes["cw"][0] >= 2 and outcomes["cw"][1] >= 30, outcomes


def test_shutdown_cancel_futures_after_short_jobs_still_cancels_the_rest(cluster):
    """Workers that learned jobs are short prefetch dozens; shutdown(cancel_futures=True)
    still runs only what runs or is next on each worker and cancels the rest."""
    with ClusterExecutor(cluster.host, cluster.port) as warm:
        assert list(warm.map(abs, range(-500, 0))) == list(range(500, 0, -1))
    assert max(w["hold"] for w in cluster.status()["workers"]) > 25  # they prefetch a lot
    ex = ClusterExecutor(cluster.host, cluster.port)
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(wait=True, cancel_futures=True)
    done = sum(f.done() and not f.cancelled() for f in futures)
    cancelled = sum(f.cancelled() for f in futures)
    print("done, cancelled:", done, cancelled)
    assert done + cancelled == 50, "a future left pending"
    assert 2 <= done <= 10 and cancelled >= 40

def test_shutdown_cancel_futures_runs_what_a_worker_holds(cluster, tmp_path):
    """Two jobs running and two prefetched behind them (held by the workers, about to run):
    those four complete; the six still queued at the master are cancelled."""
    gate = tmp_path / "gate"
    ex = ClusterExecutor(cluster.host, cluster.port)
    futures = [ex.submit(gated, str(gate), i) for i in range(10)]
    wait_for(lambda: sum(f.running() for f in futures) == 2, what="two jobs running")
    wait_for(lambda: sum(w["held"] for w in cluster.status()["workers"]) == 4,
             what="each worker to hold a second job")
    stopper = threading.Thread(target=ex.shutdown, kwargs={"cancel_futures": True})
    stopper.start()
    wait_for(lambda: sum(f.cancelled() for f in futures) == 6, what="6 jobs cancelled")
    assert not any(f.done() for f in futures[:4])
    gate.touch()
    stopper.join(30)
    assert not stopper.is_alive()
    assert [f.result(timeout=0) for f in futures[:4]] == [0, 1, 2, 3]
    assert all(f.cancelled() for f in futures[4:])
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)


# ------------------------------------------------------------------ shutdown(wait=False)
@pytest.mark.parametrize("cancel_futures", [False, True])
def test_shutdown_without_wait_returns_at_once_and_futures_still_settle(cluster, tmp_path,
                                                                         cancel_futures):
    """As concurrent.futures promises: shutdown(wait=False) returns at once, the
    unfinished futures still complete (or are cancelled, with cancel_futures), none is left
    pending for a later result() to hang on, and then the client leaves the master."""
    gate = tmp_path / "gate"
    ex = ClusterExecutor(cluster.host, cluster.port)
    futures = [ex.submit(gated, str(gate), i) for i in range(10)]
    wait_for(lambda: sum(f.running() for f in futures) == 2, what="two jobs running")
    started = time.monotonic()
    ex.shutdown(wait=False, cancel_futures=cancel_futures)
    took = time.monotonic() - started
    print(f"shutdown(wait=False, cancel_futures={cancel_futures}) took {took:.3f} s")
    assert took < 3.0
    assert cluster.status()["clients"], "the client left before its futures settled"
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)
    gate.touch()
    cf.wait(futures, timeout=30)
    assert all(f.done() for f in futures), "a future left pending"
    done = [f.result(timeout=0) for f in futures if not f.cancelled()]
    assert done == list(range(len(done)))
    if cancel_futures:
        assert 2 <= len(done) <= 4 and all(f.cancelled() for f in futures[len(done):])
    else:
        assert len(done) == 10
    wait_for(lambda: not cluster.status()["clients"], what="the client to leave")


def test_a_program_that_shuts_down_without_waiting_exits_once_its_futures_are_done(
        cluster, tmp_path):
    """As with the standard executors, the program does not exit (dropping its jobs at the
    master) before the futures of a shutdown(wait=False) have settled."""
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, time\n"
        "from cw.client import ClusterExecutor\n"
        "ex = ClusterExecutor(sys.argv[1], int(sys.argv[2]))\n"
        "for i in range(4):\n"
        "    ex.submit(time.sleep, 0.5).add_done_callback(\n"
        "        lambda f, i=i: print('done', i, f.exception(), flush=True))\n"
        "ex.shutdown(wait=False)\n"
        "print('returned', flush=True)\n")
    out = subprocess.run([sys.executable, str(script), cluster.host, str(cluster.port)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "returned"
    assert sorted(lines[1:]) == [f"done {i} None" for i in range(4)]
