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


# =============================================================================================
# object lifetimes across close / copy / pickle (issue 15 items 2, 3, 4)
# =============================================================================================
KINDS = ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"]


class TestLifetimes:
    @pytest.mark.parametrize("kind", KINDS)
    def test_copy_is_independent(self, kind):
        import copy

        m = filled(kind, seed=21)
        for clone in (copy.copy(m), copy.deepcopy(m)):
            assert type(clone) is type(m) and clone.state_write() == m.state_write()
            clone.seq_rm(0, -1, -1)
            assert clone.state_write() != m.state_write() and m.seq_pos_max(0) == 11
            clone.close()
            assert m.seq_pos_max(0) == 11 and m.state_write()        # the original still works
        m.close()

    @pytest.mark.parametrize("kind", KINDS)
    def test_pickle_goes_through_the_state(self, kind):
        import pickle

        m = filled(kind, seed=22)
        back = pickle.loads(pickle.dumps(m))
        assert type(back) is type(m) and back.state_write() == m.state_write()
        assert [p.layers for p in back.kv_parts()] == [p.layers for p in m.kv_parts()]
        back.close()
        assert m.state_write()

    def test_copy_refused_with_pending_update_or_closed(self):
        import copy
        import pickle

        m = filled("kv", seed=23)
        m.seq_add(0, 0, -1, 3)
        assert m.update_pending
        for f in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="update"):
                f(m)
        m.update()
        copy.copy(m).close()
        m.close()
        for f in (copy.copy, pickle.dumps):
            with pytest.raises(TypeError, match="closed"):
                f(m)

    def test_copy_close_then_use_original_in_child(self):
        """The crash of old main (the copy shared the native handle): a child process must
        exit normally."""
        r = run_child("""
            import copy, numpy as np
            from test_hardening import filled
            for kind in ("kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"):
                m = filled(kind, seed=1)
                k = m.kv_parts()[0].k(m.kv_parts()[0].layers[0]) if m.kv_parts() else None
                c = copy.copy(m)
                c.close()
                del c
                for _ in range(3):
                    m.decode(__import__("pymem").Batch(tokens=[1] * 64, pos=list(range(100, 164)), seq_ids=[[2]] * 64))
                    m.seq_rm(2)
                assert m.seq_pos_max(0) == 11
                if k is not None:
                    k[...] = 1.0
                m.close()
            print("ok")
        """)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])

    def test_kq_mask_of_another_memorys_ubatch(self):
        r = run_child("""
            import pymem
            from test_hardening import filled
            a, b = filled("kv", seed=2), filled("kv", seed=3)
            ctx = b.init_batch(pymem.Batch(tokens=[1, 2], pos=[12, 13]))
            ctx[0].apply()
            a.kq_mask(ctx[0])
        """)
        assert r.returncode == 1 and "InvalidArgumentError" in r.stderr and "another memory" in r.stderr, \
            (r.returncode, r.stderr[-2000:])
        a, b = filled("kv", seed=2), filled("hybrid", seed=3)
        ctx = b.init_batch(pymem.Batch(tokens=[1, 2], pos=[12, 13]))
        ctx[0].apply()
        with pytest.raises(pymem.InvalidArgumentError, match="another memory"):
            a.kq_mask(ctx[0])
        b.close()
        with pytest.raises(pymem.InvalidArgumentError, match="another memory"):   # after close too
            a.kq_mask(ctx[0])

    def test_ubatch_after_close_in_child(self):
        r = run_child("""
            import gc, pymem
            from test_hardening import filled
            for kind in ("kv", "recurrent", "hybrid_iswa"):
                m = filled(kind, seed=4)
                ctx = m.init_batch(pymem.Batch(tokens=[1, 2], pos=[12, 13]))
                ub = ctx[0]
                ub.apply()
                part = m.kv_parts()[0] if m.kv_parts() else None
                m.close()
                del m
                gc.collect()
                for name in ("rec_range", "cells", "streams", "applied", "n_kv"):
                    try:
                        getattr(ub, name)
                    except pymem.InvalidStateError as exc:
                        assert "closed" in str(exc)
                    else:
                        raise SystemExit(f"{kind}: UBatch.{name} answered after close")
                if part is not None:
                    try:
                        part.kq_mask(ub)
                    except pymem.InvalidStateError:
                        pass
                    else:
                        raise SystemExit(f"{kind}: kq_mask answered after close")
                assert "closed" in repr(ub)
            print("ok")
        """)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])


