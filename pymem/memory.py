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
    "KVCacheISWA",
    "RecurrentMemory",
    "HybridMemory",
    "HybridISWAMemory",
    "KVPart",
    "RecurrentPart",
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
        if int(value) not in table.values():
            raise E.InvalidArgumentError(f"unknown {what} {int(value)} (one of {sorted(set(table.values()))})")
        return int(value)
    try:
        return table[str(value).lower()]
    except KeyError:
        raise E.InvalidArgumentError(f"unknown {what} {value!r} (one of {', '.join(k for k in table if k)})") from None


_U32_MAX = 0xFFFFFFFF


def _u32(value: Any, what: str) -> int:
    """An int for a uint32 field of the C parameters, or InvalidArgumentError (cffi would
    raise OverflowError, which is not a ValueError)."""
    v = int(value)
    if not 0 <= v <= _U32_MAX:
        raise E.InvalidArgumentError(f"{what} must be in [0, 2^32), got {v}")
    return v


def _release(view: Any) -> None:
    """Release a ffi.from_buffer() view of a caller's buffer now.  Left to the garbage
    collector, a view of a memoryview that ends up in a reference cycle (e.g. through the
    traceback of an exception the caller keeps) can be cleared after the memoryview, and
    CPython then crashes releasing the memoryview."""
    ffi.release(view)


