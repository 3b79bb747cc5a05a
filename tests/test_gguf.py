"""Tests of pymem.gguf: hyper-parameters, memory specs, from_gguf, estimate, max_context.

The unit tests read metadata-only GGUF files (written with gguf-py, no llama.cpp needed).
The oracle tests build the same contexts in real llama.cpp b11739 (llama-cpp-py-sync) for
every tiny model and many context parameters, parse llama.cpp's state blob and its log, and
check the spec against them; pymem replays the same decodes.  They are skipped when the
wheel is not installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

import pymem
from pymem import _kinds
from pymem import gguf as pg
from pymem._oracle import tinymodels
from pymem.llama import _loader
from pymem._oracle.tinymodels import TinySpec

from blobreader import Reader, parse_kv, parse_rec

HAVE_ORACLE = _loader.is_available()
needs_oracle = pytest.mark.skipif(not HAVE_ORACLE, reason=f"llama-cpp-py-sync is not installed ({_loader.PIP_HINT})")

# ---------------------------------------------------------------------------------------------
# extra tiny models (not in pymem._oracle.tinymodels): more architectures and RoPE variants
# ---------------------------------------------------------------------------------------------
_SSM2 = [("ssm.conv_kernel", "u32", 4), ("ssm.inner_size", "u32", 128), ("ssm.state_size", "u32", 16),
         ("ssm.time_step_rank", "u32", 4), ("ssm.group_count", "u32", 1)]


def _kv(n_layer: int = 2, heads: Any = 2, heads_kv: Any = 1, n_ff: Any = 96, extra: Any = ()) -> Tuple:
    kv: List[Tuple[str, str, Any]] = [
        ("vocab_size", "u32", 128), ("context_length", "u32", 131072), ("embedding_length", "u32", 64),
        ("block_count", "u32", n_layer), ("attention.layer_norm_rms_epsilon", "f32", 1e-5)]
    for key, val in (("feed_forward_length", n_ff), ("attention.head_count", heads),
                     ("attention.head_count_kv", heads_kv)):
        kv.append((key, "arr_u32", list(val)) if isinstance(val, list) else (key, "u32", val))
    return tuple(kv) + tuple(extra)


EXTRA_SPECS: Dict[str, TinySpec] = {s.name: s for s in [
    TinySpec("x_llama_linear", "llama", _kv(extra=[
        ("rope.freq_base", "f32", 500000.0), ("rope.scaling.type", "str", "linear"),
        ("rope.scaling.factor", "f32", 4.0)]), {}, "llama, linear rope scaling x4, base 5e5"),
    TinySpec("x_gemma2_base", "gemma2", _kv(n_layer=4, extra=[
        ("attention.sliding_window", "u32", 8), ("rope.freq_base", "f32", 1000000.0)]), {},
        "gemma2, base 1e6: SWA layers use the trained base too"),
    TinySpec("x_gemma2_w200", "gemma2", _kv(n_layer=4, extra=[("attention.sliding_window", "u32", 200)]), {},
             "gemma2 with a window of 200 (the SWA cache size depends on n_seq_max and n_ubatch)"),
    TinySpec("x_gemma3_base", "gemma3", _kv(n_layer=4, extra=[
        ("attention.sliding_window", "u32", 8), ("attention.sliding_window_pattern", "u32", 2),
        ("rope.freq_base", "f32", 1000000.0)]), {},
        "gemma3, base 1e6: SWA layers use rope.freq_base_swa (default 10000)"),
    TinySpec("x_lfm2_swa_base", "lfm2", _kv(n_layer=4, heads=[2, 0, 2, 0], heads_kv=[2, 0, 1, 0], extra=[
        ("shortconv.l_cache", "u32", 3), ("attention.sliding_window", "u32", 8),
        ("rope.freq_base", "f32", 1000000.0)]), {},
        "lfm2 hybrid-iSWA, base 1e6, KV heads 2/1 (V padding)"),
]}

#: expected facts of every model: (memory kind, attention layers, SWA layers, recurrent layers,
#: n_embd_r, n_embd_s, rope type)
EXPECT: Dict[str, Tuple[str, List[int], List[int], List[int], int, int, str]] = {
    "llama": ("kv", [0, 1], [], [], 0, 0, "norm"),
    "llama_hd64": ("kv", [0, 1], [], [], 0, 0, "norm"),
    "llama_hd128": ("kv", [0, 1], [], [], 0, 0, "norm"),
    "llama_yarn": ("kv", [0, 1], [], [], 0, 0, "norm"),
    "llama_neox": ("kv", [0, 1], [], [], 0, 0, "neox"),
    "gemma2": ("iswa", [0, 1, 2, 3], [0, 2], [], 0, 0, "neox"),
    "gemma3": ("iswa", [0, 1, 2, 3], [0, 2], [], 0, 0, "neox"),
    "mamba": ("recurrent", [], [], [0, 1], 3 * 128, 16 * 128, "none"),
    "mamba2": ("recurrent", [], [], [0, 1], 3 * (128 + 2 * 16), 16 * 128, "none"),
    "rwkv6": ("recurrent", [], [], [0, 1], 2 * 64, 64 * 32, "none"),
    "rwkv7": ("recurrent", [], [], [0, 1], 2 * 64, 64 * 32, "none"),
    "lfm2": ("hybrid", [0, 2], [], [1, 3], 64 * 2, 0, "neox"),
    "lfm2_swa": ("hybrid_iswa", [0, 2], [0, 2], [1, 3], 64 * 2, 0, "neox"),
    "jamba": ("hybrid", [0, 2], [], [1, 3], 3 * 128, 16 * 128, "none"),
    "jamba_gqa": ("hybrid", [0, 2], [], [1, 3], 3 * 128, 16 * 128, "none"),
    "qwen3": ("kv", [0, 1], [], [], 0, 0, "neox"),
    "x_llama_linear": ("kv", [0, 1], [], [], 0, 0, "norm"),
    "x_gemma2_base": ("iswa", [0, 1, 2, 3], [0, 2], [], 0, 0, "neox"),
    "x_gemma2_w200": ("iswa", [0, 1, 2, 3], [0, 2], [], 0, 0, "neox"),
    "x_gemma3_base": ("iswa", [0, 1, 2, 3], [0, 2], [], 0, 0, "neox"),
    "x_lfm2_swa_base": ("hybrid_iswa", [0, 2], [0, 2], [1, 3], 64 * 2, 0, "neox"),
    "granitehybrid": ("hybrid", [0, 2], [], [1, 3], 3 * (128 + 32), 16 * 128, "norm"),
    "falcon_h1": ("hybrid", [0, 1], [], [0, 1], 3 * (128 + 32), 16 * 128, "neox"),
    "nemotron_h": ("hybrid", [0], [], [1, 3], 3 * (128 + 32), 16 * 128, "none"),
}
ALL_SPECS: Dict[str, TinySpec] = {**tinymodels.SPECS, **EXTRA_SPECS}
assert set(EXPECT) == set(ALL_SPECS)


# ---------------------------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_models(tmp_path_factory) -> Dict[str, str]:
    """Metadata-only GGUFs of every spec (gguf-py only; read_hparams needs no tensors)."""
    d = tmp_path_factory.mktemp("gguf_meta")
    out = {}
    for name, s in ALL_SPECS.items():
        p = d / f"{name}.gguf"
        tinymodels.write_metadata_gguf(p, s)
        out[name] = str(p)
    return out


_BUILD_EXTRA = r"""
import json, sys
from pymem._oracle import tinymodels as tm
cfg = json.loads(sys.argv[1])
for item in cfg["specs"]:
    s = tm.TinySpec(item["name"], item["arch"], tuple(tuple(x) for x in item["kv"]), {})
    tm.SPECS[s.name] = s
    tm.build(s.name, cfg["dir"], filename=item["file"])
