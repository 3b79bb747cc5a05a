#!/usr/bin/env python3
"""Regenerate the shared test vectors (tests/vectors/kv_*.txt) and the real-blob part of the
fuzz seed corpus (tests/fuzz/corpus/fuzz_kv_state/llama_*) from REAL llama.cpp b11739.

Every case runs in llama.cpp (the llama-cpp-py-sync==0.11739 wheel, in the crash-isolated
pymem._oracle.OracleWorker, tiny random-weight models from pymem._oracle.tinymodels, n_ctx 256).
What the vectors expect is what llama.cpp returned and wrote: decode return codes, seq_rm
results, positions, state blobs, accepted or rejected restores.  pymem contributes only the
memory parameters (pymem.memory_spec, i.e. the configuration llama.cpp builds for the model)
and, per failure, the name of the error it must return (llama.cpp only says "failed").  The
K/V rows of newly placed tokens are cut out of llama.cpp's state after each decode with the
small parser below (not pymem's), matched to the batch tokens by (position, sequence set).

Before writing, each case is replayed through pymem (tests/test_vectors.py); a case pymem
does not reproduce is reported and nothing is written (unless --no-verify).

    python tests/vectors/regen.py              # rewrite the files
    python tests/vectors/regen.py --check      # regenerate in memory and diff against the files
    python tests/vectors/regen.py -k corrupt   # only cases whose name contains "corrupt"
"""
from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = ROOT / "tests" / "fuzz" / "corpus" / "fuzz_kv_state"
N_CTX = 256
IO_MAGIC = 0xAF143CD8

sys.path.insert(0, str(ROOT / "tests"))


# ---------------------------------------------------------------------------------------------
# llama.cpp's KV state as regen needs it (read by tests/blobreader.py; layout: SPEC 8.2, ORACLE 4.3)
# ---------------------------------------------------------------------------------------------
@dataclass
class Stream:
    cells: list = field(default_factory=list)        # (pos, (ids...))
    k: list = field(default_factory=list)            # per layer: bytes of cc rows
    v: list = field(default_factory=list)            # per layer: rows or transposed elements
    k_row: list = field(default_factory=list)
    v_el: list = field(default_factory=list)         # untransposed: row bytes; transposed: element size
    v_ne: list = field(default_factory=list)         # transposed: n_embd_v_gqa
    v_trans: int = 0
    off: dict = field(default_factory=dict)          # byte offsets of fields (for corruptions)

    def k_row_of(self, l: int, r: int) -> bytes:
        return self.k[l][r * self.k_row[l]:(r + 1) * self.k_row[l]]

    def v_row_of(self, l: int, r: int) -> bytes:
        el, cc = self.v_el[l], len(self.cells)
        if not self.v_trans:
            return self.v[l][r * el:(r + 1) * el]
        return b"".join(self.v[l][(j * cc + r) * el:(j * cc + r + 1) * el] for j in range(self.v_ne[l]))


def u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def parse_kv(b: bytes, off: int, rot: bool = True) -> tuple[list, int]:
    """Streams of the KV section at ``off`` and the offset after it (read by tests/blobreader.py,
    the tests' one independent reader; this adds the row bytes and field offsets)."""
    from blobreader import Reader
    from blobreader import parse_kv as read_kv

    r = Reader(b, off)
    try:
        sec = read_kv(r, rot=rot)
    except (struct.error, AssertionError):
        raise ValueError("truncated KV section") from None
    streams = []
    for s in sec["streams"]:
        st = Stream(cells=list(s["cells"]), off=dict(s["off"]))
        streams.append(st)
        cc = s["cell_count"]
        if cc == 0:
            continue
        st.v_trans = s["v_trans"]
        for (t, row), o in zip(s["k"], s["k_off"]):
            st.k_row.append(row)
            st.k.append(b[o:o + row * cc])
        for v, o in zip(s["v"], s["v_off"]):
            if st.v_trans:
                _, el, ne = v
                st.v_el.append(el)
                st.v_ne.append(ne)
                st.v.append(b[o:o + el * ne * cc])
            else:
                st.v_el.append(v[1])
                st.v.append(b[o:o + v[1] * cc])
    return streams, r.o


def envelope_len(blob: bytes, whole: bool) -> int:
    return 4 + u32(blob, 0) if whole else 8


def parse_blob(blob: bytes, whole: bool, rot: bool = True) -> list:
    streams, end = parse_kv(blob, envelope_len(blob, whole), rot)
    assert end == len(blob), "bytes after the KV section"
    return streams


def to_format10(blob: bytes, whole: bool) -> bytes:
    """The same state as llama.cpp 0c1e570 writes it: without the k_rot/v_rot words."""
    cut = sorted(st.off["k_rot"] for st in parse_blob(blob, whole) if "k_rot" in st.off)
    out, prev = [], 0
    for c in cut:
        out.append(blob[prev:c])
        prev = c + 8
    out.append(blob[prev:])
    return b"".join(out)


def put_u32(blob: bytes, off: int, v: int) -> bytes:
    return blob[:off] + struct.pack("<I", v & 0xFFFFFFFF) + blob[off + 4:]


def put_u64(blob: bytes, off: int, v: int) -> bytes:
    return blob[:off] + struct.pack("<Q", v) + blob[off + 8:]


# ---------------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------------
def fmt_floats(xs) -> str:
    import numpy as np

    out = []
    for x in xs:
        f = float(np.float32(x))
        out.append(str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f))
    return " ".join(out)


