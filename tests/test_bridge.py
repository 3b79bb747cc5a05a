"""pymem.llama.bridge against live llama.cpp b11739 contexts, for every memory type.

Each scenario runs two identical llama.cpp contexts. Context A does an edit itself. Context B
exports its state to pymem, pymem does the same edit, and the result is imported back into B.
Both contexts then decode the same next tokens, and their logits and whole states must be
identical (exact equality). Cell order changes the order of float sums in attention, so the
two contexts must also agree on where cells are. Whole restores pack cells and reset
llama.cpp's slot head, so the reference A first takes llama.cpp's own whole round trip, and
the edits only leave trailing holes. Sequence restores move the head, so both contexts get
the same head reset (see reset_head).

The contexts run in-process (pymem._oracle.capi), as a user's would. Subprocess tests import
``llama_cpp_py_sync`` as a user does, including on glibc < 2.38 where its libraries only load
through pymem's patched copy."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pymem
from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]

KIND = {"llama": "kv", "gemma2": "iswa", "mamba": "recurrent", "lfm2": "hybrid", "jamba": "hybrid",
        "lfm2_swa": "hybrid_iswa", "llama_hd64": "kv", "llama_yarn": "kv"}
TYPES = ["llama", "gemma2", "mamba", "lfm2", "jamba", "lfm2_swa"]
CONFIGS = [pytest.param(n, u, fa, id=f"{n}-{'u' if u else 'nu'}-fa{int(fa)}")
           for n in TYPES for u in (True, False) for fa in (False, True)]
# quantized K shifted with llama.cpp's Hadamard rotation (head size 64), YaRN RoPE
EXTRA = [pytest.param("llama_hd64", True, True, dict(type_k="q8_0", type_v="q8_0"), id="llama_hd64-q8_0-fa1"),
         pytest.param("llama_hd64", False, False, dict(type_k="q4_0"), id="llama_hd64-q4_0k-nu-fa0"),
         pytest.param("llama_yarn", True, False, {}, id="llama_yarn-u-fa0")]


@pytest.fixture(scope="module")
def lm():
    """In-process llama.cpp models (name -> capi.Model) and their GGUF paths."""
    from pymem._oracle import capi, tinymodels

    paths = tinymodels.ensure_models(list(KIND))
    models = {n: capi.Model(p) for n, p in paths.items()}
    yield models, paths
    for m in models.values():
        m.close()


@pytest.fixture
def ctx(lm):
    from pymem._oracle import capi

    made = []

    def make(name, unified=True, fa=False, n_ctx=256, n_seq_max=3, **kw):
        c = capi.Context(lm[0][name], n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=unified, flash_attn=fa,
                         n_threads=1, **kw)
        made.append(c)
        return c

    yield make
    for c in reversed(made):
        c.close()


def bridge():
    from pymem.llama import bridge as b

    return b


def decode(c, seq, tokens, start=None):
    start = c.pos_max(seq) + 1 if start is None else start
    assert c.decode([(t, start + i, [seq]) for i, t in enumerate(tokens)]) == 0
    return c.logits(-1)


def prefill(c):
    decode(c, 0, list(range(1, 13)))        # seq 0: 12 tokens (past the SWA window of 8)
    decode(c, 1, list(range(40, 46)))       # seq 1: 6 tokens, placed last


def reset_head(*ctxs):
    """The same llama.cpp call on every context: a seq_add over an empty position range moves
    nothing but resets the KV slot search head to 0 (SPEC 2.7). The head is not part of any
    state blob, yet with SWA caches it decides which masked cells a placement reuses."""
    for c in ctxs:
        for s in range(c.n_seq_max()):   # every stream of a non-unified cache
            c.seq_add(s, 1 << 24, (1 << 24) + 1, 1)


def same_future(a, b, seqs):
    """Decode the same next tokens in both contexts: equal logits, equal whole states (A may
    still have a K-shift pending before its first decode, so states are compared after)."""
    for i, s in enumerate(seqs):
        assert a.pos_max(s) == b.pos_max(s), s
        la = decode(a, s, [70 + i, 90 + i])
        lb = decode(b, s, [70 + i, 90 + i])
        assert la is not None and np.array_equal(la, lb), f"logits of seq {s} differ"
    assert bytes(a.state_get()) == bytes(b.state_get())


# ---- whole state ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,unified,fa,kw", [pytest.param(*p.values, {}, id=p.id) for p in CONFIGS] + EXTRA)
def test_whole_state_edit_and_import(ctx, name, unified, fa, kw):
    B = bridge()
    a, b = ctx(name, unified, fa, **kw), ctx(name, unified, fa, **kw)
    for c in (a, b):
        prefill(c)
    assert bytes(a.state_get()) == bytes(b.state_get())

    mem = B.export_state(b)
    assert mem.kind == KIND[name]
    assert mem.state_write(envelope="llama") == bytes(b.state_get())
    for s in (0, 1):
        assert mem.state_write(s, envelope="llama") == bytes(b.state_seq_get(s))
    p = B.context_params(b)
    assert p.assumed == []
    if KIND[name] != "recurrent":
        assert (p.kv_unified, p.flash_attn) == (unified, fa)
        assert (p.type_k, p.type_v) == (kw.get("type_k", "f16"), kw.get("type_v", "f16"))
        assert p.sources["flash_attn"] == p.sources["type_k"] == "state"

    assert a.state_set(bytes(a.state_get())) > 0     # llama.cpp's own round trip (see docstring)
    for m in (a, mem):                               # the same edit in llama.cpp and in pymem
        assert m.seq_rm(1, 3, -1) is (KIND[name] != "recurrent" and KIND[name] != "hybrid"
                                      and KIND[name] != "hybrid_iswa")
        m.seq_add(0, 4, -1, 2)
        m.seq_cp(0, 2, -1, -1)
    assert B.import_state(b, mem) > 0                # update() applies the K-shift in pymem first
    assert not mem.update_pending
    same_future(a, b, [0, 2, 1])


# ---- one sequence --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,unified,fa", CONFIGS)
def test_sequence_edit_and_import(ctx, name, unified, fa):
    B = bridge()
    a, b = ctx(name, unified, fa), ctx(name, unified, fa)
    for c in (a, b):
        prefill(c)

    # sequence 1 out, edited in pymem, back in under its own id; A edits it itself
    m1 = B.export_state(b, seq_id=1)
    assert m1.state_write(1, envelope="llama") == bytes(b.state_seq_get(1))
    assert m1.seq_pos_max(0) == -1                   # nothing but sequence 1 was exported
    for m in (a, m1):
        m.seq_rm(1, 4, -1)
        m.seq_add(1, 0, -1, 3)
    assert B.import_state(b, m1, seq_id=1) > 0
    reset_head(a, b)     # A's seq_add reset its head; B's sequence restore moved its own

    # sequence 0 into pymem as sequence 2 (another memory), then into llama.cpp as sequence 2;
    # A copies it with its own sequence state functions
    m2 = B.memory_for(b)
    assert B.export_state(b, m2, seq_id=0, dst_seq_id=2) is m2
    assert a.state_seq_set(bytes(a.state_seq_get(0)), 2) > 0
    assert m2.state_write(2, envelope="llama") == bytes(a.state_seq_get(2))
    assert B.import_state(b, m2, seq_id=2) > 0

    # only the SWA / recurrent part of sequence 0 (PARTIAL_ONLY), out and back in
    m3 = B.export_state(b, seq_id=0, flags=pymem.STATE_PARTIAL_ONLY)
    blob = bytes(b.state_seq_get(0, pymem.STATE_PARTIAL_ONLY))
    if KIND[name] == "kv":
        # b11739: a plain KV cache has no partial part and writes nothing (pymem's core writes
        # the whole KV section here; the bridge follows llama.cpp)
        assert len(blob) == 8 and m3.seq_pos_max(0) == -1
    else:
        assert m3.state_write(0, flags=pymem.STATE_PARTIAL_ONLY, envelope="llama") == blob
    assert a.state_seq_set(blob, 0, pymem.STATE_PARTIAL_ONLY) > 0
    assert B.import_state(b, m3, seq_id=0, flags=pymem.STATE_PARTIAL_ONLY) > 0

    same_future(a, b, [1, 2, 0])


# ---- recovering the context parameters -------------------------------------------------------------

RECOVER = [
    pytest.param("llama", dict(type_k="q8_0", type_v="q8_0", fa=True), id="llama-q8_0-fa"),
    pytest.param("llama", dict(type_k="q4_0", fa=False, unified=False), id="llama-q4_0k-nu"),
    pytest.param("jamba", dict(type_k="bf16", type_v="bf16", fa=True, unified=False), id="jamba-bf16"),
    pytest.param("gemma2", dict(swa_full=False, n_ctx=1024, n_ubatch=64), id="gemma2-swa_full0"),
    pytest.param("gemma2", dict(swa_full=True, n_ctx=1024, n_ubatch=64, fa=True), id="gemma2-swa_full1"),
    pytest.param("lfm2_swa", dict(swa_full=False, n_ctx=1024, n_ubatch=64, unified=False), id="lfm2_swa-swa_full0"),
    pytest.param("lfm2", dict(n_rs_seq=2, n_ubatch=8), id="lfm2-n_rs_seq2"),
]


@pytest.mark.parametrize("name,kw", RECOVER)
def test_params_recovered_from_a_raw_pointer(ctx, lm, name, kw):
    """A raw pointer carries no creation parameters: everything must come from llama.cpp."""
    B = bridge()
    kw = dict(kw)
    unified, fa = kw.pop("unified", True), kw.pop("fa", False)
    c = ctx(name, unified, fa, **kw)
    prefill(c)
    p = B.context_params(c.ptr, model_path=lm[1][name])
    assert p.assumed == [], p.sources
    assert (p.kv_unified, p.flash_attn) == (unified, fa)
    assert (p.type_k, p.type_v) == (kw.get("type_k", "f16"), kw.get("type_v", "f16"))
    if "swa_full" in kw:
        assert p.swa_full is kw["swa_full"] and p.sources["swa_full"] == "can_shift"
    mem = B.memory_for(c.ptr, model_path=lm[1][name])
    # llama.cpp answers true for a quantized K without a Hadamard rotation, then crashes in the
    # shift; pymem's can_shift tells the truth (issue 15 item 10)
    shiftable = all(not (p.type_k.startswith("q") and p.k_rot == 0) for p in mem.kv_parts())
    assert mem.can_shift == (c.can_shift() and shiftable)
    B.export_state(c.ptr, mem, model_path=lm[1][name])
    assert mem.state_write(envelope="llama") == bytes(c.state_get())
    if name == "lfm2":
        assert mem.recurrent.n_rs_seq == 2
    for part in mem.kv_parts():
        assert (part.type_k, part.v_trans, part.unified) == (kw.get("type_k", "f16"), not fa, unified)
    if "swa_full" in kw:
        assert (mem.swa.size == 1024) is kw["swa_full"]


def test_empty_context_assumes_types_and_llama_refuses_a_mismatch(ctx, lm):
    """An empty cache writes no types; a raw pointer assumes the C defaults, and the import of a
    memory with other types fails in llama.cpp with its logged reason."""
    B = bridge()
    path = lm[1]["llama"]
    src = ctx("llama", fa=True, type_k="q8_0", type_v="q8_0")
    prefill(src)
    mem = B.export_state(src)
    empty = ctx("llama", fa=False)                  # f16, V transposed
    p = B.context_params(empty.ptr, model_path=path)
    assert sorted(p.assumed) == ["flash_attn", "type_k", "type_v"]
    assert (p.flash_attn, p.type_k) == (True, "f16")  # llama_context_default_params(): auto = on
    with pytest.raises(pymem.StateError, match=r"(?s)refused.*V transposition.*assumed"):
        B.import_state(empty.ptr, mem, model_path=path)
    # the capi.Context recorded its creation parameters: nothing is assumed
    assert B.context_params(empty).assumed == []
    assert B.context_params(empty).sources["flash_attn"] == "created"
    # the empty context's own layout, given explicitly, reads its state
    fresh = B.memory_for(empty.ptr, model_path=path, flash_attn=False, type_k="f16", type_v="f16")
    assert fresh.kv_parts()[0].v_trans is True


def test_mismatched_memory_is_refused_before_llama_is_touched(ctx):
    B = bridge()
    a = ctx("gemma2", unified=True)
    prefill(a)
    before = bytes(a.state_get())
    other = ctx("gemma2", unified=False)
    mem = B.memory_for(other)
    with pytest.raises(pymem.StateError, match="nothing was imported.*streams"):
        B.import_state(a, mem)
    with pytest.raises(pymem.StateError, match="nothing was imported.*arch"):
        B.import_state(a, B.memory_for(ctx("llama")))
    assert bytes(a.state_get()) == before
    # and the other way: a memory of another layout cannot take the context's state
    with pytest.raises(pymem.StateError, match="does not match"):
        B.export_state(a, mem)


def test_invalid_arguments_raise_instead_of_aborting(ctx, lm):
    B = bridge()
    c = ctx("lfm2", n_seq_max=2)
    prefill(c)
    mem = B.export_state(c)
    for bad in (2, 256, -2):
        with pytest.raises(pymem.InvalidArgumentError):
            B.export_state(c, seq_id=bad)
        with pytest.raises(pymem.InvalidArgumentError):
            B.import_state(c, mem, seq_id=0, dst_seq_id=bad)
    with pytest.raises(pymem.InvalidArgumentError, match="ON_DEVICE"):
        B.export_state(c, seq_id=0, flags=2)
    with pytest.raises(pymem.InvalidArgumentError, match="model_path"):
        B.memory_for(c.ptr)
    with pytest.raises(pymem.InvalidArgumentError, match="not the context's model"):
        B.memory_for(c.ptr, model_path=lm[1]["jamba"])
    with pytest.raises(TypeError):
        B.memory_for(object())
    assert bytes(c.state_get()) == mem.state_write(envelope="llama")


def test_worker_context_handle(oracle, models):
    """ContextHandle (a context in pymem's oracle worker) through the same functions."""
    B = bridge()
    h = oracle.context(models["lfm2_swa"], n_ctx=256, n_seq_max=2, kv_unified=False, flash_attn=True)
    try:
        h.decode_seq(0, list(range(1, 13)))
        mem = B.export_state(h)
        assert mem.state_write(envelope="llama") == h.state_get()
        assert B.context_params(h).sources["flash_attn"] == "state"
        one = B.export_state(h, seq_id=0, dst_seq_id=1)
        assert B.import_state(h, one, seq_id=1) > 0
        assert h.pos_max(1) == 11
        mem.seq_rm(0, 6, -1)
        assert mem.seq_pos_max(0) == 11             # hybrid: a partial removal is refused
        mem.seq_keep(1)
        assert B.import_state(h, mem) > 0
        assert (h.pos_max(0), h.pos_max(1)) == (-1, -1)
    finally:
        h.close()


# ---- a user's llama_cpp_py_sync, in a fresh process ----------------------------------------------------

def _run(code: str, tmp_path, **env) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path), env=dict(os.environ, **env))
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


