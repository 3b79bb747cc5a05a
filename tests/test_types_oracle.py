"""Differential tests of the iSWA, recurrent, hybrid and hybrid-iSWA memories against real
llama.cpp b11739: from_gguf layouts, scenarios over every tiny model and configuration, and
the recurrent / hybrid / SWA traps of SPEC section 10 (and 10.1)."""
from __future__ import annotations

import pytest

import pymem
from pymem.state.sections import parse_kv, parse_rec
from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]

TYPES = {
    "gemma2": "iswa", "gemma3": "iswa",
    "mamba": "recurrent", "mamba2": "recurrent", "rwkv6": "recurrent", "rwkv7": "recurrent",
    "lfm2": "hybrid", "jamba": "hybrid", "jamba_gqa": "hybrid", "granitehybrid": "hybrid",
    "falcon_h1": "hybrid", "nemotron_h": "hybrid",
    "lfm2_swa": "hybrid_iswa",
}
SWA = {"gemma2", "gemma3", "lfm2_swa"}


def fill(m, seq, n, start=0, tok=0):
    return m.decode([((tok + i) % 128, start + i, [seq]) for i in range(n)])


def configs():
    for name in TYPES:
        for unified in (True, False):
            for fa in (False, True):
                for swa_full in ((True, False) if name in SWA else (True,)):
                    yield pytest.param(name, unified, fa, swa_full,
                                       id=f"{name}-{'u' if unified else 'nu'}-fa{int(fa)}-full{int(swa_full)}")


@pytest.mark.parametrize("name,unified,fa,swa_full", list(configs()))
def test_scenario(pair, name, unified, fa, swa_full):
    m = pair(name, n_seq_max=3, unified=unified, flash_attn=fa, swa_full=swa_full)
    assert m.mem.kind == TYPES[name]
    assert fill(m, 0, 20) == 0
    assert fill(m, 1, 7, tok=40) == 0
    m.check()
    m.seq_rm(0, 5, -1)                 # recurrent parts refuse a suffix removal
    m.seq_rm(0, 0, 3)                  # ... and ignore a front one
    m.check()
    m.seq_cp(0, 2)
    m.check()
    assert fill(m, 2, 3, start=m.mem.seq_pos_max(2) + 1, tok=9) == 0   # copy-on-write fork
    m.check()
    m.seq_add(1, 0, -1, 2)
    assert fill(m, 1, 2, start=m.mem.seq_pos_max(1) + 1) == 0
    m.check()
    assert m.seq_restore(2, 0) > 0
    assert m.seq_restore(1, 2, flags=pymem.STATE_PARTIAL_ONLY) >= 0
    m.check()
    m.seq_keep(0)
    m.whole_restore(from_llama=True)
    assert fill(m, 0, 4, start=m.mem.seq_pos_max(0) + 1) == 0
    m.check()
    m.whole_restore(from_llama=False)
    m.clear(True)
    assert fill(m, 1, 3) == 0
    m.check()


# ---- recurrent ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mamba", "rwkv7", "lfm2", "jamba", "lfm2_swa"])
def test_seq_rm_all_sequences_is_refused(pair, name):
    """T-2: seq_rm(-1, ...) is always false on recurrent and hybrid memories."""
    m = pair(name, n_seq_max=2)
    fill(m, 0, 12)
    for p0, p1 in ((-1, -1), (0, -1), (3, 7)):
        assert m.seq_rm(-1, p0, p1) is False
    m.check()


@pytest.mark.parametrize("name", ["mamba", "rwkv7"])
def test_recurrent_seq_rm_truth_table(pair, name):
    """T-3: tail pos 11."""
    m = pair(name, n_seq_max=2)
    fill(m, 0, 12)
    for (p0, p1), want in [((0, 5), True), ((12, -1), True), ((3, 7), True), ((0, 11), True),
                           ((5, -1), False), ((11, 12), False)]:
        assert m.seq_rm(0, p0, p1) is want, (p0, p1)
        m.check()
    assert m.mem.seq_pos_max(0) == 11
    assert m.seq_rm(0, 0, 12) is True      # removes the sequence
    assert m.mem.seq_pos_max(0) == -1
    m.check()


