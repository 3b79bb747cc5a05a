"""Parse and rebuild the memory sections of llama.cpp state blobs, in pure
Python, for inspection, diffing, editing and tests.  ``dump(parse(x)) == x`` for every
well-formed section.

A KV section (one ``llama_kv_cache``)::

    u32 n_stream; per stream: u32 cell_count; cells {i32 pos; u32 n_seq_id; [ext x,y,tok];
    i32 ids[n_seq_id]}; u32 v_trans; u32 n_layer; [u32 k_rot; u32 v_rot]  (format 11);
    per layer {i32 k_type; u64 k_row; rows}; per layer V: {i32 type; u64 row; rows}
    or transposed {i32 type; u32 el; u32 n_embd_v_gqa; n_embd_v_gqa x cell_count elements}

A REC section (one recurrent memory)::

    u32 cell_count; cells {i32 pos; u32 n_seq_id; i32 ids[]}; u32 s_trans; u32 n_layer
    (all model layers); per recurrent layer {i32 r_type; u64 r_row; rows [; u64 p_row; rows]};
    per recurrent layer {i32 s_type; u64 s_row; rows}
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

from .._errors import StateError
from .streamrows import row_pieces

__all__ = ["KVCell", "KVLayer", "KVStream", "KVSection", "RecSection", "parse_kv", "parse_rec"]


class _Reader:
    def __init__(self, buf: bytes | memoryview, off: int, what: str, copy: bool = True) -> None:
        self.buf = memoryview(buf)
        self.off = off
        self.what = what
        self.copy = copy

    def _need(self, n: int, name: str) -> None:
        if n < 0 or self.off + n > len(self.buf):
            raise StateError(f"truncated {self.what}: {name} needs {n} bytes at offset {self.off}, "
                             f"{len(self.buf) - self.off} left")

    def u32(self, name: str) -> int:
        self._need(4, name)
        (v,) = struct.unpack_from("<I", self.buf, self.off)
        self.off += 4
        return v

    def i32(self, name: str) -> int:
        self._need(4, name)
        (v,) = struct.unpack_from("<i", self.buf, self.off)
        self.off += 4
        return v

    def u64(self, name: str) -> int:
        self._need(8, name)
        (v,) = struct.unpack_from("<Q", self.buf, self.off)
        self.off += 8
        return v

    def take(self, n: int, name: str) -> bytes:
        self._need(n, name)
        b = self.buf[self.off:self.off + n]
        self.off += n
        return bytes(b) if self.copy else b  # type: ignore[return-value]


@dataclass
class KVCell:
    pos: int
    seq_ids: list[int]
    ext: tuple[int, int, int] | None = None


@dataclass
class KVLayer:
    k_type: int
    k_row: int
    k: bytes                      # cell_count rows of k_row bytes
    v_type: int | None = None
    v_row: int = 0                # untransposed: bytes per cell; transposed: element size
    v_embd: int = 0               # transposed: n_embd_v_gqa
    v: bytes = b""                # untransposed rows, or [v_embd][cell_count] elements


@dataclass
class KVStream:
    cells: list[KVCell] = field(default_factory=list)
    v_trans: int = 0
    k_rot: int = 0
    v_rot: int = 0
    layers: list[KVLayer] = field(default_factory=list)

    def k_row_of(self, layer: int, i: int) -> bytes:
        L = self.layers[layer]
        return L.k[i * L.k_row:(i + 1) * L.k_row]

    def v_row_of(self, layer: int, i: int) -> bytes:
        """Cell i's V row (gathered from the columns when transposed)."""
        L = self.layers[layer]
        if not self.v_trans:
            return L.v[i * L.v_row:(i + 1) * L.v_row]
        n, el = len(self.cells), L.v_row
        return b"".join(L.v[(j * n + i) * el:(j * n + i + 1) * el] for j in range(L.v_embd))