def kv_params(kw: dict, ropes: list, fmt: int) -> list:
    """The case parameters of a KV part (``kw``: its pm_kv_params fields; ``ropes``: per model
    layer, the RoPE or None), as (key, value) pairs in the grammar's order."""
    p = [("layers", " ".join(map(str, kw["layers"])) or "none"),
         ("n_head_kv", " ".join(map(str, kw["n_head_kv"]))),
         ("n_embd_head_k", " ".join(map(str, kw["n_embd_head_k"]))),
         ("n_embd_head_v", " ".join(map(str, kw["n_embd_head_v"]))),
         ("size", kw["size"]), ("n_seq_max", kw["n_seq_max"]), ("type_k", kw["type_k"]),
         ("type_v", kw["type_v"]), ("v_trans", int(kw["v_trans"])), ("unified", int(kw["unified"])),
         ("n_swa", kw["n_swa"]), ("swa_type", kw["swa_type"]), ("n_pos_per_embd", kw["n_pos_per_embd"]),
         ("n_embd_v_gqa_max", kw["n_embd_v_gqa_max"]), ("k_rot", kw["k_rot"]), ("v_rot", kw["v_rot"]),
         ("can_shift", int(kw["can_shift"])), ("format", fmt),
         ("rope_mode", " ".join("off" if r is None else str(r.mode) for r in ropes)),
         ("rope_n_rot", " ".join(str(r.n_rot if r else 0) for r in ropes)),
         ("rope_n_ctx_orig", " ".join(str(r.n_ctx_orig if r else 0) for r in ropes))]
    for k in ("freq_base", "freq_scale", "ext_factor", "attn_factor", "beta_fast", "beta_slow"):
        p.append((f"rope_{k}", fmt_floats(getattr(r, k) if r else 0 for r in ropes)))
    ffs = {tuple(r.freq_factors) for r in ropes if r is not None and r.freq_factors is not None}
    assert len(ffs) <= 1, "per-layer freq factors differ"
    if ffs:
        p.append(("rope_freq_factors", fmt_floats(next(iter(ffs)))))
    return p


def new_cells(before: list, after: list) -> dict:
    """Cells of a stream after a decode that were not there before: (pos, seq ids) -> the
    ranks of those cells in the after-state (a cell that was there before counts once)."""
    old: dict = {}
    for c in before:
        old[c] = old.get(c, 0) + 1
    new: dict = {}
    for rank, c in enumerate(after):
        if old.get(c, 0) > 0:
            old[c] -= 1
        else:
            new.setdefault(c, []).append(rank)
    return new


