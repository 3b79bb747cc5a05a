"""KV cache tests that need no llama.cpp: argument errors (never a crash, nothing changed),
state parsing errors, views and their lifetime, batch ordering, the KQ mask against a
straightforward reference, store() conversions, format 10."""
from __future__ import annotations

import gc
import itertools
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

import pymem
from pymem.state.sections import parse_kv


def make(**kw) -> pymem.KVCache:
    args = dict(n_layer=2, n_head_kv=1, n_embd_head_k=32, size=256, n_seq_max=4,
                rope=pymem.Rope(n_rot=32), arch="llama")
    args.update(kw)
    return pymem.KVCache(**args)


def put(kv, seq, n, start=0):
    b = pymem.Batch(tokens=[i % 100 for i in range(n)], pos=list(range(start, start + n)), seq_ids=[[seq]] * n)
    ctx = kv.decode(b)
    for ub in ctx:
        pass
    return ctx


def snapshot(kv) -> tuple:
    cells = [kv.cells_view(s).copy() for s in range(kv.n_stream)]
    heads = [kv.stream_info(s) for s in range(kv.n_stream)]
    return kv.state_write(), [c.tobytes() for c in cells], heads


def filled(**kw):
    kv = make(**kw)
    rng = np.random.default_rng(0)
    put(kv, 0, 20)
    put(kv, 1, 9)
    for il in kv.layers:
        for s in range(kv.n_stream):
            k = kv.k(il, s)
            k[...] = rng.standard_normal(k.shape).astype(k.dtype) if k.dtype != np.uint8 else 7
    kv.seq_rm(0, 3, 5)
    return kv


# ---- construction ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc", [
    (dict(n_seq_max=0), pymem.InvalidArgumentError),
    (dict(n_seq_max=257), pymem.InvalidArgumentError),
    (dict(size=0), pymem.InvalidArgumentError),
    (dict(type_k="q8_0", n_embd_head_k=20, rope=None), pymem.InvalidArgumentError),
    (dict(type_v="q4_0", v_trans=True), pymem.UnsupportedError),
    (dict(type_k="q2_k"), pymem.UnsupportedError),
    (dict(swa_type="standard", n_swa=0), pymem.InvalidArgumentError),
    (dict(swa_type="diagonal"), pymem.InvalidArgumentError),
    (dict(n_pos_per_embd=3), pymem.InvalidArgumentError),
    (dict(format=9), pymem.InvalidArgumentError),
    (dict(layers=[0, 2]), pymem.InvalidArgumentError),
    (dict(layers=[1, 0]), pymem.InvalidArgumentError),
    (dict(n_head_kv=[1, 2, 3]), pymem.InvalidArgumentError),
    (dict(rope=pymem.Rope(n_rot=33)), pymem.InvalidArgumentError),
    (dict(rope=pymem.Rope(n_rot=64)), pymem.InvalidArgumentError),
])
def test_bad_construction(kw, exc):
    with pytest.raises(exc):
        make(**kw)


def test_info_and_layout():
    kv = make(n_layer=4, layers=[1, 3], n_head_kv=[1, 2, 1, 2], size=512, unified=False, n_seq_max=3)
    assert kv.layers == [1, 3] and kv.n_stream == 3 and kv.size == 512
    assert kv.k(3, 2).shape == (512, 64) and kv.k(3).dtype == np.float16
    assert kv.v(1).shape == (64, 512)                     # transposed V, the layer's own width
    q = make(type_k="q8_0", type_v="q8_0", v_trans=False, n_embd_head_k=64, rope=None)
    assert q.k(0).shape == (256, 2 * 34) and q.k_rot == 64 and q.v_rot == 64
    assert make(type_k="q8_0", rope=None).k_rot == 0       # head dim 32: no rotation
    with pytest.raises(pymem.InvalidArgumentError):
        kv.k(0)


# ---- errors change nothing -------------------------------------------------------------------

