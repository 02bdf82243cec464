"""One adapter per benchmarked system, all behind the same small interface.

An adapter starts its system fresh on loopback with ``workers`` worker
processes, submits jobs, waits for them with a bound, runs the system's
natural ``map``, and tears everything down in :meth:`System.stop` (which is
safe to call after a failed or partial start).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import re
import shlex
import sys
import threading
import time
from abc import ABC, abstractmethod
from typing import Any
from collections.abc import Callable, Iterable

from bench import procs

HOST = "127.0.0.1"
CW_WORKER_ARGS = "BENCH_CW_WORKER_ARGS"  # extra ``cw.worker`` flags, e.g. "--slots 1"


def bounded(fn: Callable[[], Any], timeout: float) -> bool:
    """Run ``fn`` in a daemon thread; give up waiting after ``timeout`` s.

    Used for shutdown calls that have no timeout of their own.  Returns True
    if ``fn`` finished (errors inside ``fn`` are swallowed: this is teardown).
    """
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except Exception as exc:  # teardown: report, never raise
            print(f"bench: teardown step failed: {exc!r}", file=sys.stderr)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    return done.wait(timeout)


def module_version(name: str) -> str:
    """``__version__`` of an importable module, or 'missing'."""
    try:
        module = __import__(name)
    except Exception:
        return "missing"
    return str(getattr(module, "__version__", getattr(module, "version", "unknown")))


class System(ABC):
    """Common interface; ``start`` raises ImportError when the system is absent."""

    name = "?"
    modules: tuple[str, ...] = ()

    def versions(self) -> dict[str, str]:
        return {m: module_version(m) for m in self.modules}

    @abstractmethod
    def start(self, workers: int, workdir: str, timeout: float) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def submit(self, fn: Callable, *args: Any) -> Any: ...

    @abstractmethod
    def result(self, future: Any, timeout: float) -> Any: ...

    @abstractmethod
    def gather(self, futures: list, timeout: float) -> list: ...

    @abstractmethod
    def map(self, fn: Callable, items: Iterable, timeout: float) -> list: ...


class ExecutorSystem(System):
    """Any ``concurrent.futures.Executor``."""

    executor: cf.Executor | None = None

    def submit(self, fn, *args):
        return self.executor.submit(fn, *args)

    def result(self, future, timeout):
        return future.result(timeout=timeout)

    def gather(self, futures, timeout):
        _, pending = cf.wait(futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(futures)} jobs "
                               f"unfinished after {timeout:g} s")
        return [f.result() for f in futures]

    def map(self, fn, items, timeout):
        return list(self.executor.map(fn, items, timeout=timeout))

    def stop(self):
        if self.executor is not None:
            executor, self.executor = self.executor, None
            bounded(lambda: executor.shutdown(wait=True, cancel_futures=True), 15)


class ProcessPoolSystem(ExecutorSystem):
    """``concurrent.futures.ProcessPoolExecutor`` (default start method, chunksize 1)."""

    name = "processpool"

    def versions(self):
        import multiprocessing
        return {"start_method": multiprocessing.get_start_method()}

    def start(self, workers, workdir, timeout):
        self.executor = cf.ProcessPoolExecutor(max_workers=workers)


class LokySystem(ExecutorSystem):
    """``loky.ProcessPoolExecutor`` (a fresh one, not the reusable executor)."""

    name = "loky"
    modules = ("loky",)

    def start(self, workers, workdir, timeout):
        import loky
        self.executor = loky.ProcessPoolExecutor(max_workers=workers)


class CwSystem(ExecutorSystem):
    """cw master + one ``cw.worker -n N`` process, used via ``ClusterExecutor``."""

    name = "cw"
    modules = ("cw", "zmq", "msgpack", "tornado", "cloudpickle")
    master = None
    worker = None

    def versions(self):
        from pathlib import Path
        from bench.report import source_state
        try:
            import cw
            source = source_state(Path(cw.__file__).parent)
        except ImportError:
            source = "missing"
        return {**super().versions(), "source": source,
                "worker_args": os.environ.get(CW_WORKER_ARGS, "")}

    def start(self, workers, workdir, timeout):
        # a private CW_HOME: connection files and keys stay in the temp dir
        os.environ["CW_HOME"] = os.path.join(workdir, "cw-home")
        from cw.client import ClusterExecutor
        from cw.status import status
        deadline = time.monotonic() + timeout
        self.master = procs.spawn([sys.executable, "-m", "cw.master",
                                   "--port", "0", "--host", HOST])
        reader = procs.LineReader(self.master.stdout)
        line = reader.wait_for("cw master listening on", timeout)
        port = int(re.search(r"tcp://[^:\s]+:(\d+)", line).group(1))
        self.worker_log = os.path.join(workdir, "cw-worker.log")
        self.worker = procs.spawn(
            [sys.executable, "-m", "cw.worker", HOST, "--port", str(port),
             "-n", str(workers), *shlex.split(os.environ.get(CW_WORKER_ARGS, ""))],
            log_path=self.worker_log)
        self._wait_workers(status, port, workers, deadline, reader)
        self.executor = ClusterExecutor(HOST, port)

    def _wait_workers(self, status, port, workers, deadline, reader) -> None:
        seen: Any = None
        while time.monotonic() < deadline:
            for proc in (self.master, self.worker):
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[2]} exited with {proc.returncode}; "
                                       f"master said: {list(reader.tail)[-3:]}; "
                                       f"worker said: {self._worker_log_tail()}")
            try:
                seen = status(HOST, port, timeout=5)["workers"]
            except Exception as exc:  # master not answering yet
                seen = repr(exc)
            if isinstance(seen, list) and len(seen) >= workers:
                return
            time.sleep(0.05)
        raise TimeoutError(f"cw: {workers} workers not registered in time; last status: {seen!r}")

    def _worker_log_tail(self, lines: int = 3) -> list[str]:
        try:
            with open(self.worker_log, errors="replace") as fh:
                return fh.read().strip().splitlines()[-lines:]
        except OSError:
            return []

    def stop(self):
        super().stop()
        for attr in ("worker", "master"):
            proc = getattr(self, attr)
            if proc is not None:
                procs.terminate_tree(proc.pid, grace=5)
                setattr(self, attr, None)


class DaskSystem(System):
    """``distributed.LocalCluster`` (processes, 1 thread each) + ``Client``."""

    name = "dask"
    modules = ("dask", "distributed")
    cluster = None
    client = None

    def start(self, workers, workdir, timeout):
        from distributed import Client, LocalCluster
        self.cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host=HOST,
            dashboard_address=None, silence_logs=logging.ERROR,
            local_directory=workdir)
        self.client = Client(self.cluster, timeout=timeout)
        self.client.wait_for_workers(workers, timeout=timeout)

    def stop(self):
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        if client is not None:
            bounded(lambda: client.close(timeout=10), 15)
        if cluster is not None:
            bounded(lambda: cluster.close(timeout=10), 15)

    def submit(self, fn, *args):
        # pure=False: identical calls must run, not be deduplicated by key
        return self.client.submit(fn, *args, pure=False)

    def result(self, future, timeout):
        return future.result(timeout=timeout)

    def gather(self, futures, timeout):
        from distributed import wait
        wait(futures, timeout=timeout)
        return self.client.gather(futures)

    def map(self, fn, items, timeout):
        return self.gather(self.client.map(fn, list(items), pure=False), timeout)


class IpyparallelSystem(System):
    """``ipyparallel.Cluster`` (controller + engines) and a load-balanced view."""

    name = "ipyparallel"
    modules = ("ipyparallel", "zmq")
    cluster = None
    client = None
    view = None

    def start(self, workers, workdir, timeout):
        import ipyparallel as ipp
        self.cluster = ipp.Cluster(
            n=workers, profile_dir=os.path.join(workdir, "ipp-profile"),
            controller_ip=HOST, log_level=logging.WARNING,
            engine_timeout=int(timeout))
        self.client = self.cluster.start_and_connect_sync()
        self.client.wait_for_engines(workers, timeout=timeout)
        self.view = self.client.load_balanced_view()

    def stop(self):
        client, cluster = self.client, self.cluster
        self.client = self.cluster = self.view = None
        if client is not None:
            bounded(client.close, 10)
        if cluster is not None:
            bounded(cluster.stop_cluster_sync, 20)

    def submit(self, fn, *args):
        return self.view.apply_async(fn, *args)

    def result(self, future, timeout):
        return future.get(timeout=timeout)

    def gather(self, futures, timeout):
        if not self.client.wait(futures, timeout=timeout):
            raise TimeoutError(f"ipyparallel: jobs unfinished after {timeout:g} s")
        return [f.get() for f in futures]

    def map(self, fn, items, timeout):
        return list(self.view.map(fn, list(items), block=False).get(timeout=timeout))


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in
    (CwSystem, ProcessPoolSystem, LokySystem, DaskSystem, IpyparallelSystem)
}
