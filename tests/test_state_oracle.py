"""pymem.state against real llama.cpp b11739: files and blobs llama.cpp saves are parsed,
inspected and dumped byte-identically; its file-load rules (T-19); states load into pymem
memories of every type; and every kind of offline edit is proven: llama.cpp saves, pymem
edits, llama.cpp loads the edit and continues, and the state (after llama.cpp's next
update), the continuation's logits and the state after it equal a llama.cpp run that did the
same operations itself (see pymem._oracle.verify)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import pymem
from pymem import state
from pymem._oracle.verify import check_session_edit, llama_ops, llama_update, states_close
from pymem.state import EditError, SeqState, Session
from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]

N_SEQ = 5   # sequence 4 is the scratch sequence of llama_update
#: (model, memory kind, configurations (kv_unified, flash_attn))
MODELS = [
    ("llama", "kv", [(True, False), (False, True)]),
    ("gemma2", "iswa", [(True, False), (False, True)]),
    ("mamba", "recurrent", [(True, False)]),
    ("jamba", "hybrid", [(True, False), (False, True)]),
    ("lfm2", "hybrid", [(True, True)]),
    ("lfm2_swa", "hybrid_iswa", [(True, True), (False, False)]),
]
CONFIGS = [pytest.param(n, k, u, fa, id=f"{n}-{'u' if u else 'nu'}-fa{int(fa)}")
           for n, k, cfgs in MODELS for u, fa in cfgs]


def ctx_kwargs(unified, fa, **extra):
    return dict(n_ctx=256, n_seq_max=N_SEQ, kv_unified=unified, flash_attn=fa, swa_full=True, **extra)


def setup(c):
    """seq 0: 16 tokens; seq 1: a fork of seq 0 plus 4 tokens; seq 2: 6 tokens of its own."""
    assert c.decode([(i % 128, i, [0]) for i in range(16)]) == 0
    c.seq_cp(0, 1)
    assert c.decode([((5 * i + 1) % 128, 16 + i, [1]) for i in range(4)]) == 0
    assert c.decode([((3 * i + 2) % 128, i, [2]) for i in range(6)]) == 0


# ---------------------------------------------------------------------------------------------
# reading what llama.cpp writes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind,unified,fa", CONFIGS)
def test_files_and_blobs_from_llama(oracle, models, tmp_path, name, kind, unified, fa):
    c = oracle.context(models[name], **ctx_kwargs(unified, fa))
    setup(c)
    toks = list(range(16))
    f = tmp_path / "s.session"
    assert c.state_save_file(f, toks)
    data = f.read_bytes()
    for model in (None, models[name]):
        s = Session.load(f, model=model)
        assert s.dump() == data and s.tokens == toks and s.version == 11
        assert s.layout.kind == kind
        assert s.context_blob() == c.state_get()
        seqs = s.sequences()
        for q in range(N_SEQ):
            if c.pos_max(q) < 0:
                assert q not in seqs
            else:   # llama.cpp reports the largest pos_min of the parts, and the largest pos_max
                assert max(x.pos_max for x in seqs[q]) == c.pos_max(q)
                assert max(x.pos_min for x in seqs[q]) == c.pos_min(q)
        assert "cells" in s.describe()
    # sequence files and blobs (and PARTIAL_ONLY blobs of composites)
    for q in range(3):
        fq = tmp_path / f"seq{q}.ggsq"
        n = c.state_seq_save_file(fq, q, toks[:q + 1])
        raw = fq.read_bytes()
        assert n == len(raw)
        for model in (None, models[name]):
            x = SeqState.load(fq, model=model)
            assert x.dump() == raw and x.tokens == toks[:q + 1] and x.version == 4
            if x.state.kv_sections():
                assert x.seq_id == q
        blob = c.state_seq_get(q)
        assert x.state.dump() == blob[8:]
        b = state.parse(blob, model=models[name])
        assert b.envelope == "seq" and b.seq_id == q and b.dump() == blob
        part = c.state_seq_get(q, 1)    # PARTIAL_ONLY: b11739 writes nothing for caches without a window
        p = state.parse(part, model=models[name])
        assert p.dump() == part
        assert p.layout.pattern == {"kv": (), "iswa": ("kv",), "recurrent": ("rec",), "hybrid": ("rec",),
                                    "hybrid_iswa": ("kv", "rec")}[kind]
    whole = c.state_get()
    w = state.parse(whole)
    assert w.envelope == "context" and w.dump() == whole
    c.close()


def test_file_load_rules(oracle, models, tmp_path):
    """T-19: llama.cpp rejects a session file with trailing bytes (after replacing the
    memory) and ignores trailing bytes of a sequence file; pymem: Session.load refuses
    (strict) or keeps them, SeqState.load keeps them; dumps stay byte-identical."""
    c = oracle.context(models["llama"], **ctx_kwargs(True, False))
    setup(c)
    f = tmp_path / "a.session"
    c.state_save_file(f, [1, 2, 3])
    f2 = tmp_path / "b.session"
    f2.write_bytes(f.read_bytes() + b"\0\0\0\0")
    d = oracle.context(models["llama"], **ctx_kwargs(True, False))
    ok, _ = d.state_load_file(f2)
    assert not ok
    assert d.pos_max(0) == 15          # ... but the memory was replaced before the check
    with pytest.raises(pymem.StateError, match="did not read all"):
        Session.load(f2, model=models["llama"])
    with pytest.raises(pymem.StateError, match="parse only partly"):
        Session.load(f2)     # without the model: trailing bytes or a damaged state?
    s = Session.load(f2, model=models["llama"], strict=False)
    assert s.trailing == b"\0\0\0\0" and s.dump() == f2.read_bytes()
    # capacity: llama.cpp refuses a file with more tokens than the caller's buffer
    ok, _ = d.state_load_file(f, capacity=2)
    assert not ok
    q = tmp_path / "a.ggsq"
    n = c.state_seq_save_file(q, 1, [4, 5])
    q2 = tmp_path / "b.ggsq"
    q2.write_bytes(q.read_bytes() + b"\x01" * 5)
    r, toks = d.state_seq_load_file(q2, 3)
    assert r == n and toks == [4, 5]   # trailing bytes ignored
    x = SeqState.load(q2, model=models["llama"])
    assert len(x.trailing) == 5 and x.dump() == q2.read_bytes()
    r, toks, cnt = d.state_seq_load_file(q, 3, tokens_out=False, with_count=True)
    assert r == 12 and cnt == 2         # tokens_out NULL: the token count only, nothing loaded
    c.close()
    d.close()


@pytest.mark.parametrize("name,kind,unified,fa", CONFIGS)
def test_to_memory_and_back(oracle, models, tmp_path, name, kind, unified, fa):
    """A llama.cpp session loads into pymem memories (from the model, and with the state's
    own geometry); pymem's session of that memory loads back into llama.cpp; a sequence
    file restores into another sequence."""
    c = oracle.context(models[name], **ctx_kwargs(unified, fa))
    setup(c)
    f = tmp_path / "s.session"
    c.state_save_file(f, [7, 8])
    s = Session.load(f, model=models[name])
    for model in (models[name], None):
        mem = s.to_memory(model)
        assert mem.kind == kind
        assert mem.state_write() == s.state.dump()
        for q in range(N_SEQ):
            if kind in ("kv", "iswa") or c.pos_max(q) >= 0:
                assert mem.seq_pos_max(q) == c.pos_max(q)
    mem = s.to_memory(models[name])
    out = Session.from_memory(mem, [7, 8])
    assert out.dump() == f.read_bytes()
    g = tmp_path / "back.session"
    out.save(g)
    d = oracle.context(models[name], **ctx_kwargs(unified, fa))
    assert d.state_load_file(g) == (True, [7, 8])
    assert d.state_get() == c.state_get()
    q = tmp_path / "s1.ggsq"
    c.state_seq_save_file(q, 1, [1])
    m2 = SeqState.load(q, model=models[name]).to_memory(models[name], seq_id=3)
    r, _ = d.state_seq_load_file(q, 3)
    assert r > 0
    assert m2.state_write(3) == d.state_seq_get(3)[8:]
    c.close()
    d.close()


# ---------------------------------------------------------------------------------------------
# edits of session files
# ---------------------------------------------------------------------------------------------
#: (label, ops, needs a model (K rotation)); the continuation decodes sequence NEXT[label]
EDITS = [
    ("seq_rm range", [("seq_rm", 0, 4, 8)], False),
    ("seq_rm whole sequence", [("seq_rm", 1)], False),
    ("seq_rm all sequences from 10", [("seq_rm", -1, 10, -1)], False),
    ("seq_cp", [("seq_cp", 2, 3)], False),
    ("seq_keep", [("seq_keep", 1)], False),
    ("seq_mv", [("seq_mv", 1, 3)], False),
    ("truncate", [("truncate", 12)], False),
    ("seq_add", [("seq_add", 1, 10, -1, 4)], True),
    ("seq_div", [("seq_div", 0, 8, -1, 2)], True),
    ("context shift", [("seq_rm", 0, 2, 6), ("seq_add", 0, 6, -1, -4)], True),
    ("context shift of an own range", [("seq_rm", 2, 1, 3), ("seq_add", 2, 3, -1, -2)], True),
    ("mixed", [("seq_mv", 2, 3), ("seq_keep", 3), ("seq_add", 3, 0, -1, 2)], True),
]
NEXT = {"seq_mv": 3, "mixed": 3, "seq_rm whole sequence": 0, "context shift of an own range": 2}


def _refused_by_recurrent(kind, ops):
    """llama.cpp's answer for memories with a recurrent part (seq_rm returns false)."""
    if kind in ("kv", "iswa"):
        return False
    for op in ops:
        if op[0] == "truncate":
            return True
        if op[0] == "seq_rm" and len(op) > 2 and op[1] == -1:
            return True      # seq_rm(-1, ...) is always false on recurrent memories (T-2)
    return False