USER_FLOW = """
    import sys
    MODEL = {model!r}
    import llama_cpp_py_sync as L          # imported first, as users do
    from pymem.llama import _loader
    if _loader.needs_glibc_compat():       # this system: the installed libraries cannot load
        try:
            L.Llama(MODEL, n_ctx=256, n_gpu_layers=0)
            raise SystemExit("expected the GLIBC_2.38 failure")
        except RuntimeError as e:
            assert "GLIBC_2.38" in str(e), e
    import pymem, pymem.llama
    mod = pymem.llama.llama_cpp()          # the module that loads (pymem's copy on old glibc)
    import llama_cpp_py_sync as again
    assert again is mod
    for Llama in (L.Llama, mod.Llama):     # the early import was redirected to the same copy
        llm = Llama(MODEL, n_ctx=256, n_gpu_layers=0, n_threads=1, flash_attn_type=1)
        llm.generate("tok_1 tok_2 tok_3", max_tokens=4)
        n = llm._lib.llama_memory_seq_pos_max(llm._lib.llama_get_memory(llm._ctx), 0)
        mem = pymem.llama.export_state(llm)
        size = llm._lib.llama_state_get_size(llm._ctx)
        buf = llm._ffi.new("uint8_t[]", size)
        assert llm._lib.llama_state_get_data(llm._ctx, buf, size) == size
        assert mem.state_write(envelope="llama") == bytes(llm._ffi.buffer(buf, size))
        p = pymem.llama.context_params(llm)
        assert p.assumed == [] and p.flash_attn is True, p.sources
        mem.seq_rm(0, 3, -1)
        assert pymem.llama.import_state(llm, mem) > 0
        assert llm._lib.llama_memory_seq_pos_max(llm._lib.llama_get_memory(llm._ctx), 0) == 2
        ptr = pymem.llama.export_state(llm._ctx, model_path=MODEL)       # the raw pointer too
        assert ptr.state_write(envelope="llama") == mem.state_write(envelope="llama")
        llm.close()
    print("OK", n, type(L.Llama(MODEL, n_ctx=256, n_gpu_layers=0)).__module__)
"""


