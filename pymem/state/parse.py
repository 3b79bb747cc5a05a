"""Parsing memory sections against a :class:`~pymem.state.layout.Layout`, checking them against
the layout, and inferring the layout from the bytes alone (:func:`infer_layout`)."""
from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _kinds as kinds
from .._errors import StateError
from .sections import KVSection, RecSection, parse_kv, parse_rec
from .envelopes import _MAX_SEQ
from .layout import Layout, LayoutAmbiguousError, SectionSpec, _hparams, _tname, _type_info, _width
from .memstate import MemoryState


# ---------------------------------------------------------------------------------------------
# parsing sections
# ---------------------------------------------------------------------------------------------
def _check_kv(sec: KVSection, spec: SectionSpec, where: str, off: int) -> None:
    """Structural sanity beyond what the parser needs (garbage that happens to parse)."""
    first = None
    for s, st in enumerate(sec.streams):
        if not st.cells:
            continue
        for i, c in enumerate(st.cells):
            for q in c.seq_ids:
                if not 0 <= q < _MAX_SEQ:
                    raise StateError(f"{where}: stream {s} cell {i} has sequence id {q} (not in 0..255)")
            if len(set(c.seq_ids)) != len(c.seq_ids):
                raise StateError(f"{where}: stream {s} cell {i} lists a sequence id twice: {c.seq_ids}")
        if st.v_trans not in (0, 1):
            raise StateError(f"{where}: stream {s} v_trans is {st.v_trans} (0 or 1)")
        for name, r in (("k_rot", st.k_rot), ("v_rot", st.v_rot)):
            if r and (r & (r - 1) or r < 16 or r > 1 << 16):
                raise StateError(f"{where}: stream {s} {name} {r} is not 0 or a power of two >= 16")
        for l, L in enumerate(st.layers):
            if not 0 <= L.k_type < 64:
                raise StateError(f"{where}: stream {s} layer {l} K type {L.k_type} is not a ggml type")
            if _type_info(L.k_type) is not None and (L.k_row == 0 or _width(L.k_type, L.k_row) is None):
                raise StateError(f"{where}: stream {s} layer {l} K row of {L.k_row} bytes does not fit type "
                                 f"{_tname(L.k_type)}")
            if L.v_type is None:
                continue
            if not 0 <= L.v_type < 64:
                raise StateError(f"{where}: stream {s} layer {l} V type {L.v_type} is not a ggml type")
            ti = _type_info(L.v_type)
            if st.v_trans:
                if ti is not None and (ti[0] != 1 or ti[1] != L.v_row):
                    raise StateError(f"{where}: stream {s} layer {l} transposed V element size {L.v_row} does not "
                                     f"fit type {_tname(L.v_type)}")
            elif ti is not None and (L.v_row == 0 or _width(L.v_type, L.v_row) is None):
                raise StateError(f"{where}: stream {s} layer {l} V row of {L.v_row} bytes does not fit type "
                                 f"{_tname(L.v_type)}")
        geo = (st.v_trans, st.k_rot, st.v_rot, [(L.k_type, L.k_row, L.v_type, L.v_row, L.v_embd) for L in st.layers])
        if first is None:
            first = (s, geo)
        elif geo != first[1]:
            raise StateError(f"{where}: stream {s} has another layer layout than stream {first[0]}")
    if spec.layers is not None and first is not None and len(first[1][3]) != len(spec.layers):
        raise StateError(f"{where}: {len(first[1][3])} layers in the state, the model's cache has "
                         f"{len(spec.layers)} (a state of another model or memory kind?)")


def _check_rec(sec: RecSection, spec: SectionSpec, where: str) -> None:
    for i, c in enumerate(sec.cells):
        for q in c.seq_ids:
            if not 0 <= q < _MAX_SEQ:
                raise StateError(f"{where}: cell {i} has sequence id {q} (not in 0..255)")
        if len(set(c.seq_ids)) != len(c.seq_ids):
            raise StateError(f"{where}: cell {i} lists a sequence id twice: {c.seq_ids}")
    if sec.s_trans != 0:
        raise StateError(f"{where}: s_trans is {sec.s_trans} (llama.cpp writes 0)")
    if sec.n_layer < len(sec.layers) or sec.n_layer > 4096:
        raise StateError(f"{where}: n_layer {sec.n_layer} cannot hold {len(sec.layers)} recurrent layers")
    if spec.n_layer_model is not None and sec.n_layer != spec.n_layer_model:
        raise StateError(f"{where}: n_layer {sec.n_layer}, the model has {spec.n_layer_model} layers "
                         "(a state of another model?)")
    for l, L in enumerate(sec.layers):
        for what, t, row in (("r", L.r_type, L.r_row), ("s", L.s_type, L.s_row)):
            if not 0 <= t < 64:
                raise StateError(f"{where}: recurrent layer {l} {what} type {t} is not a ggml type")
            if _type_info(t) is not None and row and _width(t, row) is None:
                raise StateError(f"{where}: recurrent layer {l} {what} row of {row} bytes does not fit type "
                                 f"{_tname(t)}")


