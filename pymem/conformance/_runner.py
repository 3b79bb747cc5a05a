"""Replaying and recording conformance vectors (see :mod:`pymem.conformance`)."""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import BUILDS, Vector, _hex, _unhex, load_vectors, locate
from .scenarios import SCENARIOS, Scenario

__all__ = ["Row", "run", "record"]


@dataclass
class Row:
    """One vector's outcome. ``build``: the installed build against the recording;
    ``pymem``: pymem against the installed build ("identical", a first difference, or which
    side refused a step)."""

    vector: str
    memory: str
    steps: int
    recorded_by: str
    build: str = "identical"
    pymem: str = "identical"
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"vector": self.vector, "memory": self.memory, "steps": self.steps, "recorded_by": self.recorded_by,
                "build_vs_recording": self.build, "pymem_vs_build": self.pymem, "notes": self.notes}


# ---------------------------------------------------------------------------------------------
# the installed builds
# ---------------------------------------------------------------------------------------------
class _Session:
    """Worker processes for one run: the py-sync worker generates the tiny models; the
    chosen build's worker runs them."""

    def __init__(self, llama: str) -> None:
        from .._oracle import OracleWorker

        if llama not in BUILDS:
            raise ValueError(f"--llama {llama!r}: one of {', '.join(BUILDS)}")
        self.llama = llama
        self.label, self.format = BUILDS[llama]
        self.gen = OracleWorker()
        self.gen.start()
        if llama == "py-sync":
            self.w = self.gen
        else:
            from .._oracle.lcp import LcpWorker

            self.w = LcpWorker()
            self.w.start()
        self.paths: Dict[str, str] = {}

    def model(self, name: str) -> str:
        if name not in self.paths:
            self.paths.update(self.gen.ensure_models([name]))
        return self.paths[name]

    def mirror(self, params: Dict[str, Any]) -> Any:
        import pymem
        from .._oracle import tinymodels
        from .._oracle.mirror import Mirror

        name = params["model"]
        path = self.model(name)
        kw = dict(n_ctx=int(params["n_ctx"]), n_seq_max=int(params["n_seq_max"]),
                  kv_unified=bool(int(params["kv_unified"])), flash_attn=bool(int(params["flash_attn"])),
                  swa_full=bool(int(params["swa_full"])), type_k=params["type_k"], type_v=params["type_v"])
        n_ubatch = int(params.get("n_ubatch", 0)) or None
        n_rs = int(params.get("n_rs_seq", 0))
        extra = {"n_rs_seq": n_rs} if n_rs else {}
        ctx = self.w.context(path, n_ubatch=n_ubatch, **kw, **extra)
        mem = pymem.from_gguf(path, kw["n_ctx"], n_seq_max=kw["n_seq_max"], type_k=kw["type_k"],
                              type_v=kw["type_v"], flash_attn=kw["flash_attn"], unified=kw["kv_unified"],
                              swa_full=kw["swa_full"], n_ubatch=n_ubatch or 512, n_rs_seq=n_rs, format=self.format)
        args = dict(n_ubatch=ctx.n_ubatch(), n_vocab=tinymodels.layout(name)["n_vocab"], n_seq_max=kw["n_seq_max"])
        if self.llama == "py-sync":
            return Mirror(ctx, mem, **args)
        from .._oracle.lcp_mirror import LcpMirror

        return LcpMirror.for_memory(ctx, mem, **args)

    def close(self) -> None:
        if self.w is not self.gen:
            self.w.close()
        self.gen.close()


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def _decode_items(text: str) -> List[Tuple[int, int, List[int]]]:
    f = dict(kv.split("=", 1) for kv in text.split()[1:])
    toks = [int(t) for t in f["tokens"].split(",")]
    pos = [int(p) for p in f["pos"].split(",")]
    seqs = [[int(x) for x in s.split("+")] for s in f["seqs"].split(",")]
    return [(t, p, s) for t, p, s in zip(toks, pos, seqs)]


def _apply(m: Any, text: str) -> str:
    """Run one concrete step on the mirror (both sides); returns its result as text."""
    w = text.split()
    op = w[0]
    if op == "decode":
        return str(m.decode(_decode_items(text)))
    a = [int(x) for x in w[1:] if x != "->"][: {"seq_rm": 3, "seq_cp": 4, "seq_keep": 1, "seq_add": 4,
                                                 "seq_div": 4, "restore_seq": 2}[op]]
    if op == "seq_rm":
        r = m.seq_rm(*a)
        return "-" if r is None else str(int(bool(r)))
    if op == "restore_seq":
        return str(m.seq_restore(a[0], a[1]))
    getattr(m, op)(*a)
    return ""


