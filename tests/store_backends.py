"""Store test plumbing: backend URL factories (add a backend with one line in STORE_BACKENDS),
the ``store_url`` fixture, and live llama.cpp contexts of the tiny models for every memory kind."""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

from conftest import ORACLE

_N = itertools.count()


class StoreURL(str):
    """A backend URL; ``persistent`` = another process opening it sees the same entries."""

    persistent = False


def _url(u: str, persistent: bool) -> StoreURL:
    s = StoreURL(u)
    s.persistent = persistent
    return s


def memory_url(tmp_path: Any) -> StoreURL:
    return _url(f"memory://test-{os.getpid()}-{next(_N)}", False)


#: (id, factory(tmp_path) -> StoreURL).  The coordinator adds the embedded and Redis backends here.
STORE_BACKENDS: List[Tuple[str, Callable[[Any], StoreURL]]] = [
    ("memory", memory_url),
]


@pytest.fixture(params=[f for _, f in STORE_BACKENDS], ids=[i for i, _ in STORE_BACKENDS])
def store_url(request, tmp_path) -> StoreURL:
    return request.param(tmp_path)


# ---------------------------------------------------------------------------------------------
# tiny models and live contexts
# ---------------------------------------------------------------------------------------------
#: one tiny model per memory kind (context defaults below: swa_full off, so SWA really slides)
KIND_MODELS = {"kv": "llama", "iswa": "gemma2", "recurrent": "mamba", "hybrid": "jamba",
               "hybrid_iswa": "lfm2_swa"}
CTX = dict(n_ctx=256, n_seq_max=2, kv_unified=True, flash_attn=False, swa_full=False)

needs_llama = pytest.mark.skipif(not ORACLE, reason="llama-cpp-py-sync==0.11739 is not installed")


def llama_modules() -> Any:
    """(capi, tinymodels) of pymem's private llama.cpp oracle."""
    from pymem._oracle import capi, tinymodels
    return capi, tinymodels


_MODELS: Dict[str, Any] = {}


def model_path(name: str) -> str:
    _, tinymodels = llama_modules()
    return tinymodels.ensure_models([name])[name]


def model(name: str) -> Any:
    capi, _ = llama_modules()
    m = _MODELS.get(name)
    if m is None:
        m = _MODELS[name] = capi.Model(model_path(name))
    return m


def context(name: str, **kw: Any) -> Any:
    capi, _ = llama_modules()
    return capi.Context(model(name), **{**CTX, **kw})


def decoded(name: str, tokens: List[int], seq: int = 0, **kw: Any) -> Any:
    c = context(name, **kw)
    rc = c.decode_seq(seq, tokens, 0)
    assert rc == 0
    return c


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def tokens(seed: int, n: int) -> List[int]:
    return np.random.default_rng(seed).integers(1, 127, n).tolist()