def _range_error(what: str, exc: OverflowError) -> E.InvalidArgumentError:
    """An integer argument that does not fit its C type (seq ids and positions are int32)."""
    return E.InvalidArgumentError(f"{what}: argument out of range: {exc}")


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
        c.n_rot = _u32(self.n_rot, "rope n_rot")
        c.freq_base = float(self.freq_base)
        c.freq_scale = float(self.freq_scale)
        c.ext_factor = float(self.ext_factor)
        c.attn_factor = float(self.attn_factor)
        c.beta_fast = float(self.beta_fast)
        c.beta_slow = float(self.beta_slow)
        c.n_ctx_orig = _u32(self.n_ctx_orig, "rope n_ctx_orig")
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
        # reusable out-parameters for the hot small calls (used under the lock)
        self._o_pos = ffi.new("pm_pos *")
        self._o_bool = ffi.new("bool *")
        self._views: "weakref.WeakSet[_View]" = weakref.WeakSet()
        self.arch = arch

    # -- lifetime ----------------------------------------------------------------------------
    def _export(self, handle: Any, ptr: Any, shape: tuple, typestr: str) -> np.ndarray:
        base = _View(handle, ptr, shape, typestr, None)
        self._views.add(base)
        return np.asarray(base)

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
        with self._lock:
            out = self._o_bool
            try:
                st = lib.pm_mem_seq_rm(self._live(), seq_id, p0, p1, out)
            except OverflowError as exc:
                raise _range_error("seq_rm", exc) from None
            if st:
                check(st, "seq_rm")
            return bool(out[0])

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make dst see the cells of src in [p0, p1)."""
        with self._lock:
            try:
                st = lib.pm_mem_seq_cp(self._live(), src, dst, p0, p1)
            except OverflowError as exc:
                raise _range_error("seq_cp", exc) from None
            if st:
                check(st, "seq_cp")

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but seq_id."""
        with self._lock:
            try:
                st = lib.pm_mem_seq_keep(self._live(), seq_id)
            except OverflowError as exc:
                raise _range_error("seq_keep", exc) from None
            if st:
                check(st, "seq_keep")

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Move positions [p0, p1) of seq_id by shift; cells pushed below 0 are dropped.  The K
        rotation is pending until :meth:`update`."""
        with self._lock:
            try:
                st = lib.pm_mem_seq_add(self._live(), seq_id, p0, p1, shift)
            except OverflowError as exc:
                raise _range_error("seq_add", exc) from None
            if st:
                check(st, "seq_add")

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide positions [p0, p1) of seq_id by d (integer division)."""
        with self._lock:
            try:
                st = lib.pm_mem_seq_div(self._live(), seq_id, p0, p1, d)
            except OverflowError as exc:
                raise _range_error("seq_div", exc) from None
            if st:
                check(st, "seq_div")

    def seq_pos_min(self, seq_id: int) -> int:
        with self._lock:
            h = self._handle
            if h is None:
                self._live()
            out = self._o_pos
            try:
                st = lib.pm_mem_seq_pos_min(h.ptr, seq_id, out)
            except OverflowError as exc:
                raise _range_error("seq_pos_min", exc) from None
            if st:
                check(st, "seq_pos_min")
            return out[0]

    def seq_pos_max(self, seq_id: int) -> int:
        with self._lock:
            h = self._handle
            if h is None:
                self._live()
            out = self._o_pos
            try:
                st = lib.pm_mem_seq_pos_max(h.ptr, seq_id, out)
            except OverflowError as exc:
                raise _range_error("seq_pos_max", exc) from None
            if st:
                check(st, "seq_pos_max")
            return out[0]

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
            try:
                st = lib.pm_mem_state_size(self._live(), seq_id, flags, _enum(_ENVELOPE, envelope, "envelope"), out)
            except OverflowError as exc:
                raise _range_error("state_size", exc) from None
            check(st, "state_size")
        return int(out[0])

    def state_write(self, seq_id: int = -1, flags: int = 0, envelope: str | None = None) -> bytes:
        """The state as llama.cpp writes it: the bare memory section by default;
        ``envelope="llama"`` gives ``llama_state_get_data`` (whole) or
        ``llama_state_seq_get_data_ext`` (one sequence) output."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        with self._lock:
            ptr = self._live()
            n = ffi.new("uint64_t *")
            try:
                st = lib.pm_mem_state_size(ptr, seq_id, flags, env, n)
            except OverflowError as exc:
                raise _range_error("state_write", exc) from None
            check(st, "state_write")
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
        try:
            with self._lock:
                try:
                    st = lib.pm_mem_state_write(self._live(), seq_id, flags, env, view, len(view), written)
                except OverflowError as exc:
                    raise _range_error("state_write_into", exc) from None
                try:
                    check(st, "state_write_into")
                except E.BufferTooSmallError as exc:
                    exc.needed = int(written[0])
                    del exc                   # no reference cycle through this frame (see _release)
                    raise
        finally:
            _release(view)
        return int(written[0])

    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0, envelope: str | None = None,
                   allow_trailing: bool = False) -> int:
        """Restore a state (whole, or into sequence seq_id as llama.cpp does).  Returns the bytes
        consumed.  On any error raises StateError and the memory is unchanged."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        view = ffi.from_buffer(data)
        consumed = ffi.new("uint64_t *")
        try:
            with self._lock:
                try:
                    st = lib.pm_mem_state_read(self._live(), seq_id, flags, env, view, len(view),
                                               bool(allow_trailing), consumed)
                except OverflowError as exc:
                    raise _range_error("state_read", exc) from None
                check(st, "state_read")
        finally:
            _release(view)
        return int(consumed[0])

    def state_check(self, data: Any, seq_id: int = -1, flags: int = 0, envelope: str | None = None) -> int:
        """Validate a state for this memory without changing anything; returns the bytes it
        would consume.  Raises StateError naming what is wrong and where."""
        env = _enum(_ENVELOPE, envelope, "envelope")
        view = ffi.from_buffer(data)
        consumed = ffi.new("uint64_t *")
        try:
            with self._lock:
                try:
                    st = lib.pm_mem_state_check(self._live(), seq_id, flags, env, view, len(view), consumed)
                except OverflowError as exc:
                    raise _range_error("state_check", exc) from None
                check(st, "state_check")
        finally:
            _release(view)
        return int(consumed[0])

    # -- batches -------------------------------------------------------------------------------
    def init_batch(self, batch: Batch, n_ubatch: int = 512, n_vocab: int = 0, embd_all: bool = False) -> BatchContext:
        """Validate, split and dry-run a batch as llama_decode does.  Raises BatchError where
        llama.cpp returns -1 and NoSlotError where it returns 1; the memory is then unchanged."""
        out = ffi.new("pm_mctx **")
        n_ubatch, n_vocab = _u32(n_ubatch, "n_ubatch"), _u32(n_vocab, "n_vocab")
        with self._lock:
            check(lib.pm_mem_init_batch(self._live(), batch._ptr, n_ubatch, n_vocab, bool(embd_all), out),
                  "init_batch")
            return BatchContext(self, out[0])

    def check_batch(self, batch: Batch, n_vocab: int = 0, embd_all: bool = False) -> None:
        """Raise BatchError if llama.cpp would reject the batch (llama_decode returns -1)."""
        n_vocab = _u32(n_vocab, "n_vocab")
        with self._lock:
            check(lib.pm_mem_check_batch(self._live(), batch._ptr, n_vocab, bool(embd_all)), "batch")

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

    def breakdown(self) -> list[dict]:
        """Bytes per part, as llama.cpp's memory_breakdown: KV parts (K, V, cell metadata)
        then the recurrent part (r, s, cell metadata)."""
        out = ffi.new("pm_breakdown[]", 3)
        with self._lock:
            n = lib.pm_mem_breakdown(self._live(), out, 3)
        names = {0: ["kv"], 1: ["kv"], 2: ["base", "swa"], 3: [], 4: ["attn"], 5: ["base", "swa"]}
        kinds = {"kv": 1, "iswa": 2, "recurrent": 3, "hybrid": 4, "hybrid_iswa": 5}
        kv_names = names[kinds[self.kind]]
        res = []
        for i in range(n):
            b = out[i]
            if b.part_kind == lib.PM_MEM_KV:
                res.append({"part": kv_names[i], "cells": b.cells, "n_stream": b.n_stream, "n_layer": b.n_layer,
                            "k_bytes": b.bytes[0], "v_bytes": b.bytes[1], "meta_bytes": b.bytes[2]})
            else:
                res.append({"part": "recurrent", "cells": b.cells, "n_layer": b.n_layer,
                            "r_bytes": b.bytes[0], "s_bytes": b.bytes[1], "meta_bytes": b.bytes[2]})
        return res

    @property
    def nbytes(self) -> int:
        with self._lock:
            return int(lib.pm_memory_nbytes(self._live()))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.nbytes} bytes"
        return f"{type(self).__name__}({state})"