def _concrete(m: Any, step: Tuple[Any, ...]) -> str:
    """The concrete step text for an abstract scenario step, positions from the build."""
    op = step[0]
    if op == "decode":
        _, seq, n, tok = step
        p0 = m.llama.pos_max(seq) + 1
        return ("decode tokens=" + ",".join(str((tok + i) % 128) for i in range(n))
                + " pos=" + ",".join(str(p0 + i) for i in range(n)) + " seqs=" + ",".join([str(seq)] * n))
    return " ".join(str(x) for x in step)


def _observe(m: Any, side: str, n_seq: int, final: bool) -> List[Tuple[str, str]]:
    """The expectations of one side ("build" or "pymem") after a step."""
    out: List[Tuple[str, str]] = []
    for s in range(n_seq):
        if side == "build":
            lo, hi = m.llama.pos_min(s), m.llama.pos_max(s)
        else:
            lo, hi = m.mem.seq_pos_min(s), m.mem.seq_pos_max(s)
        out.append(("expect_pos", f"{s} {lo} {hi}"))
    if m._rollback_pending():
        # a rollback seq_rm restores the recurrent rows from llama.cpp's snapshots at the next
        # decode; until then its state holds rows pymem cannot know (positions are compared)
        return out
    whole = m.llama.state_get() if side == "build" else m.mem.state_write(envelope="llama")
    out.append(("expect_whole", _hex(whole)))
    if final:
        for s in range(n_seq):
            b = m.llama.state_seq_get(s) if side == "build" else m.mem.state_write(s, envelope="llama")
            out.append(("expect_seq", f"{s} {_hex(b)}"))
            if side == "build":
                p = m.llama.state_seq_get(s, 1)
            else:   # 0c1e570's plain KV cache writes the whole sequence for PARTIAL_ONLY
                lcp_kv = m.mem.kind == "kv" and type(m).__name__ == "LcpMirror"
                p = m.mem.state_write(s, flags=0 if lcp_kv else 1, envelope="llama")
            out.append(("expect_seq_partial", f"{s} {_hex(p)}"))
    return out


def _compare(want: List[Tuple[str, str]], got: List[Tuple[str, str]], mem: Any, fmt_want: int,
             fmt_got: int, every: Optional[List[str]] = None) -> Optional[str]:
    """None if equal, else where the first expectation differs (``every`` collects all)."""
    from ..state import Layout

    whole = Layout.from_memory(mem)
    part = Layout.from_memory(mem, partial=True)
    got_map: Dict[Tuple[str, str], str] = {}
    for k, v in got:
        head = v.split()[0] if k != "expect_whole" else ""
        got_map[(k, head)] = v

    def one(k: str, v: str) -> Optional[str]:
        if k == "expect_whole_sha256":
            g = got_map.get(("expect_whole", ""))
            if g is None:
                return "whole state: missing"
            blob = _unhex(g)
            if f"{len(blob)} {hashlib.sha256(blob).hexdigest()}" != v:
                return f"whole state: sha256 differs; sizes {v.split()[0]} / {len(blob)}"
            return None
        head = v.split()[0] if k != "expect_whole" else ""
        g = got_map.get((k, head))
        if g == v:
            return None
        if g is None:
            return f"{k} {head}: missing"
        if k == "expect_pos":
            return f"positions of seq {head}: {v.split()[1:]} vs {g.split()[1:]}"
        blob_w, blob_g = _unhex(v.split()[-1]), _unhex(g.split()[-1])
        what = {"expect_whole": "whole state", "expect_seq": f"seq {head} state",
                "expect_seq_partial": f"seq {head} PARTIAL_ONLY state"}[k]
        lay = part if k == "expect_seq_partial" else whole
        if k == "expect_seq_partial" and mem.kind == "kv" and 10 in (fmt_want, fmt_got):
            if len(blob_w) != len(blob_g) and 8 in (len(blob_w), len(blob_g)):
                return (f"{what}: PARTIAL_ONLY of a plain KV cache: {len(blob_w)} / {len(blob_g)} bytes "
                        "(0c1e570 writes the whole sequence, b11739 no KV section)")
            lay = whole
        if fmt_want != fmt_got:
            return f"{what}: " + _across_formats(blob_w, blob_g, k != "expect_whole", lay, fmt_want, fmt_got)
        return f"{what}: " + locate(blob_w, blob_g, k != "expect_whole", lay, fmt_want)

    first = None
    for k, v in want:
        d = one(k, v)
        if d:
            if every is None:
                return d
            every.append(d)
            first = first or d
    return first


