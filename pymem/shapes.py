"""Published shapes of real models, as metadata-only GGUF files (no tensors).

The memory llama.cpp allocates depends only on a model's hyper-parameters, so a GGUF holding
just the metadata of, say, Llama-3.1-8B is enough to plan its memory with
:func:`pymem.estimate` / :func:`pymem.max_context` (and, in the tests, to have real llama.cpp
build the same model without weights and report the sizes it would allocate).  The values are
those of the models' published configurations; the vocabulary is a 128-token stand-in (it
does not affect the memory) and mixture-of-experts FFNs are left dense (likewise).

    >>> path = pymem.shapes.path("llama3-8b")          # written once, into a cache folder
    >>> pymem.estimate(path, 131072, n_seq_max=4, type_k="q8_0", type_v="q8_0").total

``pymem estimate --shape llama3-8b`` does the same from the command line.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["SHAPES", "names", "describe", "write", "write_metadata", "path"]

N_VOCAB = 128  # the stand-in vocabulary (memory sizes do not depend on it)

KV = Tuple[str, str, Any]  # (key without the "<arch>." prefix, type, value)


def _base(n_layer: int, n_embd: int, n_ctx_train: int, n_ff: int = 0, eps: float = 1e-5) -> List[KV]:
    return [("vocab_size", "u32", N_VOCAB), ("context_length", "u32", n_ctx_train),
            ("embedding_length", "u32", n_embd), ("block_count", "u32", n_layer),
            ("feed_forward_length", "u32", n_ff), ("attention.layer_norm_rms_epsilon", "f32", eps)]


def _heads(n_head: Any, n_head_kv: Any, head_dim: Optional[int] = None) -> List[KV]:
    out: List[KV] = []
    for key, val in (("attention.head_count", n_head), ("attention.head_count_kv", n_head_kv)):
        out.append((key, "arr_u32", list(val)) if isinstance(val, list) else (key, "u32", val))
    if head_dim is not None:
        out += [("attention.key_length", "u32", head_dim), ("attention.value_length", "u32", head_dim)]
    return out


def _ssm(d_inner: int, d_state: int, dt_rank: int, n_group: Optional[int] = None, d_conv: int = 4) -> List[KV]:
    out: List[KV] = [("ssm.conv_kernel", "u32", d_conv), ("ssm.inner_size", "u32", d_inner),
                     ("ssm.state_size", "u32", d_state), ("ssm.time_step_rank", "u32", dt_rank)]
    if n_group is not None:
        out.append(("ssm.group_count", "u32", n_group))
    return out


def _at(n_layer: int, layers: List[int], value: int) -> List[int]:
    return [value if il in layers else 0 for il in range(n_layer)]


#: name -> (architecture, metadata, description)
SHAPES: Dict[str, Tuple[str, Tuple[KV, ...], str]] = {
    "llama3-8b": ("llama", tuple(
        _base(32, 4096, 131072, 14336) + _heads(32, 8) + [("rope.freq_base", "f32", 500000.0)]),
        "Llama-3.1-8B: 32 layers, GQA 32/8 heads of 128"),
    "qwen3-8b": ("qwen3", tuple(
        _base(36, 4096, 40960, 12288, 1e-6) + _heads(32, 8, 128) + [("rope.freq_base", "f32", 1000000.0)]),
        "Qwen3-8B: 36 layers, GQA 32/8 heads of 128"),
    "gemma2-9b": ("gemma2", tuple(
        _base(42, 3584, 8192, 14336, 1e-6) + _heads(16, 8, 256) + [
            ("attention.sliding_window", "u32", 4096), ("attn_logit_softcapping", "f32", 50.0),
            ("final_logit_softcapping", "f32", 30.0)]),
        "Gemma-2-9B: 42 layers alternating sliding-window (4096) and global, heads of 256"),
    "gemma3-12b": ("gemma3", tuple(
        _base(48, 3840, 131072, 15360, 1e-6) + _heads(16, 8, 256) + [
            ("attention.sliding_window", "u32", 1024), ("rope.freq_base", "f32", 1000000.0),
            ("rope.scaling.type", "str", "linear"), ("rope.scaling.factor", "f32", 8.0)]),
        "Gemma-3-12B: 48 layers, 5 sliding-window (1024) per global layer, heads of 256"),
    "lfm2-1.2b": ("lfm2", tuple(
        _base(16, 2048, 128000, 8192) + _heads(32, _at(16, [2, 5, 8, 10, 12, 14], 8)) + [
            ("shortconv.l_cache", "u32", 3), ("rope.freq_base", "f32", 1000000.0)]),
        "LFM2-1.2B: 6 attention layers (GQA 32/8) among 10 short-convolution layers"),
    "jamba-v0.1": ("jamba", tuple(
        _base(32, 4096, 262144, 14336, 1e-6) + _heads(32, _at(32, [4, 12, 20, 28], 8))
        + _ssm(8192, 16, 256)),
        "Jamba-v0.1: 4 attention layers (GQA 32/8) among 28 Mamba layers (dense FFN here)"),
    "mamba2-2.7b": ("mamba2", tuple(_base(64, 2560, 1048576) + _ssm(5120, 128, 80, n_group=1)),
                    "Mamba-2 2.7B: 64 Mamba-2 layers, d_inner 5120, d_state 128"),
    "rwkv7-2.9b": ("rwkv7", tuple(_base(32, 2560, 1048576, 10240) + [
        ("attention.layer_norm_epsilon", "f32", 1e-5), ("wkv.head_size", "u32", 64),
        ("attention.decay_lora_rank", "u32", 96), ("attention.iclr_lora_rank", "u32", 96),
        ("attention.value_residual_mix_lora_rank", "u32", 64), ("attention.gate_lora_rank", "u32", 320)]),
        "RWKV-7 World 2.9B: 32 layers, heads of 64"),
    "granite4-h-tiny": ("granitehybrid", tuple(
        _base(40, 1536, 131072, 512) + _heads(12, _at(40, [5, 15, 25, 35], 4))
        + _ssm(3072, 128, 48, n_group=1)),
        "Granite-4.0-H-Tiny: 4 attention layers (GQA 12/4) among 36 Mamba-2 layers (dense FFN here)"),
    "falcon-h1-0.5b": ("falcon-h1", tuple(
        _base(36, 1024, 16384, 2048) + _heads(8, 2, 64) + _ssm(1536, 128, 24, n_group=1)
        + [("rope.freq_base", "f32", 100000000.0)]),
        "Falcon-H1-0.5B: 36 layers, each with attention (GQA 8/2) and Mamba-2 side by side"),
}


def names() -> List[str]:
    """The names of the built-in shapes."""
    return list(SHAPES)


def describe(name: str) -> str:
    """One line about shape ``name``."""
    return SHAPES[_check(name)][2]


def _check(name: str) -> str:
    if name not in SHAPES:
        from ._errors import InvalidArgumentError

        raise InvalidArgumentError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return name


def write_metadata(out: Union[str, os.PathLike], arch: str, kv: Sequence[KV]) -> None:
    """Write a metadata-only GGUF: ``kv`` as ``<arch>.<key>`` entries plus llama.cpp's
    128-token ``test`` tokenizer, no tensors."""
    import gguf  # the gguf package (a pymem dependency)

    w = gguf.GGUFWriter(os.fspath(out), arch)
    for key, typ, val in kv:
        key = f"{arch}.{key}"
        if typ == "u32":
            w.add_uint32(key, val)
        elif typ == "f32":
            w.add_float32(key, val)
        elif typ == "bool":
            w.add_bool(key, val)
        elif typ == "str":
            w.add_string(key, val)
        elif typ == "arr_u32":
            w.add_key_value(key, list(val), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
        else:
            raise ValueError(f"unknown metadata type {typ!r} for {key}")
    w.add_tokenizer_model("test")
    w.add_token_list([f"tok_{i}" for i in range(N_VOCAB)])
    w.add_token_scores([0.0] * N_VOCAB)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write(name: str, out: Union[str, os.PathLike]) -> str:
    """Write the metadata-only GGUF of shape ``name`` to ``out`` (atomically); returns the path."""
    arch, kv, _ = SHAPES[_check(name)]
    out = os.fspath(out)
    fd, tmp = tempfile.mkstemp(prefix=".shape-", suffix=".gguf", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        write_metadata(tmp, arch, kv)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def path(name: str, cache_dir: Union[str, os.PathLike, None] = None) -> str:
    """The metadata-only GGUF of shape ``name``, written on first use into ``cache_dir``
    (default: ``shapes`` in pymem's cache folder, ``$PYMEM_CACHE_DIR`` or ``~/.cache/pymem``)."""
    arch, kv, _ = SHAPES[_check(name)]
    if cache_dir is None:
        from ._cache import cache_root

        cache_dir = cache_root() / "shapes"
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(repr((arch, kv)).encode()).hexdigest()[:12]
    p = os.path.join(os.fspath(cache_dir), f"{name}-{key}.gguf")
    return p if os.path.exists(p) else write(name, p)
