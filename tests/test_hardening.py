"""Hardening: bad input of every kind for every memory type, and the promises that hold under
it.

1. every state parser (whole / per sequence, bare / llama envelope, every memory type) on
   truncated blobs (every byte offset), on counts larger than the data or the memory, on
   mismatched sections, and on foreign / wrong-version files: a StateError naming what and
   where (an offset), and the memory byte-for-byte unchanged;
2. invalid arguments to the public API: a pymem exception (or, where llama.cpp silently
   accepts or ignores the argument, the same silent result), the memory unchanged;
3. files are written atomically, even when the writer is SIGKILLed mid-write;
4. one memory used from several threads gives the sequential result; long C calls release
   the GIL;
5. hypothesis on the entry points that read untrusted bytes (Memory.state_read of every
   memory type, ``pymem inspect``).

No llama.cpp needed: the KV blobs come from tests/vectors (recorded from llama.cpp b11739),
the other memory types' blobs from hand-built memories.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pymem
from pymem import state
from pymem.state.sections import parse_kv, parse_rec
from pymem.state import SeqState, Session

from test_kv_unit import _mutations as kv_mutations
from test_types_unit import KINDS, decode, kv as kv_kw, rec as rec_kw
from test_vectors import VECTORS, build as build_vector_case, hexbytes, parse as parse_vectors

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs
except ImportError:  # pragma: no cover
    given = None

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# =============================================================================================
# helpers
# =============================================================================================
def make(kind: str, unified: bool = True, n_rs_seq: int = 0, arch: str = "test"):
    """One memory of each kind (4 model layers, 6 for hybrid-iSWA; KV layers hold 1 or 2 heads of
    32, f16; two recurrent layers), n_seq_max 3."""
    a = kv_kw(unified=unified, arch=arch, n_head_kv=[1, 2, 1, 2])
    r = rec_kw(n_rs_seq=n_rs_seq, arch=arch)
    if kind == "kv":
        return pymem.KVCache(**a)
    if kind == "iswa":
        return pymem.KVCacheISWA(**a, swa_layers=[0, 2], n_swa=4, swa_full=False, n_ubatch=8)
    if kind == "recurrent":
        return pymem.RecurrentMemory(**r)
    if kind == "hybrid":
        return pymem.HybridMemory(attn=dict(a, layers=[0, 2]), recurrent=r)
    assert kind == "hybrid_iswa"      # 6 model layers: base 0, 4; SWA 2, 5; recurrent 1, 3
    a = dict(a, n_layer=6, n_head_kv=[1, 2, 1, 2, 2, 1], layers=[0, 2, 4, 5], swa_layers=[2, 5], n_swa=4)
    return pymem.HybridISWAMemory(attn=a, recurrent=dict(r, n_layer=6))


def randomize(m, seed: int) -> None:
    """Random bytes in every K / V / r / s tensor (finite f16 values, so shifts stay finite)."""
    rng = np.random.default_rng(seed)
    for part in m.kv_parts():
        for il in part.layers:
            for s in range(part.n_stream):
                for view in (part.k(il, s), part.v(il, s)):
                    view[...] = rng.standard_normal(view.shape).astype(view.dtype)
    rec = getattr(m, "recurrent", None)
    if rec is not None:
        for il in rec.layers:
            for view in (rec.r(il), rec.s(il)):
                view[...] = rng.standard_normal(view.shape).astype(view.dtype)


def filled(kind: str, seed: int = 0, unified: bool = True, n_rs_seq: int = 0, extra: bool = False):
    """seq 0: positions 0..11, seq 1: 0..4, random tensors; extra: seq 2 too (0..2)."""
    m = make(kind, unified=unified, n_rs_seq=n_rs_seq)
    decode(m, 0, 12)
    decode(m, 1, 5)
    if extra:
        decode(m, 2, 3)
    randomize(m, seed)
    return m


def n_seq(m) -> int:
    n = getattr(m, "n_seq_max", None)
    return n if n is not None else m.kv_parts()[0].n_seq_max


def snap(m) -> tuple:
    """Everything observable about a memory: the whole state, every sequence's state and
    positions, cell metadata and search heads of every KV stream, recurrent cells, rollback
    indices and counters, the pending-update flag."""
    seqs = range(n_seq(m))
    out = [m.state_write(), [m.state_write(s) for s in seqs], [(m.seq_pos_min(s), m.seq_pos_max(s)) for s in seqs],
           m.update_pending]
    for part in m.kv_parts():
        for s in range(part.n_stream):
            out.append((part.cells_view(s).tobytes(), part.stream_info(s)))
    rec = getattr(m, "recurrent", None)
    if rec is not None:
        out.append((rec.cells_view().tobytes(), rec.rs_idx().tobytes(), rec.info()))
    return tuple(out)


def kv_section_bounds(m, blob: bytes) -> list[tuple[int, int]]:
    """(start, end) of every KV section of a whole bare state of m, then the REC section."""
    out, off = [], 0
    for part in m.kv_parts():
        _, end = parse_kv(blob, off, format=part.format, cell_ext=part.cell_ext)
        out.append((off, end))
        off = end
    if hasattr(m, "recurrent"):
        _, end = parse_rec(blob, off, len(m.recurrent.layers))
        out.append((off, end))
    assert out[-1][1] == len(blob)
    return out


_NEEDS = re.compile(r"needs (\d+) bytes at offset (\d+), (\d+) left")
_OFFSET = re.compile(r"offset (\d+)")


def check_truncation_message(msg: str, cut: int) -> None:
    """A truncation error names the offset it stopped at; when it says what it needs, the
    numbers must add up: the field starts at or before the cut and does not fit."""
    m = _NEEDS.search(msg)
    if m:
        need, off, left = map(int, m.groups())
        assert off <= cut < off + need and left == cut - off, (cut, msg)
        return
    offs = [int(x) for x in _OFFSET.findall(msg)]
    assert offs and min(offs) <= cut, (cut, msg)


def assert_rejected(m, blob: bytes, seq: int, before: tuple, envelope=None, exc=pymem.StateError,
                    match: str | None = None, offset: bool = True) -> str:
    """state_check and state_read both reject blob with exc, the message names an offset,
    and m is unchanged.  Returns the message."""
    with pytest.raises(exc) as e1:
        m.state_check(blob, seq, envelope=envelope)
    with pytest.raises(exc) as e2:
        m.state_read(blob, seq, envelope=envelope)
    msg = str(e2.value)
    assert str(e1.value).split(": ", 1)[1] == msg.split(": ", 1)[1], (str(e1.value), msg)
    if match:
        assert re.search(match, msg), msg
    if offset:
        assert _OFFSET.search(msg), f"no offset in {msg!r}"
    assert snap(m) == before, msg
    return msg


# =============================================================================================
# 1. state parsers: truncation at every byte offset
# =============================================================================================
def light_snap(m) -> tuple:
    """The whole state, every sequence's positions and the pending flag (checked after every
    failed read; snap() adds per-sequence states, cells, heads and rollback indices)."""
    return m.state_write(), [(m.seq_pos_min(s), m.seq_pos_max(s)) for s in range(n_seq(m))], m.update_pending


def _truncate_everywhere(m, blob: bytes, seq: int, envelope, stride: int = 1) -> int:
    """Every prefix of blob (all of them, or every stride-th beyond the first 512 bytes) is
    rejected by state_check and state_read with a StateError naming the offset, and leaves m
    exactly as it was (light_snap after every prefix, the full snap after every 16th and at
    the end); the whole blob passes state_check.  Returns the number of prefixes tried."""
    before, before_light = snap(m), light_snap(m)
    assert m.state_check(blob, seq, envelope=envelope) == len(blob)
    cuts = [c for c in range(len(blob)) if c < 512 or c % stride == 0 or c == len(blob) - 1]
    for k, cut in enumerate(cuts):
        part = blob[:cut]
        for fn in (m.state_check, m.state_read):
            try:
                fn(part, seq, envelope=envelope)
            except pymem.StateError as exc:
                check_truncation_message(str(exc), cut)
            else:
                raise AssertionError(f"{fn.__name__} accepted {cut} of {len(blob)} bytes")
        if light_snap(m) != before_light or (k % 16 == 0 and snap(m) != before):
            raise AssertionError(f"a failed read of {cut} of {len(blob)} bytes changed the memory")
    assert snap(m) == before
    return len(cuts)


def _vector_cases() -> dict:
    out = {}
    for f in ("kv_ops.txt", "kv_state.txt"):
        for c in parse_vectors((VECTORS / f).read_text(), f):
            out[c.name] = c
    return out


#: llama.cpp-recorded cases whose last whole and sequence blobs are truncated everywhere:
#: unified / per-sequence streams, V transposed / flash attention, f16 / q8_0, formats 11 / 10
LLAMA_CASES = ["holes_unified_vtrans", "holes_streams_fa", "types_llama_q8_0_q8_0_fa", "format10_streams_fa"]


def _llama_blobs(case):
    whole = [hexbytes(v) for k, v, _ in case.events if k == "expect_whole"][-1]
    seqs = [(int(v.split()[0]), hexbytes(v.split()[1])) for k, v, _ in case.events if k == "expect_seq"]
    return whole, seqs[-1]


@pytest.mark.parametrize("name", LLAMA_CASES)
def test_llama_blobs_truncated_at_every_offset(name):
    """llama.cpp's own blobs (tests/vectors), every prefix, bare and in llama.cpp's envelope,
    whole and per sequence, into a cache holding llama.cpp's state."""
    case = _vector_cases()[name]
    whole, (src_seq, seq_blob) = _llama_blobs(case)
    m = build_vector_case(case)
    assert m.state_read(whole, envelope="llama") == len(whole)
    arch = case.params["arch"].encode()
    assert whole[4:4 + len(arch)] == arch and seq_blob[:4] == struct.pack("<I", state.MAGIC_SEQ_BLOB)
    dst_seq = (src_seq + 1) % m.n_seq_max
    n = 0
    for blob, seq, env in [(whole, -1, "llama"), (whole[4 + len(arch):], -1, None),
                           (seq_blob, dst_seq, "llama"), (seq_blob[8:], dst_seq, None)]:
        n += _truncate_everywhere(m, blob, seq, env)
    assert n == 2 * (len(whole) + len(seq_blob)) - 4 - len(arch) - 8     # every offset of all four


