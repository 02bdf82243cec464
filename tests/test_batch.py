"""Named batches (campaigns, issue 14) against real masters, workers and client processes.

Each test runs a master with a --journal in its tmp_path; SIGKILL stands for a crash or a
power cut (the journal's group commit is fsync'ed before anything is acknowledged).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import CancelledError

import pytest
from conftest import gated, wait_for

from cw.batch import Batch, list_batches
from cw.client import ClientThread, ClusterExecutor
from cw.errors import JournalFull, UnknownBatch
from cw.status import format_table


def slow_square(x, gate=None):
    """x * x, once ``gate`` exists (if given)."""
    if gate is not None:
        gated(gate)
    return x * x


def fails_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x


def journal_master(procs, tmp_path, *extra, port=0):
    return procs.master("--journal", str(tmp_path / "journal"), *extra, port=port)


def restart(procs, master, tmp_path, *extra):
    """SIGKILL the master, start a new one on the same journal and port."""
    master.signal(signal.SIGKILL)
    master.popen.wait(10)
    return journal_master(procs, tmp_path, *extra, port=master.port)


def test_detach_and_die_then_collect(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    gate = tmp_path / "gate"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from cw.client import ClusterExecutor
        from test_batch import slow_square
        ex = ClusterExecutor("127.0.0.1", {master.port}, batch="sweep-1")
        for i in range(200):
            ex.submit(slow_square, i, {str(gate)!r})
        ex.detach()
        print("detached", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    client = procs.run([sys.executable, str(script)])
    assert client.readline(30).strip() == "detached"
    assert client.popen.wait(10) == -signal.SIGKILL
    procs.workers(master, 2)
    with Batch("sweep-1", master.host, master.port) as batch:
        assert batch.status()["jobs"] == 200
        gate.touch()
        assert batch.results(timeout=60) == [i * i for i in range(200)]
        assert batch.status()["done"] == 200


def test_master_sigkill_mid_run_then_restart(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    gate = tmp_path / "gate"
    ex = ClusterExecutor(master.host, master.port, batch="mid")
    for i in range(300):
        ex.submit(slow_square, i)
    for i in range(300, 600):
        ex.submit(slow_square, i, str(gate))
    ex.detach()
    procs.workers(master, 2)
    with Batch("mid", master.host, master.port) as batch:
        wait_for(lambda: batch.status()["done"] >= 300, 30, "the ungated jobs")
    master = restart(procs, master, tmp_path)
    with Batch("mid", master.host, master.port) as batch:
        status = batch.status()
        assert status["jobs"] == 600 and status["done"] >= 300
        gate.touch()
        outcomes = batch.outcomes(timeout=60)
    assert [k for k, _ in outcomes] == list(range(1, 601))  # each key exactly once
    assert [v for _, v in outcomes] == [i * i for i in range(600)]


def test_master_sigkill_after_completion(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    procs.workers(master, 2)
    with ClusterExecutor(master.host, master.port, batch="done") as ex:
        assert list(ex.map(fails_on_3, range(3))) == [0, 1, 2]
        ex.submit(fails_on_3, 3)
        ex.detach()
    with Batch("done", master.host, master.port) as batch:
        batch.wait(30)
    master = restart(procs, master, tmp_path)
    with Batch("done", master.host, master.port) as batch:
        assert batch.status() == {"jobs": 4, "queued": 0, "running": 0, "done": 3,
                                  "failed": 1, "cancelled": 0}
        outcomes = batch.outcomes()
        assert outcomes[:3] == [(1, 0), (2, 1), (3, 2)]
        assert isinstance(outcomes[3][1], ValueError)
        with pytest.raises(ValueError, match="three"):
            batch.results()


def test_reopen_and_add_keys_continue(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    procs.workers(master, 1)
    ex = ClusterExecutor(master.host, master.port, batch="grow")
    assert [ex.submit(slow_square, i).result(30) for i in range(3)] == [0, 1, 4]
    ex.detach()
    ex = ClusterExecutor(master.host, master.port, batch="grow")
    futures = [ex.submit(slow_square, i) for i in range(3, 6)]
    ex.detach()
    with Batch("grow", master.host, master.port) as batch:
        assert batch.results(timeout=30) == [i * i for i in range(6)]
        assert [k for k, _ in batch.outcomes()] == [1, 2, 3, 4, 5, 6]
        assert [f.result(30) for f in batch.futures()] == [i * i for i in range(6)]
    assert all(f.done() or not f.cancelled() for f in futures)


def test_futures_settle_live(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    gate = tmp_path / "gate"
    ex = ClusterExecutor(master.host, master.port, batch="live")
    for i in range(20):
        ex.submit(slow_square, i, str(gate))
    ex.detach()
    procs.workers(master, 2)
    with Batch("live", master.host, master.port) as batch:
        futures = batch.futures()
        assert not any(f.done() for f in futures)
        gate.touch()
        assert [f.result(30) for f in futures] == [i * i for i in range(20)]


def test_cancel(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    gate = tmp_path / "gate"
    procs.workers(master, 1)
    ex = ClusterExecutor(master.host, master.port, batch="stop")
    first = ex.submit(slow_square, 0, str(gate))
    wait_for(lambda: first.running(), 20, "the first job to start")
    for i in range(1, 50):
        ex.submit(slow_square, i, str(gate))
    ex.detach()
    with Batch("stop", master.host, master.port) as batch:
        status = batch.cancel()
        assert status["cancelled"] >= 40
        gate.touch()  # the running job still finishes, and its outcome counts
        status = wait_for(lambda: (s := batch.status())["done"] == 1 and s, 30, "job 1")
        assert status["cancelled"] == 49 and batch.wait(30)["jobs"] == 50
        outcomes = batch.outcomes()
        assert outcomes[0] == (1, 0)
        assert sum(isinstance(v, CancelledError) for _, v in outcomes) == status["cancelled"]


def test_forget_gives_space_back_then_unknown(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    procs.workers(master, 2)
    with ClusterExecutor(master.host, master.port, batch="big") as ex:
        list(ex.map(len, [b"x" * 20_000] * 200))
        ex.detach()

    def size():
        return sum(f.stat().st_size for f in (tmp_path / "journal").glob("seg-*"))
    before = size()
    assert before > 200 * 20_000
    with Batch("big", master.host, master.port) as batch:
        batch.forget()
    with pytest.raises(UnknownBatch):
        Batch("big", master.host, master.port)
    wait_for(lambda: size() < before // 4, 20, "the journal to be compacted")
    assert list_batches(master.host, master.port) == []


def test_unknown_batch(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    with pytest.raises(LookupError):
        Batch("never-made", master.host, master.port)


def test_journal_full(procs, tmp_path):
    master = journal_master(procs, tmp_path, "--journal-max-bytes", "300000")
    ex = ClusterExecutor(master.host, master.port, batch="full")
    futures = [ex.submit(len, b"y" * 10_000) for _ in range(100)]
    with pytest.raises(JournalFull):
        ex.detach(timeout=30)
    refused = [f for f in futures if f.done() and isinstance(f.exception(), JournalFull)]
    assert 50 <= len(refused) < 100
    procs.workers(master, 1)
    with Batch("full", master.host, master.port) as batch:
        accepted = batch.status()["jobs"]
        assert accepted + len(refused) == 100
        assert batch.results(timeout=30) == [10_000] * accepted  # nothing accepted is lost


def test_truncated_journal_tail(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    procs.workers(master, 2)
    with ClusterExecutor(master.host, master.port, batch="torn") as ex:
        assert list(ex.map(slow_square, range(50))) == [i * i for i in range(50)]
        ex.detach()
    master.signal(signal.SIGKILL)
    master.popen.wait(10)
    last = sorted((tmp_path / "journal").glob("seg-*.log"))[-1]
    with open(last, "r+b") as f:  # a torn last write: the last record cut short
        f.truncate(last.stat().st_size - 7)
    master = journal_master(procs, tmp_path, port=master.port)
    with Batch("torn", master.host, master.port) as batch:
        assert batch.status()["jobs"] == 50
        assert batch.results(timeout=30) == [i * i for i in range(50)]
    assert "torn" in master.stderr()


def test_clientthread_batch_keeps_job_ids(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    procs.workers(master, 2)
    got = {}
    with ClientThread(lambda jobid, r: got.__setitem__(jobid, r), master.host, master.port,
                      batch="ct") as ct:
        for name in ("a", "b", "c"):
            ct.submit(name, len, name * 3)
        ct.wait(30)
        ct.detach()
    assert got == {"a": 3, "b": 3, "c": 3}
    with Batch("ct", master.host, master.port) as batch:
        assert batch.outcomes() == [("a", 3), ("b", 3), ("c", 3)]


def test_without_journal_batches_outlive_the_client(procs, tmp_path):
    master = procs.master()
    procs.workers(master, 1)
    ex = ClusterExecutor(master.host, master.port, batch="mem")
    for i in range(5):
        ex.submit(slow_square, i)
    ex.detach()
    with Batch("mem", master.host, master.port) as batch:
        assert batch.results(timeout=30) == [0, 1, 4, 9, 16]
    status = master.status()
    assert status["journal"] is None and status["batches"][0]["durable"] is False
    assert "mem" in format_table(status) and "do not outlive" in format_table(status)
    assert "no --journal" in master.stderr()


def test_cli_json(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    procs.workers(master, 1)
    with ClusterExecutor(master.host, master.port, batch="cli") as ex:
        ex.submit(slow_square, 2)
        ex.detach()

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "cw.batch", *args], capture_output=True,
                             text=True, timeout=60)
        return out.returncode, out.stdout, out.stderr
    code, out, _ = cli("wait", "cli", master.address, "--json")
    assert code == 0 and json.loads(out)["done"] == 1
    code, out, _ = cli("list", master.address, "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["cli"]
    code, out, _ = cli("status", "cli", master.address)
    assert code == 0 and "cli" in out
    code, out, _ = cli("cancel", "cli", master.address, "--json")
    assert code == 0 and json.loads(out)["jobs"] == 1
    code, out, _ = cli("forget", "cli", master.address, "--json")
    assert code == 0
    code, _, err = cli("status", "cli", master.address)
    assert code == 2 and "no batch" in err


def test_live_executor_through_a_master_restart(procs, tmp_path):
    """Futures of a batch still connected settle after a master SIGKILL: the session sends
    its unsettled jobs again, the master skips those it journaled and runs what is queued."""
    master = journal_master(procs, tmp_path)
    procs.workers(master, 2)
    gate = tmp_path / "gate"
    with ClusterExecutor(master.host, master.port, batch="live-restart") as ex:
        quick = [ex.submit(slow_square, i) for i in range(10)]
        assert [f.result(30) for f in quick] == [i * i for i in range(10)]
        gated_futures = [ex.submit(slow_square, i, str(gate)) for i in range(10, 30)]
        wait_for(lambda: ex._session.acked >= 30, 20, "the jobs to be acknowledged")
        master = restart(procs, master, tmp_path)
        gate.touch()
        assert [f.result(60) for f in gated_futures] == [i * i for i in range(10, 30)]
        ex.detach()
    with Batch("live-restart", master.host, master.port) as batch:
        assert [k for k, _ in batch.outcomes(timeout=30)] == list(range(1, 31))


def test_detach_inside_with_does_not_wait_for_outcomes(procs, tmp_path):
    master = journal_master(procs, tmp_path)
    gate = tmp_path / "gate"
    with ClusterExecutor(master.host, master.port, batch="with") as ex:
        future = ex.submit(slow_square, 7, str(gate))
        ex.detach()  # then the with block ends: nothing to wait for here
    assert not future.done()
    procs.workers(master, 1)
    gate.touch()
    with Batch("with", master.host, master.port) as batch:
        assert batch.results(timeout=30) == [49]


def test_cw_journal_environment_variable(procs, tmp_path):
    path = tmp_path / "env-journal"
    master = procs.master(env={"CW_JOURNAL": str(path)})
    assert master.status()["journal"] == str(path)
    ex = ClusterExecutor(master.host, master.port, batch="env")
    ex.submit(slow_square, 3)
    ex.detach()
    assert list(path.glob("seg-*.log"))
    master = restart(procs, master, tmp_path / "unused")  # --journal elsewhere ...
    with pytest.raises(UnknownBatch):  # ... so this master does not know the batch
        Batch("env", master.host, master.port)


def test_forget_makes_room_in_a_full_journal(procs, tmp_path):
    master = journal_master(procs, tmp_path, "--journal-max-bytes", "400000")
    procs.workers(master, 1)
    ex = ClusterExecutor(master.host, master.port, batch="first")
    for _ in range(30):
        ex.submit(len, b"z" * 10_000)
    ex.detach()
    ex = ClusterExecutor(master.host, master.port, batch="second")
    for _ in range(30):
        ex.submit(len, b"z" * 10_000)
    with pytest.raises(JournalFull):
        ex.detach(timeout=30)
    with Batch("first", master.host, master.port) as batch:
        assert batch.results(timeout=30) == [10_000] * 30
        batch.forget()

    def accepted():
        ex = ClusterExecutor(master.host, master.port, batch="third")
        future = ex.submit(len, b"z" * 10_000)
        try:
            ex.detach(timeout=30)
        except JournalFull:
            return False
        return future
    assert wait_for(accepted, 30, "room again after forget()")
    with Batch("third", master.host, master.port) as batch:
        assert batch.results(timeout=30)[-1] == 10_000
