"""The C core's SIMD kernels: which one is active, which this CPU can run, and a context
manager to force one (all give bit-identical results; PYMEM_FORCE_SCALAR=1 or
PYMEM_FORCE_KERNEL=<name> choose one for a whole run)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from ._native import check, ffi, lib

__all__ = ["active", "available", "select", "forced"]


def active() -> str:
    """Name of the kernel table in use ("scalar", "avx2", "avx512", "neon")."""
    return ffi.string(lib.pm_kernels_name()).decode()


def available() -> list[str]:
    """Kernel tables this CPU can run."""
    names = ffi.new("const char *[]", 8)
    n = lib.pm_kernels_available(names, 8)
    return [ffi.string(names[i]).decode() for i in range(n)]


def select(name: str) -> None:
    """Use kernel table `name` ("auto" re-detects); UnsupportedError if the CPU cannot."""
    check(lib.pm_kernels_select(name.encode()), "kernels.select")


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Run a block with kernel table `name`, then restore the previous one."""
    prev = active()
    select(name)
    try:
        yield
    finally:
        select(prev)