@pytest.mark.parametrize("kind", KINDS)
def test_every_memory_type_truncated_at_every_offset(kind):
    """Whole and per-sequence states of every memory type (unified and, for the KV kinds,
    per-sequence streams; a recurrent part with rollback snapshots), bare and enveloped,
    cut at every byte."""
    variants = [dict(unified=True)]
    if kind != "recurrent":
        variants.append(dict(unified=False))
    if kind in ("recurrent", "hybrid"):
        variants.append(dict(n_rs_seq=2))
    for i, v in enumerate(variants):          # the first variant at every offset, the others every 5th
        src = filled(kind, seed=1, **v)
        dst = filled(kind, seed=2, extra=True, **v)
        if v.get("n_rs_seq"):
            assert dst.seq_rm(0, 11, -1)                # a pending rollback must survive too
            assert dst.recurrent.rs_idx()[0] == 1
        for seq, target in ((-1, -1), (1, 2)):
            for env in (None, "llama"):
                _truncate_everywhere(dst, src.state_write(seq, envelope=env), target, env, 1 if i == 0 else 5)


# =============================================================================================
# 1. state parsers: counts, ids and mismatched sections
# =============================================================================================
def _u32(x: int) -> bytes:
    return struct.pack("<I", x & 0xFFFFFFFF)


def _splice(blob: bytes, start: int, end: int, new: bytes) -> bytes:
    return blob[:start] + new + blob[end:]


def test_kv_section_mismatches_in_every_kind():
    """test_kv_unit's KV-section mutations (stream count, cell count, seq ids, negative
    positions, v_trans, k_rot / v_rot, K type, K row size, V rows, layer count), applied to
    every KV section of every memory type with KV parts: rejected, the message names the
    section of a composite and the offset, nothing changed."""
    names = {"kv": [None], "iswa": ["base KV section", "SWA KV section"], "hybrid": ["attention KV section"],
             "hybrid_iswa": ["base KV section", "SWA KV section"]}
    n = 0
    for kind, labels in names.items():
        m = filled(kind, seed=3)
        blob = m.state_write()
        bounds = kv_section_bounds(m, blob)
        before = snap(m)
        for (start, end), label in zip(bounds, labels):
            sec = blob[start:end]
            for what, bad in kv_mutations(sec):
                msg = assert_rejected(m, _splice(blob, start, end, bad), -1, before)
                if label:
                    assert msg.startswith(f"state_read: {label}"), (kind, what, msg)
                n += 1
        assert m.state_read(blob) == len(blob) and m.state_write() == blob
    assert n >= 40


def _rec_mutations(sec_bytes: bytes, n_recr: int, n_seq_max: int, size: int):
    """(description, mutated REC section, message pattern) for a whole-state REC section."""
    def mut(fn):
        s, _ = parse_rec(sec_bytes, 0, n_recr)
        fn(s)
        return s.dump()

    yield "cell_count > size", _u32(size + 1) + sec_bytes[4:], r"cells do not fit"
    yield "cell_count 2^31", _u32(2 ** 31) + sec_bytes[4:], r"cells do not fit"
    yield "cell_count 0xFFFFFFFF", _u32(0xFFFFFFFF) + sec_bytes[4:], r"cells do not fit"
    yield "seq id == n_seq_max", mut(lambda s: s.cells[0].seq_ids.__setitem__(0, n_seq_max)), r"seq id 3 is out of range"
    yield "seq id -1", mut(lambda s: s.cells[0].seq_ids.__setitem__(0, -1)), r"seq id -1 is out of range"
    yield "seq id 2^31-1", mut(lambda s: s.cells[0].seq_ids.__setitem__(0, 2 ** 31 - 1)), r"out of range"
    yield "n_seq_id 0xFFFFFFFF", sec_bytes[:8] + _u32(0xFFFFFFFF) + sec_bytes[12:], r"lists 4294967295 seq ids"
    yield "two tails for one seq", mut(lambda s: s.cells[1].seq_ids.append(s.cells[0].seq_ids[0])), r"duplicate tail"
    yield "n_layer too small", mut(lambda s: setattr(s, "n_layer", s.n_layer - 1)), r"layers, the model has"
    yield "n_layer 0xFFFFFFFF", mut(lambda s: setattr(s, "n_layer", 0xFFFFFFFF)), r"layers, the model has"
    yield "s_trans 2", mut(lambda s: setattr(s, "s_trans", 2)), r"s_trans"
    yield "r type f16", mut(lambda s: setattr(s.layers[0], "r_type", 1)), r"layer 1 r: type 1"
    yield "s type bf16", mut(lambda s: setattr(s.layers[1], "s_type", 30)), r"layer 3 s: type 30"
    yield "r row + 4", mut(lambda s: setattr(s.layers[1], "r_row", s.layers[1].r_row + 4)), r"layer 3 r: row size"
    yield "s row 0", mut(lambda s: setattr(s.layers[0], "s_row", 0)), r"layer 1 s: row size 0"
    yield "r row 2^63", mut(lambda s: setattr(s.layers[0], "r_row", 2 ** 63)), r"row size"


@pytest.mark.parametrize("kind", ["recurrent", "hybrid", "hybrid_iswa"])
def test_recurrent_section_mismatches(kind):
    """The REC section of every memory with one: cell counts beyond the memory (up to
    0xFFFFFFFF: refused before anything is allocated), seq ids llama.cpp refuses, two tails
    for one sequence, layer counts, s_trans, r / s types and row sizes; per-sequence blobs
    whose cells carry ids.  A pending rollback index survives every failure."""
    m = filled(kind, seed=4, n_rs_seq=2 if kind != "hybrid_iswa" else 0)
    if kind != "hybrid_iswa":
        assert m.seq_rm(0, 11, -1) and m.recurrent.rs_idx()[0] == 1
    blob = m.state_write()
    start, end = kv_section_bounds(m, blob)[-1]
    before = snap(m)
    sec = blob[start:end]
    label = "state_read: recurrent section" if kind != "recurrent" else "state_read: "
    for what, bad, pat in _rec_mutations(sec, 2, 3, m.recurrent.size):
        t = time.perf_counter()
        msg = assert_rejected(m, _splice(blob, start, end, bad), -1, before, match=pat)
        assert time.perf_counter() - t < 0.5, what        # no allocation of what the header claims
        assert msg.startswith(label), (what, msg)
    # a sequence blob's cells carry no ids (llama.cpp writes n_seq_id 0), and fit the memory
    one = m.state_write(1)
    s0 = rec_section_offset_seq(m, one)
    assert_rejected(m, _splice(one, s0 + 8, s0 + 12, _u32(1)), 2, before, match=r"a sequence blob has n_seq_id 0, not 1")
    assert_rejected(m, _splice(one, s0, s0 + 4, _u32(m.recurrent.size + 1)), 2, before, match=r"4 cells do not fit in 3")
    assert_rejected(m, _splice(one, s0, s0 + 4, _u32(0xFFFFFFFF)), 2, before, match=r"cells do not fit")


def rec_section_offset_seq(m, blob: bytes) -> int:
    """Offset of the REC section in a per-sequence bare state."""
    off = 0
    for part in m.kv_parts():
        _, off = parse_kv(blob, off, format=part.format, cell_ext=part.cell_ext)
    return off


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # pragma: no cover
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def test_huge_kv_counts_fail_fast():
    """Counts in the KV section far beyond the data: 2^31 and 2^32-1 cells, streams, layers,
    seq ids per cell; refused from the header, fast, without allocating what it claims (an
    attempt would be a MemoryError, not a StateError, or raise the peak RSS)."""
    rss = _peak_rss_mb()
    m = filled("kv", seed=5)
    blob = m.state_write()
    before = snap(m)
    sec, _ = parse_kv(blob)
    n_cells = len(sec.streams[0].cells)
    layers_at = 8 + 12 * n_cells + 4               # n_stream, cell_count, cells (pos, n, id), v_trans
    cases = [
        (_u32(2 ** 31) + blob[4:], r"n_stream 2147483648, this cache has 1"),
        (_u32(0xFFFFFFFF) + blob[4:], r"n_stream 4294967295"),
        (blob[:4] + _u32(2 ** 31) + blob[8:], r"2147483648 cells do not fit in 256"),
        (blob[:4] + _u32(0xFFFFFFFF) + blob[8:], r"4294967295 cells do not fit in 256"),
        (blob[:12] + _u32(0xFFFFFFFF) + blob[16:], r"lists 4294967295"),
        (blob[:layers_at] + _u32(0xFFFFFFFF) + blob[layers_at + 4:], r"4294967295 layers, this cache has 4 \(offset"),
    ]
    for bad, pat in cases:
        t = time.perf_counter()
        assert_rejected(m, bad, -1, before, match=pat)
        assert_rejected(m, bad, 2, before, match=pat.replace("lists", "a sequence blob needs exactly 1 seq id per "
                                                                      "cell, not"))
        assert time.perf_counter() - t < 0.5, pat
    # the same counts in files: pymem.state refuses them from the header too
    sess = Session.from_memory(m, [1, 2, 3], arch="test").dump()
    at = 12 + 12 + 4 + 4                           # magic, version, n_tokens, tokens, arch len, "test"
    for bad, pat in [(sess[:8] + _u32(0xFFFFFFFF) + sess[12:], r"token count 4294967295"),
                     (sess[:at + 4] + _u32(2 ** 31) + sess[at + 8:], r"cell_count 2147483648|no section layout"),
                     (sess[:at] + _u32(0xFFFFFFFF) + sess[at + 4:], r"n_stream|no section layout")]:
        t = time.perf_counter()
        with pytest.raises(pymem.StateError, match=pat):
            Session.parse(bad)
        assert time.perf_counter() - t < 0.5
    assert _peak_rss_mb() - rss < 64


def test_mismatched_memories_are_rejected():
    """Whole states of one cache read into a differently shaped one: stream count
    (unified <-> per-sequence streams), V layout (v_trans), K / V types, layer count, head
    count (row size), state format, cell ext.  All refused, nothing changed."""
    base = dict(n_layer=2, n_head_kv=1, n_embd_head_k=32, size=256, n_seq_max=3, rope=pymem.Rope(n_rot=32),
                arch="test")
    variants = {
        "unified": {}, "streams": dict(unified=False), "fa": dict(v_trans=False), "f32": dict(type_k="f32"),
        "v_f32": dict(type_v="f32"), "3 layers": dict(n_layer=3), "2 heads": dict(n_head_kv=2),
        "format 10": dict(format=10), "m-rope": dict(n_pos_per_embd=4, rope=None),
    }
    blobs = {}
    for name, kw in variants.items():
        m = pymem.KVCache(**{**base, **kw})
        decode(m, 0, 6)
        decode(m, 1, 2)
        blobs[name] = (m.state_write(), m.state_write(1))
    for name, kw in variants.items():
        m = pymem.KVCache(**{**base, **kw})
        decode(m, 2, 4)
        before = snap(m)
        for other, (whole, one) in blobs.items():
            if other == name:
                assert m.state_check(whole) == len(whole)
                continue
            assert_rejected(m, whole, -1, before)
            if not (name == "unified" and other == "streams" or name == "streams" and other == "unified"):
                assert_rejected(m, one, 1, before)      # one stream's cells fit either


@pytest.mark.parametrize("kind", KINDS)
def test_envelope_errors_every_kind(kind):
    """The llama envelope: another architecture, a wrong sequence magic, an architecture
    name longer than the data; an unknown envelope or flag is an argument error."""
    m = filled(kind, seed=6)
    before = snap(m)
    whole = m.state_write(envelope="llama")
    one = m.state_write(1, envelope="llama")
    other = b"\x05\0\0\0llama" + whole[8:]
    assert_rejected(m, other, -1, before, envelope="llama", match=r"wrong model arch: 'llama' instead of 'test'")
    assert_rejected(m, _u32(0xFFFFFFFF) + whole[4:], -1, before, envelope="llama", match=r"architecture name")
    assert_rejected(m, _u32(0xDEADBEEF) + one[4:], 1, before, envelope="llama", match=r"wrong sequence state magic")
    assert_rejected(m, whole, -1, before, match=None, offset=False)        # envelope where none is expected
    for kw, exc in [(dict(envelope="json"), pymem.InvalidArgumentError), (dict(flags=0x10), pymem.InvalidArgumentError),
                    (dict(flags=2), pymem.UnsupportedError)]:
        for fn in (m.state_read, m.state_check):
            with pytest.raises(exc):
                fn(whole, **kw)
        assert snap(m) == before


@pytest.mark.parametrize("kind", KINDS)
def test_restore_seq_ids(kind):
    """Target sequence ids of a per-sequence restore: ids llama.cpp refuses are argument
    errors; a unified KV cache accepts any id below 256 (as llama.cpp does), a recurrent part
    only ids below its size."""
    m = filled(kind, seed=7)
    one = m.state_write(1)
    before = snap(m)
    for seq in (-2, 256, 2 ** 31 - 1):
        for fn in (m.state_read, m.state_check):
            with pytest.raises(pymem.InvalidArgumentError):
                fn(one, seq)
        assert snap(m) == before
    if kind in ("kv", "iswa"):
        assert m.state_read(one, 200) == len(one)          # unified: ids up to 255
        assert m.seq_pos_max(200) == m.seq_pos_max(1)
        # ... but, as llama.cpp, writes the cells of an id >= n_seq_max without ids, which no
        # restore accepts (tests/vectors kv_ops.txt, unified_foreign_ids)
        after = snap(m)
        assert_rejected(m, m.state_write(200), 1, after, match="needs exactly 1 seq id per cell, not 0")
    else:
        with pytest.raises(pymem.InvalidArgumentError, match="seq_id 3 is not in"):
            m.state_read(one, 3)
        assert snap(m) == before
    s = make(kind, unified=False) if kind != "recurrent" else make(kind)
    with pytest.raises(pymem.InvalidArgumentError):
        s.state_read(one, 3)


def test_restore_that_does_not_fit_changes_nothing():
    """A per-sequence restore into a stream without room: llama.cpp fails the restore (and
    leaves the removed cells removed); pymem raises and changes nothing."""
    m = pymem.KVCache(**kv_kw(size=256, n_seq_max=2))
    decode(m, 0, 200)
    decode(m, 1, 40)
    src = pymem.KVCache(**kv_kw(size=256, n_seq_max=2))
    decode(src, 0, 100)
    one = src.state_write(0)
    before = snap(m)
    with pytest.raises(pymem.Error) as ei:
        m.state_read(one, 1)
    assert isinstance(ei.value, (pymem.NoSlotError, pymem.StateError)), ei.value
    assert snap(m) == before


def test_session_and_sequence_file_headers(tmp_path):
    """Wrong magic and version of session and sequence state files, from bytes and from files:
    a StateError naming the problem and the offset; a missing or unreadable path: a
    StateFileError."""
    m = filled("hybrid", seed=8)
    sess = Session.from_memory(m, [5, 6, 7]).dump()
    seqf = SeqState.from_memory(m, 1, [5]).dump()
    cases = [
        (Session, b"ggsn" + sess[4:], r"magic 0x6e736767 at offset 0 is not 0x6767736e \('ggsn'\)"),
        (Session, seqf, r"at offset 0 is not 0x6767736e .*this looks like a sequence state file"),
        (Session, sess[:4] + _u32(12) + sess[8:], r"version 12 at offset 4 is not supported \(10 or 11"),
        (Session, sess[:4] + _u32(0) + sess[8:], r"version 0 at offset 4"),
        (Session, sess[:4] + _u32(4) + sess[8:], r"version 4 at offset 4"),       # a seq-file version
        (Session, sess[:6], r"truncated session file.*: the version needs 4 bytes at offset 4"),
        (SeqState, sess, r"magic 0x6767736e at offset 0 is not 0x67677371.*session file"),
        (SeqState, seqf[:4] + _u32(5) + seqf[8:], r"version 5 at offset 4 is not supported \(3 or 4"),
        (SeqState, seqf[:4] + _u32(11) + seqf[8:], r"version 11 at offset 4"),   # a session version
        (SeqState, seqf[:4] + _u32(0xFFFFFFFF) + seqf[8:], r"version 4294967295 at offset 4"),
        (SeqState, seqf[:3], r"truncated sequence state file.*: the magic needs 4 bytes at offset 0"),
        (SeqState, seqf[:8] + _u32(2 ** 30) + seqf[12:], r"token count 1073741824 at offset 8"),
    ]
    for cls, data, pat in cases:
        with pytest.raises(pymem.StateError, match=pat):
            cls.parse(data)
        p = tmp_path / "f.bin"
        p.write_bytes(data)
        with pytest.raises(pymem.StateError, match=pat) as ei:
            cls.load(p)
        assert str(p) in str(ei.value)
    with pytest.raises(pymem.StateFileError, match="no such file"):
        SeqState.load(tmp_path / "nope.ggsq")
    with pytest.raises(pymem.StateFileError, match="is a directory"):
        Session.load(tmp_path)
    assert Session.parse(sess).dump() == sess and SeqState.parse(seqf).dump() == seqf


@pytest.mark.parametrize("kind", ["kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"])
def test_other_shapes_are_rejected(kind):
    """Whole and per-sequence states of each memory type read into memories of the same type
    but another shape: unified <-> per-sequence streams (the stream count), the recurrent
    part's widths, layer split and type.  Refused, nothing changed."""
    def shaped(**kw):
        if kind == "recurrent":
            return pymem.RecurrentMemory(**rec_kw(**kw))
        if kind in ("hybrid", "hybrid_iswa") and kw:
            attn = kv_kw(layers=[0, 2])
            if kind == "hybrid_iswa":
                attn.update(swa_layers=[2], n_swa=4)
                return pymem.HybridISWAMemory(attn=attn, recurrent=rec_kw(**kw))
            return pymem.HybridMemory(attn=attn, recurrent=rec_kw(**kw))
        return make(kind)

    m = filled(kind, seed=9)
    whole, one = m.state_write(), m.state_write(1)
    others = []
    if kind != "recurrent":
        others.append(make(kind, unified=False))
    if kind in ("recurrent", "hybrid", "hybrid_iswa"):
        others += [shaped(n_embd_r=32), shaped(n_embd_s=96), shaped(type_r="f16")]
        if kind == "recurrent":
            others += [shaped(layers=[1, 2, 3]), shaped(n_layer=5)]
            # the REC section carries widths, not layer ids (as in llama.cpp): the same widths
            # on other model layers read fine
            same = shaped(layers=[0, 2])
            assert same.state_read(whole) == len(whole) and same.state_write() == whole
    for o in others:
        decode(o, 2, 3)
        before = snap(o)
        assert_rejected(o, whole, -1, before)
        if kind == "recurrent" or not (o.kv_parts() and not o.kv_parts()[0].unified and kind in ("kv", "iswa")):
            assert_rejected(o, one, 1, before)


# =============================================================================================
# 2. invalid arguments
# =============================================================================================
ERR = pymem.InvalidArgumentError


def _construct(kind: str, kv: dict | None = None, rec: dict | None = None, **model):
    """A memory of kind from KV / recurrent keyword overrides and iSWA model-level ones."""
    a = kv_kw(**(kv or {}))
    r = rec_kw(**(rec or {}))
    if kind == "kv":
        return pymem.KVCache(**a)
    if kind == "iswa":
        return pymem.KVCacheISWA(**{"swa_layers": [0, 2], "n_swa": 4, **a, **model})
    if kind == "recurrent":
        return pymem.RecurrentMemory(**r)
    if kind == "hybrid":
        return pymem.HybridMemory(attn=dict(a, layers=[0, 2]), recurrent=r)
    return pymem.HybridISWAMemory(attn={"swa_layers": [2], "n_swa": 4, **a, "layers": [0, 2], **model},
                                  recurrent=r)