# =============================================================================================
# argument ranges (issue 15 item 15) and signatures
# =============================================================================================
class TestArguments:
    @pytest.mark.parametrize("call, name", [
        (lambda: pymem.KVCache(n_layer=2, v_rot=2 ** 40), "v_rot"),
        (lambda: pymem.KVCache(n_layer=2, k_rot=-2 ** 40), "k_rot"),
        (lambda: pymem.KVCache(n_layer=2, size=2 ** 40), "size"),
        (lambda: pymem.KVCache(n_layer=2 ** 40), "n_layer"),
        (lambda: pymem.KVCacheISWA(n_layer=2 ** 40, swa_layers=[0], n_swa=4), "n_layer"),
        (lambda: pymem.RecurrentMemory(n_layer=2, n_rs_seq=2 ** 33), "n_rs_seq"),
        (lambda: pymem.Batch(n_tokens=2 ** 40), "n_tokens"),
    ])
    def test_constructor_ranges(self, call, name):
        with pytest.raises(pymem.InvalidArgumentError, match=name):
            call()

    def test_method_ranges_name_the_argument(self):
        m = filled("kv", seed=5)
        before = m.state_write()
        for call, name in [
            (lambda: m.seq_rm(2 ** 40), "seq_id"), (lambda: m.seq_rm(0, 2 ** 31), "p0"),
            (lambda: m.seq_cp(0, 2 ** 35), "dst"), (lambda: m.seq_add(0, 0, -1, 2 ** 31), "shift"),
            (lambda: m.seq_div(0, 0, -1, -2 ** 32), "d"), (lambda: m.seq_pos_max(2 ** 31), "seq_id"),
            (lambda: m.state_write(flags=-1), "flags"), (lambda: m.state_size(seq_id=2 ** 31), "seq_id"),
            (lambda: m.init_batch(pymem.Batch(tokens=[1]), n_ubatch=2 ** 32), "n_ubatch"),
            (lambda: m.kv_parts()[0].stream_info(2 ** 32), "stream"),
        ]:
            with pytest.raises(pymem.InvalidArgumentError, match=name):
                call()
        ctx = m.init_batch(pymem.Batch(tokens=[1], pos=[12]))
        for idx in (-1, 1, 2 ** 40):
            with pytest.raises(pymem.InvalidArgumentError, match="index"):
                pymem.UBatch(ctx, idx)
        with pytest.raises(TypeError):
            m.seq_rm(1.5)
        assert m.state_write() == before

    def test_signatures_are_explicit(self):
        import inspect

        from pymem.params import _KV_DEFAULTS, _REC_DEFAULTS

        for cls, table in ((pymem.KVCache, _KV_DEFAULTS), (pymem.RecurrentMemory, _REC_DEFAULTS)):
            sig = inspect.signature(cls)
            kinds = {p.kind for p in sig.parameters.values()}
            assert inspect.Parameter.VAR_KEYWORD not in kinds, cls
            assert set(sig.parameters) == set(table) | {"n_layer"}, cls
            for k, v in table.items():          # the defaults the C parameters are built from
                assert sig.parameters[k].default == v, (cls, k)
        iswa = inspect.signature(pymem.KVCacheISWA)
        assert {"base", "swa", "swa_layers", "n_swa", "swa_full", "n_ubatch"} <= set(iswa.parameters)
        assert set(_KV_DEFAULTS) <= set(iswa.parameters)
        for f in (pymem.from_gguf, pymem.estimate, pymem.max_context, pymem.memory_spec, pymem.Batch,
                  pymem.HybridMemory, pymem.HybridISWAMemory, state.Session.load, state.load, state.parse):
            assert inspect.Parameter.VAR_KEYWORD not in {p.kind for p in inspect.signature(f).parameters.values()}, f
        with pytest.raises(TypeError, match="sizee"):
            pymem.KVCache(n_layer=2, sizee=3)

    def test_reprs(self):
        m = filled("hybrid_iswa", seed=6)
        r = repr(m)
        assert r.startswith("<HybridISWAMemory test:") and "base" in r and "swa" in r and "recurrent" in r, r
        ctx = m.init_batch(pymem.Batch(tokens=[1], pos=[12]))
        assert "1 ubatch" in repr(ctx) and "not applied" in repr(ctx[0])
        m.close()
        assert "closed" in repr(m) and "closed" in repr(ctx[0])


