"""What a worker process offers and what a job needs: numbers per named resource.

    python -m cw.worker HOST --resources gpu=1,mem=64   --> parse_resources() --> Capacity
    ex.options(resources={"gpu": 1})                    --> check_need()      --> the job's need
    master: JobQueue.take(n, capacity=worker.capacity) hands a job out only if
            capacity.fits(need); capacity.take(need) when handed out, capacity.give(need)
            when the job leaves the worker (done, cancelled, stolen, re-queued)

Names and units (per worker *process*, not per node):
    gpu   GPUs (a count; see --gpus, which sets gpu=1 per process)
    mem   memory in GB (decimal, 10**9 bytes; fractions allowed: mem=0.5)
    cpu   CPU cores
    any other name is an abstract counter, as in dask: ``licence=2``, ``disk=100``; cw never
    measures anything, it only counts what workers declare against what jobs ask.
A job asking for a resource no worker declares waits (never fails); a job asking for nothing
fits any worker.

Concurrency: a worker process runs one job at a time by default (concurrency 1), so a job
fits when its need is at most what the process has, whatever else it holds (held jobs run one
after another, each with all of it). A process started to run several jobs at once
(concurrency > 1) shares what it has: the needs of the jobs it holds add up, and a job fits
only in what is left. (The worker's existing ``--slots`` counts jobs *held*, running plus
prefetched; concurrency is a different number, named so here to keep the two apart.)

GPUs: ``--gpus 0,1`` is trusted as given; ``--gpus auto`` takes CUDA_VISIBLE_DEVICES when it
is set (a batch system's allocation, e.g. SLURM's; never widen it), else ``nvidia-smi -L``
(GPU UUIDs, which CUDA accepts in CUDA_VISIBLE_DEVICES and which do not depend on
CUDA_DEVICE_ORDER), else fails with NoGpus. gpu_processes() makes one process spec per GPU.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cw.errors import NoGpus, ResourceError

log = logging.getLogger(__name__)

Resources = dict[str, float]
UNITS = {"gpu": "GPUs", "mem": "GB", "cpu": "cores"}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
EPSILON = 1e-9  # float sums (mem=0.1 three times) may miss an exact fit by this much


def parse_resources(text: str) -> Resources:
    """``"gpu=1,mem=64"`` -> ``{"gpu": 1.0, "mem": 64.0}``; an empty string -> ``{}``."""
    out: Resources = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq:
            raise ResourceError(f"--resources wants name=number items, not {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ResourceError(f"--resources {name}={value!r}: not a number") from None
        _check(name, number, "--resources")
        if name in out:
            raise ResourceError(f"--resources names {name!r} twice")
        out[name] = number
    return out


def check_need(value: object) -> Resources | None:
    """A job's ``resources`` option, checked: a map of names to numbers >= 0 (zeros dropped);
    None or an empty map -> None (the job fits any worker)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ResourceError("the resources option must map names to numbers")
    need: Resources = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ResourceError(f"resource {name!r} needs a number, not {number!r}")
        _check(name, float(number), "resources")
        if number:
            need[name] = float(number)
    return need or None


