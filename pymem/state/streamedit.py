"""Structure-path edits of large states without holding them in memory.

The current structure path (:meth:`pymem.state.saved._Saved.edit` without a model) builds a
pymem memory of the state's geometry, restores the whole state into it, applies the
operations, writes a new state and parses it: about four times the file in memory.  But
seq_rm / seq_cp / seq_keep / seq_mv / truncate (and shifts of a purely recurrent state) never
change a row: every row of the output is a bitwise copy of one row of the input.  So:

1. a *skeleton* of the state, with the same sections, streams, cells, positions and sequence
   ids but one f32 layer whose single element per cell carries the cell's index (as an
   exactly representable float), runs the same edit in the same kind of memory (the same
   cell placement, refusals, notes and pending stream copies as the full memory: they do
   not depend on the row geometry);
2. its output says, for every output cell, which input cell its rows come from;
3. the output state is the skeleton's cells with the real layer records and row data
   *gathered on demand* from the input's rows (:class:`~pymem.state.streamrows.GatheredRows`,
   zero-copy views of the memory-mapped file), streamed when saved.

Wherever this might not give the exact bytes of the current path it is not used (the caller
falls back): layers of one cache with different types, a PLE row of zero width, a state the
real memory would refuse (checked by building the real geometry with one cell), more than
2**24 cells in a section, any error in the skeleton before the operations, and a skeleton
output that does not map every output cell to exactly one input cell.  ``PYMEM_STREAM_EDIT=0``
turns it off (the tests compare both paths byte for byte).  The model path (K-shifts) is
unchanged.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .. import _errors as E
from .edit import Op, _build_memory, _check_backed, _geometry_memory, _state_read, apply_ops, memory_params
from .layout import Layout, SectionSpec
from .memstate import MemoryState
from .parse import _parse_sections
from .sections import KVLayer, KVSection, KVStream, RecLayer, RecSection
from .streamrows import GatheredRows

__all__ = ["enabled", "run"]

#: cells per section the float tags can name exactly
_MAX_TAG = 1 << 24
_F32 = 0


class _Fallback(Exception):
    """The skeleton trick is not known to be exact here: use the current path."""


def enabled() -> bool:
    return os.environ.get("PYMEM_STREAM_EDIT", "1") not in ("0", "")


def run(obj: Any, ops: Sequence[Op], s_id: int, out_seq: int, flags: int,
        ids: Sequence[int]) -> Optional[Tuple[List[Any], List[str]]]:
    """The edited sections of ``obj`` (row data gathered on demand) and the notes of
    :func:`apply_ops`, or None where the current path must run.  Raises the
    :class:`EditError` of an operation llama.cpp refuses, as the current path does."""
    st: MemoryState = obj.state
    if not enabled() or not st.sections:
        return None
    try:
        _eligible(st)
        p = memory_params(st, ids)
        _check_backed(st, p["n_seq_max"])
        probe = _geometry_memory(st, dict(p, n_ctx=1, n_seq_max=1), obj.arch)   # the real geometry, one cell
        probe.close()
        skel = _skeleton(st)
        mem = _build_memory(skel, None, obj.arch, extra_ids=ids)
    except (_Fallback, E.Error):
        return None
    try:
        try:
            _state_read(mem, skel, s_id, flags, obj.what)
        except E.Error:
            return None
        notes = apply_ops(mem, ops, structure_only=True)   # refusals: the same EditError
        try:
            sec = mem.state_write(seq_id=out_seq, flags=flags) if st.scope == "seq" else mem.state_write()
        except E.Error:
            return None
    finally:
        mem.close()
    try:
        return _assemble(st, skel.layout, sec), notes
    except (_Fallback, E.Error):
        return None


# ---------------------------------------------------------------------------------------------
def _eligible(st: MemoryState) -> None:
    for sp, sec in zip(st.specs, st.sections):
        if sp.kind == "kv":
            t = next((x for x in sec.streams if x.cells), None)
            if t is None:
                continue
            if len({L.k_type for L in t.layers}) > 1 or len({L.v_type for L in t.layers}) > 1:
                raise _Fallback("layers of several types")
            if sum(len(x.cells) for x in sec.streams) >= _MAX_TAG:
                raise _Fallback("too many cells")
        else:
            if len({L.r_type for L in sec.layers}) > 1 or len({L.s_type for L in sec.layers}) > 1:
                raise _Fallback("layers of several types")
            if any(L.p_row == 0 for L in sec.layers) or len(sec.cells) >= _MAX_TAG:
                raise _Fallback("zero-width PLE row")


def _tags(first: int, n: int) -> bytes:
    return np.arange(first + 1, first + n + 1, dtype="<f4").tobytes()


def _skeleton(st: MemoryState) -> MemoryState:
    """The state with one f32 layer whose element per cell is the cell's index + 1 (counted
    over the section's streams)."""
    specs, secs = [], []
    n_kv = sum(1 for sp in st.specs if sp.kind == "kv")
    for sp, sec in zip(st.specs, st.sections):
        if sp.kind == "kv":
            specs.append(SectionSpec("kv", sp.name, cell_ext=sp.cell_ext, has_v=sp.has_v, swa=sp.swa))
            streams, base = [], 0
            for x in sec.streams:
                n = len(x.cells)
                if not n:
                    streams.append(KVStream())
                    continue
                tags = _tags(base, n)
                base += n
                L = KVLayer(_F32, 4, tags)
                if sp.has_v:
                    L.v_type, L.v_row, L.v_embd, L.v = _F32, 4, (1 if x.v_trans else 0), tags
                streams.append(KVStream(x.cells, x.v_trans, 0, 0, [L]))
            new: Any = KVSection(streams, st.format, sp.cell_ext)
        else:
            specs.append(SectionSpec("rec", sp.name, n_recurrent=1))
            tags = _tags(0, len(sec.cells))
            new = RecSection(sec.cells, sec.s_trans, n_kv + 1, [RecLayer(_F32, 4, tags, _F32, 4, tags)])
        new.nbytes = new.measure()
        secs.append(new)
    offs, o = [], 0
    for s in secs:
        offs.append(o)
        o += s.nbytes
    lay = Layout(tuple(specs), st.layout.format, st.layout.kind, st.layout.partial, "skeleton")
    return MemoryState(lay, secs, offs, st.format, st.scope, st.seq_id, st.flags)


