"""Pinned: the ubatch splits and the KQ masks pymem computes are the ones llama.cpp b11739's
graph actually reads (captured through ggml's graph-eval callback, tests/pinned_support.py),
ubatch by ubatch, for fixed scenarios: plain KV (unified and one stream per sequence, small
n_ubatch, multi-sequence tokens, holes after seq_rm, copies), iSWA at the window edge, and
a hybrid (sequential equal split).  tests/test_kv_unit.py checks pymem's mask against a
Python reference only; these tests check it against llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest

import pymem
from conftest import needs_oracle
from pinned_support import Probe, first_diff, make_context_class, mask_visible

pytestmark = [needs_oracle, pytest.mark.oracle]

MODELS = ["llama", "gemma2", "lfm2", "lfm2_swa"]


@pytest.fixture(scope="module")
def lm():
    from pymem._oracle import capi, tinymodels

    paths = tinymodels.ensure_models(MODELS)
    models = {n: capi.Model(p) for n, p in paths.items()}
    yield models, paths
    for m in models.values():
        m.close()


class Side:
    """One llama.cpp context (with a probe) and the pymem memory built for it."""

    def __init__(self, lm, name, unified=True, fa=False, n_seq_max=3, n_ubatch=None, swa_full=True):
        self.probe = Probe()
        cls = make_context_class()
        self.lc = cls(lm[0][name], n_ctx=256, n_seq_max=n_seq_max, kv_unified=unified, flash_attn=fa,
                      swa_full=swa_full, n_ubatch=n_ubatch, n_threads=1, cb_eval=self.probe.callback)
        self.n_ubatch = self.lc.n_ubatch()
        self.mem = pymem.from_gguf(lm[1][name], 256, n_seq_max=n_seq_max, flash_attn=fa, unified=unified,
                                   swa_full=swa_full, n_ubatch=self.n_ubatch)
        self.ubatches = 0

    def decode(self, items):
        """Decode on both; compare the split (positions of every ubatch, in order) and every
        cache's KQ mask, ubatch by ubatch."""
        self.probe.take()
        rc = self.lc.decode(items)
        got = self.probe.take()
        batch = pymem.Batch(tokens=[t for t, _, _ in items], pos=[p for _, p, _ in items],
                            seq_ids=[s for _, _, s in items])
        try:
            self.mem.check_batch(batch, n_vocab=128)
        except pymem.BatchError:
            assert rc == -1, f"pymem rejected the batch, llama.cpp returned {rc}"
            return rc
        self.mem.update()
        try:
            ctx = self.mem.init_batch(batch, n_ubatch=self.n_ubatch, n_vocab=128)
        except pymem.NoSlotError:
            assert rc == 1, f"pymem found no slot, llama.cpp returned {rc}"
            return rc
        assert rc == 0, f"llama.cpp returned {rc}, pymem placed the batch"
        assert len(ctx) == len(got), f"ubatches: llama.cpp {len(got)}, pymem {len(ctx)}"
        parts = self.mem.kv_parts()
        for i, ub in enumerate(ctx):
            ub.apply()
            lpos = got[i]["inp_pos"]
            assert np.array_equal(lpos[:ub.n_tokens], ub.pos), \
                f"ubatch {i} positions: llama.cpp {lpos.tolist()}, pymem {ub.pos.tolist()}"
            masks = sorted(k for k in got[i] if k.startswith("mask@"))
            held = [p for p in parts if p.layers]
            assert len(masks) == len(held), f"masks {masks} for {len(held)} KV parts"
            for name in masks:
                (part,) = [p for p in held if int(name[5:]) in p.layers]
                want = mask_visible(got[i][name])
                have = mask_visible(part.kq_mask(ub))
                assert want.shape == have.shape, f"ubatch {i} {name}: shape {want.shape} vs {have.shape}"
                assert np.array_equal(want, have), \
                    f"ubatch {i} {name}: first difference at {first_diff(want, have)} (stream, token, cell)"
            self.ubatches += 1
        return rc

    def op(self, name, *args):
        a = getattr(self.lc, name)(*args)
        b = getattr(self.mem, name)(*args)
        if name == "seq_rm":
            assert a == b
        return a


