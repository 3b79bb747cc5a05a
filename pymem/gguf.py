"""The GGUF side of the planner: the hyper-parameters of a model file.

:func:`read_hparams` reads the hyper-parameters the memory module needs with the ``gguf``
package, following llama.cpp's loader (``llama_model_base::load_hparams`` plus the per-arch
``load_arch_hparams``) for the supported architectures (:data:`SUPPORTED_ARCHS`).

What llama.cpp's ``create_memory`` builds from them is :mod:`pymem.plan` (``memory_spec``,
``from_gguf``, ``estimate``, ``max_context``; re-exported here for older imports).

Target: llama.cpp b11739 (the ``llama-cpp-py-sync==0.11739`` wheel).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _errors as E

__all__ = [
    "SUPPORTED_ARCHS",
    "Hparams",
    "read_hparams",
    "pad",
]

PathLike = Union[str, "os.PathLike[str]"]


_F32 = np.float32


def pad(x: int, n: int = 256) -> int:
    """``GGML_PAD``: ``x`` rounded up to a multiple of ``n``."""
    return ((int(x) + n - 1) // n) * n


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    rope_type: str                 # llama_model_rope_type
    recurrent: bool = False        # llm_arch_is_recurrent
    hybrid: bool = False           # llm_arch_is_hybrid
    rs_rollback: bool = False      # llm_arch_supports_rs_rollback
    rope_freqs: bool = False       # creates the optional rope_freqs tensor (freq factors)
    longrope: bool = False         # creates rope_factors_long/short with LONGROPE scaling


_ARCHS: Dict[str, _Arch] = {
    "llama": _Arch("norm", rope_freqs=True, longrope=True),
    "qwen2": _Arch("neox"),
    "qwen3": _Arch("neox"),
    "gemma2": _Arch("neox"),
    "gemma3": _Arch("neox"),
    "mamba": _Arch("none", recurrent=True),
    "mamba2": _Arch("none", recurrent=True),
    "rwkv6": _Arch("none", recurrent=True),
    "rwkv7": _Arch("none", recurrent=True),
    "jamba": _Arch("none", hybrid=True),
    "lfm2": _Arch("neox", hybrid=True, rs_rollback=True),
    "granitehybrid": _Arch("norm", hybrid=True, rope_freqs=True),
    "falcon-h1": _Arch("neox", hybrid=True, rope_freqs=True),
    "nemotron_h": _Arch("none", hybrid=True, rs_rollback=True),
}

#: architectures read_hparams understands (llama.cpp's ``general.architecture`` names)
SUPPORTED_ARCHS: Tuple[str, ...] = tuple(_ARCHS)

_ROPE_SCALING = ("none", "linear", "yarn", "longrope")


# ---------------------------------------------------------------------------------------------
# hyper-parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hparams:
    """The hyper-parameters llama.cpp's memory module uses, as its loader derives them.

    Per-layer values are tuples over ALL model layers (``n_layer``, llama.cpp's
    ``n_layer_all``, which includes ``n_layer_nextn`` MTP layers)."""

    arch: str
    n_layer: int
    n_layer_nextn: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: Tuple[int, ...]
    n_head_kv: Tuple[int, ...]
    n_ff: Tuple[int, ...]
    n_embd_head_k: Tuple[int, ...]       # per layer (SWA layers may differ)
    n_embd_head_v: Tuple[int, ...]
    n_rot: Tuple[int, ...]               # rope dims per layer
    rope_type: str                       # none | norm | neox | mrope | imrope | vision
    has_rope: Tuple[bool, ...]           # llama_hparams::has_rope (rope_pattern / router layer)
    rope_freq_base_train: float
    rope_freq_scale_train: float
    rope_freq_base_train_swa: float
    rope_freq_scale_train_swa: float
    rope_scaling_type: str               # none | linear | yarn | longrope
    rope_attn_factor: float
    n_ctx_orig_yarn: int
    yarn_ext_factor: float               # -1 = not set
    yarn_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    rope_yarn_log_mul: float
    rope_freqs: Optional[Tuple[float, ...]]           # rope_freqs.weight (all layers share it)
    rope_factors_long: Optional[Tuple[float, ...]]
    rope_factors_short: Optional[Tuple[float, ...]]
    n_swa: int
    swa_type: str                        # none | standard | chunked | symmetric
    is_swa: Tuple[bool, ...]
    is_recurrent: Tuple[bool, ...]       # llama_hparams::is_recr
    ssm_d_conv: int
    ssm_d_inner: int
    ssm_d_state: int
    ssm_dt_rank: int
    ssm_n_group: int
    wkv_head_size: int
    token_shift_count: int
    n_shortconv_l_cache: int
    causal_attn: bool
    n_pos_per_embd: int
    can_shift: bool                      # llama_kv_cache::get_can_shift
    supports_rs_rollback: bool

    # -- derived, as llama_hparams ------------------------------------------------------------
    @property
    def n_layer_main(self) -> int:
        """``llama_hparams::n_layer()``: layers without the MTP (nextn) ones."""
        return self.n_layer - self.n_layer_nextn

    def n_embd_k_gqa(self, il: int) -> int:
        return self.n_embd_head_k[il] * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return self.n_embd_head_v[il] * self.n_head_kv[il]

    @property
    def n_embd_v_gqa_max(self) -> int:
        return max([self.n_embd_v_gqa(il) for il in range(self.n_layer)] or [0])

    @property
    def n_embd_r(self) -> int:
        """Row width of the recurrent r state (conv / token shift), llama_hparams::n_embd_r."""
        if self.wkv_head_size:
            return self.token_shift_count * self.n_embd
        if self.n_shortconv_l_cache:
            return self.n_embd * (self.n_shortconv_l_cache - 1)
        d_conv = self.ssm_d_conv - 1 if self.ssm_d_conv > 0 else 0
        return d_conv * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self) -> int:
        """Row width of the recurrent s state (ssm / wkv), llama_hparams::n_embd_s."""
        if self.wkv_head_size:
            return self.n_embd * self.wkv_head_size
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def is_recurrent_arch(self) -> bool:
        return _ARCHS[self.arch].recurrent

    @property
    def is_hybrid_arch(self) -> bool:
        return _ARCHS[self.arch].hybrid

    @property
    def memory_kind(self) -> str:
        """The memory llama.cpp's create_memory builds: kv, iswa, recurrent, hybrid, hybrid_iswa."""
        if self.is_recurrent_arch:
            return "recurrent"
        if self.is_hybrid_arch:
            return "hybrid_iswa" if self.swa_type != "none" else "hybrid"
        return "iswa" if self.swa_type != "none" else "kv"

    def attn_layers(self) -> List[int]:
        """Model layers holding KV cache (before the iSWA split), per create_memory's filters."""
        kind = self.memory_kind
        if kind == "recurrent":
            return []
        out = []
        for il in range(self.n_layer):
            if kind in ("hybrid", "hybrid_iswa"):
                if self.arch == "falcon-h1":
                    keep = True
                elif self.arch == "nemotron_h":
                    keep = not self.is_recurrent[il] and self.n_ff[il] == 0
                else:
                    keep = not self.is_recurrent[il]
            else:
                # plain / iSWA: MTP layers are filtered out of the main context's cache
                keep = not (self.n_layer_nextn > 0 and self.n_layer_main > 0) or il < self.n_layer_main
            if keep:
                out.append(il)
        return out

    def recurrent_layers(self) -> List[int]:
        """Model layers holding recurrent state (over llama_hparams::n_layer())."""
        kind = self.memory_kind
        if kind == "recurrent":
            return list(range(self.n_layer_main))
        if kind not in ("hybrid", "hybrid_iswa"):
            return []
        out = []
        for il in range(self.n_layer_main):
            if self.arch == "falcon-h1":
                keep = True
            elif self.arch == "nemotron_h":
                keep = self.is_recurrent[il] and self.n_ff[il] == 0
            else:
                keep = self.is_recurrent[il]
            if keep:
                out.append(il)
        return out


