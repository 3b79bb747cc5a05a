"""The bridge with llama-cpp-python 0.3.36 objects (llama_cpp.Llama, its LlamaContext, raw
llama_context_p pointers) and LlamaState objects. The scenarios (tests/lcp_scenarios.py) run
inside the llama-cpp-python worker, where the Llama objects live."""
from __future__ import annotations

import pytest

from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]

NAMES = ["llama", "gemma2", "mamba", "jamba", "lfm2_swa"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fa", [False, True])
def test_lcp_llama_whole(lcp, models, name, fa):
    r = lcp.call("run", "lcp_scenarios:llama_whole", models[name], fa)
    assert r["flash_attn"] is fa
    assert r["sources"]["flash_attn"] in ("state", "created", "n/a")


@pytest.mark.parametrize("name", NAMES)
def test_lcp_raw_sequences(lcp, models, name):
    r = lcp.call("run", "lcp_scenarios:raw_sequences", models[name])
    assert r["bytes"] > 0 and "format 11" in r["refused"] and "format 10" in r["refused"]


def test_lcp_unknown_build_refused(lcp, models):
    msg = lcp.call("run", "lcp_scenarios:unknown_build", models["llama"])
    assert "0.3.99" in msg and "0.3.36" in msg and "format" in msg


@pytest.mark.parametrize("name", ["llama", "mamba", "jamba"])
@pytest.mark.parametrize("logits_all", [False, True])
def test_lcp_llama_state(lcp, models, name, logits_all):
    r = lcp.call("run", "lcp_scenarios:llama_state_roundtrip", models[name], logits_all)
    assert "tokens" in r["refused"] and r["bytes"] > 0
