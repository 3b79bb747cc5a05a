"""The memory kinds, in one table: name, the C core's kind id, the class, and the parts in the
order the C core numbers them and the state writes them (KV parts, then the recurrent part).

Everything that needs to know the kinds reads this table: ``Memory.kind`` and
``Memory.breakdown()``, the state layouts (section names, the section pattern a whole state of
each kind has), the planner's memory specs and the memory a spec or a saved state builds.

Adding a memory type (after the C core has it): a row here, a class in :mod:`pymem.memory`
with a ``_from_parts`` constructor, and its kind in :meth:`pymem.gguf.Hparams.memory_kind` if
models can ask for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from . import _errors as E

__all__ = ["Kind", "KINDS", "by_name", "by_id", "by_pattern"]


@dataclass(frozen=True)
class Kind:
    """One memory kind."""

    name: str                  # "kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"
    c_id: int                  # pm_mem_kind (PM_MEM_KV = 1, ...)
    class_name: str            # the pymem class
    kv_parts: Tuple[str, ...]  # names of the KV parts, in C part order (part index = position)
    recurrent: bool            # has a recurrent part (after the KV parts)

    @property
    def parts(self) -> Tuple[str, ...]:
        """Every part's name, in state order: also the state's section names."""
        return self.kv_parts + (("recurrent",) if self.recurrent else ())

    @property
    def pattern(self) -> Tuple[str, ...]:
        """The section kinds of a whole state: "kv" per KV part, then "rec"."""
        return ("kv",) * len(self.kv_parts) + (("rec",) if self.recurrent else ())

    @property
    def cls(self) -> Any:
        """The pymem class (looked up on :mod:`pymem.memory` at call time)."""
        from . import memory

        return getattr(memory, self.class_name)


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("kv", 1, "KVCache", ("kv",), False),
    Kind("iswa", 2, "KVCacheISWA", ("base", "swa"), False),
    Kind("recurrent", 3, "RecurrentMemory", (), True),
    Kind("hybrid", 4, "HybridMemory", ("attn",), True),
    Kind("hybrid_iswa", 5, "HybridISWAMemory", ("base", "swa"), True),
)}

_BY_ID = {k.c_id: k for k in KINDS.values()}
_BY_PATTERN = {k.pattern: k for k in KINDS.values()}


def by_name(name: str) -> Kind:
    """The kind called ``name``; InvalidArgumentError naming the known kinds otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise E.InvalidArgumentError(f"unknown memory kind {name!r} (one of {', '.join(KINDS)})") from None


def by_id(c_id: int) -> Optional[Kind]:
    return _BY_ID.get(c_id)


def by_pattern(pattern: Tuple[str, ...]) -> Optional[Kind]:
    """The kind whose whole state has this section pattern (e.g. ("kv", "kv", "rec"))."""
    return _BY_PATTERN.get(tuple(pattern))

