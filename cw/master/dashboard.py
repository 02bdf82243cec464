"""A read-only web dashboard served by the master itself: ``--dashboard PORT``.

    master's IOLoop (the only thread that touches the Scheduler)
      Master.throughput (cw.master.throughput, sampled by the master every second)
      GET /             --> PAGE: one self-contained HTML page (inline CSS + JS, no assets)
      GET /status.json  --> Scheduler.status(now) + throughput_last_minute + series
                                 ^
      browser: fetch("/status.json") every second, redraws tables and a <canvas> chart

Everything runs on the master's event loop, so the handlers read the Scheduler without locks;
they only read. There is no authentication: the default bind address is 127.0.0.1; reach a
remote master's dashboard with ``ssh -L PORT:127.0.0.1:PORT master-node``.

A web page elsewhere could read a local dashboard through DNS rebinding (its own name made to
resolve to 127.0.0.1), so a request is answered only when its ``Host`` header names this
machine as the user meant it: a loopback name, an IP address, or the ``--dashboard-host``
name (with this machine's own names if that is a wildcard); anything else gets 403.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
from typing import TYPE_CHECKING

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from cw.errors import DashboardError

if TYPE_CHECKING:  # pragma: no cover
    from cw.master.daemon import Master

from cw.master.throughput import HISTORY, SAMPLE_INTERVAL, WINDOW, Throughput  # noqa: F401

log = logging.getLogger(__name__)

class DashboardServer(HTTPServer):
    """The dashboard's HTTP server; ``url`` is its address (the master samples throughput)."""

    url: str = ""


def snapshot(master: Master, throughput: Throughput) -> dict:
    """What ``/status.json`` returns: the master's status plus throughput history."""
    info = master.status()
    info["series"] = throughput.series()
    return info


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
WILDCARDS = {"", "*", "0.0.0.0", "::"}


def allowed_hosts(bind_host: str) -> set[str]:
    """The ``Host`` names (without port) the dashboard answers, besides IP addresses."""
    names = set(LOOPBACK_NAMES)
    if bind_host in WILDCARDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(bind_host.lower().strip("[]"))
    return names


def is_loopback(host: str) -> bool:
    """True if ``host`` (a name or an address) means this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Handler(RequestHandler):
    """Answers only requests whose ``Host`` header is one of ``allowed`` or an IP address
    (DNS rebinding can only forge names)."""

    def initialize(self, allowed: set[str], **kw) -> None:
        self.allowed = allowed

    def prepare(self) -> None:
        name = self.request.host_name.strip("[]")
        if name in self.allowed:
            return
        try:
            ipaddress.ip_address(name)
        except ValueError:
            log.debug("refused a request for Host %r", self.request.host)
            raise HTTPError(403, reason="unknown Host") from None


class PageHandler(Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(PAGE)


class StatusHandler(Handler):
    # tornado calls initialize with each route's own keyword arguments: the handlers'
    # signatures differ by design
    def initialize(  # type: ignore[override]
            self, allowed: set[str], master: Master, throughput: Throughput) -> None:
        super().initialize(allowed)
        self.master = master
        self.throughput = throughput

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(snapshot(self.master, self.throughput)))


def _log_request(handler: RequestHandler) -> None:
    """Requests at DEBUG: a page polling every second must not fill the master's log."""
    status = handler.get_status()
    log.log(logging.WARNING if status >= 500 else logging.DEBUG, "%d %s %.1f ms", status,
            handler.request.uri, 1000 * handler.request.request_time())


