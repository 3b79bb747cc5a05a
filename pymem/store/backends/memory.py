"""An in-process backend: a dict under a lock.  Thread-safe; lives as long as the process (useful
for tests and ephemeral caches).  ``memory://`` opens a new private store; ``memory://name``
opens the store of that name shared by every ``open`` in this process."""
from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .base import GONE_KEEP, Backend, Entry
from .errors import check_key

__all__ = ["MemoryBackend"]


class _Data:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.items: Dict[str, Tuple[Entry, bytes]] = {}
        self.counters: Dict[str, int] = {}
        self.gone: "OrderedDict[str, str]" = OrderedDict()
        self.nbytes = 0


try:
    from .errors import check_entry as _check_entry
except ImportError:  # pragma: no cover - a tree without the shared checks
    _check_entry = None

_NAMED: "weakref.WeakValueDictionary[str, _Data]" = weakref.WeakValueDictionary()
_NAMED_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """A thread-safe in-process backend (see the module docstring)."""

    def __init__(self, name: str = "") -> None:
        self.url = f"memory://{name}"
        if name:
            with _NAMED_LOCK:
                d = _NAMED.get(name)
                if d is None:
                    d = _Data()
                    _NAMED[name] = d
        else:
            d = _Data()
        self._d: Optional[_Data] = d

    def _data(self) -> _Data:
        d = self._d
        if d is None:
            try:
                from .errors import BackendClosedError as Closed
            except ImportError:  # pragma: no cover
                from ..errors import BackendError as Closed  # type: ignore[assignment]
            raise Closed(f"{self.url}: the backend is closed")
        return d

    def get(self, key: str, *, touch: bool = True) -> Optional[bytes]:
        d = self._data()
        with d.lock:
            it = d.items.get(key)
            if it is None:
                return None
            if touch:
                d.items[key] = (dataclasses.replace(it[0], last_used=time.time()), it[1])
            return it[1]

    def present(self, keys: Sequence[str]) -> List[bool]:
        d = self._data()
        with d.lock:
            return [k in d.items for k in keys]

    def touch(self, keys: Iterable[str]) -> None:
        d = self._data()
        now = time.time()
        with d.lock:
            for k in keys:
                it = d.items.get(k)
                if it is not None:
                    d.items[k] = (dataclasses.replace(it[0], last_used=now), it[1])

    def entry(self, key: str) -> Optional[Entry]:
        d = self._data()
        with d.lock:
            it = d.items.get(key)
            return None if it is None else it[0]

    def put_if_absent(self, entry: Entry, value: bytes) -> bool:
        d = self._data()
        if _check_entry is not None:
            _check_entry(entry)
        value = bytes(value)
        now = time.time()
        e = dataclasses.replace(entry, size=len(value), created=entry.created or now,
                                last_used=entry.last_used or now)
        with d.lock:
            if e.key in d.items:
                return False
            d.items[e.key] = (e, value)
            d.nbytes += len(value)
            return True

    def delete(self, keys: Iterable[str]) -> int:
        d = self._data()
        n = 0
        with d.lock:
            for k in keys:
                it = d.items.pop(k, None)
                if it is not None:
                    d.nbytes -= len(it[1])
                    n += 1
        return n

    def mark_gone(self, reasons: Dict[str, str]) -> None:
        d = self._data()
        with d.lock:
            for k, why in reasons.items():
                d.gone[check_key(k)] = str(why)
                d.gone.move_to_end(k)
            while len(d.gone) > GONE_KEEP:
                d.gone.popitem(last=False)

    def why_gone(self, keys: Sequence[str]) -> Dict[str, str]:
        d = self._data()
        with d.lock:
            return {k: d.gone[k] for k in keys if k in d.gone}

    def scan(self) -> Iterator[Entry]:
        d = self._data()
        with d.lock:
            entries = [e for e, _ in d.items.values()]
        return iter(entries)

    def set_pinned(self, keys: Iterable[str], pinned: bool = True) -> None:
        d = self._data()
        with d.lock:
            for k in keys:
                it = d.items.get(k)
                if it is not None:
                    d.items[k] = (dataclasses.replace(it[0], pinned=bool(pinned)), it[1])

    def incr(self, name: str, n: int = 1) -> int:
        d = self._data()
        with d.lock:
            v = d.counters.get(name, 0) + int(n)
            d.counters[name] = v
            return v

    def counters(self) -> Dict[str, int]:
        d = self._data()
        with d.lock:
            return dict(d.counters)

    def total_bytes(self) -> int:
        d = self._data()
        with d.lock:
            return d.nbytes

    # test hook: replace a stored value in place (simulates corruption on disk / in Redis)
    def _overwrite(self, key: str, value: bytes) -> None:
        d = self._data()
        with d.lock:
            e, old = d.items[key]
            d.nbytes += len(value) - len(old)
            d.items[key] = (e, bytes(value))

    def close(self) -> None:
        self._d = None
