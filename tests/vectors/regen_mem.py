"""Shared vectors for the memory kinds other than the plain KV cache (iSWA, recurrent, hybrid,
hybrid-iSWA), recorded from real llama.cpp b11739 by tests/vectors/regen.py (which imports this
module for its FILES).  Grammar: tests/vectors/README.md.

A case's parameters are the memory spec llama.cpp builds for the tiny model and context
(``pymem.memory_spec``); its expectations are llama.cpp's return codes, positions and state
bytes.  Rows: after each decode, the K/V rows llama.cpp computed for the new cells (per token,
every KV part) and the r/s rows of the cell each sequence of the batch ends in; after a
rollback ``seq_rm`` (n_rs_seq > 0) the rows of the snapshot plane it selected, as llama.cpp
writes them in its sequence state.  All are cut out of llama.cpp's states with the small
parsers of regen.py / tests/blobreader.py, not pymem's.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Optional

import regen as R
from regen import N_CTX, Rec

#: the tiny models these files use (regen.Gen builds them)
MODELS = ["gemma2", "gemma3", "mamba", "lfm2", "lfm2_swa"]


def parse_rec(b: bytes, off: int, n_recr: int) -> tuple[list, list, list, int]:
    """(cells, r rows per layer, s rows per layer, end) of a REC section: cells are
    (pos, ids); rows[l] is the list of the layer's row bytes, one per cell in order."""
    o = off
    cc = struct.unpack_from("<I", b, o)[0]
    o += 4
    cells = []
    for _ in range(cc):
        pos, n = struct.unpack_from("<iI", b, o)
        o += 8
        ids = struct.unpack_from(f"<{n}i", b, o)
        o += 4 * n
        cells.append((pos, tuple(ids)))
    o += 8  # s_trans, n_layer
    planes = []
    for _ in range(2):
        rows = []
        for _ in range(n_recr):
            _t, row = struct.unpack_from("<iQ", b, o)
            o += 12
            rows.append([b[o + k * row:o + (k + 1) * row] for k in range(cc)])
            o += cc * row
        planes.append(rows)
    assert o <= len(b), "truncated REC section"
    return cells, planes[0], planes[1], o


