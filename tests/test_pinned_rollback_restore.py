"""A sequence restored while a recurrent rollback is pending (hybrid lfm2, n_rs_seq=2), in lock
step with llama.cpp.

After ``seq_rm`` rolls a recurrent sequence back, its rows come from a snapshot plane that
llama.cpp computed and does not expose, so pymem cannot hold their values; the Mirror compares
those rows again once the sequence is decoded.  A ``seq_restore`` (save + restore through each
side's own blob) in that window used to make the Mirror compare them at once and fail (found by a
random trace); this trace pins that the restore itself matches llama.cpp (metadata, KV rows and
every byte it can know) and that the rows are compared again after the next decode."""
import pytest

pytestmark = pytest.mark.oracle


def _batch(first, last, tokens=None, skip=()):
    tokens = tokens or {}
    return [(tokens.get(p, 0), p, [0]) for p in range(first, last + 1) if p not in skip]


def test_seq_restore_while_a_rollback_is_pending(pair):
    m = pair("lfm2", n_seq_max=1, unified=True, flash_attn=False, n_rs_seq=2)
    steps = [("decode", _batch(0, 34, {32: 13})), ("seq_keep", 0)]
    steps += [("decode", _batch(p, p)) for p in (35, 36)]
    steps += [("decode", _batch(37, 76)), ("decode", _batch(77, 116))]
    steps += [("decode", _batch(p, p)) for p in range(117, 123)]
    steps += [("seq_rm", 0, 122, -1),                                  # rollback: rows from a snapshot
              ("decode", _batch(121, 159, {155: 3, 156: 9}, skip=(122,))),   # rejected by both (pos 121)
              ("seq_keep", 0), ("seq_cp", 0, 0, 0, 0), ("seq_restore", 0, 0, 0)]
    for op in steps:
        if op[0] == "decode":
            m.decode(op[1])
        else:
            getattr(m, op[0])(*op[1:])
        m.check()
    assert m.decode(_batch(122, 122)) == 0
    m.check()
    assert not m.rec_stale                       # decoded: its rows are compared again


def test_rollback_applied_by_a_decode_of_other_sequences(pair):
    """A rollback of sequence 1 pending while a batch of sequences 0 and 2 is decoded: that
    decode applies it too, and the rolled-back tail then holds llama.cpp's snapshot rows, which
    the Mirror must take (found by a random trace: it compared them against pymem's zeros)."""
    m = pair("lfm2", n_seq_max=4, unified=True, flash_attn=False, n_rs_seq=2)
    for s in (0, 1, 2):
        m.decode([(1 + s, p, [s]) for p in range(8)])
        m.check()
    m.decode([(5, p, [1]) for p in (8, 9)])
    m.check()
    assert m.seq_rm(1, 9, -1)                    # rollback: seq 1 back to position 8
    m.check()
    assert m.decode([(7, 8, [0]), (7, 8, [2])]) == 0
    m.check()
