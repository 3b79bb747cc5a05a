"""llama.cpp's saved states as objects: session files (``ggsn``), sequence state files
(``ggsq``), whole-context and per-sequence blobs, and bare memory sections.

Read one into a readable structure (architecture, format version, tokens, memory sections,
streams, cells with positions and sequence ids, per-layer types and row sizes, per-sequence
position ranges and byte counts), write it back byte-identically, compare two, edit one
offline, or load one into a pymem memory::

    from pymem.state import Session, SeqState, load, parse, diff

    s = Session.load("prompt.session", model="model.gguf")
    print(s.describe())
    t = s.edit([("seq_rm", 0, 10, -1), ("seq_add", 0, 10, -1, -4)], model="model.gguf")
    t.save("edited.session")            # llama_state_load_file accepts it
    mem = s.to_memory("model.gguf")     # a pymem memory holding the state

Formats (SPEC section 8): a session file is ``u32 'ggsn', u32 version, u32 n_tokens,
i32 tokens[n], u32 len, arch[len]`` followed by the memory's whole state; version 11 is
llama.cpp b11739 (KV format 11, with the k_rot / v_rot words), version 10 is the older
layout of llama-cpp-python 0.3.36 (KV format 10).  A sequence state file is ``u32 'ggsq',
u32 version (4 = format 11, 3 = format 10), u32 n_tokens, tokens`` and one sequence's
state.  A whole-context blob (``llama_state_get_data``) is ``u32 len, arch`` + the whole
state; a sequence blob (``llama_state_seq_get_data``) is ``u32 0xaf143cd8, i32 seq_id`` +
the sequence's state.

**Layouts.**  The memory sections carry no tags: which sections follow (one KV section for
a KV cache, base + SWA KV sections for iSWA, a REC section for recurrent memories, and
combinations for hybrids) and how many recurrent layers a REC section has come from the
model.  :class:`Layout` describes them; it comes from a GGUF (``model=``), from a memory,
explicitly, or is inferred from the bytes alone when exactly one layout parses them
(:class:`LayoutAmbiguousError` otherwise).

**Edits** (:meth:`Session.edit` etc.) run in a pymem memory, whose C core has llama.cpp's
exact semantics: with ``model`` the memory is :func:`pymem.from_gguf`'s for that model
(the *model path*: every edit, including seq_add / seq_div with the K rotation applied);
without it, a memory with the blob's own geometry (the *structure path*: seq_rm, seq_cp,
seq_keep, seq_mv and truncate; shifts of attention caches need the model's RoPE
parameters and are refused).  The state is restored (a whole restore packs the cells at
0..n-1 in blob order), the operations applied in order, pending updates (K-shift, stream
copies) applied as llama.cpp does before its next decode, and the state written back.

Errors: :class:`pymem.StateError` (truncated, foreign or corrupt input, naming what and
where), :class:`LayoutAmbiguousError` (a subclass), :class:`EditError` (an edit llama.cpp
would refuse or that cannot be done).  Nothing is ever written partially: files are
written to a temporary name and renamed.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from . import _errors as E
from ._errors import StateError
from ._sections import KVCell, KVLayer, KVSection, KVStream, RecLayer, RecSection, parse_kv, parse_rec

__all__ = [
    "MAGIC_SESSION",
    "MAGIC_SEQ_FILE",
    "MAGIC_SEQ_BLOB",
    "SESSION_VERSIONS",
    "SEQ_FILE_VERSIONS",
    "LayoutAmbiguousError",
    "EditError",
    "SectionSpec",
    "Layout",
    "infer_layout",
    "MemoryState",
    "SeqInfo",
    "memory_params",
    "Session",
    "SeqState",
    "Blob",
    "Op",
    "parse_op",
    "apply_ops",
    "parse",
    "load",
    "diff",
    "Diff",
    "wrap_seq",
    "unwrap_seq",
    "wrap_context",
    "unwrap_context",
]

PathLike = Union[str, "os.PathLike[str]"]
Progress = Optional[Callable[[int, int], None]]

MAGIC_SESSION = 0x6767736E   # 'ggsn'
MAGIC_SEQ_FILE = 0x67677371  # 'ggsq'
MAGIC_SEQ_BLOB = 0xAF143CD8  # llama_state_seq_get_data's io magic
#: session file version -> KV state format
SESSION_VERSIONS = {11: 11, 10: 10}
#: sequence state file version -> KV state format
SEQ_FILE_VERSIONS = {4: 11, 3: 10}
_SESSION_OF_FORMAT = {v: k for k, v in SESSION_VERSIONS.items()}
_SEQ_FILE_OF_FORMAT = {v: k for k, v in SEQ_FILE_VERSIONS.items()}
_BUILD_OF_FORMAT = {11: "llama.cpp b11739", 10: "llama.cpp 0c1e570 / llama-cpp-python 0.3.36"}
_MAX_SEQ = 256
_CHUNK = 1 << 22


class LayoutAmbiguousError(StateError):
    """Several section layouts parse the same bytes; give ``model=`` or ``layout=``.
    ``candidates`` lists them."""

    def __init__(self, message: str, candidates: Sequence["Layout"] = ()) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


class EditError(E.Error, ValueError):
    """An offline edit that llama.cpp would refuse (e.g. a partial seq_rm on a recurrent
    memory, where llama_memory_seq_rm returns false) or that cannot be done without more
    information (a K-shift without the model).  Nothing was written."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _u32(buf: Any, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def _type_info(t: int) -> Optional[Tuple[int, int]]:
    """(block size, bytes per block) of a cache type pymem knows, else None."""
    from ._native import lib

    if t < 0 or t > 0xFFFF:
        return None
    b = int(lib.pm_type_block_size(int(t)))
    return (b, int(lib.pm_type_size(int(t)))) if b else None


def _tname(t: Optional[int]) -> str:
    if t is None:
        return "-"
    if _type_info(t) is None:
        return f"type{t}"
    from .memory import type_name

    return type_name(t)


def _width(t: int, row: int) -> Optional[int]:
    """Elements in a row of ``row`` bytes of type t (None if t is unknown or row is not whole)."""
    ti = _type_info(t)
    if ti is None or row % ti[1]:
        return None
    return row // ti[1] * ti[0]


def wrap_seq(seq_id: int, sec: bytes) -> bytes:
    """``llama_state_seq_get_data``'s envelope: io magic + source seq id + sections."""
    return struct.pack("<Ii", MAGIC_SEQ_BLOB, int(seq_id)) + bytes(sec)


def unwrap_seq(blob: bytes) -> Tuple[int, bytes]:
    """Inverse of :func:`wrap_seq`: ``(seq_id, sections)``."""
    b = memoryview(blob)
    if len(b) < 8:
        raise StateError(f"sequence blob too short: {len(b)} bytes, the envelope alone needs 8 (offset 0)")
    magic, seq = struct.unpack_from("<Ii", b, 0)
    if magic != MAGIC_SEQ_BLOB:
        raise StateError(f"not a sequence blob: magic 0x{magic:08x} at offset 0, expected 0x{MAGIC_SEQ_BLOB:08x} "
                         "(llama_state_seq_set_data rejects it: 'wrong sequence state magic')")
    return seq, bytes(b[8:])


def wrap_context(arch: str, sec: bytes) -> bytes:
    """``llama_state_get_data``'s envelope: u32 length + architecture name + sections."""
    a = arch.encode()
    return struct.pack("<I", len(a)) + a + bytes(sec)


def _read_arch(b: Any, off: int, what: str) -> Tuple[str, int]:
    if len(b) - off < 4:
        raise StateError(f"truncated {what}: the architecture name length needs 4 bytes at offset {off}, "
                         f"{len(b) - off} left")
    n = _u32(b, off)
    if n == 0 or n > 256:
        raise StateError(f"{what}: architecture name length {n} at offset {off} is not in 1..256 "
                         "(not a llama.cpp context state)")
    if len(b) - off - 4 < n:
        raise StateError(f"truncated {what}: the architecture name needs {n} bytes at offset {off + 4}, "
                         f"{len(b) - off - 4} left")
    raw = bytes(b[off + 4:off + 4 + n])
    try:
        arch = raw.decode("ascii")
    except UnicodeDecodeError:
        arch = ""
    if not arch or not all(c.isalnum() or c in "_-." for c in arch):
        raise StateError(f"{what}: architecture name at offset {off + 4} is not a name: {raw[:32]!r}")
    return arch, off + 4 + n


def unwrap_context(blob: bytes) -> Tuple[str, bytes]:
    """Inverse of :func:`wrap_context`: ``(arch, sections)``."""
    arch, off = _read_arch(memoryview(blob), 0, "context blob")
    return arch, bytes(memoryview(blob)[off:])


def _looks_like_arch(b: Any, off: int = 0) -> bool:
    try:
        _read_arch(b, off, "")
        return True
    except StateError:
        return False


# ---------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SectionSpec:
    """One memory section: ``kind`` "kv" (one ``llama_kv_cache``) or "rec" (the recurrent
    memory).  ``name``: kv | base | swa | attn | recurrent (or "" when inferred).  KV:
    ``cell_ext`` (cells carry x, y, tok: M-RoPE models), ``has_v``, ``layers`` (the model
    layer ids, when known).  REC: ``n_recurrent`` (layers with state; not in the bytes),
    ``ple`` (per recurrent layer: has a PLE row), ``n_layer_model`` (when known)."""

    kind: str
    name: str = ""
    cell_ext: bool = False
    has_v: bool = True
    n_recurrent: int = 0
    ple: Optional[Tuple[bool, ...]] = None
    layers: Optional[Tuple[int, ...]] = None
    n_layer_model: Optional[int] = None
    #: KV: the cache has a sliding window (only such caches write a PARTIAL_ONLY state)
    swa: bool = False

    @property
    def label(self) -> str:
        what = "KV cache" if self.kind == "kv" else f"recurrent, {self.n_recurrent} layers with state"
        return f"{self.name}: {what}" if self.name else what


_KIND_SECTIONS = {
    "kv": ("kv",), "iswa": ("base", "swa"), "recurrent": ("recurrent",),
    "hybrid": ("attn", "recurrent"), "hybrid_iswa": ("base", "swa", "recurrent"),
}
_PATTERN_KINDS = {
    ("kv",): "kv (or the PARTIAL_ONLY part of an iSWA)",
    ("kv", "kv"): "iswa",
    ("rec",): "recurrent (or the PARTIAL_ONLY part of a hybrid)",
    ("kv", "rec"): "hybrid (or the PARTIAL_ONLY part of a hybrid-iSWA)",
    ("kv", "kv", "rec"): "hybrid_iswa",
}