def test_rollback_snapshots(pair):
    """lfm2 keeps n_rs_seq: a suffix of up to n_rs_seq tokens rolls back; once pending, a
    second one fails; after a decode r = 2 works and r = 3 does not (SPEC 6.9, T-3)."""
    m = pair("lfm2", n_seq_max=2, n_rs_seq=2, n_ubatch=8)
    assert m.mem.recurrent.n_rs_seq == 2
    fill(m, 0, 12)
    assert m.seq_rm(0, 11, -1) is True
    assert m.mem.seq_pos_max(0) == 10
    assert m.seq_rm(0, 10, -1) is False     # single-use
    m.check()
    assert fill(m, 0, 3, start=11) == 0     # consumes the rollback
    m.check()
    assert m.seq_rm(0, 12, -1) is True      # r = 2
    fill(m, 0, 3, start=12)
    assert m.seq_rm(0, 12, -1) is False     # r = 3
    m.seq_cp(0, 1)
    assert m.seq_rm(0, 14, -1) is False     # b11739: a shared state never rolls back
    m.check()


@pytest.mark.parametrize("name", ["mamba", "mamba2", "rwkv6", "rwkv7", "jamba"])
def test_rollback_forced_off(pair, name):
    m = pair(name, n_seq_max=1, n_rs_seq=2, n_ubatch=8)
    part = m.mem.recurrent
    assert part.n_rs_seq == 0               # llama.cpp forces 0 for these archs
    fill(m, 0, 6)
    assert m.seq_rm(0, 5, -1) is False
    m.check()


def test_recurrent_negative_tail(pair):
    """SPEC 6.7: pos_min can go negative, pos_max stays -1; the next decode starts at 0."""
    m = pair("mamba", n_seq_max=2)
    fill(m, 0, 5)
    m.seq_add(0, 0, -1, -100)
    assert (m.mem.seq_pos_min(0), m.mem.seq_pos_max(0)) == (-96, -1)
    m.check()
    assert fill(m, 0, 2) == 0
    m.check()


def test_recurrent_fork_and_gather(pair):
    """seq_cp shares a cell; the next decode of the copy moves it to a free cell; a joint
    ubatch gathers the sequences into consecutive cells (head / placement rules)."""
    m = pair("mamba", n_seq_max=4, unified=True)
    fill(m, 2, 3)
    fill(m, 0, 4, tok=9)
    m.seq_cp(0, 1)
    m.check()
    assert m.decode([(1, 4, [1]), (2, 4, [0]), (3, 3, [2])]) == 0
    m.check()
    m.seq_rm(2)
    assert m.decode([(5, 5, [0]), (6, 5, [1]), (7, 0, [3])]) == 0
    m.check()


def test_recurrent_coupled_tokens_need_one_cell(pair):
    m = pair("mamba", n_seq_max=2)
    fill(m, 0, 3)
    fill(m, 1, 3, tok=5)
    assert m.decode([(1, 3, [0, 1])]) == 1   # two sequences in different cells
    m.check()


# ---- hybrid -----------------------------------------------------------------------------------

def test_hybrid_front_range(pair):
    """T-3: hybrid (0, 0, 5) is true; the KV half drops 5 cells, the recurrent half keeps its state."""
    m = pair("lfm2", n_seq_max=2)
    fill(m, 0, 10)
    assert m.seq_rm(0, 0, 5) is True
    m.check()
    assert m.seq_rm(0, 5, -1) is False       # partial suffix: neither part changes
    m.check()


def test_hybrid_positions_combine(pair):
    """T-20: a REC-only blob restored into an empty sequence: max of mins, min of maxes."""
    m = pair("lfm2", n_seq_max=3)
    fill(m, 0, 10)
    m.seq_restore(0, 1, flags=pymem.STATE_PARTIAL_ONLY)
    assert (m.mem.seq_pos_min(1), m.mem.seq_pos_max(1)) == (9, -1)
    m.check()
    g = pair("gemma2", n_seq_max=3, swa_full=True)
    fill(g, 0, 20)
    g.seq_restore(0, 1, flags=pymem.STATE_PARTIAL_ONLY)
    assert (g.mem.seq_pos_min(1), g.mem.seq_pos_max(1)) == (12, 19)
    g.check()


def test_partial_only_sections(pair):
    m = pair("lfm2_swa", n_seq_max=2)
    fill(m, 0, 12)
    blob = m.mem.state_write(0, flags=pymem.STATE_PARTIAL_ONLY)
    swa, off = parse_kv(blob, 0)
    rec, end = parse_rec(blob, off, len(m.mem.recurrent.layers))
    assert end == len(blob) and len(swa.streams[0].cells) == 8 and rec.n_layer == 4
    empty = m.mem.state_write(1)
    base, off = parse_kv(empty, 0)
    assert base.streams[0].layers == []          # lfm2_swa's base cache holds no layer
    m.check()


# ---- iSWA ------------------------------------------------------------------------------------------

