"""The command you start: ``python -m cw.worker -n N`` spawns N worker processes and keeps
N running until told to stop.

    supervisor <--- socketpair (--supervisor-fd), one per worker process ---> worker process
        "stop" ---> before it signals a stop (so a SIGTERM the job sent itself is a crash)
               <--- "refused" (the master refused us: not restarted), "recycle" (restart me)
        any exit without a note is a crash, whatever its exit code: restarted with back-off,
        and told to the master (DIED, on the supervisor's own connection, role "supervisor"),
        which charges the running job at once and names how it ended in WorkerLost
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from cw import protocol as P
from cw.conn import address
from cw.conn.peer import Connection, peer_info
from cw.errors import NoKeys
from cw.resources import ProcessSpec, describe

log = logging.getLogger(__name__)

# notes between a worker process and its supervisor (never exit codes: those are the job's)
NOTE_REFUSED = b"refused"  # the master refused us: the supervisor does not restart us
NOTE_RECYCLE = b"recycle"  # a planned restart (--max-jobs, --max-memory, a stuck timed-out job)
NOTE_DRAINED = b"drained"  # it drained (allocation end, SLURM's signal): not restarted
NOTE_STOP = b"stop"        # supervisor -> worker: the SIGTERM/SIGINT that follows is a stop
STOP_GRACE = 2.0           # seconds a signalled worker waits for the supervisor's "stop"


class SupervisorLink:
    """A worker process's end of the socketpair to its supervisor (``--supervisor-fd``)."""

    def __init__(self, fd: int):
        os.set_inheritable(fd, False)  # not for the job's own subprocesses
        self.sock = socket.socket(fileno=fd)
        self.parent = os.getppid()

    def tell(self, note: bytes) -> None:
        """Say why we exit (before exiting); any exit without a note is a crash."""
        try:
            self.sock.sendall(note)
        except OSError as exc:
            log.warning("cannot tell the supervisor %r: %s", note, exc)

    def stop_asked(self, timeout: float) -> bool:
        """Did the supervisor ask us to stop (or is it gone)? Waits up to ``timeout`` s for
        its note, which it sends just before the signal (a SIGTERM to the whole process
        group, from SLURM or Ctrl-C, may reach us before the supervisor has written it)."""
        deadline = time.monotonic() + timeout
        while os.getppid() == self.parent:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return False
            try:
                note = self.sock.recv(64)
            except OSError:
                return True
            if not note or NOTE_STOP in note:
                return True  # EOF: our supervisor is gone
        return True