BAD_OPS = [
    ("seq_rm", (-2, 0, -1), pymem.InvalidArgumentError),
    ("seq_rm", (256, 0, -1), pymem.InvalidArgumentError),
    ("seq_cp", (-1, 1), pymem.InvalidArgumentError),
    ("seq_cp", (0, 256), pymem.InvalidArgumentError),
    ("seq_keep", (-1,), pymem.InvalidArgumentError),
    ("seq_add", (-1, 0, -1, 1), pymem.InvalidArgumentError),
    ("seq_add", (300, 0, -1, 0), pymem.InvalidArgumentError),   # checked before the d == 0 return
    ("seq_add", (0, 0, -1, 2**31 - 5), pymem.InvalidArgumentError),
    ("seq_div", (0, 0, -1, 0), pymem.InvalidArgumentError),
    ("seq_div", (0, 0, -1, -2), pymem.InvalidArgumentError),
    ("seq_div", (300, 0, -1, 1), pymem.InvalidArgumentError),
    ("seq_pos_max", (-1,), pymem.InvalidArgumentError),
    ("seq_pos_min", (256,), pymem.InvalidArgumentError),
    ("state_write", (256,), pymem.InvalidArgumentError),
    ("state_write", (-2,), pymem.InvalidArgumentError),
]


@pytest.mark.parametrize("op,args,exc", BAD_OPS, ids=[f"{o}{a}" for o, a, _ in BAD_OPS])
def test_bad_ops_change_nothing(op, args, exc):
    kv = filled()
    before = snapshot(kv)
    with pytest.raises(exc):
        getattr(kv, op)(*args)
    assert snapshot(kv) == before


def test_non_unified_id_checks():
    kv = filled(unified=False, n_seq_max=2)
    before = snapshot(kv)
    for op, args in [("seq_rm", (2, 0, -1)), ("seq_keep", (2,)), ("seq_cp", (0, 2)), ("seq_pos_max", (5,))]:
        with pytest.raises(pymem.InvalidArgumentError):
            getattr(kv, op)(*args)
    with pytest.raises(pymem.UnsupportedError):
        kv.seq_cp(0, 1, 1, -1)                     # partial cross-stream copy
    assert snapshot(kv) == before
    kv.seq_cp(0, 1, 255, 256)                      # llama.cpp's "full" quirk: passes
    assert kv.update_pending


def test_mrope_rejects_shifts():
    kv = make(n_pos_per_embd=4)
    assert kv.cell_ext and not kv.can_shift
    for op in ("seq_add", "seq_div"):
        with pytest.raises(pymem.UnsupportedError):
            getattr(kv, op)(0, 0, -1, 1 if op == "seq_add" else 1)


def test_bf16_shift_is_refused():
    # llama.cpp aborts in the K-shift of a bf16 K; pymem refuses the seq_add (nothing changed)
    # rather than accepting it and failing every later update
    kv = make(type_k="bf16", type_v="bf16")
    assert not kv.can_shift
    put(kv, 0, 5)
    before = snapshot(kv)
    with pytest.raises(pymem.UnsupportedError, match="bf16"):
        kv.seq_add(0, 0, -1, 3)
    assert snapshot(kv) == before and not kv.update_pending
    put(kv, 0, 1, start=5)


def test_no_rope_cannot_shift():
    kv = make(rope=None)
    assert not kv.can_shift
    put(kv, 0, 3)
    before = snapshot(kv)
    with pytest.raises(pymem.UnsupportedError, match="cannot shift"):
        kv.seq_add(0, 0, -1, 1)
    assert snapshot(kv) == before and not kv.update_pending
    none = make(rope=pymem.Rope(mode="none"))
    put(none, 0, 3)
    none.seq_add(0, 0, -1, 1)
    k = none.k(0).copy()
    assert none.update() and np.array_equal(none.k(0), k) and not none.update_pending