@dataclass(frozen=True)
class Layout:
    """The sections of a state, in order, and the KV format (11 = b11739, 10 = 0c1e570;
    None = taken from the container or inferred).  ``kind`` is the memory kind when known;
    ``partial`` marks a PARTIAL_ONLY sequence state, which holds only the sections of caches
    with a sliding window and the recurrent section (b11739 writes nothing for a cache
    without a window: iSWA -> the SWA section, hybrid -> the recurrent section, plain KV ->
    nothing); ``source`` says where the layout came from."""

    sections: Tuple[SectionSpec, ...]
    format: Optional[int] = None
    kind: Optional[str] = None
    partial: bool = False
    source: str = "explicit"

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def of_kind(cls, kind: str, n_recurrent: int = 0, format: Optional[int] = None, partial: bool = False,
                cell_ext: bool = False) -> "Layout":
        """The layout of a memory kind (kv, iswa, recurrent, hybrid, hybrid_iswa)."""
        if kind not in _KIND_SECTIONS:
            raise E.InvalidArgumentError(f"unknown memory kind {kind!r} (one of {', '.join(_KIND_SECTIONS)})")
        names = list(_KIND_SECTIONS[kind])
        secs = tuple(SectionSpec("rec", n, n_recurrent=int(n_recurrent)) if n == "recurrent"
                     else SectionSpec("kv", n, cell_ext=cell_ext, swa=n == "swa") for n in names)
        if any(s.kind == "rec" for s in secs) and n_recurrent <= 0:
            raise E.InvalidArgumentError(f"a {kind} layout needs n_recurrent (the number of recurrent layers)")
        return cls(_partial(secs) if partial else secs, format, kind, bool(partial), f"kind {kind}")

    @classmethod
    def from_spec(cls, spec: Any, partial: bool = False, format: Optional[int] = None,
                  source: str = "") -> "Layout":
        """The layout of a :class:`pymem.gguf.MemorySpec`."""
        secs = []
        for p in spec.parts:
            kw = p.kwargs
            if p.kind == "kv":
                ext = bool(kw.get("cell_ext")) or int(kw.get("n_pos_per_embd", 1)) > 1
                secs.append(SectionSpec("kv", p.name, cell_ext=ext, layers=tuple(kw["layers"]),
                                        swa=str(kw.get("swa_type", "none")) != "none" and bool(kw.get("n_swa"))))
            else:
                n_p = kw.get("n_embd_p", 0)
                ple = None
                if n_p:
                    per = n_p if isinstance(n_p, (list, tuple)) else [n_p] * int(kw["n_layer"])
                    ple = tuple(bool(per[il]) for il in kw["layers"])
                secs.append(SectionSpec("rec", p.name, n_recurrent=len(kw["layers"]), ple=ple,
                                        layers=tuple(kw["layers"]), n_layer_model=int(kw["n_layer"])))
        return cls(_partial(secs) if partial else tuple(secs), format, spec.kind, bool(partial),
                   source or f"model ({spec.arch})")

    @classmethod
    def from_model(cls, model: PathLike, partial: bool = False, format: Optional[int] = None) -> "Layout":
        """The layout of the memory llama.cpp creates for a GGUF model."""
        from .gguf import memory_spec

        hp = _hparams(model)
        spec = memory_spec(hp, 256)
        name = Path(os.fspath(model)).name if isinstance(model, (str, os.PathLike)) else hp.arch
        return cls.from_spec(spec, partial, format, f"model {name}")

    @classmethod
    def from_memory(cls, mem: Any, partial: bool = False) -> "Layout":
        """The layout of a pymem memory's state."""
        secs = []
        names = list(_KIND_SECTIONS[mem.kind])
        fmt = None
        for name, kv in zip(names, mem.kv_parts()):
            fmt = kv.format
            has_v = all(kv._layer(il)[1].n_embd_v_gqa > 0 for il in kv.layers) if kv.layers else True
            secs.append(SectionSpec("kv", name, cell_ext=kv.cell_ext, has_v=has_v, layers=tuple(kv.layers),
                                    swa=kv.swa_type != "none"))
        rec = getattr(mem, "recurrent", None)
        if rec is not None:
            ple = tuple(bool(li.row_bytes[2]) for _, li in (rec._layers[il] for il in rec.layers))
            info = _rec_info(mem)
            secs.append(SectionSpec("rec", "recurrent", n_recurrent=len(rec.layers),
                                    ple=ple if any(ple) else None, layers=tuple(rec.layers),
                                    n_layer_model=info))
        return cls(_partial(secs) if partial else tuple(secs), fmt, mem.kind, bool(partial),
                   f"memory ({mem.kind})")

    @classmethod
    def coerce(cls, x: Any) -> Optional["Layout"]:
        """A Layout from a Layout, a memory kind name, a string such as "kv+kv+rec:2", or a
        list of ("kv", format, cell_ext) / ("rec", n_recurrent, ple) tuples."""
        if x is None or isinstance(x, Layout):
            return x
        if isinstance(x, str):
            if x in _KIND_SECTIONS and x not in ("recurrent", "hybrid", "hybrid_iswa"):
                return cls.of_kind(x)
            return cls.parse_text(x)
        secs = []
        fmt = None
        for t in x:
            t = tuple(t)
            if t[0] == "kv":
                if len(t) > 1 and t[1] is not None:
                    fmt = int(t[1])
                secs.append(SectionSpec("kv", cell_ext=bool(t[2]) if len(t) > 2 else False))
            elif t[0] in ("rec", "recurrent"):
                ple = tuple(bool(v) for v in t[2]) if len(t) > 2 and t[2] else None
                secs.append(SectionSpec("rec", n_recurrent=int(t[1]), ple=ple))
            else:
                raise E.InvalidArgumentError(f"unknown section kind {t[0]!r} (kv or rec)")
        return cls(tuple(secs), fmt, None, False, "explicit")

    @classmethod
    def parse_text(cls, text: str) -> "Layout":
        """``"kv"``, ``"kv+kv"``, ``"rec:2"``, ``"kv+rec:2"``, ``"kv+kv+rec:2"``, or a memory
        kind with its recurrent layer count (``"hybrid:2"``); ``@10`` selects format 10."""
        t = text.strip().lower()
        fmt = None
        if "@" in t:
            t, f = t.split("@", 1)
            fmt = int(f)
        head, _, n = t.partition(":")
        if head in _KIND_SECTIONS:
            return replace(cls.of_kind(head, int(n or 0), fmt), source=f"explicit ({text})")
        secs = []
        parts = head.split("+")
        for i, p in enumerate(parts):
            if p == "kv":
                secs.append(SectionSpec("kv"))
            elif p in ("rec", "recurrent"):
                if i != len(parts) - 1 or not n:
                    raise E.InvalidArgumentError(f"layout {text!r}: the recurrent section comes last and needs its "
                                                 "recurrent layer count, e.g. kv+rec:2")
                secs.append(SectionSpec("rec", n_recurrent=int(n)))
            else:
                raise E.InvalidArgumentError(f"layout {text!r}: unknown section {p!r} (kv or rec)")
        if not secs:
            raise E.InvalidArgumentError(f"empty layout {text!r}")
        return cls(tuple(secs), fmt, None, False, f"explicit ({text})")

    # -- description -------------------------------------------------------------------------
    @property
    def pattern(self) -> Tuple[str, ...]:
        return tuple(s.kind for s in self.sections)

    def describe(self) -> str:
        parts = []
        for s in self.sections:
            parts.append("KV" if s.kind == "kv" else f"REC({s.n_recurrent})")
        txt = " + ".join(parts) or "(no memory)"
        if self.kind:
            txt += f" [{self.kind}{', PARTIAL_ONLY' if self.partial else ''}]"
        elif self.pattern in _PATTERN_KINDS:
            txt += f" [{_PATTERN_KINDS[self.pattern]}]"
        if self.format:
            txt += f", format {self.format}"
        return txt

    def text(self) -> str:
        """The short text form accepted by :meth:`parse_text`."""
        head = "+".join(s.kind for s in self.sections)
        rec = [s for s in self.sections if s.kind == "rec"]
        if rec:
            head += f":{rec[0].n_recurrent}"
        return head + (f"@{self.format}" if self.format else "")


_HP_CACHE: Dict[tuple, Any] = {}


def _partial(secs: Sequence[SectionSpec]) -> Tuple[SectionSpec, ...]:
    """The sections of a PARTIAL_ONLY state: caches with a sliding window, and the recurrent
    state (b11739 writes nothing for a cache without a window)."""
    return tuple(s for s in secs if s.kind == "rec" or s.swa)


def _hparams(model: Any) -> Any:
    """The model's hyper-parameters (cached by path, size and modification time)."""
    from .gguf import Hparams, read_hparams

    if isinstance(model, Hparams):
        return model
    try:
        st = os.stat(model)
        key = (os.path.realpath(model), st.st_size, st.st_mtime_ns)
        hp = _HP_CACHE.get(key)
        if hp is None:
            hp = read_hparams(model)
            if len(_HP_CACHE) > 16:
                _HP_CACHE.clear()
            _HP_CACHE[key] = hp
        return hp
    except FileNotFoundError:
        raise StateError(f"model file not found: {os.fspath(model)}") from None
    except E.Error:
        raise
    except Exception as exc:  # a foreign or broken GGUF
        raise StateError(f"cannot read the model {os.fspath(model)!s}: {exc}") from None


def _rec_info(mem: Any) -> int:
    from ._native import ffi, lib

    info = ffi.new("pm_rec_info *")
    lib.pm_rec_info_get(mem._live(), info)
    return int(info.n_layer_model)


# ---------------------------------------------------------------------------------------------
# parsing sections
# ---------------------------------------------------------------------------------------------
def _check_kv(sec: KVSection, spec: SectionSpec, where: str, off: int) -> None:
    """Structural sanity beyond what the parser needs (garbage that happens to parse)."""
    first = None
    for s, st in enumerate(sec.streams):
        if not st.cells:
            continue
        for i, c in enumerate(st.cells):
            for q in c.seq_ids:
                if not 0 <= q < _MAX_SEQ:
                    raise StateError(f"{where}: stream {s} cell {i} has sequence id {q} (not in 0..255)")
            if len(set(c.seq_ids)) != len(c.seq_ids):
                raise StateError(f"{where}: stream {s} cell {i} lists a sequence id twice: {c.seq_ids}")
        if st.v_trans not in (0, 1):
            raise StateError(f"{where}: stream {s} v_trans is {st.v_trans} (0 or 1)")
        for name, r in (("k_rot", st.k_rot), ("v_rot", st.v_rot)):
            if r and (r & (r - 1) or r < 16 or r > 1 << 16):
                raise StateError(f"{where}: stream {s} {name} {r} is not 0 or a power of two >= 16")
        for l, L in enumerate(st.layers):
            if not 0 <= L.k_type < 64:
                raise StateError(f"{where}: stream {s} layer {l} K type {L.k_type} is not a ggml type")
            if _type_info(L.k_type) is not None and (L.k_row == 0 or _width(L.k_type, L.k_row) is None):
                raise StateError(f"{where}: stream {s} layer {l} K row of {L.k_row} bytes does not fit type "
                                 f"{_tname(L.k_type)}")
            if L.v_type is None:
                continue
            if not 0 <= L.v_type < 64:
                raise StateError(f"{where}: stream {s} layer {l} V type {L.v_type} is not a ggml type")
            ti = _type_info(L.v_type)
            if st.v_trans:
                if ti is not None and (ti[0] != 1 or ti[1] != L.v_row):
                    raise StateError(f"{where}: stream {s} layer {l} transposed V element size {L.v_row} does not "
                                     f"fit type {_tname(L.v_type)}")
            elif ti is not None and (L.v_row == 0 or _width(L.v_type, L.v_row) is None):
                raise StateError(f"{where}: stream {s} layer {l} V row of {L.v_row} bytes does not fit type "
                                 f"{_tname(L.v_type)}")
        geo = (st.v_trans, st.k_rot, st.v_rot, [(L.k_type, L.k_row, L.v_type, L.v_row, L.v_embd) for L in st.layers])
        if first is None:
            first = (s, geo)
        elif geo != first[1]:
            raise StateError(f"{where}: stream {s} has another layer layout than stream {first[0]}")
    if spec.layers is not None and first is not None and len(first[1][3]) != len(spec.layers):
        raise StateError(f"{where}: {len(first[1][3])} layers in the state, the model's cache has "
                         f"{len(spec.layers)} (a state of another model or memory kind?)")


def _check_rec(sec: RecSection, spec: SectionSpec, where: str) -> None:
    for i, c in enumerate(sec.cells):
        for q in c.seq_ids:
            if not 0 <= q < _MAX_SEQ:
                raise StateError(f"{where}: cell {i} has sequence id {q} (not in 0..255)")
        if len(set(c.seq_ids)) != len(c.seq_ids):
            raise StateError(f"{where}: cell {i} lists a sequence id twice: {c.seq_ids}")
    if sec.s_trans != 0:
        raise StateError(f"{where}: s_trans is {sec.s_trans} (llama.cpp writes 0)")
    if sec.n_layer < len(sec.layers) or sec.n_layer > 4096:
        raise StateError(f"{where}: n_layer {sec.n_layer} cannot hold {len(sec.layers)} recurrent layers")
    if spec.n_layer_model is not None and sec.n_layer != spec.n_layer_model:
        raise StateError(f"{where}: n_layer {sec.n_layer}, the model has {spec.n_layer_model} layers "
                         "(a state of another model?)")
    for l, L in enumerate(sec.layers):
        for what, t, row in (("r", L.r_type, L.r_row), ("s", L.s_type, L.s_row)):
            if not 0 <= t < 64:
                raise StateError(f"{where}: recurrent layer {l} {what} type {t} is not a ggml type")
            if _type_info(t) is not None and row and _width(t, row) is None:
                raise StateError(f"{where}: recurrent layer {l} {what} row of {row} bytes does not fit type "
                                 f"{_tname(t)}")


def _parse_one(mv: memoryview, off: int, spec: SectionSpec, fmt: int, where: str) -> Tuple[Any, int]:
    try:
        if spec.kind == "kv":
            sec, nxt = parse_kv(mv, off, format=fmt, cell_ext=spec.cell_ext, has_v=spec.has_v, copy=False)
            _check_kv(sec, spec, where, off)
        else:
            sec, nxt = parse_rec(mv, off, spec.n_recurrent, list(spec.ple) if spec.ple else None, copy=False)
            _check_rec(sec, spec, where)
    except StateError as exc:
        msg = str(exc)
        if not msg.startswith(where):
            msg = f"{where}: {msg}"
        raise StateError(msg) from None
    return sec, nxt


def _section_where(what: str, i: int, n: int, spec: SectionSpec, off: int) -> str:
    return f"{what}, section {i + 1} of {n} ({spec.label}) at offset {off}"


def _parse_sections(mv: memoryview, off: int, end: int, layout: Layout, fmt: int, what: str
                    ) -> Tuple[List[Any], List[int], int]:
    view = mv[:end]
    secs, offs = [], []
    n = len(layout.sections)
    for i, spec in enumerate(layout.sections):
        sec, nxt = _parse_one(view, off, spec, fmt, _section_where(what, i, n, spec, off))
        secs.append(sec)
        offs.append(off)
        off = nxt
    return secs, offs, off