"""


def _extra_path(name: str) -> Path:
    s = EXTRA_SPECS[name]
    h = hashlib.sha256((s.to_json() + f"|gen={tinymodels.GENERATOR_VERSION}|wheel={_loader.installed_version()}")
                       .encode()).hexdigest()[:16]
    return tinymodels.default_cache_dir() / f"gguf-test-{name}-{h}.gguf"


def _ensure_extra_models() -> Dict[str, str]:
    """Build the extra specs (in a child process: llama.cpp stays out of pytest's process)."""
    missing = [n for n in EXTRA_SPECS if not _extra_path(n).exists()]
    if missing:
        d = tinymodels.default_cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"dir": str(d), "specs": [
            {"name": n, "arch": EXTRA_SPECS[n].arch, "kv": [list(x) for x in EXTRA_SPECS[n].kv],
             "file": _extra_path(n).name} for n in missing]}
        with tempfile.TemporaryDirectory() as cwd:  # not the source tree: import the installed pymem
            r = subprocess.run([sys.executable, "-c", _BUILD_EXTRA, json.dumps(cfg)], cwd=cwd,
                               capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"building extra tiny models failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return {n: str(_extra_path(n)) for n in EXTRA_SPECS}


@pytest.fixture(scope="module")
def worker():
    if not HAVE_ORACLE:
        pytest.skip("llama-cpp-py-sync is not installed")
    from pymem._oracle.worker import OracleWorker

    with OracleWorker(timeout=300) as w:
        yield w


#: rope frequency factors written into a copy of the llama model ("x_llama_ff")
FREQ_FACTORS = [1.0 + 0.25 * i for i in range(16)]


def _with_freq_factors(src: str) -> str:
    """A copy of a llama model whose rope_freqs.weight holds FREQ_FACTORS (edited in place with
    gguf-py; the tiny-model generator writes ones)."""
    import shutil

    import gguf

    h = hashlib.sha256(Path(src).read_bytes() + json.dumps(FREQ_FACTORS).encode()).hexdigest()[:16]
    dst = tinymodels.default_cache_dir() / f"gguf-test-x_llama_ff-{h}.gguf"
    if not dst.exists():
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        r = gguf.GGUFReader(tmp, "r+")
        (t,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]
        t.data[:] = np.asarray(FREQ_FACTORS, np.float32)
        r.data.flush()
        del r, t
        os.replace(tmp, dst)
    return str(dst)


@pytest.fixture(scope="module")
def models(worker) -> Dict[str, str]:
    out = dict(worker.ensure_models(list(tinymodels.SPECS)))
    out.update(_ensure_extra_models())
    out["x_llama_ff"] = _with_freq_factors(out["llama"])
    return out


# ---------------------------------------------------------------------------------------------
# whole-context blobs of llama.cpp b11739 (ORACLE.md section 4; sections: tests/blobreader.py)
# ---------------------------------------------------------------------------------------------
def parse_state(blob: bytes, spec: pg.MemorySpec, envelope: bool = True) -> Tuple[Optional[str], List[Dict]]:
    """A whole-context blob (``llama_state_get_data``), or bare sections (envelope False)."""
    r = Reader(blob)
    arch = None
    if envelope:
        n = r.take("I")
        arch = blob[4:4 + n].decode()
        r.skip(n)
    secs = []
    for p in spec.parts:
        secs.append(parse_kv(r) if p.kind == "kv" else parse_rec(r, len(p.kwargs["layers"])))
    assert r.o == len(blob), f"{len(blob) - r.o} trailing bytes after the {spec.kind} sections"
    return arch, secs


def _skeleton(sec: Dict[str, Any]) -> Dict[str, Any]:
    """A parsed section without offsets (comparable across producers)."""
    out = {k: v for k, v in sec.items() if k not in ("span",)}
    if "streams" in out:
        out["streams"] = [{k: v for k, v in st.items() if k not in ("k_off", "v_off", "off")}
                          for st in out["streams"]]
    return out


# ---------------------------------------------------------------------------------------------
# unit tests (no llama.cpp)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_read_hparams_layout(meta_models, name):
    hp = pg.read_hparams(meta_models[name])
    kind, attn, swa, recr, n_r, n_s, rope = EXPECT[name]
    assert hp.arch == ALL_SPECS[name].arch
    assert hp.memory_kind == kind
    assert hp.attn_layers() == attn
    assert [il for il in attn if hp.is_swa[il]] == swa
    assert hp.recurrent_layers() == recr
    assert (hp.n_embd_r, hp.n_embd_s) == (n_r, n_s)
    assert hp.rope_type == rope
    assert hp.n_vocab == 128 and hp.n_ctx_train == 131072
    lay = tinymodels.SPECS[name].layout if name in tinymodels.SPECS else None
    if lay is not None:  # the facts recorded with the tiny models
        assert hp.n_layer == lay["n_layer"] and hp.n_embd == lay["n_embd"]
        assert list(hp.n_head_kv) == lay["n_head_kv"]
        assert [hp.n_embd_k_gqa(il) for il in range(hp.n_layer)] == lay["n_embd_k_gqa"]
        assert [hp.n_embd_v_gqa(il) for il in range(hp.n_layer)] == lay["n_embd_v_gqa"]
        assert hp.n_swa == lay["n_swa"]
        assert 4 * hp.n_embd_r == lay["r_row_bytes"] and 4 * hp.n_embd_s == lay["s_row_bytes"]


def test_rope_yarn_derivation(meta_models):
    hp = pg.read_hparams(meta_models["llama_yarn"])
    assert hp.rope_scaling_type == "yarn" and hp.rope_freq_scale_train == 0.5
    assert hp.n_ctx_orig_yarn == 65536
    spec = pg.memory_spec(hp, 1000)
    r = spec.rope
    # llama-context.cpp: ext_factor 1 for YaRN; attn_factor = mscale(1/freq_scale) * 1/(1 + 0.1 ln f)
    f = np.float32(1.0) / np.float32(0.5)
    mscale = np.float32(np.float32(0.1) * np.log(f) + np.float32(1.0))
    expect = np.float32(mscale * np.float32(np.float32(1.0) / (np.float32(1.0) + np.float32(0.1) * np.log(f))))
    assert r["ext_factor"] == 1.0
    assert r["attn_factor"] == float(expect)
    assert abs(r["attn_factor"] - 1.0) < 1e-6
    assert (r["freq_base"], r["freq_scale"], r["beta_fast"], r["beta_slow"], r["n_ctx_orig"]) == \
        (10000.0, 0.5, 32.0, 1.0, 65536)
    ropes = spec.part("kv").kwargs["rope"]
    assert len(ropes) == 2 and all(x.mode == "norm" and x.n_rot == 32 for x in ropes)
    assert ropes[0].ext_factor == 1.0 and ropes[0].freq_scale == 0.5 and ropes[0].n_ctx_orig == 65536


def test_rope_yarn_log_mul_and_attn_factor():
    hp = _replace(pg_hparams_yarn(), rope_yarn_log_mul=0.707, rope_attn_factor=1.5)
    r = pg.memory_spec(hp, 256).rope
    f = np.float32(2.0)

    def ms(m: float) -> np.float32:
        return np.float32(np.float32(0.1) * np.float32(m) * np.log(f) + np.float32(1.0))

    expect = np.float32(ms(1.0) / ms(0.707))
    expect = np.float32(expect * np.float32(np.float32(1.0) / (np.float32(1.0) + np.float32(0.1) * np.log(f))))
    expect = np.float32(expect * np.float32(1.5))
    assert r["attn_factor"] == float(expect)


def pg_hparams_yarn() -> pg.Hparams:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "y.gguf")
        tinymodels.write_metadata_gguf(p, tinymodels.SPECS["llama_yarn"])
        return pg.read_hparams(p)


