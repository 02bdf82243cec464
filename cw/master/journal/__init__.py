"""The master's journal: named batches that outlive their client and the master.

    store.py     Journal: appends buffered, a writer thread writes and fsyncs them in groups
                 and reports the durable sequence number; reads by position (os.pread)
    format.py    segment files of framed, checksummed records; the single-writer lock
    index.py     what stays in RAM: per batch, arrays of keys and positions, a state byte
    compact.py   forget() gives space back: live records copied, crash-safe at each step

Plain files, pwrite and fsync only (no mmap, no SQLite WAL): safe on NFS and Lustre with
one writer, where a SLURM master's state lives.
"""
from cw.master.journal.store import CANCELLED, DONE, FAILED, QUEUED, Journal

__all__ = ["CANCELLED", "DONE", "FAILED", "QUEUED", "Journal"]
