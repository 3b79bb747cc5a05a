"""Cutting and assembling without llama.cpp: pymem memories of many KV layouts (M-RoPE cells with
ext, quantized rows, V transposed or not, non-unified streams, a sequence restored under another id)
go through put / restore, and the restored section must be byte-identical to the original."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import pymem
import pymem.store
from pymem.params import row_size
from store_backends import memory_url

LAYOUTS = [
    dict(type_k="f16", type_v="f16", v_trans=True, unified=True),
    dict(type_k="f16", type_v="f16", v_trans=False, unified=True),
    dict(type_k="q8_0", type_v="q8_0", v_trans=False, unified=True),
    dict(type_k="q4_0", type_v="f32", v_trans=True, unified=False),
    dict(type_k="bf16", type_v="f16", v_trans=True, unified=True, n_pos_per_embd=4),
]


def filled(layout, seq, n, seed=0):
    kv = pymem.KVCache(n_layer=2, n_head_kv=[2, 1], n_embd_head_k=32, n_embd_head_v=32, size=256, n_seq_max=3,
                       **layout)
    ctx = kv.init_batch(pymem.Batch(tokens=list(range(n)), pos=list(range(n)), seq_ids=[[seq]] * n))
    rng = np.random.default_rng(seed)

    def rows(t, n_tok, w):
        if t in ("f32", "f16", "bf16", "q8_0"):
            return rng.normal(size=(n_tok, w)).astype(np.float32)
        return rng.integers(0, 256, (n_tok, row_size(t, w)), dtype=np.uint8)  # raw rows of the type

    for ub in ctx:
        ub.apply()
        for il in (0, 1):
            w = 64 if il == 0 else 32
            ub.store(il, k=rows(layout["type_k"], ub.n_tokens, w))
            ub.store(il, v=rows(layout["type_v"], ub.n_tokens, w))
    return kv


@pytest.mark.parametrize("backend", ["memory", "fs"])   # blocks copied into place / read into place
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_roundtrip_every_prefix_kind(layout, backend, tmp_path):
    n, B = 53, 16
    src = filled(layout, 1, n)
    P = list(range(1000, 1000 + n))
    url = str(memory_url(None)) if backend == "memory" else str(tmp_path / "st")
    with pymem.store.open(url, block_tokens=B, fingerprint="unit") as st:
        r = st.put(src, P, 1)
        assert r.n_tokens == n and r.entries_added >= 4
        for dst_seq, m in itertools.product((1, 2), (n, 3 * B, 2 * B + 5)):
            dst = filled(layout, 0, 7, seed=1)         # something else in sequence 0
            other = dst.state_write(seq_id=0)
            got = st.restore(dst, P[:m], dst_seq)
            want = m if m in (n, 3 * B) else 2 * B    # a prefix inside the tail is not stored
            assert got == want, st.last_reason
            ref = filled(layout, dst_seq, n)
            if want < n:
                ref.seq_rm(dst_seq, want, -1)
            assert dst.state_write(seq_id=dst_seq) == ref.state_write(seq_id=dst_seq)
            assert dst.state_write(seq_id=0) == other


@pytest.mark.parametrize("backend", ["memory", "fs"])
@pytest.mark.parametrize("field", ["n", "n_layer", "k_row"])
def test_block0_headers_that_lie_are_corrupt(field, backend, tmp_path):
    """The in-place restore reads block 0's headers first and lays the blob out by them: a block 0
    whose envelope and checksum are valid but whose payload headers do not fit the layout is a
    corrupt value (deleted, counted), nothing is restored and the target is unchanged."""
    from pymem.store import assemble as A
    from pymem.store import values as V

    n, B = 53, 16
    layout = LAYOUTS[0]
    src = filled(layout, 1, n)
    P = list(range(1000, 1000 + n))
    url = str(memory_url(None)) if backend == "memory" else str(tmp_path / "st")
    with pymem.store.open(url, block_tokens=B, fingerprint="unit") as st:
        st.put(src, P, 1)
        e0 = next(e for e in st.backend.scan() if e.kind == "block" and e.n_tokens == B)
        raw = st.backend.get(e0.key, touch=False)
        h = V.open_header(memoryview(raw), len(raw))
        pl = bytearray(raw[V.HEADER:V.HEADER + h.plen])
        o = 4 + A._PHDR.size                         # the first layer header
        if field == "n":
            pl[4:8] = (B - 1).to_bytes(4, "little")
        elif field == "n_layer":
            pl[4 + 12:4 + 16] = (3).to_bytes(4, "little")
        else:
            pl[o + 4:o + 12] = (int.from_bytes(pl[o + 4:o + 12], "little") + 2).to_bytes(8, "little")
        bad = V.seal("block", h.n_tokens, h.seed, h.key, bytes(pl))
        st.backend.delete([e0.key])
        assert st.backend.put_if_absent(e0, bad)
        dst = filled(layout, 0, 7, seed=1)
        before = dst.state_write()
        corrupt = st.stats()["corrupt"]
        assert st.restore(dst, P, 1) == 0
        assert dst.state_write() == before
        assert st.backend.entry(e0.key) is None and st.stats()["corrupt"] == corrupt + 1
        assert "corrupt" in st.last_reason