def _replace(hp: pg.Hparams, **kw: Any) -> pg.Hparams:
    import dataclasses

    return dataclasses.replace(hp, **kw)


def test_rope_modes_and_swa_bases(meta_models):
    neox = pg.memory_spec(pg.read_hparams(meta_models["llama_neox"]), 256)
    assert {r.mode for r in neox.part("kv").kwargs["rope"]} == {"neox"}
    none = pg.memory_spec(pg.read_hparams(meta_models["jamba"]), 256)
    ropes = none.part("attn").kwargs["rope"]
    assert all(r is not None and r.mode == "none" for r in ropes)
    lin = pg.memory_spec(pg.read_hparams(meta_models["x_llama_linear"]), 256)
    r0 = lin.part("kv").kwargs["rope"][0]
    assert (r0.freq_base, r0.freq_scale, r0.ext_factor, r0.attn_factor) == (500000.0, 0.25, 0.0, 1.0)
    # SWA layers: gemma2 uses the trained base, gemma3 and lfm2 rope.freq_base_swa (default 10000)
    for name, swa_base in (("x_gemma2_base", 1e6), ("x_gemma3_base", 1e4), ("x_lfm2_swa_base", 1e4)):
        spec = pg.memory_spec(pg.read_hparams(meta_models[name]), 256)
        ropes = spec.part("swa").kwargs["rope"]
        for il in spec.part("swa").layers:
            assert ropes[il].freq_base == swa_base, (name, il)
        for il in spec.part("base").layers:
            assert ropes[il].freq_base == 1e6, (name, il)


