"""Bridge scenarios run INSIDE the llama-cpp-python worker (LcpWorker.call("run",
"lcp_scenarios:<function>", ...)): there llama_cpp.Llama objects live next to pymem. Each
function asserts and returns a small summary for the test to check."""
from __future__ import annotations

import ctypes

import numpy as np

import pymem
import pymem.state
from pymem.llama import _bridge_lcp as _lcp
from pymem.llama import bridge


def _llama(path, **kw):
    import llama_cpp

    args = dict(n_ctx=256, n_batch=64, n_threads=1, verbose=False)
    args.update(kw)
    return llama_cpp.Llama(path, **args)


def _raw_state(L, ptr) -> bytes:
    n = L.llama_state_get_size(ptr)
    buf = (ctypes.c_uint8 * n)()
    w = L.llama_state_get_data(ptr, buf, n)
    return bytes(buf)[:w]


def llama_whole(path, flash_attn=False):
    """export_state / import_state of a whole Llama memory, with an edit in pymem."""
    import llama_cpp as L

    llm = _llama(path, flash_attn=flash_attn)
    toks = [(7 * i + 3) % 100 for i in range(20)]
    llm.eval(toks)
    raw = _raw_state(L, llm._ctx.ctx)
    mem = bridge.export_state(llm)
    p = bridge.context_params(llm)
    assert mem.kv_parts()[0].format == 10 if mem.kv_parts() else True
    assert mem.state_write(envelope="llama") == raw          # byte-identical
    # the same memory via the LlamaContext and the raw pointer (int and c_void_p)
    for ctx in (llm._ctx, llm._ctx.ctx, ctypes.c_void_p(llm._ctx.ctx)):
        m2 = bridge.export_state(ctx, model_path=path)
        assert m2.state_write(envelope="llama") == raw
    # edit in pymem: drop positions 8.. and import
    mem.seq_rm(0, 8, -1)
    n = bridge.import_state(llm, mem)
    got = _raw_state(L, llm._ctx.ctx)
    assert n == len(got) and got == mem.state_write(envelope="llama")
    mp = L.llama_get_memory(llm._ctx.ctx)
    assert L.llama_memory_seq_pos_max(mp, 0) == (7 if mem.kind != "recurrent" else -1) or mem.kind != "kv"
    assert llm.n_tokens == 0                                  # Llama's token cache invalidated
    return {"kind": mem.kind, "sources": dict(p.sources), "flash_attn": p.flash_attn, "bytes": len(raw),
            "format": p.spec(10).format if hasattr(p.spec(10), "format") else 10}


def raw_sequences(path, n_seq_max=3):
    """A low-level llama_cpp context with several sequences: one sequence out, edited, into
    another sequence; whole memory through the raw pointer."""
    import llama_cpp as L

    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.kv_unified, cp.flash_attn_type = 256, n_seq_max, True, 0
    cp.n_threads = cp.n_threads_batch = 1
    ctx = L.llama_init_from_model(model, cp)
    try:
        b = L.llama_batch_init(32, 0, 1)
        for i in range(12):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = (5 * i + 1) % 100, i, 1, 0
            b.seq_id[i][0] = 0
        b.n_tokens = 12
        b.logits[11] = 1
        assert L.llama_decode(ctx, b) == 0
        L.llama_batch_free(b)
        one = bridge.export_state(ctx, seq_id=0, dst_seq_id=2, model_path=path)
        assert one.seq_pos_max(2) == 11 and one.seq_pos_max(0) == -1
        cut = one.seq_rm(2, 6, -1)     # refused by memories with a recurrent part
        assert cut == (one.kind in ("kv", "iswa"))
        n = bridge.import_state(ctx, one, seq_id=2, dst_seq_id=1, model_path=path)
        mem = L.llama_get_memory(ctx)
        want = 5 if cut else 11
        assert L.llama_memory_seq_pos_max(mem, 1) == want and L.llama_memory_seq_pos_max(mem, 0) == 11
        whole = bridge.export_state(ctx, model_path=path)
        assert whole.seq_pos_max(1) == want
        assert whole.state_write(envelope="llama") == _raw_state(L, ctx)
        # a format-11 memory is refused before llama.cpp is touched (a purely recurrent memory
        # has no KV section, the same in both formats)
        m11 = bridge.memory_for(ctx, format=11, model_path=path)
        refused = "format 11 / format 10: n/a (recurrent)"
        if m11.kv_parts():
            try:
                bridge.import_state(ctx, m11, model_path=path)
            except pymem.StateError as exc:
                refused = str(exc)
            else:
                raise AssertionError("a format-11 memory was imported into a format-10 build")
        assert L.llama_memory_seq_pos_max(mem, 0) == 11
        return {"bytes": n, "refused": refused}
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


