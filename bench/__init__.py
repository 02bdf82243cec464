"""Per-task benchmark of cw against ProcessPoolExecutor, loky,
dask.distributed and ipyparallel (issue 5).  Run ``python -m bench --help``."""
