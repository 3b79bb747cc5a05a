"""Small helpers shared by the backend test files (tests/test_store_backends.py, test_store_fs.py)."""
from __future__ import annotations

import hashlib
from typing import Dict

from pymem.store.backends import Entry


def value_of(key: str, size: int) -> bytes:
    """Deterministic content of ``size`` bytes for ``key`` (so a torn value is detectable)."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def ent(key: str, kind: str = "block", n_tokens: int = 256, parent=None, **kw) -> Entry:
    return Entry(key=key, size=kw.pop("size", 0), kind=kind, n_tokens=n_tokens, parent=parent, **kw)


def snapshot(b) -> Dict[str, tuple]:
    """Every entry with its value (no LRU touch): compare before / after a failing call."""
    return {e.key: (e, b.get(e.key, touch=False)) for e in b.scan()}