def unknown_build(path):
    """A llama-cpp-python release pymem does not know is refused, never driven."""
    import llama_cpp as L

    llm = _llama(path)
    llm.eval([1, 2, 3])
    old = L.__version__
    L.__version__ = "0.3.99"
    try:
        bridge.export_state(llm)
    except pymem.UnsupportedError as exc:
        return str(exc)
    finally:
        L.__version__ = old
    raise AssertionError("an unknown llama-cpp-python build was accepted")


def llama_state_roundtrip(path, logits_all=False):
    """LlamaState -> pymem.state.Session -> edit (truncate) -> LlamaState -> Llama.load_state,
    then the continuation equals a Llama that evaluated the shorter prompt itself."""
    llm = _llama(path, logits_all=logits_all)
    toks = [(3 * i + 1) % 100 for i in range(24)]
    llm.eval(toks)
    ls = llm.save_state()
    sess = _lcp.from_llama_state(ls, model=path)
    assert sess.version == 10 and sess.tokens == toks and sess.context_blob() == ls.llama_state
    back = _lcp.to_llama_state(sess, like=ls)
    assert back.llama_state == ls.llama_state and back.n_tokens == ls.n_tokens
    # (without logits_all, Llama.scores is uninitialized memory: compare bits, NaNs included)
    assert np.array_equal(back.input_ids, ls.input_ids) and back.scores.tobytes() == ls.scores.tobytes()
    if sess.layout.kind in ("kv", "iswa"):
        cut = sess.edit([("truncate", 10)], model=path)
    else:   # a recurrent state cannot lose its tail (pymem refuses, as llama.cpp does)
        try:
            sess.edit([("truncate", 10)], model=path)
        except pymem.state.EditError:
            pass
        else:
            raise AssertionError("truncate of a recurrent state was accepted")
        llm.eval([])
        fresh = _llama(path, logits_all=logits_all)
        fresh.eval(toks[:10])
        cut = _lcp.from_llama_state(fresh.save_state(), model=path)
    new = _lcp.to_llama_state(cut, like=llm)
    assert new.n_tokens == 10 and list(new.input_ids[:10]) == toks[:10]
    assert new.scores.shape[0] == min(10, llm.scores.shape[0])
    if logits_all and sess.layout.kind in ("kv", "iswa"):
        assert new.scores.tobytes() == ls.scores[:10].tobytes() and new.scores.any()
    llm.load_state(new)
    assert llm.n_tokens == 10
    more = [11, 12, 13]
    llm.eval(more)
    ref = _llama(path, logits_all=logits_all)
    ref.eval(toks[:10] + more)
    a, b = llm.save_state(), ref.save_state()
    assert a.llama_state == b.llama_state, "state after the edited LlamaState and a fresh run differ"
    assert a.n_tokens == b.n_tokens == 13 and list(a.input_ids[:13]) == list(b.input_ids[:13])
    # inconsistent objects are refused
    bad = _lcp.from_llama_state(ls, model=path)
    bad.tokens = bad.tokens[:5]
    try:
        _lcp.to_llama_state(bad, like=llm)
    except pymem.StateError as exc:
        refused = str(exc)
    else:
        raise AssertionError("a session whose tokens disagree with its memory was accepted")
    ls.llama_state_size += 1
    try:
        _lcp.from_llama_state(ls, model=path)
    except pymem.StateError:
        pass
    else:
        raise AssertionError("a LlamaState with a wrong size was accepted")
    return {"refused": refused, "bytes": len(new.llama_state)}


