"""cw (cluster-workers): route huge numbers of Python calls to long-lived workers.

    client program                 python -m cw.master            python -m cw.worker -n N
    ClusterExecutor / ClientThread ---jobs--> FIFO router ---jobs--> worker processes
                                   <-results-            <-results-

The package, by role (each role's ``__init__`` draws its part):

    cw.client   ClusterExecutor, ClientThread and what they share (the session, the lane)
    cw.master   the routing daemon: sockets, the scheduler, lane grants, the dashboard
    cw.worker   worker processes and their supervisor
    cw.launch   start/stop/allocate: on this machine, as SLURM jobs, over ssh
    cw.conn     the wire below them all: finding the master, keys, local sockets, a
                peer's connection, the lane's framing
    errors.py, protocol.py, serialize.py, cli.py, status.py: shared by every role

See README.rst for the guide; ``cw.client`` for the APIs.
"""
__version__ = "0.1.0"

import warnings as _warnings

from cw import moved as _moved

_moved.install()  # old module names (cw.mp, cw.address, ...) keep working

# ``cw.status(host=None)`` is the status function; the module stays importable as
# ``import cw.status`` and runnable as ``python -m cw.status``. runpy warns that the package
# imported that module before running it as __main__: harmless, it has no import-time effects.
_warnings.filterwarnings("ignore", category=RuntimeWarning,
                         message="'cw.status' found in sys.modules")
from cw.errors import (  # noqa: E402
                         CwError,
                         JobTimeout,
                         MasterLost,
                         MasterNotFound,
                         MasterUnreachable,
                         ProtocolError,
                         RemoteException,
                         SerializationError,
                         WorkerLost,
)
from cw.launch import allocate, start, stop  # noqa: E402  (SLURM when present, else local)
from cw.launch.slurm import slurm_master_host  # noqa: E402  (the original's API)
from cw.protocol import DEFAULT_PORT as PORT  # noqa: E402  (5494, as in the original)
from cw.status import status  # noqa: E402

__all__ = [
                         "PORT",
                         "CwError",
                         "JobTimeout",
                         "MasterLost",
                         "MasterNotFound",
                         "MasterUnreachable",
                         "ProtocolError",
                         "RemoteException",
                         "SerializationError",
                         "WorkerLost",
                         "allocate",
                         "slurm_master_host",
                         "start",
                         "status",
                         "stop",
]
