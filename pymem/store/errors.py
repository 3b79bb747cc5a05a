"""Exceptions of pymem.store (all subclass :class:`pymem.Error`)."""
from __future__ import annotations

__all__ = ["StoreError", "BackendError", "CorruptValueError", "FingerprintError", "TargetError"]


from .backends.errors import BackendError, StoreError  # the base classes live with the backends


class CorruptValueError(StoreError):
    """A stored value failed its envelope or checksum check (it is treated as a miss and deleted)."""


class FingerprintError(StoreError):
    """The model or memory-layout fingerprint of a target cannot be computed."""


class TargetError(StoreError):
    """The target (a live llama.cpp context or a pymem memory) cannot be used by the store."""