def _check(name: object, number: float, what: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ResourceError(f"{what}: bad resource name {name!r} (letters, digits, _ . -)")
    if not math.isfinite(number) or number < 0:
        raise ResourceError(f"{what}: {name}={number!r} must be a finite number >= 0")


def need_key(need: Mapping[str, float] | None) -> tuple[tuple[str, float], ...] | None:
    """A hashable key for a need (equal needs share one key); None for no need."""
    return tuple(sorted(need.items())) if need else None


def fits(need: Mapping[str, float] | None, free: Mapping[str, float]) -> bool:
    """Every resource the job needs is there, in at least that amount."""
    if not need:
        return True
    return all(free.get(name, 0.0) + EPSILON >= amount for name, amount in need.items())


def take(free: Resources, need: Mapping[str, float] | None) -> None:
    """Subtract a job's need from ``free`` (in place); check ``fits`` first."""
    for name, amount in (need or {}).items():
        free[name] = free.get(name, 0.0) - amount


def give(free: Resources, need: Mapping[str, float] | None) -> None:
    """Give a job's need back to ``free`` (in place): the inverse of ``take``."""
    for name, amount in (need or {}).items():
        free[name] = free.get(name, 0.0) + amount


def describe(res: Mapping[str, float] | None) -> str:
    """``{"gpu": 1, "mem": 64}`` -> ``"gpu=1,mem=64"`` (for status, logs and errors)."""
    return ",".join(f"{k}={v:g}" for k, v in sorted((res or {}).items()))


@dataclass
class Capacity:
    """What one worker process has, and what the jobs it holds take of it.

    ``concurrency`` 1 (the default): jobs run one at a time, each with all of ``total``, so
    ``fits`` compares a need with ``total``; ``used`` is still counted, for status. With
    concurrency > 1 the held jobs' needs add up: a job fits in ``total - used``.
    """

    total: Resources = field(default_factory=dict)
    concurrency: int = 1
    used: Resources = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ResourceError(f"concurrency must be >= 1, not {self.concurrency}")

    def free(self) -> Resources:
        """What a further job may need."""
        if self.concurrency == 1:
            return dict(self.total)
        return {name: self.total.get(name, 0.0) - self.used.get(name, 0.0)
                for name in self.total}

    def fits(self, need: Mapping[str, float] | None) -> bool:
        """The job may be given to this process now."""
        if not need:
            return True
        if self.concurrency == 1:
            return fits(need, self.total)
        total, used = self.total, self.used
        return all(total.get(name, 0.0) - used.get(name, 0.0) + EPSILON >= amount
                   for name, amount in need.items())

    def take(self, need: Mapping[str, float] | None) -> None:
        """A job with this need was handed to the process."""
        take_used(self.used, need)

    def give(self, need: Mapping[str, float] | None) -> None:
        """A job with this need left the process (done, cancelled, stolen, re-queued)."""
        for name, amount in (need or {}).items():
            left = self.used.get(name, 0.0) - amount
            if left > EPSILON:
                self.used[name] = left
            else:
                self.used.pop(name, None)


def take_used(used: Resources, need: Mapping[str, float] | None) -> None:
    """Add a need to a running total of what is in use."""
    for name, amount in (need or {}).items():
        used[name] = used.get(name, 0.0) + amount


# ---------------------------------------------------------------- GPUs
def parse_gpus(spec: str, environ: Mapping[str, str] | None = None,
               smi: Callable[[], str | None] | None = None) -> list[str]:
    """The GPUs ``--gpus`` names: ``"0,1"`` as given, ``"auto"`` found (see the module
    docstring). ``environ`` and ``smi`` (returns ``nvidia-smi -L``'s output, None if there is
    no nvidia-smi) default to the real ones; tests pass their own."""
    spec = spec.strip()
    if spec != "auto":
        gpus = [g.strip() for g in spec.split(",") if g.strip()]
        if not gpus:
            raise ResourceError("--gpus wants a list like 0,1 (or auto)")
        if len(set(gpus)) != len(gpus):
            raise ResourceError(f"--gpus {spec}: a GPU is named twice")
        return gpus
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
        # CUDA stops at the first invalid entry; "-1" or "NoDevFiles" hide every GPU
        if gpus and gpus[0] not in ("-1", "NoDevFiles"):
            return gpus
        raise NoGpus(f"--gpus auto: CUDA_VISIBLE_DEVICES={visible!r} makes no GPU visible")
    listing = (smi or _nvidia_smi)()
    if listing is None:
        raise NoGpus("--gpus auto: no nvidia-smi on PATH and CUDA_VISIBLE_DEVICES is unset; "
                     "name the GPUs (--gpus 0,1) or start the worker without --gpus")
    gpus = gpus_listed(listing)
    if not gpus:
        raise NoGpus("--gpus auto: nvidia-smi -L lists no GPU")
    return gpus


def gpus_listed(listing: str) -> list[str]:
    """The GPUs in ``nvidia-smi -L`` output: each one's UUID (its index if it has none)."""
    gpus = []
    for line in listing.splitlines():
        match = re.match(r"GPU (\d+):.*?(?:\(UUID: (GPU-[0-9A-Fa-f-]+)\))?\s*\Z", line.strip())
        if match:
            gpus.append(match.group(2) or match.group(1))
    return gpus


def _nvidia_smi() -> str | None:
    path = shutil.which("nvidia-smi")
    if path is None:
        return None
    try:
        done = subprocess.run([path, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi -L failed: %s", e)
        return None
    if done.returncode:
        log.warning("nvidia-smi -L exited %d: %s", done.returncode, done.stderr.strip())
        return None
    return done.stdout


@dataclass(frozen=True)
class ProcessSpec:
    """One worker process to start: its environment additions and what it offers."""

    env: dict[str, str]
    resources: Resources


def gpu_processes(gpus: list[str], resources: Resources | None = None) -> list[ProcessSpec]:
    """One process per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES) with gpu=1 plus
    the other ``--resources``; no GPUs -> one process with ``resources`` as they are."""
    resources = dict(resources or {})
    if not gpus:
        return [ProcessSpec({}, resources)]
    if "gpu" in resources:
        raise ResourceError("give either --gpus or --resources gpu=..., not both "
                            "(--gpus sets gpu=1 for each process)")
    return [ProcessSpec({"CUDA_VISIBLE_DEVICES": gpu}, {**resources, "gpu": 1.0})
            for gpu in gpus]
