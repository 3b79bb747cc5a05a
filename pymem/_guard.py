"""One guarded way into the C core for every object that belongs to a memory.

A :class:`Guard` owns a memory's native handle and its lock.  Every call into the C core that
touches the memory (the memory's own methods, its KV / recurrent parts, its batch contexts
and ubatches, the state package) goes through :meth:`Guard.call`:

1. take the memory's lock (the C objects are not thread-safe);
2. check the memory is still open (:class:`pymem.InvalidStateError` after ``close()``);
3. call the C function; an integer that does not fit its C type becomes
   :class:`pymem.InvalidArgumentError` (integers are range-checked by name beforehand with
   :func:`i32` / :func:`u32` / :func:`u64`, so the message names the argument);
4. turn a failing ``pm_status`` into the matching pymem exception.

Objects that belong to a memory (a :class:`~pymem.BatchContext`, a ``UBatch``) keep the
memory's Guard, not the memory: they need nothing else from it.
"""
from __future__ import annotations

import operator
import threading
import weakref
from typing import Any, Callable, Optional

import numpy as np

from . import _errors as E
from ._native import check, ffi, lib

__all__ = ["Guard", "Handle", "i32", "u32", "u64", "integer"]

I32 = (-(2**31), 2**31 - 1)
U32 = (0, 2**32 - 1)
U64 = (0, 2**64 - 1)


def integer(value: Any, name: str, lo: int, hi: int, what: str = "") -> int:
    """``value`` as an int in [lo, hi]; TypeError for non-integers, InvalidArgumentError
    naming the argument (and the call) when out of range."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what + ': ' if what else ''}{name} must be an integer, "
                        f"not {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise E.InvalidArgumentError(f"{what + ': ' if what else ''}{name} must be in [{lo}, {hi}], got {v}")
    return v


def i32(value: Any, name: str, what: str = "") -> int:
    """An int32 argument (sequence ids, positions)."""
    return integer(value, name, I32[0], I32[1], what)


def u32(value: Any, name: str, what: str = "") -> int:
    """A uint32 argument (sizes, counts, layer ids, flags)."""
    return integer(value, name, U32[0], U32[1], what)


def u64(value: Any, name: str, what: str = "") -> int:
    return integer(value, name, U64[0], U64[1], what)


class Handle:
    """Owns one native pm_memory; numpy views of its tensors hold it alive."""

    __slots__ = ("ptr", "__weakref__")

    def __init__(self, ptr: Any) -> None:
        self.ptr = ffi.gc(ptr, lib.pm_memory_free, size=int(lib.pm_memory_nbytes(ptr)))


class _View:
    """Base object of a zero-copy numpy view: keeps the native memory alive."""

    def __init__(self, handle: Handle, ptr: Any, shape: tuple, typestr: str) -> None:
        self._handle = handle
        self.__array_interface__ = {
            "version": 3,
            "data": (int(ffi.cast("uintptr_t", ptr)), False),
            "shape": shape,
            "typestr": typestr,
            "strides": None,
        }


class Guard:
    """A memory's lock, its native handle (None once closed) and the numpy views of its
    tensors; see the module docstring."""

    __slots__ = ("lock", "handle", "owner", "views", "__weakref__")

    def __init__(self, ptr: Any, owner: str) -> None:
        self.lock = threading.RLock()
        self.handle: Optional[Handle] = Handle(ptr)
        self.owner = owner            # class name, for messages
        self.views: "weakref.WeakSet[_View]" = weakref.WeakSet()

    def close(self) -> None:
        """Forget the native memory: freed now, or when the last numpy view of it is gone."""
        with self.lock:
            h, self.handle = self.handle, None
            if h is not None and len(self.views) == 0:
                ffi.release(h.ptr)

    def export(self, ptr: Any, shape: tuple, typestr: str) -> np.ndarray:
        """A zero-copy numpy view of ``ptr`` (inside the live memory) that keeps the memory
        alive.  Call with the lock held."""
        h = self.handle
        if h is None:
            self.live()
        base = _View(h, ptr, shape, typestr)
        self.views.add(base)
        return np.asarray(base)

    def live(self) -> Any:
        """The native pm_memory pointer; InvalidStateError once the memory is closed.  Call
        with the lock held."""
        h = self.handle
        if h is None:
            raise E.InvalidStateError(f"operation on a closed {self.owner}")
        return h.ptr

    @property
    def closed(self) -> bool:
        return self.handle is None

    def call(self, what: str, fn: Callable[..., Any], *args: Any, status: bool = True) -> Any:
        """``fn(memory pointer, *args)`` under the lock, on a live memory; with ``status`` the
        result is a pm_status, checked (raises) and returned."""
        with self.lock:
            return self._run(what, fn, self.live(), args, status)

    def call_on(self, ptr: Any, what: str, fn: Callable[..., Any], *args: Any, status: bool = True) -> Any:
        """``fn(ptr, *args)`` for an object owned by the memory (a batch context): the
        memory's lock, and the memory must still be open."""
        with self.lock:
            self.live()
            return self._run(what, fn, ptr, args, status)

    @staticmethod
    def _run(what: str, fn: Callable[..., Any], ptr: Any, args: tuple, status: bool) -> Any:
        try:
            r = fn(ptr, *args)
        except OverflowError as exc:
            raise E.InvalidArgumentError(f"{what}: argument out of range: {exc}") from None
        if status and r:
            check(r, what)
        return r
