"""cw (cluster-workers): route huge numbers of Python calls to long-lived workers.

    client program                 python -m cw.master            python -m cw.worker -n N
    ClusterExecutor / ClientThread ---jobs--> FIFO router ---jobs--> worker processes
                                   <-results-            <-results-

See README.rst for the guide; ``cw.client`` for the APIs.
"""
__version__ = "0.1.0"

import warnings as _warnings

# ``cw.status(host=None)`` is the status function; the module stays importable as
# ``import cw.status`` and runnable as ``python -m cw.status``. runpy warns that the package
# imported that module before running it as __main__: harmless, it has no import-time effects.
_warnings.filterwarnings("ignore", category=RuntimeWarning,
                         message="'cw.status' found in sys.modules")
from .status import status  # noqa: E402,F401
from .launch import allocate, start, stop  # noqa: E402,F401  (SLURM when present, else local)
from .errors import (CwError, JobTimeout, MasterLost, MasterNotFound,  # noqa: E402,F401
                     MasterUnreachable, ProtocolError, RemoteException, SerializationError,
                     WorkerLost)
from .protocol import DEFAULT_PORT as PORT  # noqa: E402,F401  (5494, as in the original)
from .slurm import slurm_master_host  # noqa: E402,F401  (the original's API: the master's host)
