"""The memory types: one base class with llama.cpp's memory interface, one subclass per
type.  Every method maps to one call of the C core through the memory's guard (lock, open
check, argument ranges, status check: :mod:`pymem._guard`); errors arrive as pymem exceptions
and a failed call leaves the memory exactly as it was."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from . import _errors as E
from . import _kinds
from ._guard import Guard, i32, u32
from ._native import check, ffi, lib
from .batch import Batch, BatchContext
from .params import (
    _ENVELOPE,
    STATE_PARTIAL_ONLY,
    STATE_SWA_ONLY,
    Rope,
    _enum,
    _iswa_kwargs,
    _kv_params,
    _rec_params,
    row_size,
    type_id,
    type_name,
)
from .parts import KVPart, RecurrentPart

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

PartArgs = Dict[str, Dict[str, Any]]


def _release(view: Any) -> None:
    """Release a ffi.from_buffer() view of a caller's buffer now.  Left to the garbage
    collector, a view of a memoryview that ends up in a reference cycle (e.g. through the
    traceback of an exception the caller keeps) can be cleared after the memoryview, and
    CPython then crashes releasing the memoryview."""
    ffi.release(view)


class Memory:
    """llama.cpp's memory interface (``llama_memory_i``), common to every memory type.

    Positions are ranges ``[p0, p1)``; a negative p0 means 0 and a negative p1 means "to the
    end", as in llama.cpp.  Not created directly: use a subclass.

    ``copy.copy`` / ``copy.deepcopy`` give an independent memory with the same parameters and
    the same state (a state round trip: cells, positions, tensors; search heads start afresh);
    pickling goes through the state the same way.  Both refuse (TypeError) while a K-shift or
    stream copy is pending (call :meth:`update` first) and on a closed memory."""

    def __init__(self, ptr: Any, parts: PartArgs, arch: Optional[str] = None) -> None:
        self._guard = Guard(ptr, type(self).__name__)
        self._lock = self._guard.lock
        self._parts = parts           # per-part constructor arguments (copy, pickle)
        # reusable out-parameters for the hot small calls (used under the lock)
        self._o_pos = ffi.new("pm_pos *")
        self._o_bool = ffi.new("bool *")
        self._o_u64 = ffi.new("uint64_t *")
        self.arch = arch
        #: the GGUF file the memory was built for (set by from_gguf; copies and pickles keep it)
        self.model_path: Optional[str] = None

    @classmethod
    def _from_parts(cls, parts: PartArgs) -> "Memory":  # pragma: no cover - every kind overrides
        """A memory from its parts' keyword arguments, keyed by part name (see pymem._kinds)."""
        raise NotImplementedError

    # -- lifetime ----------------------------------------------------------------------------
    def _live(self) -> Any:
        return self._guard.live()

    def close(self) -> None:
        """Free the native memory now, or when the last numpy view of it is gone."""
        self._guard.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._guard.closed

    # -- copies ------------------------------------------------------------------------------
    def _snapshot(self, how: str) -> bytes:
        with self._lock:
            if self.closed:
                raise TypeError(f"cannot {how} a closed {type(self).__name__}")
            if self.update_pending:
                raise TypeError(f"cannot {how} a {type(self).__name__} with a pending update (K-shift or "
                                "stream copy): call update() first")
            return self.state_write()

    def __copy__(self) -> "Memory":
        blob = self._snapshot("copy")
        return _restore(type(self), self._parts, blob, self.model_path)

    def __deepcopy__(self, memo: dict) -> "Memory":
        return self.__copy__()

    def __reduce__(self) -> tuple:
        return _restore, (type(self), self._parts, self._snapshot("pickle"), self.model_path)

    # -- sequence operations -------------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence (seq_id -1: of all sequences).  Returns
        llama.cpp's answer (recurrent memories refuse partial removals)."""
        w = "seq_rm"
        s, a, b = i32(seq_id, "seq_id", w), i32(p0, "p0", w), i32(p1, "p1", w)
        g = self._guard
        with g.lock:
            h = g.handle
            if h is None:
                raise E.InvalidStateError(f"operation on a closed {g.owner}")
            st = lib.pm_mem_seq_rm(h.ptr, s, a, b, self._o_bool)
            if st:
                check(st, w)
            return bool(self._o_bool[0])

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make dst see the cells of src in [p0, p1)."""
        w = "seq_cp"
        self._guard.call(w, lib.pm_mem_seq_cp, i32(src, "src", w), i32(dst, "dst", w), i32(p0, "p0", w),
                         i32(p1, "p1", w))

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but seq_id."""
        self._guard.call("seq_keep", lib.pm_mem_seq_keep, i32(seq_id, "seq_id", "seq_keep"))

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Move positions [p0, p1) of seq_id by shift; cells pushed below 0 are dropped.  The K
        rotation is pending until :meth:`update`."""
        w = "seq_add"
        self._guard.call(w, lib.pm_mem_seq_add, i32(seq_id, "seq_id", w), i32(p0, "p0", w), i32(p1, "p1", w),
                         i32(shift, "shift", w))

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide positions [p0, p1) of seq_id by d (integer division)."""
        w = "seq_div"
        self._guard.call(w, lib.pm_mem_seq_div, i32(seq_id, "seq_id", w), i32(p0, "p0", w), i32(p1, "p1", w),
                         i32(d, "d", w))

    def seq_pos_min(self, seq_id: int) -> int:
        """The smallest position of seq_id (-1 if it has none)."""
        s = i32(seq_id, "seq_id", "seq_pos_min")
        g = self._guard
        with g.lock:
            h = g.handle
            if h is None:
                raise E.InvalidStateError(f"operation on a closed {g.owner}")
            st = lib.pm_mem_seq_pos_min(h.ptr, s, self._o_pos)
            if st:
                check(st, "seq_pos_min")
            return self._o_pos[0]

    def seq_pos_max(self, seq_id: int) -> int:
        """The largest position of seq_id (-1 if it has none)."""
        s = i32(seq_id, "seq_id", "seq_pos_max")
        g = self._guard
        with g.lock:
            h = g.handle
            if h is None:
                raise E.InvalidStateError(f"operation on a closed {g.owner}")
            st = lib.pm_mem_seq_pos_max(h.ptr, s, self._o_pos)
            if st:
                check(st, "seq_pos_max")
            return self._o_pos[0]

    @property
    def can_shift(self) -> bool:
        return bool(self._guard.call("can_shift", lib.pm_mem_can_shift, status=False))

    @property
    def update_pending(self) -> bool:
        return bool(self._guard.call("update_pending", lib.pm_mem_update_pending, status=False))

    def update(self) -> bool:
        """Apply pending K-shifts and stream copies (what llama.cpp does before a decode).
        Returns whether anything was pending.  Raises ShiftError if a shift cannot be done."""
        out = ffi.new("bool *")
        self._guard.call("update", lib.pm_mem_update, out)
        return bool(out[0])

    def clear(self, data: bool = True) -> None:
        """Empty the memory; with data, also zero every tensor byte."""
        self._guard.call("clear", lib.pm_mem_clear, bool(data))

    # -- state ---------------------------------------------------------------------------------
    @staticmethod
    def _state_args(w: str, seq_id: int, flags: int, envelope: Optional[str]) -> tuple:
        if envelope is None:
            env = 0
        elif type(envelope) is str and envelope in _ENVELOPE:  # the common spellings, fast
            env = _ENVELOPE[envelope]
        else:
            env = _enum(_ENVELOPE, envelope, "envelope")
        return i32(seq_id, "seq_id", w), u32(flags, "flags", w), env

    def state_size(self, seq_id: int = -1, flags: int = 0, envelope: Optional[str] = None) -> int:
        """The exact length :meth:`state_write` returns."""
        out = ffi.new("uint64_t *")
        self._guard.call("state_size", lib.pm_mem_state_size, *self._state_args("state_size", seq_id, flags,
                                                                                 envelope), out)
        return int(out[0])

    def state_write(self, seq_id: int = -1, flags: int = 0, envelope: Optional[str] = None) -> bytes:
        """The state as llama.cpp writes it: the bare memory section by default;
        ``envelope="llama"`` gives ``llama_state_get_data`` (whole) or
        ``llama_state_seq_get_data_ext`` (one sequence) output."""
        a = self._state_args("state_write", seq_id, flags, envelope)
        n = ffi.new("uint64_t *")
        written = ffi.new("uint64_t *")
        with self._lock:
            self._guard.call("state_write", lib.pm_mem_state_size, *a, n)
            buf = bytearray(n[0])
            self._guard.call("state_write", lib.pm_mem_state_write, *a, ffi.from_buffer(buf) if buf else ffi.NULL,
                             len(buf), written)
        return bytes(buf)

    def state_write_into(self, buffer: Any, seq_id: int = -1, flags: int = 0, envelope: Optional[str] = None) -> int:
        """Write the state into a writable buffer without allocating; returns the bytes written.
        Raises BufferTooSmallError (with ``.needed``) when it does not fit."""
        w = "state_write_into"
        s, f, env = self._state_args(w, seq_id, flags, envelope)
        view = ffi.from_buffer(buffer, require_writable=True)
        g, out = self._guard, self._o_u64
        try:
            with g.lock:              # the out-parameter is shared: read it under the lock
                try:
                    g.call(w, lib.pm_mem_state_write, s, f, env, view, len(view), out)
                except E.BufferTooSmallError as exc:
                    exc.needed = int(out[0])
                    del exc               # no reference cycle through this frame (see _release)
                    raise
                return int(out[0])
        finally:
            _release(view)

    def state_read(self, data: Any, seq_id: int = -1, flags: int = 0, envelope: Optional[str] = None,
                   allow_trailing: bool = False) -> int:
        """Restore a state (whole, or into sequence seq_id as llama.cpp does).  Returns the bytes
        consumed.  On any error raises StateError and the memory is unchanged."""
        w = "state_read"
        s, f, env = self._state_args(w, seq_id, flags, envelope)
        view = ffi.from_buffer(data)
        g, out = self._guard, self._o_u64
        try:
            with g.lock:              # the out-parameter is shared: read it under the lock
                g.call(w, lib.pm_mem_state_read, s, f, env, view, len(view), bool(allow_trailing), out)
                return int(out[0])
        finally:
            _release(view)

    def state_check(self, data: Any, seq_id: int = -1, flags: int = 0, envelope: Optional[str] = None) -> int:
        """Validate a state for this memory without changing anything; returns the bytes it
        would consume.  Raises StateError naming what is wrong and where."""
        a = self._state_args("state_check", seq_id, flags, envelope)
        view = ffi.from_buffer(data)
        consumed = ffi.new("uint64_t *")
        try:
            self._guard.call("state_check", lib.pm_mem_state_check, *a, view, len(view), consumed)
        finally:
            _release(view)
        return int(consumed[0])

    # -- batches -------------------------------------------------------------------------------
    def init_batch(self, batch: Batch, n_ubatch: int = 512, n_vocab: int = 0, embd_all: bool = False) -> BatchContext:
        """Validate, split and dry-run a batch as llama_decode does.  Raises BatchError where
        llama.cpp returns -1 and NoSlotError where it returns 1; the memory is then unchanged."""
        out = ffi.new("pm_mctx **")
        n_ubatch, n_vocab = u32(n_ubatch, "n_ubatch", "init_batch"), u32(n_vocab, "n_vocab", "init_batch")
        with self._lock:
            self._guard.call("init_batch", lib.pm_mem_init_batch, _batch_ptr(batch), n_ubatch, n_vocab,
                             bool(embd_all), out)
            return BatchContext(self._guard, out[0])

    def check_batch(self, batch: Batch, n_vocab: int = 0, embd_all: bool = False) -> None:
        """Raise BatchError if llama.cpp would reject the batch (llama_decode returns -1)."""
        n_vocab = u32(n_vocab, "n_vocab", "check_batch")
        self._guard.call("batch", lib.pm_mem_check_batch, _batch_ptr(batch), n_vocab, bool(embd_all))

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

    # -- description ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """kv, iswa, recurrent, hybrid or hybrid_iswa."""
        k = _kinds.by_id(self._guard.call("kind", lib.pm_memory_kind, status=False))
        return k.name if k is not None else "?"

    def kv_parts(self) -> List[KVPart]:  # pragma: no cover - every kind overrides
        """The KV cache parts, in state order."""
        raise NotImplementedError

    def breakdown(self) -> List[Dict[str, Any]]:
        """Bytes per part, as llama.cpp's memory_breakdown: KV parts (K, V, cell metadata)
        then the recurrent part (r, s, cell metadata)."""
        out = ffi.new("pm_breakdown[]", 3)
        n = self._guard.call("breakdown", lib.pm_mem_breakdown, out, 3, status=False)
        kv_names = _kinds.by_name(self.kind).kv_parts
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
        return int(self._guard.call("nbytes", lib.pm_memory_nbytes, status=False))

    def __repr__(self) -> str:
        if self.closed:
            return f"<{type(self).__name__} closed>"
        parts = [f"{name} {p.size} cells" + (f" x {p.n_stream} streams" if p.n_stream > 1 else "") + f" {p.type_k}/{p.type_v}"
                 for name, p in zip(_kinds.by_name(self.kind).kv_parts, self.kv_parts())]
        rec = getattr(self, "recurrent", None)
        if rec is not None:
            parts.append(f"recurrent {rec.size} cells {rec.type_r}/{rec.type_s}")
        arch = f" {self.arch}" if self.arch else ""
        return f"<{type(self).__name__}{arch}: {', '.join(parts)}; {self.nbytes} bytes>"