#: kinds of difference between two builds' recordings (summarised per vector)
_CLASSES = [("k_rot/v_rot words)", "format words (k_rot/v_rot)"),
            ("Hadamard rotation", "quantized K/V Hadamard-rotated in b11739 (k_rot/v_rot != 0), not in 0c1e570"),
            ("row data in", "row data (the models' numerics)"),
            ("PARTIAL_ONLY of a plain KV", "PARTIAL_ONLY of a plain KV cache: whole sequence (0c1e570) vs none (b11739)"),
            ("sha256 differs", "")]


def _classify(diffs: List[Tuple[int, str]]) -> str:
    """One line for every kind of difference found (step of its first occurrence); anything
    unclassified is shown in full."""
    seen: Dict[str, int] = {}
    other: List[str] = []
    for i, d in diffs:
        hit = [label for key, label in _CLASSES if key in d]
        for label in hit:
            if label:
                seen.setdefault(label, i)
        if not hit or "then byte" in d:
            other.append(f"step {i}: {d}")
    parts = [f"{label} (from step {i})" for label, i in seen.items()]
    if other:
        parts.append("OTHER: " + other[0] + (f" (+{len(other) - 1} more)" if len(other) > 1 else ""))
    return "; ".join(parts) or "identical"


def _convert(blob: bytes, seq: bool, lay: Any, fmt_from: int, fmt_to: int) -> bytes:
    """A llama.cpp blob of format ``fmt_from`` in format ``fmt_to`` (pymem.state's conversion:
    the k_rot / v_rot words added or removed)."""
    import dataclasses
    import struct

    from .. import state as S

    lay = dataclasses.replace(lay, format=None)
    if seq:
        v_from = {11: 4, 10: 3}[fmt_from]
        f = S.SeqState.parse(struct.pack("<III", S.MAGIC_SEQ_FILE, v_from, 0) + blob[8:], layout=lay)
        return blob[:8] + f.with_version({11: 4, 10: 3}[fmt_to]).dump()[12:]
    f = S.Session.parse(struct.pack("<III", S.MAGIC_SESSION, fmt_from, 0) + blob, layout=lay)
    return f.with_version(fmt_to).context_blob()


def _across_formats(want: bytes, got: bytes, seq: bool, lay: Any, fmt_want: int, fmt_got: int) -> str:
    """Blobs of two builds with different state formats: the format difference, then what is
    left after converting the recording to the build's format (metadata, or only row data,
    which the builds' models compute)."""
    from .. import _errors
    from . import _regions

    rot = "Hadamard rotation of the quantized cache: k_rot/v_rot != 0 in b11739, none in 0c1e570"
    try:
        conv = _convert(want, seq, lay, fmt_want, fmt_got)
    except _errors.Error as exc:
        if "Hadamard" in str(exc):
            return rot
        return f"no format-{fmt_got} form of the recording ({str(exc)[:90]})"
    parts = [f"format {fmt_want} vs {fmt_got} (k_rot/v_rot words)"] if conv != want else []
    if conv == got:
        return ", ".join(parts) or "identical after conversion"
    if len(conv) == len(got):
        regs = _regions(conv, seq, lay, fmt_got)
        diff = [lab for a, b, lab in regs if conv[a:b] != got[a:b]]
        if diff and all("k_rot word" in x or "v_rot word" in x or x.endswith(("rows", "columns")) for x in diff):
            if any("rot word" in x for x in diff):
                parts.append(rot)
            data = [x for x in diff if x.endswith(("rows", "columns"))]
            if data:
                parts.append(f"row data in {len(data)} layer blocks (the models' numerics; first: {data[0]})")
            return ", ".join(parts)
    return ", ".join(parts + ["then " + locate(conv, got, seq, lay, fmt_got)])


