"""Cut per-sequence state sections into store values, and assemble them back.

A per-sequence section (what ``llama_state_seq_get_data`` writes after its 8-byte envelope, or
``Memory.state_write(seq_id=s)``) is the concatenation of the memory's parts: its KV parts in order
(kv; base + swa; attn; base + swa) and, for recurrent / hybrid kinds, the recurrent section last.

* A **full-attention** KV part (``role == "full"``) keeps one cell per position 0..n-1; it is cut
  into blocks of ``B`` cells (every layer's K rows and V rows of those cells) and a tail.
* The other parts (sliding-window KV parts, the recurrent section) cannot be rebuilt from blocks;
  they are stored verbatim as a *checkpoint* at an exact token count.

Block / tail payload::

    u32 n_full_parts; per part: u32 n_cells, v_trans, n_layer, k_rot, v_rot, cell_ext;
      per layer {i32 k_type; u64 k_row; i32 v_type (-1: none); u64 v_row_or_el; u32 v_embd};
      [i32 ext[n][3]]; per layer {K rows n x k_row}; per layer {V rows n x v_row, or transposed
      V as v_embd x n elements: the section's own layout, so cutting and assembling copy runs of
      whole rows}

Checkpoint payload: ``u32 count; count x {u64 length; raw section bytes}``.
All slicing and assembly use numpy (no Python loop per cell).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .errors import CorruptValueError, StoreError

__all__ = ["Layout", "PartData", "parse_section", "block_payload", "decode_payload", "assemble",
           "ckpt_payload", "decode_ckpt"]

_U32 = struct.Struct("<I")
SEQ_MAGIC = 0xAF143CD8           # llama.cpp's sequence-state envelope (LLAMA_STATE_SEQ_MAGIC)
_PHDR = struct.Struct("<7I")
_LHDR = struct.Struct("<iQiQI")


@dataclass
class Layout:
    """What the assembler needs to know about a memory (from a pymem memory of that layout)."""

    kind: str
    roles: List[str]                 # per KV part: "full" | "swa"
    cell_ext: List[bool]             # per KV part
    has_v: List[List[bool]]          # per KV part, per layer
    format: int
    recurrent: bool

    @classmethod
    def of(cls, mem: Any) -> "Layout":
        from .keys import part_roles

        parts = mem.kv_parts()
        has_v = []
        for p in parts:
            has_v.append([int(p._layers[il][1].n_embd_v_gqa) > 0 for il in p.layers])
        fmt = parts[0].format if parts else 11
        return cls(mem.kind, part_roles(mem), [bool(p.cell_ext) for p in parts], has_v, int(fmt),
                   getattr(mem, "recurrent", None) is not None)

    @property
    def n_full(self) -> int:
        return sum(1 for r in self.roles if r == "full")

    @property
    def needs_ckpt(self) -> bool:
        return self.recurrent or any(r != "full" for r in self.roles)


@dataclass
class LayerData:
    k_type: int
    k_row: int
    v_type: int
    v_row: int                       # untransposed: bytes per cell; transposed: element size
    v_embd: int
    k: np.ndarray                    # (n, k_row) uint8
    v: Optional[np.ndarray]          # (n, v_row); transposed: sections (v_embd, n, el), payloads
                                     # (v_embd, n * el); None: no V


@dataclass
class PartData:
    """One full-attention KV part of a sequence section (zero-copy views) or block payload."""

    n: int
    v_trans: int = 0
    n_stream: int = 1
    stream: int = 0
    k_rot: int = 0
    v_rot: int = 0
    cell_ext: bool = False
    pos: Optional[np.ndarray] = None       # (n,) int32 (sections only)
    ext: Optional[np.ndarray] = None       # (n, 3) int32
    layers: List[LayerData] = field(default_factory=list)

    def header(self) -> tuple:
        return (self.n_stream, self.v_trans, len(self.layers), self.k_rot, self.v_rot, int(self.cell_ext),
                tuple((L.k_type, L.k_row, L.v_type, L.v_row, L.v_embd) for L in self.layers))


class _R:
    def __init__(self, buf: memoryview, off: int, what: str, exc: type = StoreError) -> None:
        self.b, self.o, self.what, self.exc = buf, off, what, exc

    def need(self, n: int) -> None:
        if n < 0 or self.o + n > len(self.b):
            raise self.exc(f"truncated {self.what} at offset {self.o} (needs {n} bytes)")

    def unpack(self, st: struct.Struct) -> tuple:
        self.need(st.size)
        v = st.unpack_from(self.b, self.o)
        self.o += st.size
        return v

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def array(self, n: int, dtype: Any = np.uint8) -> np.ndarray:
        nb = n * np.dtype(dtype).itemsize
        self.need(nb)
        a = np.frombuffer(self.b, dtype=dtype, count=n, offset=self.o)
        self.o += nb
        return a


# ---------------------------------------------------------------------------------------------
# sequence sections
# ---------------------------------------------------------------------------------------------
def _parse_kv(r: _R, cell_ext: bool, has_v: List[bool], fmt: int, keep_data: bool) -> PartData:
    """One KV part of a sequence section: n_stream streams (one per sequence when not unified),
    of which at most one holds the sequence's cells."""
    n_stream = r.u32()
    if not 1 <= n_stream <= 256:
        raise StoreError(f"{r.what}: n_stream {n_stream} is not in 1..256")
    found: Optional[PartData] = None
    for s in range(n_stream):
        p = _parse_stream(r, cell_ext, has_v, fmt)
        if p is None:
            continue
        if found is not None:
            raise StoreError(f"{r.what}: cells in more than one stream")
        p.n_stream, p.stream = n_stream, s
        found = p
    if found is None:
        return PartData(0, n_stream=n_stream, pos=np.zeros(0, np.int32))
    return found


def _parse_stream(r: _R, cell_ext: bool, has_v: List[bool], fmt: int) -> Optional[PartData]:
    cc = r.u32()
    if cc == 0:
        return None
    rec = 6 if cell_ext else 3
    cells = r.array(cc * rec, np.dtype("<i4")).reshape(cc, rec)
    if not np.all(cells[:, 1] == 1):
        raise StoreError(f"{r.what}: cells of a sequence section carry one sequence id each")
    p = PartData(cc, cell_ext=cell_ext, pos=cells[:, 0], ext=cells[:, 2:5] if cell_ext else None)
    if fmt >= 11:
        p.v_trans, n_layer, p.k_rot, p.v_rot = r.unpack(struct.Struct("<4I"))
    else:
        p.v_trans, n_layer = r.unpack(struct.Struct("<2I"))
    if n_layer != len(has_v):
        raise StoreError(f"{r.what}: {n_layer} layers, the layout has {len(has_v)}")
    ks = []
    for _ in range(n_layer):
        t, row = r.unpack(struct.Struct("<iQ"))
        ks.append((t, row, r.array(cc * row).reshape(cc, row) if row else np.zeros((cc, 0), np.uint8)))
    for l in range(n_layer):
        kt, krow, k = ks[l]
        if not has_v[l]:
            p.layers.append(LayerData(kt, krow, -1, 0, 0, k, None))
            continue
        vt = struct.unpack("<i", bytes(r.array(4)))[0]
        if p.v_trans:
            el, ne = r.unpack(struct.Struct("<II"))
            v = r.array(ne * cc * el).reshape(ne, cc, el)
            p.layers.append(LayerData(kt, krow, vt, el, ne, k, v))
        else:
            (row,) = r.unpack(struct.Struct("<Q"))
            v = r.array(cc * row).reshape(cc, row)
            p.layers.append(LayerData(kt, krow, vt, row, 0, k, v))
    return p


@dataclass
class Section:
    full: List[PartData]              # full-attention parts, in order
    raw: List[bytes]                  # non-rebuildable parts (SWA sections, recurrent), in order
    raw_pos: List[Tuple[int, int]]    # (n_cells, pos_max) of each raw part


def parse_section(sec: Any, lay: Layout) -> Section:
    """Split a per-sequence section into its full-attention parts and its raw parts."""
    mv = memoryview(sec).cast("B") if not isinstance(sec, memoryview) else sec
    r = _R(mv, 0, "sequence section")
    full: List[PartData] = []
    raw: List[bytes] = []
    raw_pos: List[Tuple[int, int]] = []
    for i, role in enumerate(lay.roles):
        start = r.o
        p = _parse_kv(r, lay.cell_ext[i], lay.has_v[i], lay.format, role == "full")
        if role == "full":
            full.append(p)
        else:
            raw.append(bytes(mv[start:r.o]))
            raw_pos.append((p.n, int(p.pos.max()) if p.n else -1))
    if lay.recurrent:
        start = r.o
        cc = r.u32()
        pm = -1
        if cc:
            r.need(8)
            pm = struct.unpack_from("<i", mv, r.o)[0]
        raw.append(bytes(mv[start:]))
        raw_pos.append((cc, pm))
        r.o = len(mv)
    if r.o != len(mv):
        raise StoreError(f"sequence section has {len(mv) - r.o} trailing bytes")
    return Section(full, raw, raw_pos)


# ---------------------------------------------------------------------------------------------
# block payloads
# ---------------------------------------------------------------------------------------------
def block_payload(parts: Sequence[PartData], orders: Sequence[np.ndarray], a: int, b: int) -> bytes:
    """The payload of cells with positions [a, b) of every full part (``orders[i]`` = the part's
    cell indices sorted by position)."""
    out: List[Any] = [_U32.pack(len(parts))]
    for p, order in zip(parts, orders):
        idx = order[a:b]
        n = len(idx)
        contiguous = n > 0 and int(idx[-1]) - int(idx[0]) == n - 1 and bool(np.all(np.diff(idx) == 1))
        sl = slice(int(idx[0]), int(idx[0]) + n) if contiguous else idx
        out.append(_PHDR.pack(n, p.n_stream, p.v_trans, len(p.layers), p.k_rot, p.v_rot, int(p.cell_ext)))
        for L in p.layers:
            out.append(_LHDR.pack(L.k_type, L.k_row, L.v_type, L.v_row, L.v_embd))
        if p.cell_ext:
            out.append(np.ascontiguousarray(p.ext[sl], dtype="<i4").tobytes())
        for L in p.layers:
            out.append(L.k[sl].tobytes())
        for L in p.layers:
            if L.v is None:
                continue
            out.append(L.v[:, sl, :].tobytes() if p.v_trans else L.v[sl].tobytes())
    return b"".join(out)


def decode_payload(payload: memoryview, n_full: int) -> List[PartData]:
    """Parse a block / tail payload (zero-copy views)."""
    r = _R(payload, 0, "block value", CorruptValueError)
    n_parts = r.u32()
    if n_parts != n_full:
        raise CorruptValueError(f"block value has {n_parts} parts, the layout {n_full}")
    parts = []
    for _ in range(n_parts):
        p, hdrs = _part_header(r)
        n, v_trans = p.n, p.v_trans
        if p.cell_ext:
            p.ext = r.array(n * 3, np.dtype("<i4")).reshape(n, 3)
        ks = [r.array(n * h[1]).reshape(n, h[1]) for h in hdrs]
        for h, k in zip(hdrs, ks):
            kt, krow, vt, vrow, vembd = h
            if vt == -1:
                p.layers.append(LayerData(kt, krow, vt, vrow, vembd, k, None))
                continue
            if v_trans:  # [v_embd][n] elements, as in the section
                v = r.array(vembd * n * vrow).reshape(vembd, n * vrow)
            else:
                v = r.array(n * vrow).reshape(n, vrow)
            p.layers.append(LayerData(kt, krow, vt, vrow, vembd, k, v))
        parts.append(p)
    if r.o != len(payload):
        raise CorruptValueError(f"block value has {len(payload) - r.o} trailing bytes")
    return parts


def _part_header(r: _R) -> Tuple[PartData, List[tuple]]:
    """The part header of a block / tail payload and its layer headers (k_type, k_row, v_type,
    v_row, v_embd)."""
    n, n_stream, v_trans, n_layer, k_rot, v_rot, ext = r.unpack(_PHDR)
    if not 1 <= n_stream <= 256:
        raise CorruptValueError(f"block value: n_stream {n_stream}")
    hdrs = [r.unpack(_LHDR) for _ in range(n_layer)]
    return PartData(n, v_trans, n_stream, 0, k_rot, v_rot, bool(ext)), hdrs


def header_len(n_layer: int) -> int:
    """Bytes before the rows of a one-part payload of ``n_layer`` layers."""
    return _U32.size + _PHDR.size + n_layer * _LHDR.size


def block_layout(head: memoryview, n_layer: int) -> PartData:
    """The headers of a one-part block payload (its first :func:`header_len` bytes) as a
    PartData without rows: layers have empty ``k`` and ``v`` (``v`` None where there is none)."""
    r = _R(head, 0, "block value", CorruptValueError)
    if r.u32() != 1:
        raise CorruptValueError("block value: not one part")
    p, hdrs = _part_header(r)
    if len(hdrs) != n_layer:
        raise CorruptValueError(f"block value has {len(hdrs)} layers, the layout {n_layer}")
    none = np.zeros((0, 0), np.uint8)
    p.layers = [LayerData(kt, krow, vt, vrow, vembd, none, None if vt == -1 else none)
                for kt, krow, vt, vrow, vembd in hdrs]
    return p


def head_cells(p: PartData, r: int) -> PartData:
    """The first r cells of a decoded block / tail payload (views, no copy)."""
    if r == p.n:
        return p
    q = PartData(r, p.v_trans, p.n_stream, p.stream, p.k_rot, p.v_rot, p.cell_ext,
                 ext=None if p.ext is None else p.ext[:r])
    for L in p.layers:
        if L.v is None:
            v = None
        elif p.v_trans:
            v = L.v[:, :r * L.v_row]
        else:
            v = L.v[:r]
        q.layers.append(LayerData(L.k_type, L.k_row, L.v_type, L.v_row, L.v_embd, L.k[:r], v))
    return q


def ckpt_payload(raw: Sequence[bytes]) -> bytes:
    out: List[bytes] = [_U32.pack(len(raw))]
    for s in raw:
        out.append(struct.pack("<Q", len(s)))
        out.append(s)
    return b"".join(out)


def decode_ckpt(payload: memoryview, n_raw: int) -> List[memoryview]:
    r = _R(payload, 0, "checkpoint value", CorruptValueError)
    n = r.u32()
    if n != n_raw:
        raise CorruptValueError(f"checkpoint has {n} parts, the layout {n_raw}")
    out = []
    for _ in range(n):
        (ln,) = r.unpack(struct.Struct("<Q"))
        r.need(ln)
        out.append(payload[r.o:r.o + ln])
        r.o += ln
    if r.o != len(payload):
        raise CorruptValueError("checkpoint value has trailing bytes")
    return out


# ---------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------
def _assemble_part(chunks: Sequence[PartData], seq_id: int, fmt: int, head: bytes = b"",
                   out_buf: Optional[bytearray] = None) -> Any:
    m = sum(c.n for c in chunks)
    if m == 0:
        return bytearray(head + struct.pack("<II", 1, 0))
    n_stream = chunks[0].n_stream
    stream = min(max(int(seq_id), 0), n_stream - 1) if n_stream > 1 else 0
    # streams before / after the sequence's stream hold no cells (cell_count 0)
    return _assemble_stream(chunks, seq_id, fmt, m, n_stream, head, 4 * stream, 4 * (n_stream - 1 - stream),
                            out_buf)


def _assemble_stream(chunks: Sequence[PartData], seq_id: int, fmt: int, m: int, n_stream: int, head: bytes,
                     empty_before: int, post: int, out_buf: Optional[bytearray] = None) -> Any:
    """One stream holding the m cells: cell_count, cells, then the layer data."""
    h0 = chunks[0].header()
    for c in chunks[1:]:
        if c.header() != h0:
            raise CorruptValueError("blocks of one prefix disagree on the layer layout")
    sl = StreamLayout.of(chunks[0], m, fmt, len(head), empty_before, post)
    out, buf = sl.start(chunks[0], seq_id, head, n_stream, out_buf)
    a = 0
    for c in chunks:
        sl.put(buf, c, a)
        a += c.n
    return out


@dataclass
class StreamLayout:
    """Where everything goes in an assembled sequence blob of one stream of ``m`` cells."""

    m: int
    fmt: int
    head_len: int
    pre: int                          # offset of the stream's cell_count
    post: int                         # bytes of empty streams after it
    size: int                         # bytes up to the end of the stream
    cells: int                        # offset of the cell records
    rec: int                          # int32 words per cell record
    k_off: List[int]                  # per layer: offset of its K rows
    v_off: List[Optional[int]]        # per layer: offset of its V data (None: no V)

    @classmethod
    def of(cls, c0: PartData, m: int, fmt: int, head_len: int, empty_before: int, post: int) -> "StreamLayout":
        rec = 6 if c0.cell_ext else 3
        pre = head_len + 4 + empty_before
        o = pre + 4 + 4 * rec * m + (16 if fmt >= 11 else 8)
        k_off: List[int] = []
        v_off: List[Optional[int]] = []
        for L in c0.layers:
            k_off.append(o + 12)
            o += 12 + m * L.k_row
        for L in c0.layers:
            if L.v is None:
                v_off.append(None)
                continue
            v_off.append(o + 12)
            o += 12 + (m * L.v_row * L.v_embd if c0.v_trans else m * L.v_row)
        return cls(m, fmt, head_len, pre, post, o, pre + 4, rec, k_off, v_off)

    def start(self, c0: PartData, seq_id: int, head: bytes, n_stream: int,
              out_buf: Optional[bytearray]) -> Tuple[Any, np.ndarray]:
        """The blob with everything but the cells' ext words and the rows written: the envelope,
        stream counts, cell records, layer headers (in ``out_buf`` when it is large enough)."""
        size, m, rec = self.size, self.m, self.rec
        if out_buf is not None and len(out_buf) >= size + self.post:
            out: Any = memoryview(out_buf)[:size + self.post]      # every byte is written
        else:
            out = bytearray(size + self.post)
        buf = np.frombuffer(out, np.uint8)
        out[:len(head)] = head
        struct.pack_into("<I", out, len(head), n_stream)
        buf[len(head) + 4:self.pre] = 0       # empty streams before the sequence's (cell_count 0)
        buf[size:] = 0                        # and after it
        struct.pack_into("<I", out, self.pre, m)
        cells = self.cell_records(buf)
        cells[:, 0] = np.arange(m, dtype=np.int32)
        cells[:, 1] = 1
        cells[:, rec - 1] = seq_id
        o = self.cells + 4 * rec * m
        if self.fmt >= 11:
            struct.pack_into("<4I", out, o, c0.v_trans, len(c0.layers), c0.k_rot, c0.v_rot)
        else:
            struct.pack_into("<2I", out, o, c0.v_trans, len(c0.layers))
        for L, ko, vo in zip(c0.layers, self.k_off, self.v_off):
            struct.pack_into("<iQ", out, ko - 12, L.k_type, L.k_row)
            if vo is None:
                continue
            if c0.v_trans:
                struct.pack_into("<iII", out, vo - 12, L.v_type, L.v_row, L.v_embd)
            else:
                struct.pack_into("<iQ", out, vo - 12, L.v_type, L.v_row)
        return out, buf

    def cell_records(self, buf: np.ndarray) -> np.ndarray:
        return buf[self.cells:self.cells + 4 * self.rec * self.m].view("<i4").reshape(self.m, self.rec)

    def v_dst(self, buf: np.ndarray, L: LayerData, vo: int, v_trans: int) -> np.ndarray:
        """Layer V data as (v_embd, m * el) (transposed) or (m, v_row)."""
        if v_trans:
            return buf[vo:vo + L.v_embd * self.m * L.v_row].reshape(L.v_embd, self.m * L.v_row)
        return buf[vo:vo + self.m * L.v_row].reshape(self.m, L.v_row)

    def put(self, buf: np.ndarray, c: PartData, a: int) -> None:
        """Copy chunk ``c`` (cells a .. a + c.n of the stream) into place."""
        if c.cell_ext:
            self.cell_records(buf)[a:a + c.n, 2:5] = c.ext
        for L, ko, vo in zip(c.layers, self.k_off, self.v_off):
            buf[ko + a * L.k_row:ko + (a + c.n) * L.k_row] = L.k.reshape(-1)
            if vo is None:
                continue
            if c.v_trans:
                self.v_dst(buf, L, vo, 1)[:, a * L.v_row:(a + c.n) * L.v_row] = L.v
            else:
                buf[vo + a * L.v_row:vo + (a + c.n) * L.v_row] = L.v.reshape(-1)


def assemble(lay: Layout, blocks: Sequence[List[PartData]], raw: Sequence[Any], seq_id: int,
             out_buf: Optional[bytearray] = None) -> Any:
    """The ``llama_state_seq_get_data`` blob (8-byte envelope + per-sequence section) of a prefix:
    full parts from ``blocks`` (block payloads in position order, the tail last), the other parts
    verbatim from ``raw``.  A plain KV cache is assembled straight into ``out_buf`` when it is
    large enough (the result is then a memoryview of it)."""
    head = struct.pack("<Ii", SEQ_MAGIC, int(seq_id))
    out: List[Any] = []
    fi = ri = 0
    for role in lay.roles:
        if role == "full":
            single = len(lay.roles) == 1 and not lay.recurrent
            out.append(_assemble_part([b[fi] for b in blocks], seq_id, lay.format, b"" if out else head,
                                      out_buf if single else None))
            fi += 1
        else:
            if not out:
                out.append(head)
            out.append(raw[ri])
            ri += 1
    if lay.recurrent:
        if not out:
            out.append(head)
        out.append(raw[ri])
    if len(out) == 1 and not isinstance(out[0], bytes):
        return out[0]
    return bytearray(b"".join(out))