class Rec:
    """One case: runs every step in llama.cpp and writes the case text."""

    def __init__(self, gen: "Gen", name: str, model: str = "llama", n_seq_max: int = 4, unified: bool = True,
                 flash_attn: bool = False, type_k: str = "f16", type_v: Optional[str] = None,
                 n_ubatch: Optional[int] = None, format: int = 11, note: str = "") -> None:
        import pymem

        if gen.lcp:     # llama-cpp-python 0.3.36 (0c1e570) writes format 10 itself
            format = 10
        self.gen, self.name, self.format = gen, name, format
        type_v = type_v or type_k
        path = gen.models[model]
        self.ctx = gen.worker.context(path, n_ctx=N_CTX, n_seq_max=n_seq_max, kv_unified=unified,
                                      flash_attn=flash_attn, type_k=type_k, type_v=type_v, swa_full=True,
                                      n_ubatch=n_ubatch)
        spec = pymem.memory_spec(path, N_CTX, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                                 flash_attn=flash_attn, unified=unified, n_ubatch=n_ubatch or 512, format=format)
        self.kw = kw = spec.part("kv").kwargs
        self.n_seq_max = n_seq_max
        self.unified = unified
        self.n_stream = 1 if unified else n_seq_max
        self.alive = True          # False after llama.cpp aborted
        self.resynced = False      # llama.cpp was put back after a failed restore changed it
        self.lines = [f"[case {name}]"]
        for text in note.strip().splitlines():
            self.lines.append(f"# {text.strip()}")
        self.lines.append(f"# {gen.build}: model {model}, n_ctx {N_CTX}, n_seq_max {n_seq_max}, kv_unified "
                          f"{int(unified)}, flash_attn {int(flash_attn)}, type_k {type_k}, type_v {type_v}"
                          + (f", n_ubatch {n_ubatch}" if n_ubatch else ""))
        ropes = kw["rope"]
        p = [("kind", "kv"), ("arch", kw["arch"]), ("n_layer", kw["n_layer"])] + kv_params(kw, ropes, format)
        p += [("n_vocab", 128), ("n_ubatch", self.ctx.n_ubatch())]
        self.lines += [f"{k} = {v}" for k, v in p]
        self.n_ubatch = self.ctx.n_ubatch()
        assert self.ctx.n_ctx() == N_CTX * (1 if unified else n_seq_max)

    # -- helpers --------------------------------------------------------------------------------
    def out(self, line: str) -> None:
        self.lines.append(line)

    def comment(self, text: str) -> None:
        for t in text.strip().splitlines():
            self.lines.append(f"# {t.strip()}")

    def whole_blob(self) -> bytes:
        return self.conv(self.ctx.state_get(), True)

    def seq_blob(self, s: int) -> bytes:
        return self.conv(self.ctx.state_seq_get(s), False)

    def conv(self, blob: bytes, whole: bool) -> bytes:
        """llama.cpp's bytes in this case's format."""
        return to_format10(blob, whole) if self.format == 10 and not self.gen.lcp else blob

    def _live(self) -> None:
        assert self.alive, f"{self.name}: llama.cpp aborted earlier in this case"

    # -- expectations ---------------------------------------------------------------------------
    def whole(self) -> bytes:
        self._live()
        raw = self.ctx.state_get()
        for st in parse_blob(raw, True, not self.gen.lcp):  # the memory spec's k_rot/v_rot are llama.cpp's
            if st.cells and not self.gen.lcp:
                rot = struct.unpack_from("<II", raw, st.off["k_rot"])
                assert rot == (self.kw["k_rot"], self.kw["v_rot"]), (rot, self.kw)
        b = self.conv(raw, True)
        self.out(f"expect_whole = hex:{b.hex()}")
        self.gen.corpus(self, b, whole=True)
        return b

    def seq(self, *seqs: int) -> None:
        self._live()
        for s in seqs:
            b = self.seq_blob(s)
            self.out(f"expect_seq = {s} hex:{b.hex()}")
            self.gen.corpus(self, b, whole=False)

    def pos(self, *seqs: int) -> None:
        self._live()
        for s in seqs or range(self.n_seq_max):
            self.out(f"expect_pos = {s} {self.ctx.pos_min(s)} {self.ctx.pos_max(s)}")

    # -- steps ----------------------------------------------------------------------------------
    def decode(self, items, output=None, rows: bool = True, diverge: str = "") -> int:
        """items: (token, pos or None, [seq ids]).  Returns llama_decode's rc.  ``diverge``:
        llama.cpp accepts the batch but pymem rejects it (BATCH, documented divergence; the
        text says why); llama.cpp's memory then differs, so only the expectations from before
        may follow."""
        self._live()
        assert not self.resynced, "no decode after a resync"
        items = [(t, p, [s] if isinstance(s, int) else list(s)) for t, p, s in items]
        auto = all(it[1] is None for it in items)
        nxt = {s: self.ctx.pos_max(s) + 1 for s in range(self.n_seq_max)} if auto else {}
        before, rc, after = self.ctx.many([("state_get",), ("decode", items, output), ("state_get",)])
        args = ["decode", "tokens=" + ",".join(str(t) for t, _, _ in items)]
        if not auto:
            args.append("pos=" + ",".join(str(p) for _, p, _ in items))
        args.append("seqs=" + ",".join("+".join(map(str, s)) for _, _, s in items))
        if output is not None:
            flags = [output] * len(items) if isinstance(output, bool) else output
            args.append("output=" + ",".join(str(int(bool(x))) for x in flags))
        if rc == 0 and rows:
            resolved = []
            for t, p, s in items:
                if auto:
                    p = nxt.get(s[0], 0)
                    nxt[s[0]] = p + 1
                resolved.append((t, p, s))
            args += self._row_args(resolved, before, after)
        if diverge:
            assert rc == 0, f"{self.name}: expected llama.cpp to accept the batch ({diverge})"
            self.comment(f"llama.cpp accepts this batch (rc 0) and {diverge}; pymem rejects it with BATCH "
                         "and changes nothing (documented divergence)")
            self.out("step = " + " ".join(args))
            self.out("expect_error = BATCH")
            self.out(f"expect_whole = hex:{self.conv(before, True).hex()}")
            self.alive = False
            return rc
        self.out("step = " + " ".join(args))
        if rc != 0:
            self.out("expect_error = " + {-1: "BATCH", 1: "NO_SLOT"}[rc])
        return rc

    def _row_args(self, items, before: bytes, after: bytes) -> list:
        """The step's row arguments (MemRec adds the other parts' rows)."""
        return ["rows=hex:" + self._rows(items, before, after).hex()]

    def _rows(self, items, before: bytes, after: bytes) -> bytes:
        """The K/V rows llama.cpp computed for the batch tokens, in batch order."""
        rot = not self.gen.lcp
        sb, sa = parse_blob(before, True, rot), parse_blob(after, True, rot)
        per_token = {}
        for st in range(len(sa)):
            new = new_cells(sb[st].cells, sa[st].cells)
            for i, (t, p, s) in enumerate(items):
                if (0 if self.unified else s[0]) != st:
                    continue
                key = (p, tuple(sorted(set(x for x in s if x < self.n_seq_max))))
                ranks = new.get(key)
                assert ranks, f"{self.name}: no new cell for token {i} {key} in stream {st}"
                r = ranks.pop(0)
                S = sa[st]
                n_layer = len(S.k)
                per_token[i] = b"".join([S.k_row_of(l, r) for l in range(n_layer)] +
                                        [S.v_row_of(l, r) for l in range(n_layer)])
            left = [k for k, v in new.items() if v]
            assert not left, f"{self.name}: new cells without a token: {left}"
        return b"".join(per_token[i] for i in range(len(items)))

    def op(self, name: str, *args: int, expect: Optional[str] = None) -> None:
        """A sequence operation (seq_rm also records its bool).  expect: the pymem error of an
        operation llama.cpp aborts on (it must then really abort)."""
        self._live()
        assert not self.resynced
        if expect is not None:
            pre = self.whole_blob()
            pos = [(s, self.ctx.pos_min(s), self.ctx.pos_max(s)) for s in range(self.n_seq_max)]
            self.comment(f"llama.cpp aborts on {name}{args}; pymem returns {expect} and changes nothing")
            self.out(f"step = {name} " + " ".join(map(str, args)) + (" -> 1" if name == "seq_rm" else ""))
            self.out(f"expect_error = {expect}")
            from pymem._oracle import OracleCrashed

            try:
                getattr(self.ctx, name)(*args)
            except OracleCrashed as exc:
                self.alive = False
                self.gen.log(f"  {self.name}: {name}{args} aborted llama.cpp ({exc.signal_name})")
                self.out(f"expect_whole = hex:{pre.hex()}")
                self.lines += [f"expect_pos = {s} {lo} {hi}" for s, lo, hi in pos]
                return
            raise AssertionError(f"{self.name}: expected llama.cpp to abort on {name}{args}")
        res = getattr(self.ctx, name)(*args)
        if name == "seq_rm":
            self.out(f"step = seq_rm {args[0]} {args[1]} {args[2]} -> {int(res)}")
        else:
            self.out(f"step = {name} " + " ".join(map(str, args)))

    def clear(self, data: bool) -> None:
        self._live()
        self.ctx.clear(data)
        self.out(f"step = clear {int(data)}")

    def update(self) -> None:
        # llama.cpp has no separate update call: its next decode does it first (and so do
        # pymem's decode steps); an explicit update before a decode is equivalent.
        self.out("step = update")

    def read(self, blob: bytes, seq: int = -1, *, bare: bool = False, expect: Optional[str] = None,
             why: str = "", llama_blob: Optional[bytes] = None, diverge: str = "", probe: bool = False) -> bool:
        """Restore ``blob`` (in this case's format) into llama.cpp and record the step.  ``expect``:
        the pymem error when llama.cpp must reject it.  ``llama_blob``: what llama.cpp reads
        instead (format-10 cases).  ``diverge``: llama.cpp accepts but pymem rejects (documented
        divergence; the text says why)."""
        self._live()
        whole = seq == -1
        lb = llama_blob if llama_blob is not None else blob
        if bare:
            assert llama_blob is None
        if bare:   # llama.cpp reads only enveloped blobs: give it the envelope
            env = (struct.pack("<I", len("llama")) + b"llama") if whole else struct.pack("<Ii", IO_MAGIC, 0)
            lb = env + blob
        pre = self.ctx.state_get()
        n = self.ctx.state_set(lb) if whole else self.ctx.state_seq_set(lb, seq)
        if probe and n != 0:
            why += " - llama.cpp accepts it"
            expect = None
        if why:
            self.comment(why)
        tgt = "whole" if whole else str(seq)
        env = "bare" if bare else "llama"
        if diverge:
            assert n != 0, f"{self.name}: expected llama.cpp to accept ({diverge})"
            assert expect is not None
            self.comment(f"llama.cpp accepts this blob ({n} bytes) and {diverge}; pymem rejects it "
                         f"with {expect} and changes nothing (documented divergence)")
            self.ctx.state_set(pre)
            self.resynced = True
        if expect is None:
            assert n != 0, f"{self.name}: llama.cpp rejected a blob it should read ({why})"
            if self.resynced:
                post = self.ctx.state_get()
                self.ctx.state_set(pre)
                assert post == pre, f"{self.name}: an accepted read after a resync changed llama.cpp"
            consumed = n - (len(lb) - len(blob))
            self.out(f"step = read {tgt} {env} hex:{blob.hex()} -> {consumed}")
            if self.format == 11 and not bare and llama_blob is None:
                self.gen.corpus(self, blob, whole=whole, seq=seq)
            return True
        assert diverge or n == 0, f"{self.name}: llama.cpp accepted a blob expected to fail ({why})"
        post = self.ctx.state_get()
        if post != pre and not diverge:
            self.comment("(this failed restore changes llama.cpp's memory - SPEC 8.3.4 cleanup; pymem "
                         "changes nothing; llama.cpp is put back for the next checks)")
            assert self.ctx.state_set(pre) == len(pre)
            self.resynced = True
        self.out(f"step = read {tgt} {env} hex:{blob.hex()}")
        self.out(f"expect_error = {expect}")
        return False

    def done(self) -> str:
        return "\n".join(self.lines) + "\n"


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def fill(r: Rec, seq: int, n: int, start: int = 0, tok: int = 0, rows: bool = True) -> int:
    return r.decode([((tok + i) % 128, start + i, [seq]) for i in range(n)], rows=rows)