# ---------------------------------------------------------------------------------------------
# run and record
# ---------------------------------------------------------------------------------------------
def run(llama: str = "py-sync", paths: Optional[Iterable[Any]] = None,
        progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Replay every vector (default: the shipped sets) against the installed build ``llama``
    and pymem side by side."""
    vectors = load_vectors(paths)
    sess = _Session(llama)
    rows: List[Row] = []
    try:
        for v in vectors:
            if progress:
                progress(v.name)
            rows.append(_replay(sess, v))
    finally:
        sess.close()
    return rows


def _replay(sess: _Session, v: Vector) -> Row:
    p = v.params
    row = Row(v.name, v.memory, len(v.steps), p.get("recorded_by", "?"))
    fmt_want = int(p.get("format", 11))
    n_seq = int(p["n_seq_max"])
    m = sess.mirror(p)
    build_diffs: List[Tuple[int, str]] = []
    try:
        for i, (text, expects) in enumerate(v.steps):
            final = i == len(v.steps) - 1
            try:
                res = _apply(m, text)
            except AssertionError as exc:      # the two sides disagree on the step itself
                msg = str(exc).splitlines()[0]
                if row.pymem == "identical":
                    row.pymem = f"step {i} ({text.split()[0]}): {msg[:160]}"
                m.mirror_failed = True
                break
            if "->" in text and res != text.split("->")[1].strip() and row.build == "identical":
                row.build = f"step {i} ({text.split('->')[0].strip()}): returned {res}, recorded {text.split('->')[1].strip()}"
            want_rc = [x for k, x in expects if k == "expect_rc"]
            if want_rc and res != want_rc[0] and row.build == "identical":
                row.build = f"step {i} ({text.split()[0]}): result {res} (recorded {want_rc[0]})"
            want = [(k, x) for k, x in expects if k != "expect_rc"]
            got_b = _observe(m, "build", n_seq, final)
            if fmt_want == sess.format:      # the same build: the first difference, exactly
                if row.build == "identical":
                    d = _compare(want, got_b, m.mem, fmt_want, sess.format)
                    if d:
                        row.build = f"step {i} ({text.split()[0]}): {d}"
            else:                            # another build: every kind of difference
                found: List[str] = []
                _compare(want, got_b, m.mem, fmt_want, sess.format, every=found)
                build_diffs += [(i, d) for d in found]
            if row.pymem == "identical":
                d = _compare(got_b, _observe(m, "pymem", n_seq, final), m.mem, sess.format, sess.format)
                if d:
                    row.pymem = f"step {i} ({text.split()[0]}): {d}"
        if build_diffs:
            row.build = _classify(build_diffs)
        skipped = {k: c for k, c in m.stats.items() if "skipped" in k}
        row.notes += [f"{k}: {c}" for k, c in skipped.items()]
    finally:
        try:
            m.llama.close()
        except Exception:
            pass
        m.mem.close()
    return row


def record(llama: str, directory: Any, scenarios: Optional[List[Scenario]] = None,
           progress: Optional[Callable[[str], None]] = None) -> Path:
    """Record the scenarios from the installed build ``llama`` into ``directory``
    (``<build>.txt.gz``). A scenario pymem does not replay byte for byte is not written:
    RuntimeError names it (nothing is written then)."""
    sess = _Session(llama)
    tag = {"py-sync": "b11739", "llama-cpp-python": "0c1e570"}[llama]
    lines = [f"# conformance vectors recorded from {sess.label}, state format {sess.format}",
             "# by pymem conformance --record; format: tests/vectors/README.md (live cases)", ""]
    bad: List[str] = []
    try:
        for sc in (SCENARIOS if scenarios is None else scenarios):
            if progress:
                progress(sc.name)
            params = {"kind": "live", "memory": sc.memory, "model": sc.model, "recorded_by": tag,
                      "format": str(sess.format)}
            for k, val in sc.ctx.items():
                params[k] = str(int(val)) if isinstance(val, bool) else str(val)
            m = sess.mirror(params)
            case = [f"[case {sc.name}]"] + [f"{k} = {val}" for k, val in params.items()]
            try:
                for i, st in enumerate(sc.steps):
                    text = _concrete(m, st)
                    res = _apply(m, text)
                    if text.startswith("seq_rm"):
                        text += f" -> {res}"
                    case.append(f"step = {text}")
                    if text.startswith(("decode", "restore_seq")):
                        case.append(f"expect_rc = {res}")
                    final = i == len(sc.steps) - 1
                    got = _observe(m, "build", int(params["n_seq_max"]), final)
                    d = _compare(got, _observe(m, "pymem", int(params["n_seq_max"]), final), m.mem,
                                 sess.format, sess.format)
                    if d:
                        raise AssertionError(f"step {i}: pymem differs: {d}")
                    for k, val in got:
                        if k == "expect_whole" and 0 < i < len(sc.steps) - 1:
                            # full bytes at the first and last step, a digest in between (size)
                            blob = _unhex(val)
                            k, val = "expect_whole_sha256", f"{len(blob)} {hashlib.sha256(blob).hexdigest()}"
                        case.append(f"{k} = {val}")
            except AssertionError as exc:
                bad.append(f"{sc.name}: {str(exc).splitlines()[0][:200]}")
            finally:
                m.llama.close()
                m.mem.close()
            lines += case + [""]
    finally:
        sess.close()
    if bad:
        raise RuntimeError("pymem does not replay these recordings, nothing written: " + "; ".join(bad))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{tag}.txt.gz"
    from ..state.files import atomic_write

    data = gzip.compress("\n".join(lines).encode(), mtime=0)
    atomic_write(out, [data], len(data))
    return out
