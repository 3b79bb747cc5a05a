"""Byte budget with LRU eviction that never leaves a hole in a chain.

Every entry names its parent (the block it chains from).  Only entries that no present entry
names as parent (leaves) are evicted, the least recently used first; when a leaf goes, its parent
may become a leaf in turn.  Pinned entries are never evicted (nor, therefore, their ancestors)."""
from __future__ import annotations

import heapq
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from .backends.base import Backend, Entry

__all__ = ["evict_to_budget", "orphans"]


def _children(entries: Iterable[Entry]) -> Dict[str, int]:
    kids: Dict[str, int] = {}
    for e in entries:
        if e.parent:
            kids[e.parent] = kids.get(e.parent, 0) + 1
    return kids


def evict_to_budget(backend: Backend, budget: int,
                    on_delete: Optional[Callable[[str], None]] = None) -> Tuple[int, int]:
    """Delete least recently used leaves until the total size is within ``budget``.
    Returns (entries deleted, bytes freed); ``on_delete(key)`` is called for each."""
    total = backend.total_bytes()
    if total <= budget:
        return 0, 0
    entries = {e.key: e for e in backend.scan()}
    total = sum(e.size for e in entries.values())
    kids = _children(entries.values())
    heap: List[Tuple[float, float, str]] = []
    for e in entries.values():
        if not e.pinned and kids.get(e.key, 0) == 0:
            heap.append((e.last_used, -e.n_tokens, e.key))
    heapq.heapify(heap)
    n = freed = 0
    while total > budget and heap:
        _, _, key = heapq.heappop(heap)
        e = entries.pop(key, None)
        if e is None:
            continue
        backend.delete([key])
        if on_delete is not None:
            on_delete(key)
        total -= e.size
        freed += e.size
        n += 1
        p = e.parent
        if p and p in entries:
            kids[p] -= 1
            pe = entries[p]
            if kids[p] == 0 and not pe.pinned:
                heapq.heappush(heap, (pe.last_used, -pe.n_tokens, p))
    return n, freed


def orphans(entries: Iterable[Entry]) -> Set[str]:
    """Keys of entries whose chain has a hole (an ancestor is missing)."""
    es = {e.key: e for e in entries}
    bad: Set[str] = set()
    state: Dict[str, bool] = {}

    def ok(k: str) -> bool:
        path = []
        cur = k
        while True:
            if cur in state:
                good = state[cur]
                break
            e = es.get(cur)
            if e is None:
                good = False
                break
            path.append(cur)
            if not e.parent:
                good = True
                break
            cur = e.parent
            if cur in path:  # a cycle cannot happen with hashes; treat as broken
                good = False
                break
        for p in path:
            state[p] = good
        return state.get(k, good)

    for k, e in es.items():
        if e.parent and not ok(k):
            bad.add(k)
    return bad