def test_context_rounding(meta_models):
    hp = pg.read_hparams(meta_models["llama"])
    for n_ctx, ns, uni, ctx, ctx_seq in [(16, 1, True, 256, 256), (300, 1, True, 512, 512),
                                         (512, 4, False, 1024, 256), (100, 3, False, 768, 256),
                                         (1000, 3, True, 1024, 1024), (1000, 3, False, 1536, 512),
                                         (0, 1, True, 131072, 131072)]:
        s = pg.memory_spec(hp, n_ctx, n_seq_max=ns, unified=uni)
        assert (s.n_ctx, s.n_ctx_seq) == (ctx, ctx_seq), (n_ctx, ns, uni)
        assert s.n_stream == (1 if uni else ns)
        assert s.part("kv").size == ctx_seq
    # n_ubatch is capped by min(n_ctx, n_batch)
    assert pg.memory_spec(hp, 100).n_ubatch == 100
    assert pg.memory_spec(hp, 100000).n_ubatch == 512
    # iSWA: SWA size with swa_full off = PAD(min(kv, n_swa * (unified ? n_seq : 1) + n_ubatch), 256)
    g = pg.read_hparams(meta_models["gemma2"])
    assert pg.memory_spec(g, 4096, swa_full=False).part("swa").size == 768   # 8 + 512 -> 768
    assert pg.memory_spec(g, 4096, swa_full=True).part("swa").size == 4096
    assert pg.memory_spec(g, 100, swa_full=False).part("swa").size == 256
    assert pg.memory_spec(g, 4096, n_seq_max=40, swa_full=False).part("swa").size == 1024  # 320+512
    assert pg.memory_spec(g, 40960, n_seq_max=40, unified=False, swa_full=False).part("swa").size == 768


def test_n_rs_seq_forced_to_zero(meta_models):
    assert pg.memory_spec(pg.read_hparams(meta_models["mamba"]), 256, n_rs_seq=2).n_rs_seq == 0
    assert pg.memory_spec(pg.read_hparams(meta_models["jamba"]), 256, n_rs_seq=2).n_rs_seq == 0
    s = pg.memory_spec(pg.read_hparams(meta_models["lfm2"]), 256, n_rs_seq=2, n_seq_max=3)
    assert s.n_rs_seq == 2 and s.part("recurrent").kwargs["n_rs_seq"] == 2
    assert s.part("recurrent").kwargs["size"] == 3


