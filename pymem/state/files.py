"""File input and output for saved states (and for anything else of pymem that writes files).

* :func:`read_file` reads a whole file: regular files in one buffer sized from ``stat``, pipes,
  FIFOs and character devices (``/dev/stdin``, ``<(cat file)``) as streams until EOF.
* :func:`atomic_write` writes a file whole or not at all: a temporary name in the target's
  folder, ``fsync``, rename.  It writes *through* a symbolic link (the link stays, its target
  is replaced), keeps an existing target's permission bits (a new file gets ``0666 & ~umask``)
  and refuses outputs that are not regular files (FIFOs, devices, folders).

Both raise :class:`pymem.StateFileError` naming the path and the problem.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable

from .. import _errors as E
from .envelopes import PathLike, Progress, _CHUNK

__all__ = ["read_file", "atomic_write"]


def _oserror(p: object, exc: OSError, what: str = "") -> E.StateFileError:
    if isinstance(exc, FileNotFoundError):
        return E.StateFileError(f"{p}: no such file")
    if isinstance(exc, IsADirectoryError):
        return E.StateFileError(f"{p}: is a directory")
    if isinstance(exc, PermissionError):
        return E.StateFileError(f"{p}: {what}permission denied")
    return E.StateFileError(f"{p}: {what}{exc.strerror or exc}")


def read_file(path: PathLike, progress: Progress = None) -> bytearray:
    """The whole content of ``path``.  Regular files are read into one buffer of their size;
    pipes, FIFOs, sockets and character devices are read until end of file."""
    p = Path(path)
    if not os.fspath(p):
        raise E.StateFileError("empty file name")
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise E.StateFileError(f"{p}: is a directory")
            if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                size = st.st_size if stat.S_ISREG(st.st_mode) else f.seek(0, os.SEEK_END)
                f.seek(0)
                buf = bytearray(size)
                mv = memoryview(buf)
                done = 0
                while done < size:
                    n = f.readinto(mv[done:done + _CHUNK])
                    if not n:
                        break
                    done += n
                    if progress:
                        progress(done, size)
                extra = f.read()  # a file that grew since fstat
                del mv
                if done != size:
                    del buf[done:]
                if extra:
                    buf += extra
                return buf
            out = bytearray()  # a stream: read until EOF (its size is unknown)
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    return out
                out += chunk
                if progress:
                    progress(len(out), 0)
    except E.StateFileError:
        raise
    except OSError as exc:
        raise _oserror(p, exc) from None


def _target(p: Path) -> Path:
    """Where writing ``p`` lands: ``p`` itself, or the final target of a chain of symbolic
    links (which may not exist yet).  Refuses existing targets that are not regular files."""
    t = Path(os.path.realpath(p)) if os.path.islink(p) else p
    try:
        st = os.stat(t)
    except FileNotFoundError:
        return t
    except OSError as exc:
        raise _oserror(p, exc, "cannot write: ") from None
    if stat.S_ISDIR(st.st_mode):
        raise E.StateFileError(f"{p}: cannot write: is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise E.StateFileError(f"{p}: cannot write: {kind} (outputs must be regular files)")
    return t


def atomic_write(path: PathLike, chunks: Iterable[bytes], total: int, progress: Progress = None) -> None:
    """Write ``chunks`` (``total`` bytes, for ``progress(done, total)``) to a temporary file next
    to ``path``'s target and rename it over the target: either the whole new file is there or
    nothing changed.  Through symbolic links; keeps an existing file's mode; regular files only."""
    p = Path(path)
    if not os.fspath(path):
        raise E.StateFileError("empty output file name")
    t = _target(p)
    d = t.parent if str(t.parent) else Path(".")
    try:
        old_mode = stat.S_IMODE(os.stat(t).st_mode)
    except OSError:
        old_mode = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=d)
    except OSError as exc:
        raise _oserror(p, exc, "cannot write: ") from None
    try:
        with os.fdopen(fd, "wb") as f:
            done = 0
            for c in chunks:
                mv = memoryview(c)
                for i in range(0, len(mv), _CHUNK):
                    f.write(mv[i:i + _CHUNK])
                    done += min(_CHUNK, len(mv) - i)
                    if progress:
                        progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        try:
            if old_mode is None:
                mask = os.umask(0)
                os.umask(mask)
                old_mode = 0o666 & ~mask
            os.chmod(tmp, old_mode)
        except OSError:
            pass
        os.replace(tmp, t)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _oserror(p, exc, "cannot write: ") from None
        raise