class MemRec(Rec):
    """One case of any memory kind (the llama.cpp side of regen.Rec, generalised)."""

    def __init__(self, gen: Any, name: str, model: str, n_seq_max: int = 2, unified: bool = True,
                 flash_attn: bool = False, type_k: str = "f16", type_v: Optional[str] = None,
                 swa_full: bool = True, n_rs_seq: int = 0, n_ubatch: Optional[int] = None, note: str = "") -> None:
        import pymem

        # llama-cpp-python 0.3.36 (llama.cpp 0c1e570) writes format 10 itself
        self.gen, self.name, self.format = gen, name, 10 if gen.lcp else 11
        gen.model_of[name] = model
        gen.cur = self
        type_v = type_v or type_k
        path = gen.models[model]
        extra = {"n_rs_seq": n_rs_seq} if n_rs_seq else {}
        self.ctx = gen.worker.context(path, n_ctx=N_CTX, n_seq_max=n_seq_max, kv_unified=unified,
                                      flash_attn=flash_attn, type_k=type_k, type_v=type_v, swa_full=swa_full,
                                      n_ubatch=n_ubatch, **extra)
        spec = pymem.memory_spec(path, N_CTX, n_seq_max=n_seq_max, type_k=type_k, type_v=type_v,
                                 flash_attn=flash_attn, unified=unified, swa_full=swa_full,
                                 n_ubatch=n_ubatch or 512, n_rs_seq=n_rs_seq, format=self.format)
        self.spec = spec
        self.kind = spec.kind
        self.kv_specs = [p for p in spec.parts if p.kind == "kv"]
        self.rec_spec = next((p for p in spec.parts if p.kind == "recurrent"), None)
        self.n_rs_seq = spec.n_rs_seq
        # row sizes from pymem's layout of the same memory (only to size the rows of tokens whose
        # cells llama.cpp already purged again within the batch: those rows are never observed)
        from pymem.plan import build_memory

        mem = build_memory(spec)
        self.kv_rows = []    # per KV part: [(k bytes, v bytes)] per held layer
        for part in mem.kv_parts():
            lay = []
            for il in part.layers:
                li = part._layers[il][1]
                lay.append((int(li.k_row_bytes),
                            int(li.v_row_bytes) * (int(li.n_embd_v_gqa) if part.v_trans else 1)))
            self.kv_rows.append(lay)
        mem.close()
        first = self.kv_specs[0].kwargs if self.kv_specs else {}
        self.kw = {"unified": unified, "v_trans": not flash_attn, "type_k": type_k, "type_v": type_v,
                   "k_rot": first.get("k_rot", 0), "v_rot": first.get("v_rot", 0)}
        self.n_seq_max = n_seq_max
        self.unified = unified
        self.n_stream = 1 if unified else n_seq_max
        self.alive = True
        self.resynced = False
        self.lines = [f"[case {name}]"]
        for text in note.strip().splitlines():
            self.lines.append(f"# {text.strip()}")
        self.lines.append(
            f"# {gen.build}: model {model}, n_ctx {N_CTX}, n_seq_max {n_seq_max}, kv_unified {int(unified)}, "
            f"flash_attn {int(flash_attn)}, swa_full {int(swa_full)}, type_k {type_k}, type_v {type_v}"
            + (f", n_rs_seq {n_rs_seq}" if n_rs_seq else "") + (f", n_ubatch {n_ubatch}" if n_ubatch else ""))
        self.n_ubatch = self.ctx.n_ubatch()
        self.lines += [f"{k} = {v}" for k, v in self._params(spec)]

    def _params(self, spec: Any) -> list:
        n_layer = (self.kv_specs[0] if self.kv_specs else self.rec_spec).kwargs["n_layer"]
        p: list = [("kind", spec.kind), ("arch", spec.arch), ("n_layer", n_layer)]
        if self.kv_specs:
            kw = self.kv_specs[0].kwargs
            for other in self.kv_specs[1:]:
                for k, v in other.kwargs.items():
                    if k not in ("layers", "size", "n_swa", "swa_type", "k_rot", "v_rot", "rope"):
                        assert v == kw[k], (k, v, kw[k])
            p += R.kv_params(kw, self._ropes(), self.format)
            if len(self.kv_specs) == 2:
                sw = self.kv_specs[1].kwargs
                p += [("swa_layers", " ".join(map(str, sw["layers"])) or "none"), ("swa_size", sw["size"]),
                      ("swa_n_swa", sw["n_swa"]), ("swa_swa_type", sw["swa_type"]), ("swa_k_rot", sw["k_rot"]),
                      ("swa_v_rot", sw["v_rot"])]
        else:
            p.append(("n_seq_max", spec.n_seq_max))
        if self.rec_spec is not None:
            rk = self.rec_spec.kwargs
            assert rk["n_layer"] == n_layer

            def per_layer(x: Any) -> str:
                return " ".join(str(v) for v in (x if isinstance(x, (list, tuple)) else [x] * n_layer))
            p += [("rec_layers", " ".join(map(str, rk["layers"]))), ("n_embd_r", per_layer(rk["n_embd_r"])),
                  ("n_embd_s", per_layer(rk["n_embd_s"])), ("rec_size", rk["size"]), ("type_r", rk["type_r"]),
                  ("type_s", rk["type_s"]), ("n_rs_seq", rk["n_rs_seq"])]
        p += [("n_vocab", 128), ("n_ubatch", self.n_ubatch)]
        return p

    def _ropes(self) -> list:
        """Per model layer: the RoPE of the KV part holding it (None where no part does)."""
        n_layer = self.kv_specs[0].kwargs["n_layer"]
        out: list = [None] * n_layer
        for part in self.kv_specs:
            for il in part.kwargs["layers"]:
                out[il] = part.kwargs["rope"][il]
        # layers held by no KV part: the first part's entry (readers ignore it); keeps modes per layer
        for il in range(n_layer):
            if out[il] is None:
                out[il] = self.kv_specs[0].kwargs["rope"][il]
        return out

    # -- expectations: no fuzz corpus, no single-section assumptions ----------------------------
    def whole(self) -> bytes:
        self._live()
        b = self.ctx.state_get()
        self.out(f"expect_whole = hex:{b.hex()}")
        return b

    def seq(self, *seqs: int) -> None:
        self._live()
        for s in seqs:
            self.out(f"expect_seq = {s} hex:{self.ctx.state_seq_get(s).hex()}")

    # -- state parsing ------------------------------------------------------------------------------
    def _sections(self, blob: bytes, whole: bool) -> tuple[list, Optional[tuple]]:
        off = R.envelope_len(blob, whole)
        kvs = []
        for _ in self.kv_specs:
            streams, off = R.parse_kv(blob, off, not self.gen.lcp)
            kvs.append(streams)
        rec = None
        if self.rec_spec is not None:
            rec = parse_rec(blob, off, len(self.rec_spec.kwargs["layers"]))
            off = rec[3]
        assert off == len(blob), f"{self.name}: {len(blob) - off} bytes after the sections"
        return kvs, rec

    # -- steps ----------------------------------------------------------------------------------------
    def _row_args(self, items, before: bytes, after: bytes) -> list:
        out = []
        kb, ka = self._sections(before, True)[0], self._sections(after, True)
        if self.kv_specs:
            out.append("rows=hex:" + self._kv_rows(items, kb, ka[0]).hex())
        if self.rec_spec is not None:
            seqs = sorted({q for _, _, s in items for q in s})
            out.append("rs=hex:" + self._rec_rows(ka[1], seqs).hex())
        return out

    def _kv_rows(self, items, before: list, after: list) -> bytes:
        per_token = [b""] * len(items)
        for part, (sb, sa) in enumerate(zip(before, after)):
            lay = self.kv_rows[part]
            got: dict = {}
            for st in range(len(sa)):
                new = R.new_cells(sb[st].cells, sa[st].cells)
                for i, (t, p, s) in enumerate(items):
                    if (0 if self.unified else s[0]) != st:
                        continue
                    key = (p, tuple(sorted(set(x for x in s if x < self.n_seq_max))))
                    ranks = new.get(key)
                    if not ranks:
                        # placed and purged again within the batch (SWA): never observable
                        assert part == 1, f"{self.name}: no new cell for token {i} {key} in part {part}"
                        continue
                    r = ranks.pop(0)
                    S = sa[st]
                    got[i] = b"".join([S.k_row_of(l, r) for l in range(len(lay))] +
                                      [S.v_row_of(l, r) for l in range(len(lay))])
                left = [k for k, v in new.items() if v]
                # the SWA half may also drop ids of old cells that left a sequence's window
                assert not left or part == 1, f"{self.name}: new cells without a token in part {part}: {left}"
            zero = bytes(sum(k for k, _ in lay) + sum(v for _, v in lay))
            for i in range(len(items)):
                per_token[i] += got.get(i, zero)
        return b"".join(per_token)

    def _rec_rows(self, rec: tuple, seqs: list) -> bytes:
        cells, r_rows, s_rows, _ = rec
        out = []
        for q in seqs:
            rank = [k for k, (_, ids) in enumerate(cells) if q in ids]
            assert len(rank) == 1, f"{self.name}: seq {q} in {len(rank)} recurrent cells"
            out += [rows[rank[0]] for rows in r_rows] + [rows[rank[0]] for rows in s_rows]
        return b"".join(out)

    def op(self, name: str, *args: int, expect: Optional[str] = None) -> None:
        if name != "seq_rm" or expect is not None or not self.n_rs_seq:
            return super().op(name, *args, expect=expect)
        s, p0, p1 = args
        pmax = self.ctx.pos_max(s)
        res = self.ctx.seq_rm(s, p0, p1)
        extra = ""
        if res and 0 < p0 <= pmax and (p1 < 0 or p1 > pmax):   # a rollback is pending (SPEC 6.3)
            assert self.ctx.pos_max(s) == p0 - 1, (self.name, args)
            _, rec = self._sections(self.ctx.state_seq_get(s), False)
            assert len(rec[0]) == 1, f"{self.name}: seq {s} state has {len(rec[0])} recurrent cells"
            extra = " rs=hex:" + b"".join([rows[0] for rows in rec[1]] + [rows[0] for rows in rec[2]]).hex()
        self.out(f"step = seq_rm {s} {p0} {p1}{extra} -> {int(res)}")


