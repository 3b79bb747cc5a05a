"""pymem.store with live llama.cpp contexts (tiny models of all five memory kinds): the proofs of
issue 11, items 1-4 and 7.  Every test runs over every backend of ``store_url``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pymem
import pymem.store
from pymem.store import policy
from store_backends import KIND_MODELS, context, decoded, model_path, needs_llama, rel_diff, store_url, tokens  # noqa: F401

pytestmark = needs_llama
KINDS = list(KIND_MODELS)
B = 16
MAX_DIFFS: dict = {}


def _open(url, **kw):
    kw.setdefault("block_tokens", B)
    return pymem.store.open(url, **kw)


def _dump(st, path):
    """The backend's entries and values, for a child process when the backend lives in-process."""
    rows = []
    for e in st.backend.scan():
        v = st.backend.get(e.key, touch=False)
        rows.append({"key": e.key, "kind": e.kind, "n": e.n_tokens, "parent": e.parent, "value": v.hex()})
    with open(path, "w") as fh:
        json.dump(rows, fh)


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pymem.store
    from pymem.store.backends.base import Entry
    sys.path.insert(0, {tests!r})
    from store_backends import context
    a = json.load(open({args!r}))
    st = pymem.store.open(a["url"], block_tokens=a["B"])
    if a["dump"]:
        for r in json.load(open(a["dump"])):
            st.backend.put_if_absent(Entry(r["key"], 0, r["kind"], r["n"], r["parent"]), bytes.fromhex(r["value"]))
    c = context(a["name"])
    n = st.restore(c, a["tokens"], 0)
    state = c.state_seq_get(0)
    more = a["tokens"][n:]
    rc = c.decode_seq(0, more, n, logits=[False] * (len(more) - 1) + [True])
    np.savez(a["out"], n=n, state=np.frombuffer(state, np.uint8), logits=c.logits(-1), rc=rc,
             reason=np.array(st.last_reason))
