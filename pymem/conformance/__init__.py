"""The conformance kit: recorded llama.cpp behaviour, replayed against an installed llama.cpp
build and pymem side by side.

A *vector* (one ``[case]`` of a ``*.txt`` / ``*.txt.gz`` file in ``vectors/``, the line
grammar of tests/vectors/README.md, "live" cases) names a tiny model
(:mod:`pymem._oracle.tinymodels`), the context parameters, and a list of steps (decodes with
explicit tokens, positions and sequences, sequence operations, sequence save/restore), each
followed by what the recording build reported: positions of every sequence, the whole state
(``llama_state_get_data``) and, at the end, every sequence state with and without
``PARTIAL_ONLY``. The shipped sets were recorded from llama.cpp b11739
(``llama-cpp-py-sync`` 0.11739, state format 11) and 0c1e570 (llama-cpp-python 0.3.36, format
10), for every memory type.

:func:`run` replays each vector in an installed build (in its worker process) and in a pymem
memory of that build's format, fed through :class:`pymem._oracle.mirror.Mirror` (pymem gets
only the K/V rows the build's model computed; placement, operations and state writes are
its own). Per vector it reports whether the build reproduces the recording, and whether pymem
reproduces the build, or the first difference: step, which state, section, stream, cell or
layer, and byte offset; or which side refused a step. :func:`record` writes a new vector set
from an installed build, refusing to write a vector pymem does not replay byte for byte.

Command line: ``pymem conformance [--llama py-sync|llama-cpp-python] [--json] [--record DIR]``.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .scenarios import SCENARIOS

__all__ = ["BUILDS", "Vector", "Row", "load_vectors", "vector_files", "run", "record", "locate", "SCENARIOS"]

#: --llama choice -> (build label, state format)
BUILDS = {"py-sync": ("llama.cpp b11739 (llama-cpp-py-sync 0.11739)", 11),
          "llama-cpp-python": ("llama.cpp 0c1e570 (llama-cpp-python 0.3.36)", 10)}
VECTOR_DIR = Path(__file__).resolve().parent / "vectors"


# ---------------------------------------------------------------------------------------------
# vectors: reading and writing the line grammar
# ---------------------------------------------------------------------------------------------
@dataclass
class Vector:
    name: str
    params: Dict[str, str] = field(default_factory=dict)
    steps: List[Tuple[str, List[Tuple[str, str]]]] = field(default_factory=list)  # (step, [(key, value)])
    source: str = ""

    @property
    def memory(self) -> str:
        return self.params.get("memory", "?")


_PARAM_KEYS = {"kind", "memory", "model", "recorded_by", "format", "n_ctx", "n_seq_max", "kv_unified", "flash_attn",
               "swa_full", "type_k", "type_v", "n_rs_seq", "n_ubatch"}
_EXPECT_KEYS = {"expect_pos", "expect_whole", "expect_whole_sha256", "expect_seq", "expect_seq_partial", "expect_rc"}


def vector_files(directory: Any = None) -> List[Path]:
    d = Path(directory) if directory is not None else VECTOR_DIR
    return sorted(p for p in d.iterdir() if p.name.endswith((".txt", ".txt.gz")))


def _open_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def load_vectors(paths: Optional[Iterable[Any]] = None) -> List[Vector]:
    """Read vector files (default: the shipped set). Unknown keys and malformed lines raise
    ValueError naming the file and line."""
    out: List[Vector] = []
    for p in (vector_files() if paths is None else [Path(x) for x in paths]):
        cur: Optional[Vector] = None
        for ln, raw in enumerate(_open_text(p).splitlines(), 1):
            line = raw.strip()
            where = f"{p.name}:{ln}"
            if not line or line.startswith("#"):
                continue
            if line.startswith("[case ") and line.endswith("]"):
                cur = Vector(line[6:-1].strip(), source=where)
                out.append(cur)
                continue
            key, sep, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or cur is None or not value:
                raise ValueError(f"{where}: expected 'key = value' inside a case")
            if key == "step":
                cur.steps.append((value, []))
            elif key in _EXPECT_KEYS:
                if not cur.steps:
                    raise ValueError(f"{where}: {key} before the first step")
                cur.steps[-1][1].append((key, value))
            elif key in _PARAM_KEYS:
                if cur.steps or key in cur.params:
                    raise ValueError(f"{where}: parameter {key} after a step or repeated")
                cur.params[key] = value
            else:
                raise ValueError(f"{where}: unknown key {key!r}")
    return out


def _hex(b: bytes) -> str:
    return "hex:" + bytes(b).hex()


def _unhex(v: str) -> bytes:
    if not v.startswith("hex:"):
        raise ValueError(f"not a hex value: {v[:20]}")
    return bytes.fromhex(v[4:])


# ---------------------------------------------------------------------------------------------
# where two state blobs first differ
# ---------------------------------------------------------------------------------------------
def _regions(blob: bytes, seq: bool, layout: Any, fmt: int) -> List[Tuple[int, int, str]]:
    """(start, end, label) of every field of a llama.cpp blob (format ``fmt``)."""
    regs: List[Tuple[int, int, str]] = []
    o = 0

    def take(n: int, label: str) -> int:
        nonlocal o
        regs.append((o, o + n, label))
        o += n
        return o - n

    def u32(label: str) -> int:
        at = take(4, label)
        return struct.unpack_from("<I", blob, at)[0] if at + 4 <= len(blob) else 0

    def u64(label: str) -> int:
        at = take(8, label)
        return struct.unpack_from("<Q", blob, at)[0] if at + 8 <= len(blob) else 0

    try:
        if seq:
            take(8, "sequence blob header (magic, seq id)")
        else:
            n = u32("arch length")
            take(n, "arch name")
        for si, sec in enumerate(layout.sections):
            name = f"section {si} ({sec.name or sec.kind})"
            if sec.kind == "kv":
                ns = u32(f"{name} n_stream")
                for s in range(ns):
                    cc = u32(f"{name} stream {s} cell_count")
                    for c in range(cc):
                        take(4, f"{name} stream {s} cell {c} pos")
                        n = u32(f"{name} stream {s} cell {c} n_seq_id")
                        if sec.cell_ext:
                            take(12, f"{name} stream {s} cell {c} ext")
                        take(4 * n, f"{name} stream {s} cell {c} seq ids")
                    if cc == 0:
                        continue
                    vt = u32(f"{name} stream {s} v_trans")
                    nl = u32(f"{name} stream {s} n_layer")
                    if fmt >= 11:
                        u32(f"{name} stream {s} k_rot word (format 11)")
                        u32(f"{name} stream {s} v_rot word (format 11)")
                    for li in range(nl):
                        take(4, f"{name} stream {s} layer {li} K type")
                        row = u64(f"{name} stream {s} layer {li} K row size")
                        take(row * cc, f"{name} stream {s} layer {li} K rows")
                    for li in range(nl):
                        take(4, f"{name} stream {s} layer {li} V type")
                        if vt:
                            el, ne = u32(f"{name} stream {s} layer {li} V element size"), \
                                u32(f"{name} stream {s} layer {li} V n_embd")
                            take(el * ne * cc, f"{name} stream {s} layer {li} V columns")
                        else:
                            row = u64(f"{name} stream {s} layer {li} V row size")
                            take(row * cc, f"{name} stream {s} layer {li} V rows")
            else:
                cc = u32(f"{name} cell_count")
                for c in range(cc):
                    take(4, f"{name} cell {c} pos")
                    n = u32(f"{name} cell {c} n_seq_id")
                    take(4 * n, f"{name} cell {c} seq ids")
                u32(f"{name} s_trans")
                u32(f"{name} n_layer")
                for what in ("r", "s"):
                    for li in range(sec.n_recurrent):
                        take(4, f"{name} layer {li} {what} type")
                        row = u64(f"{name} layer {li} {what} row size")
                        take(row * cc, f"{name} layer {li} {what} rows")
    except struct.error:
        pass
    return regs


def locate(want: bytes, got: bytes, seq: bool, layout: Any, fmt: int) -> str:
    """'identical', or where ``got`` first differs from ``want`` (labelled in ``want``'s
    structure, format ``fmt``)."""
    if want == got:
        return "identical"
    n = min(len(want), len(got))
    i = next((k for k in range(n) if want[k] != got[k]), n)
    label = "end of the shorter blob"
    for a, b, lab in _regions(want, seq, layout, fmt):
        if a <= i < b:
            label = f"{lab} (+{i - a})"
            break
    return f"byte {i}: {label}; sizes {len(want)} / {len(got)}"


from ._runner import Row, record, run  # noqa: E402  (uses the helpers above)
