"""Edits llama.cpp can continue from (issue 14, point 1): the token list of a session file or a
llama-server slot file follows the cache when it maps to it; where it cannot it says so; edits
that change nothing say so (and fail with --strict); a shift of shared cells names the other
sequences; --dry-run writes nothing; in-place writes keep the file mode and the symlink.

The continuation tests run real llama.cpp: it saves the file, pymem edits it, llama.cpp loads
the edit and decodes the next token at n_past = len(tokens)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from pymem import cli
from pymem.state import SeqState, Session
from conftest import needs_oracle

TOKS = [(7 * i + 3) % 100 for i in range(24)]
# the README's context shift: drop positions 4..11, move 12.. back by 8
SHIFT = ["--seq-rm", "0:4:12", "--seq-add", "0:12::-8"]


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _ctx(oracle, models, name, **kw):
    return oracle.context(models[name], n_ctx=256, n_seq_max=4, kv_unified=True, flash_attn=False, **kw)


@needs_oracle
@pytest.mark.oracle
@pytest.mark.parametrize("name", ["llama", "gemma2", "jamba"])
def test_context_shift_continues_in_llama_cpp(oracle, models, tmp_path, capsys, name):
    """llama-cli's session: after the README's shift llama.cpp loads the file and decodes the next
    token at n_past = len(tokens) (with the old 24-token list it fails: Y = X + 1)."""
    c = _ctx(oracle, models, name)
    assert c.decode([(t, i, [0]) for i, t in enumerate(TOKS)]) == 0
    src = tmp_path / "chat.session"
    assert c.state_save_file(src, TOKS)
    out = tmp_path / "shifted.session"
    rc, text, err = run(capsys, "edit", src, "-m", models[name], *SHIFT, "-o", out)
    assert rc == 0 and err == "", err
    assert "tokens: 24 -> 16 (follow the cache)" in text
    s = Session.load(out, model=models[name])
    assert s.tokens == TOKS[:4] + TOKS[12:]
    d = _ctx(oracle, models, name)
    ok, toks = d.state_load_file(out)
    assert ok and toks == s.tokens
    assert d.pos_max(0) == len(toks) - 1
    assert d.decode([(5, len(toks), [0])]) == 0
    # a plain truncate keeps following, and a removal of everything empties the list
    rc, _, err = run(capsys, "edit", src, "--truncate", "10", "-o", out)
    if name == "jamba":   # a recurrent state cannot lose its last positions: llama.cpp refuses
        assert rc == 1 and "refused" in err
    else:
        assert rc == 0 and Session.load(out).tokens == TOKS[:10]
    rc, _, _ = run(capsys, "edit", src, "--seq-rm", "0", "-o", out)
    assert rc == 0 and Session.load(out).tokens == []


@needs_oracle
@pytest.mark.oracle
def test_slot_file_shift_continues_in_llama_cpp(oracle, models, tmp_path, capsys):
    """llama-server's --slot-save-path file (llama_state_seq_save_file of the slot's sequence)."""
    c = _ctx(oracle, models, "llama")
    assert c.decode([(t, i, [2]) for i, t in enumerate(TOKS)]) == 0
    src = tmp_path / "slot2.bin"
    assert c.state_seq_save_file(src, 2, TOKS)
    out = tmp_path / "slot2-shifted.bin"
    rc, _, err = run(capsys, "edit", src, "-m", models["llama"], "--seq-rm", "2:4:12", "--seq-add", "2:12::-8",
                     "-o", out)
    assert rc == 0 and err == "", err
    s = SeqState.load(out)
    assert s.tokens == TOKS[:4] + TOKS[12:]
    d = _ctx(oracle, models, "llama")
    n, toks = d.state_seq_load_file(out, 2)
    assert n > 0 and toks == s.tokens
    assert d.decode([(5, len(toks), [2])]) == 0


@needs_oracle
@pytest.mark.oracle
def test_tokens_that_cannot_follow_say_so(oracle, models, tmp_path, capsys):
    c = _ctx(oracle, models, "llama")
    assert c.decode([(t, i, [0]) for i, t in enumerate(TOKS)]) == 0
    src = tmp_path / "a.session"
    assert c.state_save_file(src, TOKS)
    out = tmp_path / "b.session"
    # a fork into sequence 1: two sequences, the list cannot follow
    rc, text, err = run(capsys, "edit", src, "--seq-cp", "0:1", "--seq-rm", "0:20:", "-o", out, "--json")
    assert rc == 0
    d = json.loads(text)
    assert d["tokens"]["mapped"] is False and "several sequences (0, 1)" in d["tokens"]["note"]
    assert "several sequences" in err and "warning" in err
    # a hole in the middle: no shift closes it
    rc, text, err = run(capsys, "edit", src, "--seq-rm", "0:4:12", "-o", out)
    assert rc == 0 and "holds positions 0..3, 12..23" in err
    assert Session.load(out).tokens == TOKS


@needs_oracle
@pytest.mark.oracle
def test_noop_shared_dry_run(oracle, models, tmp_path, capsys):
    c = _ctx(oracle, models, "llama")
    assert c.decode([(t, i, [0]) for i, t in enumerate(TOKS)]) == 0
    c.seq_cp(0, 1, 0, 8)
    src = tmp_path / "a.session"
    assert c.state_save_file(src, TOKS)
    out = tmp_path / "b.session"
    # absent sequence, empty range, nothing in the range
    for op in (["--seq-rm", "3"], ["--seq-rm", "0:9:9"], ["--seq-rm", "0:100:200"]):
        rc, _, err = run(capsys, "edit", src, *op, "-o", out)
        assert rc == 0 and "changed nothing" in err, (op, err)
        rc, _, err = run(capsys, "edit", src, *op, "-o", tmp_path / "strict.session", "--strict")
        assert rc == 1 and "--strict" in err and not (tmp_path / "strict.session").exists()
    rc, text, err = run(capsys, "edit", src, "--seq-rm", "3", "-o", out, "--json")
    d = json.loads(text)
    assert d["noop"][0].startswith("seq_rm(3, -1, -1) changed nothing: sequence 3 holds no cells")
    # a shift of cells shared with sequence 1 says so
    rc, text, err = run(capsys, "edit", src, "-m", models["llama"], "--seq-add", "0:4::2", "-o", out)
    assert rc == 0 and "moves 4 cells shared with sequence 1" in err
    # --dry-run: before/after, nothing written
    dry = tmp_path / "dry.session"
    rc, text, err = run(capsys, "edit", src, "--truncate", "6", "-o", dry, "--dry-run")
    assert rc == 0 and not dry.exists()
    assert "sequences: 0:0..23, 1:0..7 -> 0:0..5, 1:0..5" in text and "not written" in text
    rc, text, _ = run(capsys, "edit", src, "--truncate", "6", "-o", dry, "--dry-run", "--json")
    d = json.loads(text)
    assert d["written"] is False and d["before"]["sequences"] == {"0": [0, 23], "1": [0, 7]}
    assert d["after"]["sequences"] == {"0": [0, 5], "1": [0, 5]} and not dry.exists()


@needs_oracle
@pytest.mark.oracle
def test_in_place_keeps_mode_and_symlink(oracle, models, tmp_path, capsys):
    c = _ctx(oracle, models, "llama")
    assert c.decode([(t, i, [0]) for i, t in enumerate(TOKS)]) == 0
    real = tmp_path / "real.session"
    assert c.state_save_file(real, TOKS)
    os.chmod(real, 0o600)
    link = tmp_path / "link.session"
    link.symlink_to(real.name)
    rc, _, err = run(capsys, "edit", link, "--truncate", "20", "-o", link)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == real.name
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o600
    assert Session.load(real).tokens == TOKS[:20]