@dataclass
class KVSection:
    streams: list[KVStream]
    format: int = 11
    cell_ext: bool = False
    nbytes: int = 0

    def dump(self) -> bytes:
        return b"".join(self.pieces())

    def pieces(self) -> Iterator[Any]:
        """The bytes of :meth:`dump` as pieces (row data as zero-copy views, or gathered in
        bounded chunks for an edited state: see :mod:`pymem.state.streamrows`)."""
        yield struct.pack("<I", len(self.streams))
        for st in self.streams:
            yield struct.pack("<I", len(st.cells))
            if not st.cells:
                continue
            yield _cell_bytes(st.cells, self.cell_ext)
            yield struct.pack("<II", st.v_trans, len(st.layers))
            if self.format >= 11:
                yield struct.pack("<II", st.k_rot, st.v_rot)
            for L in st.layers:
                yield struct.pack("<iQ", L.k_type, L.k_row)
                yield from row_pieces(L.k)
            for L in st.layers:
                if L.v_type is None:
                    continue
                if st.v_trans:
                    yield struct.pack("<iII", L.v_type, L.v_row, L.v_embd)
                else:
                    yield struct.pack("<iQ", L.v_type, L.v_row)
                yield from row_pieces(L.v)

    def measure(self) -> int:
        """The byte count of :meth:`dump`, without producing the row data."""
        n = 4
        for st in self.streams:
            n += 4
            if not st.cells:
                continue
            n += sum(8 + 4 * len(c.seq_ids) + (12 if self.cell_ext else 0) for c in st.cells)
            n += 8 + (8 if self.format >= 11 else 0)
            for L in st.layers:
                n += 12 + len(L.k)
                if L.v_type is not None:
                    n += 12 + len(L.v)
        return n


def _cell_bytes(cells: list, ext: bool) -> bytes:
    out = []
    for c in cells:
        out.append(struct.pack("<iI", c.pos, len(c.seq_ids)))
        if ext:
            out.append(struct.pack("<iii", *(c.ext or (0, 0, -1))))
        out.append(struct.pack(f"<{len(c.seq_ids)}i", *c.seq_ids))
    return b"".join(out)


def parse_kv(buf: bytes | memoryview, off: int = 0, format: int = 11, cell_ext: bool = False,
             has_v: bool = True, copy: bool = True) -> tuple[KVSection, int]:
    """Parse one KV section at ``off``; returns it and the offset after it.  With ``copy``
    False the row data are zero-copy memoryview slices of ``buf``."""
    r = _Reader(buf, off, "KV section", copy)
    start = off
    n_stream = r.u32("n_stream")
    if n_stream == 0 or n_stream > 256:
        raise StateError(f"KV section at offset {start}: n_stream {n_stream} is not in 1..256")
    streams = []
    for s in range(n_stream):
        st = KVStream()
        cc = r.u32(f"stream {s} cell_count")
        if cc > (len(r.buf) - r.off) // 8:
            raise StateError(f"KV stream {s}: cell_count {cc} is larger than the remaining bytes allow "
                             f"(offset {r.off - 4})")
        streams.append(st)
        if cc == 0:
            continue
        for i in range(cc):
            pos = r.i32(f"stream {s} cell {i} pos")
            n = r.u32(f"stream {s} cell {i} n_seq_id")
            ext = (r.i32("ext.x"), r.i32("ext.y"), r.i32("ext.tok")) if cell_ext else None
            if n > 256:
                raise StateError(f"KV stream {s} cell {i}: n_seq_id {n} > 256 (offset {r.off - 4})")
            ids = [r.i32(f"stream {s} cell {i} seq id") for _ in range(n)]
            st.cells.append(KVCell(pos, ids, ext))
        st.v_trans = r.u32(f"stream {s} v_trans")
        n_layer = r.u32(f"stream {s} n_layer")
        if format >= 11:
            st.k_rot = r.u32(f"stream {s} k_rot")
            st.v_rot = r.u32(f"stream {s} v_rot")
        for l in range(n_layer):
            t = r.i32(f"stream {s} layer {l} k_type")
            row = r.u64(f"stream {s} layer {l} k_row")
            st.layers.append(KVLayer(t, row, r.take(row * cc, f"stream {s} layer {l} K rows")))
        if has_v:
            for l in range(n_layer):
                L = st.layers[l]
                L.v_type = r.i32(f"stream {s} layer {l} v_type")
                if st.v_trans:
                    L.v_row = r.u32(f"stream {s} layer {l} v_el")
                    L.v_embd = r.u32(f"stream {s} layer {l} n_embd_v_gqa")
                    L.v = r.take(L.v_row * L.v_embd * cc, f"stream {s} layer {l} V elements")
                else:
                    L.v_row = r.u64(f"stream {s} layer {l} v_row")
                    L.v = r.take(L.v_row * cc, f"stream {s} layer {l} V rows")
    sec = KVSection(streams, format, cell_ext, r.off - start)
    return sec, r.off