def case_holes(g: "Gen", unified: bool, fa: bool) -> Rec:
    r = g.rec(f"holes_{'unified' if unified else 'streams'}_{'fa' if fa else 'vtrans'}", unified=unified,
              flash_attn=fa, note="holes from seq_rm, placement into them; seq_cp, seq_keep, seq_add, seq_div")
    fill(r, 0, 12)
    fill(r, 1, 7, tok=40)
    r.op("seq_rm", 0, 3, 6)
    r.op("seq_rm", 1, -1, 2)
    r.pos()
    fill(r, 2, 5, tok=9)
    r.op("seq_cp", 0, 3, -1, -1)
    r.op("seq_keep", 3)
    r.pos()
    fill(r, 3, 3, start=12)
    r.op("seq_add", 3, 4, -1, -2)
    r.pos(3)
    r.seq(3)          # shifted positions, K not yet rotated
    r.update()
    fill(r, 3, 2, start=13)
    r.whole()
    r.op("seq_div", 3, 0, -1, 2)
    fill(r, 3, 1, start=8)
    r.whole()
    r.seq(3)
    r.pos()
    return r


def case_interleaved(g: "Gen") -> Rec:
    r = g.rec("placement_interleaved", n_seq_max=4,
              note="ORACLE 5: seq 0 p0-7 interleaved with seq 1 p0-3 in cells 0-11; after seq_rm(0,2,5) and\n"
                   "seq_rm(1,-1,-1) a 6-token seq 2 lands in the holes 1,3,4,5,6,7 and seq 3 at cell 8")
    items = []
    a = b = 0
    for i in range(12):
        if i % 3 == 2 and b < 4:
            items.append((50 + b, b, [1]))
            b += 1
        else:
            items.append((a, a, [0]))
            a += 1
    r.decode(items)
    r.whole()
    r.op("seq_rm", 0, 2, 5)
    r.op("seq_rm", 1, -1, -1)
    fill(r, 2, 6, tok=20)
    fill(r, 3, 1, tok=99)
    r.whole()
    r.pos()
    return r


def case_wraparound(g: "Gen") -> Rec:
    r = g.rec("head_wraparound", n_seq_max=3,
              note="head rules: seq_add drops cells (head = first dropped), head restart heuristic\n"
                   "(head > used + 2n), wrap-around search, inverted seq_add range (head = 0 only)")
    fill(r, 0, 220, rows=False)       # all of seq 0 is removed below: its rows never matter
    r.op("seq_rm", 0, 10, 20)
    r.op("seq_add", 0, 200, -1, -500)  # drops cells 200..219: head 200
    r.pos(0)
    r.op("seq_rm", 0, 0, -1)
    fill(r, 1, 46)
    fill(r, 2, 24, tok=3)
    r.op("seq_add", 1, 2, 1, 5)        # inverted range: only the head changes (to 0)
    fill(r, 1, 2, start=46)
    r.whole()
    r.pos()
    return r


def case_kshift(g: "Gen", type_k: str, fa: bool, model: str = "llama") -> Rec:
    name = f"kshift_{model}_{type_k}_{'fa' if fa else 'vtrans'}"
    r = g.rec(name, model=model, n_seq_max=2, flash_attn=fa, type_k=type_k,
              note="context shift: seq_rm + seq_add; the K-shift is pending until the next decode, "
                   "which rotates K first")
    fill(r, 0, 20)
    r.op("seq_rm", 0, 0, 6)
    r.op("seq_add", 0, 6, -1, -6)
    r.whole()                        # pending: positions moved, K not yet rotated
    fill(r, 0, 3, start=14)
    r.whole()
    r.op("seq_div", 0, 0, -1, 3)
    r.update()
    fill(r, 0, 1, start=r.ctx.pos_max(0) + 1)
    r.whole()
    r.pos()
    return r


def case_kshift_yarn(g: "Gen") -> Rec:
    r = g.rec("kshift_yarn_scales_every_cell", model="llama_yarn", n_seq_max=2,
              note="YaRN rope scaling: a K-shift recomputes every cell of every sequence")
    fill(r, 0, 8)
    fill(r, 1, 8, tok=30)
    r.op("seq_add", 1, 0, -1, -100)   # drops every cell of seq 1
    r.pos(1)
    fill(r, 0, 1, start=8)
    r.whole()
    r.op("seq_add", 0, 2, -1, 3)
    fill(r, 0, 2, start=12)
    r.whole()
    return r


def case_noslot_shift(g: "Gen") -> Rec:
    r = g.rec("kshift_applied_by_failed_decode", n_seq_max=2,
              note="a decode that returns 1 (no slot) has already applied the pending K-shift")
    fill(r, 0, 248, rows=False)
    fill(r, 1, 5, tok=7)
    r.op("seq_add", 1, 0, -1, 3)
    r.seq(1)
    fill(r, 0, 10, start=248)          # 3 cells free: rc 1, after the update
    r.seq(1)
    r.pos()
    return r


