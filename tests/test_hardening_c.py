"""Hardening, round 2 (issue 15), the C core's items: every test here failed on the main branch
it was written against.

1. state_read validates and applies from one read of the caller's buffer: a thread rewriting
   the buffer while the C call runs (the GIL is released) can make a restore fail, never write
   out of bounds or let an invalid value in (a child process runs the race and must exit 0);
5. out-of-memory messages name the layer and size asked for (they were formatted from freed
   structures);
10. a K-shift update() cannot perform is refused at seq_add / seq_div with nothing changed
   (never accepted, then wedging every later update); can_shift tells the truth;
11. state_read from a buffer aliasing the memory's own tensors, and state_write_into one, are
   refused with the memory unchanged.

No llama.cpp needed.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pymem

from test_types_unit import decode, kv as kv_kw, rec as rec_kw

TESTS = Path(__file__).resolve().parent


def _snap(m) -> tuple:
    parts = []
    for part in m.kv_parts():
        for s in range(part.n_stream):
            parts.append(part.cells_view(s).tobytes())
    return (m.state_write(), tuple(parts), m.update_pending)


# =============================================================================================
# 1. races on the caller's buffer
# =============================================================================================
_RACE_CHILD = textwrap.dedent(r'''
    import sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import pymem
    from test_types_unit import decode, kv as kv_kw, rec as rec_kw

    kind, seconds = sys.argv[2], float(sys.argv[3])
    if kind.startswith("kv"):
        m = pymem.KVCache(**kv_kw(size=4096, n_layer=1, n_embd_head_k=8, rope=pymem.Rope(n_rot=8)))
        for s in range(3):
            decode(m, s, 1300)
    else:
        m = pymem.RecurrentMemory(**rec_kw(size=256, n_seq_max=256))
        for s in range(256):
            decode(m, s, 4)
    seq = -1 if kind.endswith("whole") else 1
    blob = m.state_write(seq)
    buf = bytearray(blob)
    # cell records of the (only) stream: kv: u32 n_stream, u32 cc, then (pos, n_seq_id[, ids]);
    # recurrent: u32 cc, then (pos, n_seq_id[, ids])
    off = 8 if kind.startswith("kv") else 4
    cc = int(np.frombuffer(buf, "<u4", 1, off - 4)[0])
    stride = 3 if (kind.startswith("kv") or seq == -1) else 2
    rec = np.frombuffer(buf, "<i4", cc * stride, off).reshape(cc, stride)
    good = rec.copy()
    evil = [(0, -7), (1, 1 << 28), (1, 0), (1, 2)] + ([(2, 1 << 30), (2, -3), (2, 4000)] if stride == 3 else [])
    stop = False

    def racer():
        k = 0
        while not stop:
            col, val = evil[k % len(evil)]
            rec[:, col] = val
            rec[:, col] = good[:, col]
            k += 1

    t = threading.Thread(target=racer)
    t.start()
    n_ok = n_err = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                m.state_read(buf, seq)
                n_ok += 1
            except pymem.Error:
                n_err += 1
            # whatever was applied is a valid memory: its own state passes the parser, and KV
            # positions are never negative (the recurrent memory keeps llama.cpp's positions)
            for s in range(3 if kind.startswith("kv") else 0):
                lo, hi = m.seq_pos_min(s), m.seq_pos_max(s)
                assert (lo == -1) == (hi == -1) and -1 <= lo <= hi, (s, lo, hi)
            m.state_check(m.state_write())
    finally:
        stop = True
        t.join()
    print(kind, n_ok, n_err)
''')


@pytest.mark.parametrize("kind", ["kv_whole", "kv_seq", "rec_whole", "rec_seq"])
def test_state_read_buffer_rewritten_during_read(kind):
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _RACE_CHILD, str(TESTS), kind, "3"],
                       capture_output=True, text=True, timeout=300, cwd=str(TESTS))
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    name, n_ok, n_err = r.stdout.split()
    assert int(n_ok) + int(n_err) > 0


def test_batch_arrays_read_once():
    # the C core copies the id counts before validating them (a racing rewrite of n_seq_id
    # overflowed the id array); the Python Batch hands C fresh arrays: check the C result
    b = pymem.Batch(tokens=[1, 2, 3], pos=[0, 1, 2], seq_ids=[[0], [1, 0], [2, 2, 1]])
    m = pymem.KVCache(**kv_kw())
    m.decode(b)
    assert [m.seq_pos_max(s) for s in range(3)] == [1, 2, 2]


# =============================================================================================
# 5. out-of-memory messages
# =============================================================================================
def test_oom_messages_name_the_request():
    with pytest.raises(MemoryError) as ei:
        pymem.KVCache(**kv_kw(layers=[2], n_embd_head_k=2**31 - 64, size=256, n_seq_max=1))
    msg = str(ei.value)
    want = 256 * (2**31 - 64) * 2   # f16 K: cells x head x 2 bytes
    assert "layer 2 " in msg and f"({want} bytes)" in msg, msg
    with pytest.raises(MemoryError) as ei:
        pymem.RecurrentMemory(**rec_kw(n_embd_r=2**31 - 64, size=256))
    msg = str(ei.value)
    assert "recurrent layer 1 " in msg and f"({256 * (2**31 - 64) * 4} bytes)" in msg, msg


# =============================================================================================
# 10. K-shifts pymem cannot perform
# =============================================================================================
@pytest.mark.parametrize("kw", [
    dict(type_k="bf16"),
    dict(type_k="q8_0", n_embd_head_k=64, rope=pymem.Rope(n_rot=64), k_rot=0),
    dict(type_k="q8_0", n_embd_head_k=96, rope=pymem.Rope(n_rot=96), k_rot=48),
])
def test_unperformable_kshift_refused_at_seq_add(kw):
    m = pymem.KVCache(**kv_kw(**kw))
    decode(m, 0, 6)
    decode(m, 1, 4)
    assert m.can_shift is False
    before = _snap(m)
    with pytest.raises(pymem.UnsupportedError, match="K-shift"):
        m.seq_add(0, 0, -1, 3)
    with pytest.raises(pymem.UnsupportedError, match="K-shift"):
        m.seq_div(1, 0, -1, 2)
    assert _snap(m) == before
    m.seq_add(0, 100, 200, 5)          # moves no cell: accepted, nothing pending
    assert not m.update_pending
    m.update()
    decode(m, 0, 1, start=6)           # the memory keeps working
    assert m.seq_pos_max(0) == 6


def test_shiftable_cache_still_shifts():
    m = pymem.KVCache(**kv_kw())
    assert m.can_shift is True
    decode(m, 0, 6)
    m.seq_add(0, 0, -1, 3)
    assert m.update_pending
    m.update()
    assert m.seq_pos_max(0) == 8 and not m.update_pending


# =============================================================================================
# 11. buffers aliasing the memory's own tensors
# =============================================================================================
def test_state_read_from_own_tensor_refused():
    m = pymem.KVCache(**kv_kw(size=256))
    decode(m, 0, 2)
    part = m.kv_parts()[0]
    blob = m.state_write()
    k = part.k(part.layers[0], 0).view(np.uint8).reshape(-1)
    assert k.size >= 2 * len(blob)
    at = k.size - len(blob)             # rows of unused cells hold a valid state
    k[at:] = np.frombuffer(blob, np.uint8)
    before = _snap(m)
    with pytest.raises(pymem.InvalidArgumentError, match="overlaps"):
        m.state_read(k[at:])
    assert _snap(m) == before
    m.state_read(bytes(k[at:]))         # a copy is fine
    assert m.state_write() == blob


def test_state_write_into_own_tensor_refused():
    m = pymem.KVCache(**kv_kw(size=256))
    decode(m, 0, 2)
    part = m.kv_parts()[0]
    before = _snap(m)
    v = part.v(part.layers[1], 0).view(np.uint8).reshape(-1)
    with pytest.raises(pymem.InvalidArgumentError, match="overlaps"):
        m.state_write_into(v)
    assert _snap(m) == before
    r = pymem.RecurrentMemory(**rec_kw())
    decode(r, 0, 3)
    s_view = r.recurrent.s(r.recurrent.layers[0])
    with pytest.raises(pymem.InvalidArgumentError, match="overlaps"):
        r.state_write_into(s_view.view(np.uint8).reshape(-1))


def test_store_rows_from_own_tensor():
    # raw K rows taken from a view of the cache's own K, stored one cell further on: the
    # store reads a copy, not the rows it is overwriting (found looking for more aliasing)
    m = pymem.KVCache(**kv_kw(size=64))
    decode(m, 0, 5)                                   # cells 0..4
    part = m.kv_parts()[0]
    il = part.layers[0]
    k = part.k(il, 0).view(np.uint8).reshape(part.size, -1)
    k[:] = np.random.default_rng(3).integers(0, 255, k.shape, dtype=np.uint8) & 0x3F
    ctx = m.init_batch(pymem.Batch(tokens=[1, 2, 3, 4], pos=[5, 6, 7, 8], seq_ids=[[0]] * 4))
    ub = ctx.ubatches[0]
    ub.apply()
    cells = np.asarray(ub.cells).reshape(-1)
    assert list(cells) == [5, 6, 7, 8]
    want = k[4:8].copy()
    ub.store(il, k=k[4:8])                           # source rows 4..7 -> cells 5..8
    assert np.array_equal(k[5:9], want)