def test_batch_errors_change_nothing():
    kv = filled()
    before = snapshot(kv)
    for b in [pymem.Batch(tokens=[1], pos=[5], seq_ids=[[0]]),      # does not continue seq 0 (max 19)
              pymem.Batch(tokens=[1, 2], pos=[20, 22], seq_ids=[[0], [0]]),
              pymem.Batch(tokens=[1], pos=[20], seq_ids=[[4]]),
              pymem.Batch(tokens=[], pos=[])]:
        with pytest.raises(pymem.BatchError):
            kv.decode(b)
    with pytest.raises(pymem.BatchError):
        kv.decode(pymem.Batch(tokens=[500], pos=[20]), n_vocab=128)
    assert snapshot(kv) == before


def test_no_slot_changes_nothing():
    kv = make(size=256, n_seq_max=1)
    put(kv, 0, 250)
    before = snapshot(kv)
    with pytest.raises(pymem.NoSlotError):
        put(kv, 0, 10, start=250)
    assert snapshot(kv) == before


def test_swa_prepare_failure_is_undone():
    # llama.cpp keeps the SWA purges of a failed dry run (T-10); pymem undoes them
    kv = make(size=256, n_seq_max=3, n_swa=8, swa_type="standard")
    put(kv, 0, 245)
    kv.seq_cp(0, 1)
    kv.seq_cp(0, 2)
    put(kv, 0, 11, start=245)
    before = snapshot(kv)
    with pytest.raises(pymem.NoSlotError):
        put(kv, 2, 8, start=245)
    assert snapshot(kv) == before


# ---- state restore errors -----------------------------------------------------------------------

def test_truncated_and_corrupt_states_change_nothing():
    src = filled()
    whole = src.state_write()
    seq = src.state_write(1)
    dst = filled()
    put(dst, 2, 4)
    before = snapshot(dst)
    for blob, s in [(whole, -1), (seq, 3)]:
        for cut in list(range(0, 64)) + list(range(64, len(blob), 97)):
            with pytest.raises(pymem.StateError):
                dst.state_read(blob[:cut], s)
        with pytest.raises(pymem.StateError):
            dst.state_read(blob + b"\0", s)                        # trailing bytes
        assert dst.state_read(blob + b"\0", s, allow_trailing=True) == len(blob)
        dst.state_read(before[0])
        assert snapshot(dst)[0] == before[0]
    assert snapshot(dst) != before or True


def _mutations(blob: bytes):
    """(description, corrupted blob) pairs for a one-stream KV section with cells."""
    sec, _ = parse_kv(blob)
    st = sec.streams[0]
    yield "n_stream", (2).to_bytes(4, "little") + blob[4:]
    yield "cell_count > size", blob[:4] + (300).to_bytes(4, "little") + blob[8:]
    c = st.cells[0]
    c.seq_ids, old = [9], c.seq_ids
    yield "seq id >= n_seq_max", sec.dump()
    c.seq_ids = old
    c.pos, oldp = -5, c.pos
    yield "negative position", sec.dump()
    c.pos = oldp
    for field, val in [("v_trans", 0), ("k_rot", 64), ("v_rot", 64)]:
        o = getattr(st, field)
        setattr(st, field, val)
        yield field, sec.dump()
        setattr(st, field, o)
    L = st.layers[1]
    L.k_type, o = 0, L.k_type
    yield "k type", sec.dump()
    L.k_type = o
    L.k_row, o = L.k_row + 2, L.k_row
    yield "k row size", sec.dump()
    L.k_row = o
    L.v_embd, o = 16, L.v_embd
    yield "v rows", sec.dump()
    L.v_embd = o
    st.layers.append(st.layers[0])
    yield "layer count", sec.dump()


def test_mismatched_sections_are_rejected():
    src = filled()
    whole = src.state_write()
    dst = make()
    put(dst, 0, 3)
    before = snapshot(dst)
    for what, bad in _mutations(whole):
        with pytest.raises(pymem.StateError) as ei:
            dst.state_read(bad)
        assert str(ei.value), what
        assert snapshot(dst) == before, what
    assert dst.state_read(whole) == len(whole)