def test_unsupported_arch(tmp_path):
    s = TinySpec("bert_like", "bert", _kv(), {})
    p = tmp_path / "bert.gguf"
    tinymodels.write_metadata_gguf(p, s)
    with pytest.raises(pymem.UnsupportedError, match="'bert'"):
        pg.read_hparams(p)
    with pytest.raises(pymem.UnsupportedError, match="bert"):
        pg.estimate(p, 256)


def test_bad_requests(meta_models):
    hp = pg.read_hparams(meta_models["llama_hd64"])
    with pytest.raises(pymem.UnsupportedError, match="flash_attn"):
        pg.memory_spec(hp, 256, type_v="q8_0", flash_attn=False)
    assert pg.memory_spec(hp, 256, type_v="q8_0", flash_attn="auto").v_trans is False
    odd = _replace(hp, n_embd_head_k=(48, 48), n_embd_head_v=(48, 48))
    with pytest.raises(pymem.UnsupportedError, match="block size"):
        pg.memory_spec(odd, 256, type_k="q8_0", flash_attn=True)
    assert pg.memory_spec(odd, 256, type_k="q8_0", flash_attn=False).part("kv").k_rot == 0
    with pytest.raises(ValueError):
        pg.memory_spec(hp, 256, n_seq_max=300)


def test_attn_rotation(meta_models):
    for name, rot in (("llama", (0, 0)), ("llama_hd64", (64, 64)), ("llama_hd128", (128, 64))):
        spec = pg.memory_spec(pg.read_hparams(meta_models[name]), 256, type_k="q8_0", type_v="q8_0", flash_attn=True)
        assert (spec.part("kv").k_rot, spec.part("kv").v_rot) == rot, name
        spec = pg.memory_spec(pg.read_hparams(meta_models[name]), 256, flash_attn=True)
        assert (spec.part("kv").k_rot, spec.part("kv").v_rot) == (0, 0)


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_estimate_and_max_context(meta_models, name):
    hp = pg.read_hparams(meta_models[name])
    for uni, ns, fa in ((True, 1, False), (False, 3, True), (True, 3, False)):
        kw = dict(n_seq_max=ns, unified=uni, flash_attn=fa, swa_full=False)
        step = 256 * (1 if uni else ns)
        for n_ctx in (1000, 5000):
            e = pg.estimate(hp, n_ctx, **kw)
            assert e.total == sum(k + v for _, _, k, v in e.parts)
            assert e.total == sum(d.get("k_bytes", 0) + d.get("v_bytes", 0) + d.get("r_bytes", 0)
                                  + d.get("s_bytes", 0) for d in e.layers)
            got = pg.max_context(hp, e.total, **kw)
            if pg.estimate(hp, 1 << 26, **kw).total <= e.total:  # the size stops growing
                assert hp.memory_kind in ("recurrent", "hybrid_iswa")
                assert got == pg.memory_spec(hp, 0, n_seq_max=ns, unified=uni).n_ctx
                continue
            assert got >= e.spec.n_ctx and got % step == 0
            assert pg.estimate(hp, got, **kw).total <= e.total
            assert pg.estimate(hp, got + step, **kw).total > e.total
        assert pg.max_context(hp, pg.estimate(hp, 256, **kw).total - 1, **kw) == 0


@pytest.mark.parametrize("name", ["llama", "llama_hd128", "qwen3", "x_llama_linear"])
def test_from_gguf_kv_and_nbytes(meta_models, name):
    for uni, ns, fa in ((True, 1, False), (False, 3, True)):
        kv = pg.from_gguf(meta_models[name], 1000, n_seq_max=ns, unified=uni, flash_attn=fa)
        assert isinstance(kv, pymem.KVCache)
        spec = pg.memory_spec(meta_models[name], 1000, n_seq_max=ns, unified=uni, flash_attn=fa)
        e = pg.estimate(meta_models[name], 1000, n_seq_max=ns, unified=uni, flash_attn=fa)
        assert kv.size == spec.n_ctx_seq and kv.n_stream == spec.n_stream and kv.layers == [0, 1]
        assert kv.v_trans == (not fa) and kv.arch == spec.arch
        # uniform V widths: pymem's tensors are llama.cpp's; nbytes adds cell metadata and the handle
        tensors = e.total
        cells = spec.n_ctx_seq * spec.n_stream
        assert tensors <= kv.nbytes <= tensors + cells * 64 + 65536
        kv.close()


def test_nbytes_with_padded_v(meta_models):
    # x_lfm2_swa_base / jamba_gqa: V widths differ per layer; llama.cpp pads transposed V
    spec = pg.memory_spec(meta_models["jamba_gqa"], 256, flash_attn=False)
    e = pg.estimate(meta_models["jamba_gqa"], 256, flash_attn=False)
    attn = [d for d in e.layers if d["part"] == "attn"]
    assert [d["n_embd_v"] for d in attn] == [64, 64]          # padded to n_embd_v_gqa_max
    assert [d["n_embd_k"] for d in attn] == [64, 32]
    kv = pymem.KVCache(**spec.part("attn").kwargs)
    own = sum(pymem.row_size("f16", w) * 256 for w in (64, 32)) * 2
    assert own <= kv.nbytes < e.parts[0][2] + e.parts[0][3] + 65536 + 256 * 64
    e_fa = pg.estimate(meta_models["jamba_gqa"], 256, flash_attn=True)
    assert [d["n_embd_v"] for d in e_fa.layers if d["part"] == "attn"] == [64, 32]


