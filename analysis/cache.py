"""A least-recently-used store of immutable results under a byte budget, shared by every caller (no copies).

Streamlit's `st.cache_data` pickles a value on store and unpickles a copy on every hit, and counts entries, not
bytes: for a capture of every layer's q, k and T x T patterns that is seconds and hundreds of MiB per rerun. The
app keeps one `ByteBudgetCache` in `st.cache_resource` instead: a hit hands back the stored object itself, and the
least recently used entries go once the stored bytes pass the budget. Callers must not mutate what they get.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np


def nbytes(value: Any, seen: set[int] | None = None) -> int:
    """The bytes held by numpy arrays (and strings) inside `value`: dataclasses, dicts, lists and tuples are walked.

    An array reachable twice (a result sharing its capture's patterns) is counted once.
    """
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, str | bytes):
        return len(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes(k, seen) + nbytes(v, seen) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return sum(nbytes(item, seen) for item in value)
    return 0


class ByteBudgetCache:
    """get(key, make): the stored value for `key`, else make() stored; oldest-used entries leave past `budget` bytes.

    The entry just made always stays, even alone over budget (the caller is about to use it). Thread-safe: two
    Streamlit sessions may ask at once; concurrent misses on one key each compute, and the first stored wins.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = make()  # outside the lock: a forward pass must not block other sessions' hits
        size = nbytes(value)
        with self._lock:
            if key in self._items:  # another session stored it meanwhile: share that one
                self._items.move_to_end(key)
                return self._items[key][0]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.budget and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return value

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items