class _Meta:
    """Typed access to GGUF metadata with llama.cpp's ``get_key`` / ``get_key_or_arr`` rules."""

    def __init__(self, path: PathLike) -> None:
        try:
            import gguf  # the gguf-py package (not this module)
        except ImportError as exc:  # pragma: no cover - gguf is a dependency
            raise E.UnsupportedError("reading GGUF files needs the 'gguf' package") from exc
        self.path = os.fspath(path)
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (OSError, ValueError) as exc:
            raise E.InvalidArgumentError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.fields = self.reader.fields
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise E.InvalidArgumentError(f"{self.path}: general.architecture is missing")
        self.arch = arch

    def _is_array(self, key: str) -> bool:
        f = self.fields[key]
        return bool(f.types) and f.types[0] == self._gguf.GGUFValueType.ARRAY

    def _value(self, f: Any) -> Any:
        if hasattr(f, "contents"):
            v = f.contents()
            return bytes(v).decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else v
        # gguf-py releases without ReaderField.contents()
        vt = self._gguf.GGUFValueType
        last = f.types[-1]

        def one(idx: int) -> Any:
            part = f.parts[idx]
            return bytes(part).decode("utf-8", "replace") if last == vt.STRING else part.tolist()[0]

        if f.types[0] == vt.ARRAY:
            return [one(i) for i in f.data]
        return one(f.data[0])

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        f = self.fields.get(key)
        if f is None:
            if required:
                raise E.InvalidArgumentError(f"{self.path}: key not found in model: {key}")
            return default
        return self._value(f)

    def arr_len(self, key: str) -> Optional[int]:
        f = self.fields.get(key)
        return None if f is None else len(f.data)

    def arch_key(self, suffix: str, default: Any = None, required: bool = False) -> Any:
        key = f"{self.arch}.{suffix}"
        if key in self.fields and self._is_array(key):
            raise E.InvalidArgumentError(f"{self.path}: expected a scalar, found an array for key {key}")
        return self.get(key, default, required)

    def arch_has(self, suffix: str) -> bool:
        return f"{self.arch}.{suffix}" in self.fields

    def key_or_arr(self, suffix: str, n: int, default: Sequence[Any]) -> List[Any]:
        """llama_model_loader::get_key_or_arr: a scalar repeated n times, or an array of n."""
        key = f"{self.arch}.{suffix}"
        if key not in self.fields:
            return list(default)
        v = self.get(key)
        if self._is_array(key):
            if len(v) != n:
                raise E.InvalidArgumentError(
                    f"{self.path}: key {key} has wrong array length; expected {n}, got {len(v)}")
            return list(v)
        return [v] * n

    def arr(self, suffix: str) -> Optional[List[Any]]:
        key = f"{self.arch}.{suffix}"
        if key not in self.fields or not self._is_array(key):
            return None
        return list(self.get(key))

    def tensor(self, name: str) -> Optional[Tuple[float, ...]]:
        for t in self.reader.tensors:
            if t.name == name:
                tt = self._gguf.GGMLQuantizationType
                if t.tensor_type == tt.F32:
                    a = np.asarray(t.data, dtype=np.float32)
                elif t.tensor_type == tt.F16:
                    a = np.asarray(t.data, dtype=np.float16).astype(np.float32)
                elif t.tensor_type == tt.BF16:
                    raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
                    a = raw.view(np.float32)
                else:
                    raise E.UnsupportedError(f"{self.path}: tensor {name} has type {t.tensor_type.name}")
                return tuple(float(x) for x in a.reshape(-1))
        return None


