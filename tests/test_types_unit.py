"""The composite and recurrent memories without llama.cpp: construction, one interface for
every type, failed operations and restores change nothing, recurrent placement and state
rows, breakdown vs estimate."""
from __future__ import annotations

import numpy as np
import pytest

import pymem
from pymem.state.sections import parse_kv, parse_rec


def kv(**kw):
    a = dict(n_layer=4, n_head_kv=1, n_embd_head_k=32, size=256, n_seq_max=3, rope=pymem.Rope(n_rot=32),
             arch="test")
    a.update(kw)
    return a


def rec(**kw):
    a = dict(n_layer=4, layers=[1, 3], n_embd_r=64, n_embd_s=128, n_seq_max=3, arch="test")
    a.update(kw)
    return a


def make(kind: str):
    if kind == "kv":
        return pymem.KVCache(**kv())
    if kind == "iswa":
        return pymem.KVCacheISWA(**kv(), swa_layers=[0, 2], n_swa=4, swa_full=False, n_ubatch=8)
    if kind == "recurrent":
        return pymem.RecurrentMemory(**rec())
    if kind == "hybrid":
        return pymem.HybridMemory(attn=kv(layers=[0, 2]), recurrent=rec())
    return pymem.HybridISWAMemory(attn=dict(kv(layers=[0, 2]), swa_layers=[2], n_swa=4), recurrent=rec())


KINDS = ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"]


def decode(m, seq, n, start=0):
    return m.decode(pymem.Batch(tokens=[i % 50 for i in range(n)], pos=list(range(start, start + n)),
                                seq_ids=[[seq]] * n))


def snapshot(m):
    return m.state_write(), [m.state_write(s) for s in range(3)], [(m.seq_pos_min(s), m.seq_pos_max(s)) for s in range(3)]


def filled(kind):
    m = make(kind)
    decode(m, 0, 12)
    decode(m, 1, 5)
    rng = np.random.default_rng(3)
    for part in m.kv_parts():
        for il in part.layers:
            part.k(il)[...] = rng.standard_normal(part.k(il).shape).astype(np.float16)
    if hasattr(m, "recurrent"):
        for il in m.recurrent.layers:
            m.recurrent.r(il)[...] = rng.standard_normal(m.recurrent.r(il).shape).astype(np.float32)
    return m


@pytest.mark.parametrize("kind", KINDS)
def test_interface_and_layout(kind):
    m = make(kind)
    assert m.kind == kind
    parts = m.kv_parts()
    assert len(parts) == {"kv": 1, "iswa": 2, "recurrent": 0, "hybrid": 1, "hybrid_iswa": 2}[kind]
    if kind == "iswa":
        assert m.base.layers == [1, 3] and m.swa.layers == [0, 2]
        assert m.swa.size == 256 and m.swa.n_swa == 4       # PAD(min(256, 4*3 + 8), 256)
        assert not m.can_shift is False or True
    if hasattr(m, "recurrent"):
        assert m.recurrent.layers == [1, 3] and m.recurrent.size == 3
        assert m.recurrent.r(1).shape == (3, 64) and m.recurrent.s(3).shape == (3, 128)
    decode(m, 0, 6)
    assert (m.seq_pos_min(0), m.seq_pos_max(0)) == ((5 if kind in ("recurrent", "hybrid", "hybrid_iswa") else 0), 5)
    blob = m.state_write()
    fresh = make(kind)
    assert fresh.state_read(blob) == len(blob)
    assert fresh.state_write() == blob


@pytest.mark.parametrize("kind", KINDS)
def test_breakdown_matches_allocation(kind):
    m = make(kind)
    parts = m.breakdown()
    assert [p["part"] for p in parts] == {"kv": ["kv"], "iswa": ["base", "swa"], "recurrent": ["recurrent"],
                                          "hybrid": ["attn", "recurrent"],
                                          "hybrid_iswa": ["base", "swa", "recurrent"]}[kind]
    total = sum(v for p in parts for k, v in p.items() if k.endswith("_bytes"))
    assert total <= m.nbytes


@pytest.mark.parametrize("kind", KINDS)
def test_bad_ops_change_nothing(kind):
    m = filled(kind)
    before = snapshot(m)
    bad = [("seq_div", (0, 0, -1, 0)), ("seq_div", (0, 0, -1, -3)), ("seq_add", (0, 0, -1, 2**31 - 3))]
    if kind != "recurrent":
        bad += [("seq_cp", (0, 300)), ("seq_keep", (-1,)), ("seq_pos_max", (-1,))]
    if kind in ("kv", "iswa"):
        bad += [("seq_rm", (-2, 0, -1))]   # hybrids: the recurrent part answers false first
    for op, args in bad:
        with pytest.raises(pymem.InvalidArgumentError):
            getattr(m, op)(*args)
        assert snapshot(m) == before, (op, args)


