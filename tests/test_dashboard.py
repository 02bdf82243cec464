"""The web dashboard of ``python -m cw.master --dashboard 0``, read by urllib and Chromium.

    master --dashboard 0 --logs--> "dashboard on http://127.0.0.1:P/"
    2 workers + 40 jobs run --> GET /status.json (urllib)  and  chromium --dump-dom (the page
                                after its JS polled and rendered), both checked against that
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from html.parser import HTMLParser

import pytest
from conftest import wait_for

from cw.client import ClusterExecutor
from cw.master.throughput import Throughput

JOBS = 40

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")


def test_throughput_rates_from_samples():
    t = Throughput(maxlen=5)
    for i, routed in enumerate([0, 10, 30, 30, 70, 100]):
        t.add(1000.0 + i, 50.0 + i, routed, queue=6 - i)
    assert len(t.samples) == 5                      # a ring buffer: the first sample fell out
    assert [s[2] for s in t.series()] == [0.0, 20.0, 0.0, 40.0, 30.0]
    assert t.series()[-1] == [1005.0, 100, 30.0, 1]
    assert t.rate(55.0, 100) == pytest.approx((100 - 10) / 4)
    assert t.rate(56.0, 130, window=2) == pytest.approx((130 - 70) / 2)
    assert Throughput().rate(1.0, 5) == 0.0


@pytest.fixture
def dashboard(procs):
    """A master with --dashboard 0, 2 workers and JOBS jobs done; yields (master, url)."""
    master = procs.master("--dashboard", "0")
    url = wait_for(lambda: (m := re.search(r"dashboard on (http://\S+)", master.stderr()))
                   and m.group(1), 10, "the dashboard's address in the master's log")
    procs.workers(master, 2)
    with ClusterExecutor(master.host, master.port) as ex:
        assert sum(ex.map(abs, range(JOBS))) == sum(range(JOBS))
    return master, url


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        return reply.read()


def test_status_json_and_page(dashboard):
    master, url = dashboard
    info = json.loads(get(url + "status.json"))
    assert info["routed"] == JOBS and info["queue"] == 0
    assert sorted(w["pid"] for w in info["workers"]) == \
        sorted(w["pid"] for w in master.status()["workers"])
    assert sum(w["done"] for w in info["workers"]) == JOBS
    assert info["throughput_last_minute"] > 0
    assert info["series"] and all(len(s) == 4 for s in info["series"])
    page = get(url).decode()
    assert "<canvas" in page and "status.json" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "external assets"


def status_for_host(url: str, host: str, path: str = "/status.json") -> int:
    """The HTTP status of a GET to ``url`` whose Host header says ``host``."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def test_only_local_host_names_are_answered(procs):
    """DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 sends
    ``Host: evil.example``; it must not read the dashboard."""
    master = procs.master("--dashboard", "0")
    url = wait_for(lambda: (m := re.search(r"dashboard on (http://\S+)", master.stderr()))
                   and m.group(1), 10, "the dashboard's address in the master's log")
    port = url.rstrip("/").rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", "[::1]:" + port):
        assert status_for_host(url, host) == 200, host
        assert status_for_host(url, host, "/") == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        assert status_for_host(url, host) == 403, host
        assert status_for_host(url, host, "/") == 403, host
    assert "no authentication" not in master.stderr()


def test_a_dashboard_off_loopback_warns_and_answers_its_own_names(procs):
    master = procs.master("--dashboard", "0", "--dashboard-host", "0.0.0.0")
    url = wait_for(lambda: (m := re.search(r"dashboard on (http://\S+)", master.stderr()))
                   and m.group(1), 10, "the dashboard's address in the master's log")
    assert wait_for(lambda: "no authentication" in master.stderr(), 10, "the warning")
    port = url.rstrip("/").rsplit(":", 1)[1]
    assert status_for_host(url, f"{socket.gethostname()}:{port}") == 200
    assert status_for_host(url, f"evil.example:{port}") == 403


class Cells(HTMLParser):
    """Collects the text of elements with an id, and of table rows by table id."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self.rows: dict[str, list[list[str]]] = {}
        self.stack: list[str | None] = []
        self.table = None

    def handle_starttag(self, tag, attrs):
        ident = dict(attrs).get("id")
        if tag == "table":
            self.table = ident
        elif tag == "tr" and self.table and self.stack.count("tbody"):
            self.rows.setdefault(self.table, []).append([])
        elif tag == "td" and self.table in self.rows:
            self.rows[self.table][-1].append("")
        if tag not in ("br", "meta", "link", "img", "input"):
            self.stack.append(ident if ident else tag)

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for ident in self.stack:
            if ident in ("n-workers", "n-busy", "queue", "routed", "rate", "conn",
                         "n-clients"):
                self.text[ident] = self.text.get(ident, "") + data
        if self.table in self.rows and "td" in self.stack and self.rows[self.table]:
            self.rows[self.table][-1][-1] += data


def dump_dom(url: str, tmp_path) -> str:
    """The page's DOM after its JS ran, from headless Chromium (stopped by its group)."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chr'}",
            "--virtual-time-budget=3000", "--dump-dom", url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return out.decode()


@pytest.mark.timeout(120)
@pytest.mark.skipif(chromium() is None, reason="needs Chromium for a real browser: "
                                               "apt-get install -y chromium")
def test_page_in_headless_chromium(dashboard, tmp_path):
    master, url = dashboard
    cells = Cells()
    cells.feed(dump_dom(url, tmp_path))
    assert cells.text.get("conn") == "live", cells.text
    assert cells.text["n-workers"] == "2"
    assert cells.text["routed"] == str(JOBS)
    assert cells.text["queue"] == "0"
    assert float(cells.text["rate"]) > 0
    workers = cells.rows["workers"]
    assert sorted(row[2] for row in workers) == \
        sorted(str(w["pid"]) for w in master.status()["workers"])
    assert sum(int(row[7]) for row in workers) == JOBS
    assert cells.rows["clients"] == [["no clients"]]