@dataclass
class RecLayer:
    r_type: int
    r_row: int
    r: bytes
    s_type: int = 0
    s_row: int = 0
    s: bytes = b""
    p_row: int | None = None
    p: bytes = b""


@dataclass
class RecSection:
    cells: list[KVCell]
    s_trans: int
    n_layer: int                  # all model layers
    layers: list[RecLayer]        # recurrent layers only
    nbytes: int = 0

    def dump(self) -> bytes:
        return b"".join(self.pieces())

    def pieces(self) -> Iterator[Any]:
        """The bytes of :meth:`dump` as pieces (see :meth:`KVSection.pieces`)."""
        yield struct.pack("<I", len(self.cells))
        yield _cell_bytes(self.cells, False)
        yield struct.pack("<II", self.s_trans, self.n_layer)
        for L in self.layers:
            yield struct.pack("<iQ", L.r_type, L.r_row)
            yield from row_pieces(L.r)
            if L.p_row is not None:
                yield struct.pack("<Q", L.p_row)
                yield from row_pieces(L.p)
        for L in self.layers:
            yield struct.pack("<iQ", L.s_type, L.s_row)
            yield from row_pieces(L.s)

    def measure(self) -> int:
        """The byte count of :meth:`dump`, without producing the row data."""
        n = 4 + sum(8 + 4 * len(c.seq_ids) for c in self.cells) + 8
        for L in self.layers:
            n += 12 + len(L.r) + (8 + len(L.p) if L.p_row is not None else 0) + 12 + len(L.s)
        return n


def parse_rec(buf: bytes | memoryview, off: int, n_recr: int, ple: list[bool] | None = None,
              copy: bool = True) -> tuple[RecSection, int]:
    """Parse one REC section with ``n_recr`` recurrent layers (the count is not in the blob)."""
    r = _Reader(buf, off, "recurrent section", copy)
    start = off
    cc = r.u32("cell_count")
    if cc > (len(r.buf) - r.off) // 8:
        raise StateError(f"recurrent cell_count {cc} is larger than the remaining bytes allow (offset {off})")
    cells = []
    for i in range(cc):
        pos = r.i32(f"cell {i} pos")
        n = r.u32(f"cell {i} n_seq_id")
        if n > 256:
            raise StateError(f"recurrent cell {i}: n_seq_id {n} > 256 (offset {r.off - 4})")
        cells.append(KVCell(pos, [r.i32(f"cell {i} seq id") for _ in range(n)]))
    s_trans = r.u32("s_trans")
    n_layer = r.u32("n_layer")
    layers = []
    for l in range(n_recr):
        t = r.i32(f"recurrent layer {l} r_type")
        row = r.u64(f"recurrent layer {l} r_row")
        L = RecLayer(t, row, r.take(row * cc, f"recurrent layer {l} r rows"))
        if ple and ple[l]:
            L.p_row = r.u64(f"recurrent layer {l} p_row")
            L.p = r.take(L.p_row * cc, f"recurrent layer {l} p rows")
        layers.append(L)
    for l in range(n_recr):
        L = layers[l]
        L.s_type = r.i32(f"recurrent layer {l} s_type")
        L.s_row = r.u64(f"recurrent layer {l} s_row")
        L.s = r.take(L.s_row * cc, f"recurrent layer {l} s rows")
    return RecSection(cells, s_trans, n_layer, layers, r.off - start), r.off