class Supervisor:
    """Starts N worker processes and keeps N running until told to stop.

    Each worker process gets one end of a socketpair: it notes there why it exits (refused,
    recycle); an exit without a note is a crash. A crash is told to the master at once
    (DIED, on our own connection), so the job it ran is charged without waiting for the
    heartbeat timeout, and its slot is restarted (with a back-off if it keeps dying).
    """

    def __init__(self, argv: list[str], n: int, host: str | None = None,
                 port: int | None = None, insecure: bool = False,
                 drain_signal: signal.Signals | None = None,
                 specs: list[ProcessSpec] | None = None):
        self.argv = argv
        self.drain_signal = drain_signal  # forwarded: the workers drain, none restarts
        # the signal that stops a worker: SIGTERM, unless that one means "drain"
        self.stop_signal = signal.SIGINT if drain_signal == signal.SIGTERM else signal.SIGTERM
        # what each process slot offers and its environment (--gpus: one per GPU, each
        # with its CUDA_VISIBLE_DEVICES); a restarted process keeps its slot's
        self.specs = specs or [ProcessSpec({}, {})] * n
        self.n = len(self.specs)
        self.slot_of: dict[int, int] = {}
        self.children: dict[int, subprocess.Popen] = {}
        self.born: dict[int, float] = {}
        self.links: dict[int, socket.socket] = {}
        self.stopping = False
        self.quick_deaths = 0
        host, port = address.resolve(host, port)
        self.conn = Connection(host, port, "supervisor", peer_info(), self._on_message,
                               logger=log, insecure=insecure)
        self.reporting = False  # our connection is open (once the master's keys are here)

    def spawn(self, slot: int = 0) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        spec = self.specs[slot]
        extra = ["--resources", describe(spec.resources)] if spec.resources else []
        try:
            proc = subprocess.Popen([sys.executable, "-m", "cw.worker", "--child",
                                     "--supervisor-fd", str(fd), *self.argv, *extra],
                                    pass_fds=[fd], env={**os.environ, **spec.env})
        finally:
            theirs.close()
        self.slot_of[proc.pid] = slot
        self.children[proc.pid] = proc
        self.born[proc.pid] = time.monotonic()
        self.links[proc.pid] = ours

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        if self.drain_signal is not None:
            signal.signal(self.drain_signal, self._drain)
        for slot in range(self.n):
            self.spawn(slot)
        self._report_deaths()
        log.info("supervisor %d started %d workers: %s", os.getpid(), self.n,
                 " ".join(map(str, self.children)))
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            self._reap(pid, status)
        if self.reporting:
            self.conn.close()
        return 0

    def _report_deaths(self) -> bool:
        """Open our connection to the master if its keys are here (it registers in the
        background; a DIED waits behind its HELLO). Until then deaths wait for heartbeats."""
        if not self.reporting:
            try:
                self.conn.open(keys_timeout=0)
                self.reporting = True
            except NoKeys:
                log.info("no keys of the master yet: deaths are reported once they appear")
        return self.reporting

    def _on_message(self, kind: int, header: list, frames: list) -> None:
        log.warning("dropped a message of unexpected kind %s from the master", kind)

    def _note(self, pid: int) -> bytes:
        """What a worker process noted before it exited (b"": nothing, a crash)."""
        link = self.links.pop(pid)
        link.setblocking(False)
        note = b""
        try:
            while chunk := link.recv(256):
                note += chunk
        except OSError:  # nothing more (BlockingIOError), or a reset
            pass
        link.close()
        return note

    def _reap(self, pid: int, status: int) -> None:
        proc = self.children.pop(pid, None)
        if proc is None:
            return
        slot = self.slot_of.pop(pid, 0)
        lived = time.monotonic() - self.born.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        note = self._note(pid)
        if self.stopping:
            return
        if NOTE_REFUSED in note:
            log.error("worker %d cannot work here (the master refused it or never "
                      "answered); not restarting it", pid)
            return
        if NOTE_DRAINED in note:
            log.info("worker %d drained and left; not restarting it", pid)
            return
        if NOTE_RECYCLE in note:
            log.info("worker %d recycled; starting a fresh one", pid)
            return self.spawn(slot)
        # a crash, whatever the exit code: the master charges the job it ran at once
        if self._report_deaths():
            self.conn.call(self.conn.send, [P.pack(P.DIED, pid, proc.returncode, lived)])
        self.quick_deaths = self.quick_deaths + 1 if lived < 1.0 else 0
        delay = min(30.0, 0.1 * 2 ** self.quick_deaths) if self.quick_deaths > 2 else 0.0
        log.warning("worker %d died (%s) after %.1f s; starting a new one%s", pid,
                    P.describe_exit(proc.returncode), lived,
                    f" in {delay:.1f} s (it keeps dying at start)" if delay else "")
        if delay:
            time.sleep(delay)  # back off, but never give the slot up
        if not self.stopping:
            self.spawn(slot)

    def _stop(self, signum, frame) -> None:
        if not self.stopping:
            log.info("supervisor got %s; stopping %d workers", signal.Signals(signum).name,
                     len(self.children))
        self.stopping = True
        for pid, proc in self.children.items():
            try:  # first the note: a signal without it is one the job sent itself
                self.links[pid].send(NOTE_STOP)
            except OSError:
                pass
            try:
                proc.send_signal(self.stop_signal)
            except ProcessLookupError:
                pass
        timer = threading.Timer(10.0, self._kill_stragglers)
        timer.daemon = True  # must not keep the supervisor alive once its children are gone
        timer.start()

    def _drain(self, signum, frame) -> None:
        """The drain signal (SLURM preempts or ends the job): pass it on, restart none."""
        log.info("supervisor got %s; its %d workers drain", signal.Signals(signum).name,
                 len(self.children))
        self.stopping = True
        for proc in self.children.values():
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def _kill_stragglers(self) -> None:
        for proc in list(self.children.values()):
            if proc.poll() is None:
                log.warning("worker %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