def _batch_ptr(batch: Any) -> Any:
    if not isinstance(batch, Batch):
        raise TypeError(f"expected a pymem.Batch, not {type(batch).__name__}")
    return batch._ptr


def _restore(cls: "type[Memory]", parts: PartArgs, blob: bytes, model_path: Optional[str] = None) -> Memory:
    """A new ``cls`` memory from its parts' arguments, holding the state ``blob`` (copy, pickle)."""
    m = cls._from_parts(parts)
    if blob:
        m.state_read(blob)
    m.model_path = model_path
    return m


def _make(fn: str, *params: Any) -> Any:
    out = ffi.new("pm_memory **")
    check(getattr(lib, fn)(*params, out), fn.replace("pm_", "").replace("_new", ""))
    return out[0]


def _given(**kw: Any) -> Dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not _UNSET}


class _Unset:
    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


class KVCache(Memory, KVPart):
    """llama.cpp's KV cache (``llama_kv_cache``): cells with positions and sequence sets,
    slot search, K-shift, one or many streams, byte-compatible state.

    ``layers``, ``n_head_kv``, ``n_embd_head_k``/``n_embd_head_v``, ``k_rope_offset`` and
    ``rope`` follow the model's layers (ints apply to every layer; ``layers=None`` holds them
    all).  ``n_embd_head_v=None`` means ``n_embd_head_k``; ``rope=None``: the cache cannot
    shift.  ``v_trans`` is llama.cpp's ``not flash_attn``; ``unified=False`` gives one stream
    per sequence; ``format`` 11 is llama.cpp b11739's state format, 10 the older one;
    ``k_rot``/``v_rot`` override the Hadamard rotation widths llama.cpp picks (None = its
    choice); ``arch`` is needed only for llama.cpp's context envelope."""

    def __init__(
        self,
        n_layer: int,
        *,
        layers: Optional[Sequence[int]] = None,
        n_head_kv: Union[int, Sequence[int]] = 1,
        n_embd_head_k: Union[int, Sequence[int]] = 32,
        n_embd_head_v: Union[int, Sequence[int], None] = None,
        size: int = 4096,
        n_seq_max: int = 4,
        type_k: Union[str, int] = "f16",
        type_v: Union[str, int] = "f16",
        v_trans: bool = True,
        unified: bool = True,
        n_swa: int = 0,
        swa_type: str = "none",
        n_pos_per_embd: int = 1,
        rope: Union[Rope, Sequence[Optional[Rope]], None] = None,
        arch: Optional[str] = None,
        format: int = 11,
        k_rot: Optional[int] = None,
        v_rot: Optional[int] = None,
        cell_ext: Optional[bool] = None,
        n_embd_v_gqa_max: int = 0,
        can_shift: bool = True,
        k_rope_offset: Union[int, Sequence[int]] = 0,
    ) -> None:
        kw = dict(n_layer=n_layer, layers=layers, n_head_kv=n_head_kv, n_embd_head_k=n_embd_head_k,
                  n_embd_head_v=n_embd_head_v, size=size, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                  v_trans=v_trans, unified=unified, n_swa=n_swa, swa_type=swa_type, n_pos_per_embd=n_pos_per_embd,
                  rope=rope, arch=arch, format=format, k_rot=k_rot, v_rot=v_rot, cell_ext=cell_ext,
                  n_embd_v_gqa_max=n_embd_v_gqa_max, can_shift=can_shift, k_rope_offset=k_rope_offset)
        keep: list = []
        p = _kv_params(kw, keep)
        Memory.__init__(self, _make("pm_kv_new", p), {"kv": kw}, arch)
        self._init_part(self._guard, 0)

    @classmethod
    def _from_parts(cls, parts: PartArgs) -> "KVCache":
        return cls(**parts["kv"])

    def kv_parts(self) -> List[KVPart]:
        return [self]

    __repr__ = Memory.__repr__


