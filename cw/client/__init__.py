"""The client: your program's side of cw. The public face is here.

    ClusterExecutor (concurrent.futures.Executor)      ClientThread (callbacks)
      submit -> CwFuture ----------.                  .--- submit(jobid, func, *a, **kw)
                                    v                v
                              Session: pickle, batch, send; decode results (I/O thread)
      future.set_running / set_result / exception     callback(jobid, result); failures kept
                                                      for wait() to re-raise

    executor.py    ClusterExecutor, its futures, map, options
    callbacks.py   ClientThread
    session.py     what both share: pickling, batching, the byte window, cancels, resubmits
    lane.py        LaneClient: lone jobs straight to a worker on this machine
    functions.py   the pickled-function cache; outcomes.py: results and remote tracebacks
    progress.py    tqdm bars; joblib.py: the joblib backend

``host=None`` finds the master through ``cw.conn.address.resolve``: ``$CW_MASTER``, then the
connection file, then a launcher's finder (SLURM), then localhost.
"""
from cw.client.callbacks import ClientThread
from cw.client.executor import ClusterExecutor, CwFuture, ExecutorOptions, job_options

__all__ = ["ClientThread", "ClusterExecutor", "CwFuture", "ExecutorOptions", "job_options"]
