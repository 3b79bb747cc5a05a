"""Backends of the prompt-cache store behind one narrow interface (:mod:`.base`).

PROVISIONAL (branch ``store``): only ``memory://`` is handled here; the embedded directory + SQLite
backend and Redis come with the ``backends`` branch, whose ``open_backend`` replaces this one."""
from __future__ import annotations

from typing import Any

from .base import Backend, Entry

__all__ = ["Backend", "Entry", "open_backend"]


def open_backend(url: Any, **opts: Any) -> Backend:
    """The backend for ``url`` (``memory://[name]``)."""
    from ..errors import StoreError

    if isinstance(url, Backend):
        return url
    u = str(url)
    if u.startswith("memory://"):
        from .memory import MemoryBackend

        return MemoryBackend(u[len("memory://"):])
    raise StoreError(f"no backend for {u!r} in this build (supported: memory://)")