def start_dashboard(master: Master, port: int, host: str = "127.0.0.1") -> HTTPServer:
    """Serve the dashboard for ``master`` on ``host:port`` (0: a free port) from its IOLoop.

    Call it on the master's loop thread (``Master.run`` does, once the loop exists). The
    returned server's ``url`` attribute is where it listens; its ``stop()`` stops it.
    """
    throughput = master.throughput  # sampled by the master itself
    allowed = allowed_hosts(host)
    app = Application([(r"/", PageHandler, {"allowed": allowed}),
                       (r"/status\.json", StatusHandler,
                        {"allowed": allowed, "master": master, "throughput": throughput})],
                      log_function=_log_request)
    try:
        sockets = bind_sockets(port, host)
    except OSError as exc:
        raise DashboardError(f"cannot serve the dashboard on {host}:{port}: {exc}") from exc
    server = DashboardServer(app)
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    server.url = f"http://{shown}:{bound[1]}/"
    log.info("dashboard on %s", server.url)
    if not is_loopback(host):
        log.warning("the dashboard has no authentication and is bound to %s: anyone who "
                    "reaches that address can read this cluster's state (keep it on "
                    "127.0.0.1 and use ssh -L)", host or "every interface")
    return server


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cw master</title>
<style>
 :root { --fg:#1d2330; --muted:#6b7385; --line:#e3e6ec; --bg:#f6f7f9; --card:#fff;
         --accent:#2f6fde; --busy:#d97a00; --idle:#2e9d5b; --bad:#c8372d; }
 * { box-sizing: border-box; }
 body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
        color:var(--fg); background:var(--bg); }
 header { display:flex; align-items:baseline; gap:1em; padding:14px 24px;
          background:var(--fg); color:#fff; }
 header h1 { font-size:18px; margin:0; font-weight:600; }
 header .sub { color:#b9c0cf; font-size:13px; }
 #conn { margin-left:auto; font-size:13px; }
 #conn.ok::before { content:"\25CF\00A0"; color:#4cd483; }
 #conn.down::before { content:"\25CF\00A0"; color:#ff6b5e; }
 main { padding:18px 24px; max-width:1200px; }
 .tiles { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr));
          gap:12px; margin-bottom:16px; }
 .tile, section { background:var(--card); border:1px solid var(--line); border-radius:8px; }
 .tile { padding:10px 14px; }
 .tile .v { font-size:26px; font-weight:600; font-variant-numeric:tabular-nums; }
 .tile .k { color:var(--muted); font-size:12px; text-transform:uppercase;
            letter-spacing:.04em; }
 section { padding:12px 14px; margin-bottom:16px; }
 section h2 { font-size:14px; margin:0 0 8px; color:var(--muted); font-weight:600;
              text-transform:uppercase; letter-spacing:.04em; }
 canvas { width:100%; height:180px; display:block; }
 table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
 th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
          white-space:nowrap; }
 th { color:var(--muted); font-weight:600; font-size:12px; }
 td.n, th.n { text-align:right; }
 .state { display:inline-block; padding:0 8px; border-radius:10px; color:#fff;
          font-size:12px; }
 .state.busy { background:var(--busy); } .state.idle { background:var(--idle); }
 .empty { color:var(--muted); font-style:italic; }
 .bad { color:var(--bad); font-weight:600; }
</style></head>
<body>
<header><h1>cw master</h1><span class="sub" id="master">connecting&hellip;</span>
<span id="conn" class="down">waiting</span></header>
<main>
<div class="tiles">
 <div class="tile"><div class="v" id="n-workers">&ndash;</div><div class="k">workers</div></div>
 <div class="tile"><div class="v" id="n-busy">&ndash;</div><div class="k">busy</div></div>
 <div class="tile"><div class="v" id="queue">&ndash;</div><div class="k">queued jobs</div></div>
 <div class="tile"><div class="v" id="routed">&ndash;</div><div class="k">results routed</div></div>
 <div class="tile"><div class="v" id="rate">&ndash;</div><div class="k">results/s, last min</div></div>
 <div class="tile"><div class="v" id="n-clients">&ndash;</div><div class="k">clients</div></div>
