"""The conformance kit (pymem.conformance, `pymem conformance`): the shipped vectors of every
memory type, recorded from llama.cpp b11739 and 0c1e570, replayed against each installed build
and pymem side by side; recording is deterministic and refuses what pymem cannot replay."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from conftest import LCP, needs_oracle
from pymem import conformance as K

MEMORY_TYPES = {"kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"}


def test_shipped_vectors_parse():
    vs = K.load_vectors()
    by = {}
    for v in vs:
        by.setdefault(v.params["recorded_by"], []).append(v)
    assert set(by) == {"b11739", "0c1e570"}
    for tag, fmt in (("b11739", "11"), ("0c1e570", "10")):
        assert {v.memory for v in by[tag]} == MEMORY_TYPES
        assert all(v.params["format"] == fmt for v in by[tag])
        assert [v.name for v in by[tag]] == [s.name for s in K.SCENARIOS]
        # flash attention on and off, unified and per-sequence streams, a quantized cache,
        # iSWA with swa_full on and off, rollback snapshots
        ps = [v.params for v in by[tag]]
        assert {p["flash_attn"] for p in ps} == {"0", "1"} and {p["kv_unified"] for p in ps} == {"0", "1"}
        assert any(p["type_k"] == "q8_0" for p in ps) and any(p.get("n_rs_seq", "0") != "0" for p in ps)
        assert {p["swa_full"] for p in ps if p["memory"] == "iswa"} == {"0", "1"}


def test_reader_rejects_bad_lines(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("[case a]\nkind = live\nbogus = 1\n")
    with pytest.raises(ValueError, match="v.txt:3: unknown key 'bogus'"):
        K.load_vectors([f])
    f.write_text("[case a]\nexpect_whole = hex:00\n")
    with pytest.raises(ValueError, match="before the first step"):
        K.load_vectors([f])


def test_locate_names_the_field():
    from pymem.state import Layout

    lay = Layout.of_kind("kv")
    v = K.load_vectors()[0]
    fmt = int(v.params["format"])
    blob = bytes.fromhex(next(x for k, x in v.steps[0][1] if k == "expect_whole")[4:])
    assert K.locate(blob, blob, False, lay, fmt) == "identical"
    arch_len = int.from_bytes(blob[:4], "little")
    i = 4 + arch_len + 4 + 4 + 4      # n_stream, cell_count, first cell's pos
    bad = blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:]
    assert "stream 0 cell 0 n_seq_id" in K.locate(blob, bad, False, lay, fmt)
    k_rows = next(a for a, b, lab in K._regions(blob, False, lay, fmt) if lab.endswith("layer 1 K rows"))
    bad = blob[:k_rows + 5] + bytes([blob[k_rows + 5] ^ 1]) + blob[k_rows + 6:]
    assert "layer 1 K rows (+5)" in K.locate(blob, bad, False, lay, fmt)


def _check_rows(rows, own):
    assert len(rows) == 2 * len(K.SCENARIOS)
    for r in rows:
        assert r.pymem == "identical", (r.vector, r.pymem)
        if r.recorded_by == own:
            assert r.build == "identical", (r.vector, r.build)
        else:   # the other build: only the known, named kinds of difference
            assert r.build != "identical" and "OTHER" not in r.build, (r.vector, r.build)
            kv_words = "format words (k_rot/v_rot)" in r.build or "Hadamard" in r.build
            assert kv_words == (r.memory != "recurrent"), (r.vector, r.build)
            assert ("PARTIAL_ONLY of a plain KV cache" in r.build) == (r.memory == "kv"), (r.vector, r.build)


@needs_oracle
@pytest.mark.oracle
def test_conformance_py_sync():
    rows = K.run("py-sync")
    _check_rows(rows, "b11739")
    q8 = next(r for r in rows if r.recorded_by == "0c1e570" and r.vector == "kv_q8_0_hd64_fa")
    assert "Hadamard-rotated in b11739" in q8.build     # b11739 rotates a quantized K cache, 0c1e570 not


@needs_oracle
@pytest.mark.oracle
def test_conformance_lcp(lcp):
    _check_rows(K.run("llama-cpp-python"), "0c1e570")


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("llama,tag", [("py-sync", "b11739"), ("llama-cpp-python", "0c1e570")])
def test_record_is_deterministic(tmp_path, llama, tag):
    if llama == "llama-cpp-python" and not LCP:
        from conftest import _lcp_missing

        _lcp_missing()
    out = K.record(llama, tmp_path)
    shipped = K.VECTOR_DIR / f"{tag}.txt.gz"
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(shipped.read_bytes())


@needs_oracle
@pytest.mark.oracle
def test_record_refuses_what_pymem_cannot_replay(tmp_path, monkeypatch):
    from pymem.conformance import _runner

    real = _runner._observe

    def lying(m, side, n_seq, final):   # pymem's side reports a different position
        out = real(m, side, n_seq, final)
        return [(k, "0 0 999") if side == "pymem" and k == "expect_pos" and v.startswith("0 ") else (k, v)
                for k, v in out]

    monkeypatch.setattr(_runner, "_observe", lying)
    with pytest.raises(RuntimeError, match="nothing written"):
        K.record("py-sync", tmp_path, scenarios=K.SCENARIOS[:1])
    assert not list(tmp_path.iterdir())


@needs_oracle
@pytest.mark.oracle
def test_cli_conformance_json(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pymem", "conformance", "--json"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(rows) == 2 * len(K.SCENARIOS) and all(r["pymem_vs_build"] == "identical" for r in rows)
