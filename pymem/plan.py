"""The memory planner: what llama.cpp's ``create_memory`` builds for a model and context
parameters.

:func:`memory_spec` turns a model's hyper-parameters (:func:`pymem.gguf.read_hparams`) plus
context parameters into a :class:`MemorySpec`: the kind of memory (``kv``, ``iswa``,
``recurrent``, ``hybrid``, ``hybrid_iswa``), the context sizes as llama.cpp rounds them, and for
every part the exact keyword arguments of pymem's constructors (``pymem.KVCache(**part.kwargs)``
for a KV part), including the final RoPE parameters llama.cpp's K-shift uses.
:func:`from_gguf` builds the memory, :func:`estimate` reports its sizes without allocating and
:func:`max_context` inverts that.

Target: llama.cpp b11739 (the ``llama-cpp-py-sync==0.11739`` wheel).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _errors as E
from . import _kinds
from .gguf import _F32, Hparams, PathLike, pad, read_hparams
from .params import Rope, row_size, type_id, type_name

__all__ = [
    "PartSpec",
    "MemorySpec",
    "Estimate",
    "memory_spec",
    "build_memory",
    "from_gguf",
    "estimate",
    "max_context",
]

#: llama.cpp's LLAMA_MAX_SEQ
MAX_SEQ = 256
#: llama_context_default_params().n_batch
DEFAULT_N_BATCH = 2048
#: the largest n_ctx whose rounding to a multiple of 256 fits llama.cpp's uint32 n_ctx
N_CTX_MAX = 0xFFFFFF00
#: cells per stream a pymem KV cache can hold (the C core's limit: size < 2^30)
MAX_STREAM_CELLS = (1 << 30) - 1
#: largest cells per stream max_context searches (llama.cpp keeps sizes in uint32)
_MAX_CELLS = 1 << 26


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
    if n_ctx_pad > N_CTX_MAX:
        raise E.InvalidArgumentError(
            f"n_ctx {n_ctx_req} is too large: llama.cpp rounds it up to {n_ctx_pad} cells (a multiple of 256"
            f"{'' if unified else ' per sequence'}), which does not fit its uint32 n_ctx; the largest n_ctx is "
            f"{N_CTX_MAX}")
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
def build_memory(spec: MemorySpec) -> Any:
    """Instantiate the pymem memory a :class:`MemorySpec` describes: the kind's class
    (:mod:`pymem._kinds`) from its parts' ``kwargs`` (which carry ``arch``; ``format`` only
    concerns KV parts), through the class's ``_from_parts``."""
    for p in spec.parts:
        if p.kind == "kv" and p.size > MAX_STREAM_CELLS:
            raise E.InvalidArgumentError(
                f"{p.name}: {p.size} cells per stream; pymem's KV caches hold at most 2^30 - 1 cells per stream "
                f"(the largest n_ctx is {(MAX_STREAM_CELLS // 256) * 256} per stream)")
    return _kinds.by_name(spec.kind).cls._from_parts({p.name: dict(p.kwargs) for p in spec.parts})


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