EDIT_CASES = [pytest.param(n, k, u, fa, label, ops, shift, id=f"{n}-{'u' if u else 'nu'}-fa{int(fa)}-{label}")
              for n, k, cfgs in MODELS for u, fa in cfgs for label, ops, shift in EDITS]


@pytest.mark.parametrize("name,kind,unified,fa,label,ops,shift", EDIT_CASES)
def test_session_edit(oracle, models, tmp_path, name, kind, unified, fa, label, ops, shift):
    paths = [False] if shift else [False, True]
    for structure in paths:
        r = check_session_edit(oracle, models[name], ctx_kwargs(unified, fa), setup, ops, list(range(16)),
                               next_seq=NEXT.get(label, 1), structure=structure, tmpdir=str(tmp_path))
        if _refused_by_recurrent(kind, ops):
            assert not r.llama_ok and r.refused, (r.refused, r.llama_ok)
            assert "refused" in r.refused
            continue
        assert r.llama_ok and not r.refused, r.refused
        assert r.path == ("structure" if structure else "model")
        assert r.state_equal, "edited state != llama.cpp's state after the same operations and its update"
        assert r.loaded and r.tokens_ok
        assert r.logits_equal, r.logits_max_diff
        assert r.next_state_equal
        if shift and kind != "recurrent":
            # without the model the shift is refused (the K rotation needs RoPE parameters)
            s = Session.load(os.path.join(str(tmp_path), "original.session"), model=models[name])
            with pytest.raises(EditError, match="needs the model"):
                s.edit(ops)


