"""A job's outcome as the client gets it: a value, or the remote exception with its remote
traceback chained as the cause (as concurrent.futures.process does).

    RESULTS [seq, status, n] + n frames --decode_outcome--> (None, value)      status OK
                                                         (exception, None)  ERROR, FAILED
"""
from __future__ import annotations

import pickle
from typing import Any

import msgpack

from cw import protocol as P
from cw import serialize
from cw.errors import RemoteException, RemoteTraceback, SerializationError


def decode_outcome(status: int, payload: list, seq: int) -> tuple[BaseException | None, Any]:
    """Turn a RESULTS entry into ``(error, value)``; never raises."""
    try:
        if status == P.OK:
            return None, serialize.loads(payload, f"the result of job {seq}")
        if status == P.ERROR:
            return rebuild_error(payload), None
        return serialize.loads(payload, "the master's error"), None
    except SerializationError as exc:
        return exc, None
    except Exception as exc:  # a malformed payload
        return SerializationError(f"cannot decode the outcome of job {seq}: {exc}"), None


def rebuild_error(payload: list) -> BaseException:
    """The remote exception, with its remote traceback chained as the cause.

    The original type is re-created where it unpickles here; otherwise a RemoteException
    carries its type name, message and traceback.
    """
    blob, tb, meta = (bytes(getattr(f, "bytes", f)) for f in payload)
    type_name, message = msgpack.unpackb(meta, raw=False)
    text = tb.decode("utf-8", "replace")
    exc: Any = None
    if blob:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteException(type_name, message, text)
    exc.__cause__ = RemoteTraceback(text)
    try:
        exc.remote_traceback = text  # type: ignore[attr-defined]  # any type: set at run time
    except AttributeError:  # an exception type with __slots__
        pass
    return exc