def _sources(tagbuf: Any, counts: List[int], other: Any = None) -> Tuple[np.ndarray, np.ndarray]:
    """(input stream, input cell) per output cell, from the skeleton's tags."""
    tags = np.frombuffer(tagbuf, dtype="<f4") if len(tagbuf) else np.zeros(0, "<f4")
    if other is not None and bytes(other) != bytes(tagbuf):
        raise _Fallback("K and V (or r and s) rows of a cell come from different cells")
    ids = tags.astype(np.int64)
    total = sum(counts)
    if not (ids.astype("<f4") == tags).all() or (ids < 1).any() or (ids > total).any():
        raise _Fallback("an output cell whose rows come from no input cell")
    ids -= 1
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    s = np.searchsorted(ends, ids, side="right")
    starts = ends - np.asarray(counts, dtype=np.int64)
    return s.astype(np.int64), ids - starts[s]


def _assemble(st: MemoryState, lay: Layout, sec: bytes) -> List[Any]:
    got, _, end = _parse_sections(memoryview(sec), 0, len(sec), lay, st.format, "skeleton state")
    if end != len(sec) or len(got) != len(st.sections):
        raise _Fallback("skeleton output")
    out: List[Any] = []
    for sp, old, sk in zip(st.specs, st.sections, got):
        if sp.kind == "kv":
            out.append(_kv(sp, old, sk, st.format))
        else:
            out.append(_rec(old, sk))
    return out


def _kv(sp: SectionSpec, old: KVSection, sk: KVSection, fmt: int) -> KVSection:
    if len(sk.streams) != len(old.streams):
        raise _Fallback("stream count")
    t = next((x for x in old.streams if x.cells), None)
    counts = [len(x.cells) for x in old.streams]
    streams = []
    for x in sk.streams:
        if not x.cells:
            streams.append(KVStream())
            continue
        if t is None or x.v_trans != t.v_trans or len(x.layers) != 1:
            raise _Fallback("stream geometry")
        S = x.layers[0]
        src_s, src_c = _sources(S.k, counts, S.v if S.v_type is not None else None)
        used = sorted({int(v) for v in np.unique(src_s)})
        layers = []
        for l, T in enumerate(t.layers):
            k = GatheredRows({s: (old.streams[s].layers[l].k, counts[s]) for s in used}, src_s, src_c, T.k_row)
            v: Any = b""
            if T.v_type is not None:
                v = GatheredRows({s: (old.streams[s].layers[l].v, counts[s]) for s in used}, src_s, src_c, T.v_row,
                                 cols=bool(t.v_trans), embd=T.v_embd)
            layers.append(KVLayer(T.k_type, T.k_row, k, T.v_type, T.v_row, T.v_embd, v))
        streams.append(KVStream(x.cells, t.v_trans, t.k_rot, t.v_rot, layers))
    new = KVSection(streams, fmt, sk.cell_ext)
    new.nbytes = new.measure()
    return new


def _rec(old: RecSection, sk: RecSection) -> RecSection:
    if len(sk.layers) != 1 or sk.s_trans != old.s_trans:
        raise _Fallback("recurrent geometry")
    S = sk.layers[0]
    src_c = _sources(S.r, [len(old.cells)], S.s)[1]
    src_s = np.zeros(len(src_c), np.int64)
    cc = len(old.cells)
    layers = []
    for T in old.layers:
        def g(buf: Any, row: int) -> GatheredRows:
            return GatheredRows({0: (buf, cc)} if len(src_c) else {}, src_s, src_c, row)

        layers.append(RecLayer(T.r_type, T.r_row, g(T.r, T.r_row), T.s_type, T.s_row, g(T.s, T.s_row), T.p_row,
                               g(T.p, T.p_row) if T.p_row is not None else b""))
    new = RecSection(sk.cells, old.s_trans, old.n_layer, layers)
    new.nbytes = new.measure()
    return new
