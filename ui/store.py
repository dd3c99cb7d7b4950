"""A bounded, thread-safe store of results shared by every dashboard session.

Streamlit runs each session's script in its own thread. Work that draws a progress bar cannot
live in `st.cache_*` (those replay what a cached function draws), so it is kept here: each key is
computed once even when several sessions ask at the same moment (the others wait for it), and
the least recently used result is dropped beyond `size`, so a server opened on many models does
not grow without limit.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedResults(Generic[T]):
    """At most `size` results by key, least recently used evicted first."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size {size} must be at least 1")
        self.size = size
        self._results: OrderedDict[Hashable, T] = OrderedDict()
        self._pending: dict[Hashable, threading.Lock] = {}  # key -> held while it is computed
        self._lock = threading.Lock()  # guards both dicts, never held while computing

    def __len__(self) -> int:
        with self._lock:
            return len(self._results)

    def _cached(self, key: Hashable) -> tuple[bool, T | None]:
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
                return True, self._results[key]
            return False, None

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The result for `key`, computed by `compute()` the first time it is asked for."""
        found, value = self._cached(key)
        if found:
            return value
        with self._lock:
            pending = self._pending.setdefault(key, threading.Lock())
        with pending:  # one session computes; the others wait here, then read its result
            found, value = self._cached(key)
            if found:
                return value
            try:
                value = compute()
                with self._lock:
                    self._results[key] = value
                    while len(self._results) > self.size:
                        self._results.popitem(last=False)
            finally:
                with self._lock:
                    self._pending.pop(key, None)
        return value
