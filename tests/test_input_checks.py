"""Input checks up front (issue 14, points 3 and 4 in part): a model of the same architecture
with other dimensions, a session cut right after its header, random bytes, negative or
malformed numbers, unknown cache types, the tiny-model builder's --help; estimate --budget
capped at the training context, recurrent-only memories that do not grow, and the flash
attention default of llama_context_default_params()."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import pymem
from pymem import cli, state
from pymem._oracle import tinymodels
from pymem.state import Session
from conftest import needs_oracle
from test_state import filled, meta  # noqa: F401  (fixture)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as ei:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Metadata-only models of the same architectures as llama / jamba with other dimensions."""
    d = tmp_path_factory.mktemp("other")
    out = {}
    for n in ("llama_hd64", "jamba_gqa"):
        p = d / f"{n}.gguf"
        tinymodels.write_metadata_gguf(p, tinymodels.spec(n))
        out[n] = str(p)
    return out


def test_model_of_other_dimensions(meta, other, tmp_path, capsys):  # noqa: F811
    for name, wrong in (("llama", "llama_hd64"), ("jamba", "jamba_gqa")):
        f = tmp_path / f"{name}.session"
        Session.from_memory(filled(meta[name]), list(range(16))).save(f)
        assert Session.load(f, model=meta[name]).tokens == list(range(16))   # its own model fits
        with pytest.raises(pymem.StateError, match="another model with the same architecture"):
            Session.load(f, model=other[wrong])
        rc, out, err = run(capsys, "inspect", f, "--model", other[wrong])
        assert rc == 1 and out == "" and "K is" in err and "the model's is" in err, err


def test_truncated_after_header_and_random_bytes(meta, tmp_path, capsys):  # noqa: F811
    s = Session.from_memory(filled(meta["llama"]), [1, 2, 3])
    data = s.dump()
    head = 12 + 4 * 3 + 4 + len(s.arch)
    cut = tmp_path / "cut.session"
    cut.write_bytes(data[:head])
    for m in (None, meta["llama"]):
        with pytest.raises(pymem.StateError, match="truncated"):
            state.load(cut, model=m)
    rc, out, err = run(capsys, "inspect", cut)
    assert rc == 1 and "truncated session file" in err and "right after its header" in err
    blob = tmp_path / "cut.bin"
    blob.write_bytes(s.context_blob()[:4 + len(s.arch)])
    with pytest.raises(pymem.StateError, match="truncated context blob"):
        state.load(blob)
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(3000))
    rc, out, err = run(capsys, "inspect", rnd)
    assert rc == 1 and err.startswith(f"pymem inspect: error: {rnd}: not a llama.cpp state file"), err


def test_clean_argument_errors(meta, capsys, tmp_path):  # noqa: F811
    err = usage_error(capsys, "estimate", meta["llama"], "--ctx", "-5")
    assert "--ctx: -5 is negative" in err
    err = usage_error(capsys, "estimate", meta["llama"], "--budget", "-1GB")
    assert "--budget: '-1GB' is negative" in err
    err = usage_error(capsys, "estimate", meta["llama"], "--type-k", "q9_9")
    assert "unknown cache type 'q9_9'; valid: f32, f16, bf16, q8_0" in err
    err = usage_error(capsys, "estimate", meta["llama"], "--parallel", "0")
    assert "must be 1 or more" in err
    f = tmp_path / "s.session"
    Session.from_memory(filled(meta["llama"]), [1]).save(f)
    rc, out, err = run(capsys, "inspect", f, "--layout", "kv+rec:abc")
    assert rc == 1 and err == ("pymem inspect: error: layout 'kv+rec:abc': the recurrent layer count 'abc' after ':' "
                               "is not a number of layers (e.g. kv+rec:2, hybrid:2)\n")
    with pytest.raises(pymem.InvalidArgumentError, match="format"):
        state.Layout.coerce("kv@x")
    r = subprocess.run([sys.executable, "-m", "pymem", "estimate", "--help"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert "K cache type" in r.stdout and "iq4_nl" in r.stdout


def test_tinymodels_help_builds_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pymem._oracle.tinymodels", "--help"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and "OUT_DIR" in r.stdout and os.listdir(tmp_path) == []
    r = subprocess.run([sys.executable, "-m", "pymem._oracle.tinymodels", str(tmp_path / "m"), "nosuch"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "unknown model" in r.stderr and not (tmp_path / "m").exists()


def test_budget_capped_and_recurrent(meta, capsys):  # noqa: F811
    hp = pymem.gguf.read_hparams(meta["llama"])
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--budget", "1GB", "--json")
    d = json.loads(out)
    assert d["max_n_ctx"] == hp.n_ctx_train and d["capped_at_n_ctx_train"] and d["fits_n_ctx"] > hp.n_ctx_train
    assert d["bytes"] == pymem.estimate(meta["llama"], hp.n_ctx_train).total and d["grows_with_context"]
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--budget", "1GB")
    assert f"{hp.n_ctx_train} = the model's training context" in out
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--budget", "100KB", "--json")
    assert json.loads(out)["capped_at_n_ctx_train"] is False
    rc, out, _ = run(capsys, "estimate", meta["mamba"], "--budget", "1GB", "--json")
    assert json.loads(out)["grows_with_context"] is False
    rc, out, _ = run(capsys, "estimate", meta["mamba"], "--budget", "1GB")
    assert "does not grow with n_ctx" in out and "fits at any n_ctx" in out
    rc, out, _ = run(capsys, "estimate", meta["mamba"], "--ctx", "4096")
    assert "does not grow with n_ctx" in out
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--ctx", "4096")
    assert "does not grow" not in out


@needs_oracle
@pytest.mark.oracle
def test_flash_attention_default_is_llama_cpps(oracle, models, capsys):
    """llama_context_default_params() leaves flash attention on auto, which is on for the CPU
    backend: its context writes V rows untransposed.  pymem estimate's default says the same."""
    c = oracle.context(models["llama"], n_ctx=256)          # llama.cpp's defaults
    assert c.decode([(1, 0, [0]), (2, 1, [0])]) == 0
    b = state.parse(c.state_get(), model=models["llama"])
    assert b.state.sections[0].streams[0].v_trans == 0
    rc, out, _ = run(capsys, "estimate", models["llama"], "--ctx", "256")
    assert "flash attention" in out and "V transposed" not in out
    rc, out, _ = run(capsys, "estimate", models["llama"], "--ctx", "256", "--flash-attn", "off")
    assert "V transposed" in out
