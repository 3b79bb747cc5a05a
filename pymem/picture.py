"""Cell-occupancy pictures of a saved state, by position: for every KV stream (and the
recurrent cells), one row per sequence showing the positions it holds, which of them are in
cells shared with other sequences, and the holes (positions up to the highest one that no
cell holds).  As text (``pymem inspect``), as a self-contained HTML page (``--html``) and as a
PNG (``--png``; needs matplotlib, the ``pymem[plot]`` extra).

Marks: ``#`` a cell of this sequence alone, ``=`` a cell shared with another sequence, ``.`` no
cell of this sequence; a column that stands for several positions shows ``+`` when only some
of them are held.  The ``holes`` row marks positions no sequence holds.
"""
from __future__ import annotations

import html as _html
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["Occupancy", "occupancy", "text", "write_html", "write_png"]

OWN, SHARED, NONE = 1, 2, 0
COLORS = {OWN: "#2b6cb0", SHARED: "#dd6b20", NONE: "#e2e8f0", "hole": "#c53030"}


@dataclass
class Occupancy:
    """One stream: ``label``, ``n_cells``, ``pos_max``; per sequence the sorted positions it
    holds and the sorted positions among them in shared cells; the sorted positions of all
    cells.  Sparse: a corrupt position of 2**31 costs nothing."""

    label: str
    n_cells: int
    pos_max: int
    held: Dict[int, List[int]] = field(default_factory=dict)
    shared: Dict[int, List[int]] = field(default_factory=dict)
    cells_at: List[int] = field(default_factory=list)

    @property
    def rows(self) -> Dict[int, List[int]]:
        return self.held

    def state(self, q: int, p: int) -> int:
        """OWN, SHARED or NONE for sequence ``q`` at position ``p``."""
        h, s = self.held.get(q, []), self.shared.get(q, [])
        if _count(s, p, p + 1):
            return SHARED
        return OWN if _count(h, p, p + 1) else NONE

    def column(self, q: int, a: int, b: int) -> Tuple[int, bool]:
        """(positions of [a, b) that ``q`` holds, whether any is in a shared cell)."""
        return _count(self.held.get(q, []), a, b), _count(self.shared.get(q, []), a, b) > 0

    def holes_in(self, a: int, b: int) -> int:
        return (b - a) - _count(self.cells_at, a, b)

    @property
    def n_holes(self) -> int:
        return self.holes_in(0, self.pos_max + 1) if self.pos_max >= 0 else 0

    def hole_runs(self) -> List[Tuple[int, int]]:
        """(start, length) of every run of positions 0..pos_max without a cell."""
        out, nxt = [], 0
        for p in self.cells_at:
            if p > nxt:
                out.append((nxt, p - nxt))
            nxt = p + 1
        return out

    def runs(self, q: int, kind: int) -> List[Tuple[int, int]]:
        """(start, length) runs of the positions of ``q`` in own (OWN) or shared (SHARED) cells."""
        sh = set(self.shared.get(q, []))
        pos = [p for p in self.held.get(q, []) if (p in sh) == (kind == SHARED)]
        return _runs_of(pos)

    def ranges(self, q: int) -> str:
        return _ranges(self.held.get(q, []))

    def hole_ranges(self) -> str:
        return ", ".join(str(a) if n == 1 else f"{a}..{a + n - 1}" for a, n in self.hole_runs()[:4]) + \
            (f", ... ({len(self.hole_runs())} runs)" if len(self.hole_runs()) > 4 else "")


def _count(sorted_pos: List[int], a: int, b: int) -> int:
    return bisect_left(sorted_pos, b) - bisect_left(sorted_pos, a)


def _runs_of(pos: Sequence[int]) -> List[Tuple[int, int]]:
    out: List[List[int]] = []
    for p in pos:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return [(a, n) for a, n in out]


def _ranges(pos: Sequence[int]) -> str:
    runs = _runs_of(pos)
    txt = ", ".join(str(a) if n == 1 else f"{a}..{a + n - 1}" for a, n in runs[:4])
    return (txt + (f", ... ({len(runs)} runs)" if len(runs) > 4 else "")) or "-"


