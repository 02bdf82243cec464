"""cw (cluster-workers): route huge numbers of Python calls to long-lived workers.

    client program                 python -m cw.master            python -m cw.worker -n N
    ClusterExecutor / ClientThread ---jobs--> FIFO router ---jobs--> worker processes
                                   <-results-            <-results-

See README.rst for the guide; ``cw.client`` for the APIs.
"""
__version__ = "0.1.0"

from .status import status  # noqa: F401  (cw.status(host=None) -> dict; the module stays
#                                           importable as `import cw.status` / `python -m cw.status`)
from .launch import allocate, start, stop  # noqa: F401  (SLURM when present, else local)
from .errors import (CwError, JobTimeout, MasterLost, MasterUnreachable, ProtocolError,  # noqa: F401
                     RemoteException, SerializationError, WorkerLost)
