"""Pinned: M-RoPE cells (n_pos_per_embd = 4) carry 2-D positions (ext x, y) through
batches, sequence operations and states exactly as llama.cpp b11739 keeps them.

The tiny ``qwen2vl`` model (pymem._oracle.tinymodels.MROPE_SPECS) runs in llama.cpp here: text
batches (1-D positions) and embedding batches with 4 position sections (pos, y, x, 0), as an
image of a vision model would be fed.  pymem.from_gguf does not read qwen2vl, so its memory is
built by hand with the same layout.  Every step is followed by a byte-for-byte comparison of
the whole and per-sequence states (pymem._oracle.mirror), so a cell ext written with x and y
swapped, or a 2-D mask rule off, fails here.  A state written by hand from SPEC.md section 8.2
pins the field order independently of both writers."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import pymem
from conftest import needs_oracle
from pinned_support import Probe, first_diff, make_context_class, mask_visible

pytestmark = [needs_oracle, pytest.mark.oracle]

N_EMBD = 64


@pytest.fixture(scope="module")
def qwen2vl():
    from pymem._oracle import capi, tinymodels

    path = tinymodels.ensure_models(["qwen2vl"])["qwen2vl"]
    m = capi.Model(path)
    assert m.info()["rope_type"] == "mrope"
    yield m
    m.close()


def _pair(model, unified=True, fa=False, n_seq_max=3, n_ubatch=None, probe=None):
    from pymem._oracle.mirror import Mirror

    extra = {} if probe is None else {"cb_eval": probe.callback}
    lc = make_context_class()(model, n_ctx=256, n_seq_max=n_seq_max, kv_unified=unified, flash_attn=fa,
                              swa_full=True, n_ubatch=n_ubatch, n_threads=1, **extra)
    # 256 cells per stream: llama.cpp pads each stream's n_ctx to 256 (checked by the states)
    mem = pymem.KVCache(n_layer=2, n_head_kv=1, n_embd_head_k=32, size=256, n_seq_max=n_seq_max,
                        v_trans=not fa, unified=unified, n_pos_per_embd=4, arch="qwen2vl")
    return Mirror(lc, mem, n_ubatch=lc.n_ubatch(), n_vocab=128, n_seq_max=n_seq_max)


def _image(t, h, w, x0=0, y0=0):
    """Positions of an h x w image at temporal position t: sections (pos, y, x, 0)."""
    ys, xs = np.meshgrid(np.arange(h) + y0, np.arange(w) + x0, indexing="ij")
    n = h * w
    return np.stack([np.full(n, t), ys.reshape(-1), xs.reshape(-1), np.zeros(n, int)]).astype(np.int32)


def _embd(n, seed):
    return np.random.default_rng(seed).normal(0, 1, (n, N_EMBD)).astype(np.float32)


def _ext(mem, stream=0):
    cv = mem.cells_view(stream)
    used = np.flatnonzero(cv.pos != -1)
    return {int(c): (int(cv.pos[c]), *(int(v) for v in cv.ext[c])) for c in used}


@pytest.mark.parametrize("unified,fa", [(True, False), (False, True), (True, True)],
                         ids=["unified", "streams-fa", "unified-fa"])
def test_mrope_states_match_llama(qwen2vl, unified, fa):
    m = _pair(qwen2vl, unified=unified, fa=fa, n_ubatch=8)
    m.check()
    assert m.mem.can_shift is False  # n_pos_per_embd > 1 (checked against llama.cpp by check())
    m.decode([(1, 0, [0]), (2, 1, [0]), (3, 0, [1])])
    m.check()
    img = _image(2, 2, 3)            # 6 cells at pos 2 with x = 0..2, y = 0..1 (x != y)
    assert m.decode_embd(_embd(6, 1), img, [0] * 6) == 0
    m.check()
    ext = _ext(m.mem)
    assert sorted(v[1:3] for v in ext.values() if v[0] == 2) == sorted(zip(img[2], img[1]))
    # an image of seq 1 and text after it, in one batch (split across ubatches of 8)
    img1 = _image(1, 3, 2, x0=4, y0=1)
    assert m.decode_embd(_embd(6, 2), img1, [1] * 6) == 0
    m.check()
    m.decode([(4, 3, [0]), (5, 2, [1]), (6, 4, [0])])
    m.check()
    if unified:
        m.seq_cp(0, 2, 2, 3)         # the image cells only
        m.check()
        m.seq_rm(0, 2, 3)
        m.check()
    else:
        m.seq_cp(1, 2)
        m.check()
    assert m.seq_restore(2, 0) > 0   # seq blob: ext of every cell (reader: pos, y, x sections)
    m.check()
    m.seq_keep(0)
    m.check()
    m.whole_restore(from_llama=False)
    m.check()
    m.whole_restore(from_llama=True)
    m.check()
    assert m.stats["states compared"] >= 30


def test_mrope_masks_match_llama(qwen2vl):
    """The 2-D causal rule (same pos: a cell whose (y, x) is after the token's is masked) in
    the mask llama.cpp's graph reads, ubatch by ubatch, and the 4 position sections."""
    probe = Probe()
    m = _pair(qwen2vl, n_ubatch=4, probe=probe)
    mem, lc = m.mem, m.llama
    n = 0

    def run(embd, pos, seqs):
        nonlocal n
        probe.take()
        assert lc.decode_embd(embd, pos, seqs) == 0
        got = probe.take()
        ctx = mem.init_batch(pymem.Batch(tokens=None, n_tokens=len(seqs), pos=pos, seq_ids=seqs), n_ubatch=4)
        assert len(ctx) == len(got)
        for i, ub in enumerate(ctx):
            ub.apply()
            lp = got[i]["inp_pos"].reshape(4, -1)
            want = np.asarray(pos)[:, ub.batch_idx]
            assert np.array_equal(lp, want), f"ubatch {i}: positions {lp.tolist()} vs {want.tolist()}"
            (key,) = [k for k in got[i] if k.startswith("mask@")]
            a, b = mask_visible(got[i][key]), mask_visible(mem.kq_mask(ub))
            assert a.shape == b.shape and np.array_equal(a, b), f"ubatch {i}: mask differs at {first_diff(a, b)}"
            n += 1

    run(_embd(6, 3), _image(0, 2, 3), [0] * 6)
    run(_embd(4, 4), _image(0, 2, 2, x0=1, y0=1), [1, 1, 1, 1])   # same pos as seq 0's image
    img = _image(1, 3, 3)
    run(_embd(9, 5), img[:, ::-1].copy(), [0] * 9)                 # y, x descending within pos 1
    assert n >= 5


def _hand_section(cells, k_rows, v_cols, v_trans=True):
    """A bare one-stream KV section written from SPEC.md 8.2.1: cells = [(pos, x, y, tok, [seqs])]."""
    out = bytearray(struct.pack("<II", 1, len(cells)))
    for pos, x, y, tok, seqs in cells:
        out += struct.pack("<iI", pos, len(seqs)) + struct.pack("<iii", x, y, tok)
        out += b"".join(struct.pack("<i", s) for s in seqs)
    out += struct.pack("<IIII", int(v_trans), 2, 0, 0)
    for il in range(2):
        out += struct.pack("<iQ", 1, 64) + k_rows[il].tobytes()
    for il in range(2):
        out += struct.pack("<iII", 1, 2, 32) + v_cols[il].T.copy().tobytes()  # element j of each cell
    return bytes(out)


def test_mrope_hand_written_state_round_trip(qwen2vl):
    """write -> read -> write with x != y, from a section written by hand; llama.cpp reads the
    same sequence and writes it back identically."""
    rng = np.random.default_rng(7)
    cells = [(3, 7, 5, -1, [1]), (3, 8, 5, -1, [1]), (3, 7, 6, -1, [1]), (4, 0, 0, 11, [1])]
    k = [rng.normal(0, 1, (4, 32)).astype(np.float16) for _ in range(2)]
    v = [rng.normal(0, 1, (4, 32)).astype(np.float16) for _ in range(2)]
    sec = _hand_section(cells, k, v)
    m = _pair(qwen2vl, n_seq_max=2)
    mem = m.mem
    mem.state_read(sec, 1)
    ext = _ext(mem)
    assert sorted(ext.values()) == sorted((p, x, y, t) for p, x, y, t, _ in cells)
    assert mem.state_write(1) == sec
    assert (mem.seq_pos_min(1), mem.seq_pos_max(1)) == (3, 4)
    # the same bytes through llama.cpp: read into seq 1, written back unchanged
    blob = mem.state_write(1, envelope="llama")
    assert m.llama.state_seq_set(blob, 1) == len(blob)
    assert m.llama.state_seq_get(1) == blob
    assert (m.llama.pos_min(1), m.llama.pos_max(1)) == (3, 4)
    # whole-state round trip of the restored cache (seq ids and ext as written)
    whole = mem.state_write()
    fresh = pymem.KVCache(n_layer=2, n_head_kv=1, n_embd_head_k=32, size=256, n_seq_max=2,
                          n_pos_per_embd=4, arch="qwen2vl")
    fresh.state_read(whole)
    assert fresh.state_write() == whole
    assert _ext(fresh) == ext
    m.check()