def _per_layer(value: Any, n_layer: int, what: str) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [_u32(value, what)] * n_layer
    vals = [_u32(v, what) for v in value]
    if len(vals) != n_layer:
        raise E.InvalidArgumentError(f"{what} needs one value per model layer ({n_layer}), got {len(vals)}")
    return vals


_DTYPES = {0: ("<f4", 4), 1: ("<f2", 2), 30: ("<u2", 2)}

_KV_DEFAULTS = dict(
    layers=None, n_head_kv=1, n_embd_head_k=32, n_embd_head_v=None, size=4096, n_seq_max=4,
    type_k="f16", type_v="f16", v_trans=True, unified=True, n_swa=0, swa_type="none",
    n_pos_per_embd=1, rope=None, arch=None, format=11, k_rot=None, v_rot=None, cell_ext=None,
    n_embd_v_gqa_max=0, can_shift=True, k_rope_offset=0,
)


def _layer_args(kw: dict, defaults: dict, what: str) -> tuple:
    """Keyword arguments of a part with the defaults filled in, the model's layer count and
    the model layers the part holds (checked)."""
    unknown = set(kw) - set(defaults) - {"n_layer"}
    if unknown:
        raise TypeError(f"unknown {what} argument(s): {', '.join(sorted(unknown))}")
    if "n_layer" not in kw:
        raise TypeError(f"a {what} needs n_layer (the model's layer count)")
    a = {**defaults, **kw}
    n_layer = int(a["n_layer"])
    if n_layer < 0:
        raise E.InvalidArgumentError("n_layer must be >= 0")
    held = list(range(n_layer)) if a["layers"] is None else [int(x) for x in a["layers"]]
    for il in held:
        if not 0 <= il < n_layer:
            raise E.InvalidArgumentError(f"layer {il} is not a model layer (n_layer {n_layer})")
    return a, n_layer, held