def test_swa_seq_blob_omits_masked_cells(pair):
    """T-8: the SWA half of a sequence blob keeps pos_max - pos < n_swa; whole blobs keep all."""
    m = pair("gemma2", n_seq_max=2, swa_full=True)
    fill(m, 0, 20)
    blob = m.mem.state_write(0)
    base, off = parse_kv(blob, 0)
    swa, _ = parse_kv(blob, off)
    assert [c.pos for c in swa.streams[0].cells] == list(range(12, 20))
    assert len(base.streams[0].cells) == 20
    m.check()


@pytest.mark.parametrize("swa_full,n_ctx,want", [(True, 1024, True), (False, 1024, False), (False, 256, True)])
def test_iswa_can_shift(pair, swa_full, n_ctx, want):
    """T-21: can_shift needs equal halves, but a shift still works and rotates both halves."""
    m = pair("gemma2", n_ctx=n_ctx, n_seq_max=1, swa_full=swa_full, n_ubatch=64)
    assert m.mem.can_shift is want is m.llama.can_shift()
    fill(m, 0, 10)
    m.seq_add(0, 0, -1, 3)
    assert fill(m, 0, 1, start=13) == 0
    m.check()


def test_swa_reuse_and_purge(pair):
    """find_slot reuses SWA-masked single-owner cells and apply purges older positions."""
    m = pair("gemma2", n_ctx=1024, n_seq_max=2, swa_full=False, n_ubatch=4)
    assert (m.mem.base.size, m.mem.swa.size) == (1024, 256)
    fill(m, 1, 8)
    for start in range(0, 248, 31):
        assert fill(m, 0, min(31, 248 - start), start=start, tok=start) == 0
    m.check(per_seq=False)
    assert fill(m, 1, 1, start=8) == 0      # reuses a masked cell
    m.check()


def test_swa_failed_decode_changes_nothing_in_pymem(pair):
    """T-10: llama.cpp keeps SWA purges made by a failed dry run; pymem undoes them."""
    m = pair("gemma2", n_ctx=1024, n_seq_max=3, swa_full=False, n_ubatch=4)
    assert (m.mem.base.size, m.mem.swa.size) == (1024, 256)
    fill(m, 0, 245)
    m.seq_cp(0, 1)
    m.seq_cp(0, 2)
    fill(m, 0, 11, start=245)
    before = m.mem.state_write()
    items = [(1, 245 + i, [2]) for i in range(8)]
    assert m.llama.decode(items) == 1
    with pytest.raises(pymem.NoSlotError):
        m.mem.decode(pymem.Batch(tokens=[1] * 8, pos=list(range(245, 253)), seq_ids=[[2]] * 8))
    assert m.mem.state_write() == before
    assert m.llama.pos_min(0) == 245 and m.mem.seq_pos_min(0) == 0   # the documented divergence


# ---- failed restores -----------------------------------------------------------------------------------

def _corrupt_last_section(mem, blob: bytes) -> bytes:
    """The blob with the first type id of its last section changed (a KV layer's K type or a
    recurrent layer's r type), so that only the last part fails to restore."""
    off, last = 0, None
    for part in mem.kv_parts():
        last = ("kv", off, part)
        _, off = parse_kv(blob, off, part.format, part.cell_ext)
    if hasattr(mem, "recurrent"):
        last = ("rec", off, None)
    kind, at, _ = last
    if kind == "kv":
        sec, _ = parse_kv(blob, at)
        sec.streams[0].layers[0].k_type = 0
        return blob[:at] + sec.dump()
    rec, _ = parse_rec(blob, at, len(mem.recurrent.layers))
    rec.layers[0].r_type = 1
    return blob[:at] + rec.dump()


@pytest.mark.parametrize("name", ["gemma2", "lfm2", "lfm2_swa", "mamba"])
def test_failed_restores_change_nothing(pair, name):
    """T-18: llama.cpp keeps half-restored parts; pymem raises and stays byte-identical."""
    m = pair(name, n_seq_max=2)
    fill(m, 0, 6)
    fill(m, 1, 4, tok=20)
    good = m.mem.state_write(0)
    bad = _corrupt_last_section(m.mem, good)
    for blob, seq in ((bad, 1), (_corrupt_last_section(m.mem, m.mem.state_write()), -1)):
        whole = m.mem.state_write()
        with pytest.raises(pymem.StateError):
            m.mem.state_read(blob, seq)
        assert m.mem.state_write() == whole
    m.mem.state_read(good, 1)
    m.llama.state_seq_set(m.llama.state_seq_get(0), 1)
    m.check()