""")


# ---------------------------------------------------------------------------------------------
# (1) put, then restore P + more in a new process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_restore_in_new_process(kind, store_url, tmp_path):
    name = KIND_MODELS[kind]
    P, more = tokens(1, 3 * B + 5), tokens(2, 9)
    src = decoded(name, P)
    original = src.state_seq_get(0)
    with _open(store_url) as st:
        r = st.put(src, P, 0)
        assert r.n_tokens == len(P) and r.bytes_added > 0
        assert st.lookup(P + more, src).n_tokens == len(P)
        dump = ""
        if not store_url.persistent:
            dump = str(tmp_path / "dump.json")
            _dump(st, dump)
        args = tmp_path / "args.json"
        out = tmp_path / "out.npz"
        args.write_text(json.dumps({"url": str(store_url), "B": B, "dump": dump, "name": name,
                                    "tokens": P + more, "out": str(out)}))
        code = _CHILD.format(tests=os.path.dirname(__file__), args=str(args))
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
    res = np.load(out)
    assert int(res["n"]) == len(P), str(res["reason"])
    assert int(res["rc"]) == 0
    # the restored sequence is byte-identical to the original's (every kind: the KV part is
    # reassembled from blocks, the SWA / recurrent parts come from the checkpoint at len(P))
    assert res["state"].tobytes() == bytes(original)
    full = decoded(name, P + more)
    d = rel_diff(res["logits"], full.logits(-1))
    MAX_DIFFS[kind] = d
    print(f"\n[store] {kind}: restored {len(P)} tokens in a new process; next-token logits max rel diff {d:.3g}")
    assert d <= 1e-4


# ---------------------------------------------------------------------------------------------
# (2) shared prefix, then divergence: reuse = longest block / checkpoint boundary <= divergence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_divergence(kind, every, store_url):
    name = KIND_MODELS[kind]
    P = tokens(3, 5 * B + 7)
    with _open(store_url, checkpoint_every=every) as st:
        a = context(name)
        r = st.prefill(a, P, 0)
        assert (r.n_restored, r.n_decoded) == (0, len(P))
        full = decoded(name, P)
        assert rel_diff(a.logits(-1), full.logits(-1)) <= 1e-4
        # the same prompt again: a full hit that still decodes the last token
        b = context(name)
        r = st.prefill(b, P, 0)
        assert (r.n_restored, r.n_decoded) == (len(P) - 1, 1), r.reason
        assert rel_diff(b.logits(-1), full.logits(-1)) <= 1e-4
        for d in (B - 1, B, 2 * B + 3, 3 * B, 4 * B + 5):
            Q = P[:d] + [(t % 120) + 1 for t in tokens(100 + d, 2 * B)]
            Q[d] = (P[d] % 126) + 1 if Q[d] == P[d] else Q[d]
            step = B if kind == "kv" else B * every
            want = d // step * step
            c = context(name)
            assert st.lookup(Q, c).n_tokens >= want
            r = st.prefill(c, Q, 0)
            assert r.n_restored == want, (d, r)
            assert r.n_decoded == len(Q) - want
            ref = decoded(name, Q)
            assert rel_diff(c.logits(-1), ref.logits(-1)) <= 1e-4
            assert c.state_seq_get(0) == ref.state_seq_get(0) or kind != "kv"


# ---------------------------------------------------------------------------------------------
# (3) another model / other head dims / other cache types: a miss that says why
# ---------------------------------------------------------------------------------------------
def _other_weights(tmp_path):
    from store_backends import llama_modules

    capi, tinymodels = llama_modules()
    return tinymodels.build("llama", str(tmp_path), seed=4321, filename="llama-other.gguf")


def test_mismatch_other_model_dims_and_types(store_url, tmp_path):
    from store_backends import llama_modules

    capi, _ = llama_modules()
    P = tokens(5, 3 * B + 2)
    with _open(store_url) as st:
        st.put(decoded("llama", P), P, 0)
        other = capi.Model(_other_weights(tmp_path))
        cases = [
            (capi.Context(other, n_ctx=256, n_seq_max=2, kv_unified=True, flash_attn=False), "other weights"),
            (context("llama_hd64"), "layers"),
            (context("llama", type_k="q8_0"), "type_k"),
            (context("llama", flash_attn=True), "v_trans"),
        ]
        for ctx, why in cases:
            # something else already in the destination sequence: it must survive the miss
            ctx.decode_seq(0, tokens(9, 7), 0)
            before = ctx.state_get()
            hit = st.lookup(P, ctx)
            assert hit.n_tokens == 0
            assert "fingerprint mismatch" in hit.reason and why in hit.reason, hit.reason
            assert st.restore(ctx, P, 0) == 0
            assert ctx.state_get() == before


# ---------------------------------------------------------------------------------------------
# (4) corrupted, truncated, foreign and missing values: a miss or a shorter prefix, never wrong
# ---------------------------------------------------------------------------------------------
def _replace(st, key, value):
    e = st.backend.entry(key)
    st.backend.delete([key])
    assert st.backend.put_if_absent(e, value)


@pytest.mark.parametrize("kind", ["kv", "hybrid", "hybrid_iswa"])
def test_corruption(kind, store_url):
    name = KIND_MODELS[kind]
    P = tokens(6, 4 * B + 3)
    src = decoded(name, P)
    with _open(store_url) as st:
        st.put(src, P, 0)
        # also a checkpoint at 2 blocks, for the non-KV kinds
        st.put(decoded(name, P[:2 * B]), P[:2 * B], 0)
        blocks = sorted((e for e in st.backend.scan() if e.kind == "block"), key=lambda e: e.n_tokens)
        assert [e.n_tokens for e in blocks] == [B, 2 * B, 3 * B, 4 * B]

        def check(expect_max):
            c = context(name)
            c.decode_seq(0, tokens(7, 5), 0)
            before = c.state_get()
            try:
                n = st.restore(c, P, 0)
            except pymem.Error:
                n = -1
            assert n != -1
            assert n <= expect_max
            if n == 0:
                assert c.state_get() == before
            else:  # exactly the state of a context that decoded those n tokens
                assert c.state_seq_get(0) == decoded(name, P[:n]).state_seq_get(0)
            return n

        # flip bytes in the middle of block 2
        v = bytearray(st.backend.get(blocks[2].key))
        v[len(v) // 2] ^= 0xFF
        _replace(st, blocks[2].key, bytes(v))
        n = check(2 * B)
        assert st.backend.entry(blocks[2].key) is None  # the bad value was deleted
        why = st.lookup(P, context(name)).reason
        assert "corrupt value was deleted (checksum mismatch)" in why or kind != "kv", why
        # truncated value of block 1
        _replace(st, blocks[1].key, st.backend.get(blocks[1].key)[:-40])
        assert check(B) <= B
        # garbage under block 0's key / a foreign (valid) value under it
        v0 = st.backend.get(blocks[0].key)
        _replace(st, blocks[0].key, b"\x00garbage" * 50)
        assert check(0) == 0
        assert st.verify()["bad"] in (0, 1)   # garbage not fetched by a restore: verify deletes it
        st.put(src, P, 0)       # restores the deleted blocks
        assert st.restore(context(name), P, 0) == len(P), st.last_reason
        tail = next(e for e in st.backend.scan() if e.kind == "block" and e.n_tokens == 3 * B)
        _replace(st, tail.key, v0)  # block 0's value under block 2's key
        check(2 * B)
        # a block deleted in the middle of the chain
        st.put(src, P, 0)
        mid = next(e for e in st.backend.scan() if e.kind == "block" and e.n_tokens == 2 * B)
        st.backend.delete([mid.key])
        assert check(B) <= B
        rep = st.verify()
        assert rep["bad"] == 0
        assert not policy.orphans(st.backend.scan())


# ---------------------------------------------------------------------------------------------
# (7) budget and chains
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kv", "hybrid_iswa", "recurrent"])
def test_budget_holds_without_chain_holes(kind, store_url):
    name = KIND_MODELS[kind]
    system = tokens(8, 2 * B)
    with _open(store_url, checkpoint_every=1) as st:
        r = st.prefill(context(name), system + [1], 0)
        assert r.bytes_added > 0
        assert st.pin(system, context(name)) >= (2 if kind != "recurrent" else 1)
        pinned = st.stats()["bytes"]
        st.budget_bytes = budget = pinned * 4
        for i in range(20):
            P = system + tokens(200 + i, B + (i * 7) % (2 * B))
            c = context(name)
            st.prefill(c, P, 0)
            s = st.stats()
            assert s["bytes"] <= budget, s
            assert not policy.orphans(st.backend.scan())
        s = st.stats()
        assert s["evictions"] > 0 and s["puts"] == 21
        first = system + tokens(200, B)
        hit = st.lookup(first, context(name))
        assert hit.n_tokens < len(first)
        assert "evicted by the byte budget" in hit.reason or kind != "kv", hit.reason
        # the pinned system prompt survived every eviction
        assert st.lookup(system + [1, 2, 3], context(name)).n_tokens == 2 * B
        # the most recent prompt is still whole
        assert st.lookup(P, context(name)).n_tokens == len(P)
        assert st.gc()["orphans"] == 0


# ---------------------------------------------------------------------------------------------
# pymem memories as targets; lookup has no side effects
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_pymem_memory_targets(kind, store_url):
    from pymem.llama import export_state

    name = KIND_MODELS[kind]
    path = model_path(name)
    P = tokens(10, 2 * B + 9)
    src = decoded(name, P)
    mk = lambda: pymem.from_gguf(path, 256, n_seq_max=2, unified=True, flash_attn=False, swa_full=False)  # noqa: E731
    mem = export_state(src, mk(), seq_id=0)
    with _open(store_url) as st:
        assert st.put(mem, P, 0).bytes_added > 0
        dst = mk()
        c0 = dict(st.stats())
        used = {e.key: e.last_used for e in st.backend.scan()}
        look = st.lookup(P + [1, 2], dst)
        assert {e.key: e.last_used for e in st.backend.scan()} == used      # no LRU refresh
        assert look.n_tokens == len(P) and "not in the store" in look.reason
        assert {k: st.stats()[k] for k in ("hits", "misses")} == {k: c0[k] for k in ("hits", "misses")}
        assert st.restore(dst, P + [1, 2], 0) == len(P)
        assert dst.state_write(seq_id=0) == mem.state_write(seq_id=0)
        # into the live context too
        c = context(name)
        assert st.restore(c, P, 1) == len(P)
        assert st.stats()["hits"] == c0["hits"] + 2
        assert st.stats()["tokens_saved"] == c0["tokens_saved"] + 2 * len(P)


def test_put_rejects_bad_input(store_url):
    P = tokens(11, 20)
    c = decoded("llama", P)
    with _open(store_url) as st:
        with pytest.raises(pymem.Error):
            st.put(c, P[:-1], 0)              # tokens do not match the sequence length
        with pytest.raises(pymem.Error):
            st.put(c, [[1, 2]], 0)
        with pytest.raises(pymem.Error):
            st.put(c, P, 7)                   # no such sequence
        with pytest.raises(pymem.Error):
            st.put(pymem.KVCache(n_layer=2, size=64), P, 0)   # no model: cannot fingerprint
        assert st.stats()["entries"] == 0


# ---------------------------------------------------------------------------------------------
# layout variants: flash attention (V not transposed), quantized cache, non-unified streams,
# restore under another sequence id; the unified / non-unified layouts share entries
# ---------------------------------------------------------------------------------------------
VARIANTS = {
    "flash_q8": dict(flash_attn=True, type_k="q8_0", type_v="q8_0"),
    "non_unified": dict(kv_unified=False, n_seq_max=3),
    "q4_k_only": dict(type_k="q4_0"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["kv", "iswa", "hybrid", "hybrid_iswa", "recurrent"])
def test_layout_variants(kind, variant, store_url):
    name = KIND_MODELS[kind]
    kw = VARIANTS[variant]
    P, more = tokens(12, 2 * B + 6), tokens(13, 5)
    src = context(name, **kw)
    assert src.decode_seq(1, P, 0) == 0
    with _open(store_url) as st:
        assert st.put(src, P, 1).n_tokens == len(P)
        dst = context(name, **kw)
        dst.decode_seq(1, tokens(14, 9), 0)        # another sequence stays as it is
        other = dst.state_seq_get(1)
        assert st.restore(dst, P + more, 0) == len(P), st.last_reason
        assert dst.state_seq_get(1) == other
        ref = context(name, **kw)
        assert ref.decode_seq(0, P, 0) == 0
        assert dst.state_seq_get(0) == ref.state_seq_get(0)
        dst.decode_seq(0, more, len(P), logits=[False] * (len(more) - 1) + [True])
        ref.decode_seq(0, more, len(P), logits=[False] * (len(more) - 1) + [True])
        assert rel_diff(dst.logits(-1), ref.logits(-1)) <= 1e-4


def test_unified_and_non_unified_do_not_mix(store_url):
    # a sequence section lists every stream: llama.cpp reads it only into the same stream count
    P = tokens(15, 2 * B + 1)
    with _open(store_url) as st:
        st.put(decoded("llama", P, kv_unified=True, n_seq_max=2), P, 0)
        c = context("llama", kv_unified=False, n_seq_max=2)
        hit = st.lookup(P, c)
        assert hit.n_tokens == 0 and "kv.n_stream: stored 1, target 2" in hit.reason, hit.reason
        assert st.restore(c, P, 1) == 0


@pytest.mark.parametrize("dest_empty", [False, True])
def test_llama_refusal_leaves_context_unchanged(dest_empty, store_url):
    # pymem's check passes (the blob is valid), but llama.cpp has no room for it: the other
    # sequence fills the cache.  The destination sequence must be put back exactly.
    P = tokens(16, 3 * B + 4)
    with _open(store_url) as st:
        st.put(decoded("llama", P), P, 0)
        c = context("llama")
        assert c.decode_seq(1, tokens(17, 230), 0) == 0
        if not dest_empty:
            assert c.decode_seq(0, tokens(18, 10), 0) == 0
        before = c.state_get()
        assert st.restore(c, P, 0) == 0
        assert "refused" in st.last_reason, st.last_reason
        assert c.state_get() == before
        # with room again, the same restore works
        c.seq_rm(1, -1, -1)
        assert st.restore(c, P, 0) == len(P)


def test_fingerprint_override(store_url):
    P = tokens(19, 2 * B + 3)
    src = decoded("llama", P)
    with _open(store_url, fingerprint="my-finetune-v1") as st:
        st.put(src, P, 0)
        assert st.lookup(P, src).n_tokens == len(P)
    with _open(store_url, fingerprint="my-finetune-v2") as st:
        if not store_url.persistent:   # a memory:// store lives in its Store: share the backend
            pytest.skip("needs a store that two opens share")
        hit = st.lookup(P, src)
        assert hit.n_tokens == 0 and "model fingerprint" in hit.reason, hit.reason


def test_fingerprint_override_shared_backend():
    from store_backends import memory_url

    url = str(memory_url(None))
    keep = pymem.store.open(url)                  # keeps the named in-process store alive
    P = tokens(19, 2 * B + 3)
    src = decoded("llama", P)
    pymem.store.open(url, block_tokens=B, fingerprint="v1").put(src, P, 0)
    hit = pymem.store.open(url, block_tokens=B, fingerprint="v2").lookup(P, src)
    assert hit.n_tokens == 0 and "model fingerprint" in hit.reason, hit.reason
    assert pymem.store.open(url, block_tokens=B).lookup(P, src).n_tokens == 0   # the file's own fingerprint
    keep.close()
