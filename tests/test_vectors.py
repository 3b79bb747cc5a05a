"""Replay the shared test vectors (tests/vectors/*.txt, format in tests/vectors/README.md)
through pymem's Python API and check every expectation byte for byte.

Every memory kind: kv, iswa, recurrent, hybrid, hybrid_iswa (`rows` for every KV part, `rs`
rows for the recurrent tails and rollback planes).  The same files are replayed through the C
API by tests/c/test_vectors.c.  The expectations
were recorded from real llama.cpp b11739 by tests/vectors/regen.py (which also uses this
module to check that pymem reproduces a case before it writes it)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

VECTORS = Path(os.environ.get("PYMEM_VECTORS_DIR") or Path(__file__).resolve().parent / "vectors")

#: parameter keys (at most once per case, before the first step)
PARAM_KEYS = frozenset("""
    kind arch n_layer layers n_head_kv n_embd_head_k n_embd_head_v size n_seq_max type_k type_v
    v_trans unified n_swa swa_type n_pos_per_embd cell_ext n_embd_v_gqa_max k_rot v_rot can_shift
    format rope_mode rope_n_rot rope_n_ctx_orig rope_freq_base rope_freq_scale rope_ext_factor
    rope_attn_factor rope_beta_fast rope_beta_slow rope_freq_factors n_vocab n_ubatch
""".split()) | frozenset("""
    swa_layers swa_size swa_n_swa swa_swa_type swa_k_rot swa_v_rot
    rec_layers n_embd_r n_embd_s rec_size type_r type_s n_rs_seq
