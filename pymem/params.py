"""Memory parameters: ggml cache types, RoPE parameters, and the C parameter blocks
(``pm_kv_params`` / ``pm_rec_params``) built from the constructors' keyword arguments."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import _errors as E
from ._guard import i32
from ._native import check, ffi, lib

__all__ = ["Rope", "type_id", "type_name", "row_size", "STATE_PARTIAL_ONLY", "STATE_SWA_ONLY"]

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


def _per_layer(value: Any, n_layer: int, what: str) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [_u32(value, what)] * n_layer
    vals = [_u32(v, what) for v in value]
    if len(vals) != n_layer:
        raise E.InvalidArgumentError(f"{what} needs one value per model layer ({n_layer}), got {len(vals)}")
    return vals


_KV_DEFAULTS = dict(
    layers=None, n_head_kv=1, n_embd_head_k=32, n_embd_head_v=None, size=4096, n_seq_max=4,
    type_k="f16", type_v="f16", v_trans=True, unified=True, n_swa=0, swa_type="none",
    n_pos_per_embd=1, rope=None, arch=None, format=11, k_rot=None, v_rot=None, cell_ext=None,
    n_embd_v_gqa_max=0, can_shift=True, k_rope_offset=0,
)


#: model layers a memory may describe (llama.cpp's LLAMA_MAX_LAYERS is 512)
_MAX_LAYERS = 1 << 16


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
    if n_layer > _MAX_LAYERS:   # per-layer lists are built from it: bound it before allocating
        raise E.InvalidArgumentError(f"n_layer must be <= {_MAX_LAYERS}, got {n_layer}")
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
    p.k_rot = -1 if a["k_rot"] is None else i32(a["k_rot"], "k_rot", "KV cache")
    p.v_rot = -1 if a["v_rot"] is None else i32(a["v_rot"], "v_rot", "KV cache")
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
    if not 0 <= n_layer <= _MAX_LAYERS:
        raise E.InvalidArgumentError(f"n_layer must be in [0, {_MAX_LAYERS}], got {n_layer}")
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