def test_from_gguf_other_kinds(meta_models):
    for name in ("gemma2", "mamba", "lfm2", "lfm2_swa"):
        spec = pg.memory_spec(meta_models[name], 256)
        mem = pg.from_gguf(meta_models[name], 256)
        assert mem.kind == spec.kind and type(mem) is _kinds.by_name(spec.kind).cls
        mem.close()


# ---------------------------------------------------------------------------------------------
# oracle: the spec against real llama.cpp
# ---------------------------------------------------------------------------------------------
_KV_LOG = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                     r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_RS_LOG = re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+) seqs +"
                     r"(\d+) rs_seq\), R \((\w+)\): +([\d.]+) MiB, S \((\w+)\): +([\d.]+) MiB")


def _mib(nbytes: int) -> str:
    """llama.cpp's "%7.2f" of (float)bytes / (1024.0f*1024.0f)."""
    return "%.2f" % float(np.float32(nbytes) / np.float32(1024.0 * 1024.0))


def _configs(kind: str) -> List[Dict[str, Any]]:
    out = []
    swa = (True, False) if kind in ("iswa", "hybrid_iswa") else (True,)
    for fa in (False, True):
        for uni in (True, False):
            for ns in (1, 3):
                for n_ctx in (100, 300, 1000):
                    for swa_full in swa:
                        out.append(dict(n_ctx=n_ctx, n_seq_max=ns, unified=uni, flash_attn=fa, swa_full=swa_full))
    if kind in ("iswa", "hybrid_iswa"):
        for uni in (True, False):
            for n_ubatch in (64, 512):
                out.append(dict(n_ctx=3000, n_seq_max=3, unified=uni, flash_attn=True, swa_full=False,
                                n_ubatch=n_ubatch))
    if kind in ("recurrent", "hybrid", "hybrid_iswa"):
        out.append(dict(n_ctx=300, n_seq_max=3, unified=True, flash_attn=False, swa_full=True, n_rs_seq=2))
    if kind == "kv":
        for tk, tv in (("q8_0", "q8_0"), ("q4_0", "f16"), ("f32", "bf16")):
            out.append(dict(n_ctx=300, n_seq_max=3, unified=False, flash_attn=True, swa_full=True,
                            type_k=tk, type_v=tv))
    return out


_DECODES = [(0, [1, 7, 3, 9, 5]), (2, [4, 8, 2])]  # (seq, tokens), seq 2 only when n_seq_max >= 3


def _check_kv_section(sec: Dict, part: pg.PartSpec, hp: pg.Hparams, spec: pg.MemorySpec, n_cells: List[int],
                      where: str) -> None:
    kw = part.kwargs
    assert sec["n_stream"] == spec.n_stream, where
    assert [st["cell_count"] for st in sec["streams"]] == n_cells, where
    tk, tv = pymem.type_id(spec.type_k), pymem.type_id(spec.type_v)
    for st in sec["streams"]:
        if st["cell_count"] == 0:
            continue
        assert st["v_trans"] == int(spec.v_trans), where
        assert st["n_layer"] == len(kw["layers"]), where
        assert (st["k_rot"], st["v_rot"]) == (part.k_rot, part.v_rot), where
        assert st["k"] == [(tk, pymem.row_size(tk, hp.n_embd_k_gqa(il))) for il in kw["layers"]], where
        if spec.v_trans:  # the blob states each layer's own width (T-25)
            assert st["v"] == [(tv, pymem.row_size(tv, 1), hp.n_embd_v_gqa(il)) for il in kw["layers"]], where
        else:
            assert st["v"] == [(tv, pymem.row_size(tv, hp.n_embd_v_gqa(il))) for il in kw["layers"]], where


def _check_rec_section(sec: Dict, part: pg.PartSpec, n_cells: int, where: str) -> None:
    kw = part.kwargs
    assert sec["cell_count"] == n_cells and sec["s_trans"] == 0, where
    assert sec["n_layer"] == kw["n_layer"], where
    assert sec["r"] == [(0, 4 * kw["n_embd_r"])] * len(kw["layers"]), where
    assert sec["s"] == [(0, 4 * kw["n_embd_s"])] * len(kw["layers"]), where


