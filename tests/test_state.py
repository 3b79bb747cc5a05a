"""pymem.state without llama.cpp: states written by pymem memories built from metadata-only
GGUF files (the same bytes llama.cpp writes, as the oracle tests prove), parsed and dumped
byte-identically, layouts inferred, edits, errors on truncated / corrupt / foreign input."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import pymem
from pymem import state
from pymem.state import EditError, Layout, LayoutAmbiguousError, SeqState, Session
from pymem._oracle import tinymodels

try:
    from hypothesis import given, settings
    from hypothesis import strategies as hs
except ImportError:  # pragma: no cover
    given = None

MODELS = ["llama", "gemma2", "mamba", "jamba", "lfm2_swa"]
KIND = {"llama": "kv", "gemma2": "iswa", "mamba": "recurrent", "jamba": "hybrid", "lfm2_swa": "hybrid_iswa"}


@pytest.fixture(scope="session")
def meta(tmp_path_factory):
    """name -> metadata-only GGUF (no llama.cpp needed)."""
    d = tmp_path_factory.mktemp("meta")
    out = {}
    for n in MODELS + ["llama_hd64"]:
        p = d / f"{n}.gguf"
        tinymodels.write_metadata_gguf(p, tinymodels.spec(n))
        out[n] = str(p)
    return out


def filled(path, unified=True, fa=False, n_seq_max=4, fmt=11, type_k="f16", seed=0):
    """A memory with seq 0 (pos 0..15), seq 1 = fork of 0 + pos 16..19, seq 2 (pos 0..6), and
    random tensor bytes."""
    mem = pymem.from_gguf(path, 256, n_seq_max=n_seq_max, unified=unified, flash_attn=fa, format=fmt,
                          type_k=type_k)
    mem.decode(pymem.Batch(tokens=list(range(16)), pos=list(range(16)), seq_ids=[[0]] * 16))
    mem.seq_cp(0, 1)
    mem.decode(pymem.Batch(tokens=[1, 2, 3, 4], pos=[16, 17, 18, 19], seq_ids=[[1]] * 4))
    mem.decode(pymem.Batch(tokens=list(range(7)), pos=list(range(7)), seq_ids=[[2]] * 7))
    rng = np.random.default_rng(seed)
    for kv in mem.kv_parts():
        for il in kv.layers:
            for s in range(kv.n_stream):
                for view in (kv.k(il, s), kv.v(il, s)):
                    u = view.view(np.uint8)
                    if view.dtype == np.float16:  # finite halves only (shifts must stay finite)
                        view[...] = rng.standard_normal(view.shape).astype(np.float16)
                    else:
                        u[...] = rng.integers(0, 256, u.shape, dtype=np.uint8)
    rec = getattr(mem, "recurrent", None)
    if rec is not None:
        for il in rec.layers:
            for which in (rec.r, rec.s):
                try:
                    v = which(il)
                except pymem.InvalidArgumentError:   # lfm2: no s rows
                    continue
                v[...] = rng.standard_normal(v.shape).astype(v.dtype)
    return mem


CONFIGS = [(n, u, fa) for n in MODELS for (u, fa) in ((True, False), (False, True))]


@pytest.mark.parametrize("name,unified,fa", CONFIGS)
def test_round_trips(meta, name, unified, fa):
    mem = filled(meta[name], unified, fa)
    toks = list(range(16))
    sess = Session.from_memory(mem, toks)
    data = sess.dump()
    assert data[:12] == struct.pack("<III", state.MAGIC_SESSION, 11, 16)
    for model in (None, meta[name]):
        s2 = Session.parse(data, model=model)
        assert s2.dump() == data
        assert s2.tokens == toks and s2.arch == mem.arch and s2.version == 11
        assert s2.layout.pattern == sess.layout.pattern
        assert s2.layout.kind == KIND[name]
        assert [sp.n_recurrent for sp in s2.layout.sections] == [sp.n_recurrent for sp in sess.layout.sections]
        assert s2.state.scope == "whole"
        json.dumps(s2.summary())
        assert "section 1/" in s2.describe()
    # per sequence: files, blobs, bare sections, PARTIAL_ONLY
    for q in range(3):
        sq = SeqState.from_memory(mem, q, toks[:3])
        b = sq.dump()
        assert b[:8] == struct.pack("<II", state.MAGIC_SEQ_FILE, 4)
        for model in (None, meta[name]):
            x = SeqState.parse(b, model=model)
            assert x.dump() == b
            assert x.seq_id in (q, None)
        blob = mem.state_write(q, envelope="llama")
        x = state.parse(blob)
        assert isinstance(x, state.Blob) and x.envelope == "seq" and x.seq_id == q and x.dump() == blob
        assert state.parse(blob, model=meta[name]).dump() == blob
        part = mem.state_write(q, flags=pymem.STATE_PARTIAL_ONLY, envelope="llama")
        y = state.parse(part, model=meta[name])
        assert y.dump() == part
        # PARTIAL_ONLY: only caches with a sliding window and the recurrent state write anything
        want = {"kv": (), "iswa": ("kv",), "recurrent": ("rec",), "hybrid": ("rec",), "hybrid_iswa": ("kv", "rec")}
        assert y.layout.pattern == want[mem.kind]
        if mem.kind != "recurrent":
            assert y.state.flags == 1 and y.layout.partial
    whole = mem.state_write(envelope="llama")
    x = state.parse(whole)
    assert x.envelope == "context" and x.arch == mem.arch and x.dump() == whole
    assert x.state.dump() == sess.state.dump()
    bare = mem.state_write()
    y = state.Blob.parse(bare, envelope=None)
    assert y.dump() == bare and y.state.scope == "whole"


@pytest.mark.parametrize("name", MODELS)
def test_summary_matches_memory(meta, name):
    mem = filled(meta[name])
    sess = Session.from_memory(mem, [])
    seqs = sess.sequences()
    for q in range(4):
        if mem.seq_pos_max(q) < 0:
            assert q not in seqs
            continue
        assert max(x.pos_max for x in seqs[q]) == mem.seq_pos_max(q)
        # pos_min of composites is the largest of the parts' pos_min, as llama.cpp reports
        assert max(x.pos_min for x in seqs[q]) == mem.seq_pos_min(q)
    d = Session.parse(sess.dump()).summary()
    assert d["arch"] == mem.arch and d["n_tokens"] == 0
    for sec in d["memory"]["sections"]:
        if sec["kind"] == "kv":
            for st in sec["streams"]:
                for L in st.get("layers", []):
                    assert L["k_type"] == "f16" and L["k_row"] == 2 * L["n_embd_k"]
                    assert L["model_layer"] is None  # inferred layout: model ids unknown
    with_model = Session.parse(sess.dump(), model=meta[name]).summary()
    ids = [L["model_layer"] for s in with_model["memory"]["sections"] if s["kind"] == "kv"
           for st in s["streams"] for L in st.get("layers", [])]
    assert all(i is not None for i in ids)


def test_versions_10_and_11(meta):
    mem10 = filled(meta["llama"], fmt=10)
    s10 = Session.from_memory(mem10, [5, 6])
    assert s10.version == 10 and s10.format == 10
    data = s10.dump()
    assert Session.parse(data).dump() == data
    s11 = s10.with_version(11)
    assert s11.version == 11 and len(s11.dump()) == len(data) + 8   # k_rot, v_rot words
    assert s11.with_version(10).dump() == data
    mem11 = filled(meta["llama"], fmt=11)
    assert s11.state.dump() == mem11.state_write()
    q = SeqState.from_memory(mem10, 1)
    assert q.version == 3 and SeqState.parse(q.dump()).dump() == q.dump()
    assert q.with_version(4).state.dump() == mem11.state_write(1)
    # a rotated (quantized, head dim 64) cache has no format-10 form
    rot = pymem.from_gguf(meta["llama_hd64"], 256, type_k="q8_0")
    rot.decode(pymem.Batch(tokens=[1, 2], pos=[0, 1], seq_ids=[[0], [0]]))
    s = Session.from_memory(rot, [1, 2])
    assert s.state.sections[0].streams[0].k_rot == 64
    with pytest.raises(EditError, match="rotation"):
        s.with_version(10)


def test_wrap_unwrap():
    sec = b"\x01\x00\x00\x00\x00\x00\x00\x00"
    assert state.unwrap_seq(state.wrap_seq(3, sec)) == (3, sec)
    assert state.unwrap_context(state.wrap_context("llama", sec)) == ("llama", sec)
    with pytest.raises(pymem.StateError, match="magic"):
        state.unwrap_seq(b"\x00" * 12)
    with pytest.raises(pymem.StateError, match="offset"):
        state.unwrap_context(b"\x05\x00\x00\x00lla")


def test_layout_inference(meta):
    # ambiguous: REC(1) alone, or an empty KV section followed by REC(1) (zero-sized rows)
    amb = struct.pack("<11I", 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0)
    with pytest.raises(LayoutAmbiguousError) as ei:
        state.infer_layout(amb)
    assert len(ei.value.candidates) == 2 and "give the model" in str(ei.value)
    assert isinstance(ei.value, pymem.StateError)
    # an explicit layout settles it
    for text, pat in (("rec:1", ("rec",)), ("kv+rec:1", ("kv", "rec"))):
        b = state.Blob.parse(amb, layout=text, envelope=None)
        assert b.layout.pattern == pat and b.dump() == amb
    assert Layout.coerce([("kv", 11, False), ("rec", 1, None)]).pattern == ("kv", "rec")
    assert Layout.of_kind("hybrid_iswa", 2, partial=True).pattern == ("kv", "rec")
    with pytest.raises(pymem.InvalidArgumentError):
        Layout.parse_text("kv+rec")
    # model layouts
    assert Layout.from_model(meta["lfm2_swa"]).describe().startswith("KV + KV + REC(2) [hybrid_iswa")
    assert Layout.from_model(meta["gemma2"], partial=True).pattern == ("kv",)
    # a state of another model is refused with the reason
    sess = Session.from_memory(filled(meta["llama"]), [])
    with pytest.raises(pymem.StateError, match="'llama' model, the model is 'gemma2'"):
        Session.parse(sess.dump(), model=meta["gemma2"])
    with pytest.raises(pymem.StateError, match="section"):
        Session.parse(sess.dump(), layout="kv+rec:2")


# ---------------------------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------------------------
EDITS = [
    [("seq_rm", 0, 4, 8)],
    [("seq_rm", 1)],
    [("seq_cp", 2, 3)],
    [("seq_keep", 1)],
    [("seq_mv", 1, 3)],
    [("truncate", 10)],
    [("seq_rm", 2), ("seq_mv", 1, 2), ("seq_keep", 2)],
]


def _positions(obj):
    return {q: (max(x.pos_min for x in v), max(x.pos_max for x in v)) for q, v in obj.sequences().items()}


@pytest.mark.parametrize("name,unified,fa", CONFIGS)
def test_edits_both_paths_agree(meta, name, unified, fa):
    """The model path and the structure path give the same bytes, which equal the pymem
    memory doing the operations itself (no restore in between)."""
    mem = filled(meta[name], unified, fa)
    sess = Session.from_memory(mem, list(range(16)))
    for ops in EDITS:
        # a recurrent state cannot lose its last positions (seq_rm(0, 4, 8) misses them: a no-op)
        refuse = mem.kind not in ("kv", "iswa") and ops[0][0] == "truncate"
        if refuse:
            for model in (meta[name], None):
                with pytest.raises(EditError, match="refused"):
                    sess.edit(ops, model=model)
            continue
        a = sess.edit(ops, model=meta[name])
        b = sess.edit(ops, model=None)
        assert a.edit_path == "model" and b.edit_path == "structure"
        assert a.dump() == b.dump(), ops
        ref = filled(meta[name], unified, fa)
        # the same operations directly on a memory packed like a restored one
        ref.state_read(ref.state_write())
        state.apply_ops(ref, ops)
        assert a.state.dump() == ref.state_write(), ops
        if ops[0][0] == "truncate":
            assert a.tokens == list(range(10))
            assert all(p1 < 10 for _, p1 in _positions(a).values())
        else:
            assert a.tokens == sess.tokens
    keep = sess.edit([("seq_keep", 1)], model=None)
    if unified:  # non-unified: llama.cpp's seq_keep touches only the sequence's own stream
        assert set(keep.sequences()) == {1}
    mv = sess.edit([("seq_mv", 1, 3)], model=None)
    assert 1 not in mv.sequences() and _positions(mv)[3] == _positions(sess)[1]


@pytest.mark.parametrize("name", MODELS)
def test_shifts(meta, name):
    mem = filled(meta[name])
    sess = Session.from_memory(mem, [])
    ops = [("seq_add", 2, 3, -1, 5), ("seq_div", 0, 8, -1, 2)]
    if mem.kv_parts():
        with pytest.raises(EditError, match="needs the model"):
            sess.edit(ops)
    else:  # a recurrent state has no K: the shift moves the position only
        assert sess.edit(ops).dump() == sess.edit(ops, model=meta[name]).dump()
    out = sess.edit(ops, model=meta[name])
    ref = filled(meta[name])
    ref.state_read(ref.state_write())
    ref.seq_add(2, 3, -1, 5)
    ref.seq_div(0, 8, -1, 2)
    ref.update()
    assert out.state.dump() == ref.state_write()
    assert _positions(out)[2][1] == 11


@pytest.mark.parametrize("name", MODELS)
def test_seq_state_edits(meta, name):
    mem = filled(meta[name])
    sq = SeqState.from_memory(mem, 1, [9, 8, 7])
    mv = sq.edit([("seq_mv", 1, 0)])
    assert mv.seq_id in (0, None)
    ref = pymem.from_gguf(meta[name], 256, n_seq_max=4)
    ref.state_read(sq.state.dump(), seq_id=1)
    state.apply_ops(ref, [("seq_mv", 1, 0)])
    assert mv.state.dump() == ref.state_write(0)
    back = mv.edit([("seq_mv", 0, 1)])
    assert back.dump() == sq.dump()
    with pytest.raises(EditError, match="holds sequence 1 only"):
        sq.edit([("seq_rm", 0)])
    with pytest.raises(EditError, match="whole state"):
        sq.edit([("seq_cp", 1, 2)])
    if mem.kind in ("kv", "iswa"):
        t = sq.edit([("truncate", 2)])
        assert t.tokens == [9, 8] and all(x.pos_max < 2 for v in t.sequences().values() for x in v)
        sh = sq.edit([("seq_add", 1, 0, -1, 3)], model=meta[name])
        assert _positions(sh)[1][1] == 22
    else:
        with pytest.raises(EditError, match="refused"):
            sq.edit([("truncate", 2)])


def test_edit_errors(meta):
    sess = Session.from_memory(filled(meta["llama"]), list(range(5)))
    with pytest.raises(EditError, match="only 5 tokens"):
        sess.edit([("truncate", 6)])
    with pytest.raises(pymem.InvalidArgumentError, match="unknown operation"):
        sess.edit([("seq_frob", 1)])
    with pytest.raises(pymem.InvalidArgumentError, match="arguments"):
        sess.edit([("seq_add", 1, 2)])
    with pytest.raises(EditError, match="256"):
        sess.edit([("seq_cp", 0, 300)])
    nu = Session.from_memory(filled(meta["llama"], unified=False, fa=True), [])
    with pytest.raises(EditError, match="n_seq_max 4"):
        nu.edit([("seq_cp", 0, 5)])
    with pytest.raises(EditError, match="llama.cpp cannot"):
        nu.edit([("seq_cp", 0, 3, 2, 5)])   # partial cross-stream copy: llama.cpp aborts
    with pytest.raises(EditError, match="divisor"):
        sess.edit([("seq_div", 0, 0, -1, 0)], model=meta["llama"])
    assert state.parse_op("seq-add", "0:260::-256") == state.Op("seq_add", (0, 260, -1, -256))
    assert state.parse_op("seq-rm", "3") == state.Op("seq_rm", (3, -1, -1))
    with pytest.raises(pymem.InvalidArgumentError, match="S:P0:P1:DELTA"):
        state.parse_op("seq-add", "1:2")


def test_to_memory(meta):
    for name in MODELS:
        mem = filled(meta[name], unified=False, fa=True)
        sess = Session.from_memory(mem, [1])
        for model in (meta[name], None):
            m2 = sess.to_memory(model)
            assert m2.state_write() == mem.state_write()
            assert m2.kind == mem.kind
        m3 = pymem.from_gguf(meta[name], 512, n_seq_max=4, unified=False, flash_attn=True)
        assert sess.to_memory(m3) is m3 and m3.state_write() == mem.state_write()
        sq = SeqState.from_memory(mem, 2)
        m4 = sq.to_memory(meta[name], seq_id=3)
        assert m4.seq_pos_max(3) == mem.seq_pos_max(2)
        assert SeqState.from_memory(m4, 3).edit([("seq_mv", 3, 2)]).state.dump() == sq.state.dump()
    p = state.memory_params(Session.from_memory(filled(meta["gemma2"], unified=False, fa=True), []).state)
    assert p["unified"] is False and p["n_seq_max"] == 4 and p["flash_attn"] is True and p["n_ctx"] == 1024


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _samples(meta):
    mem = filled(meta["jamba"])
    iswa = filled(meta["gemma2"], unified=False, fa=True)
    return {
        "session": Session.from_memory(mem, list(range(16))).dump(),
        "seq_file": SeqState.from_memory(iswa, 1, [3, 4]).dump(),
        "context": iswa.state_write(envelope="llama"),
        "seq": mem.state_write(2, envelope="llama"),
        "sections": iswa.state_write(),
        "partial": iswa.state_write(1, flags=pymem.STATE_PARTIAL_ONLY, envelope="llama"),
    }


def _model_of(kind):
    return "jamba" if kind in ("session", "seq") else "gemma2"


def _kind_of(kind):
    return "seq" if kind == "partial" else kind


def test_truncated_everywhere(meta):
    for kind, data in _samples(meta).items():
        model = meta[_model_of(kind)]
        n = len(data)
        offs = sorted(set(range(0, min(n, 96))) | set(range(96, n, max(1, n // 97))) | {n - 1})
        for k in offs:
            cut = data[:k]
            for m in (model, None):
                try:
                    obj = state.parse(cut, model=m, kind=_kind_of(kind))
                except pymem.StateError as exc:
                    assert "offset" in str(exc) or "empty" in str(exc) or "bytes" in str(exc), str(exc)
                else:   # a prefix that is itself a complete state (e.g. a truncated seq file's tokens)
                    assert obj.dump() == cut


def test_foreign_and_empty(meta, tmp_path):
    g = tmp_path / "model.gguf"
    g.write_bytes(open(meta["llama"], "rb").read())
    with pytest.raises(pymem.StateError, match="GGUF model file"):
        state.load(g)
    with pytest.raises(pymem.StateError, match="GGUF"):
        Session.load(g)
    e = tmp_path / "empty.bin"
    e.write_bytes(b"")
    with pytest.raises(pymem.StateError, match="empty"):
        state.load(e)
    t = tmp_path / "text.txt"
    t.write_text("hello world, this is not a state\n" * 10)
    with pytest.raises(pymem.StateError):
        state.load(t)
    with pytest.raises(pymem.StateFileError, match="no such file"):
        state.load(tmp_path / "missing.session")
    s = _samples(meta)["seq_file"]
    with pytest.raises(pymem.StateError, match="this looks like a sequence state file"):
        Session.parse(s)
    with pytest.raises(pymem.StateError, match="version 12 at offset 4"):
        Session.parse(struct.pack("<II", state.MAGIC_SESSION, 12) + b"\x00" * 8)
    with pytest.raises(pymem.StateError, match="token count 1000000"):
        Session.parse(struct.pack("<III", state.MAGIC_SESSION, 11, 10 ** 6) + b"\x00" * 16)


def test_trailing_bytes(meta):
    smp = _samples(meta)
    s = smp["session"] + b"\x01\x02\x03\x04"
    with pytest.raises(pymem.StateError, match="4 bytes after the state.*did not read all"):
        Session.parse(s, model=meta["jamba"])
    obj = Session.parse(s, model=meta["jamba"], strict=False)
    assert obj.trailing == b"\x01\x02\x03\x04" and obj.dump() == s
    q = smp["seq_file"] + b"\x00" * 5
    x = SeqState.parse(q, model=meta["gemma2"])   # llama_state_seq_load_file ignores trailing bytes
    assert len(x.trailing) == 5 and x.dump() == q
    assert "trailing" in x.describe()
    with pytest.raises(pymem.StateError, match="parse only partly.*give the model"):
        SeqState.parse(q)    # without the model, trailing bytes look like a truncated state
    with pytest.raises(pymem.StateError, match="parse only partly"):
        Session.parse(s, strict=False)


def test_atomic_save(meta, tmp_path, monkeypatch):
    sess = Session.from_memory(filled(meta["llama"]), [1, 2])
    out = tmp_path / "out.session"
    out.write_bytes(b"old")

    def boom():
        yield b"partial"
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sess, "chunks", boom)
    with pytest.raises(RuntimeError):
        sess.save(out)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.session"]
    monkeypatch.undo()
    seen = []
    sess.save(out, progress=lambda d, t: seen.append((d, t)))
    assert out.read_bytes() == sess.dump() and seen[-1] == (sess.nbytes, sess.nbytes)
    assert Session.load(out, progress=lambda d, t: seen.append(d)).dump() == sess.dump()


if given is not None:
    @settings(max_examples=300, deadline=None)
    @given(data=hs.data())
    def test_random_corruption(meta, data):
        """Random byte flips and truncations of every file type: a StateError naming an
        offset, or a state that dumps back to exactly the corrupted bytes; edits of a parsed
        corrupt state fail cleanly or succeed."""
        smp = _samples_cache(meta)
        kind = data.draw(hs.sampled_from(sorted(smp)))
        raw = bytearray(smp[kind])
        for _ in range(data.draw(hs.integers(1, 4))):
            i = data.draw(hs.integers(0, len(raw) - 1))
            raw[i] = data.draw(hs.integers(0, 255))
        if data.draw(hs.booleans()):
            raw = raw[:data.draw(hs.integers(0, len(raw)))]
        use_model = data.draw(hs.booleans())
        model = meta[_model_of(kind)] if use_model else None
        try:
            obj = state.parse(bytes(raw), model=model, kind=_kind_of(kind) if kind == "sections" else None)
        except pymem.StateError as exc:
            assert str(exc)
            return
        assert obj.dump() == bytes(raw)
        obj.describe()
        json.dumps(obj.summary())
        try:
            obj.edit([("seq_keep", 0)], model=model)
        except (EditError, pymem.StateError):
            pass

    _CACHE: dict = {}

    def _samples_cache(meta):
        if not _CACHE:
            _CACHE.update(_samples(meta))
        return _CACHE