def infer_layout(data: Any, format: Optional[int] = None, start: int = 0, end: Optional[int] = None,
                 what: str = "state", allow_prefix: bool = False) -> Layout:
    """The section layout of ``data[start:end]`` from the bytes alone: every layout llama.cpp
    can write (KV, KV+KV, REC, KV+REC, KV+KV+REC; any recurrent layer count; cells with or
    without ext; format 11 or 10 unless given) is tried, and exactly one must consume the
    bytes.  Raises :class:`LayoutAmbiguousError` when several do (interpretations that
    differ only where there are no cells count as one), StateError when none does (naming
    the longest attempt and where it stopped).  ``allow_prefix``: if none consumes all the
    bytes, take the one that consumes most (trailing bytes follow)."""
    mv = memoryview(data)
    end = len(mv) if end is None else end
    view = mv[:end]
    fmts = [int(format)] if format else [11, 10]
    found: Dict[tuple, Tuple[int, Layout]] = {}
    best: List[Tuple[int, str]] = [(-1, "")]
    kv_memo: Dict[tuple, Any] = {}

    def fail(off: int, msg: str) -> None:
        if off > best[0][0]:
            best[0] = (off, msg)

    def kv_at(off: int, fmt: int, ext: bool) -> Optional[Tuple[KVSection, int]]:
        key = (off, fmt, ext)
        if key not in kv_memo:
            try:
                kv_memo[key] = _parse_one(view, off, SectionSpec("kv", cell_ext=ext), fmt,
                                          f"KV section at offset {off}")
            except StateError as exc:
                kv_memo[key] = None
                fail(off, str(exc))
        return kv_memo[key]

    def rec_options(off: int) -> List[Tuple[int, RecSection, int]]:
        try:
            head, _ = parse_rec(view, off, 0, None, copy=False)
        except StateError as exc:
            fail(off, f"recurrent section at offset {off}: {exc}")
            return []
        out = []
        for n in range(1, min(head.n_layer, 4096) + 1):
            try:
                sec, nxt = _parse_one(view, off, SectionSpec("rec", n_recurrent=n), 11,
                                      f"recurrent section at offset {off}")
            except StateError as exc:
                fail(off, str(exc))
                break  # more layers need more bytes: they fail too
            if nxt != end:
                fail(nxt, f"{end - nxt} bytes left after a recurrent section with {n} recurrent layers "
                          f"(offset {nxt})")
            out.append((n, sec, nxt))
        return out

    def has_cells(sec: Any) -> bool:
        return any(st.cells for st in sec.streams) if isinstance(sec, KVSection) else bool(sec.cells)

    def record(stop: int, got: Tuple[Tuple[SectionSpec, Any], ...], fmt: int, ext: bool) -> None:
        kv_cells = any(has_cells(sec) for sp, sec in got if sp.kind == "kv")
        sig = tuple((sp.kind, sp.n_recurrent) for sp, _ in got) + ((fmt, ext) if kv_cells else (None, None),)
        if sig not in found:
            lay_fmt = fmt if kv_cells else fmts[0]
            specs = tuple(replace(sp, cell_ext=ext and kv_cells) if sp.kind == "kv" else sp for sp, _ in got)
            found[sig] = (stop, Layout(specs, lay_fmt, None, False, "inferred from the bytes"))

    for fmt in fmts:
        for ext in (False, True):
            stack: List[Tuple[int, Tuple[Tuple[SectionSpec, Any], ...]]] = [(start, ())]
            while stack:
                off, got = stack.pop()
                if got and (off == end or allow_prefix):
                    record(off, got, fmt, ext)
                if off >= end or (got and got[-1][0].kind == "rec"):
                    continue
                for n, sec, nxt in rec_options(off):
                    if nxt == end or allow_prefix:
                        stack.append((nxt, got + ((SectionSpec("rec", n_recurrent=n), sec),)))
                if sum(1 for sp, _ in got if sp.kind == "kv") < 2:
                    r = kv_at(off, fmt, ext)
                    if r is not None:
                        stack.append((r[1], got + ((SectionSpec("kv", cell_ext=ext), r[0]),)))
    cands = [x for x in found.values() if x[0] == end]
    if not cands and allow_prefix and found:
        top = max(x[0] for x in found.values())
        cands = [x for x in found.values() if x[0] == top]
    if not cands:
        off, msg = best[0]
        if off < 0:
            raise StateError(f"{what}: no memory sections found at offset {start}")
        raise StateError(f"{what}: no section layout parses these {end - start} bytes; the longest attempt "
                         f"stopped at offset {off}: {msg}")
    if len(cands) == 1:
        return cands[0][1]
    lays = [c[1] for c in cands]
    raise LayoutAmbiguousError(
        f"{what}: {len(lays)} section layouts parse these bytes: "
        + "; ".join(c.describe() + (" with cell ext" if any(s.cell_ext for s in c.sections) else "") for c in lays)
        + " (give the model, or an explicit layout)", lays)


# ---------------------------------------------------------------------------------------------
# memory state
# ---------------------------------------------------------------------------------------------
@dataclass
class SeqInfo:
    """One sequence in a section: positions, cells holding it and the data bytes of those
    cells (K+V rows, or r+s rows)."""

    seq_id: int
    pos_min: int
    pos_max: int
    cells: int
    bytes: int
    stream: Optional[int] = None
    section: int = 0

    def as_dict(self) -> Dict[str, Any]:
        d = {"seq_id": self.seq_id, "section": self.section, "pos_min": self.pos_min, "pos_max": self.pos_max,
             "cells": self.cells, "bytes": self.bytes}
        if self.stream is not None:
            d["stream"] = self.stream
        return d


def _kv_cell_bytes(st: KVStream) -> int:
    n = 0
    for L in st.layers:
        n += L.k_row
        if L.v_type is not None:
            n += L.v_row * (L.v_embd if st.v_trans else 1)
    return n


class MemoryState:
    """The memory sections of a state (bare, without envelope), parsed; ``dump()`` gives the
    bytes back.  ``sections`` are :class:`pymem._sections.KVSection` /
    :class:`~pymem._sections.RecSection` objects whose row data are zero-copy views of the
    source; ``specs`` their :class:`SectionSpec`; ``offsets`` where each started in the
    source; ``scope`` "whole" (a whole-memory state) or "seq" (one sequence's)."""

    def __init__(self, layout: Layout, sections: List[Any], offsets: List[int], format: int, scope: str,
                 seq_id: Optional[int] = None, flags: int = 0) -> None:
        self.layout = layout
        self.sections = sections
        self.offsets = offsets
        self.format = format
        self.scope = scope
        self.seq_id = seq_id
        self.flags = flags

    @property
    def specs(self) -> Tuple[SectionSpec, ...]:
        return self.layout.sections

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sections)

    def chunks(self) -> Iterator[bytes]:
        for s in self.sections:
            yield s.dump()

    def dump(self) -> bytes:
        return b"".join(self.chunks())

    # -- queries -----------------------------------------------------------------------------
    def kv_sections(self) -> List[Tuple[SectionSpec, KVSection]]:
        return [(sp, s) for sp, s in zip(self.specs, self.sections) if sp.kind == "kv"]

    def rec_section(self) -> Optional[RecSection]:
        for sp, s in zip(self.specs, self.sections):
            if sp.kind == "rec":
                return s
        return None

    def seq_ids(self) -> List[int]:
        ids = set()
        for sp, s in zip(self.specs, self.sections):
            cells = [c for st in s.streams for c in st.cells] if sp.kind == "kv" else s.cells
            for c in cells:
                ids.update(c.seq_ids)
        if self.scope == "seq" and self.seq_id is not None and self.rec_section() is not None and \
                self.rec_section().cells:
            ids.add(self.seq_id)
        return sorted(ids)

    def n_stream(self) -> Optional[int]:
        kvs = self.kv_sections()
        return len(kvs[0][1].streams) if kvs else None

    def max_cells(self) -> int:
        """The largest cell count of any KV stream or of the REC section."""
        n = 0
        for sp, s in zip(self.specs, self.sections):
            if sp.kind == "kv":
                n = max([n] + [len(st.cells) for st in s.streams])
            else:
                n = max(n, len(s.cells))
        return n

    def geometry(self) -> Dict[str, Any]:
        """What the bytes say about the memory that wrote them: n_stream, v_trans, K/V types,
        k_rot/v_rot, layer widths per KV section; recurrent layer count, row widths and the
        model's layer count.  Values are None where no cell carries the information."""
        g: Dict[str, Any] = {"kv": [], "rec": None}
        for sp, s in zip(self.specs, self.sections):
            if sp.kind == "kv":
                st = next((x for x in s.streams if x.cells), None)
                d = {"n_stream": len(s.streams), "v_trans": None, "type_k": None, "type_v": None, "k_rot": None,
                     "v_rot": None, "layers": None}
                if st is not None:
                    d.update(v_trans=bool(st.v_trans), k_rot=st.k_rot, v_rot=st.v_rot,
                             layers=[(L.k_type, _width(L.k_type, L.k_row),
                                      L.v_type, (L.v_embd if st.v_trans else _width(L.v_type, L.v_row))
                                      if L.v_type is not None else 0) for L in st.layers])
                    if st.layers:
                        d["type_k"] = st.layers[0].k_type
                        d["type_v"] = st.layers[0].v_type
                g["kv"].append(d)
            else:
                g["rec"] = {"n_layer_model": s.n_layer, "n_recurrent": len(s.layers),
                            "layers": [(L.r_type, _width(L.r_type, L.r_row) if L.r_row else 0,
                                        L.s_type, _width(L.s_type, L.s_row) if L.s_row else 0,
                                        _width(L.r_type, L.p_row) if L.p_row else 0) for L in s.layers]}
        return g

    def sequences(self) -> Dict[int, List[SeqInfo]]:
        """Per sequence id, one :class:`SeqInfo` per section (and stream) holding it."""
        out: Dict[int, List[SeqInfo]] = {}
        for i, (sp, s) in enumerate(zip(self.specs, self.sections)):
            if sp.kind == "kv":
                for si, st in enumerate(s.streams):
                    per = _kv_cell_bytes(st)
                    acc: Dict[int, List[int]] = {}
                    for c in st.cells:
                        for q in c.seq_ids:
                            a = acc.setdefault(q, [c.pos, c.pos, 0])
                            a[0] = min(a[0], c.pos)
                            a[1] = max(a[1], c.pos)
                            a[2] += 1
                    for q, (p0, p1, n) in acc.items():
                        out.setdefault(q, []).append(SeqInfo(q, p0, p1, n, n * per,
                                                             si if len(s.streams) > 1 else None, i))
            else:
                per = sum(L.r_row + L.s_row + (L.p_row or 0) for L in s.layers)
                for c in s.cells:
                    ids = c.seq_ids or ([self.seq_id] if self.scope == "seq" and self.seq_id is not None else [])
                    for q in ids:
                        out.setdefault(q, []).append(SeqInfo(q, c.pos, c.pos, 1, per, None, i))
        return dict(sorted(out.items()))

    def n_cells(self) -> int:
        """Cells over every section and stream."""
        return sum(sum(len(st.cells) for st in s.streams) if sp.kind == "kv" else len(s.cells)
                   for sp, s in zip(self.specs, self.sections))

    def summary(self, cells: Optional[bool] = None) -> Dict[str, Any]:
        """A JSON-able description of every section.  ``cells``: include the cell lists
        ([pos, [seq ids]] per cell; default: when there are at most 4096 cells)."""
        if cells is None:
            cells = self.n_cells() <= 4096
        secs = []
        for i, (sp, s, off) in enumerate(zip(self.specs, self.sections, self.offsets)):
            d: Dict[str, Any] = {"index": i, "name": sp.name or None, "kind": sp.kind, "offset": off,
                                 "bytes": s.nbytes}
            if sp.kind == "kv":
                d["n_stream"] = len(s.streams)
                d["streams"] = []
                for si, st in enumerate(s.streams):
                    sd: Dict[str, Any] = {"stream": si, "cells": len(st.cells)}
                    if st.cells:
                        pos = [c.pos for c in st.cells]
                        sd.update(pos_min=min(pos), pos_max=max(pos), v_trans=st.v_trans, k_rot=st.k_rot,
                                  v_rot=st.v_rot, n_layer=len(st.layers),
                                  shared_cells=sum(1 for c in st.cells if len(c.seq_ids) > 1),
                                  layers=[{
                                      "index": l,
                                      "model_layer": sp.layers[l] if sp.layers and l < len(sp.layers) else None,
                                      "k_type": _tname(L.k_type), "k_row": L.k_row,
                                      "n_embd_k": _width(L.k_type, L.k_row),
                                      "v_type": _tname(L.v_type),
                                      "v_row": None if st.v_trans else L.v_row,
                                      "v_element": L.v_row if st.v_trans else None,
                                      "n_embd_v": L.v_embd if st.v_trans else
                                      (_width(L.v_type, L.v_row) if L.v_type is not None else None),
                                  } for l, L in enumerate(st.layers)])
                        if cells:
                            sd["cell_list"] = [[c.pos, list(c.seq_ids)] + ([list(c.ext)] if c.ext else [])
                                               for c in st.cells]
                        else:
                            sd["cell_list_omitted"] = True
                    d["streams"].append(sd)
            else:
                d.update(cells=len(s.cells), s_trans=s.s_trans, n_layer_model=s.n_layer,
                         n_recurrent=len(s.layers),
                         layers=[{"index": l, "model_layer": sp.layers[l] if sp.layers else None,
                                  "r_type": _tname(L.r_type), "r_row": L.r_row, "s_type": _tname(L.s_type),
                                  "s_row": L.s_row, "p_row": L.p_row} for l, L in enumerate(s.layers)])
                if cells:
                    d["cell_list"] = [[c.pos, list(c.seq_ids)] for c in s.cells]
                else:
                    d["cell_list_omitted"] = True
            secs.append(d)
        seqs = {}
        for q, infos in self.sequences().items():
            seqs[str(q)] = {"pos_min": max(x.pos_min for x in infos) if len(infos) > 1 else infos[0].pos_min,
                            "pos_max": max(x.pos_max for x in infos), "bytes": sum(x.bytes for x in infos),
                            "sections": [x.as_dict() for x in infos]}
        return {"layout": self.layout.describe(), "layout_source": self.layout.source, "format": self.format,
                "scope": self.scope, "bytes": self.nbytes, "sections": secs, "sequences": seqs}