def rec(g: Any, name: str, model: str, **kw: Any) -> MemRec:
    return MemRec(g, name, model, **kw)


fill = R.fill


def bad_batches(r: MemRec, seq: int) -> None:
    """Batches llama.cpp refuses (llama_decode returns -1): a token id >= n_vocab, a position
    gap, a sequence id >= n_seq_max."""
    p = r.ctx.pos_max(seq) + 1
    assert r.decode([(5, p, [seq]), (200, p + 1, [seq])]) == -1
    assert r.decode([(5, p + 2, [seq])]) == -1
    assert r.decode([(5, 0, [r.n_seq_max])]) == -1


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def case_iswa_full(g: Any) -> MemRec:
    r = rec(g, "iswa_swa_full_unified_vtrans", "gemma2", n_seq_max=2,
            note="iSWA (gemma2: SWA layers 0,2 window 8, full 1,3), swa_full on: both halves 256 cells;\n"
                 "holes, seq_cp, a context shift (K of both halves rotated at the next decode)")
    fill(r, 0, 12)
    r.whole()
    r.op("seq_cp", 0, 1, -1, -1)
    fill(r, 1, 3, start=12, tok=40)
    r.op("seq_rm", 0, 3, 6)
    r.pos()
    r.op("seq_add", 1, 8, -1, -4)
    r.seq(1)
    fill(r, 1, 2, start=11, tok=60)
    r.whole()
    bad_batches(r, 0)
    r.seq(0, 1)
    r.pos()
    return r


