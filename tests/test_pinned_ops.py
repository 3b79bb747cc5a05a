"""Pinned: sequence operations and batch placements that only random traces reached before,
each run in lock step with llama.cpp b11739 (pymem._oracle.mirror compares positions,
``can_shift`` and every state blob after every step) plus an explicit expectation:

* recurrent ``seq_cp`` from an empty source clears the destination (positions -1 / -1);
* hybrid-iSWA ``can_shift`` follows the iSWA rule (both halves the same size), not the
  plain KV rule, with swa_full on and off;
* the sequential equal split of a batch with a gap in its sequence ids over a live sequence
  (seqs 0 and 2 while seq 1 holds a cell): the slot search gathers them and moves seq 1;
* the recurrent rollback bound (1 <= tokens rolled back <= n_rs_seq) and ``seq_rm``'s p1
  boundary (half-open [p0, p1)) on every memory kind."""
from __future__ import annotations

import pytest

from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]


def _run(m, s, p0, n, tok=3):
    return m.decode([(tok + i % 5, p0 + i, [s]) for i in range(n)])


# -- 2. recurrent seq_cp from an empty source -----------------------------------------------
def _assert_cleared(m, s):
    """The recurrent state of s is gone (a hybrid's KV part keeps its cells: its pos_min is
    then the KV part's while pos_max is -1)."""
    assert m.llama.pos_max(s) == -1
    assert m.mem.recurrent.cells_view().tail[s] == -1
    if m.mem.kind == "recurrent":
        assert m.llama.pos_min(s) == -1


@pytest.mark.parametrize("name", ["mamba", "rwkv6", "lfm2", "jamba"])
def test_recurrent_seq_cp_from_empty_source_clears_destination(pair, name):
    m = pair(name, n_seq_max=3)
    assert _run(m, 0, 0, 4) == 0
    assert _run(m, 1, 0, 3) == 0
    m.check()
    m.seq_cp(2, 1)                               # seq 2 holds nothing
    _assert_cleared(m, 1)
    m.check()
    # a destination that shares its cell with another sequence only detaches
    m.seq_cp(0, 1)
    m.check()
    m.seq_cp(2, 1)
    _assert_cleared(m, 1)
    assert m.llama.pos_max(0) == 3
    m.check()
    assert _run(m, 1, 0, 2) == 0                 # the cleared sequence starts again at 0
    m.check()


# -- 3. hybrid-iSWA (and iSWA) can_shift -----------------------------------------------------
@pytest.mark.parametrize("swa_full", [True, False], ids=["swa_full", "swa_small"])
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("name", ["lfm2_swa", "gemma2"])
def test_iswa_can_shift_rule(pair, name, swa_full, unified):
    # base cells 1024 (512 per stream); SWA cells PAD(min(.., n_swa * n_seqs + n_ubatch), 256) = 256
    m = pair(name, n_ctx=1024, n_seq_max=2, unified=unified, swa_full=swa_full, n_ubatch=64)
    m.check()                                    # includes can_shift == llama.cpp's
    assert m.llama.can_shift() is swa_full
    assert m.mem.can_shift is swa_full
    assert _run(m, 0, 0, 12) == 0
    m.seq_add(0, 2, -1, -1)                      # still works (each half's own rule)
    m.check()
    assert _run(m, 0, 11, 2) == 0                # the update shifts both halves
    m.check()


@pytest.mark.parametrize("name", ["lfm2", "jamba"])
def test_hybrid_can_shift_is_attention_rule(pair, name):
    m = pair(name, n_seq_max=2)
    m.check()
    assert m.mem.can_shift is True


