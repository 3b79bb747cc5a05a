""":class:`MemoryState`: the parsed memory sections of one saved state, with per-sequence summaries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .sections import KVSection, KVStream, RecSection
from .layout import Layout, SectionSpec, _tname, _width


# ---------------------------------------------------------------------------------------------
# memory state
# ---------------------------------------------------------------------------------------------
@dataclass
class SeqInfo:
    """One sequence in a section: positions, cells holding it and the data bytes of those
    cells (K+V rows, or r+s rows)."""

    seq_id: int
    pos_min: int
    pos_max: int
    cells: int
    bytes: int
    stream: Optional[int] = None
    section: int = 0

    def as_dict(self) -> Dict[str, Any]:
        d = {"seq_id": self.seq_id, "section": self.section, "pos_min": self.pos_min, "pos_max": self.pos_max,
             "cells": self.cells, "bytes": self.bytes}
        if self.stream is not None:
            d["stream"] = self.stream
        return d


def _kv_cell_bytes(st: KVStream) -> int:
    n = 0
    for L in st.layers:
        n += L.k_row
        if L.v_type is not None:
            n += L.v_row * (L.v_embd if st.v_trans else 1)
    return n


class MemoryState:
    """The memory sections of a state (bare, without envelope), parsed; ``dump()`` gives the
    bytes back.  ``sections`` are :class:`pymem.state.sections.KVSection` /
    :class:`~pymem.state.sections.RecSection` objects whose row data are zero-copy views of the
    source; ``specs`` their :class:`SectionSpec`; ``offsets`` where each started in the
    source; ``scope`` "whole" (a whole-memory state) or "seq" (one sequence's)."""

    def __init__(self, layout: Layout, sections: List[Any], offsets: List[int], format: int, scope: str,
                 seq_id: Optional[int] = None, flags: int = 0) -> None:
        self.layout = layout
        self.sections = sections
        self.offsets = offsets
        self.format = format
        self.scope = scope
        self.seq_id = seq_id
        self.flags = flags

    @property
    def specs(self) -> Tuple[SectionSpec, ...]:
        return self.layout.sections

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sections)

    def chunks(self) -> Iterator[bytes]:
        for s in self.sections:   # pieces, not one joined copy per section (large files)
            yield from s.pieces()

    def dump(self) -> bytes:
        return b"".join(self.chunks())

    # -- queries -----------------------------------------------------------------------------
    def kv_sections(self) -> List[Tuple[SectionSpec, KVSection]]:
        return [(sp, s) for sp, s in zip(self.specs, self.sections) if sp.kind == "kv"]

    def rec_section(self) -> Optional[RecSection]:
        for sp, s in zip(self.specs, self.sections):
            if sp.kind == "rec":
                return s
        return None

    def __repr__(self) -> str:
        seq = f" seq {self.seq_id}" if self.scope == "seq" and self.seq_id is not None else ""
        return (f"<MemoryState {self.scope}{seq}: {self.layout.describe()}, sequences {self.seq_ids()}, "
                f"{self.nbytes} bytes>")

    def seq_ids(self) -> List[int]:
        ids = set()
        for sp, s in zip(self.specs, self.sections):
            cells = [c for st in s.streams for c in st.cells] if sp.kind == "kv" else s.cells
            for c in cells:
                ids.update(c.seq_ids)
        if self.scope == "seq" and self.seq_id is not None and self.rec_section() is not None and \
                self.rec_section().cells:
            ids.add(self.seq_id)
        return sorted(ids)

    def n_stream(self) -> Optional[int]:
        kvs = self.kv_sections()
        return len(kvs[0][1].streams) if kvs else None

    def max_cells(self) -> int:
        """The largest cell count of any KV stream or of the REC section."""
        n = 0
        for sp, s in zip(self.specs, self.sections):
            if sp.kind == "kv":
                n = max([n] + [len(st.cells) for st in s.streams])
            else:
                n = max(n, len(s.cells))
        return n

    def geometry(self) -> Dict[str, Any]:
        """What the bytes say about the memory that wrote them: n_stream, v_trans, K/V types,
        k_rot/v_rot, layer widths per KV section; recurrent layer count, row widths and the
        model's layer count.  Values are None where no cell carries the information."""
        g: Dict[str, Any] = {"kv": [], "rec": None}
        for sp, s in zip(self.specs, self.sections):
            if sp.kind == "kv":
                st = next((x for x in s.streams if x.cells), None)
                d = {"n_stream": len(s.streams), "v_trans": None, "type_k": None, "type_v": None, "k_rot": None,
                     "v_rot": None, "layers": None}
                if st is not None:
                    d.update(v_trans=bool(st.v_trans), k_rot=st.k_rot, v_rot=st.v_rot,
                             layers=[(L.k_type, _width(L.k_type, L.k_row),
                                      L.v_type, (L.v_embd if st.v_trans else _width(L.v_type, L.v_row))
                                      if L.v_type is not None else 0) for L in st.layers])
                    if st.layers:
                        d["type_k"] = st.layers[0].k_type
                        d["type_v"] = st.layers[0].v_type
                g["kv"].append(d)
            else:
                g["rec"] = {"n_layer_model": s.n_layer, "n_recurrent": len(s.layers),
                            "layers": [(L.r_type, _width(L.r_type, L.r_row) if L.r_row else 0,
                                        L.s_type, _width(L.s_type, L.s_row) if L.s_row else 0,
                                        _width(L.r_type, L.p_row) if L.p_row else 0) for L in s.layers]}
        return g

    def sequences(self) -> Dict[int, List[SeqInfo]]:
        """Per sequence id, one :class:`SeqInfo` per section (and stream) holding it."""
        out: Dict[int, List[SeqInfo]] = {}
        for i, (sp, s) in enumerate(zip(self.specs, self.sections)):
            if sp.kind == "kv":
                for si, st in enumerate(s.streams):
                    per = _kv_cell_bytes(st)
                    acc: Dict[int, List[int]] = {}
                    for c in st.cells:
                        for q in c.seq_ids:
                            a = acc.setdefault(q, [c.pos, c.pos, 0])
                            a[0] = min(a[0], c.pos)
                            a[1] = max(a[1], c.pos)
                            a[2] += 1
                    for q, (p0, p1, n) in acc.items():
                        out.setdefault(q, []).append(SeqInfo(q, p0, p1, n, n * per,
                                                             si if len(s.streams) > 1 else None, i))
            else:
                per = sum(L.r_row + L.s_row + (L.p_row or 0) for L in s.layers)
                for c in s.cells:
                    ids = c.seq_ids or ([self.seq_id] if self.scope == "seq" and self.seq_id is not None else [])
                    for q in ids:
                        out.setdefault(q, []).append(SeqInfo(q, c.pos, c.pos, 1, per, None, i))
        return dict(sorted(out.items()))

    def n_cells(self) -> int:
        """Cells over every section and stream."""
        return sum(sum(len(st.cells) for st in s.streams) if sp.kind == "kv" else len(s.cells)
                   for sp, s in zip(self.specs, self.sections))

    def summary(self, cells: Optional[bool] = None) -> Dict[str, Any]:
        """A JSON-able description of every section.  ``cells``: include the cell lists
        ([pos, [seq ids]] per cell; default: when there are at most 4096 cells)."""
        if cells is None:
            cells = self.n_cells() <= 4096
        secs = []
        for i, (sp, s, off) in enumerate(zip(self.specs, self.sections, self.offsets)):
            d: Dict[str, Any] = {"index": i, "name": sp.name or None, "kind": sp.kind, "offset": off,
                                 "bytes": s.nbytes}
            if sp.kind == "kv":
                d["n_stream"] = len(s.streams)
                d["streams"] = []
                for si, st in enumerate(s.streams):
                    sd: Dict[str, Any] = {"stream": si, "cells": len(st.cells)}
                    if st.cells:
                        pos = [c.pos for c in st.cells]
                        sd.update(pos_min=min(pos), pos_max=max(pos), v_trans=st.v_trans, k_rot=st.k_rot,
                                  v_rot=st.v_rot, n_layer=len(st.layers),
                                  shared_cells=sum(1 for c in st.cells if len(c.seq_ids) > 1),
                                  layers=[{
                                      "index": l,
                                      "model_layer": sp.layers[l] if sp.layers and l < len(sp.layers) else None,
                                      "k_type": _tname(L.k_type), "k_row": L.k_row,
                                      "n_embd_k": _width(L.k_type, L.k_row),
                                      "v_type": _tname(L.v_type),
                                      "v_row": None if st.v_trans else L.v_row,
                                      "v_element": L.v_row if st.v_trans else None,
                                      "n_embd_v": L.v_embd if st.v_trans else
                                      (_width(L.v_type, L.v_row) if L.v_type is not None else None),
                                  } for l, L in enumerate(st.layers)])
                        if cells:
                            sd["cell_list"] = [[c.pos, list(c.seq_ids)] + ([list(c.ext)] if c.ext else [])
                                               for c in st.cells]
                        else:
                            sd["cell_list_omitted"] = True
                    d["streams"].append(sd)
            else:
                d.update(cells=len(s.cells), s_trans=s.s_trans, n_layer_model=s.n_layer,
                         n_recurrent=len(s.layers),
                         layers=[{"index": l, "model_layer": sp.layers[l] if sp.layers else None,
                                  "r_type": _tname(L.r_type), "r_row": L.r_row, "s_type": _tname(L.s_type),
                                  "s_row": L.s_row, "p_row": L.p_row} for l, L in enumerate(s.layers)])
                if cells:
                    d["cell_list"] = [[c.pos, list(c.seq_ids)] for c in s.cells]
                else:
                    d["cell_list_omitted"] = True
            secs.append(d)
        seqs = {}
        for q, infos in self.sequences().items():
            seqs[str(q)] = {"pos_min": max(x.pos_min for x in infos) if len(infos) > 1 else infos[0].pos_min,
                            "pos_max": max(x.pos_max for x in infos), "bytes": sum(x.bytes for x in infos),
                            "sections": [x.as_dict() for x in infos]}
        return {"layout": self.layout.describe(), "layout_source": self.layout.source, "format": self.format,
                "scope": self.scope, "bytes": self.nbytes, "sections": secs, "sequences": seqs}
