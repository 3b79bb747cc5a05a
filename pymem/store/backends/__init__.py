"""Prompt-cache backends: :func:`open_backend` turns a store URL or path into a :class:`Backend`.

=============================================  ==================================================
``"prompt-cache"``, ``"/abs/dir"``, ``Path``     embedded: a directory of value files + SQLite index
``"file:///abs/dir"``, ``"file://rel/dir"``      the same, spelled as a URL
``"redis://[user:pw@]host:port/db"``             Redis / Valkey (``rediss://`` for TLS)
``"unix:///path/redis.sock?db=0"``               Redis over a Unix socket
``"memory://"``, ``"memory://name"``             in-process (named: shared within the process)
=============================================  ==================================================

Options (keyword arguments) go to the backend's constructor; for Redis the URL query may also
carry ``prefix=`` (the key prefix, default ``pymem:``).
"""
from __future__ import annotations

import os
from typing import Any, Union
from urllib.parse import unquote, urlsplit

from .base import Backend, Entry
from .errors import (
    BackendClosedError,
    BackendCorruptError,
    BackendError,
    BackendUnavailableError,
    BackendURLError,
)

__all__ = ["open_backend", "Backend", "Entry", "BackendError", "BackendURLError",
           "BackendUnavailableError", "BackendClosedError", "BackendCorruptError"]

_REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")


def open_backend(url: Union[str, "os.PathLike[str]"], **opts: Any) -> Backend:
    """Open the backend that ``url`` names (see the module docstring; a :class:`Backend` is
    returned as it is); raise
    :class:`BackendURLError` for URLs naming no backend and :class:`BackendUnavailableError`
    when the backend exists but cannot be reached or opened."""
    if isinstance(url, Backend):
        return url
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if isinstance(url, bytes):
        url = os.fsdecode(url)
    if not isinstance(url, str):
        raise BackendURLError(f"a store URL or path is a str or path, not {type(url).__name__}")
    if not url.strip():
        raise BackendURLError("empty store URL or path")
    if "://" not in url:
        from .fs import FSBackend

        return FSBackend(url, **opts)
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):  # file://rel/dir: a relative path
            path = unquote(parts.netloc + parts.path)
        else:
            path = unquote(parts.path)
        if not path:
            raise BackendURLError(f"{url!r}: no directory in the file:// URL")
        from .fs import FSBackend

        return FSBackend(path, **opts)
    if scheme in _REDIS_SCHEMES:
        from .redis import RedisBackend

        return RedisBackend(url, **opts)
    if scheme == "memory":
        try:
            from .memory import MemoryBackend
        except ImportError as exc:  # pragma: no cover - the memory backend ships with pymem.store
            raise BackendURLError("memory:// is not available in this build") from exc
        return MemoryBackend(rest, **opts)
    raise BackendURLError(f"unknown store URL scheme {scheme + '://'!r} in {url!r}; use a directory "
                          "path, file://, redis://, rediss://, unix:// or memory://")