@pytest.mark.parametrize("name,type_k,fa", [("llama_hd64", "q8_0", False), ("llama_hd64", "q4_0", True),
                                            ("llama_hd128", "q8_0", True)])
def test_shift_of_quantized_k(oracle, models, tmp_path, name, type_k, fa):
    """A context shift of a quantized K cache (with the Hadamard rotation llama.cpp uses for
    head sizes that are multiples of 64): metadata and V equal, K within the re-quantization
    tolerance, continuation logits close."""
    kw = ctx_kwargs(True, fa, type_k=type_k, type_v=type_k if fa else "f16")
    r = check_session_edit(oracle, models[name], kw, setup, [("seq_rm", 0, 2, 6), ("seq_add", 0, 6, -1, -4)],
                           list(range(16)), tmpdir=str(tmp_path), k_tolerance=0.02, logit_tolerance=0.05)
    assert r.ok, r


@pytest.mark.parametrize("name,type_k,fa", [("llama", "q8_0", True), ("llama_hd64", "bf16", False)])
def test_shift_llama_cannot_do(oracle, models, tmp_path, name, type_k, fa):
    """K-shifts llama.cpp b11739 cannot do (SPEC A-9): a quantized K cache without the
    Hadamard rotation (head size 32; llama.cpp crashes with SIGSEGV) and a BF16 K cache
    (llama.cpp aborts).  pymem refuses the edit."""
    from pymem._oracle import OracleCrashed

    kw = ctx_kwargs(True, fa, type_k=type_k, type_v=type_k if fa else "f16")
    c = oracle.context(models[name], **kw)
    setup(c)
    f = tmp_path / "q.session"
    c.state_save_file(f, [1])
    ops = [("seq_add", 0, 6, -1, -4)]
    with pytest.raises(EditError, match="K-shift"):
        Session.load(f, model=models[name]).edit(ops, model=models[name])
    assert llama_ops(c, ops, N_SEQ)
    with pytest.raises(OracleCrashed):
        llama_update(c, N_SEQ - 1)


