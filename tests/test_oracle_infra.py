"""Tests of the llama.cpp oracle plumbing (pymem._oracle, pymem.llama._loader): loader, worker, tiny models.

Needs the real llama.cpp wheel (llama-cpp-py-sync==0.11739); skipped otherwise.
llama.cpp only runs in child processes here (the worker, or a loader subprocess).
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from blobreader import Reader, parse_kv, parse_rec
from pymem.llama import _loader

if not _loader.is_available():
    pytest.skip(f"llama-cpp-py-sync is not installed ({_loader.PIP_HINT})", allow_module_level=True)

from pymem._oracle import tinymodels  # noqa: E402
from pymem._oracle.worker import (  # noqa: E402
    OracleCrashed,
    OracleTimeout,
    OracleWorker,
    StaleHandleError,
)

pytestmark = pytest.mark.oracle

ALL_MODELS = tinymodels.names()
PKG_ROOT = str(Path(tinymodels.__file__).resolve().parents[2])


# ----------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker():
    with OracleWorker(timeout=120) as w:
        yield w


@pytest.fixture(scope="module")
def built(worker, tmp_path_factory) -> Dict[str, str]:
    """Every tiny model, freshly built by the worker."""
    out = tmp_path_factory.mktemp("tiny_models")
    return {n: worker.build_model(n, out) for n in ALL_MODELS}


# ----------------------------------------------------------------------------------------
# whole-state sections (tests/blobreader.py), to check the layout facts recorded in the specs
# ----------------------------------------------------------------------------------------
_KINDS = {"kv": ["kv"], "iswa": ["kv", "kv"], "recurrent": ["rec"], "hybrid": ["kv", "rec"],
          "hybrid_iswa": ["kv", "kv", "rec"]}


def parse_whole(blob: bytes, lay: Dict[str, Any]) -> List[Any]:
    r = Reader(blob)
    n = r.take("I")
    r.skip(n)  # arch name
    secs = []
    for kind in _KINDS[lay["memory"]]:
        secs.append(parse_kv(r) if kind == "kv" else parse_rec(r, len(lay["recurrent_layers"])))
    assert r.o == len(blob), f"{len(blob) - r.o} trailing bytes"
    return secs


def _expected_kv_layers(lay: Dict[str, Any]) -> List[List[int]]:
    if lay["memory"] in ("iswa", "hybrid_iswa"):
        return [lay["base_layers"], lay["swa_layers"]]
    if lay["memory"] in ("kv", "hybrid"):
        return [lay["attn_layers"]]
    return []


# ----------------------------------------------------------------------------------------
# worker basics + every tiny model
# ----------------------------------------------------------------------------------------
def test_worker_starts(worker):
    info = worker.info()
    assert info["wheel_version"] == _loader.PINNED_VERSION
    assert info["llama_version"]
    assert worker.ping(1, "x") == (1, "x")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_tiny_model_loads_and_decodes(worker, built, name):
    lay = tinymodels.layout(name)
    m = worker.model(built[name])
    assert m.arch == lay["arch"]
    assert m.n_layer == lay["n_layer"]
    assert m.n_vocab == lay["n_vocab"] == 128
    assert m.n_embd == lay["n_embd"]
    assert m.is_recurrent == (lay["memory"] == "recurrent")
    assert m.is_hybrid == (lay["memory"] in ("hybrid", "hybrid_iswa"))
    assert m.n_swa == lay["n_swa"]
    assert m.n_head_kv == lay["n_head_kv"][0]  # llama.cpp reports layer 0
    assert m.rope_type == lay["rope_type"]

    with worker.context(m, n_ctx=256, n_seq_max=2, kv_unified=True, flash_attn=False,
                        swa_full=True) as c:
        assert c.decode([(t, i, [0]) for i, t in enumerate((1, 7, 3, 9))]) == 0
        lg = c.logits(-1)
        assert lg is not None and lg.shape == (128,) and all(map(lambda x: x == x, lg))
        last = 3
        assert c.pos_max(0) == last
        assert c.pos_min(0) == (last if lay["recurrent_layers"] else 0)  # hybrid: max of parts
        assert c.pos_max(1) == -1
        whole = c.state_get()
        seq = c.state_seq_get(0)
        assert len(whole) > 0 and len(seq) > 0
        assert c.state_get_size() == len(whole)
        assert struct.unpack_from("<I", seq)[0] == 0xAF143CD8

        # the recorded layout facts match what llama.cpp serializes
        secs = parse_whole(whole, lay)
        kv_secs = [s["streams"] for s in secs if "streams" in s]
        for streams, layers in zip(kv_secs, _expected_kv_layers(lay)):
            assert len(streams) == 1  # unified
            st = streams[0]
            assert [p for p, _ in st["cells"]] == [0, 1, 2, 3]
            assert st["v_trans"] == 1  # no flash attention
            assert st["k_rot"] == 0 and st["v_rot"] == 0  # F16
            assert [row for _, row in st["k"]] == [2 * lay["n_embd_k_gqa"][il] for il in layers]
            assert [el * ne for _, el, ne in st["v"]] == [2 * lay["n_embd_v_gqa"][il] for il in layers]
        assert len(kv_secs) == len(_expected_kv_layers(lay))
        recs = [s for s in secs if "streams" not in s]
        if lay["recurrent_layers"]:
            (rec,) = recs
            assert rec["n_layer"] == lay["n_layer"]
            assert [pos for pos, _ in rec["cells"]] == [3]
            assert {row for _, row in rec["r"]} == {lay["r_row_bytes"]}
            assert {row for _, row in rec["s"]} == {lay["s_row_bytes"]}
        else:
            assert not recs


def test_decode_null_pos_and_explicit_logits(worker, built):
    with worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=True,
                        flash_attn=False) as c:
        assert c.decode([(1, 0, [0]), (2, 1, [0])], logits=[True, False]) == 0
        assert c.logits(0) is not None
        assert c.logits(1) is None  # not an output
        # NULL pos array: llama.cpp continues the seq at pos_max + 1
        assert c.decode([(3, None, [0]), (4, None, [0])]) == 0
        assert c.positions([0, 1]) == {0: (0, 3), 1: (-1, -1)}
        # NULL pos and NULL seq_id arrays: seq 0, next position
        assert c.decode([(3, None, None)]) == 0
        assert c.pos_max(0) == 4
        assert c.seq_rm(0, 4, -1)
        # a gap is rejected by batch validation
        assert c.decode([(5, 9, [0])]) == -1
        res = c.many([("seq_rm", 0, 2, -1), ("pos_max", 0), ("seq_cp", 0, 1), ("pos_max", 1)])
        assert res == [True, 1, None, 1]


def test_state_files_roundtrip(worker, built, tmp_path):
    with worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=True,
                        flash_attn=False) as c:
        assert c.decode_seq(0, [5, 6, 7]) == 0
        whole, seq = c.state_get(), c.state_seq_get(0)
        f1, f2 = tmp_path / "s.ggsn", tmp_path / "s.ggsq"
        assert c.state_save_file(f1, [5, 6, 7])
        assert c.state_seq_save_file(f2, 0, [5, 6, 7]) > 0
    with worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=True,
                        flash_attn=False) as d:
        assert d.state_load_file(f1) == (True, [5, 6, 7])
        assert d.state_get() == whole
        ok, toks, n = d.state_load_file(f1, capacity=1, with_count=True)
        assert not ok  # capacity too small
        f3 = tmp_path / "notok.ggsn"
        assert d.state_save_file(f3, [])
        assert d.state_load_file(f3, tokens_out=False, capacity=0) == (True, None)  # NULL tokens_out
        assert d.state_get() == whole
        d.clear()
        nread, toks = d.state_seq_load_file(f2, 1)
        assert nread > 0 and toks == [5, 6, 7]
        assert d.positions([0, 1]) == {0: (-1, -1), 1: (0, 2)}
        assert d.state_seq_set(seq, 0) == len(seq)
        assert d.state_set(b"\x00" * 8) == 0  # rejected, not a crash


def test_null_tokens_out_with_tokens_crashes_llama_cpp(worker, built, tmp_path):
    """b11739 reads the stored tokens into tokens_out without a NULL check (SIGSEGV)."""
    with worker.context(built["llama"], n_ctx=256, n_seq_max=2) as c:
        assert c.decode_seq(0, [5, 6, 7]) == 0
        assert c.state_save_file(tmp_path / "t.ggsn", [5, 6, 7])
        with pytest.raises(OracleCrashed) as ei:
            c.state_load_file(tmp_path / "t.ggsn", tokens_out=False, capacity=16)
        assert ei.value.signal == signal.SIGSEGV


def test_remote_exceptions_keep_their_type(worker, built):
    with worker.context(built["llama"], n_ctx=256) as c:
        with pytest.raises(ValueError, match="pos must be None"):
            c.decode([(1, None, [0]), (2, 1, [0])])
        assert c.n_ctx() == 256
    with pytest.raises(TypeError, match="unknown llama_context_params field"):
        worker.context(built["llama"], bogus=1)


def test_context_defaults_are_llama_cpp_defaults(worker, built):
    d = worker.info()["context_default_params"]
    with worker.context(built["llama"]) as c:
        p = c.params
        for k in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "kv_unified", "swa_full",
                  "flash_attn_type", "type_k", "type_v", "n_rs_seq"):
            assert p[k] == d[k], k
        assert p["n_threads"] == 1


# ----------------------------------------------------------------------------------------
# crashes, restarts, timeouts
# ----------------------------------------------------------------------------------------
def test_worker_survives_ggml_assert_partial_cross_stream_seq_cp(worker, built):
    c = worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=False, flash_attn=False)
    assert c.decode([(1, 0, [0]), (2, 1, [0]), (3, 0, [1])]) == 0
    gen = worker.generation
    with pytest.raises(OracleCrashed) as ei:
        c.seq_cp(0, 1, 0, 1)  # partial copy across streams: GGML_ASSERT -> SIGABRT
    e = ei.value
    assert e.signal == signal.SIGABRT and e.signal_name == "SIGABRT"
    assert "seq_cp() is only supported for full KV buffers" in e.stderr_tail
    assert worker.generation == gen + 1
    with pytest.raises(StaleHandleError):
        c.pos_max(0)
    # works again on the next call
    with worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=False) as c2:
        assert c2.decode_seq(0, [1, 2]) == 0
        assert c2.pos_max(0) == 1


def test_worker_survives_seq_rm_invalid_seq(worker, built):
    c = worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=True, flash_attn=False)
    assert c.decode_seq(0, [1, 2]) == 0
    with pytest.raises(OracleCrashed) as ei:
        c.seq_rm(-2, 0, -1)
    assert ei.value.signal == signal.SIGABRT
    assert "GGML_ASSERT" in ei.value.stderr_tail
    assert worker.ping("again") == ("again",)


def test_worker_survives_sigfpe(worker, built):
    with worker.context(built["llama"], n_ctx=256, n_seq_max=2, kv_unified=True) as c:
        assert c.decode_seq(0, [1, 2, 3]) == 0
        with pytest.raises(OracleCrashed) as ei:
            c.seq_div(0, 0, -1, 0)  # integer division by zero inside llama.cpp
    assert ei.value.signal == signal.SIGFPE
    assert worker.ping() == ()


def test_worker_survives_segfault_and_exit(worker):
    with pytest.raises(OracleCrashed) as ei:
        worker.call("debug_crash", int(signal.SIGSEGV))
    assert ei.value.signal_name == "SIGSEGV"
    with pytest.raises(OracleCrashed) as ei:
        worker.call("debug_exit", 7)
    assert ei.value.returncode == 7 and ei.value.signal is None
    assert worker.ping() == ()


def test_worker_timeout(worker):
    with pytest.raises(OracleTimeout):
        worker.call("debug_sleep", 30, timeout=0.5)
    assert worker.ping(2) == (2,)


def test_round_trip_is_fast(worker, built):
    worker.ping()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        worker.ping()
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 0.005, f"ping round trip {per_call * 1e6:.0f} us"


# ----------------------------------------------------------------------------------------
# tiny models: determinism and caching
# ----------------------------------------------------------------------------------------
def _md5(p: str) -> str:
    return hashlib.md5(Path(p).read_bytes()).hexdigest()


def test_models_are_deterministic(worker, built, tmp_path):
    worker.restart()  # a different process must produce the same bytes
    for n in ALL_MODELS:
        again = worker.build_model(n, tmp_path)
        assert _md5(again) == _md5(built[n]), n


def test_ensure_models_caches(worker, tmp_path):
    names = ["llama", "mamba"]
    p1 = worker.ensure_models(names, cache_dir=tmp_path)
    assert set(p1) == set(names)
    mt = {n: os.stat(p).st_mtime_ns for n, p in p1.items()}
    p2 = worker.ensure_models(names, cache_dir=tmp_path)
    assert p1 == p2
    assert {n: os.stat(p).st_mtime_ns for n, p in p2.items()} == mt
    assert all(tinymodels.spec_hash(n) in Path(p).name for n, p in p1.items())
    assert len(list(tmp_path.iterdir())) == 2  # no temporary leftovers


def test_spec_hashes_distinct():
    hashes = {tinymodels.spec_hash(n) for n in ALL_MODELS}
    assert len(hashes) == len(ALL_MODELS)


# ----------------------------------------------------------------------------------------
# loader: never touches the installed package; concurrent first use is safe
# ----------------------------------------------------------------------------------------
def _snapshot(d: Path) -> Dict[str, Tuple[int, int, str]]:
    out = {}
    for p in sorted(d.rglob("*")):
        if "__pycache__" in p.parts or not p.is_file():
            continue
        out[str(p.relative_to(d))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                      hashlib.sha256(p.read_bytes()).hexdigest())
    return out


_LOAD_SNIPPET = ("from pymem.llama import _loader; ffi, lib, g = _loader.load(); "
                 "print(_loader.loaded_package_dir()); "
                 "print(ffi.string(lib.llama_version()).decode())")


def _run_loader(cache: Path) -> subprocess.Popen:
    env = dict(os.environ, PYMEM_CACHE_DIR=str(cache))
    # cwd outside the source tree: `python -c` puts the cwd first on sys.path
    return subprocess.Popen([sys.executable, "-c", _LOAD_SNIPPET], env=env, text=True, cwd=str(cache.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_loader_never_modifies_installed_package_and_is_race_safe(tmp_path):
    installed = _loader.installed_package_dir()
    before = _snapshot(installed)
    cache = tmp_path / "cache"
    procs = [_run_loader(cache) for _ in range(3)]  # concurrent first use
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert _snapshot(installed) == before
    dirs = {o.splitlines()[0] for o, _ in outs}
    assert len(dirs) == 1
    if _loader.needs_glibc_compat():
        loaded = Path(dirs.pop())
        assert cache in loaded.parents and loaded.parent.parent == cache
        entries = [p.name for p in cache.iterdir()]
        assert len(entries) == 1 and not entries[0].startswith("."), entries  # no temp leftovers
        assert (loaded.parent / "libisoc23_shim.so").exists()
        # the installed libraries are still unloadable as such: only the copy is patched
        assert _snapshot(installed) == before
    else:
        assert Path(dirs.pop()) == installed


def test_loader_unavailable_message(tmp_path):
    env = dict(os.environ)
    code = ("import importlib.util, sys; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'llama_cpp_py_sync' else real(n, *a)\n"
            "from pymem.llama import _loader\n"
            "try:\n    _loader.load()\nexcept _loader.OracleUnavailable as e:\n"
            "    assert isinstance(e, RuntimeError); print('UNAVAILABLE', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "UNAVAILABLE" in out.stdout and "llama-cpp-py-sync==0.11739" in out.stdout