# ---------------------------------------------------------------------------------------------
# containers
# ---------------------------------------------------------------------------------------------
def _read_file(path: PathLike, progress: Progress = None) -> bytearray:
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise E.StateFileError(f"{p}: is a directory")
        buf = bytearray(size)
        mv = memoryview(buf)
        done = 0
        with open(p, "rb") as f:
            while done < size:
                n = f.readinto(mv[done:done + _CHUNK])
                if not n:
                    break
                done += n
                if progress:
                    progress(done, size)
        if done != size:
            del mv
            buf = buf[:done]
        return buf
    except FileNotFoundError:
        raise E.StateFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise E.StateFileError(f"{p}: is a directory") from None
    except PermissionError:
        raise E.StateFileError(f"{p}: permission denied") from None
    except OSError as exc:
        raise E.StateFileError(f"{p}: {exc.strerror or exc}") from None


def _atomic_write(path: PathLike, chunks: Iterable[bytes], total: int, progress: Progress = None) -> None:
    """Write to a temporary file next to ``path`` and rename it over ``path``: either the whole
    new file is there or nothing changed."""
    p = Path(path)
    d = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=d)
    except OSError as exc:
        raise E.StateFileError(f"{p}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            done = 0
            for c in chunks:
                mv = memoryview(c)
                for i in range(0, len(mv), _CHUNK):
                    f.write(mv[i:i + _CHUNK])
                    done += min(_CHUNK, len(mv) - i)
                    if progress:
                        progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        except OSError:
            pass
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise E.StateFileError(f"{p}: cannot write: {exc.strerror or exc}") from None
        raise


class _Saved:
    """Common behaviour of parsed states."""

    state: MemoryState
    arch: Optional[str]
    what: str = "state"
    trailing: bytes = b""

    def __init__(self, state: MemoryState, arch: Optional[str], trailing: bytes) -> None:
        self.state = state
        self.arch = arch
        self.trailing = trailing
        self.edit_path: Optional[str] = None   # set by edit(): which way it edited, and notes
        self.edit_notes: List[str] = []

    # implemented by subclasses
    def chunks(self) -> Iterator[bytes]:  # pragma: no cover
        raise NotImplementedError

    def dump(self) -> bytes:
        """The bytes, identical to those parsed (for an unedited object)."""
        return b"".join(self.chunks())

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self._header_chunks()) + self.state.nbytes + len(self.trailing)

    def _header_chunks(self) -> List[bytes]:  # pragma: no cover
        return []

    def save(self, path: PathLike, progress: Progress = None) -> None:
        """Write the bytes to ``path`` (via a temporary file and a rename)."""
        _atomic_write(path, self.chunks(), self.nbytes, progress)

    @property
    def format(self) -> int:
        return self.state.format

    @property
    def layout(self) -> Layout:
        return self.state.layout

    def sequences(self) -> Dict[int, List[SeqInfo]]:
        return self.state.sequences()

    def summary(self, cells: Optional[bool] = None) -> Dict[str, Any]:
        """A JSON-able description (see :meth:`MemoryState.summary`)."""
        d = {"type": self.what, "bytes": self.nbytes, "arch": self.arch}
        d.update(self._extra_summary())
        d["memory"] = self.state.summary(cells)
        if self.trailing:
            d["trailing_bytes"] = len(self.trailing)
        return d

    def _extra_summary(self) -> Dict[str, Any]:
        return {}

    def describe(self, width: int = 64, cells: bool = True) -> str:
        """A readable multi-line summary with a picture of cell occupancy per stream."""
        return _describe(self, width, cells)

    # -- memory ------------------------------------------------------------------------------
    def _read_args(self) -> Tuple[int, int]:
        """(seq_id for state_read, flags)."""
        if self.state.scope == "whole":
            return -1, 0
        return (self.state.seq_id if self.state.seq_id is not None else 0), self.state.flags

    def to_memory(self, model: Any = None, seq_id: Optional[int] = None, n_seq_max: Optional[int] = None) -> Any:
        """A pymem memory holding this state.

        ``model``: a GGUF path (the memory :func:`pymem.from_gguf` builds for it, with the
        parameters the bytes imply: unified = one stream, n_seq_max = streams or highest
        sequence id + 1, flash_attn = not v_trans, K/V types, and a context just large
        enough; see :func:`memory_params`), an existing pymem memory (restored into as
        is), or None (a memory with the blob's own geometry: no RoPE, so it cannot shift).
        ``seq_id``: for a sequence state, the sequence to restore into (default: its own)."""
        s_id, flags = self._read_args()
        if seq_id is not None:
            s_id = int(seq_id)
        from .memory import Memory

        if isinstance(model, Memory):
            mem = model
        else:
            mem = _build_memory(self.state, model, self.arch, extra_ids=[s_id] if s_id >= 0 else [],
                                n_seq_max=n_seq_max)
        _state_read(mem, self.state, s_id, flags, self.what)
        return mem

    # -- edits -------------------------------------------------------------------------------
    def edit(self, ops: Sequence[Any], model: Any = None) -> "_Saved":
        """A new object of the same type with ``ops`` applied in order (see :class:`Op`).
        ``model`` (GGUF path) selects the model path; without it the structure path runs
        (no seq_add / seq_div on attention caches).  ``result.edit_path`` says which ran.
        Raises :class:`EditError` for an edit llama.cpp would refuse."""
        ops = [Op.coerce(o) for o in ops]
        tokens = list(getattr(self, "tokens", []) or [])
        s_id, flags = self._read_args()
        out_seq = s_id
        run: List[Op] = []
        for op in ops:
            if op.name == "truncate":
                n = op.args[0]
                if n < 0:
                    raise EditError(f"truncate {n}: the token count must be >= 0")
                if hasattr(self, "tokens") and n > len(tokens):
                    raise EditError(f"truncate {n}: the {self.what} holds only {len(tokens)} tokens")
                tokens = tokens[:n]
            run.append(op)
        if self.state.scope == "seq":
            if self.state.seq_id is None:
                # the bytes do not record the sequence (a purely recurrent sequence file): it is
                # the one the operations name
                s_id = next((i for op in run for i in op.seq_args() if i >= 0), 0)
            run, out_seq = _seq_scope_ops(run, s_id, self.what)
        ids = [i for op in run for i in op.seq_args() if i >= 0] + ([out_seq] if out_seq >= 0 else [])
        path = "model" if model is not None else "structure"
        from .gguf import Hparams

        if model is not None and not isinstance(model, (str, os.PathLike, Hparams)):
            raise E.InvalidArgumentError(f"model must be a GGUF path, not {type(model).__name__}")
        try:
            mem = _build_memory(self.state, model, self.arch, extra_ids=ids)
        except E.UnsupportedError as exc:
            raise EditError(f"cannot build a memory for this state: {exc}") from None
        try:
            _state_read(mem, self.state, s_id, flags, self.what)
            notes = apply_ops(mem, run, structure_only=model is None)
            new_sec = mem.state_write(seq_id=out_seq, flags=flags) if self.state.scope == "seq" \
                else mem.state_write()
        finally:
            mem.close()
        if self.state.scope == "seq" and self.state.layout.pattern[:2] == ("kv", "kv") and \
                any(op.name in ("seq_rm", "seq_add", "seq_div") for op in run):
            (_, base), (_, swa) = self.state.kv_sections()[:2]
            if sum(len(x.cells) for x in base.streams) > sum(len(x.cells) for x in swa.streams):
                notes.append("this sequence state omits the SWA cells outside the window (llama.cpp does not save "
                             "them): positions an edit brings back into the window have no SWA cells")
        res = self._rebuild(new_sec, tokens, out_seq)
        res.edit_path = path
        res.edit_notes = notes
        return res

    def _rebuild(self, sec: bytes, tokens: List[int], seq_id: int) -> "_Saved":  # pragma: no cover
        raise NotImplementedError

    def _new_state(self, sec: bytes, seq_id: Optional[int]) -> MemoryState:
        lay = self.state.layout
        secs, offs, end = _parse_sections(memoryview(sec), 0, len(sec), lay, self.state.format, "edited state")
        if end != len(sec):
            raise StateError(f"edited state: {len(sec) - end} bytes left over at offset {end}")  # pragma: no cover
        return MemoryState(lay, secs, offs, self.state.format, self.state.scope, seq_id, self.state.flags)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Saved) and type(other) is type(self) and self.dump() == other.dump()

    __hash__ = None  # type: ignore[assignment]


def _seq_scope_ops(ops: List["Op"], s: int, what: str) -> Tuple[List["Op"], int]:
    """Map the operations on a one-sequence state to the sequence it holds."""
    out = []
    cur = s
    for op in ops:
        a = list(op.args)
        if op.name == "truncate":
            out.append(Op("seq_rm", (cur, a[0], -1)))
            continue
        if op.name in ("seq_rm", "seq_keep", "seq_add", "seq_div"):
            if a[0] == -1 and op.name == "seq_rm":
                a[0] = cur
            if a[0] != cur:
                raise EditError(f"{op}: this {what} holds sequence {cur} only")
            out.append(Op(op.name, tuple(a)))
        elif op.name == "seq_mv":
            if a[0] != cur:
                raise EditError(f"{op}: this {what} holds sequence {cur} only")
            out.append(Op("seq_mv", tuple(a)))
            cur = a[1]
        else:
            raise EditError(f"{op}: a {what} holds one sequence; {op.name} needs a whole state "
                            "(a session file or a context blob)")
    return out, cur


class Session(_Saved):
    """A session file (``llama_state_save_file``): ``magic`` 'ggsn', ``version`` (11 for
    b11739, 10 for llama-cpp-python 0.3.36), ``tokens``, ``arch`` and the memory's whole
    state (``state``, a :class:`MemoryState`)."""

    what = "session file"

    def __init__(self, version: int, tokens: List[int], arch: str, state: MemoryState,
                 trailing: bytes = b"") -> None:
        super().__init__(state, arch, trailing)
        self.magic = MAGIC_SESSION
        self.version = version
        self.tokens = tokens

    @classmethod
    def load(cls, path: PathLike, model: Any = None, layout: Any = None, strict: bool = True,
             progress: Progress = None) -> "Session":
        """Read a session file.  ``model`` (GGUF) or ``layout`` give the section layout
        where the bytes alone cannot.  ``strict``: reject trailing bytes after the state,
        as llama_state_load_file does ("did not read all of the session file data");
        otherwise keep them in ``trailing``."""
        return cls.parse(_read_file(path, progress), model, layout, strict, name=os.fspath(path))

    @classmethod
    def parse(cls, data: Any, model: Any = None, layout: Any = None, strict: bool = True,
              name: str = "") -> "Session":
        mv = memoryview(data)
        what = f"session file {name}".strip() if name else "session file"
        _expect_magic(mv, MAGIC_SESSION, what)
        version = _u32(mv, 4) if len(mv) >= 8 else None
        if version is None:
            raise StateError(f"truncated {what}: the version needs 4 bytes at offset 4, {len(mv) - 4} left")
        if version not in SESSION_VERSIONS:
            raise StateError(f"{what}: version {version} at offset 4 is not supported (10 or 11; llama.cpp "
                             "b11739 loads only 11)")
        fmt = SESSION_VERSIONS[version]
        tokens, off = _read_tokens(mv, 8, what)
        arch, off = _read_arch(mv, off, what)
        try:
            st, end = _parse_state(mv, off, len(mv), fmt, model, layout, "whole", what, arch=arch)
        except StateError as exc:
            if isinstance(exc, LayoutAmbiguousError):
                raise
            try:
                st, end = _parse_state(mv, off, len(mv), fmt, model, layout, "whole", what, allow_trailing=True,
                                       arch=arch)
            except StateError as exc2:
                raise exc2 from None
            if strict:
                raise StateError(f"{what}: {len(mv) - end} bytes after the state ({st.layout.describe()}) at offset "
                                 f"{end}: llama_state_load_file rejects the file ('did not read all of the session "
                                 "file data'), after having replaced the memory") from None
        trailing = bytes(mv[end:])
        return cls(version, tokens, arch, st, trailing)

    def _header_chunks(self) -> List[bytes]:
        a = self.arch.encode()
        return [struct.pack("<III", self.magic, self.version, len(self.tokens)),
                struct.pack(f"<{len(self.tokens)}i", *self.tokens), struct.pack("<I", len(a)) + a]

    def chunks(self) -> Iterator[bytes]:
        yield from self._header_chunks()
        yield from self.state.chunks()
        if self.trailing:
            yield self.trailing

    def context_blob(self) -> bytes:
        """The ``llama_state_get_data`` blob inside the file."""
        return wrap_context(self.arch, self.state.dump())

    def _extra_summary(self) -> Dict[str, Any]:
        return {"magic": "ggsn", "version": self.version, "n_tokens": len(self.tokens), "tokens": list(self.tokens)}

    def _rebuild(self, sec: bytes, tokens: List[int], seq_id: int) -> "Session":
        return Session(self.version, tokens, self.arch, self._new_state(sec, None))

    @classmethod
    def from_memory(cls, mem: Any, tokens: Sequence[int] = (), version: Optional[int] = None,
                    arch: Optional[str] = None) -> "Session":
        """The session file ``llama_state_save_file`` writes for a context holding ``mem``
        (its whole state) and ``tokens``.  ``version`` defaults to the memory's format."""
        lay = Layout.from_memory(mem)
        fmt = lay.format or (SESSION_VERSIONS[version] if version else 11)
        if version is None:
            version = _SESSION_OF_FORMAT[fmt]
        if SESSION_VERSIONS.get(version) != fmt:
            raise E.InvalidArgumentError(f"session version {version} needs state format {SESSION_VERSIONS.get(version)}, "
                                         f"the memory writes format {fmt}")
        a = arch or mem.arch
        if not a:
            raise E.InvalidArgumentError("the memory has no arch: pass arch=")
        sec = mem.state_write()
        st = _state_from(sec, replace(lay, format=fmt), fmt, "whole", None, 0)
        return cls(version, [int(t) for t in tokens], a, st)

    def with_version(self, version: int) -> "Session":
        """The same session as a file of another version (11 <-> 10): the KV sections gain or
        lose the k_rot / v_rot words (10 has none, so a rotated cache cannot go to 10)."""
        if version not in SESSION_VERSIONS:
            raise E.InvalidArgumentError(f"session version {version} (10 or 11)")
        st = _convert_format(self.state, SESSION_VERSIONS[version])
        return Session(version, list(self.tokens), self.arch, st)


