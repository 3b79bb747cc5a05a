"""Memory layouts from GGUF files: what llama.cpp's ``create_memory`` builds for a model.

:func:`read_hparams` reads the hyper-parameters the memory module needs with the ``gguf``
package, following llama.cpp's loader (``llama_model_base::load_hparams`` plus the per-arch
``load_arch_hparams``) for the supported architectures (:data:`SUPPORTED_ARCHS`).

:func:`memory_spec` turns them plus context parameters into a :class:`MemorySpec`: the kind of
memory (``kv``, ``iswa``, ``recurrent``, ``hybrid``, ``hybrid_iswa``), the context sizes as
llama.cpp rounds them, and for every part the exact keyword arguments of pymem's constructors
(``pymem.KVCache(**part.kwargs)`` for a KV part), including the final RoPE parameters
llama.cpp's K-shift uses.  :func:`from_gguf` builds the memory, :func:`estimate` reports its
sizes without allocating and :func:`max_context` inverts that.

Target: llama.cpp b11739 (the ``llama-cpp-py-sync==0.11739`` wheel).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _errors as E
from .memory import Rope, row_size, type_id, type_name

__all__ = [
    "SUPPORTED_ARCHS",
    "Hparams",
    "PartSpec",
    "MemorySpec",
    "Estimate",
    "read_hparams",
    "memory_spec",
    "build_memory",
    "from_gguf",
    "estimate",
    "max_context",
    "pad",
]

PathLike = Union[str, "os.PathLike[str]"]

#: llama.cpp's LLAMA_MAX_SEQ
MAX_SEQ = 256
#: llama_context_default_params().n_batch
DEFAULT_N_BATCH = 2048
#: largest cells per stream max_context searches (llama.cpp keeps sizes in uint32)
_MAX_CELLS = 1 << 26

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
    architecture not in :data:`SUPPORTED_ARCHS`, and ``pymem.InvalidArgumentError`` where
    llama.cpp would refuse to load the file (missing required key, bad array length, ...)."""
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


# ---------------------------------------------------------------------------------------------
# context parameters -> memory spec
# ---------------------------------------------------------------------------------------------
@dataclass
class PartSpec:
    """One part of a memory: ``kind`` "kv" (``pymem.KVCache(**kwargs)``) or "recurrent"
    (``pymem.RecurrentMemory(**kwargs)``).  ``name``: kv | base | swa | attn | recurrent."""

    name: str
    kind: str
    kwargs: Dict[str, Any]
    #: KV parts: the Hadamard rotation sizes llama.cpp writes as k_rot / v_rot (0 = off)
    k_rot: int = 0
    v_rot: int = 0

    @property
    def layers(self) -> List[int]:
        return list(self.kwargs["layers"])

    @property
    def size(self) -> int:
        return int(self.kwargs["size"])


@dataclass
class MemorySpec:
    """What llama.cpp's ``create_memory`` builds for a model and context parameters.

    ``parts`` are in state-section order: kv -> [kv]; iswa -> [base, swa]; recurrent ->
    [recurrent]; hybrid -> [attn, recurrent]; hybrid_iswa -> [base, swa, recurrent]."""

    kind: str
    arch: str
    n_ctx: int                # llama_n_ctx (total cells after rounding)
    n_ctx_seq: int            # llama_n_ctx_seq (cells per stream)
    n_seq_max: int
    n_stream: int
    unified: bool
    flash_attn: bool
    v_trans: bool
    swa_full: bool
    n_batch: int              # effective cparams.n_batch
    n_ubatch: int             # effective cparams.n_ubatch
    n_rs_seq: int             # effective (0 for archs without rollback support)
    type_k: str
    type_v: str
    format: int
    rope: Dict[str, float]    # context-level RoPE/YaRN values (cparams)
    parts: List[PartSpec] = field(default_factory=list)
    #: llama_memory_can_shift of the whole memory (iSWA: only when both halves have one size)
    can_shift: bool = True

    def part(self, name: str) -> PartSpec:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"memory spec of kind {self.kind!r} has no part {name!r} "
                       f"(parts: {[p.name for p in self.parts]})")

    @property
    def part_names(self) -> List[str]:
        return [p.name for p in self.parts]


def _is_quantized(t: str) -> bool:
    return type_name(type_id(t)) not in ("f32", "f16", "bf16")