class RecurrentMemory(Memory):
    """llama.cpp's recurrent memory (Mamba, RWKV, short-conv): one cell per sequence slot with
    the state rows of every recurrent layer; rollback snapshots with ``n_rs_seq``.

    ``n_embd_r`` / ``n_embd_s`` / ``n_embd_p`` are ints or one value per model layer;
    ``size`` defaults to max(1, n_seq_max)."""

    def __init__(
        self,
        n_layer: int,
        *,
        layers: Optional[Sequence[int]] = None,
        n_embd_r: Union[int, Sequence[int]] = 0,
        n_embd_s: Union[int, Sequence[int]] = 0,
        n_embd_p: Union[int, Sequence[int]] = 0,
        size: Optional[int] = None,
        n_seq_max: int = 1,
        type_r: Union[str, int] = "f32",
        type_s: Union[str, int] = "f32",
        n_rs_seq: int = 0,
        arch: Optional[str] = None,
    ) -> None:
        kw = dict(n_layer=n_layer, layers=layers, n_embd_r=n_embd_r, n_embd_s=n_embd_s, n_embd_p=n_embd_p,
                  size=size, n_seq_max=n_seq_max, type_r=type_r, type_s=type_s, n_rs_seq=n_rs_seq, arch=arch)
        keep: list = []
        p = _rec_params(kw, keep)
        super().__init__(_make("pm_recurrent_new", p), {"recurrent": kw}, arch)
        self.recurrent = RecurrentPart(self._guard)
        self.n_seq_max = self.recurrent.n_seq_max

    @classmethod
    def _from_parts(cls, parts: PartArgs) -> "RecurrentMemory":
        return cls(**parts["recurrent"])

    def kv_parts(self) -> List[KVPart]:
        return []


