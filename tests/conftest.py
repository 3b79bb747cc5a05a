"""Shared fixtures: the real llama.cpp oracle (a persistent worker process), tiny generated
models, and pairs of (llama.cpp context, pymem memory) built for the same configuration."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    # a bounded profile for CI; PYMEM_HYPOTHESIS=dev explores longer
    settings.register_profile("ci", max_examples=int(os.environ.get("PYMEM_TRACES", "120")), deadline=None,
                              suppress_health_check=list(HealthCheck), derandomize=False, print_blob=True)
    settings.register_profile("dev", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    settings.load_profile(os.environ.get("PYMEM_HYPOTHESIS", "ci"))
except ImportError:  # pragma: no cover
    pass

import pymem
from pymem.llama import _loader

ORACLE = _loader.is_available()
needs_oracle = pytest.mark.skipif(not ORACLE, reason="llama-cpp-py-sync==0.11739 is not installed")


@pytest.fixture(scope="session")
def oracle():
    if not ORACLE:
        pytest.skip("llama-cpp-py-sync==0.11739 is not installed")
    from pymem._oracle import OracleWorker

    w = OracleWorker()
    w.start()
    yield w
    w.close()


@pytest.fixture(scope="session")
def models(oracle):
    """name -> path of every tiny model (generated once, cached across runs)."""
    from pymem._oracle import tinymodels

    return oracle.ensure_models(tinymodels.names())


@pytest.fixture
def pair(oracle, models):
    """pair(name, n_ctx=256, n_seq_max=4, unified=True, flash_attn=False, type_k="f16",
    type_v="f16") -> Mirror of a fresh llama.cpp context and a matching pymem memory."""
    from pymem._oracle import tinymodels
    from pymem._oracle.mirror import Mirror

    made = []

    def make(name: str = "llama", n_ctx: int = 256, n_seq_max: int = 4, unified: bool = True,
             flash_attn: bool = False, type_k: str = "f16", type_v: str = "f16", swa_full: bool = True,
             n_ubatch: int | None = None, **extra):
        layout = tinymodels.layout(name)
        ctx = oracle.context(models[name], n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=unified,
                             flash_attn=flash_attn, type_k=type_k, type_v=type_v, swa_full=swa_full,
                             n_ubatch=n_ubatch, **extra)
        mem = pymem.from_gguf(models[name], n_ctx, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                              flash_attn=flash_attn, unified=unified, swa_full=swa_full,
                              n_ubatch=n_ubatch or 512, n_rs_seq=extra.get("n_rs_seq", 0))
        m = Mirror(ctx, mem, n_ubatch=ctx.n_ubatch(), n_vocab=layout["n_vocab"], n_seq_max=n_seq_max)
        made.append(ctx)
        return m

    yield make
    for c in made:
        try:
            c.close()
        except Exception:
            pass


# --- llama-cpp-python 0.3.36 (llama.cpp 0c1e570, state format 10): the second oracle ------------
def _lcp_where():
    from pymem.llama import _bridge_lcp as _lcp

    return _lcp.locate()


LCP = _lcp_where() is not None
LCP_REQUIRED = os.environ.get("PYMEM_REQUIRE_LCP", "") not in ("", "0")
LCP_SKIP = ("llama-cpp-python 0.3.36 (the second llama.cpp oracle, 0c1e570) is not available: run "
            "tools/build_lcp.sh once (or set $PYMEM_LCP_DIR to its folder) to enable these tests")


def _lcp_missing():
    if LCP_REQUIRED:
        pytest.fail("PYMEM_REQUIRE_LCP=1 but " + LCP_SKIP)
    pytest.skip(LCP_SKIP)


@pytest.fixture(scope="session")
def lcp():
    """A worker process running llama-cpp-python 0.3.36 (pymem._oracle.lcp.LcpWorker)."""
    if not LCP:
        _lcp_missing()
    from pymem._oracle.lcp import LcpWorker

    w = LcpWorker()
    w.start()
    yield w
    w.close()


@pytest.fixture
def lcp_pair(lcp, models):
    """lcp_pair(name, ...) -> a Mirror of a fresh llama-cpp-python context and a format-10 pymem
    memory (same arguments as ``pair``)."""
    from lcp_support import LcpMirror
    from pymem._oracle import tinymodels

    made = []

    def make(name: str = "llama", n_ctx: int = 256, n_seq_max: int = 4, unified: bool = True,
             flash_attn: bool = False, type_k: str = "f16", type_v: str = "f16", swa_full: bool = True,
             n_ubatch: int | None = None, **extra):
        ctx = lcp.context(models[name], n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=unified,
                          flash_attn=flash_attn, type_k=type_k, type_v=type_v, swa_full=swa_full,
                          n_ubatch=n_ubatch, **extra)
        mem = pymem.from_gguf(models[name], n_ctx, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                              flash_attn=flash_attn, unified=unified, swa_full=swa_full,
                              n_ubatch=n_ubatch or 512, n_rs_seq=extra.get("n_rs_seq", 0), format=10)
        m = LcpMirror.for_memory(ctx, mem, n_ubatch=ctx.n_ubatch(), n_vocab=tinymodels.layout(name)["n_vocab"],
                                 n_seq_max=n_seq_max)
        made.append(ctx)
        return m

    yield make
    for c in made:
        try:
            c.close()
        except Exception:
            pass