def _f32(x: Any) -> float:
    return float(_F32(x))


def read_hparams(path: PathLike) -> Hparams:
    """Read the memory-relevant hyper-parameters of a GGUF model, as llama.cpp b11739's loader
    derives them.  Raises ``pymem.UnsupportedError`` (naming the architecture) for an
    architecture not in :data:`SUPPORTED_ARCHS`, and ``pymem.InvalidArgumentError`` naming the
    file where llama.cpp would refuse to load it (missing required key, bad array length, ...)
    or the file is truncated or corrupt."""
    try:
        return _read_hparams(path)
    except E.Error:
        raise
    except Exception as exc:  # whatever a truncated or corrupted file makes the GGUF reader raise
        raise E.InvalidArgumentError(f"{os.fspath(path)}: not a valid GGUF file "
                                     f"({type(exc).__name__}: {exc})") from None


def _read_hparams(path: PathLike) -> Hparams:
    m = _Meta(path)
    arch = m.arch
    spec = _ARCHS.get(arch)
    if spec is None:
        raise E.UnsupportedError(
            f"architecture {arch!r} is not supported by pymem.gguf (supported: {', '.join(SUPPORTED_ARCHS)})")

    # -- llama_model_base::load_hparams --------------------------------------------------------
    n_ctx_train = int(m.arch_key("context_length", required=True))
    n_embd = int(m.arch_key("embedding_length", required=True))
    causal_attn = bool(m.arch_key("attention.causal", True))
    n_layer = int(m.arch_key("block_count", required=True))
    if not 0 < n_layer <= 512:
        raise E.InvalidArgumentError(f"{m.path}: block_count {n_layer} out of range")
    n_layer_nextn = int(m.arch_key("nextn_predict_layers", 0))
    if n_layer_nextn > n_layer:
        raise E.InvalidArgumentError(f"{m.path}: nextn_predict_layers {n_layer_nextn} > block_count {n_layer}")
    n_vocab = m.arch_key("vocab_size")
    if n_vocab is None:
        n_vocab = m.arr_len("tokenizer.ggml.tokens") or 0
    n_ff = [int(x) for x in m.key_or_arr("feed_forward_length", n_layer, [0] * n_layer)]
    n_head = [int(x) for x in m.key_or_arr("attention.head_count", n_layer, [0] * n_layer)]
    n_head_kv = [int(x) for x in m.key_or_arr("attention.head_count_kv", n_layer, n_head)]

    n_ctx_orig_yarn = int(m.arch_key("rope.scaling.original_context_length", n_ctx_train))
    rope_freq_base = _f32(m.arch_key("rope.freq_base", 10000.0))
    scaling = str(m.arch_key("rope.scaling.type", "linear"))
    if scaling not in _ROPE_SCALING:
        raise E.InvalidArgumentError(f"{m.path}: unknown rope scaling type {scaling!r}")
    ropescale = m.arch_key("rope.scaling.factor")
    if ropescale is None:
        ropescale = m.arch_key("rope.scale_linear", 0.0)
    ropescale = _F32(ropescale)
    rope_freq_scale = 1.0 if ropescale == 0 else _f32(_F32(1.0) / ropescale)
    rope_attn_factor = _f32(m.arch_key("rope.scaling.attn_factor", 1.0))

    if n_head[0] > 0:
        head_k = n_embd // n_head[0]
        head_k = int(m.arch_key("attention.key_length", head_k))
        head_v = n_embd // n_head[0]
        head_v = int(m.arch_key("attention.value_length", head_v))
        n_rot_full = int(m.arch_key("rope.dimension_count", head_k))
        if arch == "llama" and n_rot_full != head_k:
            raise E.InvalidArgumentError(f"{m.path}: invalid n_rot: {n_rot_full}, expected {head_k}")
    else:
        head_k = head_v = n_rot_full = 0
    head_k_swa = int(m.arch_key("attention.key_length_swa", head_k))
    head_v_swa = int(m.arch_key("attention.value_length_swa", head_v))
    n_rot_swa = int(m.arch_key("rope.dimension_count_swa", n_rot_full))

    # -- per-arch state (llama_model_<arch>::load_arch_hparams) --------------------------------
    st: Dict[str, Any] = {
        "n_swa": 0, "swa_type": "none", "is_swa": [False] * n_layer,
        "is_recr": [spec.recurrent] * n_layer, "rope_pattern": [True] * n_layer,
        "base_swa": 10000.0, "scale_swa": 1.0,
        "d_conv": 0, "d_inner": 0, "d_state": 0, "dt_rank": 0, "n_group": 0,
        "wkv_head_size": 0, "token_shift_count": 2, "l_cache": 0,
        "yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0,
        "yarn_beta_slow": 1.0, "yarn_log_mul": 0.0,
    }
    n_layer_main = n_layer - n_layer_nextn

    def swa_pattern(n_pattern: int, dense_first: bool = False) -> None:
        # llama_model_base::load_swa_pattern
        arr = m.arr("attention.sliding_window_pattern")
        if arr is not None:
            if len(arr) > n_layer:
                raise E.InvalidArgumentError(f"{m.path}: sliding_window_pattern longer than block_count")
            st["is_swa"] = [bool(arr[il]) if il < len(arr) else False for il in range(n_layer)]
            return
        n_pattern = int(m.arch_key("attention.sliding_window_pattern", n_pattern))
        out = []
        for il in range(n_layer):
            if il >= n_layer_main:
                out.append(False)
            elif dense_first:
                out.append(n_pattern == 0 or il % n_pattern != 0)
            else:
                out.append(n_pattern == 0 or il % n_pattern < n_pattern - 1)
        st["is_swa"] = out

    def ssm(group: bool) -> None:
        st["d_conv"] = int(m.arch_key("ssm.conv_kernel", required=True))
        st["d_inner"] = int(m.arch_key("ssm.inner_size", required=True))
        st["d_state"] = int(m.arch_key("ssm.state_size", required=True))
        st["dt_rank"] = int(m.arch_key("ssm.time_step_rank", required=True))
        if group:
            st["n_group"] = int(m.arch_key("ssm.group_count", required=True))

    if arch == "gemma2":
        st["swa_type"], st["n_swa"] = "standard", 4096
        swa_pattern(2)
        st["base_swa"], st["scale_swa"] = rope_freq_base, rope_freq_scale
        st["base_swa"] = _f32(m.arch_key("rope.freq_base_swa", st["base_swa"]))
        st["n_swa"] = int(m.arch_key("attention.sliding_window", st["n_swa"]))
    elif arch == "gemma3":
        n_swa = m.arch_key("attention.sliding_window")
        if n_swa is not None:
            st["n_swa"] = int(n_swa)
        if n_swa is not None and int(n_swa) > 0:
            st["swa_type"] = "standard"
            swa_pattern(6)
            st["base_swa"] = _f32(m.arch_key("rope.freq_base_swa", st["base_swa"]))
    elif arch == "mamba":
        ssm(group=False)
    elif arch in ("mamba2", "falcon-h1", "granitehybrid", "nemotron_h"):
        ssm(group=True)
    elif arch in ("rwkv6", "rwkv7"):
        st["wkv_head_size"] = int(m.arch_key("wkv.head_size", required=True))
        st["token_shift_count"] = int(m.arch_key("token_shift_count", 2))
    elif arch == "jamba":
        ssm(group=False)
    elif arch == "lfm2":
        st["l_cache"] = int(m.arch_key("shortconv.l_cache", required=True))

    if arch in ("jamba", "lfm2", "granitehybrid"):
        st["is_recr"] = [n_head_kv[il] == 0 for il in range(n_layer)]
    elif arch == "falcon-h1":
        st["is_recr"] = [True] * n_layer
    elif arch == "nemotron_h":
        st["is_recr"] = [il < n_layer_main and n_head_kv[il] == 0 and n_ff[il] == 0 for il in range(n_layer)]
    if arch == "lfm2":
        n_swa = m.arch_key("attention.sliding_window")
        if n_swa is not None:
            st["n_swa"] = int(n_swa)
        if n_swa is not None and int(n_swa) > 0:
            st["swa_type"] = "standard"
            st["is_swa"] = [not r for r in st["is_recr"]]
    if arch == "granitehybrid":
        # granite uses rope_finetuned as the switch for rope (default true)
        st["rope_pattern"] = [bool(m.arch_key("rope.scaling.finetuned", True))] * n_layer

    # -- rope tensors ------------------------------------------------------------------------
    rope_freqs = rope_long = rope_short = None
    if spec.longrope and scaling == "longrope":
        rope_long = m.tensor("rope_factors_long.weight")
        rope_short = m.tensor("rope_factors_short.weight")
    elif spec.rope_freqs:
        rope_freqs = m.tensor("rope_freqs.weight")

    rope_type = spec.rope_type
    n_pos_per_embd = 4 if rope_type in ("mrope", "imrope") else 1
    is_swa = tuple(bool(x) for x in st["is_swa"])
    if st["swa_type"] == "none" and any(is_swa):
        raise E.InvalidArgumentError(f"{m.path}: SWA layers without a sliding window")
    if st["swa_type"] != "none" and not any(is_swa) and spec.hybrid is False:
        raise E.InvalidArgumentError(f"{m.path}: sliding window set but no layer is SWA")

    return Hparams(
        arch=arch,
        n_layer=n_layer,
        n_layer_nextn=n_layer_nextn,
        n_embd=n_embd,
        n_vocab=int(n_vocab),
        n_ctx_train=n_ctx_train,
        n_head=tuple(n_head),
        n_head_kv=tuple(n_head_kv),
        n_ff=tuple(n_ff),
        n_embd_head_k=tuple(head_k_swa if s else head_k for s in is_swa),
        n_embd_head_v=tuple(head_v_swa if s else head_v for s in is_swa),
        n_rot=tuple(n_rot_swa if s else n_rot_full for s in is_swa),
        rope_type=rope_type,
        has_rope=tuple(bool(x) for x in st["rope_pattern"]),
        rope_freq_base_train=rope_freq_base,
        rope_freq_scale_train=rope_freq_scale,
        rope_freq_base_train_swa=_f32(st["base_swa"]),
        rope_freq_scale_train_swa=_f32(st["scale_swa"]),
        rope_scaling_type=scaling,
        rope_attn_factor=rope_attn_factor,
        n_ctx_orig_yarn=n_ctx_orig_yarn,
        yarn_ext_factor=_f32(st["yarn_ext_factor"]),
        yarn_attn_factor=_f32(st["yarn_attn_factor"]),
        yarn_beta_fast=_f32(st["yarn_beta_fast"]),
        yarn_beta_slow=_f32(st["yarn_beta_slow"]),
        rope_yarn_log_mul=_f32(st["yarn_log_mul"]),
        rope_freqs=rope_freqs,
        rope_factors_long=rope_long,
        rope_factors_short=rope_short,
        n_swa=int(st["n_swa"]),
        swa_type=st["swa_type"],
        is_swa=is_swa,
        is_recurrent=tuple(bool(x) for x in st["is_recr"]),
        ssm_d_conv=st["d_conv"],
        ssm_d_inner=st["d_inner"],
        ssm_d_state=st["d_state"],
        ssm_dt_rank=st["dt_rank"],
        ssm_n_group=st["n_group"],
        wkv_head_size=st["wkv_head_size"],
        token_shift_count=st["token_shift_count"],
        n_shortconv_l_cache=st["l_cache"],
        causal_attn=causal_attn,
        n_pos_per_embd=n_pos_per_embd,
        can_shift=arch != "step35" and n_pos_per_embd == 1,
        supports_rs_rollback=spec.rs_rollback,
    )


def __getattr__(name: str) -> Any:  # the planner's names, from pymem.plan (PEP 562)
    if name in ("PartSpec", "MemorySpec", "Estimate", "memory_spec", "build_memory", "from_gguf", "estimate",
                "max_context", "MAX_SEQ", "DEFAULT_N_BATCH"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
