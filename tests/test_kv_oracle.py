"""Differential tests of the KV cache against real llama.cpp b11739.

Every test runs the same batches and sequence operations in llama.cpp (a persistent worker
process) and in pymem, then compares positions, the whole state and every per-sequence
state byte for byte (see pymem._oracle.mirror for how K/V rows of new tokens are carried)."""
from __future__ import annotations

import numpy as np
import pytest

import pymem
from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]

CONFIGS = [
    dict(unified=True, flash_attn=False),
    dict(unified=True, flash_attn=True),
    dict(unified=False, flash_attn=False),
    dict(unified=False, flash_attn=True),
]


def ids(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def fill(m, seq, n, start=0, tok=0):
    return m.decode([((tok + i) % 128, start + i, [seq]) for i in range(n)])


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_sequence_ops_and_holes(pair, cfg):
    m = pair("llama", n_seq_max=4, **cfg)
    assert fill(m, 0, 12) == 0
    assert fill(m, 1, 7, tok=40) == 0
    m.check()
    m.seq_rm(0, 3, 6)          # holes in seq 0
    m.seq_rm(1, -1, 2)
    m.check()
    assert fill(m, 2, 5, tok=9) == 0   # lands in the holes (unified) or its own stream
    m.check()
    m.seq_cp(0, 3, -1, -1)
    m.check()
    m.seq_keep(3)
    m.check()
    assert fill(m, 3, 3, start=12) == 0
    m.seq_add(3, 4, -1, -2)    # K-shift pending
    m.check()
    assert fill(m, 3, 2, start=13) == 0
    m.check()
    m.seq_div(3, 0, -1, 2)
    assert fill(m, 3, 1, start=8) == 0
    m.check()
    assert m.stats["states compared"] > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_restore_under_another_id_and_whole(pair, cfg):
    m = pair("llama", n_seq_max=4, **cfg)
    assert fill(m, 0, 20) == 0
    assert fill(m, 1, 6, tok=60) == 0
    m.seq_rm(0, 0, 4)
    m.check()
    assert m.seq_restore(0, 2) > 0       # llama.cpp and pymem each with its own blob
    m.check()
    assert m.seq_restore(1, 1) > 0
    m.check()
    m.whole_restore(from_llama=True)      # pymem reads llama.cpp's bytes ...
    assert fill(m, 2, 4, start=20, tok=3) == 0   # ... and continues on its own
    m.seq_rm(1, -1, -1)
    m.check()
    m.whole_restore(from_llama=False)     # llama.cpp reads pymem's bytes
    assert fill(m, 1, 3, tok=77) == 0
    m.check()


@pytest.mark.parametrize("type_k,type_v,fa", [("q8_0", "f16", False), ("q8_0", "q8_0", True),
                                              ("f32", "f32", False), ("q4_0", "q4_0", True),
                                              ("bf16", "bf16", False)])
def test_cache_types(pair, type_k, type_v, fa):
    m = pair("llama", n_seq_max=2, unified=True, flash_attn=fa, type_k=type_k, type_v=type_v)
    assert fill(m, 0, 10) == 0
    assert fill(m, 1, 5, tok=20) == 0
    m.seq_rm(0, 2, 4)
    assert fill(m, 1, 2, start=5) == 0
    m.check()
    assert m.seq_restore(1, 0) > 0
    m.check()


@pytest.mark.parametrize("type_k,fa", [("f16", False), ("f32", True)])
def test_k_shift_exact(pair, type_k, fa):
    m = pair("llama", n_seq_max=2, unified=True, flash_attn=fa, type_k=type_k, type_v=type_k)
    assert fill(m, 0, 30) == 0
    m.seq_rm(0, 0, 10)
    m.seq_add(0, 10, -1, -10)               # context shift
    m.check()                               # pending: positions moved, K not yet rotated
    assert fill(m, 0, 3, start=20) == 0     # the decode applies the K-shift first
    m.check()
    m.seq_div(0, 0, -1, 3)
    assert fill(m, 0, 1, start=m.mem.seq_pos_max(0) + 1) == 0
    m.check()


def test_k_shift_yarn_scales_every_cell(pair):
    # attn_factor * YaRN mscale != 1: every K-shift rescales all cells, even zero-shift ones
    m = pair("llama_yarn", n_seq_max=2, unified=True, flash_attn=False)
    assert fill(m, 0, 8) == 0
    assert fill(m, 1, 8, tok=30) == 0
    m.seq_add(1, 0, -1, -100)               # drops every cell of seq 1 (T-5)
    assert m.mem.seq_pos_max(1) == -1
    assert fill(m, 0, 1, start=8) == 0
    m.k_tolerance = 1e-3
    m.check()


def test_k_shift_quantized_with_rotation(pair):
    # head dim 64 + q8_0 K: b11739 stores K Hadamard-rotated (k_rot 64) and shifts through it
    m = pair("llama_hd64", n_seq_max=1, unified=True, flash_attn=True, type_k="q8_0", type_v="q8_0")
    assert m.mem.k_rot == 64 and m.mem.v_rot == 64
    assert fill(m, 0, 16) == 0
    m.check()
    m.seq_add(0, 4, -1, -3)
    m.seq_rm(0, 0, 1)
    assert fill(m, 0, 2, start=13) == 0
    m.k_tolerance = 0.02                    # dequantize/rotate/requantize is not bit-stable
    m.check()


def test_k_shift_quantized_without_rotation_is_an_error(pair):
    m = pair("llama", n_seq_max=1, unified=True, flash_attn=True, type_k="q8_0", type_v="f16")
    assert m.mem.k_rot == 0
    fill(m, 0, 4)
    assert not m.mem.can_shift              # llama.cpp says true, then crashes at the next decode
    before = m.mem.state_write()
    with pytest.raises(pymem.UnsupportedError, match="K-shift"):
        m.mem.seq_add(0, 0, -1, 2)          # refused up front: never accepted, then wedged
    assert m.mem.state_write() == before and not m.mem.update_pending


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_full_cache_and_slot_failure(pair, cfg):
    m = pair("llama", n_seq_max=2, **cfg)
    size = m.mem.size
    assert fill(m, 0, size - 3) == 0
    m.check(per_seq=False)
    assert fill(m, 0, 10, start=size - 3) == 1        # does not fit: llama.cpp returns 1
    m.check(per_seq=False)
    assert fill(m, 0, 3, start=size - 3) == 0
    m.seq_rm(0, 100, 110)
    assert fill(m, 1, 10, tok=5) == 0 if cfg["unified"] else True
    m.check(per_seq=False)


def test_head_rules_and_wraparound(pair):
    # T-4 / T-11: head after seq_add drops, the restart heuristic, wrap-around placement
    m = pair("llama", n_seq_max=3, unified=True)
    assert fill(m, 0, 220) == 0
    m.seq_rm(0, 10, 20)
    m.seq_add(0, 200, -1, -500)            # drops cells 200..219 -> head 200
    m.check(per_seq=False)
    m.seq_rm(0, 0, -1)
    assert fill(m, 1, 46) == 0              # 46 > used + 2n? placement from head or from 0
    m.check(per_seq=False)
    assert fill(m, 2, 60, tok=3) == 0
    m.check(per_seq=False)
    m.seq_add(1, 2, 1, 5)                  # inverted range: head reset to 0 only
    assert fill(m, 1, 2, start=46) == 0
    m.check()


def test_unified_foreign_ids(pair):
    # T-6: unified caches accept ids up to 255 in seq ops; writes drop ids >= n_seq_max
    m = pair("llama", n_seq_max=4, unified=True)
    assert fill(m, 0, 6) == 0
    m.seq_cp(0, 200)
    m.seq_rm(0, 0, 2)
    m.check()
    assert m.mem.seq_pos_max(200) == m.llama.pos_max(200) == 5
    lb = m.llama.state_seq_get(200)
    pb = m.mem.state_write(200, envelope="llama")
    assert lb == pb
    assert m.llama.state_seq_set(lb, 1) == 0
    with pytest.raises(pymem.StateError):
        m.mem.state_read(pb, 1, envelope="llama")
    m.check()


def test_cross_stream_copy_is_deferred(pair):
    # T-7: the data copy happens at the next update; states taken before show old bytes
    m = pair("llama", n_seq_max=3, unified=False)
    assert fill(m, 0, 10) == 0
    assert fill(m, 1, 4, tok=50) == 0
    m.seq_cp(0, 1, -1, -1)
    m.check()
    assert m.mem.update_pending
    m.clear(False)                          # the queued copy survives clear
    assert m.mem.update_pending
    assert fill(m, 2, 2) == 0               # update runs the copy into stream 1
    m.check()
    with pytest.raises(pymem.UnsupportedError):
        m.mem.seq_cp(0, 2, 1, -1)           # partial cross-stream copy: llama.cpp aborts


def test_auto_positions_and_primary_ids(pair):
    # T-1 / T-28: NULL positions follow the first *listed* id; coupled tokens
    m = pair("llama", n_seq_max=3, unified=True)
    assert m.decode([(1, None, [0]), (2, None, [1, 0]), (3, None, [0])]) == 0
    m.check()
    assert m.decode([(4, None, [0, 1, 2])]) == -1 or True
    m.check()


@pytest.mark.parametrize("items,rc", [
    ([(1, 0, [0]), (2, 1, [0]), (3, 1, [0]), (4, 2, [0])], 0),   # duplicate position ok
    ([(1, 0, [0]), (2, 2, [0]), (3, 1, [0])], -1),              # decreasing
    ([(1, 0, [0]), (2, 2, [0])], -1),                            # gap
    ([(1, 1, [0]), (2, 0, [0])], -1),
    ([(1, 5, [0])], 0),                                          # an empty seq may start anywhere
    ([(200, 0, [0])], -1),                                       # token >= n_vocab
    ([(1, 0, [7])], -1),                                         # seq id >= n_seq_max
])
def test_batch_validation(pair, items, rc):
    m = pair("llama", n_seq_max=2, unified=True)
    assert m.decode(items) == rc
    m.check()


def test_validation_continuation(pair):
    m = pair("llama", n_seq_max=2, unified=True)
    assert m.decode([(1, 5, [0])]) == 0
    assert m.decode([(1, 5, [0])]) == -1
    assert m.decode([(1, 7, [0])]) == -1
    assert m.decode([(1, 6, [0])]) == 0
    assert fill(m, 1, 3) == 0
    assert m.decode([(1, 7, [0, 1])]) == -1                      # coupled after divergence
    m.check()


def test_non_unified_coupled_batch_fails(pair):
    m = pair("llama", n_seq_max=2, unified=False)
    assert m.decode([(1, 0, [0, 1]), (2, 1, [0, 1])]) == 1        # T-22
    m.check()


def test_small_ubatches_split(pair):
    m = pair("llama", n_seq_max=4, unified=False, n_ubatch=4)
    items = [(i % 128, i // 4, [i % 4]) for i in range(24)]
    assert m.decode(items) == 0
    m.check()
    m2 = pair("llama", n_seq_max=4, unified=True, n_ubatch=5)
    assert m2.decode(items) == 0
    m2.check()