def _parse_one(mv: memoryview, off: int, spec: SectionSpec, fmt: int, where: str) -> Tuple[Any, int]:
    try:
        if spec.kind == "kv":
            sec, nxt = parse_kv(mv, off, format=fmt, cell_ext=spec.cell_ext, has_v=spec.has_v, copy=False)
            _check_kv(sec, spec, where, off)
        else:
            sec, nxt = parse_rec(mv, off, spec.n_recurrent, list(spec.ple) if spec.ple else None, copy=False)
            _check_rec(sec, spec, where)
    except StateError as exc:
        msg = str(exc)
        if not msg.startswith(where):
            msg = f"{where}: {msg}"
        raise StateError(msg) from None
    return sec, nxt


def _section_where(what: str, i: int, n: int, spec: SectionSpec, off: int) -> str:
    return f"{what}, section {i + 1} of {n} ({spec.label}) at offset {off}"


def _parse_sections(mv: memoryview, off: int, end: int, layout: Layout, fmt: int, what: str
                    ) -> Tuple[List[Any], List[int], int]:
    view = mv[:end]
    secs, offs = [], []
    n = len(layout.sections)
    for i, spec in enumerate(layout.sections):
        sec, nxt = _parse_one(view, off, spec, fmt, _section_where(what, i, n, spec, off))
        secs.append(sec)
        offs.append(off)
        off = nxt
    return secs, offs, off


