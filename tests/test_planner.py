"""The memory planner (pymem.estimate / max_context) at the published shapes of real models.

pymem.shapes writes metadata-only GGUFs (Llama-3.1-8B, Qwen3-8B, Gemma-2-9B, Gemma-3-12B,
LFM2-1.2B, Jamba, Mamba-2, RWKV-7, Granite-4.0-H, Falcon-H1).  The oracle tests have real
llama.cpp b11739 build each model from the same file without weights (no_alloc) and create
contexts of up to 131,072 cells x 4 sequences: llama.cpp logs each memory part's cells and
K/V (R/S) sizes without allocating them, and pymem's plan must print the same figures.
(The exact per-row byte sizes and cell counts are checked against llama.cpp's state blobs on
the tiny models, in test_gguf.py.)
"""
from __future__ import annotations

import json

import pytest

import pymem
from pymem import gguf as pg
from pymem import shapes
from pymem.llama import _loader
from plancheck import PLAN_SETTINGS, check_plan, mib

HAVE_ORACLE = _loader.is_available()
needs_oracle = pytest.mark.skipif(not HAVE_ORACLE, reason=f"llama-cpp-py-sync is not installed ({_loader.PIP_HINT})")

#: (shape, memory kind, attention layers in the full cache, in the SWA cache, recurrent layers)
KINDS = {
    "llama3-8b": ("kv", 32, 0, 0),
    "qwen3-8b": ("kv", 36, 0, 0),
    "gemma2-9b": ("iswa", 21, 21, 0),
    "gemma3-12b": ("iswa", 8, 40, 0),
    "lfm2-1.2b": ("hybrid", 6, 0, 10),
    "jamba-v0.1": ("hybrid", 4, 0, 28),
    "mamba2-2.7b": ("recurrent", 0, 0, 64),
    "rwkv7-2.9b": ("recurrent", 0, 0, 32),
    "granite4-h-tiny": ("hybrid", 4, 0, 36),
    "falcon-h1-0.5b": ("hybrid", 36, 0, 36),
}


@pytest.fixture(scope="module")
def shape_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return {n: shapes.path(n, d) for n in shapes.names()}


def test_every_shape_is_listed():
    assert sorted(KINDS) == sorted(shapes.names())
    with pytest.raises(pymem.InvalidArgumentError, match="unknown shape"):
        shapes.path("nope")


@pytest.mark.parametrize("name", sorted(KINDS))
def test_shape_layout(shape_paths, name):
    kind, n_full, n_swa, n_rec = KINDS[name]
    spec = pg.memory_spec(pg.read_hparams(shape_paths[name]), 4096)
    assert spec.kind == kind
    layers = {p.name: p for p in spec.parts}
    full = next((p for p in spec.parts if p.kind == "kv" and p.name != "swa"), None)
    swa = layers.get("swa")
    rec = layers.get("recurrent")
    assert (len(full.layers) if full else 0) == n_full
    assert (len(swa.layers) if swa else 0) == n_swa
    assert (len(rec.layers) if rec else 0) == n_rec


@pytest.mark.parametrize("name", sorted(KINDS))
def test_estimate_is_the_sum_of_layers(shape_paths, name):
    for st in PLAN_SETTINGS:
        e = pymem.estimate(shape_paths[name], **st)
        assert e.total == sum(a + b for _, _, a, b in e.parts)
        per_layer = sum(v for d in e.layers for k, v in d.items() if k.endswith("_bytes"))
        assert per_layer == e.total, (name, st)


def test_llama3_8b_published_figures(shape_paths):
    """The figure quoted for this shape: 131,072 cells, 4 sequences, q8_0: K and V 4,352 MiB each;
    and the familiar f16 figure: 128 KiB per token (32 layers x 8 heads x 128 x 2 x 2 bytes)."""
    p = shape_paths["llama3-8b"]
    e = pymem.estimate(p, 131072, n_seq_max=4, type_k="q8_0", type_v="q8_0", flash_attn=True)
    assert [(n, c, mib(a), mib(b)) for n, c, a, b in e.parts] == [("kv", 131072, "4352.00", "4352.00")]
    assert pymem.estimate(p, 8192).total == 8192 * 128 * 1024


@pytest.mark.parametrize("name", sorted(KINDS))
def test_max_context_is_the_boundary(shape_paths, name):
    p = shape_paths[name]
    for budget in (1 << 30, 6 << 30):
        for st in (PLAN_SETTINGS[0], PLAN_SETTINGS[1]):
            kw = {k: v for k, v in st.items() if k != "n_ctx"}
            n = pymem.max_context(p, budget, **kw)
            step = 256 * (1 if kw["unified"] else kw["n_seq_max"])
            if n == 0:
                assert pymem.estimate(p, step, **kw).total > budget
                continue
            assert pymem.estimate(p, n, **kw).total <= budget
            e_next = pymem.estimate(p, n + step, **kw)
            if KINDS[name][0] == "recurrent":  # constant size: the whole training context fits
                assert e_next.total == pymem.estimate(p, n, **kw).total
                assert n == pymem.estimate(p, 0, **kw).spec.n_ctx
            else:
                assert e_next.total > budget or n == pymem.estimate(p, 0, **kw).spec.n_ctx, (name, budget, st)


