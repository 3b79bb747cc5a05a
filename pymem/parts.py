"""The parts of a memory: :class:`KVPart` (a KV cache: layout, zero-copy K / V views, cell
metadata, KQ masks) and :class:`RecurrentPart` (recurrent state rows and cells).  A part holds
its memory's :class:`~pymem._guard.Guard`, through which every C call goes."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _errors as E
from ._guard import Guard, u32
from ._native import ffi, lib
from .batch import UBatch
from .params import _NON_CAUSAL, _SWA, _enum, type_id, type_name

__all__ = ["KVPart", "RecurrentPart"]

_DTYPES = {0: ("<f4", 4), 1: ("<f2", 2), 30: ("<u2", 2)}


class KVPart:
    """The KV cache part of a memory (the memory itself for a KVCache; base / swa / attn
    parts of composites): its layout, zero-copy views of K and V, cell metadata, KQ masks."""

    def __init__(self, guard: Guard, part: int) -> None:
        self._init_part(guard, part)

    def _init_part(self, guard: Guard, part: int) -> None:
        self._guard = guard
        self._part = part
        info = ffi.new("pm_kv_info *")
        guard.call("info", lib.pm_kv_info_get, part, info)
        self.size: int = info.size
        self.n_stream: int = info.n_stream
        self.n_seq_max: int = info.n_seq_max
        self.type_k: str = type_name(info.type_k)
        self.type_v: str = type_name(info.type_v)
        self.v_trans: bool = bool(info.v_trans)
        self.unified: bool = info.n_stream == 1
        self.n_swa: int = info.n_swa
        self.swa_type: str = {v: k for k, v in _SWA.items()}[info.swa_type]
        self.k_rot: int = info.k_rot
        self.v_rot: int = info.v_rot
        self.format: int = info.format
        self.cell_ext: bool = bool(info.cell_ext)
        self._type_k_id = info.type_k
        self._type_v_id = info.type_v
        self._layers: dict[int, tuple[int, Any]] = {}
        for l in range(info.n_layer):
            li = ffi.new("pm_kv_layer_info *")
            guard.call("info", lib.pm_kv_layer_info_get, part, l, li)
            self._layers[li.il] = (l, li)
        #: every layer has V rows (False for MLA-style caches without V)
        self.has_v: bool = all(li.n_embd_v_gqa > 0 for _, li in self._layers.values())

    @property
    def layers(self) -> list[int]:
        """Model layer ids held by this cache."""
        return sorted(self._layers)

    def _layer(self, layer: int) -> tuple[int, Any]:
        try:
            return self._layers[int(layer)]
        except KeyError:
            raise E.InvalidArgumentError(f"model layer {layer} is not held by this cache "
                                         f"(holds {self.layers})") from None

    def _view(self, layer: int, stream: int, which: int) -> np.ndarray:
        idx, li = self._layer(layer)
        if not 0 <= stream < self.n_stream:
            raise E.InvalidArgumentError(f"stream {stream} of {self.n_stream}")
        ptr = ffi.new("uint8_t **")
        nbytes = ffi.new("uint64_t *")
        g = self._guard
        with g.lock:
            g.call("view", lib.pm_kv_tensor, self._part, idx, stream, which, ptr, nbytes)
            tid = self._type_k_id if which == 0 else self._type_v_id
            width = li.n_embd_k_gqa if which == 0 else li.n_embd_v_gqa
            dt = _DTYPES.get(tid)
            if which == 1 and self.v_trans:
                shape, typestr = (width, self.size), dt[0]
            elif dt is not None:
                shape, typestr = (self.size, width), dt[0]
            else:
                row = li.k_row_bytes if which == 0 else li.v_row_bytes
                shape, typestr = (self.size, int(row)), "|u1"
            return g.export(ptr[0], shape, typestr)

    def k(self, layer: int, stream: int = 0) -> np.ndarray:
        """Zero-copy, writable view of K of a MODEL layer and stream: ``[size, n_embd_k_gqa]``
        (float32 / float16 / uint16 for bf16), or raw ``[size, row_bytes]`` uint8 blocks for
        quantized types.  The view keeps the memory alive."""
        return self._view(layer, stream, 0)

    def v(self, layer: int, stream: int = 0) -> np.ndarray:
        """Like :meth:`k`; transposed V (``v_trans``) is ``[n_embd_v_gqa, size]``."""
        return self._view(layer, stream, 1)

    def cells_view(self, stream: int = 0) -> np.ndarray:
        """A copy of the cell metadata of a stream as a record array with fields ``pos``,
        ``shift``, ``seq`` (4 x uint64 bitset) and ``ext`` (x, y, tok)."""
        if not 0 <= stream < self.n_stream:
            raise E.InvalidArgumentError(f"stream {stream} of {self.n_stream}")
        dt = np.dtype([("pos", "<i4"), ("shift", "<i4"), ("seq", "<u8", (4,)), ("ext", "<i4", (3,))])
        pos = np.empty(self.size, np.int32)
        shift = np.empty(self.size, np.int32)
        seq = np.empty((self.size, 4), np.uint64)
        ext = np.empty((self.size, 3), np.int32)
        self._guard.call("cells_view", lib.pm_kv_cells_get, self._part, stream,
                         ffi.from_buffer("pm_pos[]", pos, require_writable=True),
                         ffi.from_buffer("int32_t[]", shift, require_writable=True),
                         ffi.from_buffer("uint64_t[]", seq, require_writable=True),
                         ffi.from_buffer("int32_t[]", ext, require_writable=True))
        out = np.empty(self.size, dt)
        out["pos"], out["shift"], out["seq"], out["ext"] = pos, shift, seq, ext
        return out.view(np.recarray)

    def stream_info(self, stream: int = 0) -> dict:
        """head (next search start), used, used_max_p1 and has_shift of a stream."""
        head = ffi.new("uint32_t *")
        used = ffi.new("uint32_t *")
        mx = ffi.new("uint32_t *")
        hs = ffi.new("bool *")
        stream = u32(stream, "stream", "stream_info")
        self._guard.call("stream_info", lib.pm_kv_stream_get, self._part, stream, head, used, mx, hs)
        return {"head": head[0], "used": used[0], "used_max_p1": mx[0], "has_shift": bool(hs[0])}

    def kq_mask(self, ub: UBatch, causal: bool = True, non_causal: str = "all", alibi: bool = False) -> np.ndarray:
        """The KQ mask llama.cpp builds for this cache and an applied ubatch: float32
        ``[n_stream, n_tokens_per_stream, n_kv]`` of 0 (visible) or -inf."""
        if not isinstance(ub, UBatch):
            raise TypeError(f"kq_mask needs a pymem.UBatch, not {type(ub).__name__}")
        if ub._ctx._guard is not self._guard:
            raise E.InvalidArgumentError("kq_mask: the ubatch belongs to another memory")
        nc = _enum(_NON_CAUSAL, non_causal, "non_causal")
        ns = max(ub.n_stream, 1)
        nk = ffi.new("uint32_t *")
        g, ctx = self._guard, ub._ctx._ptr
        with g.lock:
            g.call_on(ctx, "kq_mask", lib.pm_mctx_kq_mask, ub.index, self._part, bool(causal), 0, False, ffi.NULL, 0,
                      nk, status=False)
            out = np.empty((ns, ub.n_tokens // ns, nk[0]), np.float32)
            g.call_on(ctx, "kq_mask", lib.pm_mctx_kq_mask, ub.index, self._part, bool(causal), nc, bool(alibi),
                      ffi.from_buffer("float[]", out, require_writable=True), out.size, nk)
        return out

    def __repr__(self) -> str:
        return (f"KVPart(layers={self.layers}, size={self.size}, n_stream={self.n_stream}, "
                f"type_k={self.type_k}, type_v={self.type_v}, swa={self.swa_type})")


class RecurrentPart:
    """The recurrent part of a memory: layout, zero-copy views of the r / s (/ p) rows of
    every layer (all snapshot planes: row ``k*size + c`` is plane k of cell c) and cells."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        info = ffi.new("pm_rec_info *")
        guard.call("info", lib.pm_rec_info_get, info)
        self.size: int = info.size
        self.n_seq_max: int = info.n_seq_max
        self.n_rs_seq: int = info.n_rs_seq
        self.type_r: str = type_name(info.type_r)
        self.type_s: str = type_name(info.type_s)
        self._layers: dict[int, tuple[int, Any]] = {}
        for l in range(info.n_layer):
            li = ffi.new("pm_rec_layer_info *")
            guard.call("info", lib.pm_rec_layer_info_get, l, li)
            self._layers[li.il] = (l, li)
        #: the model's layer count (the state's REC section records it)
        self.n_layer_model: int = int(info.n_layer_model)
        #: per held layer (ascending), whether it has p rows (per-layer embeddings)
        self.has_p: tuple[bool, ...] = tuple(bool(self._layers[il][1].row_bytes[2]) for il in sorted(self._layers))

    @property
    def layers(self) -> list[int]:
        return sorted(self._layers)

    def _view(self, layer: int, which: int) -> np.ndarray:
        try:
            idx, li = self._layers[int(layer)]
        except KeyError:
            raise E.InvalidArgumentError(f"model layer {layer} is not a recurrent layer (holds {self.layers})") from None
        ptr = ffi.new("uint8_t **")
        nbytes = ffi.new("uint64_t *")
        g = self._guard
        with g.lock:
            g.call("view", lib.pm_rec_tensor, idx, which, ptr, nbytes)
            tid = type_id(self.type_r if which != 1 else self.type_s)
            row = int(li.row_bytes[which])
            dt = _DTYPES.get(tid)
            if dt is not None:
                shape, typestr = (int(li.n_rows), row // dt[1]), dt[0]
            else:
                shape, typestr = (int(li.n_rows), row), "|u1"
            return g.export(ptr[0], shape, typestr)

    def r(self, layer: int) -> np.ndarray:
        """Zero-copy view of the r rows (conv / token-shift state) of a MODEL layer."""
        return self._view(layer, 0)

    def s(self, layer: int) -> np.ndarray:
        """Zero-copy view of the s rows (SSM / WKV state) of a MODEL layer."""
        return self._view(layer, 1)

    def p(self, layer: int) -> np.ndarray:
        return self._view(layer, 2)

    def info(self) -> dict:
        """head and n of the last placed range, used, rs_z."""
        i = ffi.new("pm_rec_info *")
        self._guard.call("info", lib.pm_rec_info_get, i)
        return {"head": i.head, "n": i.n, "used": i.used, "rs_z": i.rs_z}

    def cells_view(self) -> np.ndarray:
        """A copy of the cells: ``pos``, ``src``, ``src0``, ``tail``, ``seq`` (4 x uint64)."""
        n = self.size
        pos, src, src0, tail = (np.empty(n, np.int32) for _ in range(4))
        seq = np.empty((n, 4), np.uint64)
        rs = np.empty(self.n_seq_max, np.uint32)
        fb = lambda a, t: ffi.from_buffer(t, a, require_writable=True)  # noqa: E731
        self._guard.call("cells_view", lib.pm_rec_cells_get, fb(pos, "pm_pos[]"), fb(src, "int32_t[]"),
                         fb(src0, "int32_t[]"), fb(tail, "int32_t[]"), fb(seq, "uint64_t[]"), fb(rs, "uint32_t[]"))
        dt = np.dtype([("pos", "<i4"), ("src", "<i4"), ("src0", "<i4"), ("tail", "<i4"), ("seq", "<u8", (4,))])
        out = np.empty(n, dt)
        out["pos"], out["src"], out["src0"], out["tail"], out["seq"] = pos, src, src0, tail, seq
        return out.view(np.recarray)

    def rs_idx(self) -> np.ndarray:
        """Pending rollback plane of every sequence (0 = none)."""
        rs = np.empty(self.n_seq_max, np.uint32)
        self._guard.call("rs_idx", lib.pm_rec_cells_get, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                         ffi.from_buffer("uint32_t[]", rs, require_writable=True))
        return rs

    def __repr__(self) -> str:
        return f"RecurrentPart(layers={self.layers}, size={self.size}, n_rs_seq={self.n_rs_seq})"
