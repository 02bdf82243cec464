"""Job functions and the six workloads, identical for every system.

Job functions live at module level so every system ships them by reference
(``bench.workloads.noop``); workers find them through ``PYTHONPATH``.

Each workload takes a started :class:`bench.systems.System` and a
:class:`Sizes`, checks every result, and returns a dict of metrics.  A wrong
result raises :class:`WrongResult`; it is never counted as a measurement.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, asdict
from typing import Any
from collections.abc import Callable

# ---------------------------------------------------------------- job functions


def noop(x: int) -> int:
    """The no-op job: return the argument unchanged."""
    return x


def burn(x: int, seconds: float) -> int:
    """Busy-loop for ``seconds`` of this process's CPU time, return ``x``."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return x


def length(data: bytes) -> int:
    """Return the length of ``data``."""
    return len(data)


# ---------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """How big each workload is; ``quick()`` is the smoke-test variant."""

    noop_jobs: int = 10_000
    latency_calls: int = 1000
    cpu_jobs: int = 40
    cpu_seconds: float = 0.045
    mixed_long: int = 4
    mixed_long_s: float = 0.300
    mixed_short: int = 200
    mixed_short_s: float = 0.005
    bytes_jobs: int = 20
    bytes_size: int = 10_000_000
    workers: int = 2
    timeout: float = 300.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(noop_jobs=300, latency_calls=50, cpu_jobs=10, mixed_long=2,
                   mixed_short=50, bytes_jobs=4, timeout=30.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WrongResult(Exception):
    """A job returned something other than the expected value."""


def check(got: list, expected: list, what: str) -> None:
    """Raise WrongResult unless ``got == expected`` (with a short diff)."""
    got = list(got)
    if got == expected:
        return
    if len(got) != len(expected):
        raise WrongResult(f"{what}: {len(got)} results, expected {len(expected)}")
    bad = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
    raise WrongResult(f"{what}: result[{bad}] = {got[bad]!r}, expected {expected[bad]!r}")


def _submit_all(system, calls: list[tuple], timeout: float) -> tuple[list, float]:
    """Submit ``(fn, *args)`` calls one by one, wait for all; return (results, wall)."""
    t0 = time.perf_counter()
    futures = [system.submit(fn, *args) for fn, *args in calls]
    results = system.gather(futures, timeout)
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------- workloads


def warmup(system, sizes: Sizes) -> None:
    """Untimed: make sure every worker is up and has imported the job module."""
    n = 10 * sizes.workers
    results, _ = _submit_all(system, [(noop, i) for i in range(n)], sizes.timeout)
    check(results, list(range(n)), "warmup submit")
    check(system.map(noop, range(n), sizes.timeout), list(range(n)), "warmup map")


def submit_rate(system, sizes: Sizes) -> dict[str, float]:
    """Workload 1: ``noop_jobs`` no-op jobs submitted one by one, then wait."""
    n = sizes.noop_jobs
    results, wall = _submit_all(system, [(noop, i) for i in range(n)], sizes.timeout)
    check(results, list(range(n)), "submit")
    return {"submit_jobs_per_s": n / wall}


def map_rate(system, sizes: Sizes) -> dict[str, float]:
    """Workload 2: the system's natural ``map`` over ``noop_jobs`` no-op jobs."""
    n = sizes.noop_jobs
    t0 = time.perf_counter()
    results = system.map(noop, range(n), sizes.timeout)
    wall = time.perf_counter() - t0
    check(results, list(range(n)), "map")
    return {"map_jobs_per_s": n / wall}


def latency(system, sizes: Sizes) -> dict[str, float]:
    """Workload 3: sequential round trips (submit one, wait for it)."""
    samples = []
    for i in range(sizes.latency_calls):
        t0 = time.perf_counter()
        got = system.result(system.submit(noop, i), sizes.timeout)
        samples.append(time.perf_counter() - t0)
        if got != i:
            raise WrongResult(f"latency: call {i} returned {got!r}")
    deciles = statistics.quantiles(samples, n=10)
    return {"latency_p50_us": statistics.median(samples) * 1e6,
            "latency_p90_us": deciles[8] * 1e6}


def cpu_efficiency(system, sizes: Sizes) -> dict[str, float]:
    """Workload 4: ``cpu_jobs`` jobs burning ``cpu_seconds`` each on the workers."""
    n, sec = sizes.cpu_jobs, sizes.cpu_seconds
    results, wall = _submit_all(system, [(burn, i, sec) for i in range(n)], sizes.timeout)
    check(results, list(range(n)), "cpu")
    return {"cpu_efficiency": (n * sec / sizes.workers) / wall}


def mixed_durations(sizes: Sizes) -> list[float]:
    """The mixed workload's job lengths, shuffled deterministically."""
    durations = ([sizes.mixed_long_s] * sizes.mixed_long
                 + [sizes.mixed_short_s] * sizes.mixed_short)
    random.Random(5).shuffle(durations)
    return durations


def mixed_makespan(system, sizes: Sizes) -> dict[str, float]:
    """Workload 5: few long + many short jobs; makespan relative to ideal."""
    durations = mixed_durations(sizes)
    ideal = max(sum(durations) / sizes.workers, max(durations))
    calls = [(burn, i, d) for i, d in enumerate(durations)]
    results, wall = _submit_all(system, calls, sizes.timeout)
    check(results, list(range(len(durations))), "mixed")
    return {"mixed_makespan_over_ideal": wall / ideal}


def big_args(system, sizes: Sizes) -> dict[str, float]:
    """Workload 6: ``bytes_jobs`` jobs each sent a distinct ``bytes_size`` argument."""
    base = bytes(range(256)) * (sizes.bytes_size // 256 + 1)
    payloads = [bytes([i % 256]) + base[1:sizes.bytes_size]
                for i in range(sizes.bytes_jobs)]
    results, wall = _submit_all(system, [(length, p) for p in payloads], sizes.timeout)
    check(results, [sizes.bytes_size] * sizes.bytes_jobs, "bytes")
    return {"bytes_mb_per_s": sizes.bytes_jobs * sizes.bytes_size / 1e6 / wall}


WORKLOADS: list[tuple[str, Callable[[Any, Sizes], dict[str, float]]]] = [
    ("submit", submit_rate),
    ("map", map_rate),
    ("latency", latency),
    ("cpu", cpu_efficiency),
    ("mixed", mixed_makespan),
    ("bytes", big_args),
]