class SeqState(_Saved):
    """A sequence state file (``llama_state_seq_save_file``): 'ggsq', ``version`` (4 for
    b11739, 3 for 0c1e570), ``tokens`` and one sequence's state.  The file does not record
    the sequence id; ``seq_id`` is the id its KV cells carry (None for a purely recurrent
    state, which then counts as sequence 0)."""

    what = "sequence state file"

    def __init__(self, version: int, tokens: List[int], state: MemoryState, trailing: bytes = b"") -> None:
        super().__init__(state, None, trailing)
        self.magic = MAGIC_SEQ_FILE
        self.version = version
        self.tokens = tokens

    @property
    def seq_id(self) -> Optional[int]:
        return self.state.seq_id

    @classmethod
    def load(cls, path: PathLike, model: Any = None, layout: Any = None, strict: bool = False,
             progress: Progress = None) -> "SeqState":
        """Read a sequence state file.  Trailing bytes after the state are kept in
        ``trailing`` (llama_state_seq_load_file ignores them); ``strict`` rejects them."""
        return cls.parse(_read_file(path, progress), model, layout, strict, name=os.fspath(path))

    @classmethod
    def parse(cls, data: Any, model: Any = None, layout: Any = None, strict: bool = False,
              name: str = "") -> "SeqState":
        mv = memoryview(data)
        what = f"sequence state file {name}".strip() if name else "sequence state file"
        _expect_magic(mv, MAGIC_SEQ_FILE, what)
        if len(mv) < 8:
            raise StateError(f"truncated {what}: the version needs 4 bytes at offset 4, {len(mv) - 4} left")
        version = _u32(mv, 4)
        if version not in SEQ_FILE_VERSIONS:
            raise StateError(f"{what}: version {version} at offset 4 is not supported (3 or 4; llama.cpp "
                             "b11739 loads only 4)")
        fmt = SEQ_FILE_VERSIONS[version]
        tokens, off = _read_tokens(mv, 8, what)
        st, end = _parse_state(mv, off, len(mv), fmt, model, layout, "seq", what, allow_trailing=True)
        trailing = bytes(mv[end:])
        if trailing and strict:
            raise StateError(f"{what}: {len(trailing)} bytes after the state at offset {end}")
        return cls(version, tokens, st, trailing)

    def _header_chunks(self) -> List[bytes]:
        return [struct.pack("<III", self.magic, self.version, len(self.tokens)),
                struct.pack(f"<{len(self.tokens)}i", *self.tokens)]

    def chunks(self) -> Iterator[bytes]:
        yield from self._header_chunks()
        yield from self.state.chunks()
        if self.trailing:
            yield self.trailing

    def seq_blob(self, seq_id: Optional[int] = None) -> bytes:
        """The ``llama_state_seq_get_data`` blob of this state."""
        return wrap_seq(self.seq_id if seq_id is None and self.seq_id is not None else (seq_id or 0),
                        self.state.dump())

    def _extra_summary(self) -> Dict[str, Any]:
        return {"magic": "ggsq", "version": self.version, "seq_id": self.seq_id, "n_tokens": len(self.tokens),
                "tokens": list(self.tokens)}

    def _rebuild(self, sec: bytes, tokens: List[int], seq_id: int) -> "SeqState":
        return SeqState(self.version, tokens, self._new_state(sec, seq_id))

    def with_version(self, version: int) -> "SeqState":
        """The same state as a file of another version (4 <-> 3; see Session.with_version)."""
        if version not in SEQ_FILE_VERSIONS:
            raise E.InvalidArgumentError(f"sequence file version {version} (3 or 4)")
        st = _convert_format(self.state, SEQ_FILE_VERSIONS[version])
        return SeqState(version, list(self.tokens), st, self.trailing)

    @classmethod
    def from_memory(cls, mem: Any, seq_id: int, tokens: Sequence[int] = (), version: Optional[int] = None
                    ) -> "SeqState":
        """The file ``llama_state_seq_save_file`` writes for sequence ``seq_id``."""
        lay = Layout.from_memory(mem)
        fmt = lay.format or 11
        if version is None:
            version = _SEQ_FILE_OF_FORMAT[fmt]
        if SEQ_FILE_VERSIONS.get(version) != fmt:
            raise E.InvalidArgumentError(f"sequence file version {version} needs state format "
                                         f"{SEQ_FILE_VERSIONS.get(version)}, the memory writes format {fmt}")
        sec = mem.state_write(seq_id=seq_id)
        st = _state_from(sec, replace(lay, format=fmt), fmt, "seq", seq_id, 0)
        return cls(version, [int(t) for t in tokens], st)


class Blob(_Saved):
    """A raw state: ``envelope`` "context" (``llama_state_get_data``: ``arch`` + whole
    state), "seq" (``llama_state_seq_get_data``: ``seq_id`` + one sequence's state, with
    ``flags``) or None (bare memory sections; ``state.scope`` says whole or seq)."""

    def __init__(self, envelope: Optional[str], state: MemoryState, arch: Optional[str] = None,
                 seq_id: Optional[int] = None, trailing: bytes = b"") -> None:
        super().__init__(state, arch, trailing)
        self.envelope = envelope
        self.seq_id = seq_id

    @property
    def what(self) -> str:  # type: ignore[override]
        return {"context": "context blob", "seq": "sequence blob"}.get(self.envelope or "", "memory sections")

    @classmethod
    def parse(cls, data: Any, model: Any = None, layout: Any = None, envelope: Optional[str] = "auto",
              scope: Optional[str] = None, flags: Optional[int] = None, name: str = "",
              allow_trailing: bool = False) -> "Blob":
        """Parse a raw blob.  ``envelope``: "context", "seq", None (bare sections) or "auto"
        (by the first bytes).  ``scope`` of bare sections: "whole" or "seq" (default:
        "seq" when recurrent cells carry no ids, else "whole").  ``flags``: 1 for a
        PARTIAL_ONLY sequence blob (default: tried when the model's full layout does not
        parse)."""
        mv = memoryview(data)
        if envelope == "auto":
            if len(mv) >= 4 and _u32(mv, 0) == MAGIC_SEQ_BLOB:
                envelope = "seq"
            elif _looks_like_arch(mv):
                envelope = "context"
            else:
                envelope = None
        label = {"context": "context blob", "seq": "sequence blob"}.get(envelope or "", "memory sections")
        what = f"{label} {name}".strip() if name else label
        arch = None
        seq_id = None
        off = 0
        if envelope == "context":
            arch, off = _read_arch(mv, 0, what)
            scope = "whole"
        elif envelope == "seq":
            if len(mv) < 8:
                raise StateError(f"truncated {what}: the envelope needs 8 bytes at offset 0, {len(mv)} left")
            if _u32(mv, 0) != MAGIC_SEQ_BLOB:
                raise StateError(f"{what}: magic 0x{_u32(mv, 0):08x} at offset 0 is not 0x{MAGIC_SEQ_BLOB:08x}")
            seq_id = struct.unpack_from("<i", mv, 4)[0]
            off = 8
            scope = "seq"
        elif envelope is not None:
            raise E.InvalidArgumentError(f"envelope {envelope!r} (context, seq, None or auto)")
        st, end = _parse_state(mv, off, len(mv), None, model, layout, scope, what, allow_trailing=allow_trailing,
                               arch=arch, seq_id=seq_id, flags=flags)
        return cls(envelope, st, arch, seq_id, bytes(mv[end:]))

    def _header_chunks(self) -> List[bytes]:
        if self.envelope == "context":
            a = (self.arch or "").encode()
            return [struct.pack("<I", len(a)) + a]
        if self.envelope == "seq":
            return [struct.pack("<Ii", MAGIC_SEQ_BLOB, self.seq_id or 0)]
        return []

    def chunks(self) -> Iterator[bytes]:
        yield from self._header_chunks()
        yield from self.state.chunks()
        if self.trailing:
            yield self.trailing

    def _extra_summary(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"envelope": self.envelope}
        if self.envelope == "seq":
            d["seq_id"] = self.seq_id
            d["flags"] = self.state.flags
        return d

    def _rebuild(self, sec: bytes, tokens: List[int], seq_id: int) -> "Blob":
        st = self._new_state(sec, seq_id if self.state.scope == "seq" else None)
        return Blob(self.envelope, st, self.arch, seq_id if self.envelope == "seq" else self.seq_id)

    @classmethod
    def from_memory(cls, mem: Any, seq_id: int = -1, flags: int = 0, envelope: Optional[str] = "auto") -> "Blob":
        """llama.cpp's blob of a memory: whole (``llama_state_get_data``) for seq_id -1, else
        ``llama_state_seq_get_data_ext(seq_id, flags)``; ``envelope=None`` for bare sections."""
        lay = Layout.from_memory(mem, partial=bool(flags & 1) and seq_id >= 0)
        fmt = lay.format or 11
        sec = mem.state_write(seq_id=seq_id, flags=flags)
        scope = "whole" if seq_id < 0 else "seq"
        st = _state_from(sec, replace(lay, format=fmt), fmt, scope, seq_id if seq_id >= 0 else None, flags)
        if envelope == "auto":
            envelope = "context" if seq_id < 0 else "seq"
        if envelope == "context" and not mem.arch:
            raise E.InvalidArgumentError("the memory has no arch: a context blob needs one")
        return cls(envelope, st, mem.arch if envelope == "context" else None,
                   seq_id if envelope == "seq" else None)


# ---------------------------------------------------------------------------------------------
# shared parsing
# ---------------------------------------------------------------------------------------------
def _expect_magic(mv: memoryview, magic: int, what: str) -> None:
    if len(mv) < 4:
        raise StateError(f"truncated {what}: the magic needs 4 bytes at offset 0, {len(mv)} left")
    m = _u32(mv, 0)
    if m != magic:
        hint = _guess_kind(mv)
        raise StateError(f"{what}: magic 0x{m:08x} at offset 0 is not 0x{magic:08x} "
                         f"('{struct.pack('<I', magic)[::-1].decode()}')" + (f"; this looks like a {hint}" if hint else ""))


def _guess_kind(mv: memoryview) -> str:
    if len(mv) >= 4:
        m = _u32(mv, 0)
        if m == MAGIC_SESSION:
            return "session file"
        if m == MAGIC_SEQ_FILE:
            return "sequence state file"
        if m == MAGIC_SEQ_BLOB:
            return "sequence blob"
        if bytes(mv[:4]) == b"GGUF":
            return "GGUF model file, not a state"
        if _looks_like_arch(mv):
            return "context blob"
    return ""


def _read_tokens(mv: memoryview, off: int, what: str) -> Tuple[List[int], int]:
    if len(mv) - off < 4:
        raise StateError(f"truncated {what}: the token count needs 4 bytes at offset {off}, {len(mv) - off} left")
    n = _u32(mv, off)
    off += 4
    if n * 4 > len(mv) - off:
        raise StateError(f"{what}: token count {n} at offset {off - 4} needs {4 * n} bytes, "
                         f"{len(mv) - off} left (truncated or corrupt)")
    toks = list(struct.unpack_from(f"<{n}i", mv, off))
    return toks, off + 4 * n


def _seq_of_cells(secs: List[Any], specs: Sequence[SectionSpec]) -> Optional[int]:
    for sp, s in zip(specs, secs):
        if sp.kind == "kv":
            for st in s.streams:
                for c in st.cells:
                    if c.seq_ids:
                        return c.seq_ids[0]
    return None


def _state_from(sec: bytes, layout: Layout, fmt: int, scope: str, seq_id: Optional[int], flags: int) -> MemoryState:
    secs, offs, end = _parse_sections(memoryview(sec), 0, len(sec), layout, fmt, "state")
    return MemoryState(layout, secs, offs, fmt, scope, seq_id, flags)