def test_envelopes():
    kv = filled()
    blob = kv.state_write(envelope="llama")
    assert blob[:9] == b"\x05\0\0\0llama" and blob[9:] == kv.state_write()
    s = kv.state_write(1, envelope="llama")
    assert s[:8] == bytes.fromhex("d83c14af01000000") and s[8:] == kv.state_write(1)
    assert kv.state_size(1, envelope="llama") == len(s)
    other = make(arch="gemma2")
    with pytest.raises(pymem.StateError, match="wrong model arch"):
        other.state_read(blob, envelope="llama")
    with pytest.raises(pymem.StateError, match="magic"):
        other.state_read(b"\0" * 8 + s[8:], 0, envelope="llama")
    other.state_read(s, 2, envelope="llama")
    assert other.seq_pos_max(2) == kv.seq_pos_max(1)
    with pytest.raises(pymem.InvalidArgumentError):
        make(arch=None).state_write(envelope="llama")


def test_state_write_into():
    kv = filled()
    want = kv.state_write()
    buf = bytearray(len(want) + 10)
    assert kv.state_write_into(buf) == len(want) and bytes(buf[:len(want)]) == want
    with pytest.raises(pymem.BufferTooSmallError) as ei:
        kv.state_write_into(bytearray(10))
    assert ei.value.needed == len(want)
    arr = np.zeros(len(want), np.uint8)
    kv.state_write_into(arr)
    assert arr.tobytes() == want


def test_format_10_has_no_rotation_words():
    a = filled()
    b = make(format=10)
    b.state_read(a.state_write()[:0] or a.state_write(), allow_trailing=False) if False else None
    w11 = a.state_write()
    sec, _ = parse_kv(w11)
    sec.format = 10
    w10 = sec.dump()
    assert len(w10) == len(w11) - 8
    b.state_read(w10)
    assert b.state_write() == w10
    with pytest.raises(pymem.StateError):
        b.state_read(w11)


# ---- views -----------------------------------------------------------------------------------

def test_view_lifetime():
    kv = make()
    put(kv, 0, 4)
    k = kv.k(0)
    k[2, :] = 1.5
    v = kv.v(1)
    del kv
    gc.collect()
    assert float(k[2, 0]) == 1.5 and v.shape == (32, 256)  # the views keep the memory alive
    kv2 = make()
    view = kv2.k(1)
    kv2.close()
    view[0, 0] = 3.0                                          # still valid: free is deferred
    with pytest.raises(pymem.InvalidStateError):
        kv2.seq_pos_max(0)
    del view
    gc.collect()


def test_view_writes_reach_the_state():
    kv = make(type_k="f32", type_v="f32")
    put(kv, 0, 3)
    kv.k(1)[1] = np.arange(32, dtype=np.float32)
    kv.v(0)[:, 2] = 7.0
    sec, _ = parse_kv(kv.state_write())
    st = sec.streams[0]
    assert np.array_equal(np.frombuffer(st.k_row_of(1, 1), np.float32), np.arange(32, dtype=np.float32))
    assert np.all(np.frombuffer(st.v_row_of(0, 2), np.float32) == 7.0)


# ---- store ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["f32", "f16", "bf16", "q8_0"])
def test_store_float_rows(t):
    fa = t == "q8_0"
    kv = make(type_k=t, type_v=t, v_trans=not fa, n_embd_head_k=32)
    ctx = kv.init_batch(pymem.Batch(tokens=[1, 2, 3], pos=[0, 1, 2]))
    rng = np.random.default_rng(1)
    k = rng.standard_normal((3, 32)).astype(np.float32)
    v = rng.standard_normal((3, 32)).astype(np.float32)
    for ub in ctx:
        ub.apply()
        ub.store(1, k=k, v=v)
        cells = ub.cells[0]
    sec, _ = parse_kv(kv.state_write())
    st = sec.streams[0]
    tid = pymem.type_id(t)
    for i, c in enumerate(cells):
        kk = np.frombuffer(st.k_row_of(1, int(c)), np.uint8)
        want = np.zeros(pymem.row_size(t, 32), np.uint8)
        pymem._lib.pm_type_from_float(tid, pymem._ffi.from_buffer("float[]", k[i]), pymem._ffi.from_buffer(want), 32)
        assert np.array_equal(kk, want)
    with pytest.raises(pymem.InvalidArgumentError):
        ctx[0].store(1, k=k[:2])
    with pytest.raises(pymem.InvalidArgumentError):
        ctx[0].store(7, k=k)


