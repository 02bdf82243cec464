"""Every exception cw raises, in one flat module.

    CwError
     ├── RemoteException      a job raised on a worker (type not importable here)
     ├── SerializationError   a function, its arguments or its result would not (un)pickle
     │    └── TooLarge        ... or is larger than the master accepts (--max-message-size)
     ├── ProtocolError        a peer spoke a version or a message we do not understand
     ├── MasterUnreachable    no master answered within the bounded wait
     │    └── NoKeys          ... or none could be dialled: no connection file with its keys
     ├── SecurityError        a file with keys others can read, --insecure off loopback, ...
     │    └── NoKeys
     ├── MasterLost           the master went silent for longer than the client tolerates
     ├── WorkerLost           the job's worker died (too many times); names the workers
     ├── QuotaExceeded        the master refused a job: its client holds too much there
     ├── JobTimeout           the job ran past its deadline (also a TimeoutError)
     ├── UnknownBatch         no batch of that name (also a LookupError)
     ├── BatchInUse           another client is submitting to that batch
     ├── JournalError         the master's journal (cw/master/journal/store.py) failed
     │    ├── JournalCorrupt  a bad record where no crash could have left one
     │    ├── JournalFull     an append would pass the journal's max_bytes
     │    └── JournalLocked   another live process writes this journal
     └── ResourceError        bad --resources / --gpus / resources option (also a ValueError)
          └── NoGpus          --gpus auto found no GPU
    RemoteTraceback           the remote traceback, chained as __cause__ of a re-raised error
"""
from __future__ import annotations

from typing import Any


class CwError(Exception):
    """Base class of every error cw raises."""


class RemoteException(CwError):
    """A job raised an exception on a worker that cannot be re-created locally.

    ``type_name`` is the remote exception's qualified type name and
    ``remote_traceback`` the formatted traceback as it was on the worker.
    """

    jobid: Any       # set when ClientThread.wait() raises it: the first failed job's id
    failures: int    # ... and how many jobs failed

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.remote_traceback))

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback
        return text


class SerializationError(CwError):
    """A job's function, arguments or result could not be pickled or unpickled."""


class TooLarge(SerializationError, ValueError):
    """A job's function, arguments or result is larger than the master's --max-message-size."""


class ProtocolError(CwError):
    """A peer sent a message we cannot understand, or refused our protocol version."""


class MasterUnreachable(CwError, ConnectionError):
    """No master answered at the given address within the bounded wait."""


class SecurityError(CwError):
    """cw refused to do something unsafe: read keys others can read, talk plain TCP off
    loopback, ..."""


class NoKeys(SecurityError, MasterUnreachable):
    """No connection file with the keys of the master a peer was pointed at.

    A peer never talks to a master whose keys it does not have (only ``insecure=True``
    allows plain TCP, to a loopback master). ``path`` is the connection file looked for.
    """

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return (type(self), (self.args[0], self.path))


class MasterNotFound(CwError, LookupError):
    """Nothing says where this user's master runs (no connection file, no master job)."""


class MasterLost(CwError, ConnectionError):
    """The master stopped answering and did not come back in time."""


class WorkerLost(CwError):
    """The job's worker process died or went silent while running it.

    ``workers`` lists one human-readable line per lost worker (name and how
    it was lost).
    """

    def __init__(self, message: str, workers: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.workers = list(workers)

    def __reduce__(self):
        return (type(self), (self.args[0], self.workers))


class QuotaExceeded(CwError):
    """The master refused a job because its client already keeps too much there: argument
    bytes beyond twice its byte window, or more functions than the master stores per client.
    ``cw``'s own clients stay within the window; this means a client gone rogue."""


class JobTimeout(CwError, TimeoutError):
    """The job ran longer than the deadline it was submitted with."""


class UnknownBatch(CwError, LookupError):
    """No batch of this name exists (it was never created, or it was forgotten)."""


class BatchInUse(CwError):
    """Another connected client has the named batch open for submitting."""


class JournalError(CwError):
    """The master's journal could not do what was asked (see the subclasses)."""


class JournalCorrupt(JournalError):
    """The journal holds a bad record where no crash could have left one (not its tail)."""


class JournalFull(JournalError):
    """An append would take the journal past its ``max_bytes``; nothing of it was accepted."""


class JournalLocked(JournalError):
    """Another live process holds the journal's single-writer lock."""


class ResourceError(CwError, ValueError):
    """A --resources or --gpus value, or a job's resources option, that cw cannot use."""


class NoGpus(ResourceError):
    """--gpus auto found no GPU (no CUDA_VISIBLE_DEVICES, no nvidia-smi, or none listed)."""


class RemoteTraceback(Exception):
    """Chained as ``__cause__`` of a re-raised remote exception; prints the remote traceback."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class LaunchError(CwError):
    """A launcher could not bring up (or find) the master or the workers it was asked for."""


class SshError(LaunchError):
    """An ssh launch failed: a host refused, a command failed, or a name is unsafe."""


class DashboardError(CwError):
    """The dashboard could not start (its port is taken, or the address is refused)."""