def _parse_state(mv: memoryview, off: int, end: int, fmt: Optional[int], model: Any, layout: Any,
                 scope: Optional[str], what: str, allow_trailing: bool = False, arch: Optional[str] = None,
                 seq_id: Optional[int] = None, flags: Optional[int] = None) -> Tuple[MemoryState, int]:
    """Parse the memory sections at ``off``.  Layout: explicit > model > inferred."""
    lay = Layout.coerce(layout)
    candidates: List[Layout] = []
    if lay is not None:
        candidates = [lay]
    elif model is not None:
        hp = _hparams(model)
        if arch is not None and hp.arch != arch:
            raise StateError(f"{what}: saved by a '{arch}' model, the model is '{hp.arch}' "
                             f"(llama.cpp: wrong model arch)")
        full = Layout.from_model(hp)
        candidates = [full]
        if scope != "whole" and flags is None:
            part = Layout.from_model(hp, partial=True)
            if part.sections != full.sections:
                candidates.append(part)
        elif flags is not None and flags & 1:
            candidates = [Layout.from_model(hp, partial=True)]
        src = f"model {Path(os.fspath(model)).name}" if isinstance(model, (str, os.PathLike)) else f"model ({hp.arch})"
        candidates = [replace(c, source=src) for c in candidates]
    elif off == end:
        # a context without memory writes nothing after the architecture name
        f = fmt or 11
        return MemoryState(Layout((), f, None, False, "empty"), [], [], f, scope or "whole", seq_id, flags or 0), end
    else:
        try:
            candidates = [infer_layout(mv, fmt, off, end, what)]
        except LayoutAmbiguousError:
            raise
        except StateError as exc:
            if not allow_trailing:
                raise
            # trailing bytes, or a truncated / corrupt state?  The bytes alone cannot tell
            try:
                lay = infer_layout(mv, fmt, off, end, what, allow_prefix=True)
                _, _, stop = _parse_sections(mv, off, end, lay, lay.format or fmt or 11, what)
            except StateError:
                raise exc from None
            raise StateError(f"{what}: the bytes parse only partly: as {lay.describe()} up to offset {stop}, "
                             f"leaving {end - stop} bytes: a truncated or corrupt state, or trailing bytes (give "
                             "the model to tell)") from None
    errors: List[StateError] = []
    results = []
    for cand in candidates:
        fmts = [fmt] if fmt else ([cand.format] if cand.format else [11, 10])
        for f in fmts:
            try:
                secs, offs, stop = _parse_sections(mv, off, end, cand, f, what)
            except StateError as exc:
                errors.append(exc)
                continue
            if stop != end and not allow_trailing:
                errors.append(StateError(f"{what}: {end - stop} unexpected bytes after the last section, at offset "
                                         f"{stop} (layout {cand.describe()})"))
                continue
            results.append((stop, cand, f, secs, offs))
    if not results:
        raise _best_error(errors)
    top = max(r[0] for r in results)
    pick = [r for r in results if r[0] == top]

    def kv_cells(r: tuple) -> bool:
        return any(st.cells for sp, sec in zip(r[1].sections, r[3]) if sp.kind == "kv" for st in sec.streams)

    # the format only matters where KV cells are written: otherwise the first one stands
    pick = [r for i, r in enumerate(pick)
            if kv_cells(r) or not any(q[1] is r[1] for q in pick[:i])]
    if len(pick) > 1:
        raise LayoutAmbiguousError(f"{what}: several layouts parse these bytes: "
                                   + "; ".join(f"{r[1].describe()} (format {r[2]})" for r in pick),
                                   [replace(r[1], format=r[2]) for r in pick])
    stop, cand, f, secs, offs = pick[0]
    return _finish(cand, secs, offs, f, scope, seq_id, flags), stop


def _best_error(errors: List[StateError]) -> StateError:
    def off_of(e: StateError) -> int:
        import re

        m = re.findall(r"offset (\d+)", str(e))
        return max(int(x) for x in m) if m else -1

    return max(errors, key=off_of)


def _finish(lay: Layout, secs: List[Any], offs: List[int], fmt: int, scope: Optional[str],
            seq_id: Optional[int], flags: Optional[int]) -> MemoryState:
    if scope is None:
        rec = next((s for sp, s in zip(lay.sections, secs) if sp.kind == "rec"), None)
        scope = "seq" if rec is not None and rec.cells and all(not c.seq_ids for c in rec.cells) else "whole"
    if scope == "whole" and lay.kind is None:
        # a whole state has every section of its memory: the pattern names the kind
        kinds = {("kv",): "kv", ("kv", "kv"): "iswa", ("rec",): "recurrent", ("kv", "rec"): "hybrid",
                 ("kv", "kv", "rec"): "hybrid_iswa"}
        lay = replace(lay, kind=kinds.get(lay.pattern))
    if scope == "seq":
        if seq_id is None:
            seq_id = _seq_of_cells(secs, lay.sections)
        if flags is None:
            flags = 1 if lay.partial else 0
    return MemoryState(replace(lay, format=fmt), secs, offs, fmt, scope, seq_id, flags or 0)


def parse(data: Any, layout: Any = None, model: Any = None, kind: Optional[str] = None,
          strict: bool = True, name: str = "") -> Union[Session, SeqState, Blob]:
    """Parse any llama.cpp state: a session file, a sequence state file, a context blob, a
    sequence blob or bare memory sections (``kind``: "session", "seq_file", "context",
    "seq", "sections"; default: recognised from the first bytes)."""
    mv = memoryview(data)
    if kind is None:
        m = _u32(mv, 0) if len(mv) >= 4 else None
        kind = {MAGIC_SESSION: "session", MAGIC_SEQ_FILE: "seq_file", MAGIC_SEQ_BLOB: "seq"}.get(m) if m is not None else None
        if kind is None:
            if len(mv) >= 4 and bytes(mv[:4]) == b"GGUF":
                raise StateError(f"{name or 'input'}: this is a GGUF model file, not a llama.cpp state")
            kind = "context" if _looks_like_arch(mv) else "sections"
    if len(mv) == 0:
        raise StateError(f"{name or 'input'}: empty (0 bytes)")
    if kind == "session":
        return Session.parse(mv, model, layout, strict, name)
    if kind == "seq_file":
        return SeqState.parse(mv, model, layout, False, name)
    if kind in ("context", "seq"):
        return Blob.parse(mv, model, layout, envelope=kind, name=name)
    if kind == "sections":
        return Blob.parse(mv, model, layout, envelope=None, name=name)
    raise E.InvalidArgumentError(f"unknown state kind {kind!r}")


def load(path: PathLike, model: Any = None, layout: Any = None, kind: Optional[str] = None, strict: bool = True,
         progress: Progress = None) -> Union[Session, SeqState, Blob]:
    """Read and parse any llama.cpp state file (see :func:`parse`)."""
    return parse(_read_file(path, progress), layout, model, kind, strict, name=os.fspath(path))


def _convert_format(st: MemoryState, fmt: int) -> MemoryState:
    if fmt == st.format:
        return st
    new = []
    for sp, s in zip(st.specs, st.sections):
        if sp.kind == "kv":
            if fmt == 10 and any(x.k_rot or x.v_rot for x in s.streams if x.cells):
                raise EditError("a cache with a Hadamard rotation (k_rot/v_rot) has no format-10 form")
            s = KVSection(s.streams, fmt, s.cell_ext, 0)
            s.nbytes = len(s.dump())
        new.append(s)
    offs = []
    o = 0
    for s in new:
        offs.append(o)
        o += s.nbytes
    return MemoryState(replace(st.layout, format=fmt), new, offs, fmt, st.scope, st.seq_id, st.flags)


# ---------------------------------------------------------------------------------------------
# memories for states
# ---------------------------------------------------------------------------------------------
def _pad(x: int, n: int = 256) -> int:
    return (x + n - 1) // n * n


def memory_params(state: MemoryState, extra_ids: Sequence[int] = ()) -> Dict[str, Any]:
    """The :func:`pymem.from_gguf` arguments implied by a state: ``unified`` (one stream),
    ``n_seq_max`` (the stream count when not unified, else the highest sequence id + 1,
    also covering ``extra_ids``), ``flash_attn`` (= not v_trans), ``type_k`` / ``type_v``,
    ``n_ctx`` (the smallest multiple of 256 cells per stream holding the state) and
    ``format``.

    Not in the bytes, so fixed: ``swa_full=True`` (an SWA cache as large as the base, which
    holds any state; llama.cpp's own context may have had a smaller one, where it cannot
    shift), ``n_rs_seq=0`` (rollback snapshots are not saved), ``n_ubatch`` 512, the
    original context size (only the cells in use are known) and, in a unified cache, the
    original ``n_seq_max`` (only the ids in use are known).  Cell placement and the search
    head are not saved either: a whole restore packs the cells at 0..n-1 in blob order, as
    llama.cpp's does.  K/V types of a cache without cells default to f16 (they do not
    matter until cells exist)."""
    g = state.geometry()
    n_stream = max([k["n_stream"] for k in g["kv"]] or [1])
    ids = list(state.seq_ids()) + [i for i in extra_ids if i is not None and i >= 0]
    if state.scope == "seq" and state.seq_id is not None:
        ids.append(state.seq_id)
    unified = n_stream == 1
    n_seq_max = n_stream if not unified else max(ids + [0]) + 1
    if n_seq_max > _MAX_SEQ:
        raise EditError(f"sequence id {max(ids)} is beyond llama.cpp's limit of {_MAX_SEQ} sequences")
    v_trans = next((k["v_trans"] for k in g["kv"] if k["v_trans"] is not None), True)
    tk = next((k["type_k"] for k in g["kv"] if k["type_k"] is not None), 1)
    tv = next((k["type_v"] for k in g["kv"] if k["type_v"] is not None), 1)
    cells = max(1, state.max_cells())
    size = _pad(cells)
    return {"n_ctx": size * (1 if unified else n_seq_max), "n_seq_max": n_seq_max, "unified": unified,
            "flash_attn": not v_trans, "type_k": tk, "type_v": tv if tv is not None else tk,
            "format": state.format, "swa_full": True, "n_rs_seq": 0}


def _build_memory(state: MemoryState, model: Any, arch: Optional[str], extra_ids: Sequence[int] = (),
                  n_seq_max: Optional[int] = None) -> Any:
    p = memory_params(state, extra_ids)
    if n_seq_max is not None:
        if not p["unified"] and n_seq_max != p["n_seq_max"]:
            raise E.InvalidArgumentError(f"a state with {p['n_seq_max']} streams needs n_seq_max {p['n_seq_max']}")
        p["n_seq_max"] = max(p["n_seq_max"], int(n_seq_max))
    if model is None:
        return _geometry_memory(state, p, arch)
    from .gguf import build_memory, memory_spec
    from .memory import type_name

    hp = _hparams(model)
    if arch is not None and hp.arch != arch:
        raise StateError(f"the state was saved by a '{arch}' model, the model is '{hp.arch}' "
                         "(llama.cpp: wrong model arch)")
    try:
        spec = memory_spec(hp, p["n_ctx"], n_seq_max=p["n_seq_max"], type_k=type_name(p["type_k"]),
                           type_v=type_name(p["type_v"]), flash_attn=p["flash_attn"], unified=p["unified"],
                           swa_full=True, n_rs_seq=0, format=p["format"])
    except E.Error as exc:
        raise StateError(f"no memory of this model can hold the state: {exc}") from None
    want = Layout.from_spec(spec, partial=state.layout.partial)
    if tuple(s.kind for s in want.sections) != state.layout.pattern or any(
            a.kind == "rec" and a.n_recurrent != b.n_recurrent for a, b in zip(want.sections, state.layout.sections)):
        raise StateError(f"the state's sections ({state.layout.describe()}) do not match the model's memory "
                         f"({want.describe()})")
    return build_memory(spec)


def _geometry_memory(state: MemoryState, p: Dict[str, Any], arch: Optional[str]) -> Any:
    """A memory shaped like the state (no model): layer widths and types from the rows, no
    RoPE (it cannot shift), no sliding window.  KV layers get model ids 0, 1, ... in section
    order; the recurrent layers the last ids of the model layer count the REC section
    records."""
    from .memory import HybridISWAMemory, HybridMemory, KVCache, KVCacheISWA, RecurrentMemory

    g = state.geometry()
    rec = g["rec"]
    kvs = g["kv"]
    n_kv = [len(k["layers"]) if k["layers"] is not None else 0 for k in kvs]
    n_r = rec["n_recurrent"] if rec else 0
    n_model = max(1, sum(n_kv) + n_r)
    if rec is not None:
        if rec["n_layer_model"] < sum(n_kv) + n_r:
            raise EditError(f"the recurrent section records {rec['n_layer_model']} model layers, fewer than the "
                            f"{sum(n_kv) + n_r} layers the state holds")
        n_model = rec["n_layer_model"]
    n_seq_max = p["n_seq_max"]
    size = p["n_ctx"] // (1 if p["unified"] else n_seq_max)
    ext = any(sp.cell_ext for sp, _ in state.kv_sections())
    kv_args = []
    first = 0
    for k, n in zip(kvs, n_kv):
        layers = list(range(first, first + n))
        first += n
        hk = [32] * n_model
        hv = [32] * n_model
        for l, (kt, kw, vt, vw) in enumerate(k["layers"] or []):
            if kw is None or (vt is not None and vw is None):
                raise EditError(f"pymem has no cache type {_tname(kt)}/{_tname(vt)}: this state can only be inspected")
            hk[layers[l]] = kw
            hv[layers[l]] = vw if vw else kw
        kv_args.append(dict(
            n_layer=n_model, layers=layers, n_head_kv=1, n_embd_head_k=hk, n_embd_head_v=hv, size=size,
            n_seq_max=n_seq_max, type_k=k["type_k"] if k["type_k"] is not None else p["type_k"],
            type_v=k["type_v"] if k["type_v"] is not None else p["type_v"],
            v_trans=bool(k["v_trans"]) if k["v_trans"] is not None else not p["flash_attn"],
            unified=p["unified"], rope=None, arch=arch, format=state.format, k_rot=k["k_rot"] or 0,
            v_rot=k["v_rot"] or 0, cell_ext=ext, can_shift=False))
    rec_args = None
    if rec is not None:
        layers = list(range(n_model - n_r, n_model))
        rr, ss, pp = [0] * n_model, [0] * n_model, [0] * n_model
        tr = ts = 0
        for l, (rt, rw, st_, sw, pw) in enumerate(rec["layers"]):
            if rw is None or sw is None or pw is None:
                raise EditError(f"pymem has no state type {_tname(rt)}/{_tname(st_)}: this state can only be inspected")
            rr[layers[l]], ss[layers[l]], pp[layers[l]] = rw, sw, pw
            tr, ts = rt, st_
        rec_args = dict(n_layer=n_model, layers=layers, n_embd_r=rr, n_embd_s=ss, n_embd_p=pp,
                        size=max(1, n_seq_max), n_seq_max=n_seq_max, type_r=tr, type_s=ts, n_rs_seq=0, arch=arch)
    pat = state.layout.pattern
    try:
        if pat == ("kv",):
            return KVCache(**kv_args[0])
        if pat == ("kv", "kv"):
            return KVCacheISWA(base=kv_args[0], swa=kv_args[1])
        if pat == ("rec",):
            return RecurrentMemory(**rec_args)
        if pat == ("kv", "rec"):
            return HybridMemory(attn=kv_args[0], recurrent=rec_args)
        if pat == ("kv", "kv", "rec"):
            return HybridISWAMemory(attn={"base": kv_args[0], "swa": kv_args[1]}, recurrent=rec_args)
    except E.Error as exc:
        raise EditError(f"cannot build a memory shaped like this state: {exc}") from None
    raise EditError(f"no memory has the layout {state.layout.describe()}")