def store_roundtrip(path, directory):
    """The prompt-cache store with llama_cpp.Llama targets: put from one Llama, restore into a
    fresh one; the restored sequence is byte-identical, and it continues like the original."""
    import llama_cpp as L
    import pymem.store

    toks = [(11 * i + 5) % 100 for i in range(40)]
    a = _llama(path)
    a.eval(toks)
    with pymem.store.open(directory, block_tokens=16) as st:
        r = st.put(a, toks, seq_id=0)
        assert r.n_tokens > 0, r
        b = _llama(path)
        hit = st.lookup(toks, b)
        n = st.restore(b, toks, seq_id=0)
        assert n == hit.n_tokens > 0, (n, hit)

    def seq_state(llm):
        ptr = llm._ctx.ctx
        size = L.llama_state_seq_get_size(ptr, 0)
        buf = (ctypes.c_uint8 * size)()
        return bytes(buf)[:L.llama_state_seq_get_data(ptr, buf, size, 0)]

    mp = L.llama_get_memory(b._ctx.ctx)
    assert L.llama_memory_seq_pos_max(mp, 0) == n - 1
    ref = _llama(path)
    ref.eval(toks[:n])
    assert seq_state(b) == seq_state(ref)
    return n


def store_prefill(path, directory):
    """Store.prefill with llama_cpp.Llama targets: the first prompt decodes everything, a longer
    one in a fresh Llama restores the stored prefix and decodes the rest through Llama.eval, so
    Llama's own tokens and scores stay true; its next-token logits equal a full eval's (1e-4)."""
    import numpy as np

    import pymem
    import pymem.store

    P = [(7 * i + 3) % 100 for i in range(70)]
    Q = P + [(5 * i + 1) % 100 for i in range(20)]
    with pymem.store.open(directory, block_tokens=16, checkpoint_every=1) as st:
        a = _llama(path)
        r1 = st.prefill(a, P)
        assert (r1.n_restored, r1.n_decoded) == (0, 70), r1
        assert a.n_tokens == 70 and list(a.input_ids[:70]) == P
        b = _llama(path)
        r2 = st.prefill(b, Q)
        assert r2.n_restored >= 64 and r2.n_restored + r2.n_decoded == len(Q), (r2, st.last_reason)
        assert b.n_tokens == len(Q) and list(b.input_ids[:len(Q)]) == Q
        ref = _llama(path)
        ref.eval(Q)
        def logits(llm):   # Llama keeps no scores without logits_all: llama.cpp's last row
            import llama_cpp as L

            p = L.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(p, shape=(llm.n_vocab(),)).copy()

        lb, lr = logits(b), logits(ref)
        rel = float(np.max(np.abs(lb - lr)) / np.max(np.abs(lr)))
        assert rel < 1e-4, rel
        # Llama continues from there: the next eval starts at len(Q)
        b.eval([1, 2])
        assert b.n_tokens == len(Q) + 2
        # a sequence other than 0, and a full hit
        try:
            st.prefill(_llama(path), Q, seq_id=1)
        except pymem.InvalidArgumentError as exc:
            assert "sequence 0 only" in str(exc)
        else:
            raise AssertionError("prefill into seq 1 of a Llama was accepted")
        c = _llama(path)
        r3 = st.prefill(c, Q)
        assert r3.n_restored == len(Q) - 1 and c.n_tokens == len(Q), r3
    return {"restored": r2.n_restored, "rel": rel}
