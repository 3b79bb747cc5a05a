"""Exceptions of pymem.store (all subclass :class:`pymem.Error`)."""
from __future__ import annotations

from .._errors import Error

__all__ = ["StoreError", "BackendError", "CorruptValueError", "FingerprintError", "TargetError"]


try:  # the backends package defines the base classes (pymem/store/backends/errors.py)
    from .backends.errors import BackendError, StoreError
except ImportError:  # pragma: no cover - a tree without it
    class StoreError(Error):  # type: ignore[no-redef]
        """Base class of every prompt-cache store error."""

    class BackendError(StoreError):  # type: ignore[no-redef]
        """A backend failed (I/O, connection, driver error)."""


class CorruptValueError(StoreError):
    """A stored value failed its envelope or checksum check (it is treated as a miss and deleted)."""


class FingerprintError(StoreError):
    """The model or memory-layout fingerprint of a target cannot be computed."""


class TargetError(StoreError):
    """The target (a live llama.cpp context or a pymem memory) cannot be used by the store."""
