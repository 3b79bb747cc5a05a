"""Reading large state files without holding them in memory: a regular file of at least
``MAP_MIN`` bytes is memory-mapped read-only, so parsing touches only the pages of headers and
cell lists; row data stays in the page cache until something (a diff, an edit) reads it.
Smaller files, pipes and devices are read whole (:func:`pymem.state.files.read_file`).

A mapped file must not be truncated while it is in use (llama.cpp rewrites files in place):
the parsed objects keep views of the mapping.  ``PYMEM_NO_MMAP=1`` turns mapping off."""
from __future__ import annotations

import mmap
import os
import stat
from typing import Any, Iterator

from . import files
from .envelopes import PathLike, Progress

__all__ = ["read", "same_bytes", "release", "MAP_MIN"]

#: files from this size on are mapped
MAP_MIN = 16 << 20


def read(path: PathLike, progress: Progress = None) -> Any:
    """The bytes of ``path`` as a buffer: an ``mmap`` for large regular files, else a
    bytearray.  Errors as :func:`pymem.state.files.read_file`."""
    if os.environ.get("PYMEM_NO_MMAP", "") not in ("", "0"):
        return files.read_file(path, progress)
    try:
        st = os.stat(os.fspath(path))   # no open(): a FIFO without a writer would block here
    except (OSError, TypeError, ValueError):
        return files.read_file(path, progress)   # names the problem
    if not stat.S_ISREG(st.st_mode) or st.st_size < MAP_MIN:
        return files.read_file(path, progress)
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return files.read_file(path, progress)
    try:
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return files.read_file(path, progress)
    finally:
        os.close(fd)
    if progress:
        progress(len(m), len(m))
    return m


def same_bytes(a: Any, b: Any) -> bool:
    """Whether two saved states have the same bytes, compared chunk by chunk (no whole copies)."""
    if a.nbytes != b.nbytes:
        return False

    def pieces(obj: Any) -> Iterator[memoryview]:
        for c in obj.chunks():
            if len(c):
                yield memoryview(c).cast("B")

    ia, ib = pieces(a), pieces(b)
    held: list = []   # pieces of a mapping read so far: their pages go back once compared
    ca = cb = memoryview(b"")
    while True:
        if not len(ca):
            ca = next(ia, memoryview(b""))
            held.append(ca)
        if not len(cb):
            cb = next(ib, memoryview(b""))
            held.append(cb)
        if len(held) > 64:
            for h in held[:-2]:
                release(h)
            del held[:-2]
        if not len(ca) or not len(cb):
            for h in held:
                release(h)
            return not len(ca) and not len(cb)
        n = min(len(ca), len(cb))
        if ca[:n] != cb[:n]:
            return False
        ca, cb = ca[n:], cb[n:]


def release(view: Any) -> None:
    """Hand the pages under ``view`` back to the page cache when it is a read-only view of a
    read-only file mapping (``MADV_DONTNEED``: the data stay in the file; reading again
    faults them back in).  Row data of a large file, once written or compared, then stop
    counting towards the resident set.  Anything else: nothing happens."""
    try:
        mv = view if isinstance(view, memoryview) else memoryview(view)
        obj = mv.obj
        if not isinstance(obj, mmap.mmap) or not mv.nbytes or not hasattr(mmap, "MADV_DONTNEED"):
            return
        whole = memoryview(obj)
        if not whole.readonly:   # ACCESS_COPY / ACCESS_WRITE: private changes must not be dropped
            return
        import numpy as np

        base = np.frombuffer(whole, dtype=np.uint8).ctypes.data
        flat = mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")
        start = np.frombuffer(flat, dtype=np.uint8).ctypes.data - base
    except (TypeError, ValueError, AttributeError):
        return
    page = mmap.PAGESIZE
    a = start // page * page
    b = min(len(obj), -(-(start + mv.nbytes) // page) * page)
    if 0 <= a < b:
        try:
            obj.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass
