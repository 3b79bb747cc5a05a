"""The restore path of a plain KV cache: block values read straight to their places in the blob.

A restored prefix of ``n`` tokens is ``n // B`` full blocks and perhaps a tail.  Every block of a
prefix has the same payload header (its layer layout), so once the headers of the first block are
read (one small ``pread`` on the embedded backend) the place of every byte of every block in the
assembled ``llama_state_seq_get_data`` blob is known: their K rows (and untransposed V rows) are
read by the backend directly into the blob (one ``preadv`` per block on the embedded backend), the
rest (envelope, payload header, transposed V, checksum) into
small reused buffers.  The checksum is then taken over the pieces while they are still in the
CPU's cache.  Compared with fetching each value and copying it into the blob, this saves one copy
of every byte.  Any disagreement (size, envelope, layout, checksum) is a corrupt value, handled
like one found by :meth:`Store._fetch` (deleted, the restore retried); the blob is the store's
scratch buffer, so nothing outside changes on failure.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, List, Tuple

import numpy as np

from . import assemble as A
from . import keys as K
from . import values as V
from .._native import check, ffi, lib
from .backends.base import Backend
from .errors import CorruptValueError

if TYPE_CHECKING:  # pragma: no cover
    from .store import Store, _Ctx, _Plan

__all__ = ["applies", "gather_kv"]


def applies(lay: A.Layout, n: int, block_tokens: int) -> bool:
    """A plain KV cache (one full-attention part, nothing else) restoring two or more blocks."""
    return lay.roles == ["full"] and not lay.recurrent and n >= 2 * block_tokens


def gather_kv(st: "Store", c: "_Ctx", toks: np.ndarray, p: "_Plan", seq_id: int) -> Any:
    """The sequence blob of the first ``p.n`` tokens (a memoryview of the store's buffer)."""
    B, n = st.block_tokens, p.n
    src = p.tail_src or n
    chain = K.Chain(c.seed, B, toks[:max(n, src)])
    # block 0's headers fix the layout of every block of the prefix; then every block, block 0
    # included, is read the same way
    key0 = chain.block(0)
    scatter = type(st.backend).get_scattered is not Backend.get_scattered
    try:
        p0, v0 = _first_layout(st, key0, c, scatter)
    except CorruptValueError as exc:
        st._corrupt(key0, exc)
    head = struct.pack("<Ii", A.SEQ_MAGIC, int(seq_id))
    stream = min(max(int(seq_id), 0), p0.n_stream - 1) if p0.n_stream > 1 else 0
    sl = A.StreamLayout.of(p0, n, c.lay.format, len(head), 4 * stream, 4 * (p0.n_stream - 1 - stream))
    out, buf = sl.start(p0, seq_id, head, p0.n_stream, st._buf)
    reader = _BlockReader(st, p0, sl, out, scatter)
    reader.read(key0, 0, c.seed, v0)
    for i in range(1, n // B):
        reader.read(chain.block(i), i, c.seed)
    st.backend.touch(reader.keys)
    if n % B:
        (q,) = st._tail(c, chain, n, src)
        if q.header() != p0.header():
            raise CorruptValueError("blocks of one prefix disagree on the layer layout")
        sl.put(buf, q, n // B * B)
    return out


def _first_layout(st: "Store", key: bytes, c: "_Ctx", scatter: bool) -> Tuple[A.PartData, Any]:
    """Block 0's payload headers checked and parsed (a PartData without rows), from
    its first bytes (backends that read in place) or from its value (the others, which also
    hand it back, so that it is fetched once)."""
    n_layer = len(c.lay.has_v[0])
    hl = V.HEADER + A.header_len(n_layer)
    value: Any = None
    if scatter:
        if len(st._gather_head) < hl:
            st._gather_head = bytearray(hl)
        head = memoryview(st._gather_head)[:hl]
        size = st.backend.get_head(key.hex(), head)
    else:
        value = st.backend.get(key.hex(), touch=False)
        size = None if value is None else len(value)
        head = memoryview(value)[:hl] if value is not None else None
    if size is None:
        raise KeyError(key.hex())
    V.open_header(head, size)          # magic, version, size (the reader checks the rest of it)
    if size < hl:
        raise CorruptValueError(f"block 0 of {size} bytes is shorter than its headers")
    p0 = A.block_layout(head[V.HEADER:hl], n_layer)
    if p0.n != st.block_tokens:
        raise CorruptValueError("block 0 holds the wrong number of cells")
    return p0, value


def copy_hash(runs: Any, digest: Any, n_runs: int = -1, out: Any = None) -> None:
    """Run pm_copy_hash128 over ``runs`` (an (n, 6) uint64 array of pm_copy_run: src, dst,
    n_rows, row_bytes, src_stride, dst_stride; or a ``pm_copy_run *`` with ``n_runs``);
    CorruptValueError unless the XXH3-128 of the sources equals ``digest`` (16 bytes)."""
    if n_runs < 0:
        runs, n_runs = ffi.from_buffer("pm_copy_run[]", runs), len(runs)
    out = out if out is not None else ffi.new("uint8_t[16]")
    check(lib.pm_copy_hash128(runs, n_runs, out))
    if ffi.buffer(out)[:] != bytes(digest):
        raise CorruptValueError("checksum mismatch")


def _addr(buf: Any) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


class _BlockReader:
    """Reads full blocks 1, 2, ... of one prefix into their places (see the module docstring).

    Each block is one pm_copy_hash128 call over a table of runs (envelope, ext words, every
    layer's K rows and V data, in value order) whose addresses move by a fixed step per block:
    ``src = src0 + i * src_step (+ the value's address)``, ``dst = dst0 + i * dst_step``."""

    def __init__(self, st: "Store", p0: A.PartData, sl: A.StreamLayout, out: Any, scatter: bool) -> None:
        self.st, self.p0, self.sl = st, p0, sl
        B = p0.n
        L = p0.layers
        # payload: u32 n_parts, part header, layer headers, [ext], K rows, V data
        self.phdr_len = A.header_len(len(L))
        self.phdr = A._U32.pack(1) + A._PHDR.pack(B, p0.n_stream, p0.v_trans, len(L), p0.k_rot, p0.v_rot,
                                                  int(p0.cell_ext)) + \
            b"".join(A._LHDR.pack(x.k_type, x.k_row, x.v_type, x.v_row, x.v_embd) for x in L)
        hl = V.HEADER + self.phdr_len
        ext_len = 12 * B if p0.cell_ext else 0
        v_len = [0 if x.v is None else B * x.v_row * (x.v_embd if p0.v_trans else 1) for x in L]
        self.size = hl + ext_len + sum(B * x.k_row for x in L) + sum(v_len) + 16
        # backends with their own scattered read (one preadv) read rows into place; the others
        # hand out the value's bytes, which are copied (either way every byte moves once)
        self.scatter = scatter
        vt = bool(p0.v_trans)
        scratch_len = hl + ext_len + 16 + (sum(v_len) if vt and self.scatter else 0)
        if len(st._gather_scratch) < scratch_len:
            st._gather_scratch = bytearray(scratch_len)
        self.scratch = st._gather_scratch
        mv = memoryview(self.scratch)
        sa, oa = _addr(self.scratch), _addr(out)
        self.out = memoryview(out).cast("B") if not isinstance(out, memoryview) else out
        self.head, self.digest = mv[:hl], mv[hl + ext_len:hl + ext_len + 16]
        # the runs: (src0, src_step, src is in the value, dst0, dst_step, n_rows, row, s_stride, d_stride)
        rows: List[Tuple[int, ...]] = [(sa, 0, 0, 0, 0, 1, hl, 0, 0) if self.scatter else (0, 0, 1, 0, 0, 1, hl, 0, 0)]
        cells = oa + sl.cells + 8                       # ext words 2..4 of each 6-word record
        self.pieces: List[Any] = [self.head]             # the scattered read's buffers (scatter)
        off = hl                                         # offset in the value
        if ext_len:
            self.pieces.append(mv[hl:hl + ext_len])
            src0 = sa + hl if self.scatter else off
            rows.append((src0, 0, int(not self.scatter), cells, B * 24, B, 12, 12, 24))
            off += ext_len
        self.k_places = []
        for x, ko in zip(L, sl.k_off):
            n = B * x.k_row
            self.k_places.append((ko, n))
            if self.scatter:                             # read in place: hash only
                rows.append((oa + ko, n, 0, 0, 0, 1, n, 0, 0))
            else:
                rows.append((off, 0, 1, oa + ko, n, 1, n, 0, 0))
            off += n
        self.v_places = []
        vs = hl + ext_len + 16
        for x, vo, n in zip(L, sl.v_off, v_len):
            if vo is None:
                continue
            if vt:                                       # (v_embd, B * el) -> columns of (v_embd, m * el)
                r = B * x.v_row
                if self.scatter:
                    self.pieces.append(mv[vs:vs + n])
                    rows.append((sa + vs, 0, 0, oa + vo, r, x.v_embd, r, r, sl.m * x.v_row))
                    vs += n
                else:
                    rows.append((off, 0, 1, oa + vo, r, x.v_embd, r, r, sl.m * x.v_row))
            else:
                self.v_places.append((vo, n))
                if self.scatter:
                    rows.append((oa + vo, n, 0, 0, 0, 1, n, 0, 0))
                else:
                    rows.append((off, 0, 1, oa + vo, n, 1, n, 0, 0))
            off += n
        t = np.array(rows, dtype=np.uint64)
        i = np.arange(sl.m // B, dtype=np.uint64)[:, None]
        # every block's runs, made once (hash-only runs have dst 0, step 0); sources inside the
        # value get its address added when it is known
        self.runs = np.empty((sl.m // B, len(rows), 6), np.uint64)
        self.runs[:, :, 0] = t[:, 0] + i * t[:, 1]
        self.runs[:, :, 1] = t[:, 3] + i * t[:, 4]
        self.runs[:, :, 2:] = t[:, 5:]
        self.in_value = t[:, 2].astype(bool)
        self.c_runs = ffi.from_buffer("pm_copy_run[]", self.runs)
        self.c_digest = ffi.new("uint8_t[16]")
        self.keys: List[str] = []           # read without touching: refreshed at once at the end

    def read(self, key: bytes, i: int, seed: bytes, value: Any = None) -> None:
        """Block ``i`` (key ``key``; its value when already fetched) into its place;
        CorruptValueError / KeyError as _fetch."""
        try:
            if self.scatter:
                self._read_scattered(key, i, seed)
            else:
                self._read_copy(key, i, seed, value)
        except CorruptValueError as exc:
            self.st._corrupt(key, exc)
        self.keys.append(key.hex())

    def _check(self, head: Any, size: int, i: int, seed: bytes, key: bytes) -> None:
        if size != self.size:
            raise CorruptValueError(f"block {i} is {size} bytes, the blocks before it {self.size}")
        h = V.open_header(head, size)
        h.check("block", seed, key)
        if h.n_tokens != (i + 1) * self.p0.n or head[V.HEADER:V.HEADER + self.phdr_len] != self.phdr:
            raise CorruptValueError(f"block {i} disagrees with block 0 on its cells or layer layout")

    def _run(self, i: int, vaddr: int, digest: Any) -> None:
        """Block i's runs through pm_copy_hash128; CorruptValueError unless the digest matches."""
        if vaddr:
            runs = self.runs[i].copy()
            runs[self.in_value, 0] += np.uint64(vaddr)
            copy_hash(runs, digest, out=self.c_digest)
        else:
            nr = self.runs.shape[1]
            copy_hash(self.c_runs + i * nr, digest, nr, self.c_digest)

    def _read_scattered(self, key: bytes, i: int, seed: bytes) -> None:
        """The embedded backend: K rows (and untransposed V) read straight into place, the rest
        into the scratch buffer; then one pass copies the rest into place and hashes it all."""
        out = self.out
        places = [out[o + i * n:o + (i + 1) * n] for o, n in self.k_places + self.v_places]
        p = self.pieces
        bufs = p[:1 + bool(self.p0.cell_ext)] + places[:len(self.k_places)] + \
            (p[1 + bool(self.p0.cell_ext):] if self.p0.v_trans else places[len(self.k_places):])
        size = self.st.backend.get_scattered(key.hex(), bufs + [self.digest], touch=False)
        if size is None:
            raise KeyError(key.hex())
        self._check(self.head, size, i, seed, key)
        self._run(i, 0, self.digest)

    def _read_copy(self, key: bytes, i: int, seed: bytes, v: Any) -> None:
        """Backends that hand out the value's bytes (in-process, Redis): one pass copies them
        into place and hashes them."""
        if v is None:
            v = self.st.backend.get(key.hex(), touch=False)
        if v is None:
            raise KeyError(key.hex())
        mv = memoryview(v)
        self._check(mv, len(mv), i, seed, key)
        self._run(i, _addr(v), mv[len(mv) - 16:])
