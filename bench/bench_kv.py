#!/usr/bin/env python3
"""KV cache benchmark: pymem vs real llama.cpp (b11739, in-process), vs memcpy, vs numpy.

One run prints, per configuration, the median time of every operation for llama.cpp and for
pymem and their ratio (llama.cpp time / pymem time: > 1 means pymem is faster), then a
summary matrix of the ratios.  Setup follows ORACLE.md section 6:

* model: the tiny ``llama`` model (2 layers, n_head_kv 1, head 32, K/V F16, i.e. 64 B rows
  and 256 B of K+V per cell), flash attention off (V transposed), 1 thread;
* fill: one synthetic whole-state blob (random F16 K/V, every cell in exactly one sequence)
  is built once and loaded into llama.cpp with ``llama_state_set_data`` and into pymem with
  ``state_read``; both memories are then checked to write the identical whole blob;
* timing: ``time.perf_counter_ns``, medians over many repetitions, the two implementations
  interleaved (alternating which goes first); operations that change the cache get their
  state restored before every repetition (restore not timed); sub-10 µs operations are
  timed over an inner loop.

llama.cpp is called through the cffi bindings of llama-cpp-py-sync (the same kind of
Python -> C call as pymem's cffi layer), so both columns include one Python call overhead;
the "cffi floor" rows show its size.

Usage: python bench/bench_kv.py [--quick] [--configs a,b,c] [--reps N] [--no-llama] [--no-scaling]
"""
from __future__ import annotations

import argparse
import gc
import os

# one thread everywhere: OpenBLAS worker threads spinning on a 2-core machine disturb timings
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

import pymem
from pymem import kernels
from pymem._native import ffi as pffi
from pymem._native import lib as plib

NS = time.perf_counter_ns
ROW = 64            # bytes of one K (or V) row: 32 F16 values
N_EMBD = 32         # n_embd_k_gqa = n_embd_v_gqa of the tiny llama model
N_LAYER = 2


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    key: str
    label: str
    unified: bool
    n_ctx: int
    n_seq: int

    @property
    def n_stream(self) -> int:
        return 1 if self.unified else self.n_seq

    @property
    def per_stream(self) -> int:
        return self.n_ctx // self.n_stream

    @property
    def per_seq(self) -> int:
        return self.per_stream // self.n_seq if self.unified else self.per_stream


FULL = {
    "a": Config("a", "unified 65536, 64 seqs x 1024", True, 65536, 64),
    "b": Config("b", "non-unified 16 streams x 4096", False, 65536, 16),
    "c": Config("c", "unified 32768, 16 seqs x 2048", True, 32768, 16),
}
QUICK = {
    "a": Config("a", "unified 4096, 16 seqs x 256", True, 4096, 16),
    "b": Config("b", "non-unified 4 streams x 1024", False, 4096, 4),
    "c": Config("c", "unified 2048, 4 seqs x 512", True, 2048, 4),
}


