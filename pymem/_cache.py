"""pymem's cache folder: ``$PYMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pymem``, else ``~/.cache/pymem``.

Used for the metadata-only shape files (:mod:`pymem.shapes`), the llama.cpp compatibility copy
(:mod:`pymem.llama._loader`) and the test oracle's tiny models.  Importing it loads nothing."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "cache_dir"]


def cache_root() -> Path:
    """pymem's private cache folder ($PYMEM_CACHE_DIR, $XDG_CACHE_HOME/pymem, ~/.cache/pymem)."""
    env = os.environ.get("PYMEM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "pymem"
    return Path.home() / ".cache" / "pymem"


def cache_dir(name: str) -> Path:
    """The sub-folder ``name`` of :func:`cache_root` (not created)."""
    return cache_root() / name
