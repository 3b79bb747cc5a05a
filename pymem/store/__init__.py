"""pymem.store: a persistent prompt cache for llama.cpp, for every memory type.

::

    import pymem.store
    st = pymem.store.open("prompt-cache")                 # or "redis://host:6379/0", "memory://"
    r = st.prefill(llm, tokens, seq_id=0)                  # restore + decode the rest + store
    r.n_restored, r.n_decoded                              # the context is ready to sample
    st.put(target, tokens, seq_id=0); st.lookup(tokens, target); st.restore(target, tokens, seq_id=0)

Values are per-sequence state sections cut into blocks of ``block_tokens`` tokens (full-attention
KV rows, shared by every prompt with the same prefix), tails, and checkpoints of the parts that
blocks cannot rebuild (sliding-window KV, recurrent state) at exact token counts.  Keys chain the
blocks and are seeded with the model and memory-layout fingerprints (see :mod:`.keys`).
"""
from __future__ import annotations

import os
from typing import Any, Union

from .errors import BackendError, CorruptValueError, FingerprintError, StoreError, TargetError
from .store import Lookup, PrefillResult, PutResult, Store

__all__ = ["open", "Store", "PutResult", "Lookup", "PrefillResult", "StoreError", "BackendError",
           "CorruptValueError", "FingerprintError", "TargetError"]


def open(url_or_path: Any, *, budget_bytes: Union[int, str, None] = None, block_tokens: int = 256,
         checkpoint_every: int = 4, fingerprint: Any = None, **backend_opts: Any) -> Store:  # noqa: A001
    """Open a prompt-cache store: a directory path (embedded backend), ``redis://host:port/db``,
    or ``memory://[name]`` (in-process).  ``budget_bytes`` caps the stored bytes (LRU eviction
    that keeps chains whole), ``block_tokens`` is the block size, ``checkpoint_every`` how many
    blocks apart ``prefill`` captures checkpoints, ``fingerprint`` replaces the model fingerprint.
    ``budget_bytes`` is an int or a size such as ``"8GiB"`` / ``"500MB"``."""
    from .backends import open_backend

    url = os.fspath(url_or_path) if isinstance(url_or_path, os.PathLike) else url_or_path
    backend = open_backend(url, **backend_opts)
    try:
        return Store(backend, budget_bytes=budget_bytes, block_tokens=block_tokens,
                     checkpoint_every=checkpoint_every, fingerprint=fingerprint)
    except BaseException:
        backend.close()                  # bad settings: nothing left open
        raise
