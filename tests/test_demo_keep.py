"""``pymem demo --keep DIR`` (issue 14, point 2): the files it leaves are what llama.cpp saves,
every command the README's first screen and DIR/README.txt show runs on them, and the README's
context-shift edit continues in llama.cpp."""
from __future__ import annotations

import os
import re
import shlex

import pytest

from pymem import cli, state
from conftest import needs_oracle

pytestmark = [needs_oracle, pytest.mark.oracle]
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _commands(text: str, fenced: bool = True) -> list:
    """The ``pymem ...`` command lines (inside ``` blocks when ``fenced``)."""
    out = []
    inside = not fenced
    for line in text.splitlines():
        if fenced and line.startswith("```"):
            inside = not inside
            continue
        line = line.split("#", 1)[0].strip()
        if inside and line.startswith("pymem ") and "--keep" not in line:
            argv = shlex.split(line)[1:]
            out.append([a for a in argv if a not in ("[--dry-run]", "[--json]")])
    return out


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    d = tmp_path_factory.mktemp("kept") / "demo"
    assert cli.main(["demo", "--keep", str(d)]) == 0
    return d


def test_keep_leaves_llama_cpp_files(kept, oracle, models):
    names = set(os.listdir(kept))
    for n in ("model.gguf", "chat.session", "a.session", "b.session", "slot0.bin", "README.txt",
              "jamba.session", "gemma2.ctx.bin", "llama.seq1.bin", "mamba.gguf"):
        assert n in names, n
    s = state.load(kept / "chat.session")
    assert s.what == "session file" and len(s.tokens) == 24 and set(s.sequences()) == {0}
    assert state.load(kept / "slot0.bin").what == "sequence state file"
    assert state.load(kept / "gemma2.ctx.bin", model=kept / "gemma2.gguf").what == "context blob"
    assert state.load(kept / "llama.seq1.bin").what == "sequence blob"
    # llama.cpp loads what it saved, from the kept folder
    c = oracle.context(str(kept / "model.gguf"), n_ctx=256)
    assert c.state_load_file(kept / "chat.session") == (True, s.tokens)


def test_readme_commands_run_on_the_kept_files(kept, oracle, monkeypatch, capsys):
    monkeypatch.chdir(kept)
    with open(README) as f:
        readme = f.read()
    first = readme[:readme.index("## Usage")]
    cmds = _commands(first) + _commands((kept / "README.txt").read_text(), fenced=False)
    assert len(cmds) >= 8
    for argv in cmds:
        rc = cli.main(argv)
        cap = capsys.readouterr()
        assert rc in ((0, 1) if argv[0] == "diff" else (0,)), (argv, cap.err)
        assert "error" not in cap.err, (argv, cap.err)
    # the README's shift: llama.cpp continues at n_past = len(tokens)
    s = state.load("shifted.session")
    assert len(s.tokens) == 16
    c = oracle.context(str(kept / "model.gguf"), n_ctx=256)
    ok, toks = c.state_load_file(kept / "shifted.session")
    assert ok and toks == s.tokens and c.decode([(1, len(toks), [0])]) == 0
    assert re.search(r"\| slot file", readme) and "LlamaState.llama_state" in first


def test_readme_state_example_runs_on_the_kept_files(kept, oracle, monkeypatch, capsys):
    """The README's pymem.state example, as written, on the kept files; its output file loads in
    llama.cpp, which continues at n_past = len(tokens)."""
    monkeypatch.chdir(kept)
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    code = next(b for b in blocks if "state.Session.load" in b)
    exec(compile(code, "README.md", "exec"), {})
    assert "24 -> 16" in capsys.readouterr().out
    c = oracle.context(str(kept / "model.gguf"), n_ctx=256)
    ok, toks = c.state_load_file(kept / "chat-shifted.session")
    assert ok and len(toks) == 16 and c.decode([(1, 16, [0])]) == 0


def test_keep_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"my real model")
    assert cli.main(["demo", "--keep", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "model.gguf").read_bytes() == b"my real model"
