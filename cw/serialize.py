"""Pickling of functions, arguments and results.

Functions and data are pickled with cloudpickle (closures and lambdas work) at protocol 5.
Large buffers (bytearray, numpy arrays, ...) are taken out of band and travel as zmq frames
of their own, so a 10 MB array is never copied into a pickle, msgpack or a joined message::

    obj --cloudpickle(protocol 5)--> [pickle, buffer, ...] --zmq frames--> loads(pickle, buffers)

Plain ``bytes`` are always copied into the pickle by the pickler (no hook sees them first), so
a large ``bytes`` argument of a call, or a large ``bytes`` result, is wrapped to travel out of
band as well (``dumps_call``, ``dumps_result``).

Every failure becomes a SerializationError naming what failed, with the original as cause.
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

from cw.errors import SerializationError

OUT_OF_BAND_MIN = 64 * 1024  # smaller buffers stay inside the pickle
# values that pickle exactly as cloudpickle would: plain pickle's C pickler is ~6x faster for
# the small arguments and results of most jobs (cloudpickle builds a Python-level Pickler)
PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})


def dumps(obj: Any, what: str, plain: bool = False) -> list:
    """Pickle ``obj`` into ``[pickle, *large_buffers]``; ``what`` names it in errors.

    ``plain``: the caller checked that ``obj`` holds only PLAIN values (and out-of-band
    wrappers), so the standard pickler does.
    """
    buffers: list = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in band
        buffers.append(raw)
        return False

    try:
        pickler = pickle if plain else cloudpickle
        return [pickler.dumps(obj, protocol=5, buffer_callback=keep), *buffers]
    except Exception as exc:
        raise SerializationError(f"cannot pickle {what}: {type(exc).__name__}: {exc}") from exc


def dumps_call(args: tuple, kwargs: dict, what: str) -> list:
    """Pickle a call's ``(args, kwargs)``; large ``bytes`` arguments go out of band."""
    values = (*args, *kwargs.values()) if kwargs else args
    plain = all(type(v) in PLAIN for v in values)
    if any(map(_big_bytes, values)):
        args, kwargs = tuple(map(_lift, args)), {k: _lift(v) for k, v in kwargs.items()}
    return dumps((args, kwargs), what, plain)


def dumps_result(value: Any, what: str) -> list:
    """Pickle a job's result; a large ``bytes`` result goes out of band."""
    return dumps(_lift(value), what, type(value) in PLAIN)


class _OutOfBandBytes:
    """Pickles a ``bytes`` object as ``bytes(buffer)``, the buffer out of band."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __reduce_ex__(self, protocol):
        return bytes, (pickle.PickleBuffer(self.data),)


def _big_bytes(value: Any) -> bool:
    return type(value) is bytes and len(value) >= OUT_OF_BAND_MIN


def _lift(value: Any) -> Any:
    return _OutOfBandBytes(value) if _big_bytes(value) else value


def loads(frames, what: str) -> Any:
    """Unpickle ``[pickle, *buffers]`` (bytes, memoryviews or zmq.Frames)."""
    views = [getattr(f, "buffer", f) for f in frames]
    try:
        return pickle.loads(views[0], buffers=views[1:])
    except Exception as exc:
        raise SerializationError(f"cannot unpickle {what}: {type(exc).__name__}: {exc}") from exc


def dumps_function(func: Callable) -> tuple[bytes, bytes]:
    """Pickle a function once; return ``(digest, blob)``; the digest names it on the wire."""
    blob = dumps(func, f"function {getattr(func, '__qualname__', func)!r}")
    if len(blob) != 1:  # a function with a huge buffer baked in: keep it in band
        blob = [cloudpickle.dumps(func, protocol=5)]
    return hashlib.blake2b(blob[0], digest_size=16).digest(), blob[0]
