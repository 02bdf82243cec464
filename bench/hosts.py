"""``python -m bench --hosts``: cw and dask.distributed across hosts (root only).

The same six workloads as the local run, on the rig of ``tests/hosts.py`` (Linux network
namespaces on one private bridge): the master / scheduler on h1, one worker process on
each of h2 and h3, the measuring client (the usual ``--child`` process) on h4. Every cw
peer then takes TCP with CurveZMQ, as on a real cluster; dask runs plain TCP. The daemons
are started fresh for every turn. The report puts each figure beside the local one from
``bench/results.json`` (hosts / local) and gives cw/dask on the hosts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs, report
from bench.systems import CwSystem, DaskSystem
from bench.workloads import WORKLOADS, Sizes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import hosts as rigs  # noqa: E402  (tests/hosts.py: no pytest in it)

REMOTE = "BENCH_REMOTE"  # the address the child's adapter connects to (JSON)
CLIENT_HOST, MASTER_HOST, WORKER_HOSTS = 4, 1, (2, 3)


class RemoteCw(CwSystem):
    """A ``ClusterExecutor`` on a master the parent started on another host."""

    def start(self, workers, workdir, timeout):
        from cw.client import ClusterExecutor
        from cw.status import status
        where = json.loads(os.environ[REMOTE])
        host, port = where["host"], where["port"]
        deadline = time.monotonic() + timeout
        while len(status(host, port, timeout=5)["workers"]) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cw: {workers} workers not registered in time")
            time.sleep(0.05)
        self.executor = ClusterExecutor(host, port)

    def stop(self):
        self.master = self.worker = None  # the parent owns the daemons
        super().stop()


class RemoteDask(DaskSystem):
    """A dask ``Client`` on a scheduler the parent started on another host."""

    def start(self, workers, workdir, timeout):
        from distributed import Client
        where = json.loads(os.environ[REMOTE])
        self.client = Client(scheduler_file=where["scheduler_file"], timeout=timeout)
        self.client.wait_for_workers(workers, timeout=timeout)


REMOTE_SYSTEMS = {"cw": RemoteCw, "dask": RemoteDask}


def start_daemons(rig: rigs.Rig, name: str, tmp: Path, timeout: float, env: dict) -> dict:
    """Start ``name``'s master and workers on the rig (in ``env``: the child's CW_HOME and
    PYTHONPATH, so ``--cw-path`` reaches them too); return what the child needs."""
    master = rig[MASTER_HOST]
    if name == "cw":
        proc = master.python("-m", "cw.master", "--host", master.ip, "--port", "0",
                             env=env, name="master")
        line = proc.readline(timeout)
        port = int(line.rsplit(":", 1)[1])
        for h in WORKER_HOSTS:
            rig[h].python("-m", "cw.worker", master.ip, "--port", str(port), "-n", "1",
                          env=env, stdout=subprocess.DEVNULL, name="workers")
        return {"host": master.ip, "port": port}
    scheduler_file = tmp / f"scheduler-{time.monotonic_ns()}.json"
    master.python("-m", "distributed.cli.dask_scheduler", "--host", master.ip,
                  "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file),
                  env=env, stdout=subprocess.DEVNULL, name="scheduler")
    deadline = time.monotonic() + timeout
    while not scheduler_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the dask scheduler wrote no scheduler file")
        time.sleep(0.05)
    for h in WORKER_HOSTS:
        rig[h].python("-m", "distributed.cli.dask_worker", "--scheduler-file",
                      str(scheduler_file), "--nworkers", "1", "--nthreads", "1",
                      "--host", rig[h].ip, "--no-dashboard", "--local-directory",
                      str(tmp / f"dask-{h}"), env=env, stdout=subprocess.DEVNULL,
                      name="workers")
    return {"scheduler_file": str(scheduler_file)}


def run_turn(rig: rigs.Rig, name: str, rep: int, sizes: Sizes, tmp: Path,
             cw_path: str = "") -> dict:
    """One child on the client host against fresh daemons; never raises."""
    from bench.run import START_TIMEOUT, child_env
    out = tmp / f"{name}-{rep}.json"
    foreign = procs.ForeignLoad()
    env = {**child_env(cw_path), "CW_HOME": str(tmp / f"cw-home-{rep}")}
    started = len(rig.procs)
    record = None
    try:
        where = start_daemons(rig, name, tmp, START_TIMEOUT, env)
        limit = START_TIMEOUT + 60 + sizes.timeout * (len(WORKLOADS) + 1)
        child = rig[CLIENT_HOST].start(
            [sys.executable, "-m", "bench", "--child", name, "--child-remote",
             "--child-rep", str(rep), "--child-out", str(out),
             "--child-sizes", json.dumps(sizes.to_dict())],
            env={**env, REMOTE: json.dumps(where)}, stdout=subprocess.DEVNULL,
            name="child", cwd=str(tmp))
        child.wait(limit)
        record = json.loads(out.read_text())
    except Exception as exc:
        record = {"system": name, "rep": rep, "metrics": {}, "errors": {},
                  "unavailable": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        for proc in reversed(rig.procs[started:]):
            proc.stop()
        del rig.procs[started:]
    record["foreign_load_cores"] = round(foreign.cores(), 3)
    return record


def beside_local(summary: dict, local: dict) -> str:
    """Per metric: local and cross-host medians, hosts/local, and cw/dask on hosts."""
    lines = [f"  {'metric':<28} {'system':<6} {'local':>10} {'hosts':>10} "
             f"{'hosts/local':>11} {'cw/dask hosts':>13}"]
    for metric in report.METRICS:
        for name in ("cw", "dask"):
            here = summary.get(name, {}).get("metrics", {}).get(metric.key)
            there = local.get(name, {}).get("metrics", {}).get(metric.key)
            if here is None:
                continue
            ratio = f"{here['median'] / there['median']:.2f}" if there else "-"
            dask = summary.get("dask", {}).get("metrics", {}).get(metric.key)
            vs = f"{here['median'] / dask['median']:.2f}" if name == "cw" and dask else ""
            lines.append(f"  {metric.label:<28} {name:<6} "
                         f"{metric.show(there['median'] if there else None):>10} "
                         f"{metric.show(here['median']):>10} {ratio:>11} {vs:>13}")
    return "\n".join(lines)


def main(systems: list[str], reps: int, sizes: Sizes, json_path: Path,
         cw_path: str = "", quiet_wait: float = 0.0) -> int:
    """Run every turn on one rig, print the report, write ``json_path``."""
    from bench.run import wait_quiet
    reason = rigs.unavailable()
    if reason:
        report.stderr(f"bench --hosts: {reason}")
        return 2
    systems = [s for s in systems if s in REMOTE_SYSTEMS] or list(REMOTE_SYSTEMS)
    machine = report.machine_info(HERE.parent)
    records = []
    t0 = time.monotonic()
    with rigs.Rig(4) as rig, tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        for rep in range(reps):
            for name in systems[rep % len(systems):] + systems[:rep % len(systems)]:
                waited = wait_quiet(quiet_wait) if quiet_wait > 0 else 0.0
                t = time.monotonic()
                record = run_turn(rig, name, rep, sizes, Path(tmp), cw_path)
                record["waited_for_quiet_s"] = round(waited, 1)
                records.append(record)
                report.stderr(f"[hosts rep {rep + 1}/{reps}] {name:<5} "
                              f"{time.monotonic() - t:5.1f}s [other load "
                              f"{record['foreign_load_cores']:.2f} cores] "
                              f"{record.get('unavailable') or ''}"
                              f"{record['errors'] or ''}")
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = report.summarize(records, systems)
    try:
        local = json.loads((HERE / "results.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        local = {}
    print(report.describe_machine(machine))
    print(f"across hosts (master on h1, a worker on h2 and h3, client on h4), reps: {reps}, "
          f"wall: {time.monotonic() - t0:.0f}s; local figures from bench/results.json\n")
    print(report.table(summary, report.ratios(summary)))
    print("\n" + beside_local(summary, local))
    report.write_json(json_path, {
        "machine": machine, "sizes": sizes.to_dict(), "reps": reps, "systems": systems,
        "layout": "master/scheduler on h1, 1 worker process on each of h2 and h3, "
                  "client on h4 (network namespaces on one bridge)",
        "summary": summary, "cw_over_dask": report.ratios(summary),
        "hosts_over_local": {
            name: {k: v["median"] / local[name]["metrics"][k]["median"]
                   for k, v in summary[name]["metrics"].items()
                   if k in local.get(name, {}).get("metrics", {})}
            for name in systems},
        "records": records})
    print(f"\njson: {json_path}")
    return 0