def _check_log(log: str, spec: pg.MemorySpec, est: pg.Estimate, where: str) -> None:
    kv_lines = _KV_LOG.findall(log)
    rs_lines = _RS_LOG.findall(log)
    kv_parts = [(p, e) for p, e in zip(spec.parts, est.parts) if p.kind == "kv"]
    rs_parts = [(p, e) for p, e in zip(spec.parts, est.parts) if p.kind == "recurrent"]
    assert len(kv_lines) == len(kv_parts) and len(rs_lines) == len(rs_parts), (where, log[-3000:])
    for line, (p, (_, cells, kb, vb)) in zip(kv_lines, kv_parts):
        tot, n_cells, n_layers, nseq, nstream, tk, kmib, tv, vmib = line
        assert (int(n_cells), int(n_layers), int(nseq), int(nstream)) == \
            (cells, len(p.layers), spec.n_seq_max, spec.n_stream), where
        assert (tk, tv) == (spec.type_k, spec.type_v), where
        assert (kmib, vmib, tot) == (_mib(kb), _mib(vb), _mib(kb + vb)), where
    for line, (p, (_, cells, rb, sb)) in zip(rs_lines, rs_parts):
        tot, n_cells, n_layers, nseq, rs_seq, tr, rmib, ts, smib = line
        assert (int(n_cells), int(n_layers), int(nseq), int(rs_seq)) == \
            (cells, p.kwargs["n_layer"], spec.n_seq_max, spec.n_rs_seq), where
        assert (rmib, smib) == (_mib(rb), _mib(sb)), where


def _pymem_part(part: pg.PartSpec) -> Any:
    if part.kind == "kv":
        return pymem.KVCache(**part.kwargs)
    cls = getattr(pymem, "RecurrentMemory", None)
    return None if cls is None else cls(**part.kwargs)


def _replay(mem: Any, decodes: List[Tuple[int, List[int]]], n_ubatch: int) -> None:
    for seq, toks in decodes:
        mem.decode(pymem.Batch(tokens=toks, pos=list(range(len(toks))), seq_ids=[[seq]] * len(toks)),
                   n_ubatch=n_ubatch)


ORACLE_MODELS = sorted(ALL_SPECS)


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_spec_matches_llama_cpp(worker, models, name):
    path = models[name]
    hp = pg.read_hparams(path)
    m = worker.model(path)
    assert m.arch == hp.arch and m.n_layer == hp.n_layer and m.n_swa == hp.n_swa
    assert m.n_embd == hp.n_embd and m.n_ctx_train == hp.n_ctx_train and m.n_vocab == hp.n_vocab
    assert m.is_recurrent == (hp.memory_kind == "recurrent")
    assert m.is_hybrid == (hp.memory_kind in ("hybrid", "hybrid_iswa"))
    assert m.rope_type == hp.rope_type
    assert m.n_head_kv == hp.n_head_kv[0] and m.n_head == hp.n_head[0]
    composite_checked = 0
    for cfg in _configs(hp.memory_kind):
        cfg = dict(cfg)
        tk, tv = cfg.pop("type_k", "f16"), cfg.pop("type_v", "f16")
        n_rs = cfg.pop("n_rs_seq", 0)
        where = f"{name} {cfg} {tk}/{tv} rs={n_rs}"
        spec = pg.memory_spec(hp, type_k=tk, type_v=tv, n_rs_seq=n_rs, **cfg)
        est = pg.estimate(hp, type_k=tk, type_v=tv, n_rs_seq=n_rs, **cfg)
        worker.call("clear_log")
        with worker.context(m, n_ctx=cfg["n_ctx"], n_seq_max=cfg["n_seq_max"], kv_unified=cfg["unified"],
                            flash_attn=cfg["flash_attn"], swa_full=cfg["swa_full"], type_k=tk, type_v=tv,
                            n_rs_seq=n_rs, n_ubatch=cfg.get("n_ubatch", 512)) as c:
            log = worker.log(400)
            decodes = [d for d in _DECODES if d[0] < spec.n_seq_max]
            calls: List[Tuple] = [("n_ctx",), ("n_ctx_seq",), ("n_ubatch",), ("can_shift",)]
            calls += [("decode", [(t, i, [s]) for i, t in enumerate(toks)]) for s, toks in decodes]
            calls.append(("state_get",))
            res = c.many(calls)
        n_ctx, n_ctx_seq, n_ubatch, can_shift, *rcs, blob = res
        assert (n_ctx, n_ctx_seq, n_ubatch) == (spec.n_ctx, spec.n_ctx_seq, spec.n_ubatch), where
        assert can_shift == spec.can_shift, where
        assert rcs == [0] * len(decodes), where
        _check_log(log, spec, est, where)

        arch, secs = parse_state(blob, spec)
        assert arch == spec.arch, where
        seqs = [s for s, _ in decodes]
        if spec.unified:
            kv_cells = [sum(len(t) for _, t in decodes)]
        else:
            kv_cells = [len(dict(decodes).get(s, [])) for s in range(spec.n_stream)]
        for sec, part in zip(secs, spec.parts):
            w = f"{where} part {part.name}"
            if part.kind == "kv":
                _check_kv_section(sec, part, hp, spec, kv_cells, w)
            else:
                _check_rec_section(sec, part, len(seqs), w)
            # pymem replays the decodes in this part alone: same section skeleton and length
            mem = _pymem_part(part)
            if mem is None:
                continue
            _replay(mem, decodes, spec.n_ubatch)
            mine = mem.state_write()
            lo, hi = sec["span"]
            assert len(mine) == hi - lo, w
            _, (msec,) = parse_state(mine, _one_part_spec(spec, part), envelope=False)
            assert _skeleton(msec) == _skeleton(sec), w
            mem.close()
        # the whole memory, when pymem has the class
        try:
            mem = pg.build_memory(spec)
        except pymem.UnsupportedError:
            assert spec.kind != "kv", where
            continue
        # llama.cpp's can_shift is true for a quantized K without a Hadamard rotation (it then
        # crashes in the shift); pymem's tells the truth (issue 15 item 10)
        shiftable = all(not (p.type_k.startswith("q") and p.k_rot == 0) for p in mem.kv_parts())
        assert mem.can_shift == (spec.can_shift and shiftable), where
        _replay(mem, decodes, spec.n_ubatch)
        mine = mem.state_write(envelope="llama")
        assert len(mine) == len(blob), where
        march, msecs = parse_state(mine, spec)
        assert march == arch
        for a, b in zip(msecs, secs):  # cell metadata bytes included
            assert _skeleton(a) == _skeleton(b), where
        composite_checked += 1
        mem.close()
    if hp.memory_kind == "kv":
        assert composite_checked == len(_configs("kv"))


