"""Random traces against real llama.cpp: each hypothesis example builds a fresh llama.cpp
context and the matching pymem memory (pymem.from_gguf), then runs random batches and
sequence operations on both, comparing positions and every state blob (whole, per
sequence, and PARTIAL_ONLY for composites) after every step.

Traces per run: PYMEM_TRACES for the plain KV cache (default 120), PYMEM_TRACES_TYPE for
each other memory type (default 30).  At the end the test prints, per type, how many steps
of each kind ran, how many of them actually changed the state, and how many reached each
edge case the generators lean toward ("edge ..." lines)."""
from __future__ import annotations

import collections
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import needs_oracle  # noqa: E402

pytestmark = [needs_oracle, pytest.mark.oracle]

COUNTS: dict = collections.defaultdict(collections.Counter)

FAMILIES = {
    "kv": ["llama", "llama_hd64", "llama_neox", "qwen3"],
    "iswa": ["gemma2", "gemma3"],
    "recurrent": ["mamba", "mamba2", "rwkv6", "rwkv7"],
    "hybrid": ["lfm2", "jamba", "jamba_gqa", "granitehybrid", "falcon_h1", "nemotron_h"],
    "hybrid_iswa": ["lfm2_swa"],
}
ROLLBACK = {"lfm2", "nemotron_h"}  # archs that keep n_rs_seq (llama.cpp forces 0 elsewhere)
N_KV = int(os.environ.get("PYMEM_TRACES", "120"))
N_TYPE = int(os.environ.get("PYMEM_TRACES_TYPE", "30"))


@st.composite
def configs(draw, family):
    n_seq_max = draw(st.integers(1, 4))
    unified = draw(st.booleans())
    flash_attn = draw(st.booleans())
    name = draw(st.sampled_from(FAMILIES[family]))
    kind = "f16"
    if family == "kv":
        kind = draw(st.sampled_from(["f16", "f16", "f16", "q8_0", "f32"]))
        if kind == "q8_0" and draw(st.booleans()):
            name = "llama_hd64"
    type_v = kind if (kind != "q8_0" or flash_attn) else "f16"
    n_ubatch = draw(st.sampled_from([None, None, 3, 8]))
    cfg = dict(name=name, n_seq_max=n_seq_max, unified=unified, flash_attn=flash_attn,
               type_k=kind, type_v=type_v, n_ubatch=n_ubatch)
    if family in ("iswa", "hybrid_iswa"):
        cfg["swa_full"] = draw(st.booleans())
    if name in ROLLBACK and draw(st.booleans()):
        cfg["n_rs_seq"] = 2
        if n_ubatch is not None:
            cfg["n_ubatch"] = 8
    return cfg


