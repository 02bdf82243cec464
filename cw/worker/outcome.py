"""What a worker process reports of itself and of a failed job: its memory, an error's
frames (the pickled exception, its traceback text, and its type and message for a client
that cannot unpickle it)."""
from __future__ import annotations

import os
import traceback

import cloudpickle
import msgpack


def rss_mb() -> float:
    """This process's resident memory in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def error_frames(exc: BaseException) -> list:
    """``[pickled exception or b"", traceback text, msgpack [type name, message]]``."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc, protocol=5)
    except Exception:
        blob = b""
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return [blob, text.encode("utf-8", "replace"), msgpack.packb([kind, str(exc)])]