def _one_part_spec(spec: pg.MemorySpec, part: pg.PartSpec) -> pg.MemorySpec:
    import dataclasses

    return dataclasses.replace(spec, parts=[part])


# ---------------------------------------------------------------------------------------------
# oracle: the RoPE parameters, through llama.cpp's K-shift
# ---------------------------------------------------------------------------------------------
ROPE_MODELS = ["llama", "x_llama_ff", "llama_yarn", "llama_neox", "x_llama_linear", "qwen3", "gemma2", "x_gemma2_base",
               "x_gemma3_base", "lfm2", "x_lfm2_swa_base", "granitehybrid", "falcon_h1", "jamba"]


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("name", ROPE_MODELS)
def test_kshift_rope_matches_llama_cpp(worker, models, name):
    """llama.cpp: decode 6 tokens, seq_add +3, decode one more (which runs the K-shift).
    pymem: each KV part from the spec restores the first state, seq_add +3, update().  The K rows
    of the 6 shifted cells must be llama.cpp's (f16: at most one step apart)."""
    path = models[name]
    hp = pg.read_hparams(path)
    if name == "x_llama_ff":
        assert hp.rope_freqs == tuple(FREQ_FACTORS)
    elif hp.rope_freqs is not None:
        assert set(hp.rope_freqs) == {1.0}
    spec = pg.memory_spec(hp, 256, n_seq_max=1, unified=True, flash_attn=False, swa_full=True)
    m = worker.model(path)
    toks = [3, 14, 15, 92, 65, 35]
    with worker.context(m, n_ctx=256, n_seq_max=1, kv_unified=True, flash_attn=False, swa_full=True) as c:
        rc1, before, _, rc2, after = c.many([
            ("decode", [(t, i, [0]) for i, t in enumerate(toks)]), ("state_get",),
            ("seq_add", 0, 0, -1, 3), ("decode", [(7, len(toks) + 3, [0])]), ("state_get",)])
    assert rc1 == 0 and rc2 == 0
    _, secs_a = parse_state(before, spec)
    _, secs_b = parse_state(after, spec)
    n = len(toks)
    checked = 0
    for part, sa, sb in zip(spec.parts, secs_a, secs_b):
        if part.kind != "kv" or not part.layers:
            continue
        kv = pymem.KVCache(**part.kwargs)
        lo, hi = sa["span"]
        kv.state_read(before[lo:hi])
        kv.seq_add(0, 0, -1, 3)
        assert kv.update() is True
        st = sb["streams"][0]
        assert [p for p, _ in st["cells"][:n]] == [i + 3 for i in range(n)]
        for li, il in enumerate(part.layers):
            t, row = st["k"][li]
            width = row // 2
            ref = np.frombuffer(after, np.uint16, count=n * width, offset=st["k_off"][li]).reshape(n, width)
            mine = kv.k(il)[:n].view(np.uint16)
            diff = np.abs(ref.astype(np.int32) - mine.astype(np.int32))
            # bit-exact with glibc's libm; one f16 step allowed elsewhere (SPEC 4.10.3)
            assert int(diff.max()) <= 1, (name, part.name, il, int(diff.max()))
            old = np.frombuffer(before, np.uint16, count=n * width,
                                offset=sa["streams"][0]["k_off"][li]).reshape(n, width)
            if hp.rope_type != "none":
                assert not np.array_equal(old, ref), (name, il)  # the shift changed K
            checked += 1
        kv.close()
    assert checked == len(hp.attn_layers())