def test_user_imports_llama_cpp_py_sync(lm, tmp_path):
    out = _run(USER_FLOW.format(model=lm[1]["llama"]), tmp_path)
    assert out.startswith("OK")


OWN_COPY = """
    import ctypes, sys
    MODELS = {models!r}
    from pymem.llama import _loader
    if _loader.needs_glibc_compat():
        # a user with a working llama_cpp_py_sync of their own (as on glibc >= 2.38)
        d = _loader.compat_dir()
        ctypes.CDLL(str(d / "libisoc23_shim.so"), mode=ctypes.RTLD_GLOBAL)
        sys.path.insert(0, str(d))
    from llama_cpp_py_sync import Llama
    from pymem.llama import bridge
    llm = Llama(MODELS["llama"], n_ctx=512, n_gpu_layers=0, n_threads=1, n_seq_max=2)
    llm.generate("tok_5 tok_6", max_tokens=3)
    mem = bridge.export_state(llm)
    assert mem.kind == "kv" and mem.seq_pos_max(0) >= 2
    p = bridge.context_params(llm)
    assert p.kv_unified is False and p.flash_attn is False and p.assumed == [], p.sources
    mem.seq_cp(0, 1)                       # non-unified: a stream copy, done by update()
    assert bridge.import_state(llm, mem) > 0
    mem_of = lambda l, s: l._lib.llama_memory_seq_pos_max(l._lib.llama_get_memory(l._ctx), s)
    assert mem_of(llm, 1) == mem.seq_pos_max(0)
    # Llama.generate() aborts in llama_sampler_sample on the tiny lfm2 models (logits NULL);
    # decode with the class's own prompt evaluation instead
    hyb = Llama(MODELS["lfm2_swa"], n_ctx=512, n_gpu_layers=0, n_threads=1, flash_attn_type=1)
    hyb._eval_tokens([5, 6, 7, 8, 9], 0)
    mem = bridge.export_state(hyb)
    assert mem.kind == "hybrid_iswa" and mem.seq_pos_max(0) == 4
    assert bridge.context_params(hyb).sources["flash_attn"] == "state"
    mem.seq_rm(0, -1, -1)
    assert bridge.import_state(hyb, mem) > 0 and mem_of(hyb, 0) == -1
    assert not _loader.is_loaded()         # the bridge used the contexts' own library
    print("OK")
"""


def test_user_with_own_llama_cpp_py_sync(lm, tmp_path):
    from pymem.llama import _loader

    if _loader.needs_glibc_compat():
        _loader.load()  # makes sure the compatibility copy exists
    out = _run(OWN_COPY.format(models={n: lm[1][n] for n in ("llama", "lfm2_swa")}), tmp_path)
    assert out.startswith("OK")
