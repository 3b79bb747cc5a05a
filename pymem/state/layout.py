"""Which memory sections follow in a state and with which per-layer geometry: :class:`SectionSpec`,
:class:`Layout` (from a GGUF, a memory, explicit, or inferred) and the ggml type helpers they use."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .. import _errors as E
from .. import _kinds as kinds
from .._errors import StateError
from .envelopes import PathLike


class LayoutAmbiguousError(StateError):
    """Several section layouts parse the same bytes; give ``model=`` or ``layout=``.
    ``candidates`` lists them."""

    def __init__(self, message: str, candidates: Sequence["Layout"] = ()) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


def _type_info(t: int) -> Optional[Tuple[int, int]]:
    """(block size, bytes per block) of a cache type pymem knows, else None."""
    from .._native import lib

    if t < 0 or t > 0xFFFF:
        return None
    b = int(lib.pm_type_block_size(int(t)))
    return (b, int(lib.pm_type_size(int(t)))) if b else None


def _tname(t: Optional[int]) -> str:
    if t is None:
        return "-"
    if _type_info(t) is None:
        return f"type{t}"
    from ..params import type_name

    return type_name(t)


def _width(t: int, row: int) -> Optional[int]:
    """Elements in a row of ``row`` bytes of type t (None if t is unknown or row is not whole)."""
    ti = _type_info(t)
    if ti is None or row % ti[1]:
        return None
    return row // ti[1] * ti[0]


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


#: what a bare section pattern may be (a whole state, or the PARTIAL_ONLY part of a bigger kind)
_PATTERN_NOTES = {
    "kv": "kv (or the PARTIAL_ONLY part of an iSWA)",
    "recurrent": "recurrent (or the PARTIAL_ONLY part of a hybrid)",
    "hybrid": "hybrid (or the PARTIAL_ONLY part of a hybrid-iSWA)",
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
        names = list(kinds.by_name(kind).parts)
        secs = tuple(SectionSpec("rec", n, n_recurrent=int(n_recurrent)) if n == "recurrent"
                     else SectionSpec("kv", n, cell_ext=cell_ext, swa=n == "swa") for n in names)
        if any(s.kind == "rec" for s in secs) and n_recurrent <= 0:
            raise E.InvalidArgumentError(f"a {kind} layout needs n_recurrent (the number of recurrent layers)")
        return cls(_partial(secs) if partial else secs, format, kind, bool(partial), f"kind {kind}")

    @classmethod
    def from_spec(cls, spec: Any, partial: bool = False, format: Optional[int] = None,
                  source: str = "") -> "Layout":
        """The layout of a :class:`pymem.plan.MemorySpec`."""
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
        from ..plan import memory_spec

        hp = _hparams(model)
        spec = memory_spec(hp, 256)
        name = Path(os.fspath(model)).name if isinstance(model, (str, os.PathLike)) else hp.arch
        return cls.from_spec(spec, partial, format, f"model {name}")

    @classmethod
    def from_memory(cls, mem: Any, partial: bool = False) -> "Layout":
        """The layout of a pymem memory's state."""
        secs = []
        names = list(kinds.by_name(mem.kind).kv_parts)
        fmt = None
        for name, kv in zip(names, mem.kv_parts()):
            fmt = kv.format
            secs.append(SectionSpec("kv", name, cell_ext=kv.cell_ext, has_v=kv.has_v, layers=tuple(kv.layers),
                                    swa=kv.swa_type != "none"))
        rec = getattr(mem, "recurrent", None)
        if rec is not None:
            ple = rec.has_p
            secs.append(SectionSpec("rec", "recurrent", n_recurrent=len(rec.layers),
                                    ple=ple if any(ple) else None, layers=tuple(rec.layers),
                                    n_layer_model=rec.n_layer_model))
        return cls(_partial(secs) if partial else tuple(secs), fmt, mem.kind, bool(partial),
                   f"memory ({mem.kind})")

    @classmethod
    def coerce(cls, x: Any) -> Optional["Layout"]:
        """A Layout from a Layout, a memory kind name, a string such as "kv+kv+rec:2", or a
        list of ("kv", format, cell_ext) / ("rec", n_recurrent, ple) tuples."""
        if x is None or isinstance(x, Layout):
            return x
        if isinstance(x, str):
            if x in kinds.KINDS and not kinds.KINDS[x].recurrent:
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
            if f.strip() not in ("10", "11"):
                raise E.InvalidArgumentError(f"layout {text!r}: format {f!r} after '@' is not 10 or 11")
            fmt = int(f)
        head, _, n = t.partition(":")
        if n and not (n.strip().isdigit() and int(n) <= 4096):
            raise E.InvalidArgumentError(f"layout {text!r}: the recurrent layer count {n!r} after ':' is not a "
                                         "number of layers (e.g. kv+rec:2, hybrid:2)")
        if head in kinds.KINDS:
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
        elif kinds.by_pattern(self.pattern) is not None:
            k = kinds.by_pattern(self.pattern).name  # type: ignore[union-attr]
            txt += f" [{_PATTERN_NOTES.get(k, k)}]"
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
    from ..gguf import Hparams, read_hparams

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