_KV_BAD = [dict(size=-1), dict(size=2 ** 32), dict(size=2 ** 30), dict(n_seq_max=-1), dict(n_seq_max=0),
           dict(n_seq_max=257), dict(type_k="q9_9"), dict(type_v="Q9_9"), dict(type_k=-1), dict(type_v=999),
           dict(n_head_kv=-1), dict(n_head_kv=[1, 1, -2, 1]), dict(n_head_kv=0), dict(n_embd_head_k=-32),
           dict(n_embd_head_v=[32, 32, 32]), dict(n_swa=-1), dict(n_pos_per_embd=-1), dict(n_pos_per_embd=2),
           dict(format=-1), dict(format=12), dict(n_embd_v_gqa_max=-1), dict(n_layer=-1), dict(layers=[-1]),
           dict(layers=[0, 9]), dict(swa_type=7), dict(swa_type="diagonal"),
           dict(rope=pymem.Rope(n_rot=-2)), dict(rope=pymem.Rope(n_rot=32, mode=5)),
           dict(rope=pymem.Rope(n_rot=32, mode="yarn")), dict(rope=pymem.Rope(n_rot=32, n_ctx_orig=-1)),
           dict(rope=pymem.Rope(n_rot=32, freq_base=0.0))]
_REC_BAD = [dict(size=-1), dict(size=0), dict(size=257), dict(n_seq_max=-1), dict(n_seq_max=0),
            dict(n_seq_max=257), dict(type_r="q9_9"), dict(type_s="q9_9"), dict(type_r=-7), dict(n_rs_seq=-1),
            dict(n_rs_seq=10 ** 6), dict(n_embd_r=-64), dict(n_embd_s=[128, 128, -1, 128]), dict(n_embd_p=-1),
            dict(n_layer=-1), dict(layers=[5]), dict(layers=[3, 1])]


def _bad_construction_cases():
    for kind in ("kv", "iswa", "hybrid", "hybrid_iswa"):
        for kw in _KV_BAD:
            if kind in ("hybrid", "hybrid_iswa") and "layers" in kw:
                continue                      # the attention layers are chosen by the helper
            yield kind, dict(kv=kw)
    for kind in ("recurrent", "hybrid", "hybrid_iswa"):
        for kw in _REC_BAD:
            yield kind, dict(rec=kw)
    for kind in ("iswa", "hybrid_iswa"):
        for kw in (dict(n_swa=-4), dict(n_swa=0), dict(swa_layers=[9]), dict(swa_layers=[-1]),
                   dict(n_ubatch=0, swa_full=False), dict(n_ubatch=-1, swa_full=False)):
            yield kind, kw
    yield "hybrid", dict(rec=dict(n_seq_max=2))                     # the parts disagree
    yield "hybrid", dict(rec=dict(n_layer=5))
    yield "hybrid_iswa", dict(kv=dict(unified=False), rec=dict(n_seq_max=4))


BAD_CONSTRUCTION = list(_bad_construction_cases())


@pytest.mark.parametrize("kind,args", BAD_CONSTRUCTION, ids=[f"{k}-{a}" for k, a in BAD_CONSTRUCTION])
def test_bad_construction_every_type(kind, args):
    """Negative, oversized or unknown construction arguments of every memory type (and of
    their RoPE parameters): a pymem argument error naming the problem, never a crash or a
    bare OverflowError from the C binding."""
    with pytest.raises((pymem.InvalidArgumentError, pymem.UnsupportedError)) as ei:
        _construct(kind, **args)
    assert str(ei.value) and not isinstance(ei.value, OverflowError)


def test_bad_construction_messages():
    with pytest.raises(ERR, match=r"size must be in \[0, 2\^32\), got -1"):
        _construct("kv", kv=dict(size=-1))
    with pytest.raises(pymem.UnsupportedError, match="unsupported type name 'q9_9'"):
        _construct("hybrid_iswa", kv=dict(type_k="q9_9"))
    with pytest.raises(ERR, match=r"n_seq_max 0 must be in \[1, 256\]"):
        _construct("recurrent", rec=dict(n_seq_max=0))
    with pytest.raises(ERR, match=r"swa_layers \[9\] are not model layers"):
        _construct("iswa", swa_layers=[9])
    with pytest.raises(ERR, match=r"unknown swa_type 7"):
        _construct("kv", kv=dict(swa_type=7))


SAME, EMPTY = "same", "empty"          # returns, nothing changed / returns, every sequence dropped
REC_KINDS = ("recurrent", "hybrid", "hybrid_iswa")


def _expect(kind: str, kv, rec):
    """kv: the outcome for the unified KV kinds, rec: for the kinds with a recurrent part
    (hybrids: the recurrent part answers seq_rm first, the attention part aborts elsewhere)."""
    return rec if kind in REC_KINDS else kv


