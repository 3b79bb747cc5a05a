"""Random traces against real llama.cpp: each hypothesis example builds a fresh llama.cpp
context and a matching pymem KV cache, then runs random batches and sequence operations on
both, comparing positions and every state blob after every step.

The number of traces per run is the hypothesis profile's max_examples (CI: PYMEM_TRACES,
default 120).  At the end the test prints how many steps of each kind ran and how many of
them actually changed the state, so a run that only exercised no-ops would be visible."""
from __future__ import annotations

import collections

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import needs_oracle  # noqa: E402

pytestmark = [needs_oracle, pytest.mark.oracle]

COUNTS: collections.Counter = collections.Counter()


@st.composite
def configs(draw):
    n_seq_max = draw(st.integers(1, 4))
    unified = draw(st.booleans())
    flash_attn = draw(st.booleans())
    kind = draw(st.sampled_from(["f16", "f16", "f16", "q8_0", "f32"]))
    type_v = kind if (kind != "q8_0" or flash_attn) else "f16"
    model = "llama_hd64" if kind == "q8_0" and draw(st.booleans()) else "llama"
    n_ubatch = draw(st.sampled_from([None, None, 3, 8]))
    return dict(name=model, n_seq_max=n_seq_max, unified=unified, flash_attn=flash_attn,
                type_k=kind, type_v=type_v, n_ubatch=n_ubatch)


def _step(draw, m, cfg):
    """Draw and run one step; returns its kind."""
    n = cfg["n_seq_max"]
    seq = st.integers(0, n - 1)
    top = max([m.mem.seq_pos_max(s) for s in range(n)] + [0]) + 3
    pos = st.one_of(st.just(-1), st.integers(0, top))
    kinds = ["decode"] * 5 + ["seq_rm", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div",
                                "restore_seq", "restore_whole", "clear"]
    can_shift = cfg["type_k"] != "q8_0" or m.mem.k_rot > 0
    if not can_shift:
        kinds = [k for k in kinds if k not in ("seq_add", "seq_div")]
    kind = draw(st.sampled_from(kinds))
    if kind == "decode":
        items = []
        n_tok = draw(st.integers(1, 40))
        seqs = draw(st.lists(seq, min_size=1, max_size=min(n, 3), unique=True))
        nxt = {s: m.mem.seq_pos_max(s) + 1 for s in range(n)}
        jump = draw(st.sampled_from([0] * 20 + [1, -1, 5]))
        for i in range(n_tok):
            s = seqs[i % len(seqs)]
            ids = [s]
            if draw(st.integers(0, 19)) == 0 and n > 1:  # a token shared by several sequences
                ids = draw(st.lists(seq, min_size=2, max_size=n, unique=True))
            p = nxt[ids[0]]
            for t in ids:
                nxt[t] = max(nxt[t], p + 1)
            items.append((draw(st.integers(0, 127)), max(0, p + (jump if i == 0 else 0)), ids))
        rc = m.decode(items)
        return f"decode rc={rc}"
    if kind == "seq_rm":
        s = draw(st.sampled_from([-1] + list(range(n))))
        m.seq_rm(s, draw(pos), draw(pos))
    elif kind == "seq_cp":
        a, b = draw(seq), draw(seq)
        if cfg["unified"]:
            m.seq_cp(a, b, draw(pos), draw(pos))
        else:
            m.seq_cp(a, b, -1, -1)  # partial cross-stream copies abort llama.cpp
    elif kind == "seq_keep":
        m.seq_keep(draw(seq))
    elif kind == "seq_add":
        m.seq_add(draw(seq), draw(pos), draw(pos), draw(st.integers(-40, 40)))
    elif kind == "seq_div":
        m.seq_div(draw(seq), draw(pos), draw(pos), draw(st.integers(1, 4)))
    elif kind == "restore_seq":
        m.seq_restore(draw(seq), draw(seq))
    elif kind == "restore_whole":
        m.whole_restore(from_llama=draw(st.booleans()))
    elif kind == "clear":
        m.clear(draw(st.booleans()))
    return kind


@given(data=st.data())
def test_random_traces(pair, data):
    cfg = data.draw(configs(), label="config")
    m = pair(**cfg)
    if m.mem.k_rot or cfg["type_k"] == "q8_0":
        m.k_tolerance = 0.02
    n_steps = data.draw(st.integers(5, 25), label="steps")
    COUNTS["traces"] += 1
    for i in range(n_steps):
        before = m.llama.state_get()
        kind = _step(data.draw, m, cfg)
        note(f"step {i}: {kind}")
        COUNTS[kind] += 1
        if m.llama.state_get() != before:
            COUNTS[kind + " (changed state)"] += 1
        m.check()
    COUNTS["steps"] += n_steps


def test_trace_coverage_report(capsys):
    """Print the coverage counts of the random traces (runs after them)."""
    if not COUNTS:
        pytest.skip("no traces ran")
    lines = [f"{k:32s} {v}" for k, v in sorted(COUNTS.items())]
    with capsys.disabled():
        print("\nrandom KV traces against llama.cpp:\n  " + "\n  ".join(lines))
    assert COUNTS["traces"] >= 1
