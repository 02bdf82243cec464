"""A rig of hosts on one machine, out of Linux network namespaces (root only).

    namespace cwh-<id>-br: bridge br0 (no address, no route out)
        |  veth h1       |  veth h2       ...
    cwh-<id>-1         cwh-<id>-2         ...   each: eth0 10.77.<n>.<i>/24 + loopback, no
    hostname h1        hostname h2              default route; processes run in a UTS and
    XDG_RUNTIME_DIR    XDG_RUNTIME_DIR          mount namespace of their own (hostname, a
      <base>/h1          <base>/h2              private /etc/hosts naming every host)

Every host shares the caller's ``CW_HOME`` (as cluster nodes share a home directory) and
``/tmp``, but has its own runtime directory, so the master's local socket and the lanes
are private to the host they live on. ``Host.cut()`` takes the host's veth off the
bridge: packets vanish both ways, nobody sees a reset, the host's own link stays up (as
behind a failed switch); ``Host.restore()`` puts it back.

No pytest here: ``bench`` uses the rig too. ``Rig.close()`` kills every process started
on the rig (by process group, then whatever pid is still inside a namespace) and deletes
every namespace and the base folder.
"""
from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77"  # a private range that exists only on the rig's bridge

# a hostname and mounts of its own (private: the /etc/hosts bind never reaches the machine)
UNSHARE = ["unshare", "--uts", "--mount", "--propagation", "private"]
# runs the command in argv[1:] as host $1: own hostname, own /etc/hosts, then exec
LAUNCH = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'