def _stream(label: str, cells: List[Any], seq_default: Optional[int] = None) -> Occupancy:
    pos_max = max((c.pos for c in cells), default=-1)
    occ = Occupancy(label, len(cells), pos_max)
    held: Dict[int, set] = {}
    shared: Dict[int, set] = {}
    at = set()
    for c in cells:
        if c.pos < 0:
            continue
        seqs = c.seq_ids or ([seq_default] if seq_default is not None else [])
        if seqs:
            at.add(c.pos)
        for q in seqs:
            held.setdefault(q, set()).add(c.pos)
            if len(seqs) > 1:
                shared.setdefault(q, set()).add(c.pos)
    occ.held = {q: sorted(v) for q, v in sorted(held.items())}
    occ.shared = {q: sorted(shared.get(q, ())) for q in occ.held}
    occ.cells_at = sorted(at)
    return occ


def occupancy(obj: Any) -> List[Occupancy]:
    """The pictures of a saved state (``pymem.state`` object): one per KV stream holding
    cells, and one for the recurrent cells (at their last positions)."""
    st = obj.state
    out: List[Occupancy] = []
    for i, (sp, sec) in enumerate(zip(st.specs, st.sections)):
        name = sp.name or sp.kind
        if sp.kind == "kv":
            for si, x in enumerate(sec.streams):
                if x.cells:
                    lab = f"section {i + 1} ({name})" + (f", stream {si}" if len(sec.streams) > 1 else "")
                    out.append(_stream(lab, x.cells))
        elif sec.cells:
            out.append(_stream(f"section {i + 1} ({name}): recurrent cells at their last position", sec.cells,
                               st.seq_id if st.scope == "seq" else None))
    return out


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def _columns(n: int, width: int) -> List[Tuple[int, int]]:
    if n <= width:
        return [(p, p + 1) for p in range(n)]
    return [(k * n // width, max((k + 1) * n // width, k * n // width + 1)) for k in range(width)]


def _char(occ: Occupancy, q: int, a: int, b: int) -> str:
    n, sh = occ.column(q, a, b)
    if not n:
        return "."
    if n == b - a:
        return "=" if sh else "#"
    return "+"


def text(obj: Any, width: int = 64) -> str:
    """The pictures as text, ``width`` columns wide at most."""
    width = max(8, int(width))
    lines: List[str] = []
    for occ in occupancy(obj):
        n = occ.pos_max + 1
        cols = _columns(n, width)
        per = "" if n <= width else f", 1 column ~ {n / len(cols):.1f} positions"
        lines.append(f"  {occ.label}: {occ.n_cells} cells at positions 0..{occ.pos_max}{per}")
        ruler = [" "] * len(cols)
        step = 10 if len(cols) >= 20 else 5
        for k in range(0, len(cols), step):
            lab = str(cols[k][0])
            if k + len(lab) <= len(cols):
                ruler[k:k + len(lab)] = lab
        lines.append(f"    {'pos':>8}  {''.join(ruler)}")
        for q in list(occ.held)[:16]:
            bar = "".join(_char(occ, q, a, b) for a, b in cols)
            lines.append(f"    {'seq ' + str(q):>8} |{bar}| {occ.ranges(q)}")
        if len(occ.held) > 16:
            lines.append(f"    ... {len(occ.held) - 16} more sequences")
        nh = occ.n_holes
        if nh:
            bar = "".join("o" if occ.holes_in(a, b) else " " for a, b in cols)
            lines.append(f"    {'holes':>8} |{bar}| {nh} position{'s' if nh > 1 else ''} "
                         f"without a cell: {occ.hole_ranges()}")
    if lines:
        lines.append("    # own cell   = cell shared with another sequence   + partly held   . not held   o hole")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#1a202c}
h1{font-size:1.2em}h2{font-size:1em;margin-top:1.5em}
table{border-collapse:collapse}td{padding:0}
td.l{padding-right:.6em;font-family:monospace;white-space:nowrap;text-align:right}
td.r{padding-left:.6em;font-family:monospace;white-space:nowrap;color:#4a5568}
.row{display:flex;height:14px}.row span{flex:1 1 0;min-width:1px;border-right:1px solid #fff}
.key span{display:inline-block;width:12px;height:12px;margin:0 .3em 0 1em;vertical-align:middle}"""


def write_html(obj: Any, path: str, title: str = "", max_cols: int = 1024) -> None:
    """A self-contained HTML page with the pictures of ``obj`` (one column per position, or
    per group of positions beyond ``max_cols``; hover a cell for its positions)."""
    from .state.files import atomic_write

    name = {OWN: "own cell", SHARED: "shared cell", NONE: "not held"}
    parts = [f"<!doctype html><meta charset=utf-8><title>{_html.escape(title or 'pymem')}</title>",
             f"<style>{_CSS}</style><h1>{_html.escape(title)}</h1>",
             f"<p>{_html.escape(obj.what)}, {obj.nbytes} bytes, {_html.escape(obj.layout.describe())}</p>",
             "<p class=key>" + "".join(f"<span style='background:{COLORS[k]}'></span>{name[k]}"
                                       for k in (OWN, SHARED, NONE))
             + f"<span style='background:{COLORS['hole']}'></span>hole (no cell)</p>"]
    for occ in occupancy(obj):
        n = occ.pos_max + 1
        cols = _columns(n, max_cols)
        parts.append(f"<h2>{_html.escape(occ.label)}: {occ.n_cells} cells, positions 0..{occ.pos_max}</h2><table>")

        def row(label: str, spans: List[str], note: str) -> None:
            parts.append(f"<tr><td class=l>{_html.escape(label)}</td><td style='width:{min(1024, 8 * len(cols))}px'>"
                         f"<div class=row>{''.join(spans)}</div></td><td class=r>{_html.escape(note)}</td></tr>")

        for q in occ.held:
            spans = []
            for a, b in cols:
                cnt, sh = occ.column(q, a, b)
                v = SHARED if sh else OWN if cnt else NONE
                where = f"{a}" if b - a == 1 else f"{a}..{b - 1}"
                spans.append(f"<span style='background:{COLORS[v]}' title='seq {q}, pos {where}: {name[v]}'></span>")
            row(f"seq {q}", spans, occ.ranges(q))
        if occ.n_holes:
            spans = [f"<span style='background:{COLORS['hole'] if occ.holes_in(a, b) else '#fff'}'"
                     f" title='pos {a}..{b - 1}'></span>" for a, b in cols]
            row("holes", spans, f"{occ.n_holes} without a cell: {occ.hole_ranges()}")
        parts.append("</table>")
    data = "\n".join(parts).encode()
    atomic_write(path, [data], len(data))


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ._errors import InvalidArgumentError

        raise InvalidArgumentError("PNG output needs matplotlib: python -m pip install 'pymem[plot]'") from None
    return plt


def write_png(obj: Any, path: str, title: str = "") -> None:
    """A PNG of the pictures (matplotlib): one panel per stream, one bar row per sequence."""
    import io

    plt = _pyplot()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    occs = occupancy(obj)
    heights = [max(1, len(o.held) + (1 if o.n_holes else 0)) for o in occs] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, 0.9 + 0.45 * sum(heights) + 0.5 * len(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, occ in zip(axes[:, 0], occs or [None]):
        if occ is None:
            ax.text(0.5, 0.5, "no cells", ha="center", va="center")
            ax.set_axis_off()
            continue
        labels = []
        for y, q in enumerate(occ.held):
            for kind in (OWN, SHARED):
                runs = occ.runs(q, kind)
                if runs:
                    ax.broken_barh(runs, (y - 0.4, 0.8), facecolors=COLORS[kind])
            ax.broken_barh([(0, occ.pos_max + 1)], (y - 0.4, 0.8), facecolors=COLORS[NONE], zorder=0)
            labels.append(f"seq {q}")
        if occ.n_holes:
            y = len(labels)
            ax.broken_barh(occ.hole_runs(), (y - 0.4, 0.8), facecolors=COLORS["hole"])
            labels.append("holes")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        ax.set_xlim(0, occ.pos_max + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{occ.label}: {occ.n_cells} cells, positions 0..{occ.pos_max}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("position")
    fig.legend(handles=[Patch(color=COLORS[OWN], label="own cell"), Patch(color=COLORS[SHARED], label="shared cell"),
                        Patch(color=COLORS[NONE], label="not held"), Patch(color=COLORS["hole"], label="hole")],
               loc="upper right", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title or obj.what, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from .state.files import atomic_write

    data = buf.getvalue()
    atomic_write(path, [data], len(data))