def _id_cases(kind: str):
    """(operation, args, outcome) on a unified memory with n_seq_max 3: ERR where llama.cpp
    aborts, SAME / EMPTY / a value where it silently accepts (a unified cache takes ids up to
    255; the recurrent memory ignores ids it has no cell for and answers seq_rm false)."""
    only_rec = kind == "recurrent"
    hyb = kind in ("hybrid", "hybrid_iswa")
    return [
        ("seq_rm", (-1, 0, -1), _expect(kind, (EMPTY, True), (SAME, False))),
        ("seq_rm", (-2, 0, -1), _expect(kind, ERR, (SAME, False))),
        ("seq_rm", (255, 0, -1), _expect(kind, (SAME, True), (SAME, False))),
        ("seq_rm", (256, 0, -1), _expect(kind, ERR, (SAME, False))),
        ("seq_rm", (0, 2, 5), ("changed", True) if not only_rec else (SAME, True)),   # recurrent: true, keeps all
        ("seq_rm", (0, 5, -1), _expect(kind, ("changed", True), (SAME, False))),      # ... but refuses a tail
        # hybrids: the attention part copies, the recurrent part ignores 255 (positions min/max of the parts)
        ("seq_cp", (0, 255), (SAME, None) if only_rec else ("changed", None) if hyb else ("copied", None)),
        ("seq_cp", (255, 0), (SAME, None)),                                      # 255 holds nothing
        ("seq_cp", (0, 256), (SAME, None) if only_rec else ERR),
        ("seq_cp", (-1, 0), (SAME, None) if only_rec else ERR),
        ("seq_keep", (255,), (EMPTY, None)),
        ("seq_keep", (256,), (EMPTY, None) if only_rec else ERR),
        ("seq_keep", (-1,), (EMPTY, None) if only_rec else ERR),
        ("seq_add", (255, 0, -1, 3), (SAME, None) if only_rec else ("head", None)),  # KV: head = 0, as llama.cpp
        ("seq_add", (256, 0, -1, 3), (SAME, None) if only_rec else ERR),
        ("seq_add", (-1, 0, -1, 0), (SAME, None) if only_rec else ERR),      # checked before the d == 0 return
        ("seq_div", (255, 0, -1, 2), (SAME, None)),
        ("seq_div", (-7, 0, -1, 2), (SAME, None) if only_rec else ERR),
        ("seq_div", (0, 0, -1, 1), (SAME, None)),
        ("seq_div", (0, 0, -1, -(2 ** 31)), ERR),
        ("seq_div", (-7, 0, -1, 0), ERR),                                    # the divisor first
        ("seq_pos_min", (255,), (SAME, -1)),
        ("seq_pos_max", (256,), (SAME, -1) if only_rec else ERR),
        ("seq_pos_min", (-1,), (SAME, -1) if only_rec else ERR),
        ("state_write", (255,), (SAME, "blob")),
        ("state_write", (256,), ERR),
        ("state_write", (-2,), ERR),
        ("state_size", (-1, 0x10), ERR),                                     # unknown flag
        ("state_size", (-1, 2), pymem.UnsupportedError),                      # ON_DEVICE
        # beyond the C types (seq ids, positions and shifts are int32; flags uint32)
        ("seq_rm", (2 ** 31, 0, -1), ERR),
        ("seq_rm", (0, 0, 2 ** 31), ERR),
        ("seq_cp", (0, 1, -1, 2 ** 40), ERR),
        ("seq_keep", (-(2 ** 31) - 1,), ERR),
        ("seq_add", (0, 0, -1, 2 ** 31), ERR),
        ("seq_add", (0, 0, -1, 2 ** 31 - 5), ERR),                           # overflows a position
        ("seq_div", (0, 0, -1, 2 ** 32), ERR),
        ("seq_pos_min", (2 ** 31,), ERR),
        ("seq_pos_max", (-(2 ** 31) - 1,), ERR),
        ("state_write", (2 ** 31,), ERR),
        ("state_write", (-1, -1), ERR),
        ("state_size", (-1, 0, 2 ** 33), ERR),
        ("state_read", (b"", 2 ** 40), ERR),
        ("state_check", (b"", -1, 2 ** 32), ERR),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_ids_and_arguments(kind):
    """Every sequence operation with ids and arguments llama.cpp aborts on (an argument
    error, nothing changed) or silently accepts (the same result as llama.cpp)."""
    n = 0
    for op, args, outcome in _id_cases(kind):
        m = filled(kind, seed=10)
        before = snap(m)
        if isinstance(outcome, type):
            with pytest.raises(outcome) as ei:
                getattr(m, op)(*args)
            assert not isinstance(ei.value, OverflowError)
            assert snap(m) == before, (op, args)
            n += 1
            continue
        what, want = outcome
        got = getattr(m, op)(*args)
        if want == "blob":
            assert isinstance(got, bytes) and m.state_size(*args) == len(got)
        else:
            assert got == want, (op, args, got)
        after = snap(m)
        pos = after[2]
        if what == SAME:
            assert after == before, (op, args)
        elif what == EMPTY:
            assert pos == [(-1, -1)] * 3 and m.state_write() != before[0], (op, args)
        elif what == "head":
            assert after[:4] == before[:4], (op, args)
            assert all(p.stream_info(s)["head"] == 0 for p in m.kv_parts() for s in range(p.n_stream))
        elif what == "copied":
            assert (m.seq_pos_min(255), m.seq_pos_max(255)) == before[2][0], (op, args)
        else:
            assert after != before, (op, args)
        n += 1
    assert n == len(_id_cases(kind))


@pytest.mark.parametrize("kind", ["kv", "iswa", "hybrid", "hybrid_iswa"])
def test_per_sequence_streams_refuse_foreign_ids(kind):
    """With one stream per sequence only ids below n_seq_max exist (llama.cpp aborts on the
    others); a hybrid's seq_rm still gets the recurrent part's false first."""
    m = filled(kind, seed=11, unified=False)
    before = snap(m)
    hyb = kind.startswith("hybrid")
    for op, args in [("seq_rm", (3, 0, -1)), ("seq_cp", (0, 3)), ("seq_cp", (3, 0)), ("seq_keep", (3,)),
                     ("seq_add", (3, 0, -1, 1)), ("seq_div", (3, 0, -1, 2)), ("seq_pos_min", (3,)),
                     ("seq_pos_max", (200,)), ("state_read", (m.state_write(1), 3))]:
        if hyb and op == "seq_rm":
            assert m.seq_rm(*args) is False
        else:
            with pytest.raises(ERR, match="seq_id"):
                getattr(m, op)(*args)
        assert snap(m) == before, (op, args)
    assert m.state_write(200) == m.state_write(255)          # writes an empty state of every stream
    with pytest.raises(pymem.UnsupportedError, match="whole sequences only"):
        m.seq_cp(0, 1, 2, 5)                                 # partial copy across streams
    assert snap(m) == before


@pytest.mark.parametrize("kind", KINDS)
def test_state_write_into_and_buffers(kind):
    """state_write_into a buffer one byte too small (every envelope, whole and per sequence):
    BufferTooSmallError with the size needed, nothing written past the buffer, the memory
    unchanged; read-only buffers and non-buffers are Python errors; state_read of foreign
    objects too."""
    m = filled(kind, seed=12)
    before = snap(m)
    for seq in (-1, 0, 1):
        for env in (None, "llama"):
            want = m.state_write(seq, envelope=env)
            for size in (0, 1, len(want) - 1):
                buf = bytearray(size + 16)
                view = memoryview(buf)[:size]
                with pytest.raises(pymem.BufferTooSmallError, match="needs") as ei:
                    m.state_write_into(view, seq, envelope=env)
                assert ei.value.needed == len(want) and buf[size:] == bytes(16)
            exact = np.zeros(len(want), np.uint8)
            assert m.state_write_into(exact, seq, envelope=env) == len(want) and exact.tobytes() == want
    for bad in (bytes(100000), memoryview(bytes(100000))):
        with pytest.raises(BufferError):
            m.state_write_into(bad)
    for bad in ("text", None, [1, 2, 3], 5):
        with pytest.raises(TypeError):
            m.state_read(bad)
    with pytest.raises(pymem.StateError):
        m.state_read(np.zeros(3, np.int32))
    assert snap(m) == before


_GC_CHILD = textwrap.dedent("""
    import gc, sys
    sys.path.insert(0, sys.argv[1])
    import pymem
    from test_hardening import filled
    m = filled("hybrid", seed=1)

    def go(call, size):
        # the failing call's frame (holding the view of the memoryview) ends up in a reference
        # cycle created after the memoryview: view -> error -> traceback -> this frame -> last
        buf = bytearray(size + 16)
        view = memoryview(buf)[:size]
        try:
            call(view)
        except pymem.Error as exc:
            last = [exc]

    for size in (0, 1, 100, 5000):
        for call in (m.state_write_into, m.state_read, lambda v: m.state_check(v, 1)):
            go(call, size)
            gc.collect()
    print("ok")
""")


def test_buffer_views_are_released():
    """state_write_into / state_read / state_check release their view of the caller's buffer
    before returning or raising: the buffer can be resized right after a failure whose
    exception is still alive, and a garbage collection of such exceptions (reference cycles
    through the frames that held views of memoryviews) does not crash the interpreter (it
    did: CPython cleared the memoryview while the view still exported it)."""
    m = filled("kv", seed=19)
    buf = bytearray(10)
    with pytest.raises(pymem.BufferTooSmallError) as ei:
        m.state_write_into(buf)
    buf.extend(bytes(ei.value.needed))            # BufferError while a view is still exported
    assert m.state_write_into(buf) == ei.value.needed
    data = bytearray(m.state_write() + b"\0")
    with pytest.raises(pymem.StateError, match="trailing") as ei2:
        m.state_read(data)
    data.pop()
    short = bytearray(data[:10])
    with pytest.raises(pymem.StateError) as ei3:
        m.state_check(short, 1)
    short.extend(data[10:])
    assert m.state_check(short) == m.state_read(data) == len(data) and ei2.value and ei3.value
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _GC_CHILD, str(TESTS)], capture_output=True,
                       text=True, cwd=str(TESTS), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("kind", KINDS)
def test_batches_llama_rejects(kind):
    """Batches llama_decode rejects (-1): ids out of range, tokens out of the vocabulary,
    positions that do not continue a sequence; bad n_ubatch / n_vocab.  BatchError or an
    argument error, nothing changed, for every memory type."""
    m = filled(kind, seed=13)
    before = snap(m)
    for b, kw, exc in [
        (pymem.Batch(tokens=[1], pos=[12], seq_ids=[[300]]), {}, pymem.BatchError),
        (pymem.Batch(tokens=[1], pos=[12], seq_ids=[[-5]]), {}, pymem.BatchError),
        (pymem.Batch(tokens=[1], pos=[0], seq_ids=[[3]]), {}, pymem.BatchError),
        (pymem.Batch(tokens=[500], pos=[12]), dict(n_vocab=128), pymem.BatchError),
        (pymem.Batch(tokens=[-1], pos=[12]), dict(n_vocab=128), pymem.BatchError),
        (pymem.Batch(tokens=[1], pos=[3]), {}, pymem.BatchError),
        (pymem.Batch(tokens=[], pos=[]), {}, pymem.BatchError),
        (pymem.Batch(tokens=[1], pos=[12]), dict(n_ubatch=0), ERR),
        (pymem.Batch(tokens=[1], pos=[12]), dict(n_ubatch=-1), ERR),
        (pymem.Batch(tokens=[1], pos=[12]), dict(n_vocab=-1), ERR),
        (pymem.Batch(tokens=[1], pos=[12]), dict(n_ubatch=2 ** 32), ERR),
    ]:
        with pytest.raises(exc):
            m.decode(b, **kw)
        assert snap(m) == before, (b, kw)
    ctx = m.decode(pymem.Batch(tokens=[1], pos=[12], seq_ids=[[0]]))
    ub = ctx[0]
    after = snap(m)
    with pytest.raises(pymem.InvalidStateError, match="in order"):
        ub.apply()
    for il in (-1, 2 ** 32, 1000):
        with pytest.raises(ERR):
            ub.store(il, k=np.zeros((1, 32), np.float32))
        if hasattr(m, "recurrent"):
            with pytest.raises(ERR):
                ub.store_state(il, r=np.zeros((1, 64), np.float32))
    if m.kv_parts():
        il = m.kv_parts()[0].layers[0]
        with pytest.raises(ERR, match="needs"):
            ub.store(il, k=np.zeros((2, 64), np.float32))
        with pytest.raises(ERR):
            ub.store(il, k=np.zeros((1, 32), np.float32), v=b"\0" * 64)
        with pytest.raises(ERR):
            m.kv_parts()[0].kq_mask(ub, non_causal=7)
    assert snap(m) == after


def test_batch_construction_errors():
    """Batch arguments that do not fit together: argument errors before anything reaches a
    memory (the lengths, sequence id lists, n_tokens of an embedding batch, int32 ranges)."""
    for kw, pat in [
        (dict(tokens=[1, 2, 3], pos=[0, 1]), "pos needs 3 entries, got 2"),
        (dict(tokens=[1, 2, 3], seq_ids=[[0], [0]]), "seq_ids needs 3 entries, got 2"),
        (dict(tokens=[1, 2, 3], output=[True]), "output needs 3 entries, got 1"),
        (dict(tokens=[1, 2, 3], n_tokens=2), r"n_tokens 2 != len\(tokens\) 3"),
        (dict(n_tokens=-1), "n_tokens must be >= 0"),
        (dict(), "needs n_tokens"),
        (dict(tokens=[1, 2], pos=[[0, 1, 2]]), "pos must have shape"),
        (dict(tokens=[1, 2], pos=[[0, 1]] * 5), "pos must have shape"),
        (dict(tokens=[2 ** 40]), "tokens must fit in int32"),
        (dict(tokens=[1], pos=[2 ** 31]), "pos must fit in int32"),
        (dict(tokens=[1], seq_ids=[[2 ** 31]]), "seq_ids must fit in int32"),
        (dict(tokens=[1], seq_ids=[[]]), "0 sequence ids"),
        (dict(tokens=[1], seq_ids=[list(range(257))]), "257 sequence ids"),
    ]:
        with pytest.raises(ERR, match=pat):
            pymem.Batch(**kw)


