""":func:`diff`: what differs between two saved states (cells, positions, sequences, rows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from .layout import _tname
from .sections import KVLayer, KVSection, KVStream, RecLayer, RecSection

if TYPE_CHECKING:
    from .saved import _Saved


# ---------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------
@dataclass
class Diff:
    """Result of :func:`diff`: ``same``; ``first`` (the first difference, naming section,
    stream, cell or layer); ``lines`` (every difference found, coarse to fine); ``counts``."""

    same: bool
    first: str = ""
    lines: List[str] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return not self.same

    def text(self) -> str:
        if self.same:
            return "identical"
        out = [f"first difference: {self.first}"]
        if len(self.lines) > 1:
            out.append("differences:")
            out.extend(f"  {x}" for x in self.lines[:40])
            if len(self.lines) > 40:
                out.append(f"  ... and {len(self.lines) - 40} more")
        if self.counts:
            out.append("summary: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        return "\n".join(out)


def _canonical_stream(st: KVStream) -> KVStream:
    n = len(st.cells)
    order = sorted(range(n), key=lambda i: (st.cells[i].pos, st.cells[i].seq_ids, st.cells[i].ext or ()))
    if order == list(range(n)):
        return st
    layers = []
    for L in st.layers:
        k = b"".join(bytes(L.k[i * L.k_row:(i + 1) * L.k_row]) for i in order)
        if L.v_type is None:
            v = L.v
        elif st.v_trans:
            el = L.v_row
            v = b"".join(bytes(L.v[(j * n + i) * el:(j * n + i + 1) * el]) for j in range(L.v_embd) for i in order)
        else:
            v = b"".join(bytes(L.v[i * L.v_row:(i + 1) * L.v_row]) for i in order)
        layers.append(KVLayer(L.k_type, L.k_row, k, L.v_type, L.v_row, L.v_embd, v))
    return KVStream([st.cells[i] for i in order], st.v_trans, st.k_rot, st.v_rot, layers)


def _canonical_rec(s: RecSection) -> RecSection:
    n = len(s.cells)
    order = sorted(range(n), key=lambda i: (s.cells[i].seq_ids, s.cells[i].pos))
    if order == list(range(n)):
        return s
    layers = []
    for L in s.layers:
        def pick(data: Any, row: int) -> bytes:
            return b"".join(bytes(data[i * row:(i + 1) * row]) for i in order)
        layers.append(RecLayer(L.r_type, L.r_row, pick(L.r, L.r_row), L.s_type, L.s_row, pick(L.s, L.s_row),
                               L.p_row, pick(L.p, L.p_row or 0) if L.p_row else L.p))
    return RecSection([s.cells[i] for i in order], s.s_trans, s.n_layer, layers, s.nbytes)


def _first_row(a: Any, b: Any, row: int) -> int:
    """Index of the first differing row of two equally long row arrays."""
    if row <= 0:
        return -1
    n = min(len(a), len(b)) // row
    # linear scan in blocks: memoryview comparison is fast
    step = max(1, (1 << 20) // row)
    for s in range(0, n, step):
        e = min(n, s + step)
        if a[s * row:e * row] != b[s * row:e * row]:
            for i in range(s, e):
                if a[i * row:(i + 1) * row] != b[i * row:(i + 1) * row]:
                    return i
    return -1 if len(a) == len(b) else n


def diff(a: _Saved, b: _Saved, ignore_order: bool = False) -> Diff:
    """Compare two parsed states, coarse to fine: container (type, version, arch, tokens),
    layout, then per section streams, cells (position, sequence ids) and layers (types, row
    sizes, K / V / r / s rows, naming the first differing cell).  ``ignore_order`` compares
    the cells of each stream sorted by (position, sequence ids), rows moved with them: equal
    contents placed in other cells then compare equal."""
    lines: List[str] = []
    counts: Dict[str, int] = {}

    def add(msg: str, key: str, n: int = 1) -> None:
        lines.append(msg)
        counts[key] = counts.get(key, 0) + n

    from .mapped import same_bytes

    if same_bytes(a, b):   # chunk by chunk: no whole copies of large files
        return Diff(True)
    if type(a) is not type(b) or a.what != b.what:
        add(f"container: {a.what} vs {b.what}", "container")
    for attr in ("version", "arch", "envelope", "seq_id"):
        va, vb = getattr(a, attr, None), getattr(b, attr, None)
        if va != vb:
            add(f"container: {attr} {va} vs {vb}", "container")
    ta, tb = getattr(a, "tokens", None), getattr(b, "tokens", None)
    if ta is not None and tb is not None and ta != tb:
        i = next((k for k in range(min(len(ta), len(tb))) if ta[k] != tb[k]), min(len(ta), len(tb)))
        add(f"tokens: {len(ta)} vs {len(tb)} tokens, first difference at token {i}"
            + (f" ({ta[i]} vs {tb[i]})" if i < len(ta) and i < len(tb) else ""), "tokens")
    sa, sb = a.state, b.state
    if sa.format != sb.format:
        add(f"memory: state format {sa.format} vs {sb.format}", "layout")
    if sa.layout.pattern != sb.layout.pattern:
        add(f"memory: layout {sa.layout.describe()} vs {sb.layout.describe()}", "layout")
    else:
        for i, (sp, x, y) in enumerate(zip(sa.specs, sa.sections, sb.sections)):
            name = f"section {i + 1} ({sp.label})"
            if sp.kind == "kv":
                _diff_kv(name, x, y, ignore_order, add)
            else:
                _diff_rec(name, x, y, ignore_order, add)
    if len(a.trailing) != len(b.trailing) or a.trailing != b.trailing:
        add(f"trailing bytes: {len(a.trailing)} vs {len(b.trailing)}", "trailing")
    if not lines:
        return Diff(True, counts={"cells reordered": 1} if ignore_order else {})
    return Diff(False, lines[0], lines, counts)


def _diff_kv(name: str, x: KVSection, y: KVSection, ignore_order: bool, add: Callable) -> None:
    if len(x.streams) != len(y.streams):
        add(f"{name}: {len(x.streams)} vs {len(y.streams)} streams", "streams")
        return
    for s, (p, q) in enumerate(zip(x.streams, y.streams)):
        where = f"{name}, stream {s}"
        if ignore_order:
            p, q = _canonical_stream(p), _canonical_stream(q)
        if len(p.cells) != len(q.cells):
            add(f"{where}: {len(p.cells)} vs {len(q.cells)} cells", "streams")
        n = min(len(p.cells), len(q.cells))
        bad = [i for i in range(n) if p.cells[i] != q.cells[i]]
        if bad:
            i = bad[0]
            add(f"{where}, cell {i}: pos {p.cells[i].pos} seqs {p.cells[i].seq_ids} vs pos {q.cells[i].pos} "
                f"seqs {q.cells[i].seq_ids}" + (f" ({len(bad)} cells differ)" if len(bad) > 1 else ""), "cells", len(bad))
        if not p.cells or not q.cells:
            continue
        if len(p.cells) != len(q.cells):
            _diff_rows_unequal(where, p, q, n, add)
            continue
        for attr in ("v_trans", "k_rot", "v_rot"):
            if getattr(p, attr) != getattr(q, attr):
                add(f"{where}: {attr} {getattr(p, attr)} vs {getattr(q, attr)}", "layers")
        if len(p.layers) != len(q.layers):
            add(f"{where}: {len(p.layers)} vs {len(q.layers)} layers", "layers")
            continue
        for l, (A, B) in enumerate(zip(p.layers, q.layers)):
            if (A.k_type, A.k_row, A.v_type, A.v_row, A.v_embd) != (B.k_type, B.k_row, B.v_type, B.v_row, B.v_embd):
                add(f"{where}, layer {l}: types/rows K {_tname(A.k_type)}/{A.k_row} V {_tname(A.v_type)}/{A.v_row} vs "
                    f"K {_tname(B.k_type)}/{B.k_row} V {_tname(B.v_type)}/{B.v_row}", "layers")
                continue
            if A.k != B.k:
                i = _first_row(A.k, B.k, A.k_row)
                nd = sum(1 for c in range(n) if A.k[c * A.k_row:(c + 1) * A.k_row] != B.k[c * B.k_row:(c + 1) * B.k_row])
                add(f"{where}, layer {l}: K rows differ, first at cell {i} (pos {p.cells[i].pos}), {nd} of {n} cells",
                    "K rows", nd)
            if A.v != B.v:
                if p.v_trans:
                    el = A.v_row
                    nd_cells = sorted({(k // el) % n for k in range(0, len(A.v), el) if A.v[k:k + el] != B.v[k:k + el]})
                    i = nd_cells[0]
                    nd = len(nd_cells)
                else:
                    i = _first_row(A.v, B.v, A.v_row)
                    nd = sum(1 for c in range(n) if A.v[c * A.v_row:(c + 1) * A.v_row] != B.v[c * B.v_row:(c + 1) * B.v_row])
                add(f"{where}, layer {l}: V rows differ, first at cell {i} (pos {p.cells[i].pos}), {nd} of {n} cells",
                    "V rows", nd)


def _diff_rows_unequal(where: str, p: KVStream, q: KVStream, n: int, add: Callable) -> None:
    """Rows of the first n cells of two streams with different cell counts."""
    if len(p.layers) != len(q.layers) or p.v_trans != q.v_trans:
        add(f"{where}: layers {len(p.layers)} vs {len(q.layers)}, v_trans {p.v_trans} vs {q.v_trans}", "layers")
        return
    for l, (A, B) in enumerate(zip(p.layers, q.layers)):
        if (A.k_type, A.k_row, A.v_type, A.v_row) != (B.k_type, B.k_row, B.v_type, B.v_row):
            add(f"{where}, layer {l}: types/rows differ", "layers")
            continue
        for what, get in (("K", p.k_row_of), ("V", p.v_row_of)):
            other = q.k_row_of if what == "K" else q.v_row_of
            if what == "V" and A.v_type is None:
                continue
            bad = [i for i in range(n) if get(l, i) != other(l, i)]
            if bad:
                add(f"{where}, layer {l}: {what} rows differ, first at cell {bad[0]} (pos {p.cells[bad[0]].pos}), "
                    f"{len(bad)} of the first {n} cells", f"{what} rows", len(bad))


def _diff_rec(name: str, x: RecSection, y: RecSection, ignore_order: bool, add: Callable) -> None:
    if ignore_order:
        x, y = _canonical_rec(x), _canonical_rec(y)
    if len(x.cells) != len(y.cells):
        add(f"{name}: {len(x.cells)} vs {len(y.cells)} cells", "cells")
    n = min(len(x.cells), len(y.cells))
    bad = [i for i in range(n) if x.cells[i] != y.cells[i]]
    if bad:
        i = bad[0]
        add(f"{name}, cell {i}: pos {x.cells[i].pos} seqs {x.cells[i].seq_ids} vs pos {y.cells[i].pos} "
            f"seqs {y.cells[i].seq_ids}", "cells", len(bad))
    if x.n_layer != y.n_layer or len(x.layers) != len(y.layers):
        add(f"{name}: n_layer {x.n_layer}/{len(x.layers)} vs {y.n_layer}/{len(y.layers)}", "layers")
        return
    if len(x.cells) != len(y.cells):
        return
    for l, (A, B) in enumerate(zip(x.layers, y.layers)):
        for what, ra, rb, da, db in (("r", A.r_row, B.r_row, A.r, B.r), ("s", A.s_row, B.s_row, A.s, B.s),
                                     ("p", A.p_row or 0, B.p_row or 0, A.p, B.p)):
            if ra != rb:
                add(f"{name}, recurrent layer {l}: {what} row {ra} vs {rb} bytes", "layers")
            elif da != db:
                i = _first_row(da, db, ra)
                add(f"{name}, recurrent layer {l}: {what} rows differ, first at cell {i}", f"{what} rows")
