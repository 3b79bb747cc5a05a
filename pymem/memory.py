"""The memory types: one base class with llama.cpp's memory interface, one subclass per
type.  Every method maps to one call of the C core; errors arrive as pymem exceptions and a
failed call leaves the memory exactly as it was."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _errors as E
from ._native import check, ffi, lib
from .batch import Batch, BatchContext, UBatch

__all__ = [
    "Rope",
    "Memory",
    "KVCache",
    "STATE_PARTIAL_ONLY",
    "STATE_SWA_ONLY",
    "type_id",
    "type_name",
    "row_size",
]

STATE_PARTIAL_ONLY = 1
STATE_SWA_ONLY = 1  # llama.cpp's legacy alias

_SWA = {"none": 0, "standard": 1, "chunked": 2, "symmetric": 3}
_ROPE = {"none": -1, "norm": 0, "normal": 0, "neox": 2, "mrope": 8, "vision": 24, "imrope": 40}
_NON_CAUSAL = {"all": 0, "swa_only": 1, "swa_full": 2}
_ENVELOPE = {None: 0, "none": 0, "llama": 1}


def type_id(t: str | int) -> int:
    """ggml type id of a cache type name ("f16", "q8_0", ...) or id."""
    if isinstance(t, (int, np.integer)):
        if lib.pm_type_block_size(int(t)) == 0:
            raise E.UnsupportedError(f"unsupported cache type id {t}")
        return int(t)
    out = ffi.new("int32_t *")
    check(lib.pm_type_from_name(str(t).lower().encode(), out), "type")
    return out[0]


def type_name(t: int) -> str:
    return ffi.string(lib.pm_type_name(int(t))).decode()


def row_size(t: str | int, n: int) -> int:
    """Bytes of a row of n elements of type t (ggml_row_size)."""
    out = ffi.new("uint64_t *")
    check(lib.pm_type_row_size(type_id(t), int(n), out), "row_size")
    return int(out[0])


def _enum(table: dict, value: Any, what: str) -> int:
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        return table[str(value).lower()]
    except KeyError:
        raise E.InvalidArgumentError(f"unknown {what} {value!r} (one of {', '.join(k for k in table if k)})") from None


@dataclass
class Rope:
    """RoPE parameters of a layer, used by the K-shift (llama.cpp's ggml_rope_ext arguments).

    ``mode``: "norm", "neox" ("mrope"/"imrope" shift with NEOX ordering), or "none" (shifts
    move positions but leave K alone, as llama.cpp does for rope type NONE)."""

    n_rot: int = 0
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    mode: str | int = "norm"
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    freq_factors: Sequence[float] | None = None

    def _fill(self, c: Any, keep: list) -> None:
        c.mode = _enum(_ROPE, self.mode, "rope mode")
        c.n_rot = int(self.n_rot)
        c.freq_base = float(self.freq_base)
        c.freq_scale = float(self.freq_scale)
        c.ext_factor = float(self.ext_factor)
        c.attn_factor = float(self.attn_factor)
        c.beta_fast = float(self.beta_fast)
        c.beta_slow = float(self.beta_slow)
        c.n_ctx_orig = int(self.n_ctx_orig)
        if self.freq_factors is not None:
            ff = np.ascontiguousarray(self.freq_factors, dtype=np.float32)
            keep.append(ff)
            c.n_freq_factors = ff.size
            c.freq_factors = ffi.from_buffer("float[]", ff)


class _Handle:
    """Owns one native pm_memory; views of its tensors hold it alive."""

    __slots__ = ("ptr", "__weakref__")

    def __init__(self, ptr: Any) -> None:
        self.ptr = ffi.gc(ptr, lib.pm_memory_free, size=int(lib.pm_memory_nbytes(ptr)))


class _View:
    """Base object of a zero-copy numpy view: keeps the native memory alive."""

    def __init__(self, handle: _Handle, ptr: Any, shape: tuple, typestr: str, strides: tuple | None) -> None:
        self._handle = handle
        self.__array_interface__ = {
            "version": 3,
            "data": (int(ffi.cast("uintptr_t", ptr)), False),
            "shape": shape,
            "typestr": typestr,
            "strides": strides,
        }


class Memory:
    """llama.cpp's memory interface (``llama_memory_i``), common to every memory type.

    Positions are ranges ``[p0, p1)``; a negative p0 means 0 and a negative p1 means "to the
    end", as in llama.cpp.  Not created directly: use a subclass."""

    _kind_name = "memory"

    def __init__(self, ptr: Any, arch: str | None = None) -> None:
        self._handle: _Handle | None = _Handle(ptr)
        self._lock = threading.RLock()
        self._views: "weakref.WeakSet[_View]" = weakref.WeakSet()
        self.arch = arch

    # -- lifetime ----------------------------------------------------------------------------
    def _live(self) -> Any:
        h = self._handle
        if h is None:
            raise E.InvalidStateError(f"operation on a closed {type(self).__name__}")
        return h.ptr

    def close(self) -> None:
        """Free the native memory now, or when the last numpy view of it is gone."""
        with self._lock:
            h, self._handle = self._handle, None
            if h is not None and len(self._views) == 0:
                ffi.release(h.ptr)

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    # -- sequence operations -------------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (seq_id -1: of all sequences).  Returns
        llama.cpp's answer (recurrent memories refuse partial removals)."""
        out = ffi.new("bool *")
        with self._lock:
            check(lib.pm_mem_seq_rm(self._live(), seq_id, p0, p1, out), "seq_rm")
        return bool(out[0])

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make dst see the cells of src in [p0, p1)."""
        with self._lock:
            check(lib.pm_mem_seq_cp(self._live(), src, dst, p0, p1), "seq_cp")

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but seq_id."""
        with self._lock:
            check(lib.pm_mem_seq_keep(self._live(), seq_id), "seq_keep")

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Move positions [p0, p1) of seq_id by shift; cells pushed below 0 are dropped.  The K
        rotation is pending until :meth:`update`."""
        with self._lock:
            check(lib.pm_mem_seq_add(self._live(), seq_id, p0, p1, shift), "seq_add")

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide positions [p0, p1) of seq_id by d (integer division)."""
        with self._lock:
            check(lib.pm_mem_seq_div(self._live(), seq_id, p0, p1, d), "seq_div")

    def seq_pos_min(self, seq_id: int) -> int:
        out = ffi.new("pm_pos *")
        with self._lock:
            check(lib.pm_mem_seq_pos_min(self._live(), seq_id, out), "seq_pos_min")
        return int(out[0])

    def seq_pos_max(self, seq_id: int) -> int:
        out = ffi.new("pm_pos *")
        with self._lock:
            check(lib.pm_mem_seq_pos_max(self._live(), seq_id, out), "seq_pos_max")
        return int(out[0])

    @property
    def can_shift(self) -> bool:
        with self._lock:
            return bool(lib.pm_mem_can_shift(self._live()))

    @property
    def update_pending(self) -> bool:
        with self._lock:
            return bool(lib.pm_mem_update_pending(self._live()))

    def update(self) -> bool:
        """Apply pending K-shifts and stream copies (what llama.cpp does before a decode).
        Returns whether anything was pending.  Raises ShiftError if a shift cannot be done."""
        out = ffi.new("bool *")
        with self._lock:
            check(lib.pm_mem_update(self._live(), out), "update")
        return bool(out[0])

    def clear(self, data: bool = True) -> None:
        """Empty the memory; with data, also zero every tensor byte."""
        with self._lock:
            check(lib.pm_mem_clear(self._live(), bool(data)), "clear")

    # -- state ---------------------------------------------------------------------------------
    def state_size(self, seq_id: int = -1, flags: int = 0, envelope: str | None = None) -> int:
        """The exact length :meth:`state_write` returns."""
        out = ffi.new("uint64_t *")
        with self._lock:
            check(lib.pm_mem_state_size(self._live(), seq_id, flags, _enum(_ENVELOPE, envelope, "envelope"), out),
                  "state_size")
        return int(out[0])

    def state_write(self, seq_id: int = -1, flags: int = 0, envelope: str | None = None) -> bytes:
        """The state as llama.cpp writes it: the bare memory section by default;
        ``envelope="llama"`` gives ``llama_state_get_data`` (whole) or
        ``llama_state_seq_get_data_ext`` (one sequence) output."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        with self._lock:
            ptr = self._live()
            n = ffi.new("uint64_t *")
            check(lib.pm_mem_state_size(ptr, seq_id, flags, env, n), "state_write")
            buf = bytearray(n[0])
            written = ffi.new("uint64_t *")
            check(lib.pm_mem_state_write(ptr, seq_id, flags, env, ffi.from_buffer(buf) if buf else ffi.NULL,
                                         len(buf), written), "state_write")
        return bytes(buf)

    def state_write_into(self, buffer: Any, seq_id: int = -1, flags: int = 0, envelope: str | None = None) -> int:
        """Write the state into a writable buffer without allocating; returns the bytes written.
        Raises BufferTooSmallError (with ``.needed``) when it does not fit."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        view = ffi.from_buffer(buffer, require_writable=True)
        written = ffi.new("uint64_t *")
        with self._lock:
            try:
                check(lib.pm_mem_state_write(self._live(), seq_id, flags, env, view, len(view), written),
                      "state_write_into")
            except E.BufferTooSmallError as exc:
                exc.needed = int(written[0])
                raise
        return int(written[0])

    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0, envelope: str | None = None,
                   allow_trailing: bool = False) -> int:
        """Restore a state (whole, or into sequence seq_id as llama.cpp does).  Returns the bytes
        consumed.  On any error raises StateError and the memory is unchanged."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        view = ffi.from_buffer(data)
        consumed = ffi.new("uint64_t *")
        with self._lock:
            check(lib.pm_mem_state_read(self._live(), seq_id, flags, env, view, len(view), bool(allow_trailing),
                                        consumed), "state_read")
        return int(consumed[0])

    def state_check(self, data: Any, seq_id: int = -1, flags: int = 0, envelope: str | None = None) -> int:
        """Validate a state for this memory without changing anything; returns the bytes it
        would consume.  Raises StateError naming what is wrong and where."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        view = ffi.from_buffer(data)
        consumed = ffi.new("uint64_t *")
        with self._lock:
            check(lib.pm_mem_state_check(self._live(), seq_id, flags, env, view, len(view), consumed),
                  "state_check")
        return int(consumed[0])

    # -- batches -------------------------------------------------------------------------------
    def init_batch(self, batch: Batch, n_ubatch: int = 512, n_vocab: int = 0, embd_all: bool = False) -> BatchContext:
        """Validate, split and dry-run a batch as llama_decode does.  Raises BatchError where
        llama.cpp returns -1 and NoSlotError where it returns 1; the memory is then unchanged."""
        out = ffi.new("pm_mctx **")
        with self._lock:
            check(lib.pm_mem_init_batch(self._live(), batch._ptr, int(n_ubatch), int(n_vocab), bool(embd_all), out),
                  "init_batch")
            return BatchContext(self, out[0])

    def check_batch(self, batch: Batch, n_vocab: int = 0, embd_all: bool = False) -> None:
        """Raise BatchError if llama.cpp would reject the batch (llama_decode returns -1)."""
        with self._lock:
            check(lib.pm_mem_check_batch(self._live(), batch._ptr, int(n_vocab), bool(embd_all)), "batch")

    def decode(self, batch: Batch, n_ubatch: int = 512, n_vocab: int = 0) -> BatchContext:
        """llama_decode's memory steps, in its order: validate the batch (BatchError, nothing
        changed), apply pending updates, init_batch (NoSlotError), apply every ubatch.
        Store K/V rows afterwards through the returned context's ubatch cells."""
        with self._lock:
            self.check_batch(batch, n_vocab)
            self.update()
            ctx = self.init_batch(batch, n_ubatch=n_ubatch, n_vocab=n_vocab)
            ctx.apply_all()
        return ctx

    @property
    def kind(self) -> str:
        with self._lock:
            k = lib.pm_memory_kind(self._live())
        return {1: "kv", 2: "iswa", 3: "recurrent", 4: "hybrid", 5: "hybrid_iswa"}.get(k, "?")

    @property
    def nbytes(self) -> int:
        with self._lock:
            return int(lib.pm_memory_nbytes(self._live()))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes"
        return f"{type(self).__name__}({state})"