def _step(draw, m, cfg, edges):
    """Draw and run one step; returns its kind.  Arguments are drawn around the memory's
    actual contents so most steps do something; llama.cpp-aborting arguments are avoided
    (pymem's errors for those are tested elsewhere).  The draws lean toward edge cases
    (empty copy sources, gaps in a batch's sequence ids over a live sequence, range bounds at
    a sequence's first / last / next position, position 0, the sliding-window edge); each
    edge reached is added to ``edges``."""
    n = cfg["n_seq_max"]
    mem = m.mem
    spans = {s: (mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in range(n)}
    live = [s for s in range(n) if spans[s][1] >= 0] or list(range(n))
    empty = [s for s in range(n) if spans[s][1] < 0]
    seq = st.sampled_from(live) if draw(st.integers(0, 3)) else st.integers(0, n - 1)
    top = max([mx for _, mx in spans.values()] + [0]) + 3
    pos = st.one_of(st.just(-1), st.integers(0, top))
    kinds = ["decode"] * 5 + ["seq_rm", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div",
                                "restore_seq", "restore_whole", "clear"]
    kv_parts = mem.kv_parts()
    can_shift = cfg["type_k"] != "q8_0" or any(p.k_rot > 0 for p in kv_parts)
    if not can_shift:
        kinds = [k for k in kinds if k not in ("seq_add", "seq_div")]
    kind = draw(st.sampled_from(kinds))
    if kind == "decode":
        items = []
        n_tok = draw(st.integers(1, 40))
        seqs = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=min(n, 3), unique=True))
        gaps = [(a, c) for a in range(n) for c in range(a + 2, n)
                if any(spans[b][1] >= 0 for b in range(a + 1, c))]
        if gaps and draw(st.integers(0, 3)) == 0:  # e.g. seqs 0 and 2 while seq 1 is live
            seqs = list(draw(st.sampled_from(gaps)))
        if any(b not in seqs and spans[b][1] >= 0 and min(seqs) < b < max(seqs) for b in range(n)):
            edges.add("decode: seq-id gap over a live sequence")
        nxt = {s: spans[s][1] + 1 for s in range(n)}
        jump = draw(st.sampled_from([0] * 30 + [1, -1, 5]))
        for i in range(n_tok):
            s = seqs[i % len(seqs)]
            ids = [s]
            if n > 1 and draw(st.integers(0, 19)) == 0:  # a token shared by sequences in step
                ids = [t for t in range(n) if spans[t] == spans[s] and nxt[t] == nxt[s]]
                ids = draw(st.permutations(ids))
            p = nxt[ids[0]]
            for t in ids:
                nxt[t] = max(nxt[t], p + 1)
            items.append((draw(st.integers(0, 127)), max(0, p + (jump if i == 0 else 0)), ids))
        if any(spans[t][1] < 0 for it in items for t in it[2]):
            edges.add("decode: a sequence starts (position 0 or a jump)")
        note(f"decode {items}")
        rc = m.decode(items)
        return f"decode rc={rc}"
    s = draw(seq)
    note(f"{kind} on seq {s} spans {spans}")
    lo, hi = spans[s]
    a, b = sorted((max(0, lo), max(0, hi + 1)))  # a hybrid's min can exceed its max (T-20)
    inner = st.integers(a, b) if hi >= 0 else pos
    bounds = [0, -1] + ([lo, lo + 1, hi, hi + 1] if hi >= 0 else [])
    n_swa = max([p.n_swa for p in kv_parts if p.swa_type != "none"] + [0])
    if n_swa and hi >= 0:
        bounds += [max(0, hi - n_swa), max(0, hi - n_swa + 1)]
    rng = st.one_of(pos, inner, st.sampled_from(bounds), st.sampled_from(bounds))
    if kind == "seq_rm":
        if draw(st.integers(0, 5)) == 0:
            s, p0, p1 = -1, draw(rng), draw(rng)
        elif mem.kind != "kv" and hi >= 0 and draw(st.booleans()):
            p0, p1 = max(0, hi - draw(st.integers(0, 3))), -1  # suffix: rollback or refusal
            if cfg.get("n_rs_seq") and p0 > 0:
                edges.add(f"seq_rm: rollback of {hi - p0 + 1} (bound {cfg['n_rs_seq']})")
        else:
            p0, p1 = draw(rng), draw(rng)
        _range_edges(edges, "seq_rm", spans.get(s, (-1, -1)), p0, p1, n_swa)
        m.seq_rm(s, p0, p1)
    elif kind == "seq_cp":
        b = draw(st.integers(0, n - 1))
        if empty and draw(st.booleans()):
            s = draw(st.sampled_from(empty))
        if spans[s][1] < 0 and s != b:
            edges.add("seq_cp: empty source" + (" onto a live sequence" if spans[b][1] >= 0 else ""))
        if cfg["unified"] or not kv_parts:
            p0, p1 = draw(rng), draw(rng)
            _range_edges(edges, "seq_cp", spans[s], p0, p1, n_swa)
            m.seq_cp(s, b, p0, p1)
        else:
            m.seq_cp(s, b, -1, -1)  # partial cross-stream copies abort llama.cpp
    elif kind == "seq_keep":
        m.seq_keep(s)
    elif kind == "seq_add":
        p0, p1 = draw(rng), draw(rng)
        _range_edges(edges, "seq_add", spans[s], p0, p1, n_swa)
        m.seq_add(s, p0, p1, draw(st.integers(-40, 40)))
    elif kind == "seq_div":
        m.seq_div(s, draw(rng), draw(rng), draw(st.integers(1, 4)))
    elif kind == "restore_seq":
        m.seq_restore(s, draw(st.integers(0, n - 1)),
                      flags=1 if mem.kind != "kv" and draw(st.booleans()) else 0)
    elif kind == "restore_whole":
        m.whole_restore(from_llama=draw(st.booleans()))
    elif kind == "clear":
        m.clear(draw(st.booleans()))
    return kind


def _range_edges(edges, op, span, p0, p1, n_swa):
    lo, hi = span
    if hi < 0:
        return
    for name, bound, at in (("p0 at the first position", p0, lo), ("p0 at the last position", p0, hi),
                            ("p0 = 0", p0, 0), ("p1 at the last position", p1, hi),
                            ("p1 just past the last position", p1, hi + 1), ("p1 at the first position", p1, lo)):
        if bound == at:
            edges.add(f"{op}: {name}")
    if n_swa and p0 >= 0 and p0 in (hi - n_swa, hi - n_swa + 1):
        edges.add(f"{op}: p0 at the window edge")


def _trace(pair, data, family):
    cfg = data.draw(configs(family), label="config")
    m = pair(**cfg)
    if m.mem.kind == "kv" and (cfg["type_k"] == "q8_0"):
        m.k_tolerance = 0.02
    n_steps = data.draw(st.integers(5, 25), label="steps")
    counts = COUNTS[family]
    counts["traces"] += 1
    for i in range(n_steps):
        before = m.llama.state_get()
        edges: set = set()
        kind = _step(data.draw, m, cfg, edges)
        note(f"step {i}: {kind} {sorted(edges)}")
        counts[kind] += 1
        for e in edges:
            counts["edge " + e] += 1
        if m.llama.state_get() != before:
            counts[kind + " (changed state)"] += 1
        m.check()
    counts["steps"] += n_steps
    counts["states compared"] += m.stats.get("states compared", 0)
    counts["bytes compared"] += m.stats.get("bytes compared", 0)


@settings(max_examples=N_KV)
@given(data=st.data())
def test_random_traces_kv(pair, data):
    _trace(pair, data, "kv")


@pytest.mark.parametrize("family", ["iswa", "recurrent", "hybrid", "hybrid_iswa"])
@settings(max_examples=N_TYPE)
@given(data=st.data())
def test_random_traces_types(pair, data, family):
    _trace(pair, data, family)


def test_trace_coverage_report(capsys):
    """Print the coverage counts of the random traces (runs after them)."""
    if not COUNTS:
        pytest.skip("no traces ran")
    with capsys.disabled():
        for family, counts in COUNTS.items():
            lines = [f"{k:60s} {v}" for k, v in sorted(counts.items())]
            print(f"\nrandom {family} traces against llama.cpp b11739:\n  " + "\n  ".join(lines))
    assert all(c["traces"] >= 1 for c in COUNTS.values())