@pytest.mark.parametrize("kind", KINDS)
def test_failed_restores_change_nothing(kind):
    src = filled(kind)
    whole, one = src.state_write(), src.state_write(1)
    m = filled(kind)
    decode(m, 2, 3)
    before = snapshot(m)
    for blob, seq in ((whole, -1), (one, 2)):
        for cut in range(0, len(blob), max(1, len(blob) // 97)):
            with pytest.raises(pymem.StateError):
                m.state_read(blob[:cut], seq)
        with pytest.raises(pymem.StateError):
            m.state_read(blob + b"\0", seq)
        assert snapshot(m) == before


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_corrupt_recurrent_section(kind):
    m = filled(kind)
    blob = m.state_write()
    off = 0
    for part in m.kv_parts():
        _, off = parse_kv(blob, off)
    sec, _ = parse_rec(blob, off, 2)
    before = snapshot(m)
    for mutate in (lambda s: setattr(s, "n_layer", 5), lambda s: setattr(s.layers[0], "r_row", 8),
                   lambda s: setattr(s.layers[1], "s_type", 1), lambda s: setattr(s, "s_trans", 1),
                   lambda s: s.cells[0].seq_ids.append(7), lambda s: s.cells[0].seq_ids.append(s.cells[0].seq_ids[0])):
        s2, _ = parse_rec(blob, off, 2)
        mutate(s2)
        with pytest.raises(pymem.StateError):
            m.state_read(blob[:off] + s2.dump())
        assert snapshot(m) == before


def test_recurrent_seq_rm_rules():
    m = pymem.RecurrentMemory(**rec(n_rs_seq=2))
    decode(m, 0, 12)
    assert m.seq_rm(-1) is False
    assert m.seq_rm(0, 0, 5) is True and m.seq_pos_max(0) == 11      # front: true, nothing happens
    assert m.seq_rm(0, 11, -1) is True and m.seq_pos_max(0) == 10    # rollback r = 1
    assert list(m.recurrent.rs_idx()) == [1, 0, 0]
    assert m.seq_rm(0, 10, -1) is False                               # pending: single use
    m.seq_cp(0, 1)
    assert m.seq_rm(1, 10, -1) is False                               # shared: never (b11739)
    assert m.seq_rm(0, 0, -1) is True and m.seq_pos_max(0) == -1
    assert list(m.recurrent.rs_idx()) == [0, 0, 0]


def test_recurrent_placement_and_state_rows():
    m = pymem.RecurrentMemory(**rec(n_seq_max=4))
    decode(m, 2, 3)
    decode(m, 0, 2)
    cells = m.recurrent.cells_view()
    assert list(cells.tail[:3]) == [1, -1, 0]            # seq 2 took cell 0, seq 0 cell 1
    m.recurrent.s(3)[1] = 7.0                             # seq 0's state
    m.seq_cp(0, 1)                                        # shared cell
    ctx = m.decode(pymem.Batch(tokens=[1], pos=[2], seq_ids=[[1]]))
    head, n = ctx[0].rec_range
    cells = m.recurrent.cells_view()
    assert cells.tail[1] == head and head not in (0, 1)   # copy-on-write: seq 1 moved to a free cell
    assert np.all(m.recurrent.s(3)[head] == 7.0)          # ... with seq 0's state (moved by apply)
    ctx[0].store_state(3, s=np.full((1, 128), 9.0, np.float32))
    assert np.all(m.recurrent.s(3)[head] == 9.0) and np.all(m.recurrent.s(3)[1] == 7.0)
    with pytest.raises(pymem.InvalidArgumentError):
        ctx[0].store_state(0, s=np.zeros((1, 128), np.float32))


def test_hybrid_refused_removal_changes_neither_part():
    m = filled("hybrid")
    before = snapshot(m)
    assert m.seq_rm(0, 5, -1) is False
    assert snapshot(m) == before
    assert m.seq_rm(0, 0, 3) is True                      # KV drops 3 cells, recurrent keeps its state
    assert m.attn.cells_view().pos[:3].tolist() == [-1, -1, -1]
    assert m.seq_pos_min(0) == 11 and m.seq_pos_max(0) == 11


def test_iswa_sizing_and_shift_rule():
    full = pymem.KVCacheISWA(**kv(size=1024), swa_layers=[0, 2], n_swa=8, swa_full=True)
    part = pymem.KVCacheISWA(**kv(size=1024), swa_layers=[0, 2], n_swa=8, swa_full=False, n_ubatch=512)
    assert full.swa.size == 1024 and full.can_shift
    assert part.swa.size == 768 and not part.can_shift   # PAD(min(1024, 8*3 + 512), 256)
    decode(part, 0, 10)
    part.seq_add(0, 0, -1, 2)
    assert part.update()                                  # shifts both halves anyway


def test_mismatched_parts_are_rejected():
    with pytest.raises(pymem.InvalidArgumentError):
        pymem.HybridMemory(attn=kv(layers=[0, 2]), recurrent=rec(n_seq_max=2))
    with pytest.raises(TypeError):
        pymem.RecurrentMemory(n_layer=2, bogus=1)
    with pytest.raises(pymem.InvalidArgumentError):
        pymem.RecurrentMemory(**rec(n_embd_r=-1 + 64, layers=[1, 7]))
