"""pymem's exceptions.  Every one subclasses :class:`Error`; most also subclass the builtin
that fits (``ValueError`` for bad input), so ``except ValueError`` works as expected.
Messages come from the C core."""
from __future__ import annotations

__all__ = [
    "Error",
    "InvalidArgumentError",
    "UnsupportedError",
    "NoSlotError",
    "StateError",
    "BatchError",
    "ShiftError",
    "InvalidStateError",
    "BufferTooSmallError",
    "StateFileError",
]


class Error(Exception):
    """Base class of pymem's errors; ``status`` is the C core's pm_status code."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class InvalidArgumentError(Error, ValueError):
    """An argument llama.cpp would abort on or misuse (bad sequence id, divisor, ...)."""


class UnsupportedError(Error):
    """A legal-looking request llama.cpp cannot do (e.g. a partial cross-stream seq_cp)."""


class NoSlotError(Error):
    """The batch does not fit in the memory (llama_decode would return 1).  Nothing changed."""


class StateError(Error, ValueError):
    """A malformed, truncated or mismatched state blob or file.  Nothing changed."""


class BatchError(Error, ValueError):
    """llama.cpp would reject this batch (llama_decode would return -1).  Nothing changed."""


class ShiftError(Error):
    """A pending K-shift cannot be applied (BF16 K, quantized K without rotation, M-RoPE, ...)."""


class InvalidStateError(Error, RuntimeError):
    """The operation is not allowed now (pending update, stale batch context, closed memory)."""


class BufferTooSmallError(Error, ValueError):
    """The output buffer is too small; ``needed`` holds the required size."""

    needed: int = 0


class StateFileError(StateError, OSError):
    """A session or sequence state file could not be read or written."""
