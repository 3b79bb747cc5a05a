"""Hardening, round 2 (issue 15): what an adversarial user of the public Python API and the CLI
could do, by class of bug.

* odd file types: outputs through symbolic links, FIFOs and devices as outputs, pipes, FIFOs
  and standard input as inputs, empty file names;
* object lifetimes across close / copy / pickle (crashes run in a child process, which must
  exit normally);
* ubatches of another memory, or of a closed one;
* argument ranges: integers that do not fit a C type are InvalidArgumentError naming the
  argument;
* resource bounds of the parsers (time and memory linear in the input, under resource limits);
* malformed GGUF files and CLI numbers: a pymem error naming the file / option.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import pymem
from pymem import cli, state
from pymem.state import Session

from test_hardening import filled

TESTS = Path(__file__).resolve().parent


def run_child(code: str, timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (tests/ importable); a crash shows as a signal exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=TESTS, **kw)


@pytest.fixture
def session_file(tmp_path):
    m = filled("kv", seed=3)
    p = tmp_path / "in.session"
    Session.from_memory(m, [1, 2, 3]).save(p)
    return p


# =============================================================================================
# odd file types (issue 15 items 8, 9, 17)
# =============================================================================================
class TestOddFiles:
    def test_edit_output_through_symlink_writes_target(self, tmp_path, session_file):
        target = tmp_path / "real.session"
        target.write_bytes(b"old")
        os.chmod(target, 0o600)
        link = tmp_path / "link.session"
        link.symlink_to(target.name)
        assert cli.main(["edit", str(session_file), "--seq-keep", "1", "-o", str(link), "-q"]) == 0
        assert link.is_symlink() and os.readlink(link) == target.name       # the link is kept
        assert Session.load(target).sequences().keys() == {1}               # its target was written
        assert stat.S_IMODE(target.stat().st_mode) == 0o600                 # with its mode kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.session", "link.session", "real.session"]

    def test_save_through_dangling_symlink_creates_target(self, tmp_path, session_file):
        link = tmp_path / "link.session"
        link.symlink_to("sub-target.session")
        Session.load(session_file).save(link)
        assert link.is_symlink() and (tmp_path / "sub-target.session").read_bytes() == session_file.read_bytes()

    def test_fifo_output_refused(self, tmp_path, session_file, capsys):
        fifo = tmp_path / "out.fifo"
        os.mkfifo(fifo)
        assert cli.main(["edit", str(session_file), "--seq-keep", "1", "-o", str(fifo), "-q"]) == 1
        assert "FIFO" in capsys.readouterr().err
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)                          # not replaced
        with pytest.raises(pymem.StateFileError, match="FIFO"):
            Session.load(session_file).save(fifo)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    def test_device_output_refused(self, tmp_path, session_file):
        # a node of our own (never /dev/null itself: a regression as root would replace it)
        dev = tmp_path / "null"
        try:
            os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("mknod needs root")
        with pytest.raises(pymem.StateFileError, match="character device"):
            Session.load(session_file).save(dev)
        assert stat.S_ISCHR(os.lstat(dev).st_mode)

    def test_empty_output_name(self, session_file, capsys):
        assert cli.main(["edit", str(session_file), "--seq-keep", "1", "-o", "", "-q"]) == 2
        assert "empty" in capsys.readouterr().err
        with pytest.raises(pymem.StateFileError, match="empty"):
            Session.load(session_file).save("")

    def test_stdin_dash_and_dev_stdin(self, session_file):
        want = Session.load(session_file).sequences()
        for name in ("-", "/dev/stdin"):
            with open(session_file, "rb") as f:      # a pipe, not a file, on stdin
                r = subprocess.run([sys.executable, "-m", "pymem", "inspect", name, "--json"],
                                   input=f.read(), capture_output=True, timeout=60, cwd=TESTS)
            assert r.returncode == 0, r.stderr
            assert b'"sequences"' in r.stdout and b"empty (0 bytes)" not in r.stderr
        r = subprocess.run([sys.executable, "-m", "pymem", "inspect", "/dev/stdin"], stdin=open(session_file, "rb"),
                           capture_output=True, timeout=60, cwd=TESTS)
        assert r.returncode == 0, r.stderr
        assert want

    def test_pipe_and_fifo_inputs(self, tmp_path, session_file):
        data = session_file.read_bytes()
        want = Session.load(session_file)
        r, w = os.pipe()
        t = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
        t.start()
        try:
            got = Session.load(f"/proc/self/fd/{r}")
        finally:
            t.join()
            os.close(r)
        assert got.dump() == want.dump()
        fifo = tmp_path / "in.fifo"
        os.mkfifo(fifo)

        def writer():
            with open(fifo, "wb") as f:
                for i in range(0, len(data), 1000):      # in pieces, as a slow producer would
                    f.write(data[i:i + 1000])
                    f.flush()

        t = threading.Thread(target=writer)
        t.start()
        try:
            got = state.load(fifo)
        finally:
            t.join()
        assert got.dump() == want.dump()
