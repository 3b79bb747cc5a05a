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


UNKNOWN_WHEEL = """
import sys
import pymem, pymem.llama
from pymem.llama import bridge
L = bridge.llama_cpp()
llm = L.Llama({model!r}, n_ctx=256, n_gpu_layers=0, n_threads=1)
llm._eval_tokens([1, 2, 3], 0)
assert bridge.export_state(llm).seq_pos_max(0) == 2
L.__version__ = "0.99999"
try:
    bridge.export_state(llm)
except pymem.UnsupportedError as exc:
    print("REFUSED", exc)
"""


def test_unknown_py_sync_build_refused(models, tmp_path):
    """A llama-cpp-py-sync release other than 0.11739 is refused as well (never driven with a
    guessed format)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", UNKNOWN_WHEEL.format(model=models["llama"])], capture_output=True,
                         text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("REFUSED") and "0.99999" in out.stdout and "0.11739" in out.stdout


@pytest.mark.parametrize("name", ["llama", "gemma2", "mamba", "jamba"])
def test_lcp_prompt_cache_store(lcp, models, tmp_path, name):
    """pymem.store with llama-cpp-python Llama targets (put / lookup / restore)."""
    n = lcp.call("run", "lcp_scenarios:store_roundtrip", models[name], str(tmp_path / "store"))
    assert n > 0


@pytest.mark.parametrize("name", ["llama", "gemma2", "mamba", "jamba"])
def test_lcp_prefill(lcp, models, tmp_path, name):
    """Store.prefill on llama_cpp.Llama: restore + Llama.eval of the rest, logits as a full eval."""
    r = lcp.call("run", "lcp_scenarios:store_prefill", models[name], str(tmp_path / "store"))
    assert r["restored"] >= 64 and r["rel"] < 1e-4