# ----------------------------------------------------------------------------------------------
# the synthetic blob
# ----------------------------------------------------------------------------------------------
def kv_section(cfg: Config, rng: np.random.Generator) -> bytes:
    """A bare KV memory section (format 11, v_trans=1) in which every stream is full:
    unified: seq k holds cells [k*per, (k+1)*per) at positions 0..per-1; non-unified: stream s
    holds seq s at positions 0..per-1.  Random F16 K/V rows.  Layout: pymem/state/sections.py."""
    out = [struct.pack("<I", cfg.n_stream)]
    cc = cfg.per_stream
    for s in range(cfg.n_stream):
        cells = np.empty((cc, 3), "<i4")
        idx = np.arange(cc, dtype=np.int64)
        if cfg.unified:
            cells[:, 0] = idx % cfg.per_seq
            cells[:, 2] = idx // cfg.per_seq
        else:
            cells[:, 0] = idx
            cells[:, 2] = s
        cells[:, 1] = 1                                  # n_seq_id
        out += [struct.pack("<I", cc), cells.tobytes(), struct.pack("<IIII", 1, N_LAYER, 0, 0)]

        def data(n: int) -> bytes:
            return rng.standard_normal(n // 2, dtype=np.float32).astype(np.float16).tobytes()

        for _ in range(N_LAYER):                         # K: i32 type, u64 row, rows
            out += [struct.pack("<iQ", 1, ROW), data(cc * ROW)]
        for _ in range(N_LAYER):                         # V transposed: i32 type, u32 el, u32 n_embd
            out += [struct.pack("<iII", 1, 2, N_EMBD), data(cc * ROW)]
    return b"".join(out)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _calibrate(fn: Callable[[], Any], target_ns: int) -> int:
    t0 = NS()
    fn()
    dt = max(NS() - t0, 1)
    if dt * 4 >= target_ns:
        return 1
    t0 = NS()
    for _ in range(8):
        fn()
    dt = max((NS() - t0) // 8, 1)
    return int(max(1, min(2000, target_ns // dt)))


def sample(fn: Callable[[], Any], setup: Optional[Callable[[], Any]], inner: int) -> float:
    """One timing sample in ns per call."""
    if setup is not None:
        setup()
    if inner == 1:
        t0 = NS()
        fn()
        return float(NS() - t0)
    t0 = NS()
    for _ in range(inner):
        fn()
    return (NS() - t0) / inner


def median_pair(fa: Optional[Callable], fb: Optional[Callable], reps: int,
                setup_a: Optional[Callable] = None, setup_b: Optional[Callable] = None,
                target_ns: int = 200_000) -> tuple[Optional[float], Optional[float]]:
    """Interleaved medians (µs) of two implementations; a None function is skipped.
    Without a setup (idempotent operation) each sample loops the call ~target_ns long."""
    fns = [(fa, setup_a), (fb, setup_b)]
    inner = []
    for f, st in fns:
        if f is None:
            inner.append(0)
        elif st is None:
            f()  # warm up
            inner.append(_calibrate(f, target_ns))
        else:
            st()
            f()  # warm up
            inner.append(1)
    ts: list[list[float]] = [[], []]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for k in order:
                f, st = fns[k]
                if f is not None:
                    ts[k].append(sample(f, st, inner[k]))
    finally:
        if gc_was:
            gc.enable()
    return tuple(statistics.median(t) / 1e3 if t else None for t in ts)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# result table
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    op: str
    a: Optional[float]        # baseline µs (llama.cpp, memcpy or numpy)
    b: Optional[float]        # pymem µs
    nbytes: int = 0
    note: str = ""
    base: str = "llama.cpp"

    @property
    def ratio(self) -> Optional[float]:
        if self.a is None or self.b is None or self.b <= 0:
            return None
        return self.a / self.b


def fmt_us(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def gbs(nbytes: int, us: Optional[float]) -> str:
    if not nbytes or not us:
        return ""
    return f"{nbytes / (us * 1e3):.2f}"


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n## {title}")
    w = max(50, max(len(r.op) for r in rows))
    hdr = f"{'operation':{w}s} {'baseline':>10s} {'base µs':>11s} {'pymem µs':>11s} {'ratio':>7s}  {'bytes':>10s} {'GB/s base/pymem':>16s}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        tp = ""
        if r.nbytes:
            tp = f"{gbs(r.nbytes, r.a) or '-'}/{gbs(r.nbytes, r.b) or '-'}"
        print(f"{r.op:{w}s} {r.base:>10s} {fmt_us(r.a):>11s} {fmt_us(r.b):>11s} {ratio:>7s}  "
              f"{(r.nbytes or ''):>10} {tp:>16s}  {r.note}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# llama.cpp side
# ----------------------------------------------------------------------------------------------
def llama_available() -> bool:
    try:
        from pymem.llama import _loader
        return bool(_loader.is_available())
    except Exception:
        return False


class Llama:
    """Raw cffi calls on one in-process llama.cpp context (no wrapper overhead beyond cffi)."""

    def __init__(self, model: Any, cfg: Config) -> None:
        from pymem._oracle import capi
        self.capi = capi
        self.ctx = capi.Context(model, n_ctx=cfg.n_ctx, n_seq_max=cfg.n_seq, kv_unified=cfg.unified,
                                flash_attn=False, n_threads=1, n_batch=512, n_ubatch=512)
        self.lib, self.ffi = self.ctx._lib, self.ctx._ffi
        self.ptr, self.mem = self.ctx.ptr, self.ctx.mem
        assert self.ctx.n_ctx() == cfg.n_ctx, (self.ctx.n_ctx(), cfg.n_ctx)
        assert self.ctx.n_ctx_seq() == cfg.per_stream, (self.ctx.n_ctx_seq(), cfg.per_stream)

    def set_whole(self, blob_cdata: Any, n: int) -> None:
        got = self.lib.llama_state_set_data(self.ptr, blob_cdata, n)
        assert got == n, (got, n)

    def close(self) -> None:
        self.ctx.close()


# ----------------------------------------------------------------------------------------------
# pymem side
# ----------------------------------------------------------------------------------------------
def make_pymem(cfg: Config, model_path: Optional[str]) -> pymem.KVCache:
    if model_path is not None:
        return pymem.from_gguf(model_path, cfg.n_ctx, n_seq_max=cfg.n_seq, unified=cfg.unified,
                               flash_attn=False)
    # without llama.cpp: the same cache, spelled out (tiny llama: 2 layers, 1 KV head of 32)
    return pymem.KVCache(n_layer=N_LAYER, n_head_kv=1, n_embd_head_k=32, size=cfg.per_stream,
                         n_seq_max=cfg.n_seq, type_k="f16", type_v="f16", v_trans=True,
                         unified=cfg.unified, rope=pymem.Rope(n_rot=32, freq_base=10000.0, mode="norm"),
                         arch="llama")


def np_kq_mask(cpos: np.ndarray, cseq: np.ndarray, tpos: np.ndarray, tseq: np.ndarray) -> np.ndarray:
    """The causal KQ mask of one stream, straightforward vectorized numpy: cell j is visible
    to token i iff it holds the token's sequence and pos[j] <= pos[i] (empty cells hold no
    sequence).  cpos [n_kv] i32, cseq [n_kv, 4] u64 bitsets, tpos/tseq [T] -> f32 [T, n_kv]."""
    useq, inv = np.unique(tseq, return_inverse=True)
    member = ((cseq[:, useq >> 6] >> (useq & 63).astype(np.uint64)) & np.uint64(1)).astype(bool).T
    vis = (cpos[None, :] <= tpos[:, None]) & member[inv]
    return np.where(vis, np.float32(0), np.float32(-np.inf))


def np_kq_mask_into(cpos: np.ndarray, member: np.ndarray, tpos: np.ndarray, vis: np.ndarray,
                    out: np.ndarray) -> None:
    """Same, into preallocated buffers, membership precomputed (the numpy best case)."""
    np.less_equal(cpos[None, :], tpos[:, None], out=vis)
    vis &= member
    out.fill(-np.inf)
    np.copyto(out, np.float32(0), where=vis)


# ----------------------------------------------------------------------------------------------
# the benchmark of one configuration
# ----------------------------------------------------------------------------------------------
def run_config(cfg: Config, args: argparse.Namespace, model: Any, model_path: Optional[str]) -> list[Row]:
    R = args.reps
    RD = args.reps_destructive
    rows: list[Row] = []
    t0 = time.perf_counter()
    pm = make_pymem(cfg, model_path)
    ll = Llama(model, cfg) if model is not None else None
    t_make = time.perf_counter() - t0

    # ---- fill both from one synthetic whole blob --------------------------------------------
    t0 = time.perf_counter()
    sec = kv_section(cfg, np.random.default_rng(1234))
    n_sec = pm.state_read(sec)
    assert n_sec == len(sec), (n_sec, len(sec))
    whole = pm.state_write(envelope="llama")          # llama_state_get_data layout
    t_blob = time.perf_counter() - t0
    whole_c = pffi.from_buffer("uint8_t[]", whole)
    nw = len(whole)
    if ll is not None:
        wc = ll.ffi.from_buffer("uint8_t[]", whole)
        t0 = time.perf_counter()
        ll.set_whole(wc, nw)
        t_llset = time.perf_counter() - t0
        same = ll.ctx.state_get() == whole
        print(f"# [{cfg.key}] {cfg.label}: n_ctx={cfg.n_ctx} n_stream={cfg.n_stream} per_seq={cfg.per_seq}; "
              f"whole blob {nw} B; contexts {t_make:.2f} s, blob {t_blob:.2f} s, llama set {t_llset * 1e3:.0f} ms; "
              f"identical whole state: {same}")
        if not same:
            raise SystemExit(f"config {cfg.key}: llama.cpp and pymem hold different states")
    else:
        wc = None
        print(f"# [{cfg.key}] {cfg.label}: whole blob {nw} B (llama.cpp not available: pymem only)")
    sys.stdout.flush()

    def pm_restore() -> None:
        plib.pm_mem_state_read(pm._guard.live(), -1, 0, 1, whole_c, nw, False, pm_out64)

    pm_out64 = pffi.new("uint64_t *")

    def ll_restore() -> None:
        ll.set_whole(wc, nw)

    L = ll.lib if ll else None
    lmem = ll.mem if ll else None
    s = 3                                    # the sequence under test
    last = cfg.n_seq - 1
    per = cfg.per_seq
    uni = cfg.unified

    def pair(op: str, fl: Optional[Callable], fp: Callable, destructive: bool = False,
             nbytes: int = 0, note: str = "", reps: Optional[int] = None) -> Row:
        if destructive:
            a, b = median_pair(fl if ll else None, fp, reps or RD,
                               setup_a=ll_restore if ll else None, setup_b=pm_restore)
            pm_restore()
            if ll:
                ll_restore()
        else:
            a, b = median_pair(fl if ll else None, fp, reps or R)
        row = Row(op, a, b, nbytes, note)
        rows.append(row)
        return row

    # ---- Python / cffi floor ---------------------------------------------------------------
    pptr = pm._guard.live()
    pos_out = pffi.new("pm_pos *")
    rows.append(Row("cffi floor: empty Python call", *median_pair(lambda: None, lambda: None, R),
                    base="python", note="lambda: None"))
    pair("cffi floor: raw seq_pos_max (lib call only)",
         (lambda: L.llama_memory_seq_pos_max(lmem, s)) if ll else None,
         lambda: plib.pm_mem_seq_pos_max(pptr, s, pos_out),
         note="pymem: lib.pm_mem_seq_pos_max with a preallocated out")

    # ---- sequence queries and no-op / cheap ops -------------------------------------------
    pair("seq_pos_max(seq)", (lambda: ll.ctx.pos_max(s)) if ll else None, lambda: pm.seq_pos_max(s),
         note="public wrappers (capi.Context / pymem.KVCache)")
    pair("seq_pos_min(seq)", (lambda: ll.ctx.pos_min(s)) if ll else None, lambda: pm.seq_pos_min(s))
    pair("seq_rm no-op range", (lambda: L.llama_memory_seq_rm(lmem, s, per + 10, per + 20)) if ll else None,
         lambda: pm.seq_rm(s, per + 10, per + 20))
    pair("seq_div(seq, 0, -1, 1)", (lambda: L.llama_memory_seq_div(lmem, s, 0, -1, 1)) if ll else None,
         lambda: pm.seq_div(s, 0, -1, 1))

    # ---- destructive sequence ops (state restored before each repetition) ----------------
    mid = per // 2
    pair("seq_rm 100 positions mid-seq", (lambda: L.llama_memory_seq_rm(lmem, s, mid, mid + 100)) if ll else None,
         lambda: pm.seq_rm(s, mid, mid + 100), destructive=True)
    pair("seq_rm(seq, -1, -1) whole seq", (lambda: L.llama_memory_seq_rm(lmem, s, -1, -1)) if ll else None,
         lambda: pm.seq_rm(s, -1, -1), destructive=True)
    pair("seq_cp whole seq" + (" (meta only)" if uni else " (cross-stream, queued)"),
         (lambda: L.llama_memory_seq_cp(lmem, s, last, -1, -1)) if ll else None,
         lambda: pm.seq_cp(s, last, -1, -1), destructive=True)
    pair("seq_keep(seq)", (lambda: L.llama_memory_seq_keep(lmem, s)) if ll else None,
         lambda: pm.seq_keep(s), destructive=True)
    pair("seq_add whole seq +1 (positions only)",
         (lambda: L.llama_memory_seq_add(lmem, s, 0, -1, 1)) if ll else None,
         lambda: pm.seq_add(s, 0, -1, 1), destructive=True, note="K-shift deferred in both")
    pair("seq_add whole seq -1 (positions only)",
         (lambda: L.llama_memory_seq_add(lmem, s, 0, -1, -1)) if ll else None,
         lambda: pm.seq_add(s, 0, -1, -1), destructive=True, note="drops the pos-0 cell")

    # ---- state of one sequence --------------------------------------------------------------
    ns = pm.state_size(s, envelope="llama")
    sblob = pm.state_write(s, envelope="llama")
    assert len(sblob) == ns
    if ll:
        lblob = ll.ctx.state_seq_get(s)
        if lblob != sblob:
            raise SystemExit(f"config {cfg.key}: seq state blobs differ ({len(lblob)} vs {len(sblob)} B)")
        lbuf = ll.ffi.new("uint8_t[]", ns)
        lsrc = ll.ffi.from_buffer("uint8_t[]", sblob)
    pbuf = bytearray(ns)
    pbuf_c = pffi.from_buffer(pbuf)
    psrc = pffi.from_buffer("uint8_t[]", sblob)
    assert pm.state_write_into(pbuf, s, envelope="llama") == ns and bytes(pbuf) == sblob

    pair("state_seq size", (lambda: L.llama_state_seq_get_size_ext(ll.ptr, s, 0)) if ll else None,
         lambda: pm.state_size(s, envelope="llama"))
    pair("state_seq get (alloc + copy out: capi / state_write)",
         (lambda: ll.ctx.state_seq_get(s)) if ll else None,
         lambda: pm.state_write(s, envelope="llama"), nbytes=ns, note="llama: get_size + get + bytes()")
    pair("state_seq get into prealloc (state_write_into)",
         (lambda: L.llama_state_seq_get_data_ext(ll.ptr, lbuf, ns, s, 0)) if ll else None,
         lambda: pm.state_write_into(pbuf, s, envelope="llama"), nbytes=ns)
    pair("state_seq get into prealloc (raw lib call)",
         (lambda: L.llama_state_seq_get_data_ext(ll.ptr, lbuf, ns, s, 0)) if ll else None,
         lambda: plib.pm_mem_state_write(pptr, s, 0, 1, pbuf_c, ns, pm_out64), nbytes=ns)
    pair("state_seq set (replace seq)",
         (lambda: L.llama_state_seq_set_data_ext(ll.ptr, lsrc, ns, s, 0)) if ll else None,
         lambda: pm.state_read(sblob, s, envelope="llama"), nbytes=ns, reps=max(5, R // 2))

    # ---- whole state ------------------------------------------------------------------------
    wbuf = bytearray(nw)
    wbuf_c = pffi.from_buffer(wbuf)
    lwbuf = ll.ffi.new("uint8_t[]", nw) if ll else None
    RW = max(5, R // 3)
    pair("state size (whole)", (lambda: L.llama_state_get_size(ll.ptr)) if ll else None,
         lambda: pm.state_size(envelope="llama"), reps=RW)
    pair("state get (whole, alloc: capi.state_get / state_write)",
         (lambda: ll.ctx.state_get()) if ll else None, lambda: pm.state_write(envelope="llama"),
         nbytes=nw, reps=RW)
    pair("state get (whole) into prealloc",
         (lambda: L.llama_state_get_data(ll.ptr, lwbuf, nw)) if ll else None,
         lambda: pm.state_write_into(wbuf, envelope="llama"), nbytes=nw, reps=RW)
    pair("state set (whole)", (lambda: L.llama_state_set_data(ll.ptr, wc, nw)) if ll else None,
         lambda: pm.state_read(whole, envelope="llama"), nbytes=nw, reps=RW)
    if ll:
        if ll.ctx.state_get() != pm.state_write(envelope="llama"):
            raise SystemExit(f"config {cfg.key}: states differ after the state set benchmarks")

    # ---- pymem state I/O vs memcpy ------------------------------------------------------------
    copies = {}
    for label, n in (("seq", ns), ("whole", nw)):
        x = np.frombuffer(np.random.default_rng(1).bytes(n), np.uint8)
        y = np.empty_like(x)
        y[:] = 1
        copies[label] = (lambda x=x, y=y: np.copyto(y, x))
    for label, n, fn, reps in (
            ("state_write_into (seq)", ns, lambda: pm.state_write_into(pbuf, s, envelope="llama"), R),
            ("state_write_into (whole)", nw, lambda: pm.state_write_into(wbuf, envelope="llama"), RW),
            ("state_read (seq)", ns, lambda: pm.state_read(sblob, s, envelope="llama"), R),
            ("state_read (whole)", nw, lambda: pm.state_read(whole, envelope="llama"), RW)):
        a, b = median_pair(copies["seq" if n == ns else "whole"], fn, reps)
        rows.append(Row(f"{label} vs np.copyto same bytes", a, b, n, base="memcpy"))

    # ---- K-shift -----------------------------------------------------------------------------
    # pymem: update() after seq_add(+1).  llama.cpp applies the shift inside the next decode:
    # time(decode 1 token after seq_add) - time(plain decode 1 token); both start from the
    # restored state with the last cell of seq s freed so the token has a slot.
    def pm_prep_shift() -> None:
        pm_restore()
        pm.seq_rm(s, per - 1, -1)
        pm.seq_add(s, 0, -1, 1)

    rows.append(Row("K-shift: pymem update() after seq_add", None,
                    median_pair(None, pm.update, RD, setup_b=pm_prep_shift)[1],
                    note=f"{per} shifted cells x {N_LAYER} layers"))
    if ll:
        def ll_prep(shift: bool) -> Callable[[], None]:
            def f() -> None:
                ll_restore()
                L.llama_memory_seq_rm(lmem, s, per - 1, -1)
                if shift:
                    L.llama_memory_seq_add(lmem, s, 0, -1, 1)
            return f

        def ll_decode() -> None:
            rc = ll.ctx.decode([(1, None, [s])])  # pos NULL: continues at pos_max + 1
            assert rc == 0, rc

        d_shift, d_plain = median_pair(ll_decode, ll_decode, RD, setup_a=ll_prep(True), setup_b=ll_prep(False))
        k_ll = d_shift - d_plain
        rows.append(Row("K-shift: llama decode(1) after seq_add", d_shift, None, base="llama.cpp",
                        note="includes a 1-token decode"))
        rows.append(Row("K-shift: llama plain decode(1)", d_plain, None, base="llama.cpp"))
        kp = rows[-3].b
        rows.append(Row("K-shift (approx): llama difference vs pymem update()", k_ll, kp,
                        note="approximate: difference of two noisy medians; llama ropes every cell of the stream"))
        ll_restore()

    # ---- KQ mask -------------------------------------------------------------------------------
    n_tok = min(512, per // 2)
    pm_restore()
    pm.seq_rm(s, per - n_tok, -1)
    bctx = pm.decode(pymem.Batch(tokens=[1] * n_tok, pos=list(range(per - n_tok, per)), seq_ids=[s] * n_tok,
                                 output=False), n_ubatch=512)
    ub = bctx[0]
    n_kv = ub.n_kv
    st = int(ub.streams[0])
    cv = pm.cells_view(st)
    cpos = np.ascontiguousarray(cv.pos[:n_kv])
    cseq = np.ascontiguousarray(cv.seq[:n_kv])
    tpos, tseq = ub.pos.copy(), ub.seq.copy()
    ref = pm.kq_mask(ub)
    mine = np_kq_mask(cpos, cseq, tpos, tseq)
    if not np.array_equal(ref.reshape(mine.shape), mine):
        raise SystemExit(f"config {cfg.key}: numpy mask differs from pymem's kq_mask")
    mbytes = ref.nbytes
    note = f"{n_tok} tokens x n_kv {n_kv}"
    RM = max(5, R // 3)
    a, b = median_pair(lambda: np_kq_mask(cpos, cseq, tpos, tseq), lambda: pm.kq_mask(ub), RM)
    rows.append(Row("kq_mask (alloc): numpy vs pymem.kq_mask", a, b, mbytes, note, base="numpy"))
    out = np.empty(ref.shape, np.float32)
    out.fill(1)
    out_c = pffi.from_buffer("float[]", out, require_writable=True)
    nk = pffi.new("uint32_t *")
    useq, inv = np.unique(tseq, return_inverse=True)
    member = ((cseq[:, useq >> 6] >> (useq & 63).astype(np.uint64)) & np.uint64(1)).astype(bool).T[inv]
    vis = np.empty((n_tok, n_kv), bool)
    out2 = np.empty((n_tok, n_kv), np.float32)
    out2.fill(1)
    np_kq_mask_into(cpos, member, tpos, vis, out2)
    assert np.array_equal(out2, mine)

    def raw_mask() -> None:
        plib.pm_mctx_kq_mask(bctx._ptr, ub.index, 0, True, 0, False, out_c, out.size, nk)

    a, b = median_pair(lambda: np_kq_mask_into(cpos, member, tpos, vis, out2), raw_mask, RM)
    rows.append(Row("kq_mask prealloc: numpy vs pymem (active kernel)", a, b, mbytes,
                    f"kernel {kernels.active()}", base="numpy"))
    a, b = median_pair(lambda: out.fill(-np.inf), raw_mask, RM)
    rows.append(Row("kq_mask prealloc: np.fill(-inf) write floor vs pymem", a, b, mbytes,
                    "same output buffer, interleaved", base="fill"))
    for kname in kernels.available():
        with kernels.forced(kname):
            raw_mask()
            if not np.array_equal(out.reshape(mine.shape), mine):
                raise SystemExit(f"kernel {kname}: mask differs")
            a, b = median_pair(lambda: np_kq_mask_into(cpos, member, tpos, vis, out2), raw_mask, RM)
        rows.append(Row(f"kq_mask prealloc: numpy vs pymem kernel={kname}", a, b, mbytes, base="numpy"))
    del bctx, ub, out_c
    if ll:
        ll.close()
    pm.close()
    return rows


# ----------------------------------------------------------------------------------------------
def run_scaling(args: argparse.Namespace, model: Any, model_path: Optional[str]) -> None:
    """Single-sequence operations as the cache grows: unified caches of 4k..256k cells, every
    sequence 1,024 cells (so 4..256 sequences); the sequence under test is the same size
    everywhere, so pymem's times should stay flat while llama.cpp's grow with the cache."""
    sizes = (4096, 16384) if args.quick else (4096, 16384, 65536, 262144)
    ops = ("seq_rm whole seq", "seq_cp whole seq", "seq_add whole seq", "seq_div whole seq",
           "state_seq size", "seq_pos_max")
    res: dict[str, list[tuple[Optional[float], Optional[float]]]] = {op: [] for op in ops}
    RD = args.reps_destructive
    for n_ctx in sizes:
        cfg = Config("s", f"unified {n_ctx}", True, n_ctx, n_ctx // 1024)
        pm = make_pymem(cfg, model_path)
        sec = kv_section(cfg, np.random.default_rng(7))
        pm.state_read(sec)
        whole = pm.state_write(envelope="llama")
        wc_p = pffi.from_buffer("uint8_t[]", whole)
        ptr = pm._guard.live()
        out64 = pffi.new("uint64_t *")

        def pm_restore() -> None:
            plib.pm_mem_state_read(ptr, -1, 0, 1, wc_p, len(whole), False, out64)

        ll = Llama(model, cfg) if model is not None else None
        if ll is not None:
            wc = ll.ffi.from_buffer("uint8_t[]", whole)
            ll.set_whole(wc, len(whole))
            L, lmem = ll.lib, ll.mem

            def ll_restore() -> None:
                ll.set_whole(wc, len(whole))
        s, last = 1, cfg.n_seq - 1
        pairs = [
            ("seq_rm whole seq", lambda: L.llama_memory_seq_rm(lmem, s, -1, -1), lambda: pm.seq_rm(s, -1, -1), True),
            ("seq_cp whole seq", lambda: L.llama_memory_seq_cp(lmem, s, last, -1, -1),
             lambda: pm.seq_cp(s, last, -1, -1), True),
            ("seq_add whole seq", lambda: L.llama_memory_seq_add(lmem, s, 0, -1, 1), lambda: pm.seq_add(s, 0, -1, 1),
             True),
            ("seq_div whole seq", lambda: L.llama_memory_seq_div(lmem, s, 0, -1, 2), lambda: pm.seq_div(s, 0, -1, 2),
             True),
            ("state_seq size", lambda: L.llama_state_seq_get_size_ext(ll.ptr, s, 0),
             lambda: pm.state_size(s, envelope="llama"), False),
            ("seq_pos_max", lambda: L.llama_memory_seq_pos_max(lmem, s), lambda: pm.seq_pos_max(s), False),
        ]
        for op, fl, fp, destructive in pairs:
            if destructive:
                a, b = median_pair(fl if ll else None, fp, RD, setup_a=ll_restore if ll else None, setup_b=pm_restore)
                pm_restore()
                if ll:
                    ll_restore()
            else:
                a, b = median_pair(fl if ll else None, fp, args.reps)
            res[op].append((a, b))
        if ll is not None:
            ll.close()
        pm.close()
        gc.collect()
    print("\n## scaling: one sequence of 1,024 cells in unified caches of growing size (µs: llama.cpp / pymem, ratio)")
    print(f"{'operation':20s} " + " ".join(f"{f'{n // 1024}k cells':>26s}" for n in sizes))
    for op in ops:
        cells = []
        for a, b in res[op]:
            r = f"{a / b:.1f}x" if a and b else "-"
            cells.append(f"{fmt_us(a)}/{fmt_us(b)} {r}")
        print(f"{op:20s} " + " ".join(f"{c:>26s}" for c in cells))
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small caches and few repetitions (smoke run)")
    ap.add_argument("--configs", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of non-destructive ops (default 31; quick 5)")
    ap.add_argument("--reps-destructive", type=int, default=None,
                    help="repetitions of ops that need a restore (default 21; quick 3)")
    ap.add_argument("--no-llama", action="store_true", help="pymem / numpy / memcpy columns only")
    ap.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                    help="single-sequence operations in caches of 4k..256k cells (default on)")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 5 if args.quick else 31
    if args.reps_destructive is None:
        args.reps_destructive = 3 if args.quick else 21
    table = QUICK if args.quick else FULL
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    for k in keys:
        if k not in table:
            ap.error(f"unknown config {k!r}")

    use_llama = not args.no_llama and llama_available()
    model = model_path = None
    if use_llama:
        from pymem._oracle import capi, tinymodels
        model_path = tinymodels.ensure_models(["llama"])["llama"]
        model = capi.Model(model_path)
    print(f"# pymem {pymem.__version__}, kernels available {kernels.available()}, active {kernels.active()}; "
          f"numpy {np.__version__}; llama.cpp: {'b11739 in-process (llama-cpp-py-sync)' if use_llama else 'not used'}")
    print(f"# tiny llama model: {N_LAYER} layers, K/V F16 rows of {ROW} B (256 B K+V per cell), v_trans=1, 1 thread; "
          f"reps {args.reps} (destructive {args.reps_destructive}); medians; "
          f"ratio = baseline / pymem (> 1: pymem faster)")

    t_end = time.perf_counter() + 0.3     # let the CPU clock settle before the first samples
    while time.perf_counter() < t_end:
        pass
    results: dict[str, list[Row]] = {}
    for k in keys:
        cfg = table[k]
        rows = run_config(cfg, args, model, model_path)
        results[k] = rows
        print_table(f"[{k}] {cfg.label}", rows)
        gc.collect()

    # summary matrix of ratios
    ops: list[str] = []
    for rows in results.values():
        for r in rows:
            if r.op not in ops:
                ops.append(r.op)
    print("\n## ratio summary (baseline time / pymem time; > 1: pymem faster)")
    w = max(len(f"{op} [{b}]") for op, b in ((r.op, r.base) for rows in results.values() for r in rows))
    print(f"{'operation':{w}s} " + " ".join(f"{'[' + k + ']':>8s}" for k in keys))
    for op in ops:
        if all(r.ratio is None for rows in results.values() for r in rows if r.op == op):
            continue
        cells = []
        for k in keys:
            r = next((x for x in results[k] if x.op == op), None)
            cells.append("-" if r is None or r.ratio is None else f"{r.ratio:.2f}")
        base = next((x.base for rows in results.values() for x in rows if x.op == op), "")
        print(f"{op + ' [' + base + ']':{w}s} " + " ".join(f"{c:>8s}" for c in cells))
    if args.scaling:
        run_scaling(args, model, model_path)
    if model is not None:
        model.close()
    print("\n# done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