def _flash(flash_attn: Any) -> Tuple[bool, bool]:
    """(enabled, auto) from True/False/1/0/-1/"auto"."""
    if isinstance(flash_attn, str):
        if flash_attn.lower() != "auto":
            raise E.InvalidArgumentError(f"flash_attn must be a bool or 'auto', got {flash_attn!r}")
        return True, True
    if flash_attn is None or int(flash_attn) < 0:
        return True, True
    return bool(flash_attn), False


def _cparams(hp: Hparams, n_ctx: int, n_seq_max: int, unified: bool, n_ubatch: int, n_batch: int,
             n_rs_seq: int) -> Dict[str, Any]:
    """The parts of llama_context's constructor that shape the memory (llama-context.cpp)."""
    if n_seq_max > MAX_SEQ:
        raise E.InvalidArgumentError(f"n_seq_max must be <= {MAX_SEQ}")
    if n_ctx < 0 or n_ubatch < 0 or n_batch < 0 or n_rs_seq < 0 or n_seq_max < 0:
        raise E.InvalidArgumentError("n_ctx, n_seq_max, n_ubatch, n_batch and n_rs_seq must be >= 0")
    if max(n_ctx, n_ubatch, n_batch, n_rs_seq) > 0xFFFFFFFF:
        raise E.InvalidArgumentError("n_ctx, n_ubatch, n_batch and n_rs_seq must fit in uint32 "
                                     "(llama_context_params)")
    n_seq_max = max(1, int(n_seq_max))
    n_rs = int(n_rs_seq) if hp.supports_rs_rollback else 0
    n_ctx_req = int(n_ctx) if n_ctx else hp.n_ctx_train

    freq_base = _F32(hp.rope_freq_base_train)
    freq_scale = _F32(hp.rope_freq_scale_train)
    if hp.rope_scaling_type == "none":
        freq_scale = _F32(1.0)
    ext = _F32(hp.yarn_ext_factor)
    if ext < 0:
        ext = _F32(1.0 if hp.rope_scaling_type == "yarn" else 0.0)
    attn = _F32(hp.yarn_attn_factor)
    if ext != 0:
        def mscale(scale: np.float32, ms: np.float32) -> np.float32:
            return _F32(1.0) if scale <= 1 else _F32(_F32(0.1) * ms * np.log(scale) + _F32(1.0))

        factor = _F32(_F32(1.0) / freq_scale)
        if hp.rope_yarn_log_mul != 0:
            attn = _F32(mscale(factor, _F32(1.0)) / mscale(factor, _F32(hp.rope_yarn_log_mul)))
        else:
            attn = mscale(factor, _F32(1.0))
        attn = _F32(attn * _F32(_F32(1.0) / (_F32(1.0) + _F32(0.1) * np.log(factor))))
    attn = _F32(attn * _F32(hp.rope_attn_factor))

    n_batch_eff = min(n_ctx_req, int(n_batch)) if hp.causal_attn else int(n_batch)
    n_ubatch_eff = min(n_batch_eff, int(n_ubatch) if n_ubatch else n_batch_eff)

    n_ctx_pad = pad(n_ctx_req, 256)
    if unified:
        n_ctx_seq = n_ctx_pad
    else:
        n_ctx_seq = pad(n_ctx_pad // n_seq_max, 256)
        if n_ctx_seq == 0:
            raise E.InvalidArgumentError("n_ctx_seq == 0")
        n_ctx_pad = n_ctx_seq * n_seq_max
    return {
        "n_ctx": n_ctx_pad, "n_ctx_seq": n_ctx_seq, "n_seq_max": n_seq_max, "n_rs_seq": n_rs,
        "n_batch": n_batch_eff, "n_ubatch": n_ubatch_eff,
        "rope": {
            "freq_base": float(freq_base), "freq_scale": float(freq_scale),
            "ext_factor": float(ext), "attn_factor": float(attn),
            "beta_fast": float(hp.yarn_beta_fast), "beta_slow": float(hp.yarn_beta_slow),
            "n_ctx_orig": int(hp.n_ctx_orig_yarn or hp.n_ctx_train),
        },
    }


def _ropes(hp: Hparams, cp: Dict[str, Any], layers: Sequence[int]) -> List[Optional[Rope]]:
    """Per model layer, the RoPE parameters the K-shift of llama.cpp uses (None: no rope)."""
    r = cp["rope"]
    out: List[Optional[Rope]] = []
    any_rope = any(hp.has_rope[il] for il in layers)
    for il in range(hp.n_layer):
        if not hp.has_rope[il]:
            # llama.cpp skips the layer in the K-shift graph; when no held layer has rope the
            # cache still shifts (positions only), which pymem expresses with mode "none"
            out.append(None if any_rope else Rope(n_rot=hp.n_rot[il] or hp.n_embd_head_k[il], mode="none"))
            continue
        if hp.is_swa[il]:
            base, scale = hp.rope_freq_base_train_swa, hp.rope_freq_scale_train_swa
        else:
            base, scale = r["freq_base"], r["freq_scale"]
        if hp.rope_freqs is not None:
            ff = hp.rope_freqs
        elif cp["n_ctx_seq"] > hp.n_ctx_orig_yarn:
            ff = hp.rope_factors_long
        else:
            ff = hp.rope_factors_short
        out.append(Rope(
            n_rot=hp.n_rot[il] or hp.n_embd_head_k[il],
            freq_base=base, freq_scale=scale, mode=hp.rope_type,
            ext_factor=r["ext_factor"], attn_factor=r["attn_factor"],
            beta_fast=r["beta_fast"], beta_slow=r["beta_slow"], n_ctx_orig=r["n_ctx_orig"],
            freq_factors=None if ff is None else list(ff),
        ))
    return out


def _attn_rot(hp: Hparams, layers: Sequence[int], type_k: str, type_v: str) -> Tuple[int, int]:
    """k_rot / v_rot of a KV cache holding ``layers`` (b11739's Hadamard attention rotation:
    quantized type, uniform head size over the cache's layers, the model's head size % 64 == 0;
    K uses the largest power of two >= 64 dividing the head size, V uses 64).  Observed on
    b11739 with head sizes 32, 64 and 128; LLAMA_ATTN_ROT_DISABLE is not consulted."""

    def uniform(heads: List[int]) -> int:
        vals = set(heads)
        return heads[0] if len(vals) == 1 else (-1 if vals else 0)

    hk = uniform([hp.n_embd_head_k[il] for il in layers])
    hv = uniform([hp.n_embd_head_v[il] for il in layers])
    k_rot = v_rot = 0
    if hk > 0 and _is_quantized(type_k) and hp.n_embd_head_k[0] % 64 == 0:
        k_rot = 64
        while hk % (k_rot * 2) == 0:
            k_rot *= 2
    if hv > 0 and _is_quantized(type_v) and hp.n_embd_head_v[0] % 64 == 0:
        v_rot = 64
    return k_rot, v_rot


def memory_spec(
    hp: Union[Hparams, PathLike],
    n_ctx: int,
    n_seq_max: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: Union[bool, str, int] = False,
    unified: bool = True,
    swa_full: bool = True,
    n_ubatch: int = 512,
    n_rs_seq: int = 0,
    format: int = 11,
    n_batch: int = DEFAULT_N_BATCH,
) -> MemorySpec:
    """Describe exactly what llama.cpp's ``create_memory`` builds for ``hp`` (an
    :class:`Hparams` or a GGUF path) with ``llama_context_default_params()`` changed by these
    arguments (``unified`` = ``kv_unified``; ``flash_attn`` True/False or "auto"/-1, which
    llama.cpp resolves to on for the CPU backend).

    ``n_ctx`` 0 means the model's training context.  ``n_ctx`` is rounded up to a multiple of
    256, and without ``unified`` the cells per stream are ``PAD(n_ctx / n_seq_max, 256)``;
    ``n_ubatch`` is capped by ``min(n_ctx, n_batch)`` as llama.cpp does (this matters for the
    iSWA SWA-cache size when ``swa_full`` is off).  ``n_rs_seq`` is forced to 0 for
    architectures without recurrent rollback support.

    Raises ``pymem.UnsupportedError`` where llama.cpp refuses the context (quantized V without
    flash attention, a quantized block size that does not divide a head size)."""
    if not isinstance(hp, Hparams):
        hp = read_hparams(hp)
    if int(format) not in (10, 11):
        raise E.InvalidArgumentError(f"state format {format} is not 10 or 11")
    type_k = type_name(type_id(type_k))
    type_v = type_name(type_id(type_v))
    fa, fa_auto = _flash(flash_attn)
    if _is_quantized(type_v) and not fa:
        raise E.UnsupportedError(f"llama.cpp: quantized V cache ({type_v}) requires flash_attn to be enabled")
    if fa:
        for t, heads, what in ((type_k, hp.n_embd_head_k, "K"), (type_v, hp.n_embd_head_v, "V")):
            if _is_quantized(t):
                blck = _block_size(t)
                for il in range(hp.n_layer_main):
                    if heads[il] % blck != 0:
                        raise E.UnsupportedError(
                            f"llama.cpp: {what} cache type {t} with block size {blck} does not divide "
                            f"the head size {heads[il]} of layer {il}")
    cp = _cparams(hp, n_ctx, n_seq_max, unified, n_ubatch, n_batch, n_rs_seq)
    n_seq_max = cp["n_seq_max"]
    kind = hp.memory_kind
    spec = MemorySpec(
        kind=kind, arch=hp.arch, n_ctx=cp["n_ctx"], n_ctx_seq=cp["n_ctx_seq"], n_seq_max=n_seq_max,
        n_stream=1 if unified else n_seq_max, unified=bool(unified), flash_attn=fa, v_trans=not fa,
        swa_full=bool(swa_full), n_batch=cp["n_batch"], n_ubatch=cp["n_ubatch"], n_rs_seq=cp["n_rs_seq"],
        type_k=type_k, type_v=type_v, format=int(format), rope=dict(cp["rope"]),
    )
    kv_size = cp["n_ctx_seq"]

    def kv_part(name: str, layers: List[int], size: int, n_swa: int, swa_type: str) -> PartSpec:
        k_rot, v_rot = _attn_rot(hp, layers, type_k, type_v)
        kw = {
            "n_layer": hp.n_layer,
            "layers": list(layers),
            "n_head_kv": list(hp.n_head_kv),
            "n_embd_head_k": list(hp.n_embd_head_k),
            "n_embd_head_v": list(hp.n_embd_head_v),
            "size": int(size),
            "n_seq_max": n_seq_max,
            "type_k": type_k,
            "type_v": type_v,
            "v_trans": not fa,
            "unified": bool(unified),
            "n_swa": int(n_swa),
            "swa_type": swa_type,
            "n_pos_per_embd": hp.n_pos_per_embd,
            "rope": _ropes(hp, cp, layers),
            "arch": hp.arch,
            "format": int(format),
            "k_rot": k_rot,
            "v_rot": v_rot,
            "n_embd_v_gqa_max": hp.n_embd_v_gqa_max,
            "can_shift": hp.can_shift,
        }
        return PartSpec(name, "kv", kw, k_rot, v_rot)

    def rec_part() -> PartSpec:
        kw = {
            "n_layer": hp.n_layer_main,
            "layers": hp.recurrent_layers(),
            "n_embd_r": hp.n_embd_r,
            "n_embd_s": hp.n_embd_s,
            "size": max(1, n_seq_max),
            "n_seq_max": n_seq_max,
            "type_r": "f32",
            "type_s": "f32",
            "n_rs_seq": cp["n_rs_seq"],
            "arch": hp.arch,
        }
        return PartSpec("recurrent", "recurrent", kw)

    attn = hp.attn_layers()
    if kind in ("iswa", "hybrid_iswa"):
        base = [il for il in attn if not hp.is_swa[il]]
        swa = [il for il in attn if hp.is_swa[il]]
        if swa_full:
            size_swa = kv_size
        else:
            size_swa = pad(min(kv_size, hp.n_swa * (n_seq_max if unified else 1) + cp["n_ubatch"]), 256)
        spec.parts.append(kv_part("base", base, kv_size, 0, "none"))
        spec.parts.append(kv_part("swa", swa, size_swa, hp.n_swa, hp.swa_type))
    elif kind == "kv":
        spec.parts.append(kv_part("kv", attn, kv_size, hp.n_swa, hp.swa_type))
    elif kind == "hybrid":
        spec.parts.append(kv_part("attn", attn, kv_size, hp.n_swa, hp.swa_type))
    if kind in ("recurrent", "hybrid", "hybrid_iswa"):
        spec.parts.append(rec_part())
    if kind == "recurrent":
        spec.can_shift = True
    elif kind in ("iswa", "hybrid_iswa"):
        spec.can_shift = hp.can_shift and spec.part("base").size == spec.part("swa").size
    else:
        spec.can_shift = hp.can_shift
    return spec


def _block_size(t: str) -> int:
    from ._native import lib

    return int(lib.pm_type_block_size(type_id(t)))


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
_CLASSES = {
    "kv": "KVCache",
    "iswa": "KVCacheISWA",
    "recurrent": "RecurrentMemory",
    "hybrid": "HybridMemory",
    "hybrid_iswa": "HybridISWAMemory",
}


def build_memory(spec: MemorySpec) -> Any:
    """Instantiate the pymem memory a :class:`MemorySpec` describes.  This is the ONE place that
    maps specs to constructors:

    * kv: ``KVCache(**kv)``
    * iswa: ``KVCacheISWA(base=base, swa=swa)``
    * recurrent: ``RecurrentMemory(**recurrent)``
    * hybrid: ``HybridMemory(attn=attn, recurrent=recurrent)``
    * hybrid_iswa: ``HybridISWAMemory(attn={"base": base, "swa": swa}, recurrent=recurrent)``

    (each argument being a part's ``kwargs``, which carry ``arch``; ``format`` only concerns
    KV parts).  Classes are looked up on the ``pymem`` module at call time; a missing one
    raises ``pymem.UnsupportedError``."""
    pkg = sys.modules[__package__ or "pymem"]
    cls_name = _CLASSES[spec.kind]
    cls = getattr(pkg, cls_name, None)
    if cls is None:
        raise E.UnsupportedError(f"pymem.{cls_name} (memory kind {spec.kind!r} of {spec.arch}) is not available yet")
    kw = {p.name: dict(p.kwargs) for p in spec.parts}
    if spec.kind == "kv":
        return cls(**kw["kv"])
    if spec.kind == "recurrent":
        args = dict(kw["recurrent"])
    elif spec.kind == "iswa":
        args = {"base": kw["base"], "swa": kw["swa"]}
    elif spec.kind == "hybrid":
        args = {"attn": kw["attn"], "recurrent": kw["recurrent"]}
    else:
        args = {"attn": {"base": kw["base"], "swa": kw["swa"]}, "recurrent": kw["recurrent"]}
    return cls(**args)


def from_gguf(
    path: PathLike,
    n_ctx: int,
    n_seq_max: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: Union[bool, str, int] = False,
    unified: bool = True,
    swa_full: bool = True,
    n_ubatch: int = 512,
    n_rs_seq: int = 0,
    format: int = 11,
) -> Any:
    """The pymem memory llama.cpp creates for the GGUF model at ``path`` with
    ``llama_context_default_params()`` changed by these arguments (see :func:`memory_spec`).

    Note: pymem's defaults ``unified=True`` and ``flash_attn=False`` differ from
    ``llama_context_default_params()`` in b11739 (``kv_unified = false``; ``flash_attn_type =
    auto``, which is on for the CPU backend, so V is not transposed); pass them explicitly to
    match a llama.cpp context built with the C defaults.  Kinds other than "kv" need the
    corresponding pymem class (``pymem.UnsupportedError`` otherwise)."""
    spec = memory_spec(read_hparams(path), n_ctx, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                       flash_attn=flash_attn, unified=unified, swa_full=swa_full, n_ubatch=n_ubatch,
                       n_rs_seq=n_rs_seq, format=format)
    mem = build_memory(spec)
    mem.model_path = os.path.abspath(os.fspath(path))  # the prompt-cache store fingerprints this file
    return mem


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """Tensor bytes of the memory llama.cpp allocates (see :func:`estimate`).

    ``parts``: ``(name, cells, k_bytes, v_bytes)`` for KV parts, ``(name, cells, r_bytes,
    s_bytes)`` for the recurrent part (cells = state cells; the bytes include the
    ``n_rs_seq`` rollback planes).  ``layers``: one dict per (part, model layer)."""

    total: int
    parts: List[Tuple[str, int, int, int]]
    layers: List[Dict[str, Any]]
    spec: MemorySpec

    def __int__(self) -> int:
        return self.total


def _estimate_spec(spec: MemorySpec, hp: Hparams) -> Estimate:
    parts: List[Tuple[str, int, int, int]] = []
    layers: List[Dict[str, Any]] = []
    total = 0
    for p in spec.parts:
        kw = p.kwargs
        if p.kind == "kv":
            n_stream = 1 if kw["unified"] else kw["n_seq_max"]
            cells = kw["size"] * n_stream
            kb = vb = 0
            for il in kw["layers"]:
                wk = hp.n_embd_k_gqa(il)
                wv = hp.n_embd_v_gqa_max if kw["v_trans"] else hp.n_embd_v_gqa(il)
                k = row_size(kw["type_k"], wk) * cells
                v = row_size(kw["type_v"], wv) * cells
                kb += k
                vb += v
                layers.append({"part": p.name, "layer": il, "n_embd_k": wk, "n_embd_v": wv,
                               "k_bytes": k, "v_bytes": v})
            parts.append((p.name, kw["size"], kb, vb))
            total += kb + vb
        else:
            rows = kw["size"] * (1 + kw["n_rs_seq"])
            rb = sb = 0
            for il in kw["layers"]:
                r = row_size(kw["type_r"], kw["n_embd_r"]) * rows
                s = row_size(kw["type_s"], kw["n_embd_s"]) * rows
                rb += r
                sb += s
                layers.append({"part": p.name, "layer": il, "n_embd_r": kw["n_embd_r"],
                               "n_embd_s": kw["n_embd_s"], "r_bytes": r, "s_bytes": s})
            parts.append((p.name, kw["size"], rb, sb))
            total += rb + sb
    return Estimate(total, parts, layers, spec)


def estimate(
    path: Union[PathLike, Hparams],
    n_ctx: int,
    n_seq_max: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: Union[bool, str, int] = False,
    unified: bool = True,
    swa_full: bool = True,
    n_ubatch: int = 512,
    n_rs_seq: int = 0,
    format: int = 11,
) -> Estimate:
    """The bytes of the tensors llama.cpp allocates for this model and context, without
    allocating anything (ggml row sizes; the "K"/"V"/"R"/"S" sizes of llama.cpp's
    ``llama_kv_cache`` / ``llama_memory_recurrent`` log lines).

    These are llama.cpp's sizes: with ``v_trans`` (flash attention off) llama.cpp pads every
    layer's V to the model's largest V width (``n_embd_v_gqa_max``), while pymem allocates each
    layer's own width, so ``pymem`` memories can be smaller for models whose V widths vary.
    Backend buffer alignment and pymem's cell metadata are not included."""
    hp = path if isinstance(path, Hparams) else read_hparams(path)
    spec = memory_spec(hp, n_ctx, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                       unified=unified, swa_full=swa_full, n_ubatch=n_ubatch, n_rs_seq=n_rs_seq, format=format)
    return _estimate_spec(spec, hp)


def max_context(
    path: Union[PathLike, Hparams],
    budget_bytes: int,
    n_seq_max: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: Union[bool, str, int] = False,
    unified: bool = True,
    swa_full: bool = True,
    n_ubatch: int = 512,
    n_rs_seq: int = 0,
    format: int = 11,
) -> int:
    """The largest ``n_ctx`` (a multiple of 256 cells per stream, i.e. a value llama.cpp keeps
    as is) whose :func:`estimate` total fits in ``budget_bytes``; 0 if not even 256 cells per
    stream fit.  Memories whose size stops growing with ``n_ctx`` (pure recurrent models, or a
    hybrid-iSWA whose every attention layer is SWA, with ``swa_full`` off) fit at any context
    once they fit at all: then the answer is the model's training context, rounded as
    llama.cpp rounds it (its context for ``n_ctx = 0``)."""
    hp = path if isinstance(path, Hparams) else read_hparams(path)
    n_seq = max(1, int(n_seq_max))
    per = 256 * (1 if unified else n_seq)  # n_ctx step that adds 256 cells per stream
    kw = dict(n_seq_max=n_seq, type_k=type_k, type_v=type_v, flash_attn=flash_attn, unified=unified,
              swa_full=swa_full, n_ubatch=n_ubatch, n_rs_seq=n_rs_seq, format=format)

    def total(k: int) -> int:
        return estimate(hp, k * per, **kw).total

    budget = int(budget_bytes)
    if total(1) > budget:
        return 0
    k_max = _MAX_CELLS // 256
    if total(k_max) <= budget:
        return memory_spec(hp, 0, **kw).n_ctx
    lo, hi = 1, 2
    while hi < k_max and total(hi) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, k_max)
    while hi - lo > 1:  # total(lo) fits, total(hi) does not
        mid = (lo + hi) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo * per
