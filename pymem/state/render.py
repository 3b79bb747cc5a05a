"""Text pictures of a saved state (``describe()``, ``pymem inspect``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence

from .envelopes import _BUILD_OF_FORMAT
from .layout import _tname, _width
from .sections import KVCell

if TYPE_CHECKING:
    from .saved import _Saved


# ---------------------------------------------------------------------------------------------
# text description
# ---------------------------------------------------------------------------------------------
def _fmt_tokens(toks: Sequence[int], n: int = 12) -> str:
    if len(toks) <= n:
        return "[" + ", ".join(map(str, toks)) + "]"
    return "[" + ", ".join(map(str, toks[:n // 2])) + ", ..., " + ", ".join(map(str, toks[-n // 2 + 1:])) + "]"


def _bar(flags: Sequence[bool], width: int) -> str:
    """Occupancy bar: one char per cell, or per group of cells (# all, + some, . none)."""
    n = len(flags)
    if n <= width:
        return "".join("#" if f else "." for f in flags)
    out = []
    for k in range(width):
        lo, hi = k * n // width, (k + 1) * n // width
        grp = flags[lo:max(hi, lo + 1)]
        s = sum(grp)
        out.append("#" if s == len(grp) else "+" if s else ".")
    return "".join(out)


def _describe(obj: "_Saved", width: int, cells: bool) -> str:
    from .saved import SeqState, Session

    st = obj.state
    L: List[str] = []
    head = obj.what
    if isinstance(obj, Session):
        head += f": ggsn v{obj.version} (state format {st.format}, {_BUILD_OF_FORMAT.get(st.format, '?')})"
    elif isinstance(obj, SeqState):
        head += f": ggsq v{obj.version} (state format {st.format}, {_BUILD_OF_FORMAT.get(st.format, '?')})"
    else:
        head += f" (state format {st.format})"
    L.append(f"{head}, {obj.nbytes} bytes")
    if obj.arch:
        L.append(f"  architecture: {obj.arch}")
    if isinstance(obj, (Session, SeqState)):
        L.append(f"  tokens: {len(obj.tokens)} {_fmt_tokens(obj.tokens)}")
    if st.scope == "seq":
        flag = ", PARTIAL_ONLY" if st.flags & 1 else ""
        L.append(f"  one sequence: {st.seq_id if st.seq_id is not None else '? (not recorded)'}{flag}")
    L.append(f"  memory: {st.layout.describe()} (layout {st.layout.source}), {st.nbytes} bytes")
    seqs = st.sequences()
    if seqs:
        L.append("  sequences:")
        L.append(f"    {'seq':>4}  {'positions':>13}  {'cells':>6}  {'bytes':>10}  where")
        for q, infos in seqs.items():
            for x in infos:
                where = f"section {x.section + 1} ({st.specs[x.section].name or st.specs[x.section].kind})"
                if x.stream is not None:
                    where += f", stream {x.stream}"
                L.append(f"    {q:>4}  {f'{x.pos_min}..{x.pos_max}':>13}  {x.cells:>6}  {x.bytes:>10}  {where}")
    else:
        L.append("  sequences: none (empty memory)")
    for i, (sp, s, off) in enumerate(zip(st.specs, st.sections, st.offsets)):
        L.append(f"  section {i + 1}/{len(st.sections)} {sp.label}: offset {off}, {s.nbytes} bytes")
        if sp.kind == "kv":
            stx = next((x for x in s.streams if x.cells), None)
            L.append(f"    {len(s.streams)} stream{'s' if len(s.streams) != 1 else ''}, "
                     f"{sum(len(x.cells) for x in s.streams)} cells"
                     + (f", v_trans {stx.v_trans}, k_rot {stx.k_rot}, v_rot {stx.v_rot}, {len(stx.layers)} layers"
                        if stx is not None else ""))
            if stx is not None and stx.layers:
                L.append(f"    {'layer':>5} {'model':>5}  {'K type':>6} {'K row':>6} {'n_k':>5}  {'V type':>6} "
                         f"{'V row':>6} {'n_v':>5}")
                for l, Ly in enumerate(stx.layers):
                    ml = sp.layers[l] if sp.layers and l < len(sp.layers) else "-"
                    vrow = f"{Ly.v_row}/el" if stx.v_trans else str(Ly.v_row)
                    nv = Ly.v_embd if stx.v_trans else (_width(Ly.v_type, Ly.v_row) if Ly.v_type is not None else "-")
                    L.append(f"    {l:>5} {ml!s:>5}  {_tname(Ly.k_type):>6} {Ly.k_row:>6} "
                             f"{_width(Ly.k_type, Ly.k_row)!s:>5}  {_tname(Ly.v_type):>6} {vrow:>6} {nv!s:>5}")
            if cells:
                for si, x in enumerate(s.streams):
                    if not x.cells and len(s.streams) > 1:
                        continue
                    L.extend(_picture(si, x.cells, width))
        else:
            L.append(f"    {len(s.cells)} cells, {len(s.layers)} recurrent layers of {s.n_layer}, s_trans {s.s_trans}")
            if s.layers:
                L.append(f"    {'layer':>5} {'model':>5}  {'r type':>6} {'r row':>7}  {'s type':>6} {'s row':>7}")
                for l, Ly in enumerate(s.layers):
                    ml = sp.layers[l] if sp.layers and l < len(sp.layers) else "-"
                    L.append(f"    {l:>5} {ml!s:>5}  {_tname(Ly.r_type):>6} {Ly.r_row:>7}  {_tname(Ly.s_type):>6} "
                             f"{Ly.s_row:>7}" + (f"  p row {Ly.p_row}" if Ly.p_row is not None else ""))
            if cells and s.cells:
                L.append("    cells: " + ", ".join(
                    f"[{i}] pos {c.pos} seq {','.join(map(str, c.seq_ids)) or (st.seq_id if st.seq_id is not None else '-')}"
                    for i, c in enumerate(s.cells[:16])) + (" ..." if len(s.cells) > 16 else ""))
    if obj.trailing:
        L.append(f"  trailing: {len(obj.trailing)} bytes after the state (llama.cpp ignores them in sequence files "
                 "and rejects session files with them)")
    return "\n".join(L)


def _picture(si: int, cells: List[KVCell], width: int) -> List[str]:
    n = len(cells)
    out = [f"    stream {si}: {n} cells" + (f", positions {min(c.pos for c in cells)}..{max(c.pos for c in cells)}"
                                            if cells else "")]
    if not cells:
        return out
    ids = sorted({q for c in cells for q in c.seq_ids})
    scale = "" if n <= width else f" (each char ~{n / width:.1f} cells)"
    out.append(f"      cells 0..{n - 1} in state order{scale}:")
    for q in ids[:16]:
        out.append(f"      seq {q:>3} |{_bar([q in c.seq_ids for c in cells], width)}|")
    if len(ids) > 16:
        out.append(f"      ... {len(ids) - 16} more sequences")
    shared = [len(c.seq_ids) > 1 for c in cells]
    if any(shared):
        out.append(f"      shared  |{_bar(shared, width)}|")
    empty = [not c.seq_ids for c in cells]
    if any(empty):
        out.append(f"      no seq  |{_bar(empty, width)}|")
    return out
