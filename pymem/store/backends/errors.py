"""Errors of the prompt-cache backends.

:class:`BackendError` is a :class:`StoreError`, a :class:`pymem.Error`: ``pymem.store`` re-exports
both (``from .backends.errors import StoreError, BackendError``), so ``except pymem.Error`` and
``except pymem.store.StoreError`` catch every backend failure.
Driver exceptions (``sqlite3``, ``redis``, ``OSError``) never escape a backend: they are wrapped here
with the backend's URL (passwords removed) and the underlying cause chained."""
from __future__ import annotations

import operator
import re

from ..._errors import Error

__all__ = ["StoreError", "BackendError", "BackendURLError", "BackendUnavailableError", "BackendClosedError",
           "BackendCorruptError", "check_key", "check_entry"]


class StoreError(Error):
    """Base class of every prompt-cache store error (``pymem.store.StoreError`` is this class)."""


class BackendError(StoreError):
    """A prompt-cache backend failed (I/O, permissions, lost connection, bad index, ...)."""


class BackendURLError(BackendError, ValueError):
    """A store URL or path that names no usable backend (unknown scheme, bad port, not a store)."""


class BackendUnavailableError(BackendError, ConnectionError):
    """The backend cannot be reached or opened (server down, permission denied, locked too long)."""


class BackendClosedError(BackendError, RuntimeError):
    """An operation on a backend after :meth:`close`."""


class BackendCorruptError(BackendError):
    """The backend's own bookkeeping is damaged (an index that is not SQLite, a foreign schema)."""


_MAX_KEY = 256
_KIND = re.compile(r"[a-z][a-z0-9_]{0,15}")


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid backend key: a non-empty str of at most 256 printable
    characters (the store uses hex digests); raise :class:`BackendError` otherwise."""
    if not isinstance(key, str):
        raise BackendError(f"backend keys are str, not {type(key).__name__}")
    if not key or len(key) > _MAX_KEY or not key.isprintable() or key != key.strip():
        raise BackendError(f"invalid backend key {key[:80]!r}: 1..{_MAX_KEY} printable characters, "
                           "no surrounding spaces")
    return key


def check_entry(entry: object) -> None:
    """Check what a backend stores of an :class:`~.base.Entry`: its key, its parent's key, its kind
    (a short lowercase name: "block", "tail", "ckpt", ...) and its token count."""
    key = check_key(getattr(entry, "key", None))
    parent = getattr(entry, "parent", None)
    if parent is not None:
        check_key(parent)
    kind = getattr(entry, "kind", None)
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise BackendError(f"entry {key}: kind {kind!r} is not a short lowercase name")
    n = getattr(entry, "n_tokens", None)
    try:
        ok = not isinstance(n, bool) and operator.index(n) >= 0  # type: ignore[arg-type]
    except TypeError:
        ok = False
    if not ok:
        raise BackendError(f"entry {key}: n_tokens {n!r} is not a count")
