"""A session's pickled functions: each pickled once while it lives, held only weakly.

    submit(func) --get(func)--> cached by id(func), checked by a weakref: (digest, blob, name)
    the caller lets go of func (a bound method, a partial) --> its weakref callback notes the
    entry in ``dead`` (no lock, no dict: it may run in any thread) --> forget_dead() drops it

A function that cannot be weakly referenced is pickled again on each submit (same digest, so
it still travels to the master once). At most FUNCTION_CACHE functions are kept.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable

from cw import serialize

FUNCTION_CACHE = 512


class FunctionCache:
    """id(func) -> (weakref to func, digest, blob, name), most recently used last."""

    def __init__(self) -> None:
        self.entries: OrderedDict[int, tuple] = OrderedDict()
        self.dead: deque[tuple[int, weakref.ref]] = deque()
        self.lock = threading.Lock()

    def get(self, func: Callable) -> tuple[bytes, bytes, str]:
        """``(digest, blob, name)`` of a function, pickled once while it lives (and stays
        among the FUNCTION_CACHE last used)."""
        key = id(func)
        with self.lock:
            self._forget()
            cached = self.entries.get(key)
            if cached is not None and cached[0]() is func:
                self.entries.move_to_end(key)
                return cached[1:]
        digest, blob = serialize.dumps_function(func)
        name = _name(func)
        try:
            ref = weakref.ref(func, _on_collected(self.dead, key))
        except TypeError:  # not weakly referenceable: never cached, so never kept alive
            return digest, blob, name
        with self.lock:
            self.entries[key] = (ref, digest, blob, name)
            if len(self.entries) > FUNCTION_CACHE:
                self.entries.popitem(last=False)
        return digest, blob, name

    def _forget(self) -> None:  # under lock
        """Drop the cache entries (and pickled blobs) of functions collected since."""
        while self.dead:
            key, ref = self.dead.popleft()
            cached = self.entries.get(key)
            if cached is not None and cached[0] is ref:
                del self.entries[key]

    def forget_dead(self) -> None:
        """Drop the entries of functions collected since (cheap when there are none)."""
        if self.dead:
            with self.lock:
                self._forget()


def _on_collected(dead: deque, key: int) -> Callable[[weakref.ref], None]:
    """A weakref callback that only notes the entry (it may run in any thread, inside any
    allocation, so it takes no lock and touches no dict)."""
    return lambda ref: dead.append((key, ref))


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