@pytest.mark.parametrize("kind", KINDS)
def test_closed_memory(kind):
    """Every operation on a closed memory: InvalidStateError (never a use after free), also
    through parts, views and batch contexts made before the close."""
    m = filled(kind, seed=14)
    ctx = m.init_batch(pymem.Batch(tokens=[1], pos=[12]))
    m.close()
    calls = [lambda: m.seq_rm(0), lambda: m.seq_cp(0, 1), lambda: m.seq_keep(0), lambda: m.seq_add(0, 0, -1, 1),
             lambda: m.seq_div(0, 0, -1, 2), lambda: m.seq_pos_min(0), lambda: m.seq_pos_max(0), m.update, m.clear,
             m.state_write, lambda: m.state_size(), lambda: m.state_read(b""), lambda: m.state_check(b""),
             lambda: m.state_write_into(bytearray(10)), lambda: m.decode(pymem.Batch(tokens=[1])),
             lambda: m.check_batch(pymem.Batch(tokens=[1])), lambda: m.init_batch(pymem.Batch(tokens=[1])),
             lambda: m.kind, lambda: m.nbytes, lambda: m.can_shift, lambda: m.update_pending, m.breakdown,
             ctx[0].apply]
    for part in m.kv_parts():
        il = part.layers[0]
        calls += [lambda p=part, il=il: p.k(il), lambda p=part, il=il: p.v(il), part.cells_view, part.stream_info]
    if hasattr(m, "recurrent"):
        calls += [lambda: m.recurrent.r(1), lambda: m.recurrent.s(3), m.recurrent.info, m.recurrent.cells_view,
                  m.recurrent.rs_idx]
    for c in calls:
        with pytest.raises(pymem.InvalidStateError, match="closed"):
            c()
    assert "closed" in repr(m) and m.closed
    m.close()




def _gguf() -> str:
    return str(pymem.shapes.path("llama3-8b"))


def test_gguf_arguments():
    """from_gguf / estimate / memory_spec / max_context with impossible context parameters:
    argument errors (llama.cpp's n_ctx and friends are uint32); n_seq_max 0 is llama.cpp's
    max(1, n_seq_max): accepted as 1."""
    g = _gguf()
    for fn in (pymem.estimate, pymem.from_gguf, pymem.memory_spec):
        for n_ctx, kw, exc in [
            (-1, {}, ERR), (2 ** 32, {}, ERR), (2 ** 40, {}, ERR), (256, dict(n_seq_max=257), ERR),
            (256, dict(n_seq_max=-1), ERR), (256, dict(n_ubatch=-1), ERR), (256, dict(n_rs_seq=-1), ERR),
            (256, dict(n_batch=2 ** 33), ERR) if fn is pymem.memory_spec else (256, dict(n_ubatch=2 ** 33), ERR),
            (256, dict(format=9), ERR), (256, dict(type_k="q9_9"), pymem.UnsupportedError),
            (256, dict(type_v="q8_0", flash_attn=False), pymem.UnsupportedError),
        ]:
            with pytest.raises(exc):
                fn(g, n_ctx, **kw)
    assert pymem.estimate(g, 4096, n_seq_max=0).total == pymem.estimate(g, 4096, n_seq_max=1).total
    assert pymem.from_gguf(g, 256, n_seq_max=0).n_seq_max == 1
    assert pymem.max_context(g, -1) == 0 and pymem.max_context(g, 0) == 0
    with pytest.raises(ERR, match="not a readable GGUF"):
        pymem.from_gguf(str(TESTS / "vectors" / "README.md"), 256)
    with pytest.raises(ERR, match="not a readable GGUF"):
        pymem.estimate("/nonexistent/model.gguf", 256)


# =============================================================================================
# 3. atomic files
# =============================================================================================
_WRITER = textwrap.dedent("""
    import hashlib, sys
    import pymem
    from pymem.state import Session
    target = sys.argv[1]
    # a KV cache of 1536 cells x 4 layers x 2 KiB K + 2 KiB V rows: a session file of ~25 MB
    kv = pymem.KVCache(n_layer=4, n_head_kv=8, n_embd_head_k=64, size=1536, n_seq_max=1, type_k="f32",
                       type_v="f32", v_trans=False, rope=None, arch="test")
    kv.decode(pymem.Batch(tokens=[1] * 1536, pos=list(range(1536))), n_ubatch=2048)
    files = []
    for value in (1.0, 2.0):
        for il in kv.layers:
            kv.k(il)[...] = value
            kv.v(il)[...] = -value
        files.append(Session.from_memory(kv, [1, 2, 3]))
    print(" ".join(hashlib.sha256(f.dump()).hexdigest() for f in files), files[0].nbytes, flush=True)
    n = 0
    while True:                          # A, B, A, B, ... to the same path until killed
        files[n % 2].save(target)
        n += 1
""")


