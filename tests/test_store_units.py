"""pymem.store pieces without llama.cpp: value envelopes, keys, the memory backend, the policy."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import pymem
import pymem.store
from pymem.store import keys as K
from pymem.store import policy
from pymem.store import values as V
from pymem.store.backends import open_backend
from pymem.store.backends.base import Entry
from pymem.store.backends.memory import MemoryBackend
from store_backends import store_url  # noqa: F401

SEED = b"s" * 16
KEY = b"k" * 16


# -- values -----------------------------------------------------------------------------------
def test_value_roundtrip_and_every_failure():
    v = V.seal("block", 256, SEED, KEY, b"payload bytes")
    n, pl = V.open_value(v, "block", SEED, KEY)
    assert (n, bytes(pl)) == (256, b"payload bytes")
    assert V.check_value(v, KEY) == ("block", 256, SEED)
    bad = {
        "shorter than its envelope": v[:20],
        "bad magic": b"XXXX" + v[4:],
        "payload length": v + b"\0",
        "checksum": v[:V.HEADER] + b"P" + v[V.HEADER + 1:],
    }
    for why, b in bad.items():
        with pytest.raises(pymem.store.CorruptValueError, match=why):
            V.open_value(b, "block", SEED, KEY)
        with pytest.raises(pymem.Error):
            V.check_value(b, KEY)
    with pytest.raises(pymem.store.CorruptValueError, match="kind"):
        V.open_value(v, "tail", SEED, KEY)
    with pytest.raises(pymem.store.CorruptValueError, match="another model"):
        V.open_value(v, "block", b"t" * 16, KEY)
    with pytest.raises(pymem.store.CorruptValueError, match="another key"):
        V.open_value(v, "block", SEED, b"j" * 16)
    # every single flipped bit is caught
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(v), 50):
        b = bytearray(v)
        b[i] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(pymem.store.CorruptValueError):
            V.open_value(bytes(b), "block", SEED, KEY)


# -- keys -------------------------------------------------------------------------------------
def test_chain_keys():
    t = K.tokens_array(list(range(100)))
    a = K.Chain(SEED, 16, t)
    b = K.Chain(SEED, 16, K.tokens_array(list(range(40)) + [7] * 60))
    assert a.block(0) == b.block(0) and a.block(1) == b.block(1)
    assert a.block(2) != b.block(2) and a.block(5) != b.block(5)     # chained: differs after divergence
    assert a.prefix(32) == a.block(1) and a.prefix(33) != a.prefix(34)
    assert a.ckpt(32) != a.block(1)
    assert K.Chain(b"x" * 16, 16, t).block(0) != a.block(0)         # the seed (fingerprint) matters
    assert K.Chain(SEED, 8, t).block(1) != a.block(0)
    assert a.prefix(0) == SEED
    with pytest.raises(pymem.store.StoreError):
        a.block(6)
    for bad in ([[1, 2]], [1.5, 2.0], [-1], [2 ** 31]):
        with pytest.raises(pymem.Error):
            K.tokens_array(bad)


def test_model_fingerprint_is_cached_and_tracks_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMEM_CACHE_DIR", str(tmp_path / "cache"))
    import gguf

    p = tmp_path / "m.gguf"

    def write(val):
        w = gguf.GGUFWriter(str(p), "llama")
        w.add_uint32("llama.block_count", 2)
        w.add_tensor("w", np.full(64, val, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(1.0)
    a = K.model_fingerprint(p)
    assert a["arch"] == "llama"
    assert (tmp_path / "cache" / "store" / "fingerprints.json").exists()
    assert K.model_fingerprint(p) == a
    time.sleep(0.01)
    write(2.0)                               # other weights, same metadata and layout
    b = K.model_fingerprint(p)
    assert b["data"] != a["data"] and b["meta"] == a["meta"] and b["tensors"] == a["tensors"]
    assert "other weights" in K.describe_difference({f"model.{k}": v for k, v in a.items()},
                                                    {f"model.{k}": v for k, v in b.items()})
    with pytest.raises(pymem.store.FingerprintError):
        K.model_fingerprint(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(pymem.store.FingerprintError):
        K.model_fingerprint(tmp_path / "junk.gguf")


def test_layout_settings_name_the_differences():
    a = pymem.KVCache(n_layer=2, size=64, type_k="f16", v_trans=True)
    b = pymem.KVCache(n_layer=2, size=64, type_k="q8_0", v_trans=False)
    sa, sb = K.layout_settings(a), K.layout_settings(b)
    assert sa["kind"] == "kv" and sa["format"] == 11
    d = K.describe_difference(sa, sb)
    assert "kv.type_k" in d and "kv.v_trans" in d
    # the KV cache size does not change a sequence's bytes: not part of the fingerprint
    assert K.layout_settings(pymem.KVCache(n_layer=2, size=128)) == K.layout_settings(pymem.KVCache(n_layer=2, size=64))


# -- backend contract (every backend of store_url) ---------------------------------------------
def test_backend_contract(store_url):
    be = open_backend(str(store_url))
    try:
        e = Entry("aa" * 16, 0, "block", 16, None)
        assert be.put_if_absent(e, b"one")
        assert not be.put_if_absent(e, b"two")
        assert be.get(e.key) == b"one"
        assert be.entry(e.key).size == 3
        assert be.get("bb" * 16) is None and be.entry("bb" * 16) is None
        be.put_if_absent(Entry("cc" * 16, 0, "tail", 20, e.key), b"12345")
        assert sorted(x.key for x in be.scan()) == ["aa" * 16, "cc" * 16]
        assert be.total_bytes() == 8
        be.set_pinned([e.key])
        assert be.entry(e.key).pinned
        assert be.incr("hits") == 1 and be.incr("hits", 4) == 5
        assert be.counters()["hits"] == 5
        assert be.delete([e.key, "dd" * 16]) == 1
        assert be.delete([e.key]) == 0
        assert be.total_bytes() == 5
    finally:
        be.close()


def test_memory_backend_threads_and_names():
    be = MemoryBackend()
    errors = []

    def worker(i):
        try:
            for j in range(200):
                k = f"{(i * 1000 + j) % 300:032x}"
                be.put_if_absent(Entry(k, 0, "block", 1, None), k.encode())
                v = be.get(k)
                assert v is None or v == k.encode()
                be.incr("n")
                if j % 7 == 0:
                    be.delete([k])
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors
    assert be.counters()["n"] == 800
    assert be.total_bytes() == sum(x.size for x in be.scan())
    a, b = open_backend("memory://shared-x"), open_backend("memory://shared-x")
    a.put_if_absent(Entry("ee" * 16, 0, "block", 1, None), b"v")
    assert b.get("ee" * 16) == b"v"
    assert open_backend("memory://").get("ee" * 16) is None
    a.close()
    with pytest.raises(pymem.store.StoreError):
        a.get("ee" * 16)
    with pytest.raises(pymem.store.StoreError):
        pymem.store.open("nosuch://x")


# -- policy -----------------------------------------------------------------------------------
def _chain(be, name, n, size=100, t0=0.0, parent=None):
    keys = []
    for i in range(n):
        k = f"{name}{i:02d}".ljust(32, "0")
        be.put_if_absent(Entry(k, 0, "block", i + 1, parent, created=t0 + i, last_used=t0 + i), b"x" * size)
        parent = k
        keys.append(k)
    return keys


def test_eviction_takes_leaves_first_and_keeps_pins():
    be = MemoryBackend()
    a = _chain(be, "a", 5, t0=0)             # oldest chain
    b = _chain(be, "b", 5, t0=100)
    c = _chain(be, "c", 3, t0=50, parent=a[1])   # a branch off a's second block
    be.set_pinned(a[:2])
    n, freed = policy.evict_to_budget(be, 700)
    assert be.total_bytes() <= 700
    left = {e.key for e in be.scan()}
    assert set(a[:2]) <= left                # pinned
    assert not policy.orphans(be.scan())     # no chain has a hole
    assert set(b) <= left                    # the most recently used chain stays whole
    assert n == len(a) + len(c) + len(b) - len(left) and freed == 100 * n
    # a budget below the pinned bytes keeps the pinned entries and nothing else
    policy.evict_to_budget(be, 0)
    assert {e.key for e in be.scan()} == set(a[:2])


def test_orphans_and_gc(store_url):
    st = pymem.store.open(str(store_url))
    a = _chain(st.backend, "a", 4)
    st.backend.delete([a[1]])
    assert policy.orphans(st.backend.scan()) == {a[2], a[3]}
    assert st.gc()["orphans"] == 2
    assert [e.key for e in st.backend.scan()] == [a[0]]
    rep = st.verify()
    assert rep["bad"] == 1                   # the test values are not sealed
    assert rep["checked"] == 1
    st.close()


def test_settings_are_checked_and_sizes_read(tmp_path):
    st = pymem.store.open(str(tmp_path / "st"), budget_bytes="2KiB", block_tokens=16)
    assert st.budget_bytes == 2048
    assert st.gc("1MB") == {"orphans": 0, "evicted": 0, "freed_bytes": 0}
    for bad in ("1GB!", "-3MB", -1, 2 ** 63):
        with pytest.raises(pymem.InvalidArgumentError, match="budget_bytes"):
            st.gc(bad)
    with pytest.raises(TypeError, match="budget_bytes"):
        st.gc(1.5)
    st.close()
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for opts in (dict(block_tokens=0), dict(block_tokens=2 ** 31), dict(checkpoint_every=0),
                 dict(budget_bytes="lots")):
        with pytest.raises(pymem.InvalidArgumentError):
            pymem.store.open(str(tmp_path / "st"), **opts)
    with pytest.raises(TypeError, match="block_tokens"):
        pymem.store.open(str(tmp_path / "st"), block_tokens=1.5)
    if fds is not None:                       # a refused open closes the backend it opened
        assert len(os.listdir("/proc/self/fd")) == fds