# ---------------------------------------------------------------------------------------------
# edits of sequence files and raw blobs
# ---------------------------------------------------------------------------------------------
SEQ_EDITS = [
    ("seq_rm range", [("seq_rm", 1, 3, 6)], False),
    ("seq_mv", [("seq_mv", 1, 3)], False),
    ("truncate", [("truncate", 2)], False),
    ("seq_add", [("seq_add", 1, 0, -1, 3)], True),
    ("seq_div", [("seq_div", 1, 4, -1, 2)], True),
]


@pytest.mark.parametrize("name,kind,unified,fa", CONFIGS)
def test_seq_file_edits(oracle, models, tmp_path, name, kind, unified, fa):
    """llama.cpp saves sequence 1 to a ggsq file; pymem edits it; llama.cpp loads it into
    sequence 3 of a fresh context and continues.  Reference: llama.cpp applies the same
    operations to sequence 1, updates, saves the sequence file, loads it the same way."""
    for label, ops, shift in SEQ_EDITS:
        c = oracle.context(models[name], **ctx_kwargs(unified, fa))
        setup(c)
        f = tmp_path / "s1.ggsq"
        c.state_seq_save_file(f, 1, [1, 2, 3, 4])
        sq = SeqState.load(f, model=models[name])
        refuse = kind not in ("kv", "iswa") and label in ("seq_rm range", "truncate")
        # a range that does not touch the last position is a no-op for the recurrent part
        if kind not in ("kv", "iswa") and label == "seq_rm range":
            refuse = False
        try:
            e = sq.edit(ops, model=models[name] if shift else None)
        except EditError as exc:
            assert refuse, (label, str(exc))
            assert not llama_ops(c, ops if label != "truncate" else [("seq_rm", 1, 2, -1)], N_SEQ)
            c.close()
            continue
        assert not refuse, label
        ref_ops = [("seq_rm", 1, 2, -1)] if label == "truncate" else ops
        assert llama_ops(c, ref_ops, N_SEQ)
        llama_update(c, N_SEQ - 1)
        out_seq = 3 if label == "seq_mv" else 1
        g = tmp_path / "ref.ggsq"
        want_tokens = [1, 2] if label == "truncate" else [1, 2, 3, 4]
        c.state_seq_save_file(g, out_seq, want_tokens)
        ref = g.read_bytes()
        # a sequence state of an SWA model lacks the cells outside the window: edits that bring
        # such positions back into the window cannot restore them
        lossy = kind in ("iswa", "hybrid_iswa") and label in ("truncate", "seq_div")
        if not lossy:
            assert states_close(e.dump(), ref, 0.0), label
        fe = tmp_path / "edited.ggsq"
        e.save(fe)
        # load both into seq 3 of fresh contexts and continue
        outs = []
        for path in (fe, g):
            d = oracle.context(models[name], **ctx_kwargs(unified, fa))
            r, toks = d.state_seq_load_file(path, 3)
            assert r > 0 and toks == want_tokens
            p0 = d.pos_max(3) + 1
            assert d.decode([(9 + i, p0 + i, [3]) for i in range(3)]) == 0
            outs.append((d.logits(-1), d.state_get()))
            d.close()
        if not lossy:
            assert np.array_equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1], label
        c.close()


