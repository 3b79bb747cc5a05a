"""The ``pymem`` console script: inspect, diff, edit, estimate, demo.  Most runs call
``pymem.cli.main`` in-process; a few run the installed script to check exit codes, stderr
and that a user mistake never prints a traceback."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

import pymem
from pymem import cli, state
from conftest import LCP
from pymem.state import Session, SeqState
from conftest import ORACLE
from test_state import filled, meta  # noqa: F401  (fixture)

PYMEM = shutil.which("pymem") or os.path.join(os.path.dirname(sys.executable), "pymem")


@pytest.fixture
def files(meta, tmp_path):  # noqa: F811
    out = {}
    for name in ("llama", "gemma2", "mamba", "jamba", "lfm2_swa"):
        mem = filled(meta[name])
        p = tmp_path / f"{name}.session"
        Session.from_memory(mem, list(range(16))).save(p)
        out[name] = str(p)
        q = tmp_path / f"{name}.ggsq"
        SeqState.from_memory(mem, 1, [1, 2]).save(q)
        out[name + ".seq"] = str(q)
        b = tmp_path / f"{name}.bin"
        b.write_bytes(mem.state_write(envelope="llama"))
        out[name + ".bin"] = str(b)
    return out


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_inspect(capsys, files, meta):  # noqa: F811
    rc, out, err = run(capsys, "inspect", files["llama"])
    assert rc == 0 and err == ""
    assert "session file: ggsn v11" in out and "architecture: llama" in out
    assert "seq   1 |" in out and "shared  |" in out and "K type" in out
    rc, out, _ = run(capsys, "inspect", files["lfm2_swa"], "--model", meta["lfm2_swa"])
    assert rc == 0 and "[hybrid_iswa]" in out and "recurrent, 2 layers with state" in out
    rc, out, _ = run(capsys, "inspect", files["jamba.seq"], "--json")
    d = json.loads(out)
    assert d["type"] == "sequence state file" and d["seq_id"] == 1 and d["tokens"] == [1, 2]
    assert d["memory"]["sections"][0]["streams"][0]["cell_list"]
    rc, out, _ = run(capsys, "inspect", files["gemma2.bin"], "--json", "--no-cells")
    d = json.loads(out)
    assert d["envelope"] == "context" and d["memory"]["layout"].startswith("KV + KV [iswa]")
    assert d["memory"]["sections"][0]["streams"][0]["cell_list_omitted"]
    rc, out, _ = run(capsys, "inspect", files["mamba"], "--no-cells")
    assert rc == 0 and "seq   0 |" not in out


def test_diff(capsys, files, tmp_path, meta):  # noqa: F811
    rc, out, _ = run(capsys, "diff", files["llama"], files["llama"])
    assert rc == 0 and "identical" in out
    e = tmp_path / "e.session"
    assert run(capsys, "edit", files["llama"], "--seq-rm", "0:4:8", "-o", e)[0] == 0
    rc, out, _ = run(capsys, "diff", files["llama"], e, "--model", meta["llama"])
    assert rc == 1
    assert "first difference: section 1 (kv: KV cache), stream 0, cell 4: pos 4 seqs [0, 1] vs pos 4 seqs [1]" in out
    assert "summary: cells" in out
    rc, out, _ = run(capsys, "diff", files["llama"], files["gemma2"], "--json")
    d = json.loads(out)
    assert rc == 1 and not d["same"] and "arch llama vs gemma2" in d["first"]
    rc, _, err = run(capsys, "diff", files["llama"], tmp_path / "missing")
    assert rc == 2 and "pymem diff: error:" in err and "no such file" in err
    # the same contents in another cell order
    sess = Session.load(files["llama"])
    mem = sess.to_memory()
    mem.seq_rm(2)   # free cells: a whole restore repacks the rest
    a, b = tmp_path / "a.session", tmp_path / "b.session"
    Session.from_memory(mem, sess.tokens).save(a)
    mem.state_read(mem.state_write())
    Session.from_memory(mem, sess.tokens).save(b)
    assert run(capsys, "diff", a, b)[0] == 0


def test_edit(capsys, files, tmp_path, meta):  # noqa: F811
    out = tmp_path / "o.session"
    rc, so, se = run(capsys, "edit", files["llama"], "--seq-mv", "1:3", "--seq-keep", "3", "-o", out)
    assert rc == 0 and "structure path" in so and "-> 3:0..19" in so
    assert se.startswith("pymem edit: warning: tokens not updated") and "several sequences (0, 1, 2)" in se
    assert set(Session.load(out).sequences()) == {3}
    rc, so, _ = run(capsys, "edit", files["llama"], "--seq-keep", "3", "--seq-mv", "1:3", "-o", out)
    assert rc == 0 and "(empty)" in so.splitlines()[-2]          # order matters: nothing left
    rc, so, _ = run(capsys, "edit", files["llama"], "-m", meta["llama"], "--seq-rm", "0:4:8",
                    "--seq-add", "0:8::-4", "--truncate", "12", "-o", out)
    assert rc == 0 and "model path" in so and "tokens: 16 -> 12" in so and "K-shift" in so
    assert Session.load(out).tokens == list(range(12))
    # in place
    cp = tmp_path / "inplace.session"
    shutil.copy(files["llama"], cp)
    assert run(capsys, "edit", cp, "--seq-rm", "2", "-o", cp, "-q") == (0, "", "")
    assert 2 not in Session.load(cp).sequences()
    # sequence files and blobs
    q = tmp_path / "q.ggsq"
    assert run(capsys, "edit", files["jamba.seq"], "--seq-mv", "1:0", "-o", q)[0] == 0
    assert SeqState.load(q).seq_id == 0
    assert run(capsys, "edit", files["gemma2.bin"], "--seq-cp", "0:3", "-o", tmp_path / "b.bin")[0] == 0
    # versions
    v = tmp_path / "v10.session"
    assert run(capsys, "edit", files["llama"], "--set-version", "10", "-o", v)[0] == 0
    assert Session.load(v).version == 10


def test_edit_failures_leave_no_output(capsys, files, tmp_path, meta):  # noqa: F811
    out = tmp_path / "o.session"
    out.write_bytes(b"keep me")
    before = sorted(os.listdir(tmp_path))
    cases = [
        (["edit", files["mamba"], "--truncate", "3", "-o", out], "refused: a recurrent state cannot lose"),
        (["edit", files["jamba"], "--seq-add", "0:0:-1:2", "-o", out], "needs the model"),
        (["edit", files["llama"], "--seq-cp", "0:300", "-o", out], "256"),
        (["edit", files["llama"], "--truncate", "99", "-o", out], "only 16 tokens"),
        (["edit", files["llama"], "-m", meta["gemma2"], "--seq-rm", "1", "-o", out], "wrong model arch"),
        (["edit", files["llama"], "-m", tmp_path / "nope.gguf", "--seq-rm", "1", "-o", out], "model file not found"),
        (["edit", files["jamba.seq"], "--seq-cp", "1:2", "-o", out], "holds one sequence"),
    ]
    for argv, msg in cases:
        rc, so, se = run(capsys, *argv)
        assert rc == 1 and msg in se, (argv, se)
        assert se.startswith("pymem edit: error:") and "Traceback" not in se
        assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == before   # no temporary files left behind
    rc, _, se = run(capsys, "edit", files["llama"], "-o", out)
    assert rc == 2 and "nothing to do" in se
    with pytest.raises(SystemExit) as ei:
        cli.main(["edit", files["llama"], "--seq-add", "1:2", "-o", str(out)])
    assert ei.value.code == 2
    assert "S:P0:P1:DELTA" in capsys.readouterr().err


def test_bad_input(capsys, files, tmp_path):
    data = open(files["lfm2_swa"], "rb").read()
    for k in (0, 3, 9, 40, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"t{k}.session"
        p.write_bytes(data[:k])
        rc, so, se = run(capsys, "inspect", p)
        assert rc == 1 and "pymem inspect: error:" in se and "Traceback" not in se
        assert ("offset" in se or "empty" in se), se
        out = tmp_path / "never.session"
        assert run(capsys, "edit", p, "--seq-rm", "0", "-o", out)[0] == 1
        assert not out.exists()
    p = tmp_path / "flip.session"
    raw = bytearray(data)
    raw[12 + 16 * 4 + 4 + 1] ^= 0xFF   # inside the architecture name
    p.write_bytes(bytes(raw))
    rc, _, se = run(capsys, "inspect", p)
    assert rc == 1 and "architecture name" in se


def test_estimate(capsys, meta):  # noqa: F811
    rc, out, _ = run(capsys, "estimate", meta["gemma2"], "--n-ctx", "4096", "--n-seq-max", "2")
    assert rc == 0 and "iswa memory" in out and "base" in out and "swa" in out and "total" in out
    e = pymem.estimate(meta["gemma2"], 4096, n_seq_max=2)
    assert f"({e.total} bytes)" in out
    rc, out, _ = run(capsys, "estimate", meta["jamba"], "--n-ctx", "1000", "--no-unified", "--n-seq-max", "3",
                     "--json")
    d = json.loads(out)
    assert d["kind"] == "hybrid" and d["n_stream"] == 3 and d["total"] == pymem.estimate(
        meta["jamba"], 1000, n_seq_max=3, unified=False).total
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--budget", "8MiB", "--json")
    d = json.loads(out)
    assert d["max_n_ctx"] == pymem.max_context(meta["llama"], 8 << 20)
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--budget", "1KB")
    assert rc == 0 and "not even 256 cells" in out
    with pytest.raises(SystemExit):
        cli.main(["estimate", meta["llama"], "--budget", "lots"])
    rc, _, se = run(capsys, "estimate", "/nonexistent.gguf")
    assert rc == 1 and "model file not found" in se


def test_progress_bar(capsys, files, tmp_path):
    rc, _, err = run(capsys, "inspect", files["jamba"], "--progress")
    assert rc == 0 and "reading jamba.session:" in err and "100%" in err
    rc, _, err = run(capsys, "edit", files["jamba"], "--seq-keep", "1", "--progress", "-o", tmp_path / "x",
                     "-q")
    assert rc == 0 and "writing x:" in err
    from pymem import _progress

    out = io.StringIO()
    bar = _progress.Bar("t", force=True, stream=out)   # tqdm (issue 14: no hand-written bar)
    for d in (0, 50, 100):
        bar(d, 100)
    bar.close()
    assert "t: 100%" in out.getvalue() and not hasattr(cli, "_Bar")
    assert _progress.bar("t", None) is None          # stderr is not a terminal here


def test_script(files, tmp_path):
    """The installed console script: help with examples, errors without tracebacks."""
    r = subprocess.run([PYMEM, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout and "pymem edit" in r.stdout
    for sub in ("inspect", "diff", "edit", "estimate", "demo"):
        r = subprocess.run([PYMEM, sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, sub
    r = subprocess.run([PYMEM, "edit", "--help"], capture_output=True, text=True)
    assert "--seq-rm S[:P0:P1]" in r.stdout and "--seq-div S:P0:P1:D" in r.stdout and "examples:" in r.stdout
    r = subprocess.run([PYMEM], capture_output=True, text=True)
    assert r.returncode == 2
    bad = tmp_path / "bad.session"
    bad.write_bytes(b"nsgg\x0b\x00\x00\x00\xff\xff\xff\x00")
    for argv in ([PYMEM, "inspect", str(bad)], [sys.executable, "-m", "pymem", "inspect", str(tmp_path / "no")],
                 [PYMEM, "diff", files["llama"], str(bad)]):
        r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)  # not the source tree
        assert r.returncode in (1, 2) and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([PYMEM, "inspect", files["llama.seq"]], capture_output=True, text=True)
    assert r.returncode == 0 and "sequence state file: ggsq v4" in r.stdout


@pytest.mark.oracle
@pytest.mark.skipif(not ORACLE, reason="llama-cpp-py-sync==0.11739 is not installed")
def test_demo():
    r = subprocess.run([PYMEM, "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n = 120 if LCP else 60      # one round per installed build (llama-cpp-python 0.3.36 adds one)
    assert f"{n}/{n} steps byte-identical" in r.stdout
    assert ("llama.cpp 0c1e570 (llama-cpp-python 0.3.36, format 10)" in r.stdout) == LCP
    for name in ("llama (kv)", "gemma2 (iswa)", "mamba (recurrent)", "jamba (hybrid)", "lfm2_swa (hybrid_iswa)"):
        assert name in r.stdout
    assert "session checks passed" in r.stdout and "MISMATCH" not in r.stdout


@pytest.mark.oracle
@pytest.mark.skipif(not ORACLE, reason="llama-cpp-py-sync==0.11739 is not installed")
def test_demo_fails_on_mismatch(capsys, monkeypatch):
    from pymem._oracle import verify

    real = verify.check_session_edit

    def broken(*a, **kw):
        r = real(*a, **kw)
        r.next_state_equal = False
        return r

    monkeypatch.setattr(verify, "check_session_edit", broken)
    assert cli.main(["demo"]) == 1
    out = capsys.readouterr().out
    n = 120 if LCP else 60
    assert "MISMATCH" in out and f"{n}/{n} steps byte-identical" in out