# =============================================================================================
# GGUF files and CLI numbers (issue 15 items 12, 13, 14, 16)
# =============================================================================================
class TestPlannerInputs:
    def test_corrupt_gguf_is_a_pymem_error_naming_the_file(self, tmp_path):
        """Truncations at every offset and random byte changes of a model file: from_gguf /
        estimate / max_context either work or raise a pymem error naming the file."""
        import random

        from pymem import shapes

        good = Path(shapes.path("llama3-8b")).read_bytes()
        rng = random.Random(12)
        cuts = sorted({int(len(good) * k / 97) for k in range(97)} | set(range(0, 64)))
        mutants = [good[:n] for n in cuts]
        for _ in range(150):
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            mutants.append(bytes(b))
        bad = 0
        p = tmp_path / "m.gguf"
        for i, data in enumerate(mutants):
            p.write_bytes(data)
            for call in (lambda: pymem.estimate(str(p), 4096), lambda: pymem.max_context(str(p), 1 << 30),
                         lambda: pymem.memory_spec(str(p), 4096)):
                try:
                    call()
                except pymem.Error as exc:
                    assert str(p) in str(exc) or "architecture" in str(exc) or "n_ctx" in str(exc), (i, exc)
                    bad += 1
        assert bad > 100          # most mutants are refused, each with a pymem error

    def test_n_ctx_limits(self):
        from pymem import plan, shapes

        path = shapes.path("llama3-8b")
        with pytest.raises(pymem.InvalidArgumentError, match="largest n_ctx is 4294967040"):
            pymem.estimate(path, 2 ** 32 - 1)
        e = pymem.estimate(path, plan.N_CTX_MAX)
        assert e.parts[0][1] == plan.N_CTX_MAX          # the cells llama.cpp would ask for
        with pytest.raises(pymem.InvalidArgumentError, match=r"2\^30 - 1 cells per stream"):
            pymem.from_gguf(path, 2 ** 31)
        assert plan.MAX_STREAM_CELLS == (1 << 30) - 1

    def test_cli_numbers(self, tmp_path, capsys):
        from pymem import shapes

        for argv, msg in [
            (["estimate", "--shape", "llama3-8b", "--budget", "1e400"], "below 2^64"),
            (["estimate", "--shape", "llama3-8b", "--budget", "1e30GiB"], "below 2^64"),
        ]:
            with pytest.raises(SystemExit) as ei:
                cli.main(argv)
            assert ei.value.code == 2 and msg in capsys.readouterr().err
        assert cli.main(["estimate", "--shape", "llama3-8b", "--ctx", "4294967295"]) == 1
        assert "largest n_ctx" in capsys.readouterr().err
        m = filled("kv", seed=8)
        f = tmp_path / "s.session"
        Session.from_memory(m, [1]).save(f)
        for w in ("0", "-5", "x"):
            with pytest.raises(SystemExit) as ei:
                cli.main(["inspect", str(f), "--width", w])
            assert ei.value.code == 2 and "width" in capsys.readouterr().err
        assert cli.main(["inspect", str(f), "--width", "1"]) == 0
        with pytest.raises(pymem.InvalidArgumentError, match="width"):
            Session.load(f).describe(width=0)
        assert shapes