</div>
<section><h2>Throughput (results/s) <span id="chart-span"></span></h2>
<canvas id="chart" width="1100" height="180"></canvas></section>
<section><h2>Workers</h2><table id="workers"><thead><tr>
 <th>name</th><th>host</th><th class="n">pid</th><th>state</th><th>job</th>
 <th class="n">job s</th><th class="n">held</th><th class="n">done</th>
 <th class="n">failures</th><th class="n">heard s ago</th><th>resources (held by)</th>
 </tr></thead>
 <tbody><tr><td class="empty" colspan="11">no workers</td></tr></tbody></table></section>
<section><h2>Clients</h2><table id="clients"><thead><tr>
 <th>name</th><th>host</th><th class="n">pid</th><th class="n">queued</th>
 <th class="n">running</th><th class="n">done</th><th class="n">submitted</th></tr></thead>
 <tbody><tr><td class="empty" colspan="7">no clients</td></tr></tbody></table></section>
<section><h2>Batches <span id="journal"></span></h2><table id="batches"><thead><tr>
 <th>name</th><th class="n">jobs</th><th class="n">queued</th><th class="n">running</th>
 <th class="n">done</th><th class="n">failed</th><th class="n">cancelled</th>
 <th class="n">progress</th></tr></thead>
 <tbody><tr><td class="empty" colspan="8">no batches</td></tr></tbody></table></section>
<section><h2>Sharing <span id="policy"></span></h2><table id="shares"><thead><tr>
 <th>client</th><th class="n">share</th><th class="n">use</th><th class="n">queued</th>
 <th>queued by priority</th><th>waits for</th></tr></thead>
 <tbody><tr><td class="empty" colspan="6">nothing queued</td></tr></tbody></table></section>
<div class="sub" style="color:var(--muted)">discarded results: <span id="discarded">&ndash;</span>
 &middot; updated <span id="updated">never</span></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x, d) => (x === null || x === undefined) ? "" :
  Number(x).toLocaleString("en-US", {maximumFractionDigits: d || 0});

function setText(id, text) { $(id).textContent = text; }

function fillTable(id, rows, cells, empty) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = $(id).tHead.rows[0].cells.length;
    td.className = "empty"; td.textContent = empty;
    return;
  }
  for (const row of rows) {
    const tr = body.insertRow();
    for (const [value, cls] of cells(row)) {
      const td = tr.insertCell();
      if (cls) td.className = cls;
      if (value instanceof Node) td.appendChild(value); else td.textContent = value;
    }
  }
}

function badge(state) {
  const span = document.createElement("span");
  span.className = "state " + state; span.textContent = state;
  return span;
}

function workerCells(w) {
  return [[w.name], [w.host], [w.pid, "n"], [badge(w.state)],
          [w.job ? w.job[0] + " #" + w.job[1] : ""], [fmt(w.job_seconds, 1), "n"],
          [w.held, "n"], [fmt(w.done), "n"], [w.failures, w.failures ? "n bad" : "n"],
          [fmt(w.last_heartbeat, 1), "n"], [resourceText(w)]];
}

function pairs(map, sep) {
  return Object.entries(map || {}).map(([k, v]) => k + sep + v).join(", ");
}

function resourceText(w) {
  const held = (w.resources_held_by || []).map((h) => h[0] + " #" + h[1] + " " + h[2]);
  return pairs(w.resources, "=") + (held.length ? " (" + held.join("; ") + ")" : "");
}

function shareCells(s, waiting) {
  const none = waiting.filter((x) => x.client === s.client).map((x) => x.reason);
  return [[s.client], [s.share, "n"], [s.use, "n"], [fmt(s.queued), "n"],
          [pairs(s.by_priority, ": ")],
          [pairs(s.waiting_for, ": ") + (none.length ? " \u2014 " + none.join("; ") : "")]];
}

function clientCells(c) {
  return [[c.name], [c.host], [c.pid, "n"], [fmt(c.queued), "n"], [fmt(c.running), "n"],
          [fmt(c.done), "n"], [fmt(c.submitted), "n"]];
}

