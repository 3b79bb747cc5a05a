"""What an offline edit does to a saved state's token list, and which edits change nothing.

llama-cli (``llama_state_save_file``) and llama-server (``--slot-save-path``,
``llama_state_seq_save_file``) save one sequence whose cells hold positions ``0..n-1`` next
to the ``n`` tokens at those positions; they continue with ``llama_decode`` at
``n_past = len(tokens)``.  An edit that moves or removes cells must move the tokens with
them, or the next decode fails ("Y = X + 1").  :func:`follow` does that when the token list
*maps* to the cache (token ``i`` is at position ``i`` of the only sequence) before and after
the edit; where it cannot (several sequences, holes, positions merged by ``seq_div``) it
leaves the list as it was (``truncate`` still cuts it) and says why.

The operations are replayed on a light model of the cells (position + sequence ids per
cell; one cell per position per stream) that also names the operations that change nothing
(absent sequence, empty range) and the ``seq_add`` / ``seq_div`` calls that move cells
shared with other sequences (their positions move too).  The real edit runs in pymem's C
core; :func:`follow` cross-checks the model against the state it wrote.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .mapped import same_bytes
from .memstate import MemoryState

__all__ = ["follow", "mapped_sequence", "replay"]

_INF = 1 << 62


def _positions(state: MemoryState, seq: Optional[int]) -> Tuple[List[int], List[int], Set[int]]:
    """(positions of ``seq`` in the first KV section, positions of its recurrent cells, all
    sequence ids of the state)."""
    ids = set(state.seq_ids())
    kv: List[int] = []
    kvs = state.kv_sections()
    if kvs:
        for st in kvs[0][1].streams:
            kv.extend(c.pos for c in st.cells if seq in c.seq_ids)
    rec: List[int] = []
    r = state.rec_section()
    if r is not None:
        for c in r.cells:
            if seq in c.seq_ids or (not c.seq_ids and state.scope == "seq"):
                rec.append(c.pos)
    return sorted(kv), rec, ids


def mapped_sequence(state: MemoryState, n_tokens: int, seq: Optional[int] = None) -> Tuple[Optional[int], str]:
    """``(s, "")`` when ``n_tokens`` tokens map to sequence ``s`` of ``state`` (the only
    sequence, its KV cells at positions 0..n-1 once each, its recurrent cell at n-1), else
    ``(None, why)``.  ``seq``: the sequence of a one-sequence state whose bytes do not record
    it."""
    ids = set(state.seq_ids())
    if seq is not None and state.scope == "seq":
        ids.add(seq)
    if not ids:
        return (seq if seq is not None else 0, "") if n_tokens == 0 else \
            (None, f"the cache is empty but the file holds {n_tokens} tokens")
    if len(ids) > 1:
        return None, f"the state holds several sequences ({', '.join(map(str, sorted(ids)))})"
    s = next(iter(ids))
    kv, rec, _ = _positions(state, s)
    if state.kv_sections() and kv != list(range(n_tokens)):
        if not kv:
            return None, f"sequence {s} has no attention cells"
        return None, (f"sequence {s} holds positions {_ranges(kv)}, not 0..{n_tokens - 1} "
                      f"(one per token of the {n_tokens} in the file)")
    if state.rec_section() is not None and any(p != n_tokens - 1 for p in rec):
        return None, f"the recurrent state of sequence {s} is at position {rec[0] if rec else '?'}, " \
                     f"not {n_tokens - 1}"
    return s, ""


def _ranges(pos: Sequence[int]) -> str:
    out: List[List[int]] = []
    for p in sorted(set(pos)):
        if out and out[-1][1] == p - 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    txt = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in out[:6])
    return txt + (", ..." if len(out) > 6 else "")


# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------
class _Cell:
    __slots__ = ("tok", "pos", "seqs", "stream")

    def __init__(self, tok: int, pos: int, seqs: Set[int], stream: int) -> None:
        self.tok, self.pos, self.seqs, self.stream = tok, pos, seqs, stream


def _rng(p0: int, p1: int) -> Tuple[int, int]:
    return (0 if p0 < 0 else p0), (_INF if p1 < 0 else p1)


def replay(cells: List[_Cell], ops: Sequence[Any], unified: bool = True) -> List[str]:
    """Apply ``ops`` to ``cells`` (in place) as llama.cpp's KV cache would; returns a note for
    every operation that changed nothing or moved cells shared with other sequences."""
    notes: List[str] = []
    for op in ops:
        a = op.args
        changed = False
        if op.name in ("seq_rm", "truncate"):
            s, (p0, p1) = (-1, _rng(a[0], -1)) if op.name == "truncate" else (a[0], _rng(a[1], a[2]))
            for c in cells:
                if p0 <= c.pos < p1 and (s == -1 or s in c.seqs):
                    if s == -1:
                        c.seqs = set()
                    else:
                        c.seqs = c.seqs - {s}
                    changed = True
            why = _why_nothing(cells, s, a[1] if op.name == "seq_rm" else a[0], a[2] if op.name == "seq_rm" else -1)
        elif op.name == "seq_cp":
            src, dst, (p0, p1) = a[0], a[1], _rng(a[2], a[3])
            if src != dst:
                new = []
                for c in cells:
                    if src in c.seqs and p0 <= c.pos < p1:
                        if unified:
                            if dst not in c.seqs:
                                c.seqs = c.seqs | {dst}
                                changed = True
                        else:
                            new.append(_Cell(c.tok, c.pos, {dst}, dst))
                            changed = True
                if not unified:
                    for c in cells:
                        if c.stream == dst and dst in c.seqs:
                            c.seqs = c.seqs - {dst}
                    cells.extend(new)
            why = "source and destination are the same sequence" if src == dst else _why_nothing(cells, src, a[2], a[3])
        elif op.name == "seq_keep":
            for c in cells:
                if c.seqs and c.seqs != {a[0]}:
                    c.seqs = c.seqs & {a[0]}
                    changed = True
            why = "no other sequence holds cells"
        elif op.name == "seq_mv":
            src, dst = a
            for c in cells:
                if src in c.seqs and src != dst:
                    c.seqs = (c.seqs - {src}) | {dst}
                    if not unified:
                        c.stream = dst
                    changed = True
            why = "source and destination are the same sequence" if src == dst else _why_nothing(cells, src, -1, -1)
        elif op.name in ("seq_add", "seq_div"):
            s, (p0, p1), d = a[0], _rng(a[1], a[2]), a[3]
            hit = [c for c in cells if s in c.seqs and p0 <= c.pos < p1]
            shared = sorted({q for c in hit for q in c.seqs if q != s})
            if shared and unified:
                notes.append(f"{op}: moves {sum(1 for c in hit if len(c.seqs) > 1)} cells shared with sequence"
                             f"{'s' if len(shared) > 1 else ''} {', '.join(map(str, shared))}, whose positions "
                             "move too")
            for c in hit:
                new_pos = c.pos + d if op.name == "seq_add" else c.pos // max(d, 1)
                if new_pos != c.pos:
                    changed = True
                c.pos = new_pos
                if c.pos < 0:
                    c.seqs = set()
            if hit and not changed:
                why = "delta 0" if op.name == "seq_add" else "divisor 1"
            else:
                why = _why_nothing(cells, s, a[1], a[2])
        else:  # pragma: no cover
            continue
        cells[:] = [c for c in cells if c.seqs]
        if not changed:
            notes.append(f"{op} changed nothing: {why}")
    return notes


def _why_nothing(cells: List[_Cell], s: int, p0: int, p1: int) -> str:
    if p1 >= 0 and p0 >= 0 and p1 <= p0:
        return f"the range [{p0}, {p1}) is empty"
    if s >= 0 and not any(s in c.seqs for c in cells):
        return f"sequence {s} holds no cells"
    if s == -1 and not cells:
        return "the cache is empty"
    pos = [c.pos for c in cells if s == -1 or s in c.seqs]
    who = "any sequence" if s == -1 else f"sequence {s}"
    return f"{who} holds no cells in [{max(p0, 0)}, {'end' if p1 < 0 else p1}) (it holds {_ranges(pos)})"


def _cells_of(state: MemoryState, seq_hint: Optional[int]) -> Tuple[List[_Cell], bool]:
    """The model's cells: the first KV section's (stream = index), else the recurrent cells."""
    kvs = state.kv_sections()
    if kvs:
        streams = kvs[0][1].streams
        out = [_Cell(-1, c.pos, set(c.seq_ids), si) for si, st in enumerate(streams) for c in st.cells]
        return out, len(streams) <= 1
    r = state.rec_section()
    out = []
    if r is not None:
        for c in r.cells:
            ids = set(c.seq_ids) or ({seq_hint} if seq_hint is not None else set())
            out.append(_Cell(-1, c.pos, ids, 0))
    return out, True


# ---------------------------------------------------------------------------------------------
# the hook used by edit()
# ---------------------------------------------------------------------------------------------
def follow(old: Any, new: Any, ops: Sequence[Any], seq: Optional[int], tokens: List[int]) -> None:
    """Update ``new`` (the edited copy of the saved state ``old``; ``ops`` already in the form
    that ran, ``seq`` the sequence of a one-sequence state, ``tokens`` the token list the edit
    would otherwise keep) in place: its token list follows the cache when it maps; sets
    ``new.token_sync`` (a JSON-able dict) and ``new.noop`` (notes on operations that changed
    nothing), and adds the notes on shared cells and unmapped tokens to ``new.edit_notes``."""
    st: MemoryState = old.state
    cells, unified = _cells_of(st, seq)
    notes = replay(cells, ops, unified)
    noop = [n for n in notes if " changed nothing: " in n]
    shared = [n for n in notes if n not in noop]
    changed = not same_bytes(old, new)
    if not changed:
        noop.append("the edit changed nothing: the output equals the input")
    new.noop = noop
    new.edit_notes = list(new.edit_notes or []) + shared
    info: Dict[str, Any] = {"before": None, "after": None, "mapped": None, "note": None}
    new.token_sync = info
    if not hasattr(old, "tokens"):
        return
    old_toks = list(old.tokens)
    info["before"] = len(old_toks)
    info["after"] = len(new.tokens)
    if not changed:
        info["mapped"] = mapped_sequence(st, len(old_toks), seq)[0] is not None
        return
    s, why = mapped_sequence(st, len(old_toks), seq)
    if s is None:
        info["mapped"] = False
        if old_toks:
            info["note"] = (f"tokens not updated ({len(old_toks)} -> {len(new.tokens)}): they do not map to the "
                            f"cache: {why}; llama.cpp cannot continue this file at n_past = len(tokens)")
        return
    if not st.kv_sections():   # recurrent only: one cell per sequence, at its last position
        t, _ = mapped_sequence(new.state, len(old_toks), seq)
        if not new.state.seq_ids() and not (new.state.rec_section() and new.state.rec_section().cells):
            new.tokens, info["mapped"], info["after"] = [], True, 0
        elif t is not None:
            new.tokens, info["mapped"], info["after"] = old_toks, True, len(old_toks)
        else:
            info["mapped"] = False
            info["note"] = (f"tokens not updated ({len(old_toks)} -> {len(new.tokens)}): the recurrent state no "
                            "longer ends at the last token's position; llama.cpp cannot continue this file at "
                            "n_past = len(tokens)")
        return
    mcells, munified = _cells_of(st, seq)
    for c in mcells:   # token index = position (the list maps)
        if s in c.seqs:
            c.tok = c.pos
    replay(mcells, ops, munified)
    ids = sorted({q for c in mcells for q in c.seqs})
    mine = sorted((c for c in mcells if c.tok >= 0), key=lambda c: c.pos)
    why2 = ""
    if len(ids) > 1:
        why2 = f"after the edit the state holds several sequences ({', '.join(map(str, ids))})"
    elif [c.pos for c in mine] != list(range(len(mine))):
        why2 = f"after the edit the sequence holds positions {_ranges([c.pos for c in mine])}, not 0..{len(mine) - 1}"
    if not why2:
        cand = [old_toks[c.tok] for c in mine]
        t, why3 = mapped_sequence(new.state, len(cand), ids[0] if ids else seq)
        if t is None:
            why2 = f"the edited cache does not match the replayed edit ({why3})"
    if why2:
        info["mapped"] = False
        info["note"] = (f"tokens not updated ({len(old_toks)} -> {len(new.tokens)}): {why2}; llama.cpp cannot "
                        "continue this file at n_past = len(tokens)")
        return
    new.tokens = cand
    info["mapped"] = True
    info["after"] = len(cand)