@pytest.mark.parametrize("name,kind,unified,fa", [p for p in CONFIGS if p.id in
                                                  ("llama-nu-fa1", "gemma2-u-fa0", "mamba-u-fa0", "lfm2_swa-u-fa1")])
def test_blob_edits(oracle, models, name, kind, unified, fa):
    """Raw blobs: llama_state_get_data and llama_state_seq_get_data output, edited by pymem,
    accepted by llama_state_set_data / llama_state_seq_set_data; equal to llama.cpp doing
    the operations itself."""
    c = oracle.context(models[name], **ctx_kwargs(unified, fa))
    setup(c)
    whole = state.parse(c.state_get(), model=models[name])
    seq = state.parse(c.state_seq_get(2), model=models[name])
    ops = [("seq_mv", 2, 3), ("seq_keep", 3)] if unified or kind == "recurrent" else [("seq_rm", 2)]
    e = whole.edit(ops)
    assert llama_ops(c, ops, N_SEQ)
    llama_update(c, 1 if ops[-1][1] == 3 else 3)
    assert e.dump() == c.state_get()
    d = oracle.context(models[name], **ctx_kwargs(unified, fa))
    assert d.state_set(e.dump()) == len(e.dump())
    assert d.state_get() == e.dump()
    es = seq.edit([("seq_mv", 2, 0)])
    assert es.seq_id == 0 and es.dump()[:8] == b"\xd8\x3c\x14\xaf\x00\x00\x00\x00"
    assert d.state_seq_set(es.dump(), 1) == len(es.dump())
    back = state.parse(d.state_seq_get(1), model=models[name]).edit([("seq_mv", 1, 2)])
    assert back.state.dump() == seq.state.dump()
    c.close()
    d.close()


def test_versions(oracle, models, tmp_path):
    """A b11739 session rewritten as version 10 (llama-cpp-python 0.3.36's layout: no k_rot /
    v_rot words) and back is byte-identical; b11739 refuses the version-10 file (its loader
    wants an exact version) and loads the converted-back one."""
    c = oracle.context(models["jamba"], **ctx_kwargs(True, False))
    setup(c)
    f = tmp_path / "a.session"
    c.state_save_file(f, [1, 2, 3])
    s = Session.load(f)
    v10 = s.with_version(10)
    assert v10.version == 10 and v10.nbytes == s.nbytes - 8     # one KV section, one stream with cells
    g = tmp_path / "v10.session"
    v10.save(g)
    assert Session.load(g).dump() == g.read_bytes()
    assert Session.load(g).with_version(11).dump() == f.read_bytes()
    d = oracle.context(models["jamba"], **ctx_kwargs(True, False))
    assert d.state_load_file(g)[0] is False
    Session.load(g).with_version(11).save(g)
    assert d.state_load_file(g) == (True, [1, 2, 3])
    q = tmp_path / "a.ggsq"
    c.state_seq_save_file(q, 0, [4])
    sq = SeqState.load(q)
    assert sq.with_version(3).version == 3 and sq.with_version(3).with_version(4).dump() == q.read_bytes()
    c.close()
    d.close()