def test_cli_estimate_shape(capsys):
    from pymem.cli import main

    assert main(["estimate", "--shape", "llama3-8b", "--ctx", "131072", "--parallel", "4",
                 "--type-k", "q8_0", "--type-v", "q8_0", "--flash-attn", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total"] == 2 * 4352 * 1024 * 1024 and d["parts"][0]["cells"] == 131072
    assert main(["estimate", "--shape", "gemma3-12b", "--ctx", "32768"]) == 0
    out = capsys.readouterr().out
    assert "swa" in out and "layer" in out
    assert main(["estimate", "--shape", "llama3-8b", "--budget", "8GiB", "--flash-attn"]) == 0
    assert "65536" in capsys.readouterr().out  # 8 GiB / 128 KiB per token
    assert main(["estimate", "--list-shapes"]) == 0
    assert "rwkv7-2.9b" in capsys.readouterr().out


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(KINDS))
def test_plan_matches_llama_cpp(oracle, shape_paths, name):
    for st in PLAN_SETTINGS:
        est, rows = check_plan(oracle, shape_paths[name], **st)
        bad = [r for r in rows if not r.ok]
        assert not bad, (name, st, [(r.part, r.cells, mib(r.nbytes[0]), mib(r.nbytes[1]), r.llama) for r in bad])
        assert len(rows) == len(est.parts) >= 1


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("name", ["llama3-8b", "gemma3-12b", "jamba-v0.1"])
def test_max_context_fits_in_llama_cpp(oracle, shape_paths, name):
    """llama.cpp at pymem's answer fits the budget; one step more does not."""
    p = shape_paths[name]
    budget = 3 << 30
    kw = dict(n_seq_max=2, type_k="q8_0", type_v="q8_0", flash_attn=True, unified=True, swa_full=False)
    n = pymem.max_context(p, budget, **kw)
    assert n > 0
    for n_ctx, fits in ((n, True), (n + 256, False)):
        est, rows = check_plan(oracle, p, n_ctx=n_ctx, **kw)
        assert all(r.ok for r in rows)
        assert (est.total <= budget) == fits
        logged_mib = sum(float(r.llama["total_mib"]) for r in rows)  # each rounded to 0.01 MiB
        if fits:
            assert logged_mib <= budget / 2 ** 20 + 0.005 * len(rows)
        else:
            assert logged_mib > budget / 2 ** 20 - 0.005 * len(rows)


def test_plan_row_detects_differences():
    from plancheck import PlanRow, memory_log

    log = ("llama_kv_cache: size = 8704.00 MiB (131072 cells,  32 layers,  4/1 seqs), "
           "K (q8_0): 4352.00 MiB, V (q8_0): 4352.00 MiB\n"
           "llama_memory_recurrent: size =    0.62 MiB (     4 cells,  16 layers,  4 seqs  0 rs_seq), "
           "R (f32):    0.62 MiB, S (f32):    0.00 MiB\n")
    kv, rs = memory_log(log)
    assert (kv["kind"], kv["cells"], kv["layers"], kv["types"]) == ("kv", 131072, 32, ("q8_0", "q8_0"))
    assert (rs["kind"], rs["cells"], rs["mib"]) == ("recurrent", 4, ("0.62", "0.00"))
    half = 4352 << 20
    assert PlanRow("kv", "kv", 131072, (half, half), kv).ok
    assert not PlanRow("kv", "kv", 131072, (half, half + (8 << 10)), kv).ok   # 8 KiB more: 4352.01
    assert not PlanRow("kv", "kv", 65536, (half, half), kv).ok
    assert not PlanRow("kv", "kv", 131072, (half, half), None).ok


@pytest.mark.parametrize("name", sorted(KINDS))
def test_estimate_is_what_from_gguf_allocates(shape_paths, name):
    """The plan and the memory from_gguf builds agree part by part (K, V / R, S bytes and
    cells; these shapes have uniform V widths, so V padding plays no part)."""
    for kw in (dict(n_seq_max=2, flash_attn=True, unified=True, swa_full=False),
               dict(n_seq_max=3, flash_attn=False, unified=False, swa_full=True, n_rs_seq=2)):
        e = pymem.estimate(shape_paths[name], 1024, **kw)
        mem = pymem.from_gguf(shape_paths[name], 1024, **kw)
        try:
            got = [(d["part"], d["cells"], d.get("k_bytes", d.get("r_bytes")), d.get("v_bytes", d.get("s_bytes")))
                   for d in mem.breakdown()]
        finally:
            mem.close()
        assert got == [tuple(p) for p in e.parts], (name, kw)
