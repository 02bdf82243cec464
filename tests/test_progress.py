"""Progress bars: forced to a StringIO, silent on a non-terminal, drawn on a real pty."""
from __future__ import annotations

import fcntl
import io
import os
import struct
import sys
import termios
from concurrent.futures import Future

import pytest

from cw.client import ClusterExecutor
from cw.client import progress as cw_progress
from cw.client.progress import as_completed, map_bar, progress

pytest.importorskip("tqdm", reason="progress bars need tqdm: pip install 'cw[progress]'")

def done_futures(n: int) -> list[Future]:
    futures = [Future() for _ in range(n)]
    for i, f in enumerate(futures):
        f.set_result(i)
    return futures


def test_forced_bar_counts_cluster_jobs(cluster):
    out = io.StringIO()
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        futures = [ex.submit(pow, i, 2) for i in range(12)]
        assert progress(futures, file=out, force=True, desc="squares") == futures
        assert [f.result() for f in futures] == [i * i for i in range(12)]
    text = out.getvalue()
    assert "squares" in text and "12/12" in text and "100%" in text
    assert "job/s" in text  # the rate


def test_failed_futures_count_as_done(cluster):
    out = io.StringIO()
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        futures = [ex.submit(divmod, 1, i) for i in range(3)]  # divmod(1, 0) raises
        progress(futures, file=out, force=True)
    assert "3/3" in out.getvalue()
    assert isinstance(futures[0].exception(), Exception)


def test_silent_unless_a_terminal_or_forced(capsys):
    progress(done_futures(5), file=io.StringIO())  # not a tty: nothing, no error
    progress(done_futures(5))                      # stderr, captured by pytest: not a tty
    assert map_bar(True, (range(3),)) is None
    assert capsys.readouterr().err == ""


def test_drawn_on_a_real_terminal():
    master_fd, slave_fd = os.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        with os.fdopen(slave_fd, "w") as tty:
            assert tty.isatty()
            progress(done_futures(7), file=tty)
        os.set_blocking(master_fd, False)
        drawn = b""
        while True:
            try:
                chunk = os.read(master_fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master_fd)
    assert b"7/7" in drawn


def test_as_completed_yields_in_completion_order():
    futures = [Future() for _ in range(3)]
    out = io.StringIO()
    it = as_completed(futures, file=out, force=True, desc="order")
    futures[2].set_result(2)
    assert next(it) is futures[2]
    futures[0].set_result(0)
    assert next(it) is futures[0]
    it.close()                       # abandoned early: the bar closes at 2/3
    assert "2/3" in out.getvalue() and "3/3" not in out.getvalue()


def test_map_bar_totals_and_late_ticks():
    out = io.StringIO()
    assert map_bar(False, (range(5),)) is None
    bar = map_bar({"file": out, "force": True}, (range(10), [1] * 7), chunksize=3)
    assert bar.bar.total == 3        # min length 7, in chunks of 3
    bar.watch(done_futures(1)[0])
    bar.close()
    bar.tick()                       # a job finishing after map was abandoned: ignored
    assert "1/3" in out.getvalue() and "2/3" not in out.getvalue()
    unsized = map_bar({"file": io.StringIO(), "force": True}, (iter([1, 2]),))
    assert unsized.bar.total is None
    unsized.close()


def test_without_tqdm_warns_once_and_draws_nothing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setattr(cw_progress, "_warned", False)
    out = io.StringIO()
    progress(done_futures(2), file=out, force=True)
    progress(done_futures(2), file=out, force=True)
    assert out.getvalue() == ""
    assert [r.message for r in caplog.records].count(
        "progress bars need tqdm: pip install 'cw[progress]'") == 1


def test_map_with_progress(cluster):
    out = io.StringIO()
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        squares = ex.map(pow, range(20), [2] * 20, progress={"file": out, "force": True})
        assert list(squares) == [i * i for i in range(20)]
        chunked = ex.map(abs, range(-9, 11), chunksize=5, progress={"file": out,
                                                                    "force": True})
        assert list(chunked) == [abs(i) for i in range(-9, 11)]
        unsized = io.StringIO()
        streamed = ex.map(abs, (-i for i in range(5)), progress={"file": unsized,
                                                                 "force": True})
        assert list(streamed) == list(range(5))
    assert "20/20" in out.getvalue() and "4/4" in out.getvalue()
    assert "5job" in unsized.getvalue()  # no total: a count and a rate


def test_map_progress_is_off_by_default(cluster, capsys):
    with ClusterExecutor(cluster.host, cluster.port) as ex:
        assert list(ex.map(abs, [-1, -2], progress=True)) == [1, 2]  # stderr is no tty
        assert list(ex.map(abs, [-3])) == [3]
    assert capsys.readouterr().err == ""