def infer_layout(data: Any, format: Optional[int] = None, start: int = 0, end: Optional[int] = None,
                 what: str = "state", allow_prefix: bool = False) -> Layout:
    """The section layout of ``data[start:end]`` from the bytes alone: every layout llama.cpp
    can write (KV, KV+KV, REC, KV+REC, KV+KV+REC; any recurrent layer count; cells with or
    without ext; format 11 or 10 unless given) is tried, and exactly one must consume the
    bytes.  Raises :class:`LayoutAmbiguousError` when several do (interpretations that
    differ only where there are no cells count as one), StateError when none does (naming
    the longest attempt and where it stopped).  ``allow_prefix``: if none consumes all the
    bytes, take the one that consumes most (trailing bytes follow)."""
    mv = memoryview(data)
    end = len(mv) if end is None else end
    view = mv[:end]
    fmts = [int(format)] if format else [11, 10]
    found: Dict[tuple, Tuple[int, Layout]] = {}
    best: List[Tuple[int, str]] = [(-1, "")]
    kv_memo: Dict[tuple, Any] = {}

    def fail(off: int, msg: str) -> None:
        if off > best[0][0]:
            best[0] = (off, msg)

    def kv_at(off: int, fmt: int, ext: bool) -> Optional[Tuple[KVSection, int]]:
        key = (off, fmt, ext)
        if key not in kv_memo:
            try:
                kv_memo[key] = _parse_one(view, off, SectionSpec("kv", cell_ext=ext), fmt,
                                          f"KV section at offset {off}")
            except StateError as exc:
                kv_memo[key] = None
                fail(off, str(exc))
        return kv_memo[key]

    def rec_options(off: int) -> List[Tuple[int, RecSection, int]]:
        """The recurrent sections at ``off`` worth keeping: the recurrent layer count is not in
        the bytes, but a section with n layers is its header plus 2n (type, row, rows) records,
        so one scan of the records gives where every n ends; only the n that ends at ``end``
        (or, with allow_prefix, the largest) is parsed and checked in full.  Linear in the
        input."""
        try:
            head, h = parse_rec(view, off, 0, None, copy=False)
        except StateError as exc:
            fail(off, f"recurrent section at offset {off}: {exc}")
            return []
        cc = len(head.cells)
        n_max = min(head.n_layer, 4096)
        ends = [h]                              # ends[k]: offset after k records
        o = h
        while len(ends) <= 2 * n_max and o + 12 <= end:
            row = struct.unpack_from("<Q", view, o + 4)[0]
            if row * cc > end - o - 12:
                break
            o += 12 + row * cc
            ends.append(o)
        ok = [n for n in range(1, n_max + 1) if 2 * n < len(ends)]
        if len(ok) < n_max:                     # the first count whose records run out: its error
            try:
                _parse_one(view, off, SectionSpec("rec", n_recurrent=len(ok) + 1), 11,
                           f"recurrent section at offset {off}")
            except StateError as exc:
                fail(off, str(exc))
        if ok and ends[2 * ok[-1]] != end:
            fail(ends[2 * ok[-1]], f"{end - ends[2 * ok[-1]]} bytes left after a recurrent section with {ok[-1]} "
                                   f"recurrent layers (offset {ends[2 * ok[-1]]})")
        want = [n for n in ok if ends[2 * n] == end] or (ok[-1:] if allow_prefix else [])
        out = []
        for n in want:
            try:
                sec, nxt = _parse_one(view, off, SectionSpec("rec", n_recurrent=n), 11,
                                      f"recurrent section at offset {off}")
            except StateError as exc:
                fail(off, str(exc))
                continue
            out.append((n, sec, nxt))
        return out

    def has_cells(sec: Any) -> bool:
        return any(st.cells for st in sec.streams) if isinstance(sec, KVSection) else bool(sec.cells)

    def record(stop: int, got: Tuple[Tuple[SectionSpec, Any], ...], fmt: int, ext: bool) -> None:
        kv_cells = any(has_cells(sec) for sp, sec in got if sp.kind == "kv")
        sig = tuple((sp.kind, sp.n_recurrent) for sp, _ in got) + ((fmt, ext) if kv_cells else (None, None),)
        if sig not in found:
            lay_fmt = fmt if kv_cells else fmts[0]
            specs = tuple(replace(sp, cell_ext=ext and kv_cells) if sp.kind == "kv" else sp for sp, _ in got)
            found[sig] = (stop, Layout(specs, lay_fmt, None, False, "inferred from the bytes"))

    for fmt in fmts:
        for ext in (False, True):
            stack: List[Tuple[int, Tuple[Tuple[SectionSpec, Any], ...]]] = [(start, ())]
            while stack:
                off, got = stack.pop()
                if got and (off == end or allow_prefix):
                    record(off, got, fmt, ext)
                if off >= end or (got and got[-1][0].kind == "rec"):
                    continue
                for n, sec, nxt in rec_options(off):
                    if nxt == end or allow_prefix:
                        stack.append((nxt, got + ((SectionSpec("rec", n_recurrent=n), sec),)))
                if sum(1 for sp, _ in got if sp.kind == "kv") < 2:
                    r = kv_at(off, fmt, ext)
                    if r is not None:
                        stack.append((r[1], got + ((SectionSpec("kv", cell_ext=ext), r[0]),)))
    cands = [x for x in found.values() if x[0] == end]
    if not cands and allow_prefix and found:
        top = max(x[0] for x in found.values())
        cands = [x for x in found.values() if x[0] == top]
    if not cands:
        off, msg = best[0]
        if off < 0:
            raise StateError(f"{what}: no memory sections found at offset {start}")
        raise StateError(f"{what}: no section layout parses these {end - start} bytes; the longest attempt "
                         f"stopped at offset {off}: {msg}")
    if len(cands) == 1:
        return cands[0][1]
    lays = [c[1] for c in cands]
    raise LayoutAmbiguousError(
        f"{what}: {len(lays)} section layouts parse these bytes: "
        + "; ".join(c.describe() + (" with cell ext" if any(s.cell_ext for s in c.sections) else "") for c in lays)
        + " (give the model, or an explicit layout)", lays)


def _seq_of_cells(secs: List[Any], specs: Sequence[SectionSpec]) -> Optional[int]:
    for sp, s in zip(specs, secs):
        if sp.kind == "kv":
            for st in s.streams:
                for c in st.cells:
                    if c.seq_ids:
                        return c.seq_ids[0]
    return None


def _state_from(sec: bytes, layout: Layout, fmt: int, scope: str, seq_id: Optional[int], flags: int) -> MemoryState:
    secs, offs, end = _parse_sections(memoryview(sec), 0, len(sec), layout, fmt, "state")
    return MemoryState(layout, secs, offs, fmt, scope, seq_id, flags)