def unavailable() -> str | None:
    """Why the rig cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the hosts rig needs root (network namespaces)"
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"the hosts rig needs {tool!r} (iproute2 / util-linux)"
    probe = f"cwh-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:  # a process there with a hostname and /etc/hosts of its own, as Host.start does
        ran = subprocess.run(["ip", "netns", "exec", probe, *UNSHARE, "sh", "-c", LAUNCH,
                              "sh", "probe", "/etc/hosts", "true"],
                             capture_output=True, text=True, timeout=30)
    finally:
        _ip("netns", "del", probe, check=False)
    if ran.returncode != 0:
        return f"cannot start a process on a host of the rig: {ran.stderr.strip()}"
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def sweep() -> None:
    """Delete what rigs of processes that died without ``close()`` (SIGKILL) left: their
    namespaces, with every process still inside, and their folders."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    folders = list(Path(tempfile.gettempdir()).glob("cwh-*"))
    for name in names + [p.name for p in folders]:
        match = re.match(r"cwh-(\d+)\.", name)
        if not match or _alive(int(match.group(1))):
            continue
        if name in names:
            _kill(subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                 text=True, timeout=30).stdout)
            _ip("netns", "del", name, check=False)
        else:
            shutil.rmtree(Path(tempfile.gettempdir()) / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kill(pids: str) -> None:
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass



def read_line(popen: subprocess.Popen, timeout: float) -> str | None:
    """The next line ``popen`` prints ("" at its end), or None if none comes in ``timeout``."""
    sel = selectors.DefaultSelector()
    sel.register(popen.stdout, selectors.EVENT_READ)
    return popen.stdout.readline().decode() if sel.select(timeout) else None


def stop_group(popen: subprocess.Popen, timeout: float = 10.0,
               ignored: Callable[[], None] | None = None) -> None:
    """SIGTERM ``popen``'s process group (it leads one), SIGKILL it after ``timeout``
    (``ignored()`` is told), then SIGKILL what is left of the group (children of a killed
    supervisor)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            break
        try:
            popen.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            if ignored is not None and sig == signal.SIGTERM:
                ignored()
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

class HostProc:
    """A process on a host, in its own process group; its stderr goes to a log file."""

    def __init__(self, host: Host, argv: list[str], env: dict, stdout, name: str,
                 command: list[str], cwd: str | None = None):
        self.host = host
        self.argv = argv
        self.command = command  # what runs on the host (argv wraps it)
        self.log = host.rig.base / "logs" / f"{host.name}-{name}-{time.monotonic_ns()}.log"
        self.log_file = open(self.log, "wb")
        self.popen = subprocess.Popen(argv, stdout=stdout, stderr=self.log_file, env=env,
                                      stdin=subprocess.PIPE, start_new_session=True, cwd=cwd)
        self.pid = self.popen.pid

    def readline(self, timeout: float = 20.0) -> str:
        """The next line of stdout; AssertionError if none comes within ``timeout``."""
        line = read_line(self.popen, timeout)
        if line is None:
            raise AssertionError(f"{self.command[-3:]} on {self.host.name} printed nothing "
                                 f"within {timeout} s:\n{self.stderr()}")
        if not line:
            raise AssertionError(f"{self.command[-3:]} on {self.host.name} exited "
                                 f"({self.popen.wait()}):\n{self.stderr()}")
        return line

    def json(self, timeout: float = 20.0):
        """The next stdout line, as JSON."""
        return json.loads(self.readline(timeout))

    def write(self, line: str) -> None:
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def stderr(self) -> str:
        self.log_file.flush()
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``timeout``; return the exit code."""
        stop_group(self.popen, timeout, lambda: print(
            f"{self.command[-3:]} on {self.host.name} ignored SIGTERM for {timeout:g} s; "
            f"killing it", file=sys.stderr))  # shown with a failing test's output
        self.popen.wait(timeout)
        self.log_file.close()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                pipe.close()
        return self.popen.poll()


class Host:
    """One namespace of the rig: a name, an address, a runtime directory."""

    def __init__(self, rig: Rig, index: int):
        self.rig = rig
        self.index = index
        self.name = f"h{index}"
        self.ns = f"{rig.prefix}-{index}"
        self.ip = f"{SUBNET}.{rig.net}.{index}"
        self.run_dir = rig.base / self.name

    def setup(self) -> None:
        rig = self.rig
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.name, "type", "veth", "peer", "name", "eth0",
            "netns", self.ns, ns=rig.bridge_ns)
        _ip("link", "set", self.name, "master", "br0", "up", ns=rig.bridge_ns)
        _ip("addr", "add", f"{self.ip}/24", "dev", "eth0", ns=self.ns)
        _ip("link", "set", "eth0", "up", ns=self.ns)
        _ip("link", "set", "lo", "up", ns=self.ns)
        self.run_dir.mkdir(mode=0o700)

    def start(self, argv: list[str], env: dict | None = None, stdout=subprocess.PIPE,
              name: str = "proc", cwd: str | None = None) -> HostProc:
        """Run ``argv`` on this host (its namespaces, its hostname, its runtime dir)."""
        full = ["ip", "netns", "exec", self.ns, *UNSHARE, "sh", "-c", LAUNCH, "sh", self.name,
                str(self.rig.hosts_file), *argv]
        environ = {**os.environ, "XDG_RUNTIME_DIR": str(self.run_dir),
                   "PYTHONPATH": os.pathsep.join(
                       [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                   **(env or {})}
        proc = HostProc(self, full, environ, stdout, name, argv, cwd)
        self.rig.procs.append(proc)
        return proc

    def python(self, *args: str, **kw) -> HostProc:
        return self.start([sys.executable, *args], **kw)

    def cut(self) -> None:
        """Take the host off the bridge: its packets vanish both ways (no RST)."""
        _ip("link", "set", self.name, "nomaster", ns=self.rig.bridge_ns)

    def restore(self) -> None:
        _ip("link", "set", self.name, "master", "br0", ns=self.rig.bridge_ns)

    def pids(self) -> str:
        """Every process inside this host's network namespace (``ip netns pids``)."""
        return subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True,
                              text=True, timeout=30).stdout


class Rig:
    """``n`` hosts on one private bridge. Use as a context manager, or call ``close()``."""

    made = 0  # rigs made by this process

    def __init__(self, n: int = 4):
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        sweep()
        Rig.made += 1
        self.prefix = f"cwh-{os.getpid()}.{Rig.made}"  # the pid lets sweep() find leftovers
        self.net = (os.getpid() + Rig.made) % 250 + 1
        self.bridge_ns = f"{self.prefix}-br"
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))  # short: socket paths
        (self.base / "logs").mkdir()
        self.procs: list[HostProc] = []
        self.hosts = [Host(self, i + 1) for i in range(n)]
        self.hosts_file = self.base / "hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{h.ip} {h.name}\n" for h in self.hosts))
        try:
            _ip("netns", "add", self.bridge_ns)
            _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
            _ip("link", "set", "br0", "up", ns=self.bridge_ns)
            for host in self.hosts:
                host.setup()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, index: int) -> Host:
        """Hosts by number: ``rig[1]`` is h1."""
        return self.hosts[index - 1]

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logs(self) -> str:
        """Every log of the rig's processes, for a failing test's report."""
        return "\n".join(f"--- {p.host.name} {' '.join(p.command)[:200]}\n{p.stderr()[-4000:]}"
                         for p in self.procs)

    def close(self) -> None:
        """Stop every process, delete every namespace and the base folder."""
        for proc in reversed(self.procs):
            proc.stop()
        for host in self.hosts:
            _kill(host.pids())  # anything that left its process group
        for ns in [h.ns for h in self.hosts] + [self.bridge_ns]:
            _ip("netns", "del", ns, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


class Cluster:
    """A cw master, workers and a status probe on a rig (the master on ``rig[master]``)."""

    def __init__(self, rig: Rig, master: int = 1, extra: tuple = (),
                 heartbeat: tuple = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "2")):
        self.rig = rig
        self.host = rig[master]
        self.heartbeat = heartbeat
        self.extra = extra
        self.port = 0
        self.master = self.start_master()
        self.probe = self.host.python("-c", PROBE, self.host.ip, str(self.port), name="probe")

    def start_master(self) -> HostProc:
        """Start (or restart, on the same port) the master; wait until it listens."""
        proc = self.host.python("-m", "cw.master", "--host", self.host.ip, "--port",
                                str(self.port), *self.heartbeat, *self.extra, name="master")
        line = proc.readline()
        assert "listening on tcp://" in line, line
        self.port = int(line.rsplit(":", 1)[1])
        return proc

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{self.port}"

    def workers(self, host: int, n: int = 1, *extra: str) -> HostProc:
        return self.rig[host].python("-m", "cw.worker", self.host.ip, "--port", str(self.port),
                                     "-n", str(n), *extra, stdout=subprocess.DEVNULL,
                                     name="workers")

    def status(self, timeout: float = 20.0) -> dict:
        """The master's status, asked from its host (answers while other links are cut)."""
        self.probe.write("status")
        reply = self.probe.json(timeout)
        if "error" in reply:
            raise AssertionError(f"status failed: {reply['error']}")
        return reply


# reads a line per request on stdin, prints the master's status as a JSON line
PROBE = """
import json, sys
from cw.status import status
host, port = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    try:
        print(json.dumps(status(host, port, 5.0)), flush=True)
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}), flush=True)
"""