# -- 4. sequential split with a gap in sequence ids over a live sequence --------------------
@pytest.mark.parametrize("unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("n_ubatch", [None, 8])
@pytest.mark.parametrize("name", ["mamba", "lfm2", "jamba", "lfm2_swa"])
def test_split_gap_over_live_sequence(pair, name, n_ubatch, unified):
    if name == "mamba" and not unified:
        pytest.skip("no KV part: one configuration")
    m = pair(name, n_seq_max=3, n_ubatch=n_ubatch, unified=unified)
    assert _run(m, 0, 0, 3) == 0                 # seq 0 -> cell 0
    assert _run(m, 1, 0, 2) == 0                 # seq 1 -> cell 1
    m.check()
    # seqs 0 and 2 in one batch: 2 takes cell 2, the gather moves it next to 0 (cell 1) and
    # seq 1 to cell 2
    assert m.decode([(7, 3, [0]), (8, 0, [2]), (9, 4, [0]), (10, 1, [2])]) == 0
    m.check()
    rec = m.mem.recurrent.cells_view()
    # recurrent memories split sequentially (primary ids consecutive): 0 and 2 go to separate
    # ubatches and nothing moves; a unified hybrid splits without that rule and gathers
    moved = m.mem.kind != "recurrent" and unified
    assert list(rec.tail[:3]) == ([0, 2, 1] if moved else [0, 1, 2]), rec.tail
    # all three live: seqs 0 and 2 again (both own cells already), then 2 and 1
    assert m.decode([(11, 5, [0]), (12, 2, [2])]) == 0
    m.check()
    assert m.decode([(13, 3, [2]), (14, 2, [1]), (15, 4, [2]), (16, 3, [1])]) == 0
    m.check()


# -- 5. rollback bound and seq_rm's p1 boundary -----------------------------------------------
@pytest.mark.parametrize("back", [1, 2, 3])
@pytest.mark.parametrize("name", ["lfm2", "nemotron_h"])
def test_recurrent_rollback_bound(pair, name, back):
    """seq_rm(s, last - back + 1, -1) rolls back `back` tokens when 1 <= back <= n_rs_seq (2),
    refuses (False, nothing changed) above the bound; a second rollback before the next
    decode is refused too."""
    m = pair(name, n_seq_max=2, n_rs_seq=2, n_ubatch=8)
    assert _run(m, 0, 0, 6) == 0
    m.check()
    ok = m.seq_rm(0, 6 - back, -1)
    assert ok is (back <= 2)
    m.check()
    if ok:
        assert m.llama.pos_max(0) == 5 - back
        assert m.seq_rm(0, 5 - back, -1) is False  # one pending rollback at a time
    assert _run(m, 0, m.llama.pos_max(0) + 1, 2) == 0
    m.check()


@pytest.mark.parametrize("name", ["llama", "gemma2", "mamba", "lfm2", "lfm2_swa"])
def test_seq_rm_p1_boundary(pair, name):
    """[p0, p1): the cell at p1 stays, the cell at p1 - 1 goes; p0 == p1 removes nothing."""
    m = pair(name, n_seq_max=2)
    assert _run(m, 0, 0, 6) == 0
    assert _run(m, 1, 0, 6) == 0
    m.check()
    kind = m.mem.kind
    if kind in ("recurrent",):
        assert m.seq_rm(0, 0, 5) is True           # p1 == last pos: the state stays
        assert m.llama.pos_max(0) == 5
        assert m.seq_rm(0, 3, 3) is True           # empty range
        m.check()
        assert m.seq_rm(1, 0, 6) is True           # p1 == last + 1: the whole state goes
        assert m.llama.pos_max(1) == -1
        m.check()
        return
    assert m.seq_rm(0, 2, 4) is True
    kv = kind in ("kv", "iswa")                    # a hybrid's pos_min is its recurrent state's
    assert m.llama.pos_max(0) == 5 and (not kv or m.llama.pos_min(0) == 0)
    m.check()
    assert m.seq_rm(0, 4, 4) is True               # empty range: cell 4 stays
    m.check()
    assert m.seq_rm(0, 0, 1) is True               # only position 0
    assert not kv or m.llama.pos_min(0) == 1
    m.check()
    if kind == "kv" or kind == "iswa":
        assert m.seq_rm(1, 5, 6) is True           # only the last position
        assert m.llama.pos_max(1) == 4
        m.check()
        assert _run(m, 1, 5, 1) == 0
        m.check()


# -- slot-search boundaries that no other fixed test reaches ---------------------------------
def test_swa_reuse_boundary(pair):
    """A full SWA cache (swa_full off: 256 cells) whose only reusable cells are those exactly
    n_swa behind the owner's next position: find_slot tests is_masked_swa(pos, pos_max + 1)."""
    m = pair("gemma2", n_ctx=1024, n_seq_max=2, swa_full=False, n_ubatch=64)
    for p0 in range(0, 248, 62):
        assert _run(m, 0, p0, 62) == 0
    m.seq_cp(0, 1)                                 # 248 shared cells: never reused
    assert _run(m, 0, 248, 8) == 0                 # 8 cells of seq 0 only: the SWA cache is full
    m.check(per_seq=False)
    assert m.decode([(9, 256, [0])]) == 0          # reuses the cell of pos 248 (256 - 248 >= 8)
    m.check()


def test_kv_head_reset_boundary(pair):
    """find_slot restarts at cell 0 only when head > used + 2 * n_tokens (here head 20, used 2,
    9 tokens: it must search from 20)."""
    m = pair("llama", n_seq_max=3)
    assert _run(m, 0, 0, 20) == 0                  # cells 0..19
    assert _run(m, 1, 0, 4) == 0                   # cells 20..23
    m.seq_rm(0, -1, -1)                            # head 0, used 4
    m.seq_add(1, 0, 2, -10)                        # drops cells 20, 21: head = 20, used 2
    m.check()
    assert _run(m, 1, 4, 9) == 0
    m.check()
    assert m.mem.cells_view().pos[20] == 4         # placed from head (20), not from 0


def test_recurrent_head_reset_boundary(pair):
    """Recurrent find_slot restarts at cell 0 only when head > used + 2 * n_seqs (here head 4,
    used 2, one sequence: the fork goes to the empty cell after head, cell 5)."""
    m = pair("mamba", n_seq_max=6)
    for s in range(5):
        assert _run(m, s, 0, 2) == 0               # seq s -> cell s; head 4
    for d in (0, 1, 2):
        m.seq_cp(4, d)                             # frees cells 0..2 without moving head
    m.check()
    assert _run(m, 0, 2, 1) == 0                   # seq 0 forks out of cell 4
    m.check()
    assert m.mem.recurrent.cells_view().tail[0] == 5
