"""Plumbing between the public classes and the C core: the compiled cffi module, status
checks that turn pm_status codes into exceptions, and buffer helpers."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _errors as E

try:
    from ._cffi import ffi, lib  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pymem's C extension (pymem._cffi) is not built. Install the package "
        "(python -m pip install .) instead of importing it from the source tree."
    ) from exc

__all__ = ["ffi", "lib", "check", "last_error", "as_i32", "new_out"]

_BY_STATUS = {
    lib.PM_E_INVALID_ARG: E.InvalidArgumentError,
    lib.PM_E_UNSUPPORTED: E.UnsupportedError,
    lib.PM_E_NO_SLOT: E.NoSlotError,
    lib.PM_E_FORMAT: E.StateError,
    lib.PM_E_IO: E.StateFileError,
    lib.PM_E_STATE: E.InvalidStateError,
    lib.PM_E_BUFFER_SMALL: E.BufferTooSmallError,
    lib.PM_E_BATCH: E.BatchError,
    lib.PM_E_SHIFT: E.ShiftError,
}


def last_error() -> str:
    return ffi.string(lib.pm_last_error()).decode("utf-8", "replace")


def check(status: int, what: str = "") -> int:
    """Raise the exception for a failing pm_status; return the status otherwise."""
    if status >= 0:
        return status
    detail = last_error() or ffi.string(lib.pm_status_str(status)).decode()
    message = f"{what}: {detail}" if what else detail
    if status == lib.PM_E_NOMEM:
        raise MemoryError(message)
    raise _BY_STATUS.get(status, E.Error)(message, status)


def as_i32(values: Any, n: int | None = None, what: str = "values") -> np.ndarray:
    arr = np.ascontiguousarray(values, dtype=np.int64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise E.InvalidArgumentError(f"{what} must fit in int32")
    arr = arr.astype(np.int32)
    if n is not None and arr.size != n:
        raise E.InvalidArgumentError(f"{what} needs {n} entries, got {arr.size}")
    return arr


def new_out(ctype: str) -> Any:
    return ffi.new(ctype)