def _state_read(mem: Any, state: MemoryState, seq_id: int, flags: int, what: str) -> None:
    """Restore the sections into ``mem`` as llama.cpp would (whole: packed at 0..n-1)."""
    sec = state.dump()
    try:
        mem.state_read(sec, seq_id=seq_id, flags=flags)
    except (E.StateError, E.NoSlotError, E.InvalidArgumentError, E.UnsupportedError) as exc:
        raise StateError(f"{what}: the memory rejects the state: {exc}") from None


# ---------------------------------------------------------------------------------------------
# operations
# ---------------------------------------------------------------------------------------------
_OP_ARITY = {"seq_rm": (1, 3), "seq_cp": (2, 4), "seq_keep": (1, 1), "seq_mv": (2, 2), "truncate": (1, 1),
             "seq_add": (4, 4), "seq_div": (4, 4)}


@dataclass(frozen=True)
class Op:
    """One edit: ``seq_rm (s[, p0, p1])``, ``seq_cp (src, dst[, p0, p1])``, ``seq_keep (s)``,
    ``seq_mv (src, dst)`` (= seq_cp(src, dst) + seq_rm(src)), ``truncate (n)`` (drop
    positions >= n of every sequence, and a session's tokens beyond n), ``seq_add (s, p0,
    p1, delta)``, ``seq_div (s, p0, p1, d)``.  Positions are llama.cpp's half-open
    ``[p0, p1)``; -1 means open."""

    name: str
    args: Tuple[int, ...]

    @classmethod
    def coerce(cls, x: Any) -> "Op":
        if isinstance(x, Op):
            op = x
        else:
            t = tuple(x)
            if not t:
                raise E.InvalidArgumentError("empty operation")
            op = cls(str(t[0]).replace("-", "_"), tuple(int(v) for v in t[1:]))
        lo_hi = _OP_ARITY.get(op.name)
        if lo_hi is None:
            raise E.InvalidArgumentError(f"unknown operation {op.name!r} (one of {', '.join(_OP_ARITY)})")
        lo, hi = lo_hi
        if not lo <= len(op.args) <= hi or (op.name in ("seq_rm", "seq_cp") and len(op.args) == lo + 1):
            raise E.InvalidArgumentError(f"{op.name} takes {lo}{'' if lo == hi else f' or {hi}'} arguments, "
                                         f"got {len(op.args)}")
        if op.name in ("seq_rm", "seq_cp") and len(op.args) == lo:
            op = cls(op.name, op.args + (-1, -1))
        return op

    def seq_args(self) -> List[int]:
        if self.name in ("seq_cp", "seq_mv"):
            return [self.args[0], self.args[1]]
        if self.name == "truncate":
            return []
        return [self.args[0]]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.args))})"


def parse_op(name: str, value: str) -> Op:
    """An :class:`Op` from the CLI spelling: ``seq-rm S[:P0:P1]``, ``seq-cp SRC:DST[:P0:P1]``,
    ``seq-keep S``, ``seq-mv SRC:DST``, ``truncate N``, ``seq-add S:P0:P1:D``,
    ``seq-div S:P0:P1:D`` (an empty P1 means -1)."""
    n = name.replace("-", "_")
    parts = value.split(":")
    vals = []
    for i, x in enumerate(parts):
        x = x.strip()
        if x == "" and i > 0:
            vals.append(-1)
            continue
        try:
            vals.append(int(x))
        except ValueError:
            raise E.InvalidArgumentError(f"--{name.replace('_', '-')} {value}: {x!r} is not an integer") from None
    try:
        return Op.coerce((n, *vals))
    except E.InvalidArgumentError as exc:
        form = {"seq_rm": "S[:P0:P1]", "seq_cp": "SRC:DST[:P0:P1]", "seq_keep": "S", "seq_mv": "SRC:DST",
                "truncate": "N", "seq_add": "S:P0:P1:DELTA", "seq_div": "S:P0:P1:D"}.get(n, "")
        raise E.InvalidArgumentError(f"--{name.replace('_', '-')} {value}: expected {form} ({exc})") from None


def apply_ops(mem: Any, ops: Sequence[Any], structure_only: bool = False) -> List[str]:
    """Apply operations to a pymem memory as llama.cpp would, then its pending update
    (K-shift, stream copies).  Raises :class:`EditError` where llama.cpp refuses (seq_rm
    returning false) or would abort (bad ids, a partial cross-stream seq_cp).  Returns notes."""
    notes: List[str] = []
    has_kv = bool(mem.kv_parts())
    n_seq = _n_seq_max(mem)
    for raw in ops:
        op = Op.coerce(raw)
        a = op.args
        for s in op.seq_args():
            if s < -1 or s >= _MAX_SEQ or (s == -1 and op.name != "seq_rm"):
                raise EditError(f"{op}: sequence id {s} is not valid")
            if s >= n_seq:
                raise EditError(f"{op}: sequence id {s} >= n_seq_max {n_seq} of this memory")
        try:
            if op.name == "seq_rm":
                if not mem.seq_rm(a[0], a[1], a[2]):
                    raise EditError(_refusal(mem, op))
            elif op.name == "truncate":
                if mem.kind in ("kv", "iswa"):
                    mem.seq_rm(-1, a[0], -1)
                else:
                    for s in range(n_seq):
                        if mem.seq_pos_max(s) >= 0 and not mem.seq_rm(s, a[0], -1):
                            raise EditError(f"{op}: {_refusal(mem, Op('seq_rm', (s, a[0], -1)))}")
            elif op.name == "seq_cp":
                mem.seq_cp(*a)
            elif op.name == "seq_keep":
                mem.seq_keep(a[0])
            elif op.name == "seq_mv":
                if a[0] != a[1]:
                    mem.seq_cp(a[0], a[1], -1, -1)
                    if not mem.seq_rm(a[0], -1, -1):
                        raise EditError(_refusal(mem, op))  # pragma: no cover (a full removal always works)
            elif op.name in ("seq_add", "seq_div"):
                if structure_only and has_kv:
                    raise EditError(f"{op} needs the model (--model): the K rotation of a shift needs its RoPE "
                                    "parameters")
                if op.name == "seq_div" and a[3] <= 0:
                    raise EditError(f"{op}: the divisor must be >= 1")
                getattr(mem, op.name)(*a)
        except EditError:
            raise
        except E.UnsupportedError as exc:
            raise EditError(f"{op}: llama.cpp cannot do this: {exc}") from None
        except (E.InvalidArgumentError, E.InvalidStateError) as exc:
            raise EditError(f"{op}: {exc}") from None
    try:
        if mem.update():
            notes.append("pending updates applied (K-shift / stream copies), as before llama.cpp's next decode")
    except E.ShiftError as exc:
        raise EditError(f"the K-shift cannot be applied: {exc}") from None
    return notes


def _n_seq_max(mem: Any) -> int:
    n = getattr(mem, "n_seq_max", None)
    if n is None:
        parts = mem.kv_parts()
        n = parts[0].n_seq_max if parts else mem.recurrent.n_seq_max
    return int(n)


def _refusal(mem: Any, op: Op) -> str:
    if mem.kind in ("recurrent", "hybrid", "hybrid_iswa"):
        return (f"{op} refused: a recurrent state cannot lose part of a sequence (only whole sequences, or "
                "ranges not touching the last position), as llama_memory_seq_rm returns false")
    return f"{op} refused (llama_memory_seq_rm returns false)"