class KVCacheISWA(Memory):
    """llama.cpp's iSWA cache: a full-attention ``base`` cache plus a sliding-window ``swa``
    cache over disjoint layers.

    Either ``KVCacheISWA(base={...}, swa={...})`` with :class:`KVCache` keyword arguments for
    each part, or model-level arguments with llama.cpp's sizing: ``n_layer``, ``swa_layers``
    (the model layers with sliding-window attention), ``n_swa``, ``swa_full``, ``n_ubatch``,
    ``swa_type`` and any :class:`KVCache` argument (``size``, ``n_seq_max``, ...) in
    ``kv``."""

    def __init__(
        self,
        base: Optional[Dict[str, Any]] = None,
        swa: Optional[Dict[str, Any]] = None,
        *,
        n_layer: Any = _UNSET,
        swa_layers: Any = _UNSET,
        n_swa: Any = _UNSET,
        swa_full: Any = _UNSET,
        n_ubatch: Any = _UNSET,
        swa_type: Any = _UNSET,
        layers: Any = _UNSET,
        n_head_kv: Any = _UNSET,
        n_embd_head_k: Any = _UNSET,
        n_embd_head_v: Any = _UNSET,
        size: Any = _UNSET,
        n_seq_max: Any = _UNSET,
        type_k: Any = _UNSET,
        type_v: Any = _UNSET,
        v_trans: Any = _UNSET,
        unified: Any = _UNSET,
        n_pos_per_embd: Any = _UNSET,
        rope: Any = _UNSET,
        arch: Any = _UNSET,
        format: Any = _UNSET,
        k_rot: Any = _UNSET,
        v_rot: Any = _UNSET,
        cell_ext: Any = _UNSET,
        n_embd_v_gqa_max: Any = _UNSET,
        can_shift: Any = _UNSET,
        k_rope_offset: Any = _UNSET,
    ) -> None:
        kw = _given(n_layer=n_layer, swa_layers=swa_layers, n_swa=n_swa, swa_full=swa_full, n_ubatch=n_ubatch,
                    swa_type=swa_type, layers=layers, n_head_kv=n_head_kv, n_embd_head_k=n_embd_head_k,
                    n_embd_head_v=n_embd_head_v, size=size, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                    v_trans=v_trans, unified=unified, n_pos_per_embd=n_pos_per_embd, rope=rope, arch=arch,
                    format=format, k_rot=k_rot, v_rot=v_rot, cell_ext=cell_ext, n_embd_v_gqa_max=n_embd_v_gqa_max,
                    can_shift=can_shift, k_rope_offset=k_rope_offset)
        if base is None and swa is None:
            for need in ("n_layer", "swa_layers", "n_swa"):
                if need not in kw:
                    raise TypeError(f"KVCacheISWA needs base= and swa=, or model-level arguments with {need}")
        b, w = _iswa_kwargs(base, swa, kw)
        keep: list = []
        pb = _kv_params(b, keep)
        pw = _kv_params(w, keep)
        super().__init__(_make("pm_iswa_new", pb, pw), {"base": b, "swa": w}, b.get("arch"))
        self.base = KVPart(self._guard, 0)
        self.swa = KVPart(self._guard, 1)
        self.n_seq_max = self.base.n_seq_max

    @classmethod
    def _from_parts(cls, parts: PartArgs) -> "KVCacheISWA":
        return cls(base=parts["base"], swa=parts["swa"])

    def kv_parts(self) -> List[KVPart]:
        return [self.base, self.swa]