def case_cross_stream(g: "Gen") -> Rec:
    r = g.rec("cross_stream_copy_deferred", n_seq_max=3, unified=False,
              note="seq_cp across streams: metadata now, data at the next update (states taken before\n"
                   "show the destination's old bytes); the queued copy survives clear(false)")
    fill(r, 0, 10)
    fill(r, 1, 4, tok=50)
    r.op("seq_cp", 0, 1, -1, -1)
    r.whole()
    r.seq(1)
    r.clear(False)
    r.whole()
    fill(r, 2, 2)                  # update runs the queued copy into stream 1
    r.whole()
    fill(r, 0, 3)
    r.op("seq_cp", 0, 2, -1, -1)
    r.update()
    fill(r, 2, 1, start=3)
    r.whole()
    r.pos()
    r.op("seq_cp", 0, 2, 1, -1, expect="UNSUPPORTED")
    return r


def case_restore_seq(g: "Gen", unified: bool, fa: bool) -> Rec:
    r = g.rec(f"restore_seq_{'unified' if unified else 'streams'}_{'fa' if fa else 'vtrans'}", unified=unified,
              flash_attn=fa, note="per-sequence restore under another id (cells placed by find_slot in the\n"
                                  "destination's stream) and into the same id (the old cells are removed first)")
    fill(r, 0, 12)
    fill(r, 1, 6, tok=60)
    r.op("seq_rm", 0, 0, 4)
    b0 = r.seq_blob(0)
    r.read(b0, 2)
    r.whole()
    r.seq(2)
    b1 = r.seq_blob(1)
    fill(r, 1, 2, start=6)
    r.read(b1, 1)
    r.whole()
    fill(r, 2, 3, start=12, tok=5)
    r.whole()
    r.pos()
    return r


def case_restore_whole(g: "Gen", unified: bool, fa: bool) -> Rec:
    r = g.rec(f"restore_whole_{'unified' if unified else 'streams'}_{'fa' if fa else 'vtrans'}", unified=unified,
              n_seq_max=3, flash_attn=fa,
              note="whole restore packs every stream's cells at 0..n-1 (head 0); decoding continues there")
    fill(r, 0, 10)
    fill(r, 1, 6, tok=33)
    r.op("seq_rm", 0, 2, 5)
    r.op("seq_rm", 1, 0, 2)
    w = r.whole_blob()
    r.read(w)
    r.whole()
    fill(r, 2, 4, tok=70)
    r.whole()
    r.read(r.whole_blob()[4 + 5:], bare=True)
    r.whole()
    r.pos()
    return r


def case_format10(g: "Gen", unified: bool, fa: bool) -> Rec:
    r = g.rec(f"format10_{'unified' if unified else 'streams'}_{'fa' if fa else 'vtrans'}", unified=unified,
              flash_attn=fa, n_seq_max=3, format=10,
              note="format 10 (llama.cpp 0c1e570): b11739's bytes without the k_rot/v_rot words")
    fill(r, 0, 6)
    fill(r, 1, 4, tok=11)
    r.op("seq_rm", 0, 3, 5)
    r.whole()
    r.seq(0, 1)
    b = r.ctx.state_seq_get(0)
    r.read(to_format10(b, False), 2, llama_blob=b)
    r.whole()
    w = r.ctx.state_get()
    r.read(to_format10(w, True), llama_blob=w)
    r.whole()
    fill(r, 1, 2, start=4)
    r.whole()
    return r


def case_types(g: "Gen", type_k: str, type_v: str, fa: bool, model: str = "llama") -> Rec:
    r = g.rec(f"types_{model}_{type_k}_{type_v}_{'fa' if fa else 'vtrans'}", model=model, n_seq_max=2,
              flash_attn=fa, type_k=type_k, type_v=type_v, note="cache element types (row sizes, k_rot/v_rot words)")
    fill(r, 0, 6)
    fill(r, 1, 3, tok=20)
    r.op("seq_rm", 0, 2, 4)
    fill(r, 1, 2, start=3)
    r.whole()
    b = r.seq_blob(1)
    r.read(b, 0)
    r.whole()
    r.seq(0)
    return r


def case_foreign_ids(g: "Gen") -> Rec:
    r = g.rec("unified_foreign_ids", n_seq_max=4,
              note="a unified cache accepts seq ids up to 255 in operations; state writes drop ids >=\n"
                   "n_seq_max (a seq blob of such an id has n_seq_id 0 cells, which restores reject)")
    fill(r, 0, 6)
    r.op("seq_cp", 0, 200, -1, -1)
    r.op("seq_rm", 0, 0, 2)
    r.pos(0, 200)
    r.whole()
    r.seq(200)
    r.read(r.seq_blob(200), 1, expect="FORMAT", why="cells with n_seq_id 0 in a sequence blob")
    r.pos(1)
    return r


def case_clear(g: "Gen") -> Rec:
    r = g.rec("clear_data_and_meta", n_seq_max=2, note="clear(false) keeps tensor bytes, clear(true) zeroes them")
    fill(r, 0, 5)
    r.clear(False)
    r.whole()
    r.pos()
    fill(r, 1, 3, tok=9)
    r.whole()
    r.clear(True)
    r.whole()
    fill(r, 0, 2, tok=1)
    r.whole()
    return r


def case_batches(g: "Gen") -> Rec:
    r = g.rec("batch_validation", n_seq_max=4,
              note="llama_decode returns -1 (pymem BATCH, nothing changed) or 0 for these batches")
    r.decode([(1, 0, [0]), (2, 1, [0]), (3, 1, [0]), (4, 2, [0])])         # a repeated position is fine
    r.decode([(1, 3, [0]), (2, 5, [0]), (3, 4, [0])])                      # decreasing
    r.decode([(1, 3, [0]), (2, 5, [0])])                                   # gap
    r.decode([(1, 4, [0])])                                                # does not continue at 3
    r.decode([(1, 2, [0])])                                                # repeats the last position
    r.decode([(200, 3, [0])])                                              # token >= n_vocab
    r.decode([(-1, 3, [0])])                                               # negative token
    r.decode([(1, 0, [7])])                                                # seq id >= n_seq_max
    r.decode([(1, 0, [-1])])                                               # negative seq id
    r.decode([(5, 9, [3])])                                                # an empty seq starts anywhere
    r.decode([(1, 0, [1, 2]), (2, 1, [2, 1])])                             # coupled (T-28 id order)
    r.whole()
    r.op("seq_rm", 1, 0, 1)
    r.decode([(3, 2, [1, 2])])                                             # coupled, but diverged
    r.pos()
    r.decode([(6, None, [0]), (8, None, [0]), (9, None, [2])])             # NULL positions
    r.decode([(7, None, [1, 2])])                                          # NULL positions, diverged
    r.decode([(4, None, [1]), (5, None, [1])], output=[True, False])
    r.whole()
    r.pos()
    return r


