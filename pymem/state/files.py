"""File input and output for saved states."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from .. import _errors as E
from .envelopes import PathLike, Progress, _CHUNK


# ---------------------------------------------------------------------------------------------
# containers
# ---------------------------------------------------------------------------------------------
def read_file(path: PathLike, progress: Progress = None) -> bytearray:
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise E.StateFileError(f"{p}: is a directory")
        buf = bytearray(size)
        mv = memoryview(buf)
        done = 0
        with open(p, "rb") as f:
            while done < size:
                n = f.readinto(mv[done:done + _CHUNK])
                if not n:
                    break
                done += n
                if progress:
                    progress(done, size)
        if done != size:
            del mv
            buf = buf[:done]
        return buf
    except FileNotFoundError:
        raise E.StateFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise E.StateFileError(f"{p}: is a directory") from None
    except PermissionError:
        raise E.StateFileError(f"{p}: permission denied") from None
    except OSError as exc:
        raise E.StateFileError(f"{p}: {exc.strerror or exc}") from None


def atomic_write(path: PathLike, chunks: Iterable[bytes], total: int, progress: Progress = None) -> None:
    """Write to a temporary file next to ``path`` and rename it over ``path``: either the whole
    new file is there or nothing changed."""
    p = Path(path)
    d = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=d)
    except OSError as exc:
        raise E.StateFileError(f"{p}: cannot write: {exc.strerror or exc}") from None
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
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        except OSError:
            pass
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise E.StateFileError(f"{p}: cannot write: {exc.strerror or exc}") from None
        raise