def _temps(d: Path, name: str) -> list[Path]:
    return [p for p in d.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp")]


def _writing(d: Path, name: str) -> bool:
    """A temporary file of name with some bytes in it exists (it may be renamed any moment)."""
    for p in _temps(d, name):
        try:
            if p.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
    return False


def test_atomic_save_survives_sigkill(tmp_path):
    """A child process saves two different ~25 MB session files A and B alternately to one
    path and is SIGKILLed 8 times: 4 times at random moments, 4 times while a temporary file
    is being written.  After every kill the target is absent (killed before the first save
    finished) or byte-identical to a complete A or B, and nothing but the target and at most
    one temporary file ``.out.session.*.tmp`` is left: a SIGKILLed writer cannot remove its
    temporary file (documented behaviour; the next save uses a fresh unique name and the stale
    file is harmless), but the target is never partial.  The stale temporary file is removed
    before the next round."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("no SIGKILL on this platform")
    target = tmp_path / "out.session"
    rng = random.Random(1234)
    seen_mid_write = seen_complete = 0
    for k in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=str(TESTS))
        try:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            ha, hb, size = line.split()
            if k % 2 == 0:
                time.sleep(rng.uniform(0.0, 0.25))
            else:                                    # kill while a temporary file is being written
                deadline = time.monotonic() + 10
                while not _writing(tmp_path, target.name):
                    assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(rng.uniform(0.0, 0.01))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        left = sorted(p.name for p in tmp_path.iterdir())
        temps = _temps(tmp_path, target.name)
        assert len(temps) <= 1 and set(left) <= {target.name} | {p.name for p in temps}, left
        seen_mid_write += bool(temps)
        if target.exists():
            data = target.read_bytes()
            assert hashlib.sha256(data).hexdigest() in (ha, hb), f"kill {k}: a partial target ({len(data)} bytes)"
            assert len(data) == int(size)
            seen_complete += 1
        for p in temps:
            p.unlink()
    assert seen_mid_write >= 4 and seen_complete >= 4, (seen_mid_write, seen_complete)
    # the survivor is a valid session; saving it again in-process leaves no temporary file
    s = Session.load(target)
    s.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_every_writer_is_atomic(tmp_path, monkeypatch):
    """Session.save, SeqState.save, Blob.save and ``pymem edit -o`` all write through
    pymem.state.files.atomic_write (temporary file in the target's directory, fsync, rename),
    and no other code of pymem opens a file for writing."""
    from pymem import cli

    calls = []
    real = state.files.atomic_write

    def spy(path, chunks, total, progress=None):
        calls.append(os.fspath(path))
        return real(path, chunks, total, progress)

    monkeypatch.setattr(state.files, "atomic_write", spy)
    m = filled("kv", seed=15)
    sess = Session.from_memory(m, [1, 2])
    src = tmp_path / "in.session"
    sess.save(src)
    SeqState.from_memory(m, 1, [3]).save(tmp_path / "one.ggsq")
    state.Blob.from_memory(m, envelope="context").save(tmp_path / "ctx.bin")
    out = tmp_path / "edited.session"
    assert cli.main(["edit", str(src), "--seq-keep", "1", "-o", str(out), "-q"]) == 0
    assert calls == [str(src), str(tmp_path / "one.ggsq"), str(tmp_path / "ctx.bin"), str(out)]
    assert Session.load(out).sequences().keys() == {1}
    # a failing writer leaves the old file and no temporary file (the rename never happens)
    old = out.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert cli.main(["edit", str(src), "--seq-keep", "0", "-o", str(out), "-q"]) == 1
    assert out.read_bytes() == old and not _temps(tmp_path, out.name)
    # source inspection: the only writers are atomic_write (and shapes' own atomic GGUF writer);
    # pymem.llama's loader and the test oracle write only into pymem's cache folder
    pkg = REPO / "pymem"
    writers = []
    for f in sorted(pkg.rglob("*.py")):
        if f.relative_to(pkg).parts[0] in ("llama", "_oracle"):
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"open\([^)]*[\"'][wax]b?\+?[\"']|write_bytes|write_text|os\.replace|os\.rename|mkstemp"
                         r"|os\.fdopen\([^)]*[\"']w", line):
                writers.append((f.relative_to(pkg).as_posix(), i))
    # the store's embedded backend has its own put protocol (temporary file, fsync, rename, index
    # row), proven by tests/test_store_backends.py
    assert {f for f, _ in writers} == {"state/files.py", "shapes.py", "store/backends/fs.py"}, writers
    src_files = (pkg / "state" / "files.py").read_text()
    atomic = src_files[src_files.index("def atomic_write"):]
    assert all(atomic.count(x) for x in ("mkstemp", "fsync", "os.replace", "dir="))
    assert sum(1 for f, _ in writers if f == "state/files.py") == sum(
        1 for line in atomic.splitlines() if re.search(r"mkstemp|os\.replace|os\.fdopen", line))


# =============================================================================================
# 4. threads
# =============================================================================================
class _LockCheckingLib:
    """Stands in for the cffi ``lib`` of pymem.memory / pymem.batch and records every C
    function called without the memory's lock held by the calling thread."""

    #: functions that never touch a memory: type tables, batches, status text, contexts' own
    #: teardown, and construction (before the object and its lock exist)
    FREE = ("pm_type_", "pm_batch_", "pm_seq_set_order", "pm_last_error", "pm_status_str", "pm_version",
            "pm_mctx_free", "pm_memory_free", "pm_kv_new", "pm_iswa_new", "pm_recurrent_new", "pm_hybrid_new",
            "pm_hybrid_iswa_new")

    def __init__(self, real) -> None:
        self._real = real
        self.mem = None
        self.unlocked: list[str] = []
        self.called: set[str] = set()

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if not callable(attr) or name.startswith(self.FREE):
            return attr

        def call(*args):
            mem = self.mem
            if mem is not None:
                self.called.add(name)
                if not mem._lock._is_owned():
                    self.unlocked.append(f"{name} from {sys._getframe(1).f_code.co_name}")
            return attr(*args)

        return call


def _public(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


@pytest.mark.parametrize("kind", ["kv", "hybrid_iswa"])
def test_every_public_method_takes_the_lock(kind, monkeypatch):
    """Every public method and property of Memory, the parts (KVPart, RecurrentPart),
    BatchContext and UBatch holds the memory's lock whenever it calls into the C core (the C
    objects are not thread-safe).  The exercise list must cover every public name, so a new
    method cannot be forgotten."""
    import pymem.batch as pb
    import pymem.memory as pm

    spy = _LockCheckingLib(pm.lib)
    monkeypatch.setattr(pm, "lib", spy)
    monkeypatch.setattr(pb, "lib", spy)
    m = filled(kind, seed=16)
    spy.mem = m
    part = m.kv_parts()[0]
    il = part.layers[0]
    blob, one = m.state_write(), m.state_write(1)
    batch = pymem.Batch(tokens=[1], pos=[12], seq_ids=[[0]])
    exercised = {
        "Memory": dict(
            seq_rm=lambda: m.seq_rm(1, 4, -1), seq_cp=lambda: m.seq_cp(0, 2), seq_keep=lambda: m.seq_keep(255)
            if kind == "kv" else m.seq_keep(0), seq_add=lambda: m.seq_add(0, 0, -1, 1), seq_div=lambda: m.seq_div(0, 0, -1, 2),
            seq_pos_min=lambda: m.seq_pos_min(0), seq_pos_max=lambda: m.seq_pos_max(0), can_shift=lambda: m.can_shift,
            update_pending=lambda: m.update_pending, update=m.update, clear=lambda: m.clear(False),
            state_size=m.state_size, state_write=m.state_write, state_write_into=lambda: m.state_write_into(
                bytearray(len(blob) * 2)), state_read=lambda: m.state_read(blob), state_check=lambda: m.state_check(one, 1),
            init_batch=lambda: m.init_batch(batch), check_batch=lambda: m.check_batch(batch),
            decode=lambda: m.decode(batch), kind=lambda: m.kind, breakdown=m.breakdown, nbytes=lambda: m.nbytes,
            kv_parts=m.kv_parts, closed=lambda: m.closed, close=None, arch=None),
        "KVPart": dict(k=lambda: part.k(il), v=lambda: part.v(il), cells_view=part.cells_view,
                       stream_info=part.stream_info, layers=lambda: part.layers, kq_mask=None),
        "UBatch": {}, "BatchContext": {}, "RecurrentPart": {},
    }
    for cls, calls in exercised.items():
        for name, fn in calls.items():
            if fn is not None:
                fn()
    # a context, its ubatches and the KQ mask
    m.state_read(blob)
    ctx = m.init_batch(pymem.Batch(tokens=[1, 2], pos=[12, 13], seq_ids=[[0], [0]]), n_ubatch=1)
    ub = ctx[0]
    exercised["BatchContext"] = dict(apply_all=lambda: None, ubatches=lambda: ctx.ubatches)
    exercised["UBatch"] = dict(
        apply=ub.apply, applied=lambda: ub.applied, n_kv=lambda: ub.n_kv, cells=lambda: ub.cells,
        streams=lambda: ub.streams, store=lambda: ub.store(il, k=np.zeros((1, part.k(il).shape[1]), np.float32)),
        rec_range=lambda: ub.rec_range if hasattr(m, "recurrent") else None,
        store_state=lambda: ub.store_state(1, r=np.zeros((1, m.recurrent.r(1).shape[1]), np.float32))
        if hasattr(m, "recurrent") else None)
    for name in ("apply", "applied", "n_kv", "cells", "streams", "store", "rec_range", "store_state"):
        exercised["UBatch"][name]()
    exercised["KVPart"]["kq_mask"] = lambda: part.kq_mask(ub)
    exercised["KVPart"]["kq_mask"]()
    ctx[1].apply()
    assert ctx[1].applied and len(ctx) == 2 and list(ctx) == ctx.ubatches
    ctx2 = m.init_batch(pymem.Batch(tokens=[1], pos=[14], seq_ids=[[0]]))
    ctx2.apply_all()
    if hasattr(m, "recurrent"):
        r = m.recurrent
        exercised["RecurrentPart"] = dict(r=lambda: r.r(1), s=lambda: r.s(1), p=None, info=r.info,
                                          cells_view=r.cells_view, rs_idx=r.rs_idx, layers=lambda: r.layers)
        for fn in exercised["RecurrentPart"].values():
            if fn is not None:
                fn()
        with pytest.raises(ERR):
            r.p(1)                                    # no p rows: still under the lock
    m.close()
    spy.mem = None
    assert spy.unlocked == [], spy.unlocked
    assert len(spy.called) >= 25, spy.called
    # every public name of every class was exercised above
    for cls in (pymem.Memory, pymem.KVPart, pymem.BatchContext, pymem.UBatch, pymem.RecurrentPart):
        if cls is pymem.RecurrentPart and not hasattr(m, "recurrent"):
            continue
        names = _public(cls) - {"n_seq_max", "size", "n_stream"}
        missing = names - set(exercised[cls.__name__])
        assert not missing or cls is pymem.UBatch and missing <= {"index", "n_tokens", "n_seq_tokens", "n_seqs",
                                                                    "n_seqs_unq", "equal_seqs", "n_stream",
                                                                    "batch_idx", "pos", "seq", "output"}, (cls, missing)


def _thread_ops(m, t: int, n_iter: int, log: list, order: list | None = None) -> None:
    """Thread t's operations, on its own sequences a = 2t and b = 2t + 1 only: decodes, a
    fork (seq_cp) and update, a shift of the fork and update, positions, a per-sequence
    state written and restored, partial and full removals.  Records every observable result."""
    a, b = 2 * t, 2 * t + 1
    for i in range(n_iter):
        if order is not None:
            order.append(t)
            time.sleep(1e-6)                          # let the other threads in between rounds too
        p = m.seq_pos_max(a)
        n = 1 + (i + t) % 3
        m.decode(pymem.Batch(tokens=[(7 * t + i + j) % 50 for j in range(n)], pos=list(range(p + 1, p + 1 + n)),
                             seq_ids=[[a]] * n))
        log.append(("decode", m.seq_pos_min(a), m.seq_pos_max(a)))
        m.seq_cp(a, b)
        m.update()
        if i % 2:
            m.seq_add(b, 0, -1, 2)
            m.update()
        log.append(("fork", m.seq_pos_min(b), m.seq_pos_max(b)))
        blob = m.state_write(b)
        log.append(("blob", hashlib.sha1(blob).hexdigest()))
        log.append(("rm", m.seq_rm(a, max(1, p - 1), -1)))
        m.state_read(blob, a)
        log.append(("restored", m.seq_pos_min(a), m.seq_pos_max(a), hashlib.sha1(m.state_write(a)).hexdigest()))
        if i % 5 == 4:
            log.append(("rm all", m.seq_rm(b)))


def _threaded(make_mem, n_threads: int = 4, n_iter: int = 30):
    m = make_mem()
    logs = [[] for _ in range(n_threads)]
    errors: list = []
    order: list = []
    barrier = threading.Barrier(n_threads)

    def run(t):
        try:
            barrier.wait()
            _thread_ops(m, t, n_iter, logs[t], order)
        except BaseException as exc:                 # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                       # switch threads often
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    # the threads really ran interleaved: rounds of different threads alternate many times
    switches = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert switches >= 30, switches                   # a serial run would give n_threads - 1
    return m, logs


def _sequential(make_mem, n_threads: int = 4, n_iter: int = 30):
    m = make_mem()
    logs = [[] for _ in range(n_threads)]
    for t in range(n_threads):
        _thread_ops(m, t, n_iter, logs[t])
    return m, logs


def _kv_streams():
    m = pymem.KVCache(**kv_kw(n_seq_max=8, unified=False, size=512, n_head_kv=[1, 2, 1, 2]))
    randomize(m, 17)
    return m


def _hybrid_streams():
    m = pymem.HybridMemory(attn=kv_kw(n_seq_max=8, unified=False, size=512, layers=[0, 2]),
                           recurrent=rec_kw(n_seq_max=8))
    randomize(m, 18)
    return m


def test_threads_kv_cache():
    """4 threads x 30 rounds x ~10 operations on one KV cache, each thread on its own two
    sequences.  The cache has one stream per sequence: where a stream's cells go depends only
    on that stream's own history, and the K-shifts / stream copies a thread's update() applies
    for another thread commute with everything else, so the final whole state (every stream's
    cells, K and V bytes) and every thread's observations must equal a sequential run of the
    same four operation lists on a fresh cache, byte for byte."""
    m, logs = _threaded(_kv_streams)
    ref, ref_logs = _sequential(_kv_streams)
    assert logs == ref_logs
    assert m.state_write() == ref.state_write()
    assert all(m.state_write(s) == ref.state_write(s) for s in range(8))
    assert sum(len(x) for x in logs) > 4 * 30 * 5


def test_threads_hybrid_memory():
    """The same on a hybrid memory (per-sequence attention streams + a recurrent part).  The
    recurrent cells are one pool shared by all sequences, so which cell a sequence gets depends
    on the interleaving: the check compares what does not, every thread's observations
    (positions, per-sequence state blobs) and the final per-sequence state of every sequence
    and the attention part's cells."""
    m, logs = _threaded(_hybrid_streams)
    ref, ref_logs = _sequential(_hybrid_streams)
    assert logs == ref_logs
    assert all(m.state_write(s) == ref.state_write(s) for s in range(8))
    assert all(m.attn.cells_view(s).tobytes() == ref.attn.cells_view(s).tobytes() for s in range(8))
    assert sorted(m.recurrent.cells_view().pos.tolist()) == sorted(ref.recurrent.cells_view().pos.tolist())


def test_long_c_calls_release_the_gil():
    """A worker thread runs long C calls (K-shifts of a 4096-cell q8_0 cache with a Hadamard
    rotation, whole-state writes and restores) while the main thread only counts in Python.
    The main thread records a timestamp every 16 iterations; at least one C call of more than
    50 ms must contain main-thread timestamps, which is impossible if the call held the GIL."""
    kv = pymem.KVCache(n_layer=4, n_head_kv=8, n_embd_head_k=128, size=4096, n_seq_max=1, type_k="q8_0",
                       type_v="q8_0", v_trans=False, rope=pymem.Rope(n_rot=128, mode="neox"), arch="test")
    kv.decode(pymem.Batch(tokens=[1] * 4000, pos=list(range(4000))), n_ubatch=4096)
    blob = kv.state_write()
    buf = bytearray(len(blob))
    calls: list = []
    done = threading.Event()

    def worker():
        try:
            for i in range(6):
                kv.seq_add(0, 0, -1, 1)
                t0 = time.perf_counter()
                kv.update()
                calls.append(("update", t0, time.perf_counter()))
                t0 = time.perf_counter()
                kv.state_write_into(buf)
                calls.append(("state_write_into", t0, time.perf_counter()))
                t0 = time.perf_counter()
                kv.state_read(blob)
                calls.append(("state_read", t0, time.perf_counter()))
        finally:
            done.set()

    th = threading.Thread(target=worker)
    stamps = []
    i = 0
    th.start()
    while not done.is_set():
        i += 1
        if i & 15 == 0:
            stamps.append(time.perf_counter())
    th.join()
    ts = np.array(stamps)
    inside = {c: int(((ts > c[1]) & (ts < c[2])).sum()) for c in calls}
    long_calls = [c for c in calls if c[2] - c[1] > 0.05]
    assert long_calls, [f"{c[0]} {c[2] - c[1]:.3f}s" for c in calls]
    assert any(inside[c] > 0 for c in long_calls), [(c[0], round(c[2] - c[1], 3), inside[c]) for c in calls]
    assert i > 1000


# =============================================================================================
# 5. hypothesis: the entry points that read untrusted bytes
# =============================================================================================
_INTERESTING_U32 = [0, 1, 2, 3, 4, 5, 16, 255, 256, 257, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 0xFFFFFFFE, 0xFFFFFFFF]


def _mutate(data, raw: bytes, fields: list[int] | None = None) -> bytes:
    """1-4 mutations: a random byte, an interesting u32, a cut, an insertion or a deletion, at
    any offset or (more often) at the start of a field of the format (``fields``)."""
    out = bytearray(raw)
    for _ in range(data.draw(hs.integers(1, 4), label="n_mutations")):
        if not out:
            break
        op = data.draw(hs.sampled_from(["byte", "u32", "cut", "insert", "delete"]), label="op")
        if fields and data.draw(hs.integers(0, 4), label="at_field") > 1:
            i = min(data.draw(hs.sampled_from(fields), label="field"), len(out) - 1)
        else:
            i = data.draw(hs.integers(0, len(out) - 1), label="at")
        if op == "byte":
            out[i] = data.draw(hs.integers(0, 255), label="byte")
        elif op == "u32":
            out[i:i + 4] = struct.pack("<I", data.draw(hs.sampled_from(_INTERESTING_U32), label="u32"))
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out[i:i] = data.draw(hs.binary(min_size=1, max_size=8), label="inserted")
        else:
            del out[i:i + data.draw(hs.integers(1, 8), label="deleted")]
    return bytes(out)


_SOURCES: dict = {}


def _sources() -> dict:
    """(kind, seq, envelope) -> (valid blob of a filled memory of that kind, the offsets of
    its fields).  The field offsets come from the parser itself: the offsets its truncation
    errors name for every prefix."""
    if not _SOURCES:
        for kind in KINDS:
            m = filled(kind, seed=20)
            for seq in (-1, 1):
                for env in (None, "llama"):
                    blob = m.state_write(seq, envelope=env)
                    fields = set()
                    for cut in range(len(blob)):
                        try:
                            m.state_check(blob[:cut], seq, envelope=env)
                        except pymem.StateError as exc:
                            fields.update(int(x) for x in _NEEDS_AT.findall(str(exc)))
                    _SOURCES[(kind, seq, env)] = (blob, sorted(fields))
    return _SOURCES


_NEEDS_AT = re.compile(r"needs \d+ bytes at offset (\d+)")


_FILES: dict = {}


def _files() -> dict:
    """(kind, what) -> (bytes of a session file, sequence file, context blob, sequence blob or
    bare sections of a filled memory of that kind, offsets of its fields)."""
    if not _FILES:
        for kind in KINDS:
            m = filled(kind, seed=20)          # the memory of _sources(): the same sections
            for what, data, seq in [("session", Session.from_memory(m, [1, 2, 3]).dump(), -1),
                                    ("seq_file", SeqState.from_memory(m, 1, [4]).dump(), 1),
                                    ("context", m.state_write(envelope="llama"), -1),
                                    ("seq", m.state_write(1, envelope="llama"), 1),
                                    ("sections", m.state_write(), -1)]:
                bare, fields = _sources()[(kind, seq, None)]
                head = len(data) - len(bare)
                assert data[head:] == bare
                _FILES[(kind, what)] = (data, sorted(set(range(0, head, 4)) | {head + f for f in fields}))
    return _FILES


#: PYMEM_HARDENING_EXAMPLES=5000 explores longer
_EXAMPLES = int(os.environ.get("PYMEM_HARDENING_EXAMPLES", "0"))

if given is not None:
    @settings(max_examples=_EXAMPLES or 250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=hs.data())
    def test_fuzz_state_read_every_memory_type(data):
        """Memory.state_read / state_check of mutated whole and per-sequence states (bare and
        enveloped) of every memory type: both agree; a rejection is a pymem error (a StateError
        names an offset) and changes nothing; an accepted state round-trips through a fresh
        memory."""
        kind = data.draw(hs.sampled_from(KINDS), label="kind")
        seq = data.draw(hs.sampled_from([-1, 1]), label="seq")
        env = data.draw(hs.sampled_from([None, "llama"]), label="envelope")
        target = -1 if seq == -1 else data.draw(hs.sampled_from([0, 2]), label="target")
        raw, fields = _sources()[(kind, seq, env)]
        assert len(fields) > 10
        blob = _mutate(data, raw, fields)
        allow = data.draw(hs.booleans(), label="allow_trailing")
        m = filled(kind, seed=22, extra=data.draw(hs.booleans(), label="extra"))
        before = snap(m)
        try:
            n_check = m.state_check(blob, target, envelope=env)
            err_check = None
        except pymem.Error as exc:
            n_check, err_check = None, exc
        try:
            n = m.state_read(blob, target, envelope=env, allow_trailing=allow)
        except pymem.Error as exc:
            assert snap(m) == before
            msg = str(exc)
            if isinstance(exc, pymem.StateError):
                assert _OFFSET.search(msg), msg
            if err_check is None:      # only what check cannot know: placement, trailing bytes
                assert isinstance(exc, pymem.NoSlotError) or (not allow and "trailing" in msg
                                                              and n_check < len(blob)), msg
            else:
                assert type(exc) is type(err_check) and str(exc).split(": ", 1)[1] == str(err_check).split(": ", 1)[1]
            return
        assert err_check is None and n == n_check and (allow or n == len(blob))
        out = m.state_write(target, envelope=env)
        fresh = make(kind)
        assert fresh.state_read(out, target, envelope=env) == len(out)
        assert fresh.state_write(target, envelope=env) == out
        assert [fresh.seq_pos_max(s) for s in range(3)] == [m.seq_pos_max(s) for s in range(3)] or seq != -1

    @pytest.fixture(scope="module")
    def fuzz_dir(tmp_path_factory):
        return tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=_EXAMPLES or 200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=hs.data())
    def test_fuzz_cli_inspect_and_loaders(fuzz_dir, data):
        """``pymem inspect FILE`` (in-process, with random options) and Session.load /
        SeqState.load / state.load on mutated files of every kind: exit status 0 with output
        (valid JSON with --json) or 1 with ``pymem inspect: error: ...``; the loaders return or
        raise a pymem error; nothing else escapes."""
        import contextlib
        import io
        import json

        from pymem import cli

        key = data.draw(hs.sampled_from(sorted(_files())), label="file")
        raw, fields = _files()[key]
        blob = _mutate(data, raw, fields) if data.draw(hs.integers(0, 9), label="mutate") else raw
        path = fuzz_dir / "state.bin"
        path.write_bytes(blob)
        args = ["inspect", str(path)]
        as_json = data.draw(hs.booleans(), label="json")
        if as_json:
            args.append("--json")
        cells = data.draw(hs.sampled_from([None, "--cells", "--no-cells"]), label="cells")
        if cells:
            args.append(cells)
        kind = data.draw(hs.sampled_from([None, "session", "seq_file", "context", "seq", "sections"]), label="kind")
        if kind:
            args += ["--kind", kind]
        layout = data.draw(hs.sampled_from([None, "kv", "iswa", "recurrent:2", "hybrid:2", "hybrid_iswa:2", "kv+rec:2",
                                            "kv+kv+rec:2@10", "rec:0", "bogus", "hybrid:x"]), label="layout")
        if layout:
            args += ["--layout", layout]
        if data.draw(hs.integers(0, 9), label="model") == 0:
            args += ["--model", _gguf()]                  # a foreign model (llama3-8b shape)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(args)
        if rc == 0:
            assert out.getvalue()
            if as_json:
                assert json.loads(out.getvalue())["file"] == str(path)
        else:
            assert rc == 1, (rc, err.getvalue())
            e = err.getvalue()
            assert e.startswith("pymem inspect: error: ") and len(e.strip()) > len("pymem inspect: error:"), e
        for loader in (Session.load, SeqState.load, state.load):
            try:
                obj = loader(path)
            except pymem.Error as exc:
                assert str(exc)
            else:
                assert obj.dump() == blob
                obj.describe()