def _seq(s, p0, n, tok=5):
    return [(tok + i % 7, p0 + i, [s]) for i in range(n)]


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("n_ubatch", [None, 4], ids=["ub512", "ub4"])
def test_kv_masks_and_splits(lm, unified, n_ubatch):
    s = Side(lm, "llama", unified=unified, n_ubatch=n_ubatch)
    # tokens shared by sequences (only the first id decides visibility)
    s.decode([(3, 0, [0, 1]), (4, 1, [1, 0]), (5, 2, [0, 1])] + _seq(0, 3, 3))
    # interleaved sequences
    s.decode([(9, 6, [0]), (10, 3, [1]), (11, 7, [0]), (12, 4, [1]), (13, 8, [0])])
    s.op("seq_rm", 0, 2, 4)         # holes inside seq 0
    s.op("seq_rm", 1, 4, -1)        # p1 open, boundary at p0
    s.decode(_seq(0, 9, 5) + _seq(1, 4, 2) + _seq(2, 0, 3))
    if unified:
        s.op("seq_rm", 2, -1, -1)
        s.op("seq_cp", 0, 2, 0, 5)  # partial copy: seq 2 sees seq 0's first cells too
        s.decode(_seq(2, 5, 3) + _seq(0, 14, 2))
    s.op("seq_rm", 2, 0, 1)
    s.decode(_seq(1, 6, 5) + _seq(0, 16 if unified else 14, 1))
    assert s.ubatches >= 5


def test_kv_masks_two_positions_equal(lm):
    """Two cells of one sequence at the same position and a token at that position: both
    visible (p0 <= p1), the later ones masked."""
    s = Side(lm, "llama", n_ubatch=3)
    s.decode([(1, 0, [0]), (2, 1, [0]), (3, 1, [0]), (4, 1, [0]), (5, 2, [0])])
    s.op("seq_rm", 0, 2, -1)
    s.decode([(6, 2, [0]), (7, 2, [0]), (8, 3, [0])])


@pytest.mark.parametrize("swa_full", [True, False])
def test_iswa_masks_at_window_edge(lm, swa_full):
    """gemma2, window 8: tokens at distance 7, 8 and 9 from cached cells (STANDARD rule
    p1 - p0 >= n_swa masks), for two sequences and a small ubatch."""
    s = Side(lm, "gemma2", n_ubatch=5, swa_full=swa_full)
    s.decode(_seq(0, 0, 8) + _seq(1, 0, 2))
    s.decode(_seq(0, 8, 2) + _seq(1, 2, 8) + _seq(1, 10, 1))
    s.decode(_seq(0, 10, 7))
    s.op("seq_rm", 0, 12, 13)
    s.decode(_seq(0, 17, 2) + _seq(1, 11, 2))


@pytest.mark.parametrize("n_ubatch", [2, 4])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("name", ["lfm2", "lfm2_swa"])
def test_hybrid_equal_split(lm, name, unified, n_ubatch):
    """Hybrids split with the equal rule (sequential when the attention part has one stream
    per sequence): ubatches hold equal numbers of tokens of each sequence set, up to
    n_ubatch + 1 sets when more are available; positions and masks per ubatch must match
    llama.cpp."""
    s = Side(lm, name, n_seq_max=3, n_ubatch=n_ubatch, unified=unified)
    s.decode(_seq(0, 0, 5) + _seq(1, 0, 3) + _seq(2, 0, 2))
    s.decode(_seq(2, 2, 3) + _seq(0, 5, 6))
    s.decode(_seq(1, 3, 1) + _seq(0, 11, 1))
    assert s.ubatches >= 6
