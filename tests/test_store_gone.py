"""Why an entry is gone, in every process: a value found corrupt, evicted by the budget or deleted
as an orphan leaves its reason in the backend, and a lookup from another process (another
handle for the in-process backend) names it.  pymem memories only (no llama.cpp): a KV cache
(blocks and tails) and a metadata-only Mamba model (checkpoints)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import pymem
import pymem.store
from store_backends import store_url  # noqa: F401 - the fixture

B = 16
FP = "gone-test"


def kv() -> pymem.KVCache:
    return pymem.KVCache(n_layer=2, n_head_kv=2, n_embd_head_k=32, n_embd_head_v=32, size=256, n_seq_max=2)


def filled(n: int) -> pymem.KVCache:
    m = kv()
    m.decode(pymem.Batch(tokens=list(range(n)), pos=list(range(n)), seq_ids=[[0]] * n))
    return m


def mamba(folder: str):
    from pymem._oracle import tinymodels

    path = os.path.join(folder, "mamba.gguf")
    if not os.path.exists(path):
        tinymodels.write_metadata_gguf(path, tinymodels.spec("mamba"))
    return pymem.from_gguf(path, 16, n_seq_max=1)


P = list(range(500, 500 + 4 * B + 3))


def elsewhere(url: str, code: str) -> None:
    """Run ``code`` with ``st`` (the store at url) and ``T`` (this module): in a child process
    for stores that outlive it, else here with a second handle (its own reason memo)."""
    if getattr(url, "persistent", False):
        prog = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                f"import pymem.store, test_store_gone as T\n"
                f"with pymem.store.open({str(url)!r}, block_tokens={B}, fingerprint={FP!r}) as st:\n"
                + "".join(f"    {line}\n" for line in code.splitlines()))
        subprocess.run([sys.executable, "-c", prog], check=True, timeout=120, cwd=os.path.dirname(__file__))
    else:
        import test_store_gone as T  # noqa: F401 - used by code
        with pymem.store.open(url, block_tokens=B, fingerprint=FP) as st:
            exec(code, {"st": st, "T": T})


def test_corrupt_and_evicted_reasons_cross_processes(store_url):  # noqa: F811
    with pymem.store.open(store_url, block_tokens=B, fingerprint=FP) as st:
        st.put(filled(len(P)), P, 0)
        k2 = next(e for e in st.backend.scan() if e.kind == "block" and e.n_tokens == 3 * B)
        v = bytearray(st.backend.get(k2.key))
        v[len(v) // 2] ^= 0xFF
        st.backend.delete([k2.key])
        assert st.backend.put_if_absent(k2, bytes(v))
        # another process restores, finds block 2 corrupt and deletes it
        elsewhere(store_url, "assert st.restore(T.kv(), T.P, 0) == 2 * T.B, st.last_reason")
        why = st.lookup(P, kv()).reason
        assert f"block 2 (tokens {2 * B}..{3 * B - 1}) is not in the store (a corrupt value was deleted " \
               f"(checksum mismatch))" in why, why
        # another process applies a budget that leaves only block 0 and 1: the tail goes first
        st.put(filled(len(P)), P, 0)
        keep = sum(e.size for e in st.backend.scan() if not (e.kind == "tail" or e.n_tokens > 2 * B))
        elsewhere(store_url, f"st.gc(budget_bytes={keep})")
        assert st.lookup(P[:2 * B], kv()).n_tokens == 2 * B
        why = st.lookup(P, kv()).reason
        assert f"block 2 (tokens {2 * B}..{3 * B - 1}) is not in the store (evicted by the byte budget)" in why, why


def test_tail_reason(store_url):  # noqa: F811
    with pymem.store.open(store_url, block_tokens=B, fingerprint=FP) as st:
        st.put(filled(len(P)), P, 0)
        total = sum(e.size for e in st.backend.scan())
        tail = next(e for e in st.backend.scan() if e.kind == "tail")
        elsewhere(store_url, f"st.gc(budget_bytes={total - tail.size})")
        look = st.lookup(P, kv())
        assert look.n_tokens == 4 * B
        assert f"the entry of this prompt's last 3 tokens: evicted by the byte budget" in look.reason, look.reason


def test_checkpoint_reason(store_url, tmp_path):  # noqa: F811
    mem = mamba(str(tmp_path))
    Q = np.arange(100, 150).tolist()
    mem.decode(pymem.Batch(tokens=Q[:30], pos=list(range(30)), seq_ids=[[0]] * 30))
    with pymem.store.open(store_url, block_tokens=B, fingerprint=FP) as st:
        st.put(mem, Q[:30], 0)
        assert st.lookup(Q, mem).n_tokens == 30
        elsewhere(store_url, "st.gc(budget_bytes=0)")
        look = st.lookup(Q, mem)
        assert look.n_tokens == 0
        assert "the checkpoint at 30 tokens: evicted by the byte budget" in look.reason, look.reason


def test_orphan_and_verify_reasons(store_url):  # noqa: F811
    with pymem.store.open(store_url, block_tokens=B, fingerprint=FP) as st:
        st.put(filled(len(P)), P, 0)
        k1 = next(e for e in st.backend.scan() if e.kind == "block" and e.n_tokens == 2 * B)
        st.backend.delete([k1.key])                   # a hole: blocks 2, 3 and the tail are orphans
        elsewhere(store_url, "assert st.gc()['orphans'] == 3")
        st.backend.put_if_absent(k1, b"\0" * 100)     # garbage where block 1 was
        elsewhere(store_url, "assert st.verify()['bad'] == 1")
        why = st.lookup(P, kv()).reason
        assert "block 1 (tokens 16..31) is not in the store (found corrupt by verify and deleted)" in why, why
        st.put(filled(len(P)), P, 0)
        st.backend.delete([k1.key])
        elsewhere(store_url, "st.gc()")
        assert st.lookup(P, kv()).n_tokens == B
        st.put(filled(2 * B), P[:2 * B], 0)           # block 1 back; block 2 was deleted as an orphan
        why = st.lookup(P, kv()).reason
        assert "block 2 (tokens 32..47) is not in the store (deleted by gc / verify: a block before it " \
               "in its chain was gone)" in why, why
