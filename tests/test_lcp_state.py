"""pymem.state against llama-cpp-python 0.3.36 (llama.cpp 0c1e570, state format 10): the
session (ggsn v10) and sequence (ggsq v3) files and blobs it writes are parsed and dumped
byte-identically, and every offline edit of test_state_oracle.py is proven the same way:
llama-cpp-python saves, pymem edits, llama-cpp-python loads the edit and continues, and the
state, the continuation's logits and the state after it equal a llama-cpp-python run that did
the same operations itself (pymem._oracle.verify, driven through the LcpWorker)."""
from __future__ import annotations

import pytest

import test_state_oracle as T
from conftest import needs_oracle
from pymem import state
from pymem.state import SeqState, Session

pytestmark = [needs_oracle, pytest.mark.oracle]

# PARTIAL_ONLY sequence states of 0c1e570: a plain KV cache ignores the flag (whole sequence)
PARTIAL_PATTERN = {"kv": ("kv",), "iswa": ("kv",), "recurrent": ("rec",), "hybrid": ("rec",),
                   "hybrid_iswa": ("kv", "rec")}


@pytest.mark.parametrize("name,kind,unified,fa", T.CONFIGS)
def test_lcp_files_and_blobs(lcp, models, tmp_path, name, kind, unified, fa):
    c = lcp.context(models[name], **T.ctx_kwargs(unified, fa))
    T.setup(c)
    toks = list(range(16))
    f = tmp_path / "s.session"
    assert c.state_save_file(f, toks)
    data = f.read_bytes()
    for model in (None, models[name]):
        s = Session.load(f, model=model)
        assert s.dump() == data and s.tokens == toks and s.version == 10 and s.format == 10
        assert s.layout.kind == kind
        assert s.context_blob() == c.state_get()
        seqs = s.sequences()
        for q in range(T.N_SEQ):
            if c.pos_max(q) < 0:
                assert q not in seqs
            else:
                assert max(x.pos_max for x in seqs[q]) == c.pos_max(q)
                assert max(x.pos_min for x in seqs[q]) == c.pos_min(q)
    # the same memory as a format-11 session and back: only the k_rot / v_rot words differ
    s = Session.load(f, model=models[name])
    s11 = s.with_version(11)
    assert s11.version == 11 and s11.format == 11
    assert len(s11.dump()) - len(data) == 8 * sum(1 for _, sec in s.state.kv_sections()
                                                  for st in sec.streams if st.cells)
    assert s11.with_version(10).dump() == data
    for q in range(3):
        fq = tmp_path / f"seq{q}.ggsq"
        n = c.state_seq_save_file(fq, q, toks[:q + 1])
        raw = fq.read_bytes()
        assert n == len(raw)
        for model in (None, models[name]):
            x = SeqState.load(fq, model=model)
            assert x.dump() == raw and x.tokens == toks[:q + 1] and x.version == 3
            if x.state.kv_sections():
                assert x.seq_id == q
        blob = c.state_seq_get(q)
        assert x.state.dump() == blob[8:]
        b = state.parse(blob, model=models[name])
        assert b.envelope == "seq" and b.seq_id == q and b.dump() == blob
        assert b.format == 10 or not b.state.kv_sections()   # a bare REC section is the same in both
        part = c.state_seq_get(q, 1)
        p = state.parse(part, model=models[name])
        assert p.dump() == part
        assert p.layout.pattern == PARTIAL_PATTERN[kind]
        if kind == "kv":
            assert part == blob      # 0c1e570: the flag changes nothing for a plain KV cache
    whole = c.state_get()
    w = state.parse(whole)
    assert w.envelope == "context" and w.dump() == whole
    assert w.format == 10 or not w.state.kv_sections()
    c.close()


def _shift_aborts(name):
    """0c1e570 aborts (GGML_ASSERT(buffer) in ggml-backend.cpp) applying a K-shift to a
    hybrid-iSWA memory whose base KV cache has no layers (lfm2 with a sliding window)."""
    return name == "lfm2_swa"


@pytest.mark.parametrize("name,kind,unified,fa,label,ops,shift", T.EDIT_CASES)
def test_lcp_session_edit(lcp, models, tmp_path, name, kind, unified, fa, label, ops, shift):
    if shift and _shift_aborts(name):
        # pymem does the edit; llama-cpp-python cannot apply the same shift (its reference run)
        from pymem._oracle import OracleCrashed
        from pymem._oracle.verify import llama_ops, llama_update

        c = lcp.context(models[name], **T.ctx_kwargs(unified, fa))
        T.setup(c)
        f = tmp_path / "s.session"
        assert c.state_save_file(f, list(range(16)))
        e = Session.load(f, model=models[name]).edit(ops, model=models[name])
        assert e.version == 10
        assert llama_ops(c, ops, T.N_SEQ)
        with pytest.raises(OracleCrashed, match="GGML_ASSERT"):
            llama_update(c, T.N_SEQ - 1)
        return
    T.test_session_edit(lcp, models, tmp_path, name, kind, unified, fa, label, ops, shift)


@pytest.mark.parametrize("name,kind,unified,fa", T.CONFIGS)
def test_lcp_seq_file_edits(lcp, models, tmp_path, name, kind, unified, fa, monkeypatch):
    if _shift_aborts(name):
        monkeypatch.setattr(T, "SEQ_EDITS", [e for e in T.SEQ_EDITS if not e[2]])
    T.test_seq_file_edits(lcp, models, tmp_path, name, kind, unified, fa)


def test_lcp_vectors_regenerate(lcp, tmp_path):
    """tests/vectors/kv_0c1e570.txt and mem_0c1e570.txt are what llama-cpp-python 0.3.36 writes today (and pymem
    replays it: regen.py refuses otherwise)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "tests", "vectors", "regen.py"), "--llama",
                        "llama-cpp-python", "--check"], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "24 cases" in p.stderr      # kv_0c1e570.txt 19, mem_0c1e570.txt 5