# ---------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------
@dataclass
class Diff:
    """Result of :func:`diff`: ``same``; ``first`` (the first difference, naming section,
    stream, cell or layer); ``lines`` (every difference found, coarse to fine); ``counts``."""

    same: bool
    first: str = ""
    lines: List[str] = field(default_factory=list)
    counts: Dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return not self.same

    def text(self) -> str:
        if self.same:
            return "identical"
        out = [f"first difference: {self.first}"]
        if len(self.lines) > 1:
            out.append("differences:")
            out.extend(f"  {x}" for x in self.lines[:40])
            if len(self.lines) > 40:
                out.append(f"  ... and {len(self.lines) - 40} more")
        if self.counts:
            out.append("summary: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        return "\n".join(out)


def _canonical_stream(st: KVStream) -> KVStream:
    n = len(st.cells)
    order = sorted(range(n), key=lambda i: (st.cells[i].pos, st.cells[i].seq_ids, st.cells[i].ext or ()))
    if order == list(range(n)):
        return st
    layers = []
    for L in st.layers:
        k = b"".join(bytes(L.k[i * L.k_row:(i + 1) * L.k_row]) for i in order)
        if L.v_type is None:
            v = L.v
        elif st.v_trans:
            el = L.v_row
            v = b"".join(bytes(L.v[(j * n + i) * el:(j * n + i + 1) * el]) for j in range(L.v_embd) for i in order)
        else:
            v = b"".join(bytes(L.v[i * L.v_row:(i + 1) * L.v_row]) for i in order)
        layers.append(KVLayer(L.k_type, L.k_row, k, L.v_type, L.v_row, L.v_embd, v))
    return KVStream([st.cells[i] for i in order], st.v_trans, st.k_rot, st.v_rot, layers)


def _canonical_rec(s: RecSection) -> RecSection:
    n = len(s.cells)
    order = sorted(range(n), key=lambda i: (s.cells[i].seq_ids, s.cells[i].pos))
    if order == list(range(n)):
        return s
    layers = []
    for L in s.layers:
        def pick(data: Any, row: int) -> bytes:
            return b"".join(bytes(data[i * row:(i + 1) * row]) for i in order)
        layers.append(RecLayer(L.r_type, L.r_row, pick(L.r, L.r_row), L.s_type, L.s_row, pick(L.s, L.s_row),
                               L.p_row, pick(L.p, L.p_row or 0) if L.p_row else L.p))
    return RecSection([s.cells[i] for i in order], s.s_trans, s.n_layer, layers, s.nbytes)


def _first_row(a: Any, b: Any, row: int) -> int:
    """Index of the first differing row of two equally long row arrays."""
    if row <= 0:
        return -1
    n = min(len(a), len(b)) // row
    lo, hi = 0, n
    # linear scan in blocks: memoryview comparison is fast
    step = max(1, (1 << 20) // row)
    for s in range(0, n, step):
        e = min(n, s + step)
        if a[s * row:e * row] != b[s * row:e * row]:
            for i in range(s, e):
                if a[i * row:(i + 1) * row] != b[i * row:(i + 1) * row]:
                    return i
    return -1 if len(a) == len(b) else n


def diff(a: _Saved, b: _Saved, ignore_order: bool = False) -> Diff:
    """Compare two parsed states, coarse to fine: container (type, version, arch, tokens),
    layout, then per section streams, cells (position, sequence ids) and layers (types, row
    sizes, K / V / r / s rows, naming the first differing cell).  ``ignore_order`` compares
    the cells of each stream sorted by (position, sequence ids), rows moved with them: equal
    contents placed in other cells then compare equal."""
    lines: List[str] = []
    counts: Dict[str, int] = {}

    def add(msg: str, key: str, n: int = 1) -> None:
        lines.append(msg)
        counts[key] = counts.get(key, 0) + n

    if a.dump() == b.dump():
        return Diff(True)
    if type(a) is not type(b) or a.what != b.what:
        add(f"container: {a.what} vs {b.what}", "container")
    for attr in ("version", "arch", "envelope", "seq_id"):
        va, vb = getattr(a, attr, None), getattr(b, attr, None)
        if va != vb:
            add(f"container: {attr} {va} vs {vb}", "container")
    ta, tb = getattr(a, "tokens", None), getattr(b, "tokens", None)
    if ta is not None and tb is not None and ta != tb:
        i = next((k for k in range(min(len(ta), len(tb))) if ta[k] != tb[k]), min(len(ta), len(tb)))
        add(f"tokens: {len(ta)} vs {len(tb)} tokens, first difference at token {i}"
            + (f" ({ta[i]} vs {tb[i]})" if i < len(ta) and i < len(tb) else ""), "tokens")
    sa, sb = a.state, b.state
    if sa.format != sb.format:
        add(f"memory: state format {sa.format} vs {sb.format}", "layout")
    if sa.layout.pattern != sb.layout.pattern:
        add(f"memory: layout {sa.layout.describe()} vs {sb.layout.describe()}", "layout")
    else:
        for i, (sp, x, y) in enumerate(zip(sa.specs, sa.sections, sb.sections)):
            name = f"section {i + 1} ({sp.label})"
            if sp.kind == "kv":
                _diff_kv(name, x, y, ignore_order, add)
            else:
                _diff_rec(name, x, y, ignore_order, add)
    if len(a.trailing) != len(b.trailing) or a.trailing != b.trailing:
        add(f"trailing bytes: {len(a.trailing)} vs {len(b.trailing)}", "trailing")
    if not lines:
        return Diff(True, counts={"cells reordered": 1} if ignore_order else {})
    return Diff(False, lines[0], lines, counts)


def _diff_kv(name: str, x: KVSection, y: KVSection, ignore_order: bool, add: Callable) -> None:
    if len(x.streams) != len(y.streams):
        add(f"{name}: {len(x.streams)} vs {len(y.streams)} streams", "streams")
        return
    for s, (p, q) in enumerate(zip(x.streams, y.streams)):
        where = f"{name}, stream {s}"
        if ignore_order:
            p, q = _canonical_stream(p), _canonical_stream(q)
        if len(p.cells) != len(q.cells):
            add(f"{where}: {len(p.cells)} vs {len(q.cells)} cells", "streams")
        n = min(len(p.cells), len(q.cells))
        bad = [i for i in range(n) if p.cells[i] != q.cells[i]]
        if bad:
            i = bad[0]
            add(f"{where}, cell {i}: pos {p.cells[i].pos} seqs {p.cells[i].seq_ids} vs pos {q.cells[i].pos} "
                f"seqs {q.cells[i].seq_ids}" + (f" ({len(bad)} cells differ)" if len(bad) > 1 else ""), "cells", len(bad))
        if not p.cells or not q.cells:
            continue
        if len(p.cells) != len(q.cells):
            _diff_rows_unequal(where, p, q, n, add)
            continue
        for attr in ("v_trans", "k_rot", "v_rot"):
            if getattr(p, attr) != getattr(q, attr):
                add(f"{where}: {attr} {getattr(p, attr)} vs {getattr(q, attr)}", "layers")
        if len(p.layers) != len(q.layers):
            add(f"{where}: {len(p.layers)} vs {len(q.layers)} layers", "layers")
            continue
        for l, (A, B) in enumerate(zip(p.layers, q.layers)):
            if (A.k_type, A.k_row, A.v_type, A.v_row, A.v_embd) != (B.k_type, B.k_row, B.v_type, B.v_row, B.v_embd):
                add(f"{where}, layer {l}: types/rows K {_tname(A.k_type)}/{A.k_row} V {_tname(A.v_type)}/{A.v_row} vs "
                    f"K {_tname(B.k_type)}/{B.k_row} V {_tname(B.v_type)}/{B.v_row}", "layers")
                continue
            if A.k != B.k:
                i = _first_row(A.k, B.k, A.k_row)
                nd = sum(1 for c in range(n) if A.k[c * A.k_row:(c + 1) * A.k_row] != B.k[c * B.k_row:(c + 1) * B.k_row])
                add(f"{where}, layer {l}: K rows differ, first at cell {i} (pos {p.cells[i].pos}), {nd} of {n} cells",
                    "K rows", nd)
            if A.v != B.v:
                if p.v_trans:
                    el = A.v_row
                    nd_cells = sorted({(k // el) % n for k in range(0, len(A.v), el) if A.v[k:k + el] != B.v[k:k + el]})
                    i = nd_cells[0]
                    nd = len(nd_cells)
                else:
                    i = _first_row(A.v, B.v, A.v_row)
                    nd = sum(1 for c in range(n) if A.v[c * A.v_row:(c + 1) * A.v_row] != B.v[c * B.v_row:(c + 1) * B.v_row])
                add(f"{where}, layer {l}: V rows differ, first at cell {i} (pos {p.cells[i].pos}), {nd} of {n} cells",
                    "V rows", nd)


def _diff_rows_unequal(where: str, p: KVStream, q: KVStream, n: int, add: Callable) -> None:
    """Rows of the first n cells of two streams with different cell counts."""
    if len(p.layers) != len(q.layers) or p.v_trans != q.v_trans:
        add(f"{where}: layers {len(p.layers)} vs {len(q.layers)}, v_trans {p.v_trans} vs {q.v_trans}", "layers")
        return
    for l, (A, B) in enumerate(zip(p.layers, q.layers)):
        if (A.k_type, A.k_row, A.v_type, A.v_row) != (B.k_type, B.k_row, B.v_type, B.v_row):
            add(f"{where}, layer {l}: types/rows differ", "layers")
            continue
        for what, get in (("K", p.k_row_of), ("V", p.v_row_of)):
            other = q.k_row_of if what == "K" else q.v_row_of
            if what == "V" and A.v_type is None:
                continue
            bad = [i for i in range(n) if get(l, i) != other(l, i)]
            if bad:
                add(f"{where}, layer {l}: {what} rows differ, first at cell {bad[0]} (pos {p.cells[bad[0]].pos}), "
                    f"{len(bad)} of the first {n} cells", f"{what} rows", len(bad))


def _diff_rec(name: str, x: RecSection, y: RecSection, ignore_order: bool, add: Callable) -> None:
    if ignore_order:
        x, y = _canonical_rec(x), _canonical_rec(y)
    if len(x.cells) != len(y.cells):
        add(f"{name}: {len(x.cells)} vs {len(y.cells)} cells", "cells")
    n = min(len(x.cells), len(y.cells))
    bad = [i for i in range(n) if x.cells[i] != y.cells[i]]
    if bad:
        i = bad[0]
        add(f"{name}, cell {i}: pos {x.cells[i].pos} seqs {x.cells[i].seq_ids} vs pos {y.cells[i].pos} "
            f"seqs {y.cells[i].seq_ids}", "cells", len(bad))
    if x.n_layer != y.n_layer or len(x.layers) != len(y.layers):
        add(f"{name}: n_layer {x.n_layer}/{len(x.layers)} vs {y.n_layer}/{len(y.layers)}", "layers")
        return
    if len(x.cells) != len(y.cells):
        return
    for l, (A, B) in enumerate(zip(x.layers, y.layers)):
        for what, ra, rb, da, db in (("r", A.r_row, B.r_row, A.r, B.r), ("s", A.s_row, B.s_row, A.s, B.s),
                                     ("p", A.p_row or 0, B.p_row or 0, A.p, B.p)):
            if ra != rb:
                add(f"{name}, recurrent layer {l}: {what} row {ra} vs {rb} bytes", "layers")
            elif da != db:
                i = _first_row(da, db, ra)
                add(f"{name}, recurrent layer {l}: {what} rows differ, first at cell {i}", f"{what} rows")


# ---------------------------------------------------------------------------------------------
# text description
# ---------------------------------------------------------------------------------------------
def _fmt_tokens(toks: Sequence[int], n: int = 12) -> str:
    if len(toks) <= n:
        return "[" + ", ".join(map(str, toks)) + "]"
    return "[" + ", ".join(map(str, toks[:n // 2])) + ", ..., " + ", ".join(map(str, toks[-n // 2 + 1:])) + "]"


def _bar(flags: Sequence[bool], width: int) -> str:
    """Occupancy bar: one char per cell, or per group of cells (# all, + some, . none)."""
    n = len(flags)
    if n <= width:
        return "".join("#" if f else "." for f in flags)
    out = []
    for k in range(width):
        lo, hi = k * n // width, (k + 1) * n // width
        grp = flags[lo:max(hi, lo + 1)]
        s = sum(grp)
        out.append("#" if s == len(grp) else "+" if s else ".")
    return "".join(out)


def _describe(obj: _Saved, width: int, cells: bool) -> str:
    st = obj.state
    L: List[str] = []
    head = obj.what
    if isinstance(obj, Session):
        head += f": ggsn v{obj.version} (state format {st.format}, {_BUILD_OF_FORMAT.get(st.format, '?')})"
    elif isinstance(obj, SeqState):
        head += f": ggsq v{obj.version} (state format {st.format}, {_BUILD_OF_FORMAT.get(st.format, '?')})"
    else:
        head += f" (state format {st.format})"
    L.append(f"{head}, {obj.nbytes} bytes")
    if obj.arch:
        L.append(f"  architecture: {obj.arch}")
    if isinstance(obj, (Session, SeqState)):
        L.append(f"  tokens: {len(obj.tokens)} {_fmt_tokens(obj.tokens)}")
    if st.scope == "seq":
        flag = ", PARTIAL_ONLY" if st.flags & 1 else ""
        L.append(f"  one sequence: {st.seq_id if st.seq_id is not None else '? (not recorded)'}{flag}")
    L.append(f"  memory: {st.layout.describe()} (layout {st.layout.source}), {st.nbytes} bytes")
    seqs = st.sequences()
    if seqs:
        L.append("  sequences:")
        L.append(f"    {'seq':>4}  {'positions':>13}  {'cells':>6}  {'bytes':>10}  where")
        for q, infos in seqs.items():
            for x in infos:
                where = f"section {x.section + 1} ({st.specs[x.section].name or st.specs[x.section].kind})"
                if x.stream is not None:
                    where += f", stream {x.stream}"
                L.append(f"    {q:>4}  {f'{x.pos_min}..{x.pos_max}':>13}  {x.cells:>6}  {x.bytes:>10}  {where}")
    else:
        L.append("  sequences: none (empty memory)")
    for i, (sp, s, off) in enumerate(zip(st.specs, st.sections, st.offsets)):
        L.append(f"  section {i + 1}/{len(st.sections)} {sp.label}: offset {off}, {s.nbytes} bytes")
        if sp.kind == "kv":
            stx = next((x for x in s.streams if x.cells), None)
            L.append(f"    {len(s.streams)} stream{'s' if len(s.streams) != 1 else ''}, "
                     f"{sum(len(x.cells) for x in s.streams)} cells"
                     + (f", v_trans {stx.v_trans}, k_rot {stx.k_rot}, v_rot {stx.v_rot}, {len(stx.layers)} layers"
                        if stx is not None else ""))
            if stx is not None and stx.layers:
                L.append(f"    {'layer':>5} {'model':>5}  {'K type':>6} {'K row':>6} {'n_k':>5}  {'V type':>6} "
                         f"{'V row':>6} {'n_v':>5}")
                for l, Ly in enumerate(stx.layers):
                    ml = sp.layers[l] if sp.layers and l < len(sp.layers) else "-"
                    vrow = f"{Ly.v_row}/el" if stx.v_trans else str(Ly.v_row)
                    nv = Ly.v_embd if stx.v_trans else (_width(Ly.v_type, Ly.v_row) if Ly.v_type is not None else "-")
                    L.append(f"    {l:>5} {ml!s:>5}  {_tname(Ly.k_type):>6} {Ly.k_row:>6} "
                             f"{_width(Ly.k_type, Ly.k_row)!s:>5}  {_tname(Ly.v_type):>6} {vrow:>6} {nv!s:>5}")
            if cells:
                for si, x in enumerate(s.streams):
                    if not x.cells and len(s.streams) > 1:
                        continue
                    L.extend(_picture(si, x.cells, width))
        else:
            L.append(f"    {len(s.cells)} cells, {len(s.layers)} recurrent layers of {s.n_layer}, s_trans {s.s_trans}")
            if s.layers:
                L.append(f"    {'layer':>5} {'model':>5}  {'r type':>6} {'r row':>7}  {'s type':>6} {'s row':>7}")
                for l, Ly in enumerate(s.layers):
                    ml = sp.layers[l] if sp.layers and l < len(sp.layers) else "-"
                    L.append(f"    {l:>5} {ml!s:>5}  {_tname(Ly.r_type):>6} {Ly.r_row:>7}  {_tname(Ly.s_type):>6} "
                             f"{Ly.s_row:>7}" + (f"  p row {Ly.p_row}" if Ly.p_row is not None else ""))
            if cells and s.cells:
                L.append("    cells: " + ", ".join(
                    f"[{i}] pos {c.pos} seq {','.join(map(str, c.seq_ids)) or (st.seq_id if st.seq_id is not None else '-')}"
                    for i, c in enumerate(s.cells[:16])) + (" ..." if len(s.cells) > 16 else ""))
    if obj.trailing:
        L.append(f"  trailing: {len(obj.trailing)} bytes after the state (llama.cpp ignores them in sequence files "
                 "and rejects session files with them)")
    return "\n".join(L)


def _picture(si: int, cells: List[KVCell], width: int) -> List[str]:
    n = len(cells)
    out = [f"    stream {si}: {n} cells" + (f", positions {min(c.pos for c in cells)}..{max(c.pos for c in cells)}"
                                            if cells else "")]
    if not cells:
        return out
    ids = sorted({q for c in cells for q in c.seq_ids})
    scale = "" if n <= width else f" (each char ~{n / width:.1f} cells)"
    out.append(f"      cells 0..{n - 1} in state order{scale}:")
    for q in ids[:16]:
        out.append(f"      seq {q:>3} |{_bar([q in c.seq_ids for c in cells], width)}|")
    if len(ids) > 16:
        out.append(f"      ... {len(ids) - 16} more sequences")
    shared = [len(c.seq_ids) > 1 for c in cells]
    if any(shared):
        out.append(f"      shared  |{_bar(shared, width)}|")
    empty = [not c.seq_ids for c in cells]
    if any(empty):
        out.append(f"      no seq  |{_bar(empty, width)}|")
    return out
