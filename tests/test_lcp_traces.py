"""Random traces against llama-cpp-python 0.3.36 (llama.cpp 0c1e570, state format 10), the
same way test_traces.py runs them against b11739: each hypothesis example builds a fresh
llama-cpp-python context (in its own worker process) and the matching format-10 pymem memory,
runs random batches and sequence operations on both and compares positions and every state
blob (whole, per sequence, PARTIAL_ONLY) after every step.

Traces per memory type and run: PYMEM_LCP_TRACES (default 20)."""
from __future__ import annotations

import collections
import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import Phase, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import needs_oracle  # noqa: E402
from test_traces import _step, configs  # noqa: E402

pytestmark = [needs_oracle, pytest.mark.oracle]

N = int(os.environ.get("PYMEM_LCP_TRACES", "20"))
# shrinking a failure can take many minutes here; PYMEM_LCP_SHRINK=1 turns it on
PHASES = [p for p in Phase if p != Phase.shrink or os.environ.get("PYMEM_LCP_SHRINK")]
COUNTS: dict = collections.defaultdict(collections.Counter)


# 0c1e570 corrupts its heap (SIGSEGV / SIGABRT, then or in a later call) decoding rwkv7 in
# several ubatches (n_ubatch 1, 2, 3 or 16 with 26 tokens; b11739 does not): rwkv6 stands in
LCP_BROKEN = {"rwkv7": "rwkv6"}


def _trace(lcp_pair, data, family):
    cfg = data.draw(configs(family), label="config")
    if cfg["name"] in LCP_BROKEN:
        COUNTS[family][f"{cfg['name']} replaced (0c1e570 bug)"] += 1
        cfg["name"] = LCP_BROKEN[cfg["name"]]
    m = lcp_pair(**cfg)
    if m.mem.kind == "kv" and cfg["type_k"] == "q8_0":
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
    for k, v in m.stats.items():
        if "skipped" in k or "PARTIAL" in k:
            counts[k] += v


@pytest.mark.parametrize("family", ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"])
@settings(max_examples=N, phases=PHASES)
@given(data=st.data())
def test_lcp_random_traces(lcp_pair, data, family):
    _trace(lcp_pair, data, family)


def test_lcp_trace_coverage_report(capsys):
    """Print the coverage counts of the traces above (runs after them)."""
    if not COUNTS:
        pytest.skip("no traces ran")
    with capsys.disabled():
        for family, counts in COUNTS.items():
            lines = [f"{k:34s} {v}" for k, v in sorted(counts.items())]
            print(f"\nrandom {family} traces against llama-cpp-python 0.3.36 (0c1e570):\n  " + "\n  ".join(lines))
    assert all(c["traces"] >= min(N, 1) for c in COUNTS.values())