def _per_layer(value: Any, n_layer: int, what: str) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n_layer
    vals = [int(v) for v in value]
    if len(vals) != n_layer:
        raise E.InvalidArgumentError(f"{what} needs one value per model layer ({n_layer}), got {len(vals)}")
    return vals


_DTYPES = {0: ("<f4", 4), 1: ("<f2", 2), 30: ("<u2", 2)}


class KVCache(Memory):
    """llama.cpp's KV cache (``llama_kv_cache``): cells with positions and sequence sets,
    slot search, K-shift, one or many streams, byte-compatible state.

    ``layers``, ``n_head_kv``, ``n_embd_head_k``/``n_embd_head_v`` and ``rope`` follow the
    model's layers (ints apply to every layer).  See DESIGN.md section 3."""

    def __init__(
        self,
        n_layer: int,
        layers: Sequence[int] | None = None,
        n_head_kv: int | Sequence[int] = 1,
        n_embd_head_k: int | Sequence[int] = 32,
        n_embd_head_v: int | Sequence[int] | None = None,
        size: int = 4096,
        n_seq_max: int = 4,
        type_k: str | int = "f16",
        type_v: str | int = "f16",
        v_trans: bool = True,
        unified: bool = True,
        n_swa: int = 0,
        swa_type: str | int = "none",
        n_pos_per_embd: int = 1,
        rope: Rope | Sequence[Rope | None] | None = None,
        arch: str | None = None,
        format: int = 11,
        k_rot: int | None = None,
        v_rot: int | None = None,
        cell_ext: bool | None = None,
        n_embd_v_gqa_max: int = 0,
        can_shift: bool = True,
        k_rope_offset: int | Sequence[int] = 0,
    ) -> None:
        ptr, keep = self._build(locals())
        super().__init__(ptr, arch)
        del keep
        self._info()

    @staticmethod
    def _params(a: dict, keep: list) -> Any:
        n_layer = int(a["n_layer"])
        if n_layer < 0:
            raise E.InvalidArgumentError("n_layer must be >= 0")
        held = list(range(n_layer)) if a["layers"] is None else [int(x) for x in a["layers"]]
        heads = _per_layer(a["n_head_kv"], n_layer, "n_head_kv") if n_layer else []
        hk = _per_layer(a["n_embd_head_k"], n_layer, "n_embd_head_k") if n_layer else []
        hv_in = a["n_embd_head_v"] if a["n_embd_head_v"] is not None else a["n_embd_head_k"]
        hv = _per_layer(hv_in, n_layer, "n_embd_head_v") if n_layer else []
        offs = _per_layer(a["k_rope_offset"], n_layer, "k_rope_offset") if n_layer else []
        rope = a["rope"]
        ropes: list[Rope | None]
        if rope is None or isinstance(rope, Rope):
            ropes = [rope] * n_layer
        else:
            ropes = list(rope)
            if len(ropes) != n_layer:
                raise E.InvalidArgumentError(f"rope needs one entry per model layer ({n_layer})")
        for il in held:
            if not 0 <= il < n_layer:
                raise E.InvalidArgumentError(f"layer {il} is not a model layer (n_layer {n_layer})")
        arr = ffi.new("pm_kv_layer[]", max(1, len(held)))
        keep.append(arr)
        any_rope = False
        for k, il in enumerate(held):
            L = arr[k]
            L.il = il
            L.n_head_kv = heads[il]
            L.n_embd_head_k = hk[il]
            L.n_embd_head_v = hv[il]
            L.k_rope_offset = offs[il]
            r = ropes[il]
            if r is not None:
                any_rope = True
                L.has_rope = 1
                rr = r if r.n_rot else Rope(**{**r.__dict__, "n_rot": hk[il]})
                rr._fill(L.rope, keep)
            else:
                L.has_rope = 0
                L.rope.mode = -1
        p = ffi.new("pm_kv_params *")
        keep.append(p)
        p.n_layer_model = n_layer
        p.n_layer = len(held)
        p.layers = arr
        p.size = int(a["size"])
        p.n_seq_max = int(a["n_seq_max"])
        p.type_k = type_id(a["type_k"])
        p.type_v = type_id(a["type_v"])
        p.v_trans = bool(a["v_trans"])
        p.unified = bool(a["unified"])
        p.n_swa = int(a["n_swa"])
        p.swa_type = _enum(_SWA, a["swa_type"], "swa_type")
        p.n_pos_per_embd = int(a["n_pos_per_embd"])
        p.cell_ext = bool(a["cell_ext"]) if a["cell_ext"] is not None else p.n_pos_per_embd > 1
        p.n_embd_v_gqa_max = int(a["n_embd_v_gqa_max"])
        p.k_rot = -1 if a["k_rot"] is None else int(a["k_rot"])
        p.v_rot = -1 if a["v_rot"] is None else int(a["v_rot"])
        # without RoPE parameters a pending shift cannot be applied: the cache cannot shift
        p.can_shift = bool(a["can_shift"]) and (any_rope or not held)
        p.format = int(a["format"])
        arch = a["arch"]
        if arch is not None:
            ab = ffi.new("char[]", arch.encode())
            keep.append(ab)
            p.arch = ab
        return p

    @classmethod
    def _build(cls, a: dict) -> tuple[Any, list]:
        keep: list = []
        p = cls._params(a, keep)
        out = ffi.new("pm_memory **")
        check(lib.pm_kv_new(p, out), "KVCache")
        return out[0], keep

    def _info(self, part: int = 0) -> None:
        info = ffi.new("pm_kv_info *")
        check(lib.pm_kv_info_get(self._live(), part, info), "info")
        self.size: int = info.size
        self.n_stream: int = info.n_stream
        self.n_seq_max: int = info.n_seq_max
        self.type_k: str = type_name(info.type_k)
        self.type_v: str = type_name(info.type_v)
        self.v_trans: bool = bool(info.v_trans)
        self.n_swa: int = info.n_swa
        self.swa_type: str = {v: k for k, v in _SWA.items()}[info.swa_type]
        self.k_rot: int = info.k_rot
        self.v_rot: int = info.v_rot
        self.format: int = info.format
        self.cell_ext: bool = bool(info.cell_ext)
        self._part = part
        self._layers: dict[int, tuple[int, Any]] = {}
        for l in range(info.n_layer):
            li = ffi.new("pm_kv_layer_info *")
            check(lib.pm_kv_layer_info_get(self._live(), part, l, li))
            self._layers[li.il] = (l, li)
        self._type_k_id = info.type_k
        self._type_v_id = info.type_v

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
        with self._lock:
            h = self._handle
            check(lib.pm_kv_tensor(self._live(), self._part, idx, stream, which, ptr, nbytes), "view")
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
            base = _View(h, ptr[0], shape, typestr, None)
            self._views.add(base)
            return np.asarray(base)

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
        with self._lock:
            check(lib.pm_kv_cells_get(self._live(), self._part, stream,
                                      ffi.from_buffer("pm_pos[]", pos, require_writable=True),
                                      ffi.from_buffer("int32_t[]", shift, require_writable=True),
                                      ffi.from_buffer("uint64_t[]", seq, require_writable=True),
                                      ffi.from_buffer("int32_t[]", ext, require_writable=True)), "cells_view")
        out = np.empty(self.size, dt)
        out["pos"], out["shift"], out["seq"], out["ext"] = pos, shift, seq, ext
        return out.view(np.recarray)

    def stream_info(self, stream: int = 0) -> dict:
        """head (next search start), used, used_max_p1 and has_shift of a stream."""
        head = ffi.new("uint32_t *")
        used = ffi.new("uint32_t *")
        mx = ffi.new("uint32_t *")
        hs = ffi.new("bool *")
        with self._lock:
            check(lib.pm_kv_stream_get(self._live(), self._part, stream, head, used, mx, hs), "stream_info")
        return {"head": head[0], "used": used[0], "used_max_p1": mx[0], "has_shift": bool(hs[0])}

    def kq_mask(self, ub: UBatch, causal: bool = True, non_causal: str = "all", alibi: bool = False) -> np.ndarray:
        """The KQ mask llama.cpp builds for an applied ubatch: float32
        ``[n_stream, n_tokens_per_stream, n_kv]`` of 0 (visible) or -inf."""
        n_kv = ub.n_kv
        ns = max(ub.n_stream, 1)
        out = np.empty((ns, ub.n_tokens // ns, n_kv), np.float32)
        nk = ffi.new("uint32_t *")
        with self._lock:
            self._live()
            check(lib.pm_mctx_kq_mask(ub._ctx._ptr, ub.index, self._part, bool(causal),
                                      _enum(_NON_CAUSAL, non_causal, "non_causal"), bool(alibi),
                                      ffi.from_buffer("float[]", out, require_writable=True), out.size, nk),
                  "kq_mask")
        return out