function batchCells(b) {
  const settled = b.done + b.failed + b.cancelled;
  return [[b.name], [fmt(b.jobs), "n"], [fmt(b.queued), "n"], [fmt(b.running), "n"],
          [fmt(b.done), "n"], [fmt(b.failed), b.failed ? "n bad" : "n"],
          [fmt(b.cancelled), "n"], [fmt(b.jobs ? 100 * settled / b.jobs : 100, 1) + " %", "n"]];
}

function drawChart(series) {
  const canvas = $("chart"), ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 1100, h = canvas.clientHeight || 180;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio); g.clearRect(0, 0, w, h);
  const left = 48, right = 8, top = 8, bottom = 22;
  const pts = series.slice(1);  // the first sample has no rate
  const tEnd = series.length ? series[series.length - 1][0] : 0;
  const tStart = series.length ? series[0][0] : 0;
  const span = Math.max(tEnd - tStart, 10);
  const maxRate = Math.max(1, ...pts.map((p) => p[2])) * 1.1;
  const x = (t) => left + (w - left - right) * (1 - (tEnd - t) / span);
  const y = (r) => top + (h - top - bottom) * (1 - r / maxRate);
  g.font = "11px system-ui, sans-serif"; g.fillStyle = "#6b7385"; g.strokeStyle = "#e3e6ec";
  for (let i = 0; i <= 4; i++) {
    const r = maxRate * i / 4, yy = y(r);
    g.beginPath(); g.moveTo(left, yy); g.lineTo(w - right, yy); g.stroke();
    g.textAlign = "right"; g.fillText(fmt(r, r < 10 ? 1 : 0), left - 6, yy + 4);
  }
  for (let s = 0; s <= span; s += span > 300 ? 120 : span > 60 ? 30 : 10) {
    g.textAlign = s ? "center" : "right";
    g.fillText(s ? "-" + s + " s" : "now", x(tEnd - s), h - 6);
  }
  setText("chart-span", "\u00b7 last " + Math.round(span) + " s");
  if (pts.length < 1) return;
  g.beginPath(); g.moveTo(x(pts[0][0]), y(0));
  for (const p of pts) g.lineTo(x(p[0]), y(p[2]));
  g.lineTo(x(pts[pts.length - 1][0]), y(0)); g.closePath();
  g.fillStyle = "rgba(47,111,222,0.15)"; g.fill();
  g.beginPath();
  pts.forEach((p, i) => i ? g.lineTo(x(p[0]), y(p[2])) : g.moveTo(x(p[0]), y(p[2])));
  g.strokeStyle = "#2f6fde"; g.lineWidth = 2; g.stroke();
}

function render(s) {
  setText("master", s.master_id.slice(0, 8));
  setText("n-workers", s.workers.length);
  setText("n-busy", s.workers.filter((w) => w.state === "busy").length);
  setText("queue", fmt(s.queue));
  setText("routed", fmt(s.routed));
  setText("rate", fmt(s.throughput_last_minute, 1));
  setText("n-clients", s.clients.length);
  setText("discarded", fmt(s.discarded));
  setText("updated", new Date(s.time * 1000).toLocaleTimeString());
  fillTable("workers", s.workers, workerCells, "no workers");
  fillTable("clients", s.clients, clientCells, "no clients");
  fillTable("batches", s.batches || [], batchCells, "no batches");
  setText("journal", s.journal ? "\u00b7 journal " + s.journal :
          "\u00b7 no journal: batches do not outlive the master");
  setText("policy", "\u00b7 policy " + (s.policy || "fifo"));
  fillTable("shares", (s.shares || []).filter((x) => x.queued || x.use),
            (x) => shareCells(x, s.waiting || []), "nothing queued");
  drawChart(s.series);
}

async function poll() {
  try {
    const reply = await fetch("status.json", {cache: "no-store"});
    if (!reply.ok) throw new Error("HTTP " + reply.status);
    render(await reply.json());
    $("conn").className = "ok"; $("conn").textContent = "live";
  } catch (err) {
    $("conn").className = "down"; $("conn").textContent = "master unreachable";
  }
}
poll();
setInterval(poll, 1000);
</script>
</body></html>
"""