def case_negative_position(g: "Gen") -> Rec:
    r = g.rec("batch_position_minus_one", n_seq_max=2,
              note="position -1 passes llama.cpp's batch checks (< -1 fails as decreasing)")
    fill(r, 1, 3)
    r.decode([(1, -2, [0])])                                               # decreasing: rc -1
    r.pos()
    r.decode([(1, -1, [0]), (2, 0, [0])],
             rows=False, diverge="keeps a cell at position -1 that its state writes skip and whose sequence\n"
                     "bookkeeping breaks when the cell is placed again")
    return r


def case_coupled_streams(g: "Gen") -> Rec:
    r = g.rec("coupled_tokens_streams", unified=False, n_seq_max=2,
              note="per-sequence streams: a token in two sequences cannot be placed (T-22): llama_decode\n"
                   "returns 1 (pymem NO_SLOT)")
    r.decode([(1, 0, [0, 1]), (2, 1, [0, 1])])
    r.pos()
    fill(r, 1, 3)
    r.whole()
    return r


def case_full(g: "Gen", unified: bool) -> Rec:
    r = g.rec(f"full_cache_{'unified' if unified else 'streams'}", unified=unified, n_seq_max=2,
              note="llama_decode returns 1 when a batch does not fit (pymem NO_SLOT, nothing changed)")
    fill(r, 0, N_CTX - 3, rows=False)
    r.pos()
    fill(r, 0, 10, start=N_CTX - 3)
    fill(r, 0, 3, start=N_CTX - 3, rows=False)
    fill(r, 0, 1, start=N_CTX, rows=False)
    r.op("seq_rm", 0, 100, 110)
    fill(r, 1, 10, tok=5)
    r.seq(1)
    r.pos()
    return r