""".split())
#: the keys of each part (README: "Parameters"); a case may use only its kind's parts' keys
_COMMON = frozenset("kind arch n_layer n_seq_max n_vocab n_ubatch".split())
_SWA = frozenset("swa_layers swa_size swa_n_swa swa_swa_type swa_k_rot swa_v_rot".split())
_REC = frozenset("rec_layers n_embd_r n_embd_s rec_size type_r type_s n_rs_seq".split())
_KV = PARAM_KEYS - _COMMON - _SWA - _REC
KIND_KEYS = {"kv": _COMMON | _KV, "iswa": _COMMON | _KV | _SWA, "recurrent": _COMMON | _REC,
             "hybrid": _COMMON | _KV | _REC, "hybrid_iswa": _COMMON | _KV | _SWA | _REC}
#: ordered, repeatable keys
EVENT_KEYS = frozenset(["step", "expect_error", "expect_whole", "expect_seq", "expect_pos"])

STATUS = {"OK": 0, "INVALID_ARG": -1, "UNSUPPORTED": -2, "NO_SLOT": -3, "FORMAT": -4, "IO": -5,
          "NOMEM": -6, "STATE": -7, "BUFFER_SMALL": -8, "BATCH": -9, "SHIFT": -10}


class VectorError(ValueError):
    """A malformed vector file."""


@dataclass
class Case:
    name: str
    where: str                                   # "file:line" of the header
    params: dict[str, str] = field(default_factory=dict)
    events: list[tuple[str, str, int]] = field(default_factory=list)   # (key, value, line)


# ---- reader ------------------------------------------------------------------------------------
_HEADER = re.compile(r"\[case ([A-Za-z0-9_.\-]+)\]")
_KEY = re.compile(r"[a-z0-9_]+")


def parse(text: str, source: str = "<text>") -> list[Case]:
    """The cases of one vector file; VectorError names the file and line of any defect."""
    cases: list[Case] = []
    cur: Case | None = None
    for lineno, raw in enumerate(text.split("\n"), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        m = _HEADER.fullmatch(s)
        if m:
            if any(c.name == m.group(1) for c in cases):
                raise VectorError(f"{where}: duplicate case {m.group(1)!r}")
            cur = Case(m.group(1), where)
            cases.append(cur)
            continue
        key, eq, val = s.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or not _KEY.fullmatch(key) or not val:
            raise VectorError(f"{where}: expected [case NAME] or key = value")
        if cur is None:
            raise VectorError(f"{where}: {key} outside a case")
        if key in EVENT_KEYS:
            cur.events.append((key, val, lineno))
        elif key in PARAM_KEYS:
            if cur.events:
                raise VectorError(f"{where}: parameter {key} after the first step")
            if key in cur.params:
                raise VectorError(f"{where}: repeated parameter {key}")
            cur.params[key] = val
        else:
            raise VectorError(f"{where}: unknown key {key!r}")
    return cases


def ints(v: str) -> list[int]:
    return [int(x) for x in v.split()]


def floats(v: str) -> list[float]:
    return [float(x) for x in v.split()]


def hexbytes(v: str) -> bytes:
    if not v.startswith("hex:"):
        raise VectorError(f"expected hex:..., got {v[:20]!r}")
    return bytes.fromhex(v[4:])


def load_dir(path: Path = VECTORS) -> list[tuple[str, Case]]:
    out = []
    for f in sorted(path.glob("*.txt")):
        out.extend((f.name, c) for c in parse(f.read_text(), f.name))
    return out


# ---- replay ------------------------------------------------------------------------------------
def layer_list(v: str) -> list[int]:
    """A list of model layers; `none` = no layers."""
    return [] if v == "none" else ints(v)


def _ropes(p: dict) -> list:
    import pymem

    n_layer = int(p["n_layer"])
    modes = p["rope_mode"].split()
    ff = floats(p["rope_freq_factors"]) if "rope_freq_factors" in p else None
    col = {k: (floats(p[k]) if k not in ("rope_n_rot", "rope_n_ctx_orig") else ints(p[k]))
           for k in ("rope_n_rot", "rope_n_ctx_orig", "rope_freq_base", "rope_freq_scale", "rope_ext_factor",
                     "rope_attn_factor", "rope_beta_fast", "rope_beta_slow")}
    ropes = []
    for il in range(n_layer):
        if modes[il] == "off":
            ropes.append(None)
            continue
        ropes.append(pymem.Rope(n_rot=col["rope_n_rot"][il], freq_base=col["rope_freq_base"][il],
                                freq_scale=col["rope_freq_scale"][il], mode=modes[il],
                                ext_factor=col["rope_ext_factor"][il], attn_factor=col["rope_attn_factor"][il],
                                beta_fast=col["rope_beta_fast"][il], beta_slow=col["rope_beta_slow"][il],
                                n_ctx_orig=col["rope_n_ctx_orig"][il], freq_factors=ff))
    return ropes


def kv_kwargs(p: dict, prefix: str = "") -> dict:
    """KVCache arguments of the first KV part (prefix "") or of the iSWA SWA half ("swa_")."""
    own = {k: p[prefix + k] for k in ("layers", "size", "n_swa", "swa_type", "k_rot", "v_rot")}
    return dict(
        n_layer=int(p["n_layer"]), layers=layer_list(own["layers"]), n_head_kv=ints(p["n_head_kv"]),
        n_embd_head_k=ints(p["n_embd_head_k"]), n_embd_head_v=ints(p["n_embd_head_v"]),
        size=int(own["size"]), n_seq_max=int(p["n_seq_max"]), type_k=p["type_k"], type_v=p["type_v"],
        v_trans=bool(int(p["v_trans"])), unified=bool(int(p["unified"])), n_swa=int(own["n_swa"]),
        swa_type=own["swa_type"], n_pos_per_embd=int(p.get("n_pos_per_embd", "1")),
        cell_ext=bool(int(p.get("cell_ext", "0"))), n_embd_v_gqa_max=int(p.get("n_embd_v_gqa_max", "0")),
        k_rot=int(own["k_rot"]), v_rot=int(own["v_rot"]), can_shift=bool(int(p.get("can_shift", "1"))),
        format=int(p["format"]), rope=_ropes(p), arch=p.get("arch"))


def rec_kwargs(p: dict) -> dict:
    return dict(n_layer=int(p["n_layer"]), layers=layer_list(p["rec_layers"]), n_embd_r=ints(p["n_embd_r"]),
                n_embd_s=ints(p["n_embd_s"]), size=int(p["rec_size"]), n_seq_max=int(p["n_seq_max"]),
                type_r=p["type_r"], type_s=p["type_s"], n_rs_seq=int(p["n_rs_seq"]), arch=p.get("arch"))


def build(case: Case) -> Any:
    import pymem

    p = case.params
    kind = p.get("kind")
    if kind not in KIND_KEYS:
        raise VectorError(f"{case.where}: unsupported kind {kind!r}")
    extra = sorted(set(p) - KIND_KEYS[kind])
    if extra:
        raise VectorError(f"{case.where}: keys {extra} do not belong to kind {kind}")
    if kind == "kv":
        return pymem.KVCache(**kv_kwargs(p))
    if kind == "iswa":
        return pymem.KVCacheISWA(base=kv_kwargs(p), swa=kv_kwargs(p, "swa_"))
    if kind == "recurrent":
        return pymem.RecurrentMemory(**rec_kwargs(p))
    if kind == "hybrid":
        return pymem.HybridMemory(attn=kv_kwargs(p), recurrent=rec_kwargs(p))
    return pymem.HybridISWAMemory(attn={"base": kv_kwargs(p), "swa": kv_kwargs(p, "swa_")}, recurrent=rec_kwargs(p))


def _snapshot(mem: Any, n_seq_max: int) -> tuple:
    import pymem

    parts = []
    for kv in mem.kv_parts():
        parts.append(([kv.cells_view(s).tobytes() for s in range(kv.n_stream)],
                      [kv.stream_info(s) for s in range(kv.n_stream)]))
    rec = getattr(mem, "recurrent", None)
    if rec is not None:
        parts.append((rec.cells_view().tobytes(), rec.rs_idx().tobytes(), rec.info()))
    pos = [(mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in range(n_seq_max)]
    try:
        state = mem.state_write()
    except pymem.Error as exc:      # a whole write can fail (recurrent: differing rollback planes)
        state = exc.status
    return state, parts, pos, mem.update_pending


def _split_arrow(toks: list[str]) -> tuple[list[str], str | None]:
    if len(toks) >= 2 and toks[-2] == "->":
        return toks[:-2], toks[-1]
    return toks, None


class Replayer:
    """Replays one case; ``stats`` counts steps, expectations and compared bytes."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.mem = build(case)
        self.n_vocab = int(case.params.get("n_vocab", "0"))
        self.n_ubatch = int(case.params.get("n_ubatch", "512"))
        self.n_seq_max = int(case.params["n_seq_max"])
        self.rec = getattr(self.mem, "recurrent", None)
        self.stats = {"steps": 0, "expectations": 0, "bytes": 0}

    def fail(self, line: int, msg: str) -> None:
        raise AssertionError(f"{self.case.where} [{self.case.name}] line {line}: {msg}")

    def run(self) -> dict:
        ev = self.case.events
        i = 0
        while i < len(ev):
            key, val, line = ev[i]
            if key == "step":
                want = "OK"
                if i + 1 < len(ev) and ev[i + 1][0] == "expect_error":
                    want = ev[i + 1][1]
                    if want not in STATUS:
                        self.fail(ev[i + 1][2], f"unknown status {want}")
                    i += 1
                self.step(val, STATUS[want], line)
                self.stats["steps"] += 1
            elif key == "expect_error":
                self.fail(line, "expect_error must follow a step")
            else:
                self.expect(key, val, line)
                self.stats["expectations"] += 1
            i += 1
        return self.stats

    # -- steps ---------------------------------------------------------------------------------
    def step(self, val: str, want: int, line: int) -> None:
        import pymem

        toks, arrow = _split_arrow(val.split())
        op, args = toks[0], toks[1:]
        self.before = _snapshot(self.mem, self.n_seq_max)
        status, result = 0, None
        try:
            if op == "decode":
                self.decode(args)
            elif op == "seq_rm":
                rs = [hexbytes(a[3:]) for a in args[3:] if a.startswith("rs=")]
                result = int(self.mem.seq_rm(*map(int, args[:3])))
                if rs:
                    self.rollback_rows(int(args[0]), rs[0], line)
            elif op == "seq_cp":
                self.mem.seq_cp(*map(int, args))
            elif op == "seq_keep":
                self.mem.seq_keep(int(args[0]))
            elif op == "seq_add":
                self.mem.seq_add(*map(int, args))
            elif op == "seq_div":
                self.mem.seq_div(*map(int, args))
            elif op == "update":
                result = int(self.mem.update())
            elif op == "clear":
                self.mem.clear(bool(int(args[0])))
            elif op == "read":
                result = self.read(args)
            else:
                self.fail(line, f"unknown step {op!r}")
        except pymem.Error as exc:
            status = exc.status
        except MemoryError:
            status = STATUS["NOMEM"]
        if status != want:
            name = {v: k for k, v in STATUS.items()}
            self.fail(line, f"{op}: status {name.get(status, status)}, expected {name.get(want, want)}")
        if status != 0:
            if _snapshot(self.mem, self.n_seq_max) != self.before:
                self.fail(line, f"the failing {op} changed the memory")
        elif arrow is not None and result != int(arrow):
            self.fail(line, f"{op} returned {result}, expected {arrow}")

    def decode(self, args: list[str]) -> None:
        import pymem

        kw = dict(a.split("=", 1) for a in args)
        tokens = [int(x) for x in kw["tokens"].split(",")]
        pos = [int(x) for x in kw["pos"].split(",")] if "pos" in kw else None
        seqs = [[int(y) for y in x.split("+")] for x in kw["seqs"].split(",")] if "seqs" in kw else None
        out = [bool(int(x)) for x in kw["output"].split(",")] if "output" in kw else None
        rows = hexbytes(kw["rows"]) if "rows" in kw else None
        rs = hexbytes(kw["rs"]) if "rs" in kw else None
        batch = pymem.Batch(tokens=tokens, pos=pos, seq_ids=seqs, output=out)
        self.mem.check_batch(batch, n_vocab=self.n_vocab)
        self.mem.update()
        self.before = _snapshot(self.mem, self.n_seq_max)   # a NO_SLOT decode keeps the update, as llama.cpp
        ctx = self.mem.init_batch(batch, n_ubatch=self.n_ubatch, n_vocab=self.n_vocab)
        # per token: for each KV part, the K row of each of its layers, then the V rows
        parts = []
        base = 0
        for part in self.mem.kv_parts():
            layers = [part._layers[il][1] for il in part.layers]
            kb = [int(li.k_row_bytes) for li in layers]
            vb = [int(li.v_row_bytes) * (int(li.n_embd_v_gqa) if part.v_trans else 1) for li in layers]
            parts.append((part, base, kb, vb))
            base += sum(kb) + sum(vb)
        stride = base
        if rows is not None and len(rows) != stride * len(tokens):
            raise AssertionError(f"rows has {len(rows)} bytes, expected {stride} per token x {len(tokens)}")
        for ub in ctx:
            ub.apply()
            if rows is None:
                continue
            for part, base, kb, vb in parts:
                for li, il in enumerate(part.layers):
                    ko = base + sum(kb[:li])
                    vo = base + sum(kb) + sum(vb[:li])
                    k = b"".join(rows[t * stride + ko:t * stride + ko + kb[li]] for t in ub.batch_idx)
                    v = b"".join(rows[t * stride + vo:t * stride + vo + vb[li]] for t in ub.batch_idx)
                    ub.store(il, k=k, v=v)
        if rs is not None:
            ids = sorted({q for x in (seqs or [[0]]) for q in x})
            self.rec_rows(ids, rs, rollback=False)

    def rec_rows(self, seqs: list[int], data: bytes, rollback: bool) -> None:
        """Write the r rows then the s rows (one per recurrent layer) of each sequence, in order,
        into the cell the sequence's tail is in: plane 0, or the pending rollback plane."""
        rec = self.rec
        if rec is None:
            raise AssertionError("recurrent rows for a memory without a recurrent part")
        row = {il: rec._layers[il][1].row_bytes for il in rec.layers}   # r, s, p bytes (0: none)
        views = [rec.r(il) for il in rec.layers if row[il][0]] + [rec.s(il) for il in rec.layers if row[il][1]]
        views = [v.view(np.uint8).reshape(v.shape[0], -1) for v in views]
        stride = sum(v.shape[1] for v in views)
        if len(data) != stride * len(seqs):
            raise AssertionError(f"rs has {len(data)} bytes, expected {stride} per sequence x {len(seqs)}")
        cells = rec.cells_view()
        planes = rec.rs_idx()
        o = 0
        for q in seqs:
            tail = int(cells.tail[q])
            if tail < 0:
                raise AssertionError(f"rs rows for sequence {q}, which has no recurrent cell")
            row = (int(planes[q]) if rollback else 0) * rec.size + tail
            for v in views:
                v[row] = np.frombuffer(data[o:o + v.shape[1]], np.uint8)
                o += v.shape[1]

    def rollback_rows(self, seq: int, data: bytes, line: int) -> None:
        if self.rec is None or int(self.rec.rs_idx()[seq]) == 0:
            self.fail(line, f"rs rows after a seq_rm that left no rollback pending for sequence {seq}")
        self.rec_rows([seq], data, rollback=True)

    def read(self, args: list[str]) -> int:
        target, env = args[0], args[1]
        flags = 1 if "partial" in args[2:-1] else 0
        blob = hexbytes(args[-1])
        seq = -1 if target == "whole" else int(target)
        envelope = {"llama": "llama", "bare": None}[env]
        import pymem

        try:
            n_check = self.mem.state_check(blob, seq, flags=flags, envelope=envelope)
            st_check = 0
        except pymem.Error as exc:
            n_check, st_check = None, exc.status
        try:
            n = self.mem.state_read(blob, seq, flags=flags, envelope=envelope, allow_trailing=True)
        except pymem.Error as exc:
            if st_check == 0 and exc.status not in (STATUS["NO_SLOT"], STATUS["NOMEM"]):
                raise AssertionError(f"state_check accepted what state_read rejects ({exc})") from None
            raise
        if st_check != 0 or n_check != n:
            raise AssertionError(f"state_check gave status {st_check} / {n_check} bytes, state_read {n} bytes")
        return n

    # -- expectations --------------------------------------------------------------------------
    def expect(self, key: str, val: str, line: int) -> None:
        mem = self.mem
        if key == "expect_pos":
            s, lo, hi = ints(val)
            got = (mem.seq_pos_min(s), mem.seq_pos_max(s))
            if got != (lo, hi):
                self.fail(line, f"seq {s} positions {got}, expected {(lo, hi)}")
            return
        if key == "expect_whole":
            seq, blob = -1, hexbytes(val)
        else:
            s, b = val.split()
            seq, blob = int(s), hexbytes(b)
        got = mem.state_write(seq, envelope="llama")
        if mem.state_size(seq, envelope="llama") != len(got):
            self.fail(line, "state_size differs from the state_write length")
        self.stats["bytes"] += len(blob)
        if got != blob:
            n = min(len(got), len(blob))
            at = next((k for k in range(n) if got[k] != blob[k]), n)
            self.fail(line, f"{key}: {len(got)} bytes, expected {len(blob)}; first difference at byte {at}: "
                            f"{got[at:at + 8].hex()} vs {blob[at:at + 8].hex()}")