def _kv_params(kw: dict, keep: list) -> Any:
    """pm_kv_params for KVCache keyword arguments (see KVCache)."""
    a, n_layer, held = _layer_args(kw, _KV_DEFAULTS, "KV cache")
    heads = _per_layer(a["n_head_kv"], n_layer, "n_head_kv") if n_layer else []
    hk = _per_layer(a["n_embd_head_k"], n_layer, "n_embd_head_k") if n_layer else []
    hv_in = a["n_embd_head_v"] if a["n_embd_head_v"] is not None else a["n_embd_head_k"]
    hv = _per_layer(hv_in, n_layer, "n_embd_head_v") if n_layer else []
    offs = _per_layer(a["k_rope_offset"], n_layer, "k_rope_offset") if n_layer else []
    rope = a["rope"]
    if rope is None or isinstance(rope, Rope):
        ropes: list = [rope] * n_layer
    else:
        ropes = list(rope)
        if len(ropes) != n_layer:
            raise E.InvalidArgumentError(f"rope needs one entry per model layer ({n_layer})")
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
    p.size = _u32(a["size"], "size")
    p.n_seq_max = _u32(a["n_seq_max"], "n_seq_max")
    p.type_k = type_id(a["type_k"])
    p.type_v = type_id(a["type_v"])
    p.v_trans = bool(a["v_trans"])
    p.unified = bool(a["unified"])
    p.n_swa = _u32(a["n_swa"], "n_swa")
    p.swa_type = _enum(_SWA, a["swa_type"], "swa_type")
    p.n_pos_per_embd = _u32(a["n_pos_per_embd"], "n_pos_per_embd")
    p.cell_ext = bool(a["cell_ext"]) if a["cell_ext"] is not None else p.n_pos_per_embd > 1
    p.n_embd_v_gqa_max = _u32(a["n_embd_v_gqa_max"], "n_embd_v_gqa_max")
    p.k_rot = -1 if a["k_rot"] is None else int(a["k_rot"])
    p.v_rot = -1 if a["v_rot"] is None else int(a["v_rot"])
    # without RoPE parameters a pending shift cannot be applied: the cache cannot shift
    p.can_shift = bool(a["can_shift"]) and (any_rope or not held)
    p.format = _u32(a["format"], "format")
    if a["arch"] is not None:
        ab = ffi.new("char[]", str(a["arch"]).encode())
        keep.append(ab)
        p.arch = ab
    return p


_REC_DEFAULTS = dict(layers=None, n_embd_r=0, n_embd_s=0, n_embd_p=0, size=None, n_seq_max=1,
                     type_r="f32", type_s="f32", n_rs_seq=0, arch=None)


def _rec_params(kw: dict, keep: list) -> Any:
    """pm_rec_params for RecurrentMemory keyword arguments."""
    a, n_layer, held = _layer_args(kw, _REC_DEFAULTS, "recurrent memory")
    rr = _per_layer(a["n_embd_r"], n_layer, "n_embd_r") if n_layer else []
    ss = _per_layer(a["n_embd_s"], n_layer, "n_embd_s") if n_layer else []
    pp = _per_layer(a["n_embd_p"], n_layer, "n_embd_p") if n_layer else []
    arr = ffi.new("pm_rec_layer[]", max(1, len(held)))
    keep.append(arr)
    for k, il in enumerate(held):
        arr[k].il = il
        arr[k].n_embd_r = rr[il]
        arr[k].n_embd_s = ss[il]
        arr[k].n_embd_p = pp[il]
    p = ffi.new("pm_rec_params *")
    keep.append(p)
    p.n_layer_model = n_layer
    p.n_layer = len(held)
    p.layers = arr
    n_seq_max = _u32(a["n_seq_max"], "n_seq_max")
    p.n_seq_max = n_seq_max
    p.size = _u32(a["size"], "size") if a["size"] is not None else max(1, n_seq_max)
    p.type_r = type_id(a["type_r"])
    p.type_s = type_id(a["type_s"])
    p.n_rs_seq = _u32(a["n_rs_seq"], "n_rs_seq")
    if a["arch"] is not None:
        ab = ffi.new("char[]", str(a["arch"]).encode())
        keep.append(ab)
        p.arch = ab
    return p