class HybridMemory(Memory):
    """llama.cpp's hybrid memory: an attention KV cache (``attn``: :class:`KVCache` keyword
    arguments) plus a recurrent memory (``recurrent``: :class:`RecurrentMemory` keyword
    arguments) over disjoint layers (Jamba, LFM2, Granite-hybrid, ...)."""

    def __init__(self, attn: Dict[str, Any], recurrent: Dict[str, Any]) -> None:
        a, r = _part_args(attn, "attn", KVCache), _part_args(recurrent, "recurrent", RecurrentMemory)
        keep: list = []
        pa = _kv_params(a, keep)
        pr = _rec_params(r, keep)
        super().__init__(_make("pm_hybrid_new", pa, pr), {"attn": a, "recurrent": r}, a.get("arch"))
        self.attn = KVPart(self._guard, 0)
        self.recurrent = RecurrentPart(self._guard)

    @classmethod
    def _from_parts(cls, parts: PartArgs) -> "HybridMemory":
        return cls(attn=parts["attn"], recurrent=parts["recurrent"])

    def kv_parts(self) -> List[KVPart]:
        return [self.attn]


class HybridISWAMemory(Memory):
    """llama.cpp's hybrid-iSWA memory: an iSWA attention cache (``base`` + ``swa``) plus a
    recurrent memory.  ``attn`` is ``{"base": {...}, "swa": {...}}`` or model-level iSWA
    arguments (see :class:`KVCacheISWA`); ``recurrent``: :class:`RecurrentMemory` keyword
    arguments."""

    def __init__(self, attn: Dict[str, Any], recurrent: Dict[str, Any]) -> None:
        a = dict(_part_args(attn, "attn", None))
        b, w = _iswa_kwargs(a.pop("base", None), a.pop("swa", None), a)
        r = _part_args(recurrent, "recurrent", RecurrentMemory)
        keep: list = []
        pb = _kv_params(b, keep)
        pw = _kv_params(w, keep)
        pr = _rec_params(r, keep)
        super().__init__(_make("pm_hybrid_iswa_new", pb, pw, pr), {"base": b, "swa": w, "recurrent": r},
                         b.get("arch"))
        self.base = KVPart(self._guard, 0)
        self.swa = KVPart(self._guard, 1)
        self.recurrent = RecurrentPart(self._guard)
        self.n_seq_max = self.base.n_seq_max

    @classmethod
    def _from_parts(cls, parts: PartArgs) -> "HybridISWAMemory":
        return cls(attn={"base": parts["base"], "swa": parts["swa"]}, recurrent=parts["recurrent"])

    def kv_parts(self) -> List[KVPart]:
        return [self.base, self.swa]


def _part_args(x: Any, name: str, cls: Optional[type]) -> Dict[str, Any]:
    if not isinstance(x, dict):
        raise TypeError(f"{name} must be a dict of {cls.__name__ if cls else 'KVCacheISWA'} keyword arguments, "
                        f"not {type(x).__name__}")
    return dict(x)

