"""Machine description, aggregation over repetitions, and the three outputs:
a text table, a JSON document and a PNG bar chart of the cw/peer ratios."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BUSY_CORES = 0.1  # other load above this (in cores) during a turn is flagged
PACKAGES = ("pyzmq", "msgpack", "tornado", "cloudpickle", "loky", "dask",
            "distributed", "ipyparallel", "matplotlib")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str
    chart: bool = True

    def show(self, value: float | None) -> str:
        return "-" if value is None else self.fmt.format(value)


METRICS = [
    Metric("submit_jobs_per_s", "submit, no-op jobs", "jobs/s", True, "{:,.0f}"),
    Metric("map_jobs_per_s", "map, no-op jobs", "jobs/s", True, "{:,.0f}"),
    Metric("latency_p50_us", "round trip p50", "us", False, "{:,.0f}"),
    Metric("latency_p90_us", "round trip p90", "us", False, "{:,.0f}"),
    Metric("cpu_efficiency", "CPU efficiency", "", True, "{:.3f}"),
    Metric("mixed_makespan_over_ideal", "mixed makespan/ideal", "", False, "{:.3f}"),
    Metric("bytes_mb_per_s", "10 MB arguments", "MB/s", True, "{:,.0f}"),
    Metric("ready_s", "start + warm-up", "s", False, "{:.2f}", chart=False),
]


# ---------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
        return round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_state(path: Path) -> str:
    """``<commit>`` of the checkout holding ``path``, ``+dirty`` if files under
    ``path`` differ from it (cw is used from the working tree)."""
    commit = _git(path, "rev-parse", "--short", "HEAD")
    if not commit:
        return f"{path} (not in a git checkout)"
    dirty = _git(path, "status", "--porcelain", "--", ".")
    return commit + ("+dirty" if dirty else "")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def machine_info(repo: Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "repo_commit": source_state(repo),
        "packages": {p: _version(p) for p in PACKAGES},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_machine(m: dict[str, Any]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return (f"machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, "
            f"{m['implementation']} {m['python']}, {m['platform']}\n"
            f"repo commit: {m['repo_commit']}; load avg start {m['loadavg_start']}"
            f" end {m.get('loadavg_end', '?')}\npackages: {pkgs}")


# ---------------------------------------------------------------- aggregation


def summarize(records: list[dict], systems: list[str]) -> dict[str, dict]:
    """Per system: status, versions, errors and median/min/max per metric."""
    out: dict[str, dict] = {}
    for name in systems:
        mine = [r for r in records if r["system"] == name]
        ran = [r for r in mine if not r.get("unavailable")]
        entry: dict[str, Any] = {
            "reps_run": len(ran), "reps_tried": len(mine),
            "unavailable": sorted({r["unavailable"] for r in mine if r.get("unavailable")}),
            "versions": next((r["versions"] for r in mine if r.get("versions")), {}),
            "errors": [f"rep {r['rep']}: {w}: {msg}" for r in mine
                       for w, msg in r.get("errors", {}).items()],
            "leftover_processes": sum(len(r.get("leftover_pids", [])) for r in mine),
            "other_load_cores_max": max((r.get("foreign_load_cores", 0.0) for r in mine),
                                        default=0.0),
            "metrics": {},
        }
        for metric in METRICS:
            values = [r["metrics"][metric.key] for r in ran if metric.key in r["metrics"]]
            if values:
                entry["metrics"][metric.key] = {
                    "median": statistics.median(values), "min": min(values),
                    "max": max(values), "n": len(values), "values": values}
        out[name] = entry
    return out


def ratios(summary: dict[str, dict], base: str = "cw") -> dict[str, dict[str, float]]:
    """cw median / peer median for every metric both have."""
    if base not in summary:
        return {}
    mine = summary[base]["metrics"]
    result: dict[str, dict[str, float]] = {}
    for peer, entry in summary.items():
        if peer == base:
            continue
        result[peer] = {k: mine[k]["median"] / v["median"]
                        for k, v in entry["metrics"].items()
                        if k in mine and v["median"]}
    return result


# ---------------------------------------------------------------- outputs


def _status(entry: dict) -> str:
    if entry["unavailable"] and not entry["reps_run"]:
        return "UNAVAILABLE: " + "; ".join(entry["unavailable"])[:90]
    text = f"ok, {entry['reps_run']}/{entry['reps_tried']} reps"
    if entry["errors"]:
        text += f", {len(entry['errors'])} errors (below)"
    if entry["leftover_processes"]:
        text += f", {entry['leftover_processes']} leftover processes killed"
    if entry["other_load_cores_max"] > BUSY_CORES:
        text += f", OTHER LOAD up to {entry['other_load_cores_max']:.2f} cores"
    return text


def table(summary: dict[str, dict], rats: dict[str, dict[str, float]]) -> str:
    """The report table: system status, then one block per metric."""
    lines = [f"{'system':<12} status"]
    lines += [f"{name:<12} {_status(e)}" for name, e in summary.items()]
    lines.append("")
    head = f"  {'system':<12} {'median':>10} {'min - max':>23} {'n':>2} {'cw/peer':>8}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for metric in METRICS:
        arrow = "higher" if metric.higher_is_better else "lower"
        lines.append(f"{metric.label} [{metric.unit + ', ' if metric.unit else ''}"
                     f"{arrow} is better]")
        for name, entry in summary.items():
            stat = entry["metrics"].get(metric.key)
            ratio = rats.get(name, {}).get(metric.key)
            if stat is None:
                cells = ("-", "", "0")
            else:
                cells = (metric.show(stat["median"]),
                         f"{metric.show(stat['min'])} - {metric.show(stat['max'])}",
                         str(stat["n"]))
            lines.append(f"  {name:<12} {cells[0]:>10} {cells[1]:>23} {cells[2]:>2} "
                         f"{'' if ratio is None else f'{ratio:.2f}':>8}")
    errors = [f"  {name}: {e}" for name, entry in summary.items() for e in entry["errors"]]
    if errors:
        lines += ["", "errors (these measurements were not counted):"] + errors
    return "\n".join(lines)


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def _shade_cw_better(ax, metrics: list[Metric]) -> None:
    """Tint, per metric group, the side of 1.0 on which cw beats the peer."""
    low, high = ax.get_ylim()
    for j, metric in enumerate(metrics):
        lo, hi = (1.0, high) if metric.higher_is_better else (low, 1.0)
        ax.fill_between([j - 0.45, j + 0.45], lo, hi, color="tab:green", alpha=0.08,
                        linewidth=0)
    ax.set_ylim(low, high)


def write_png(path: Path, rats: dict[str, dict[str, float]], title: str) -> str | None:
    """Grouped bars of cw/peer per metric on a log axis; returns an error text or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: {exc}"
    metrics = [m for m in METRICS if m.chart]
    peers = [p for p in rats if rats[p]]
    if not peers:
        return "no chart: no cw/peer ratio available"
    width = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for i, peer in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(metrics))]
        ys = [rats[peer].get(m.key, float("nan")) for m in metrics]
        bars = ax.bar(xs, ys, width, label=peer)
        ax.bar_label(bars, labels=["" if y != y else f"{y:.2g}" for y in ys],
                     fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    _shade_cw_better(ax, metrics)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([f"{m.label}\n({'>' if m.higher_is_better else '<'}1: cw better)"
                        for m in metrics], fontsize=8)
    ax.set_ylabel("cw / peer (median); shaded side: cw better")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