class KVPart:
    """The KV cache part of a memory (the memory itself for a KVCache; base / swa / attn
    parts of composites): its layout, zero-copy views of K and V, cell metadata, KQ masks."""

    def __init__(self, mem: "Memory", part: int) -> None:
        self._mem = mem
        self._init_part(mem, part)

    def _init_part(self, mem: "Memory", part: int) -> None:
        self._part = part
        info = ffi.new("pm_kv_info *")
        check(lib.pm_kv_info_get(mem._live(), part, info), "info")
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
            check(lib.pm_kv_layer_info_get(mem._live(), part, l, li))
            self._layers[li.il] = (l, li)

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
        mem = self._mem
        with mem._lock:
            h = mem._handle
            check(lib.pm_kv_tensor(mem._live(), self._part, idx, stream, which, ptr, nbytes), "view")
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
            return mem._export(h, ptr[0], shape, typestr)

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
        mem = self._mem
        with mem._lock:
            check(lib.pm_kv_cells_get(mem._live(), self._part, stream,
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
        mem = self._mem
        with mem._lock:
            check(lib.pm_kv_stream_get(mem._live(), self._part, stream, head, used, mx, hs), "stream_info")
        return {"head": head[0], "used": used[0], "used_max_p1": mx[0], "has_shift": bool(hs[0])}

    def kq_mask(self, ub: UBatch, causal: bool = True, non_causal: str = "all", alibi: bool = False) -> np.ndarray:
        """The KQ mask llama.cpp builds for this cache and an applied ubatch: float32
        ``[n_stream, n_tokens_per_stream, n_kv]`` of 0 (visible) or -inf."""
        ns = max(ub.n_stream, 1)
        nk = ffi.new("uint32_t *")
        mem = self._mem
        with mem._lock:
            mem._live()
            lib.pm_mctx_kq_mask(ub._ctx._ptr, ub.index, self._part, bool(causal), 0, False, ffi.NULL, 0, nk)
            out = np.empty((ns, ub.n_tokens // ns, nk[0]), np.float32)
            check(lib.pm_mctx_kq_mask(ub._ctx._ptr, ub.index, self._part, bool(causal),
                                      _enum(_NON_CAUSAL, non_causal, "non_causal"), bool(alibi),
                                      ffi.from_buffer("float[]", out, require_writable=True), out.size, nk),
                  "kq_mask")
        return out

    def __repr__(self) -> str:
        return (f"KVPart(layers={self.layers}, size={self.size}, n_stream={self.n_stream}, "
                f"type_k={self.type_k}, type_v={self.type_v}, swa={self.swa_type})")


class RecurrentPart:
    """The recurrent part of a memory: layout, zero-copy views of the r / s (/ p) rows of
    every layer (all snapshot planes: row ``k*size + c`` is plane k of cell c) and cells."""

    def __init__(self, mem: "Memory") -> None:
        self._mem = mem
        info = ffi.new("pm_rec_info *")
        check(lib.pm_rec_info_get(mem._live(), info), "info")
        self.size: int = info.size
        self.n_seq_max: int = info.n_seq_max
        self.n_rs_seq: int = info.n_rs_seq
        self.type_r: str = type_name(info.type_r)
        self.type_s: str = type_name(info.type_s)
        self._layers: dict[int, tuple[int, Any]] = {}
        for l in range(info.n_layer):
            li = ffi.new("pm_rec_layer_info *")
            check(lib.pm_rec_layer_info_get(mem._live(), l, li))
            self._layers[li.il] = (l, li)

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
        mem = self._mem
        with mem._lock:
            h = mem._handle
            check(lib.pm_rec_tensor(mem._live(), idx, which, ptr, nbytes), "view")
            tid = type_id(self.type_r if which != 1 else self.type_s)
            row = int(li.row_bytes[which])
            dt = _DTYPES.get(tid)
            if dt is not None:
                shape, typestr = (int(li.n_rows), row // dt[1]), dt[0]
            else:
                shape, typestr = (int(li.n_rows), row), "|u1"
            return mem._export(h, ptr[0], shape, typestr)

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
        with self._mem._lock:
            check(lib.pm_rec_info_get(self._mem._live(), i), "info")
        return {"head": i.head, "n": i.n, "used": i.used, "rs_z": i.rs_z}

    def cells_view(self) -> np.ndarray:
        """A copy of the cells: ``pos``, ``src``, ``src0``, ``tail``, ``seq`` (4 x uint64)."""
        n = self.size
        pos, src, src0, tail = (np.empty(n, np.int32) for _ in range(4))
        seq = np.empty((n, 4), np.uint64)
        rs = np.empty(self.n_seq_max, np.uint32)
        fb = lambda a, t: ffi.from_buffer(t, a, require_writable=True)  # noqa: E731
        with self._mem._lock:
            check(lib.pm_rec_cells_get(self._mem._live(), fb(pos, "pm_pos[]"), fb(src, "int32_t[]"),
                                       fb(src0, "int32_t[]"), fb(tail, "int32_t[]"), fb(seq, "uint64_t[]"),
                                       fb(rs, "uint32_t[]")), "cells_view")
        dt = np.dtype([("pos", "<i4"), ("src", "<i4"), ("src0", "<i4"), ("tail", "<i4"), ("seq", "<u8", (4,))])
        out = np.empty(n, dt)
        out["pos"], out["src"], out["src0"], out["tail"], out["seq"] = pos, src, src0, tail, seq
        return out.view(np.recarray)

    def rs_idx(self) -> np.ndarray:
        """Pending rollback plane of every sequence (0 = none)."""
        rs = np.empty(self.n_seq_max, np.uint32)
        with self._mem._lock:
            check(lib.pm_rec_cells_get(self._mem._live(), ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                                       ffi.from_buffer("uint32_t[]", rs, require_writable=True)))
        return rs

    def __repr__(self) -> str:
        return f"RecurrentPart(layers={self.layers}, size={self.size}, n_rs_seq={self.n_rs_seq})"


def _make(fn: str, *params: Any) -> Any:
    out = ffi.new("pm_memory **")
    check(getattr(lib, fn)(*params, out), fn.replace("pm_", "").replace("_new", ""))
    return out[0]


class KVCache(Memory, KVPart):
    """llama.cpp's KV cache (``llama_kv_cache``): cells with positions and sequence sets,
    slot search, K-shift, one or many streams, byte-compatible state.

    ``layers``, ``n_head_kv``, ``n_embd_head_k``/``n_embd_head_v`` and ``rope`` follow the
    model's layers (ints apply to every layer)."""

    def __init__(self, n_layer: int, **kwargs: Any) -> None:
        keep: list = []
        p = _kv_params({"n_layer": n_layer, **kwargs}, keep)
        Memory.__init__(self, _make("pm_kv_new", p), kwargs.get("arch"))
        self._init_part(self, 0)

    @property
    def _mem(self) -> "KVCache":  # the cache is its own (only) KV part
        return self

    def kv_parts(self) -> list[KVPart]:
        return [self]

    __repr__ = Memory.__repr__


class RecurrentMemory(Memory):
    """llama.cpp's recurrent memory (Mamba, RWKV, short-conv): one cell per sequence slot with
    the state rows of every recurrent layer; rollback snapshots with ``n_rs_seq``.

    ``RecurrentMemory(n_layer=4, layers=[1, 3], n_embd_r=96, n_embd_s=256, size=4,
    n_seq_max=4, type_r="f32", type_s="f32", n_rs_seq=0)``; size defaults to max(1, n_seq_max)."""

    def __init__(self, n_layer: int, **kwargs: Any) -> None:
        keep: list = []
        p = _rec_params({"n_layer": n_layer, **kwargs}, keep)
        super().__init__(_make("pm_recurrent_new", p), kwargs.get("arch"))
        self.recurrent = RecurrentPart(self)
        self.n_seq_max = self.recurrent.n_seq_max

    def kv_parts(self) -> list[KVPart]:
        return []


def _iswa_kwargs(base: dict | None, swa: dict | None, kw: dict) -> tuple[dict, dict]:
    """base / swa KV kwargs, or llama.cpp's iSWA sizing from model-level arguments."""
    if base is not None or swa is not None:
        if base is None or swa is None or kw:
            raise TypeError("give both base= and swa= (KVCache keyword dicts), or model-level arguments")
        return dict(base), dict(swa)
    kw = dict(kw)
    swa_layers = set(int(x) for x in kw.pop("swa_layers"))
    swa_full = kw.pop("swa_full", True)
    n_ubatch = int(kw.pop("n_ubatch", 512))
    n_swa = int(kw.pop("n_swa"))
    swa_type = kw.pop("swa_type", "standard")
    n_layer = int(kw["n_layer"])
    if n_ubatch < 1 or n_swa < 0:
        raise E.InvalidArgumentError(f"n_ubatch must be >= 1 and n_swa >= 0 (got {n_ubatch}, {n_swa})")
    bad = sorted(il for il in swa_layers if not 0 <= il < n_layer)
    if bad:
        raise E.InvalidArgumentError(f"swa_layers {bad} are not model layers (n_layer {n_layer})")
    layers = kw.pop("layers", None)
    held = list(range(n_layer)) if layers is None else [int(x) for x in layers]
    size = int(kw.get("size", _KV_DEFAULTS["size"]))
    n_seq_max = int(kw.get("n_seq_max", _KV_DEFAULTS["n_seq_max"]))
    unified = bool(kw.get("unified", True))
    size_swa = size if swa_full else min(size, n_swa * (n_seq_max if unified else 1) + n_ubatch)
    size_swa = (size_swa + 255) // 256 * 256 if not swa_full else size_swa
    base = dict(kw, layers=[il for il in held if il not in swa_layers])
    swa = dict(kw, layers=[il for il in held if il in swa_layers], size=size_swa, n_swa=n_swa, swa_type=swa_type)
    return base, swa


class KVCacheISWA(Memory):
    """llama.cpp's iSWA cache: a full-attention ``base`` cache plus a sliding-window ``swa``
    cache over disjoint layers.

    Either ``KVCacheISWA(base={...}, swa={...})`` with KVCache keyword arguments for each
    part, or model-level arguments with llama.cpp's sizing: ``KVCacheISWA(n_layer=4,
    swa_layers=[0, 2], n_swa=8, size=4096, swa_full=True, n_ubatch=512, ...)``."""

    def __init__(self, base: dict | None = None, swa: dict | None = None, **kwargs: Any) -> None:
        b, w = _iswa_kwargs(base, swa, kwargs)
        keep: list = []
        pb = _kv_params(b, keep)
        pw = _kv_params(w, keep)
        super().__init__(_make("pm_iswa_new", pb, pw), b.get("arch"))
        self.base = KVPart(self, 0)
        self.swa = KVPart(self, 1)
        self.n_seq_max = self.base.n_seq_max

    def kv_parts(self) -> list[KVPart]:
        return [self.base, self.swa]


class HybridMemory(Memory):
    """llama.cpp's hybrid memory: an attention KV cache (``attn``) plus a recurrent memory
    (``recurrent``) over disjoint layers (Jamba, LFM2, Granite-hybrid, ...)."""

    def __init__(self, attn: dict, recurrent: dict) -> None:
        keep: list = []
        pa = _kv_params(dict(attn), keep)
        pr = _rec_params(dict(recurrent), keep)
        super().__init__(_make("pm_hybrid_new", pa, pr), attn.get("arch"))
        self.attn = KVPart(self, 0)
        self.recurrent = RecurrentPart(self)

    def kv_parts(self) -> list[KVPart]:
        return [self.attn]


class HybridISWAMemory(Memory):
    """llama.cpp's hybrid-iSWA memory: an iSWA attention cache (``base`` + ``swa``) plus a
    recurrent memory.  ``attn`` is ``{"base": {...}, "swa": {...}}`` or model-level iSWA
    arguments (see KVCacheISWA)."""

    def __init__(self, attn: dict, recurrent: dict) -> None:
        a = dict(attn)
        b, w = _iswa_kwargs(a.pop("base", None), a.pop("swa", None), a)
        keep: list = []
        pb = _kv_params(b, keep)
        pw = _kv_params(w, keep)
        pr = _rec_params(dict(recurrent), keep)
        super().__init__(_make("pm_hybrid_iswa_new", pb, pw, pr), b.get("arch"))
        self.base = KVPart(self, 0)
        self.swa = KVPart(self, 1)
        self.recurrent = RecurrentPart(self)
        self.n_seq_max = self.base.n_seq_max

    def kv_parts(self) -> list[KVPart]:
        return [self.base, self.swa]
