"""The one narrow interface every prompt-cache backend implements.

A backend stores immutable values under string keys (hex digests of the block hash chain) together
with a small metadata record (:class:`Entry`), keeps a few atomic counters, and knows nothing about
llama.cpp: the store (``pymem.store``) decides what a value means, checks its envelope and checksum,
and applies the byte budget through :meth:`Backend.scan` and :meth:`Backend.delete`.

Contract (every backend, checked by the shared backend tests):

* ``put_if_absent`` is atomic: a reader sees either no value or the whole value, never a prefix,
  also across processes and after a writer is killed; it returns False (and changes nothing) when the
  key already exists.  Values are immutable: a key is never overwritten, only deleted.
* ``get`` returns the bytes or None; it refreshes ``last_used`` (LRU) unless ``touch=False``;
  ``get_into``, ``get_scattered`` and ``get_head`` (optional to override) do the same into a
  caller's reusable buffer / into several buffers / for the first bytes only (without a touch).
* ``delete`` of absent keys is not an error; it returns how many keys it removed.
* ``mark_gone`` / ``why_gone`` (optional) keep why keys were deleted (evicted, found corrupt) so
  that a look-up in any process sharing the backend can say it; bounded (the newest
  :data:`GONE_KEEP`, or a week, per backend).
* ``scan`` yields every entry's metadata (no values), in no particular order.
* Counters are integers kept atomically across processes (hits, misses, tokens_saved, ...).
* Backend failures raise :class:`pymem.store.StoreError` subclasses, never raw driver exceptions.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

__all__ = ["Backend", "Entry", "GONE_KEEP"]

GONE_KEEP = 4096       # reasons kept for deleted keys (the newest)
GONE_TTL = 7 * 86400  # seconds a reason is kept where the backend expires keys by time


@dataclass(frozen=True)
class Entry:
    """Metadata of one stored value (the value itself is fetched with :meth:`Backend.get`)."""

    key: str                 # hex digest: the chained block key (or a checkpoint / tail key)
    size: int                # bytes of the stored value
    kind: str                # "block" | "tail" | "ckpt"
    n_tokens: int            # the token count this value brings a sequence to
    parent: Optional[str]    # key of the block this one chains from (None: first block)
    created: float = 0.0     # unix time of the put
    last_used: float = 0.0   # unix time of the last get (LRU)
    pinned: bool = False     # pinned entries are never evicted


class Backend(abc.ABC):
    """Abstract prompt-cache backend; see the module docstring for the contract."""

    url: str = ""

    @abc.abstractmethod
    def get(self, key: str, *, touch: bool = True) -> Optional[bytes]: ...

    @abc.abstractmethod
    def entry(self, key: str) -> Optional[Entry]: ...

    @abc.abstractmethod
    def put_if_absent(self, entry: Entry, value: bytes) -> bool: ...

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> int: ...

    @abc.abstractmethod
    def scan(self) -> Iterator[Entry]: ...

    @abc.abstractmethod
    def set_pinned(self, keys: Iterable[str], pinned: bool = True) -> None: ...

    @abc.abstractmethod
    def incr(self, name: str, n: int = 1) -> int: ...

    @abc.abstractmethod
    def counters(self) -> Dict[str, int]: ...

    def get_into(self, key: str, buf: Any, *, touch: bool = True) -> Optional[memoryview]:
        """Like :meth:`get`, as a read-only memoryview that may live in the caller's writable
        buffer ``buf`` (backends that can read straight into it do when it is large enough; the view
        is then valid until ``buf`` is reused).  A caller fetching many values can keep reusing its
        buffers instead of allocating (and page-faulting) fresh bytes for every value."""
        v = self.get(key, touch=touch)
        return None if v is None else memoryview(v)

    def get_scattered(self, key: str, bufs: Sequence[memoryview], *, touch: bool = True) -> Optional[int]:
        """Read the value into the writable byte buffers ``bufs`` in order, when their lengths add
        up to its size; returns the value's size (None: absent).  When the sizes differ nothing is
        read and the caller sees the mismatch in the returned size.  Lets a restore read block
        values straight to their places in the assembled state (backends that can: the embedded
        one, with one ``preadv``)."""
        v = self.get(key, touch=touch)
        if v is None:
            return None
        if len(v) == sum(b.nbytes for b in bufs):
            mv, o = memoryview(v), 0
            for b in bufs:
                b[:] = mv[o:o + b.nbytes]
                o += b.nbytes
        return len(v)

    def get_head(self, key: str, buf: Any) -> Optional[int]:
        """The first ``len(buf)`` bytes of the value (all of it when shorter) into the writable
        buffer ``buf``, without a touch; returns the value's size (None: absent).  Lets a restore
        read a block's headers before it decides where the block's bytes go."""
        v = self.get(key, touch=False)
        if v is None:
            return None
        n = min(len(v), len(buf))
        memoryview(buf).cast("B")[:n] = memoryview(v).cast("B")[:n]
        return len(v)

    def mark_gone(self, reasons: Dict[str, str]) -> None:
        """Remember why ``reasons``' keys were deleted (key -> why); a backend that does not
        keep them ignores this (look-ups then say less)."""

    def why_gone(self, keys: Sequence[str]) -> Dict[str, str]:
        """The kept reasons for those of ``keys`` that have one (see :meth:`mark_gone`)."""
        return {}

    def present(self, keys: Sequence[str]) -> List[bool]:
        """Which of ``keys`` are stored (one round trip where the backend can)."""
        return [self.entry(k) is not None for k in keys]

    def touch(self, keys: Iterable[str]) -> None:
        """Refresh ``last_used`` (LRU) of the stored ones among ``keys``, as a get would; for a
        caller that read them with ``touch=False`` (one write for many values)."""
        for k in keys:
            self.get(k, touch=True)

    def total_bytes(self) -> int:
        """Sum of the sizes of all entries (backends may answer from a counter)."""
        return sum(e.size for e in self.scan())

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and files; the backend is unusable afterwards."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