def case_small_ubatch(g: "Gen") -> Rec:
    r = g.rec("small_ubatches_equal_split", unified=False, n_seq_max=4, n_ubatch=4,
              note="n_ubatch 4, per-sequence streams: the batch is cut with split_equal")
    r.decode([(i % 128, i // 4, [i % 4]) for i in range(24)])
    r.whole()
    r.decode([(i % 128, 6 + i // 2, [2 * (i % 2)]) for i in range(6)])
    r.whole()
    r.pos()
    return r


def case_small_ubatch_unified(g: "Gen") -> Rec:
    r = g.rec("small_ubatches_simple_split", unified=True, n_seq_max=3, n_ubatch=3,
              note="n_ubatch 3, unified: split_simple, coupled tokens")
    r.decode([(1, 0, [0, 1]), (2, 1, [0, 1]), (3, 2, [0]), (4, 2, [1]), (5, 0, [2]), (6, 3, [0]), (7, 1, [2])])
    r.whole()
    r.pos()
    return r


def case_nospace_restore(g: "Gen") -> Rec:
    r = g.rec("restore_no_room", n_seq_max=2,
              note="a sequence restore that does not fit: llama.cpp returns 0, pymem NO_SLOT")
    fill(r, 1, 12, tok=3)
    b = r.seq_blob(1)
    r.op("seq_rm", 1, -1, -1)
    fill(r, 0, N_CTX - 6, rows=False)
    r.read(b, 1, expect="NO_SLOT", why="12 cells into 6 free ones")
    r.pos()
    return r


def corruptions(blob: bytes, whole: bool, r: Rec) -> list:
    """(why, blob, pymem error) of corrupted variants of a valid blob (format 11)."""
    sts = parse_blob(blob, whole)
    st = next(s for s in sts if s.cells)
    o = st.off
    e = envelope_len(blob, whole)
    out = []
    if whole:
        out.append(("wrong architecture name", put_u32(blob, 0, 5)[:4] + b"llamb" + blob[9:], "FORMAT"))
        out.append(("architecture name longer than the blob", put_u32(blob, 0, 0x7FFFFFF0), "FORMAT"))
    else:
        out.append(("wrong sequence magic", put_u32(blob, 0, IO_MAGIC ^ 1), "FORMAT"))
    out.append(("n_stream mismatch", put_u32(blob, e, len(sts) + 1), "FORMAT"))
    out.append(("cell_count > size", put_u32(blob, o["cc"], N_CTX + 1), "FORMAT"))
    if whole:
        out.append((f"seq id {r.n_seq_max} >= n_seq_max", put_u32(blob, o["id0"], r.n_seq_max), "FORMAT"))
        out.append(("negative seq id", put_u32(blob, o["id0"], -1), "FORMAT"))
    else:
        # two ids in a sequence blob cell (the extra id is inserted)
        two = put_u32(blob, o["nid0"], 2)
        two = two[:o["id0"]] + blob[o["id0"]:o["id0"] + 4] + two[o["id0"]:]
        out.append(("2 seq ids in a sequence blob cell", two, "FORMAT"))
    out.append(("v_trans flipped", put_u32(blob, o["v_trans"], 1 - st.v_trans), "FORMAT"))
    out.append(("v_trans = 2", put_u32(blob, o["v_trans"], 2), "FORMAT"))
    out.append(("n_layer + 1", put_u32(blob, o["n_layer"], len(st.k) + 1), "FORMAT"))
    out.append(("k_rot mismatch", put_u32(blob, o["k_rot"], 64 if r.kw["k_rot"] == 0 else 0), "FORMAT"))
    out.append(("v_rot mismatch", put_u32(blob, o["v_rot"], 64 if r.kw["v_rot"] == 0 else 0), "FORMAT"))
    out.append(("K type mismatch", put_u32(blob, o["k_type"], 0 if r.kw["type_k"] != "f32" else 1), "FORMAT"))
    out.append(("K row size + 2", put_u64(blob, o["k_row"], st.k_row[0] + 2), "FORMAT"))
    out.append(("V type mismatch", put_u32(blob, o["v_type"], 0 if r.kw["type_v"] != "f32" else 1), "FORMAT"))
    if st.v_trans:
        out.append(("V element size 4", put_u32(blob, o["v_el"], 4 if st.v_el[0] != 4 else 2), "FORMAT"))
        out.append(("n_embd_v_gqa - 1", put_u32(blob, o["v_ne"], st.v_ne[0] - 1), "FORMAT"))
    else:
        out.append(("V row size + 2", put_u64(blob, o["v_row"], st.v_el[0] + 2), "FORMAT"))
    for cut, why in [(0, "empty blob"), (3, "3 bytes"), (e, "envelope only"), (e + 2, "half n_stream"),
                     (o["cc"] + 4, "no cells"), (o["pos0"] + 6, "inside the first cell"),
                     (o["v_trans"] + 4, "in the data header"), (o["k_data"] + 10, "inside K rows"),
                     (len(blob) - 1, "last byte missing")]:
        out.append((f"truncated: {why} ({cut} of {len(blob)} bytes)", blob[:cut], "FORMAT"))
    return out


def case_corrupt(g: "Gen", unified: bool, fa: bool, whole: bool) -> Rec:
    kind = "whole" if whole else "seq"
    r = g.rec(f"corrupt_{kind}_{'unified' if unified else 'streams'}_{'fa' if fa else 'vtrans'}", unified=unified,
              flash_attn=fa, n_seq_max=3,
              note=f"trailing bytes (ignored by llama.cpp and pymem), then corrupted {kind} blobs: llama.cpp\n"
                   "rejects each (returns 0); pymem returns FORMAT and changes nothing")
    fill(r, 0, 3)
    fill(r, 1, 2, tok=40)
    good = r.whole_blob() if whole else r.seq_blob(0)
    r.read(good + b"\x00\x01\x02", -1 if whole else 2, why="3 trailing bytes")
    r.whole()
    r.pos()
    for why, bad, err in corruptions(good, whole, r):
        if r.read(bad, -1 if whole else 2, expect=err, why=why, probe=True):
            if whole:
                r.whole()
            else:
                r.seq(2)
    r.whole()
    r.pos()
    return r


def case_negative_pos(g: "Gen") -> Rec:
    r = g.rec("corrupt_negative_position", n_seq_max=2,
              note="SPEC A-16: a restored cell with a negative position")
    fill(r, 0, 4)
    good = r.seq_blob(0)
    o = parse_blob(good, False)[0].off
    bad = put_u32(good, o["pos0"], -5)
    r.read(bad, 1, expect="FORMAT", diverge="gives a non-empty cell position -5")
    r.whole()
    r.pos()
    return r


def case_abort_ops(g: "Gen") -> Rec:
    r = g.rec("invalid_ops_abort", n_seq_max=2, unified=False,
              note="operations llama.cpp aborts on (GGML_ASSERT / division by zero): pymem returns an\n"
                   "error and changes nothing")
    fill(r, 0, 5)
    fill(r, 1, 2, tok=3)
    r.whole()
    r.op("seq_div", 0, 0, -1, 0, expect="INVALID_ARG")
    return r


def case_abort_ops2(g: "Gen") -> Rec:
    r = g.rec("invalid_seq_id_abort", n_seq_max=2, unified=False)
    fill(r, 0, 5)
    r.whole()
    r.op("seq_add", 2, 0, -1, 1, expect="INVALID_ARG")
    return r


def case_abort_ops3(g: "Gen") -> Rec:
    r = g.rec("invalid_seq_rm_id_abort", n_seq_max=2, unified=False)
    fill(r, 1, 4)
    r.whole()
    r.op("seq_rm", 5, -1, -1, expect="INVALID_ARG")
    return r


FILES: dict[str, list[Callable[["Gen"], Rec]]] = {
    "kv_ops.txt": [
        lambda g: case_holes(g, True, False), lambda g: case_holes(g, True, True),
        lambda g: case_holes(g, False, False), lambda g: case_holes(g, False, True),
        case_interleaved, case_wraparound, case_cross_stream, case_foreign_ids, case_clear,
    ],
    "kv_shift.txt": [
        lambda g: case_kshift(g, "f16", False), lambda g: case_kshift(g, "f32", True),
        lambda g: case_kshift(g, "f16", True, "llama_neox"), case_kshift_yarn, case_noslot_shift,
    ],
    "kv_state.txt": [
        lambda g: case_restore_seq(g, True, False), lambda g: case_restore_seq(g, False, True),
        lambda g: case_restore_whole(g, True, False), lambda g: case_restore_whole(g, False, True),
        lambda g: case_format10(g, True, False), lambda g: case_format10(g, False, True),
        lambda g: case_types(g, "q8_0", "f16", False), lambda g: case_types(g, "q8_0", "q8_0", True),
        lambda g: case_types(g, "f32", "f32", False), lambda g: case_types(g, "bf16", "bf16", True),
        lambda g: case_types(g, "q8_0", "q8_0", True, "llama_hd64"),
        case_nospace_restore,
    ],
    "kv_corrupt.txt": [
        lambda g: case_corrupt(g, True, False, False), lambda g: case_corrupt(g, False, True, False),
        lambda g: case_corrupt(g, True, True, True), lambda g: case_corrupt(g, False, False, True),
        case_negative_pos,
    ],
    "kv_batch.txt": [
        case_batches, case_negative_position, case_coupled_streams, lambda g: case_full(g, True), lambda g: case_full(g, False),
        case_small_ubatch,
        case_small_ubatch_unified,
    ],
    "kv_abort.txt": [case_abort_ops, case_abort_ops2, case_abort_ops3],
}

# the same cases recorded from llama-cpp-python 0.3.36 (llama.cpp 0c1e570), which writes format 10
# itself (no k_rot/v_rot words; quantized K is not Hadamard-rotated)
LCP_FILES = {
    "kv_0c1e570.txt": [
        lambda g: case_holes(g, True, False), lambda g: case_holes(g, False, True), case_interleaved,
        case_wraparound, lambda g: case_kshift(g, "f16", False), lambda g: case_kshift(g, "f16", True),
        lambda g: case_kshift(g, "f16", False, "llama_neox"), case_kshift_yarn, case_cross_stream,
        lambda g: case_restore_seq(g, True, False), lambda g: case_restore_seq(g, False, True),
        lambda g: case_restore_whole(g, True, False), lambda g: case_restore_whole(g, False, True),
        lambda g: case_types(g, "q8_0", "q8_0", True), lambda g: case_types(g, "q8_0", "q8_0", True, "llama_hd64"),
        case_clear, case_batches, lambda g: case_full(g, True), case_small_ubatch,
    ],
}

# Fuzz seed corpus: (config index of tests/fuzz/fuzz_kv_state.c) for the llama.cpp configurations
# the vectors use.  Must match CONFIGS in fuzz_kv_state.c.
FUZZ_CONFIGS = {
    # (model, unified, v_trans, type_k, type_v, n_seq_max, format): index
    ("llama", True, True, "f16", "f16", 4, 11): 0,
    ("llama", True, False, "f16", "f16", 4, 11): 1,
    ("llama", False, True, "f16", "f16", 4, 11): 2,
    ("llama", False, False, "f16", "f16", 4, 11): 3,
    ("llama", True, False, "q8_0", "q8_0", 2, 11): 4,
    ("llama", True, True, "q8_0", "f16", 2, 11): 5,
    ("llama", True, True, "f16", "f16", 3, 10): 6,
    ("llama", False, False, "f16", "f16", 3, 10): 7,
    ("llama_hd64", True, False, "q8_0", "q8_0", 2, 11): 8,
}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
class Gen:
    def __init__(self, args: argparse.Namespace) -> None:
        from pymem._oracle import OracleWorker

        self.args = args
        self.lcp = args.llama == "llama-cpp-python"
        self.build = "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)" if self.lcp else "llama.cpp b11739"
        self.gen_worker = OracleWorker()
        self.gen_worker.start()
        import regen_mem

        self.models = self.gen_worker.ensure_models(["llama", "llama_hd64", "llama_yarn", "llama_neox"]
                                                    + regen_mem.MODELS)
        if self.lcp:
            from pymem._oracle.lcp import LcpWorker

            self.worker = LcpWorker()
            self.worker.start()
        else:
            self.worker = self.gen_worker
        self.model_of: dict[str, str] = {}
        self.seeds: dict[str, bytes] = {}
        self.cur: Optional[Rec] = None

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def rec(self, name: str, model: str = "llama", **kw) -> Rec:
        r = Rec(self, name, model, **kw)
        self.model_of[name] = model
        self.cur = r
        return r

    def corpus(self, r: Rec, blob: bytes, whole: bool, seq: int = 0) -> None:
        """Keep a few real blobs (with a fuzz_kv_state header) as seeds."""
        if self.lcp:
            return
        kw = r.kw
        key = (self.model_of[r.name], bool(kw["unified"]), bool(kw["v_trans"]), kw["type_k"], kw["type_v"],
               r.n_seq_max, r.format)
        cfg = FUZZ_CONFIGS.get(key)
        if cfg is None or len(blob) > 24000:
            return
        # mode byte (fuzz_kv_state.c): bit0 llama envelope, bit1 per-sequence, bits 2-3 target seq,
        # bit4 allow trailing bytes, bit5 prefill the cache first
        for prefill in (0, 1):
            mode = 1 | (0 if whole else 2) | ((1 if not whole else 0) << 2) | (prefill << 5)
            name = f"llama_c{cfg}_{'whole' if whole else 'seq'}_{len(blob)}_{prefill}"
            self.seeds.setdefault(name, bytes([cfg, mode]) + blob)

    def close(self) -> None:
        if self.worker is not self.gen_worker:
            self.worker.close()
        self.gen_worker.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="diff against the committed files, write nothing")
    ap.add_argument("--no-verify", action="store_true", help="write even if pymem does not reproduce a case")
    ap.add_argument("-k", default="", help="only cases whose name contains this (implies no file writes)")
    ap.add_argument("--llama", choices=["py-sync", "llama-cpp-python"], default="py-sync",
                    help="record from b11739 (kv_*.txt) or from llama-cpp-python 0.3.36 / 0c1e570 "
                         "(kv_0c1e570.txt, format 10, written by that build itself)")
    ap.add_argument("--file", action="append", help="only this vector file (repeatable; --check compares only it)")
    args = ap.parse_args()
    import test_vectors as tv

    g = Gen(args)
    texts: dict[str, str] = {}
    failed = 0
    n_cases = 0
    try:
        import regen_mem

        files = {**LCP_FILES, **regen_mem.LCP_FILES} if g.lcp else {**FILES, **regen_mem.FILES}
        if args.file:
            files = {f: b for f, b in files.items() if f in args.file}
        src = ("llama.cpp 0c1e570 (llama-cpp-python==0.3.36, built by tools/build_lcp.sh); regen.py --llama "
               "llama-cpp-python" if g.lcp else "llama.cpp b11739 (llama-cpp-py-sync==0.11739)")
        for fname, builders in files.items():
            parts = [f"# {fname}: generated by tests/vectors/regen.py from {src}; do not edit.\n"
                     f"# Format: tests/vectors/README.md\n"]
            for build in builders:
                r = build(g)
                text = r.done()
                if args.k and args.k not in r.name:
                    continue
                n_cases += 1
                if not args.no_verify:
                    try:
                        for case in tv.parse(text, fname):
                            st = tv.Replayer(case).run()
                        g.log(f"{fname}:{r.name}: ok ({st['steps']} steps, {st['expectations']} "
                              f"expectations, {st['bytes']} bytes)")
                    except AssertionError as exc:
                        failed += 1
                        g.log(f"{fname}:{r.name}: PYMEM MISMATCH: {exc}")
                parts.append("\n" + text)
            texts[fname] = "".join(parts)
    finally:
        g.close()
    if failed and not args.no_verify:
        g.log(f"{failed} case(s) not reproduced by pymem: nothing written")
        return 1
    if args.k:
        g.log(f"{n_cases} case(s) checked; -k writes nothing")
        return 0
    total = sum(len(t) for t in texts.values())
    g.log(f"{n_cases} cases, {total} bytes of vectors, {len(g.seeds)} corpus seeds")
    if args.check:
        bad = [f for f, t in texts.items() if not (HERE / f).exists() or (HERE / f).read_text() != t]
        for f in bad:
            g.log(f"differs: {f}")
        return 1 if bad else 0
    for f, t in texts.items():
        (HERE / f).write_text(t)
    if g.lcp or args.file:
        return 0
    CORPUS.mkdir(parents=True, exist_ok=True)
    for old in CORPUS.glob("llama_*"):
        old.unlink()
    # keep the corpus small: at most 2 seeds per (config, kind)
    kept: dict[str, int] = {}
    for name in sorted(g.seeds, key=lambda n: (len(g.seeds[n]), n)):
        key = name.rsplit("_", 2)[0]
        if kept.get(key, 0) >= 2:
            continue
        kept[key] = kept.get(key, 0) + 1
        (CORPUS / name).write_bytes(g.seeds[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