def case_iswa_small(g: Any) -> MemRec:
    r = rec(g, "iswa_swa_small_streams_fa_q8_0", "gemma3", n_seq_max=2, unified=False, flash_attn=True,
            type_k="q8_0", swa_full=False, n_ubatch=8,
            note="iSWA (gemma3), swa_full off, one stream per sequence, flash attention, q8_0 K and V,\n"
                 "n_ubatch 8: the SWA half drops cells that left the window; sequence states hold only\n"
                 "the visible SWA cells")
    fill(r, 0, 20)
    fill(r, 1, 5, tok=70)
    r.whole()
    r.seq(0)
    r.op("seq_rm", 1, 2, -1)
    fill(r, 1, 4, start=2, tok=90)
    r.op("seq_cp", 0, 1, -1, -1)
    r.pos()
    fill(r, 1, 2, start=20, tok=9)       # the update copies stream 0 into stream 1 first
    r.whole()
    r.read(r.ctx.state_seq_get(0)[:-3], 1, expect="FORMAT", why="a sequence state without its last 3 bytes")
    r.pos()
    return r


def case_rec_mamba(g: Any) -> MemRec:
    r = rec(g, "recurrent_mamba", "mamba", n_seq_max=2,
            note="recurrent (mamba, 2 layers, r 1536 + s 8192 bytes a cell): seq_rm truth table (SPEC 6.3),\n"
                 "seq_cp shares a cell, the next decode of the copy forks it")
    fill(r, 0, 6)
    for a in ((0, 0, 3), (0, 3, -1), (0, 4, 5), (-1, -1, -1), (0, 6, -1)):
        r.op("seq_rm", *a)
    r.pos()
    r.op("seq_cp", 0, 1, -1, -1)
    r.pos()
    fill(r, 1, 2, start=6, tok=30)
    bad_batches(r, 1)
    r.whole()
    r.pos()
    return r