def _parse_state(mv: memoryview, off: int, end: int, fmt: Optional[int], model: Any, layout: Any,
                 scope: Optional[str], what: str, allow_trailing: bool = False, arch: Optional[str] = None,
                 seq_id: Optional[int] = None, flags: Optional[int] = None) -> Tuple[MemoryState, int]:
    """Parse the memory sections at ``off``.  Layout: explicit > model > inferred."""
    lay = Layout.coerce(layout)
    candidates: List[Layout] = []
    if lay is not None:
        candidates = [lay]
    elif model is not None:
        hp = _hparams(model)
        if arch is not None and hp.arch != arch:
            raise StateError(f"{what}: saved by a '{arch}' model, the model is '{hp.arch}' "
                             f"(llama.cpp: wrong model arch)")
        full = Layout.from_model(hp)
        candidates = [full]
        if scope != "whole" and flags is None:
            part = Layout.from_model(hp, partial=True)
            if part.sections != full.sections:
                candidates.append(part)
        elif flags is not None and flags & 1:
            candidates = [Layout.from_model(hp, partial=True)]
        src = f"model {Path(os.fspath(model)).name}" if isinstance(model, (str, os.PathLike)) else f"model ({hp.arch})"
        candidates = [replace(c, source=src) for c in candidates]
    elif off == end and off > 0:
        raise StateError(f"truncated {what}: the file ends right after its header, at offset {off}: no memory "
                         "sections follow (llama.cpp writes at least the memory's stream and cell counts there)")
    elif off == end:
        f = fmt or 11
        return MemoryState(Layout((), f, None, False, "empty"), [], [], f, scope or "whole", seq_id, flags or 0), end
    else:
        try:
            candidates = [infer_layout(mv, fmt, off, end, what)]
        except LayoutAmbiguousError:
            raise
        except StateError as exc:
            if not allow_trailing:
                raise
            # trailing bytes, or a truncated / corrupt state?  The bytes alone cannot tell
            try:
                lay = infer_layout(mv, fmt, off, end, what, allow_prefix=True)
                _, _, stop = _parse_sections(mv, off, end, lay, lay.format or fmt or 11, what)
            except StateError:
                raise exc from None
            raise StateError(f"{what}: the bytes parse only partly: as {lay.describe()} up to offset {stop}, "
                             f"leaving {end - stop} bytes: a truncated or corrupt state, or trailing bytes (give "
                             "the model to tell)") from None
    errors: List[StateError] = []
    results = []
    for cand in candidates:
        fmts = [fmt] if fmt else ([cand.format] if cand.format else [11, 10])
        for f in fmts:
            try:
                secs, offs, stop = _parse_sections(mv, off, end, cand, f, what)
            except StateError as exc:
                errors.append(exc)
                continue
            if stop != end and not allow_trailing:
                errors.append(StateError(f"{what}: {end - stop} unexpected bytes after the last section, at offset "
                                         f"{stop} (layout {cand.describe()})"))
                continue
            results.append((stop, cand, f, secs, offs))
    if not results:
        raise _best_error(errors)
    top = max(r[0] for r in results)
    pick = [r for r in results if r[0] == top]

    def kv_cells(r: tuple) -> bool:
        return any(st.cells for sp, sec in zip(r[1].sections, r[3]) if sp.kind == "kv" for st in sec.streams)

    # the format only matters where KV cells are written: otherwise the first one stands
    pick = [r for i, r in enumerate(pick)
            if kv_cells(r) or not any(q[1] is r[1] for q in pick[:i])]
    if len(pick) > 1:
        raise LayoutAmbiguousError(f"{what}: several layouts parse these bytes: "
                                   + "; ".join(f"{r[1].describe()} (format {r[2]})" for r in pick),
                                   [replace(r[1], format=r[2]) for r in pick])
    stop, cand, f, secs, offs = pick[0]
    st = _finish(cand, secs, offs, f, scope, seq_id, flags)
    if model is not None and lay is None:
        from .modelcheck import check_model

        check_model(st, _hparams(model), what)
    return st, stop


def _best_error(errors: List[StateError]) -> StateError:
    def off_of(e: StateError) -> int:
        import re

        m = re.findall(r"offset (\d+)", str(e))
        return max(int(x) for x in m) if m else -1

    return max(errors, key=off_of)


def _finish(lay: Layout, secs: List[Any], offs: List[int], fmt: int, scope: Optional[str],
            seq_id: Optional[int], flags: Optional[int]) -> MemoryState:
    if scope is None:
        rec = next((s for sp, s in zip(lay.sections, secs) if sp.kind == "rec"), None)
        scope = "seq" if rec is not None and rec.cells and all(not c.seq_ids for c in rec.cells) else "whole"
    if scope == "whole" and lay.kind is None:
        # a whole state has every section of its memory: the pattern names the kind
        k = kinds.by_pattern(lay.pattern)
        lay = replace(lay, kind=k.name if k is not None else None)
    if scope == "seq":
        if seq_id is None:
            seq_id = _seq_of_cells(secs, lay.sections)
        if flags is None:
            flags = 1 if lay.partial else 0
    return MemoryState(replace(lay, format=fmt), secs, offs, fmt, scope, seq_id, flags or 0)
