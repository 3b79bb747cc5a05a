"""Structure-path edits that stream (issue 14, point 4): a skeleton memory maps every output
cell to its input cell and the rows are gathered from the (mapped) input while the file is
written.  The reference is the in-memory path (PYMEM_STREAM_EDIT=0: a pymem memory holding
the whole state, proven against llama.cpp in test_state_oracle / test_lcp_state): both must
give the same bytes, notes, tokens and errors, on every memory kind, op mix, container, KV
layout, format and cache type; and the streamed edit of a large file stays well below the
file size in memory."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import pymem
from pymem import cli, state
from pymem.state import EditError, SeqState, Session, streamedit

from test_scale import peak_kib
from test_state import MODELS, filled, meta  # noqa: F401  (fixture)

OPS = [
    [("seq_rm", 0, 4, 8)],
    [("seq_rm", 1)],
    [("seq_rm", -1, 3, -1)],
    [("seq_cp", 2, 3)],
    [("seq_cp", 0, 3, 2, 9)],
    [("seq_keep", 1)],
    [("seq_mv", 1, 3)],
    [("truncate", 10)],
    [("seq_rm", 2), ("seq_mv", 1, 2), ("seq_keep", 2)],
    [("seq_cp", 0, 3), ("seq_rm", 0), ("seq_mv", 3, 0), ("seq_cp", 2, 1)],
    [("seq_mv", 0, 3), ("seq_cp", 3, 0), ("seq_rm", 2, 0, 4)],
    [("seq_keep", 3)],
    [("seq_rm", 0, 0, 0)],
    [("seq_cp", 0, 300)],
    [("seq_add", 2, 3, -1, 5), ("seq_div", 0, 8, -1, 2)],
]


def _reference(monkeypatch, obj, ops):
    monkeypatch.setenv("PYMEM_STREAM_EDIT", "0")
    try:
        return obj.edit(ops)
    finally:
        monkeypatch.delenv("PYMEM_STREAM_EDIT")


def _same_edit(monkeypatch, obj, ops, tmp_path=None):
    """Edit both ways; returns the streamed result (None where both refuse alike)."""
    try:
        ref = _reference(monkeypatch, obj, ops)
    except pymem.Error as exc:
        with pytest.raises(type(exc)) as ei:
            obj.edit(ops)
        assert str(ei.value) == str(exc), ops
        return None
    new = obj.edit(ops)
    assert new.edit_streamed and not ref.edit_streamed, ops
    assert new.nbytes == ref.nbytes, ops
    assert new.dump() == ref.dump(), ops
    assert new.edit_notes == ref.edit_notes and new.noop == ref.noop and new.token_sync == ref.token_sync, ops
    assert getattr(new, "tokens", None) == getattr(ref, "tokens", None)
    assert new.sequences() == ref.sequences()
    if tmp_path is not None:
        p = tmp_path / "out.bin"
        new.save(p)
        assert p.read_bytes() == ref.dump()
    return new


CONFIGS = [(n, u, fa, fmt, tk) for n in MODELS for (u, fa, fmt, tk) in
           ((True, False, 11, "f16"), (False, True, 11, "f16"), (True, True, 10, "q8_0"), (False, False, 10, "f16"))]


@pytest.mark.parametrize("name,unified,fa,fmt,type_k", CONFIGS)
def test_whole_states_match_memory_path(meta, monkeypatch, tmp_path, name, unified, fa, fmt, type_k):
    mem = filled(meta[name], unified, fa, fmt=fmt, type_k=type_k, seed=3)
    sess = Session.from_memory(mem, list(range(16)))
    blob = state.parse(mem.state_write(envelope="llama"))
    streamed = 0
    for ops in OPS:
        for obj in (sess, blob):
            got = _same_edit(monkeypatch, obj, ops, tmp_path if obj is sess else None)
            streamed += got is not None
            if got is not None and ops[0][0] != "seq_add":
                # an edit of an edited state gathers from the original input
                more = [("seq_cp", 1, 0)] if got.state.seq_ids() else [("seq_rm", -1)]
                _same_edit(monkeypatch, got, more)
    assert streamed >= 10


@pytest.mark.parametrize("name", MODELS)
def test_sequence_states_match_memory_path(meta, monkeypatch, tmp_path, name):
    for unified, fa in ((True, False), (False, True)):
        mem = filled(meta[name], unified, fa, seed=5)
        for q in (0, 1, 2):
            files = [SeqState.from_memory(mem, q, list(range(20 if q == 1 else 16 if q == 0 else 7))),
                     state.parse(mem.state_write(q, envelope="llama"))]
            if mem.kind != "kv":   # PARTIAL_ONLY: only the SWA / recurrent sections
                files.append(state.parse(mem.state_write(q, flags=pymem.STATE_PARTIAL_ONLY, envelope="llama"),
                                         model=meta[name]))
            for obj in files:
                for ops in ([("seq_mv", q, 3)], [("truncate", 5)], [("seq_rm", q, 2, 4)], [("seq_keep", q)],
                            [("seq_rm", q)], [("seq_mv", q, 0), ("truncate", 3)], [("seq_cp", q, 2)]):
                    _same_edit(monkeypatch, obj, ops, tmp_path)


def test_rotated_quantized_cache(meta, monkeypatch):
    for unified in (True, False):
        rot = pymem.from_gguf(meta["llama_hd64"], 256, type_k="q8_0", type_v="q8_0", flash_attn=True,
                              n_seq_max=3, unified=unified)
        rot.decode(pymem.Batch(tokens=list(range(6)), pos=list(range(6)), seq_ids=[[0]] * 6))
        rot.decode(pymem.Batch(tokens=[1, 2, 3], pos=[0, 1, 2], seq_ids=[[1]] * 3))
        rng = np.random.default_rng(1)
        for kv in rot.kv_parts():
            for il in kv.layers:
                for s in range(kv.n_stream):
                    for view in (kv.k(il, s), kv.v(il, s)):
                        u = view.view(np.uint8)
                        u[...] = rng.integers(0, 256, u.shape, dtype=np.uint8)
        s = Session.from_memory(rot, [])
        assert s.state.sections[0].streams[0].k_rot == 64
        for ops in ([("seq_cp", 0, 2)], [("seq_rm", 0, 1, 3)], [("seq_mv", 1, 2), ("seq_keep", 2)]):
            _same_edit(monkeypatch, s, ops)


def test_cli_and_set_version(meta, tmp_path, monkeypatch, capsys):
    mem = filled(meta["jamba"], False, True, seed=7)
    src = tmp_path / "in.session"
    Session.from_memory(mem, list(range(16))).save(src)
    for extra in ([], ["--set-version", "10"]):
        args = ["edit", str(src), "--seq-cp", "0:3", "--seq-rm", "1", "-q"] + extra
        assert cli.main(args + ["-o", str(tmp_path / "a")]) == 0
        monkeypatch.setenv("PYMEM_STREAM_EDIT", "0")
        assert cli.main(args + ["-o", str(tmp_path / "b")]) == 0
        monkeypatch.delenv("PYMEM_STREAM_EDIT")
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    # a diff of a streamed result against the reference finds nothing
    s = Session.load(src)
    assert state.diff(s.edit([("seq_keep", 2)]), _reference(monkeypatch, s, [("seq_keep", 2)])).same


def test_falls_back_where_not_exact(meta, monkeypatch):
    """Layers of one cache with different types: the memory path refuses the state; so must
    the streamed one (it falls back and says the same)."""
    sess = Session.from_memory(filled(meta["llama"]), [])
    st = sess.state.sections[0].streams[0]
    assert st.layers[1].k_type == 1
    st.layers[1].k_type = 30   # bf16: same row size, another type
    bad = Session.parse(sess.dump())
    with pytest.raises(pymem.StateError) as ref:
        _reference(monkeypatch, bad, [("seq_rm", 1)])
    with pytest.raises(pymem.StateError) as got:
        bad.edit([("seq_rm", 1)])
    assert str(got.value) == str(ref.value)
    with pytest.raises(streamedit._Fallback):
        streamedit._eligible(bad.state)


def test_failure_leaves_output_untouched(meta, tmp_path, monkeypatch):
    from pymem.state import streamrows

    sess = Session.from_memory(filled(meta["llama"]), list(range(16)))
    out = tmp_path / "out.session"
    out.write_bytes(b"old")
    with pytest.raises(EditError, match="256"):
        sess.edit([("seq_cp", 0, 300)])
    new = sess.edit([("seq_cp", 1, 3), ("seq_rm", 0, 2, 5)])
    assert new.edit_streamed

    def broken(self, limit=0):
        yield b"x" * 10
        raise OSError(5, "input vanished")

    monkeypatch.setattr(streamrows.GatheredRows, "chunks", broken)
    with pytest.raises(pymem.StateFileError, match="input vanished"):
        new.save(out)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.session"]


# ---------------------------------------------------------------------------------------------
# a large session: peak memory of the streamed edit
# ---------------------------------------------------------------------------------------------
def write_rows_session(path, n_cells, n_layer, row):
    """A session (format 11, one f16 KV stream, seq 0 at 0..n-1, seq 1 a copy of its first
    half) whose every row starts with (layer, K/V, cell) so the output can be checked."""
    arch = b"llama"
    with open(path, "wb") as f:
        f.write(struct.pack("<III", 0x6767736E, 11, 0) + struct.pack("<I", len(arch)) + arch)
        f.write(struct.pack("<II", 1, n_cells))
        f.write(b"".join(struct.pack("<iIi", i, 1, 0) if i >= n_cells // 2 else
                         struct.pack("<iIii", i, 2, 0, 1) for i in range(n_cells)))
        f.write(struct.pack("<IIII", 0, n_layer, 0, 0))
        rows = np.zeros((n_cells, row // 4), np.int32)
        for kv in (0, 1):
            for l in range(n_layer):
                f.write(struct.pack("<iQ", 1, row))
                rows[:, 0], rows[:, 1], rows[:, 2] = l, kv, np.arange(n_cells)
                f.write(rows.tobytes())
    return os.path.getsize(path)


def test_large_session_edit_peak_memory(tmp_path):
    big = tmp_path / "big.session"
    n, L, row = 3072, 4, 4096
    size = write_rows_session(big, n, L, row)
    assert size > 90 << 20
    small = tmp_path / "small.session"
    write_rows_session(small, 16, L, 256)
    edit = ["--seq-rm", "0:100:1100", "--seq-keep", "0", "-q"]
    base, _ = peak_kib(tmp_path, "edit", small, *edit, "-o", tmp_path / "small.out")
    peak, _ = peak_kib(tmp_path, "edit", big, *edit, "-o", tmp_path / "big.out")
    grew = (peak - base) * 1024
    print(f"edit of a {size / 2**20:.0f} MiB session: peak RSS {peak / 1024:.0f} MiB, "
          f"+{grew / 2**20:.1f} MiB over a tiny file")
    assert grew < size // 2, (grew, size)
    # the same from Python: Session.load + edit + save
    api = ("import sys\nfrom pymem.state import Session\ns = Session.load(sys.argv[1])\n"
           "e = s.edit([('seq_rm', 0, 100, 1100), ('seq_keep', 0)])\nassert e.edit_streamed\ne.save(sys.argv[2])\n"
           "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
           "sys.stderr.write('PEAK %s\\n' % hwm)\n")
    peaks = []
    for f in (small, big):
        r = subprocess.run([sys.executable, "-c", api, str(f), str(tmp_path / "api.out")], capture_output=True,
                           cwd=tmp_path, text=True)
        assert r.returncode == 0, r.stderr
        peaks.append(int(r.stderr.rsplit("PEAK", 1)[1].split()[0]))
    print(f"Python API: +{(peaks[1] - peaks[0]) / 1024:.1f} MiB")
    assert (peaks[1] - peaks[0]) * 1024 < size // 2
    assert (tmp_path / "api.out").read_bytes() == (tmp_path / "big.out").read_bytes()
    out = state.load(tmp_path / "big.out")
    keep = [i for i in range(n) if not 100 <= i < 1100]
    st = out.state.sections[0].streams[0]
    assert [c.pos for c in st.cells] == keep and all(c.seq_ids == [0] for c in st.cells)
    for l, Ly in enumerate(st.layers):
        for kv, buf in ((0, Ly.k), (1, Ly.v)):
            head = np.frombuffer(buf, np.int32).reshape(len(keep), row // 4)[:, :3]
            assert (head[:, 0] == l).all() and (head[:, 1] == kv).all()
            assert head[:, 2].tolist() == keep


@pytest.mark.parametrize("name", MODELS)
def test_random_op_mixes(meta, monkeypatch, name):
    """Seeded random sequences of 1-4 operations (any ids, ranges, refusals included)."""
    rng = np.random.default_rng(abs(hash(name)) % 1000)
    for unified, fa in ((True, False), (False, True)):
        sess = Session.from_memory(filled(meta[name], unified, fa, seed=11), list(range(16)))
        streamed = 0
        for _ in range(30):
            ops = []
            for _ in range(int(rng.integers(1, 5))):
                k = rng.choice(["seq_rm", "seq_cp", "seq_keep", "seq_mv", "truncate"])
                a, b = (int(x) for x in rng.integers(0, 4, 2))
                p0 = int(rng.integers(-1, 12))
                p1 = -1 if p0 < 0 or rng.random() < 0.3 else p0 + int(rng.integers(0, 10))
                ops.append({"seq_rm": ("seq_rm", int(rng.integers(-1, 4)), p0, p1), "seq_cp": ("seq_cp", a, b, p0, p1),
                            "seq_keep": ("seq_keep", a), "seq_mv": ("seq_mv", a, b),
                            "truncate": ("truncate", int(rng.integers(0, 17)))}[k])
            streamed += _same_edit(monkeypatch, sess, ops) is not None
        assert streamed >= 5


def test_mrope_cells_with_ext(monkeypatch):
    """Cells carrying M-RoPE ext (x, y, tok), unified and per stream, V transposed or not."""
    for unified, fa in ((True, False), (False, True)):
        mem = pymem.KVCache(n_layer=2, n_head_kv=1, n_embd_head_k=32, size=256, n_seq_max=3, v_trans=not fa,
                            unified=unified, n_pos_per_embd=4, arch="qwen2vl")
        n = 12
        pos = np.stack([np.full(n, 2), np.arange(n) // 4, np.arange(n) % 4, np.zeros(n, int)]).astype(np.int32)
        mem.decode(pymem.Batch(n_tokens=n, pos=pos, seq_ids=[[0]] * n))
        mem.decode(pymem.Batch(n_tokens=5, pos=np.arange(5)[None, :].repeat(4, 0), seq_ids=[[1]] * 5))
        rng = np.random.default_rng(2)
        for il in mem.layers:
            for s in range(mem.n_stream):
                for view in (mem.k(il, s), mem.v(il, s)):
                    view.view(np.uint8)[...] = rng.integers(0, 256, view.view(np.uint8).shape, dtype=np.uint8)
        sess = Session.from_memory(mem, [])
        assert sess.layout.sections[0].cell_ext
        assert any(c.ext and c.ext[0] != c.ext[1] for c in sess.state.sections[0].streams[0].cells)
        for ops in ([("seq_cp", 0, 2)], [("seq_rm", 0, 1, 2)], [("seq_mv", 1, 2), ("seq_rm", 0, 0, 1)],
                    [("seq_keep", 0)]):
            _same_edit(monkeypatch, sess, ops)
        for q in (0, 1):
            _same_edit(monkeypatch, state.parse(mem.state_write(q, envelope="llama")), [("seq_mv", q, 2)])


def test_release_drops_only_read_only_mapped_pages(tmp_path):
    import mmap

    from pymem.state import mapped

    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 64)
    with open(p, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with open(p, "r+b") as f:
        cp = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cp[5] = 0xEE                      # a private change: must survive
    mapped.release(memoryview(cp)[:8192])
    mapped.release(memoryview(ro)[100:9000])
    mapped.release(b"plain bytes")
    assert cp[5] == 0xEE and ro[:256] == bytes(range(256)) and ro[-1] == 255
    ro.close()
    cp.close()