def case_hybrid_rollback(g: Any) -> MemRec:
    r = rec(g, "hybrid_lfm2_rollback_fa", "lfm2", n_seq_max=2, flash_attn=True, n_rs_seq=2,
            note="hybrid (lfm2: attention 0,2 + shortconv 1,3) with n_rs_seq 2 rollback snapshots:\n"
                 "a suffix seq_rm within 2 tokens rolls the recurrent state back to a snapshot plane\n"
                 "(states written meanwhile hold that plane's rows); a second one fails until a decode")
    fill(r, 0, 8)
    r.op("seq_rm", 0, 2, -1)           # 6 tokens back: more than n_rs_seq, refused
    r.op("seq_rm", 0, 6, -1)           # 2 tokens back: rollback
    r.pos()
    r.whole()
    r.seq(0)
    r.op("seq_rm", 0, 5, -1)           # second rollback while one is pending: refused
    fill(r, 0, 3, start=6, tok=20)
    r.whole()
    r.op("seq_cp", 0, 1, -1, -1)
    fill(r, 1, 2, start=9, tok=50)
    r.op("seq_rm", 1, 10, -1)          # 1 token back
    r.seq(1)
    fill(r, 1, 1, start=10, tok=51)
    bad_batches(r, 0)
    r.whole()
    r.pos()
    return r


def case_hybrid_streams(g: Any) -> MemRec:
    r = rec(g, "hybrid_lfm2_streams_vtrans", "lfm2", n_seq_max=3, unified=False,
            note="hybrid (lfm2), one KV stream per sequence, V transposed, no rollback: a front seq_rm\n"
                 "drops KV cells only, seq_cp across streams (KV data at the next update), a context shift")
    fill(r, 0, 10)
    fill(r, 2, 3, tok=80)
    r.op("seq_rm", 0, 0, 3)
    r.op("seq_rm", 0, 7, -1)
    r.pos()
    r.op("seq_cp", 0, 1, -1, -1)
    r.seq(1)
    fill(r, 1, 2, start=10, tok=40)
    r.op("seq_add", 2, 0, -1, 5)
    fill(r, 2, 1, start=8, tok=3)
    bad_batches(r, 2)
    r.whole()
    r.read(r.ctx.state_seq_get(2)[:-5], 0, expect="FORMAT", why="a sequence state without its last 5 bytes")
    r.pos()
    return r


def case_hybrid_iswa(g: Any) -> MemRec:
    r = rec(g, "hybrid_iswa_lfm2_swa_rollback_fa", "lfm2_swa", n_seq_max=2, flash_attn=True, n_rs_seq=2,
            note="hybrid-iSWA (lfm2_swa: attention 0,2 all SWA window 8, so the base half holds no\n"
                 "layers; shortconv 1,3) with n_rs_seq 2")
    fill(r, 0, 14)
    r.op("seq_rm", 0, 13, -1)
    r.seq(0)
    fill(r, 0, 2, start=13, tok=33)
    r.op("seq_cp", 0, 1, -1, -1)
    fill(r, 1, 3, start=15, tok=60)
    r.whole()
    bad_batches(r, 1)
    r.seq(1)
    r.pos()
    return r


FILES: dict[str, list[Callable[[Any], MemRec]]] = {
    "iswa.txt": [case_iswa_full, case_iswa_small],
    "recurrent.txt": [case_rec_mamba],
    "hybrid.txt": [case_hybrid_rollback, case_hybrid_streams, case_hybrid_iswa],
}

# the same cases recorded from llama-cpp-python 0.3.36 (llama.cpp 0c1e570, format 10); not the pure
# recurrent one: its state has no KV section, so the formats do not differ there (and its rows
# alone would be 150 KB)
LCP_FILES: dict[str, list[Callable[[Any], MemRec]]] = {
    "mem_0c1e570.txt": [case_iswa_full, case_iswa_small, case_hybrid_rollback, case_hybrid_streams, case_hybrid_iswa],
}