def test_store_raw_rows_quantized():
    kv = make(type_k="q4_0", type_v="q4_0", v_trans=False)
    ctx = kv.init_batch(pymem.Batch(tokens=[1, 2], pos=[0, 1]))
    raw = np.arange(2 * 18, dtype=np.uint8).reshape(2, 18)
    for ub in ctx:
        ub.apply()
        ub.store(0, k=raw, v=raw)
        with pytest.raises(pymem.UnsupportedError):
            ub.store(0, k=np.zeros((2, 32), np.float32))
    assert bytes(kv.k(0)[1]) == bytes(raw[1])


def test_stale_context():
    kv = make()
    ctx = kv.init_batch(pymem.Batch(tokens=[1, 2], pos=[0, 1]))
    kv.seq_rm(0)
    with pytest.raises(pymem.InvalidStateError):
        ctx[0].apply()
    ctx2 = kv.init_batch(pymem.Batch(tokens=[1, 2], pos=[0, 1]))
    ctx2[0].apply()
    kv.seq_add(0, 0, -1, 0)                       # a no-op still counts as a change? (d == 0)
    put(kv, 1, 1)
    with pytest.raises(pymem.InvalidStateError):
        kv.kq_mask(ctx2[0])


# ---- batches and sequence-id order ---------------------------------------------------------------

def test_seq_set_order_small_sets_reverse():
    assert pymem.seq_set_order([0, 1]) == [1, 0]
    assert pymem.seq_set_order([2, 0, 1]) == [1, 0, 2]
    assert pymem.Batch(tokens=[1], seq_ids=[[0, 1, 1]]).seq_ids(0) == [1, 0]


CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="needs g++ (libstdc++) to compare with std::unordered_set")
def test_seq_set_order_matches_libstdcxx():
    rng = np.random.default_rng(7)
    cases = []
    for n in list(range(1, 40)) + [58, 59, 60, 61, 100, 127, 128, 200, 256]:
        for _ in range(3):
            ids = rng.choice(256, size=n, replace=False) if n <= 256 else None
            cases.append([int(x) for x in ids])
    cases.append([5, 5, 3, 5])
    src = r"""
#include <cstdio>
#include <unordered_set>
int main() { int n; while (scanf("%d", &n) == 1) { std::unordered_set<int> s;
  for (int i = 0; i < n; ++i) { int v; scanf("%d", &v); s.insert(v); }
  for (int v : s) printf("%d ", v); printf("\n"); } }
"""
    with tempfile.TemporaryDirectory() as d:
        cpp = os.path.join(d, "o.cpp")
        exe = os.path.join(d, "o")
        open(cpp, "w").write(src)
        subprocess.run([CXX, "-O1", "-o", exe, cpp], check=True)
        inp = "".join(f"{len(c)} {' '.join(map(str, c))}\n" for c in cases)
        out = subprocess.run([exe], input=inp, capture_output=True, text=True, check=True).stdout.splitlines()
    for c, line in zip(cases, out):
        assert pymem.seq_set_order(c) == [int(x) for x in line.split()], c