# ---- tests -------------------------------------------------------------------------------------
_ALL = load_dir() if VECTORS.is_dir() else []


def test_vectors_present():
    assert _ALL, f"no vector cases found in {VECTORS}"


@pytest.mark.parametrize("fname,case", _ALL, ids=[f"{f}:{c.name}" for f, c in _ALL])
def test_vector(fname, case):
    stats = Replayer(case).run()
    assert stats["steps"] > 0


def test_reader_rejects():
    good = "# c\n[case a]\nkind = kv\nstep = clear 1\n"
    assert parse(good)[0].params == {"kind": "kv"}
    for bad, why in [
        ("kind = kv\n", "outside a case"),
        ("[case a]\nbogus = 1\n", "unknown key"),
        ("[case a]\nkind = kv\nkind = kv\n", "repeated parameter"),
        ("[case a]\nstep = clear 1\nsize = 3\n", "after the first step"),
        ("[case a]\nkind =\n", "expected"),
        ("[case a]\n[case a]\n", "duplicate case"),
        ("[case a b]\n", "expected"),
        ("[case a]\nKind = kv\n", "expected"),
    ]:
        with pytest.raises(VectorError, match=why):
            parse(bad)
    for text, why in [("[case r]\nkind = recurrent\nn_layer = 1\nn_seq_max = 1\nsize = 4\n", "do not belong"),
                      ("[case k]\nkind = kv\nn_layer = 1\nn_seq_max = 1\nrec_layers = 0\n", "do not belong"),
                      ("[case h]\nkind = hybrid\nn_layer = 1\nn_seq_max = 1\nswa_size = 4\n", "do not belong"),
                      ("[case x]\nkind = mystery\n", "unsupported kind")]:
        with pytest.raises(VectorError, match=why):
            build(parse(text)[0])
    with pytest.raises(VectorError):
        hexbytes("00ff")
    with pytest.raises(ValueError):
        hexbytes("hex:0")


MEM_FILES = ("iswa.txt", "recurrent.txt", "hybrid.txt")


def test_vectors_every_kind():
    """Issue 12: the shared vectors cover every memory kind (and the kv cases stay kv)."""
    kinds = {c.params.get("kind") for _, c in _ALL}
    assert kinds >= {"kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"}, kinds
    rollback = [c for _, c in _ALL if int(c.params.get("n_rs_seq", "0")) > 0]
    assert any("rs=" in v for c in rollback for k, v, _ in c.events if v.startswith("seq_rm")), \
        "no rollback seq_rm with snapshot rows"


def test_mem_vectors_regenerate(oracle, tmp_path):
    """iswa/recurrent/hybrid.txt are what llama.cpp b11739 records today, byte for byte (regen.py
    --check regenerates them in memory, replays them through pymem and diffs)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "tests" / "vectors" / "regen.py"), "--check"]
    for f in MEM_FILES:
        cmd += ["--file", f]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6 cases" in p.stderr, p.stderr[-1000:]