def test_ubatch_info_and_splits():
    kv = make(unified=False, n_seq_max=4)
    b = pymem.Batch(tokens=list(range(12)), pos=[i // 4 for i in range(12)], seq_ids=[[i % 4] for i in range(12)])
    ctx = kv.init_batch(b, n_ubatch=8)
    assert [u.n_tokens for u in ctx] == [8, 4]        # equal split: 4 sets x 2, then x 1
    u = ctx[0]
    assert u.n_seqs == 4 and u.n_seq_tokens == 2 and u.equal_seqs and u.n_stream == 4
    assert list(u.seq) == [0, 0, 1, 1, 2, 2, 3, 3]
    ctx.apply_all()
    assert list(ctx[1].streams) == [0, 1, 2, 3]
    kv2 = make()
    ctx2 = kv2.init_batch(b, n_ubatch=5)
    assert [u.n_tokens for u in ctx2] == [5, 5, 2] and not ctx2[0].equal_seqs


# ---- KQ mask -------------------------------------------------------------------------------------

def masked_swa(n_swa, t, p0, p1):
    if t == "standard":
        return p1 - p0 >= n_swa
    if t == "chunked":
        return p0 < (p1 // n_swa) * n_swa
    if t == "symmetric":
        return not (-(n_swa // 2) <= p1 - p0 <= n_swa // 2)
    return False


def ref_mask(kv, ub, causal, non_causal, alibi):
    n_kv = ub.n_kv
    ns = max(ub.n_stream, 1)
    out = np.full((ub.n_tokens, n_kv), -np.inf, np.float32)
    if not causal and non_causal == "swa_only":
        causal = kv.swa_type == "none"
    mins = {}
    for t in range(ub.n_tokens):
        mins[int(ub.seq[t])] = min(mins.get(int(ub.seq[t]), 1 << 31), int(ub.pos[t]))
    for t in range(ub.n_tokens):
        q, p1 = int(ub.seq[t]), int(ub.pos[t])
        cells = kv.cells_view(0 if kv.n_stream == 1 else q)
        for j in range(n_kv):
            p0 = int(cells.pos[j])
            if p0 < 0 or not (int(cells.seq[j][q // 64]) >> (q % 64)) & 1:
                continue
            if causal and p0 > p1:
                continue
            if kv.swa_type != "none":
                span = (not causal) and non_causal == "swa_full" and p0 >= mins[q]
                if not span and masked_swa(kv.n_swa, kv.swa_type, p0, p1):
                    continue
            out[t, j] = -abs(p0 - p1) if alibi else 0.0
    return out.reshape(ns, ub.n_tokens // ns, n_kv)


@pytest.mark.parametrize("swa", [("none", 0), ("standard", 5), ("chunked", 4), ("symmetric", 6)])
@pytest.mark.parametrize("unified", [True, False])
def test_kq_mask_matches_reference(swa, unified):
    kernels = pymem.kernels.available()
    for name in kernels:
        with pymem.kernels.forced(name):
            kv = make(size=512, n_seq_max=3, unified=unified, swa_type=swa[0], n_swa=swa[1])
            put(kv, 0, 70)
            put(kv, 1, 9)
            kv.seq_cp(0, 2, 10, 30) if unified else None
            b = pymem.Batch(tokens=[1] * 9, pos=[70, 71, 72, 9, 10, 11, 0, 1, 2],
                            seq_ids=[[0]] * 3 + [[1]] * 3 + [[2]] * 3) if not unified else \
                pymem.Batch(tokens=[1] * 6, pos=[70, 71, 72, 9, 10, 11], seq_ids=[[0]] * 3 + [[1]] * 3)
            ctx = kv.init_batch(b)
            for ub in ctx:
                ub.apply()
                for causal, nc, alibi in itertools.product([True, False], ["all", "swa_only", "swa_full"], [False, True]):
                    got = kv.kq_mask(ub, causal=causal, non_causal=nc, alibi=alibi)
                    want = ref_mask(kv, ub, causal, nc, alibi)
                    assert np.array_equal(got, want), (name, causal, nc, alibi)


def test_kernel_names():
    assert "scalar" in pymem.kernels.available()
    with pymem.kernels.forced("scalar"):
        assert pymem.kernels.active() == "scalar"
    with pytest.raises(pymem.Error):
        pymem.kernels.select("sse9")
