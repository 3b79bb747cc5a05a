"""The saved-state containers: :class:`Session` (``ggsn`` files), :class:`SeqState` (``ggsq`` files),
:class:`Blob` (whole-context and per-sequence blobs, bare sections), :func:`parse` and :func:`load`."""
from __future__ import annotations

import os
import struct
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .. import _errors as E
from .._errors import StateError
from . import files, mapped
from .edit import Op, _build_memory, _convert_format, _seq_scope_ops, _state_read, apply_ops
from .envelopes import (
    EditError,
    MAGIC_SEQ_BLOB,
    MAGIC_SEQ_FILE,
    MAGIC_SESSION,
    PathLike,
    Progress,
    SEQ_FILE_VERSIONS,
    SESSION_VERSIONS,
    _SEQ_FILE_OF_FORMAT,
    _SESSION_OF_FORMAT,
    _expect_magic,
    _looks_like_arch,
    _read_arch,
    _read_tokens,
    _u32,
    wrap_context,
    wrap_seq,
)
from .layout import Layout, LayoutAmbiguousError
from .memstate import MemoryState, SeqInfo
from .parse import _parse_sections, _parse_state, _state_from
from .render import _describe


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
        self.token_sync: Optional[Dict[str, Any]] = None   # set by edit(): see pymem.state.tokens.follow
        self.noop: List[str] = []                           # set by edit(): operations that changed nothing
        self.edit_streamed = False   # set by edit(): rows gathered from the input on demand (streamedit)

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
        files.atomic_write(path, self.chunks(), self.nbytes, progress)

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

    def __repr__(self) -> str:
        toks = getattr(self, "tokens", None)
        extra = f", {len(toks)} tokens" if toks is not None else ""
        arch = f" {self.arch}" if self.arch else ""
        return (f"<{type(self).__name__} ({self.what}){arch}{extra}: {self.state.layout.describe()}, "
                f"sequences {self.state.seq_ids()}, {self.nbytes} bytes>")

    def describe(self, width: int = 64, cells: bool = True) -> str:
        """A readable multi-line summary with a picture of cell occupancy per stream (``width``
        characters wide, at least 1)."""
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise E.InvalidArgumentError(f"describe: width must be an integer >= 1, got {width!r}")
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
        from ..memory import Memory

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
        The token list of a session / sequence file follows the cache when it maps to it
        (one sequence at positions 0..n-1, as llama-cli and llama-server write them):
        ``result.token_sync`` says whether it did and why not; ``result.noop`` lists the
        operations that changed nothing (see :mod:`pymem.state.tokens`).
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
        from ..gguf import Hparams

        if model is not None and not isinstance(model, (str, os.PathLike, Hparams)):
            raise E.InvalidArgumentError(f"model must be a GGUF path, not {type(model).__name__}")
        streamed = None
        if model is None:   # rows gathered from the input while saving (pymem.state.streamedit)
            from . import streamedit

            streamed = streamedit.run(self, run, s_id, out_seq, flags, ids)
        if streamed is not None:
            new_sec, notes = streamed
        else:
            new_sec, notes = self._edit_in_memory(model, run, ids, s_id, out_seq, flags)
        if self.state.scope == "seq" and self.state.layout.pattern[:2] == ("kv", "kv") and \
                any(op.name in ("seq_rm", "seq_add", "seq_div") for op in run):
            (_, base), (_, swa) = self.state.kv_sections()[:2]
            if sum(len(x.cells) for x in base.streams) > sum(len(x.cells) for x in swa.streams):
                notes.append("this sequence state omits the SWA cells outside the window (llama.cpp does not save "
                             "them): positions an edit brings back into the window have no SWA cells")
        res = self._rebuild(new_sec, tokens, out_seq)
        res.edit_path = path
        res.edit_notes = notes
        res.edit_streamed = streamed is not None
        from .tokens import follow   # the token list follows the cache; no-op and shared-cell notes

        follow(self, res, run, s_id if self.state.scope == "seq" else None, tokens)
        return res

    def _edit_in_memory(self, model: Any, run: List[Op], ids: List[int], s_id: int, out_seq: int,
                        flags: int) -> Tuple[bytes, List[str]]:
        """The edit in a pymem memory holding the whole state: the new sections' bytes, notes."""
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
        return new_sec, notes

    def _rebuild(self, sec: Any, tokens: List[int], seq_id: int) -> "_Saved":  # pragma: no cover
        raise NotImplementedError

    def _new_state(self, sec: Any, seq_id: Optional[int]) -> MemoryState:
        """The edited state from its bytes, or from its parsed sections (a streamed edit)."""
        lay = self.state.layout
        if isinstance(sec, list):
            offs, o = [], 0
            for x in sec:
                offs.append(o)
                o += x.nbytes
            return MemoryState(lay, sec, offs, self.state.format, self.state.scope, seq_id, self.state.flags)
        secs, offs, end = _parse_sections(memoryview(sec), 0, len(sec), lay, self.state.format, "edited state")
        if end != len(sec):
            raise StateError(f"edited state: {len(sec) - end} bytes left over at offset {end}")  # pragma: no cover
        return MemoryState(lay, secs, offs, self.state.format, self.state.scope, seq_id, self.state.flags)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Saved) and type(other) is type(self) and self.dump() == other.dump()

    __hash__ = None  # type: ignore[assignment]


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
        return cls.parse(mapped.read(path, progress), model, layout, strict, name=os.fspath(path))

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

    def _rebuild(self, sec: Any, tokens: List[int], seq_id: int) -> "Session":
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
        return cls.parse(mapped.read(path, progress), model, layout, strict, name=os.fspath(path))

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

    def _rebuild(self, sec: Any, tokens: List[int], seq_id: int) -> "SeqState":
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

    def _rebuild(self, sec: Any, tokens: List[int], seq_id: int) -> "Blob":
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


def parse(data: Any, layout: Any = None, model: Any = None, kind: Optional[str] = None,
          strict: bool = True, name: str = "") -> Union[Session, SeqState, Blob]:
    """Parse any llama.cpp state: a session file, a sequence state file, a context blob, a
    sequence blob or bare memory sections (``kind``: "session", "seq_file", "context",
    "seq", "sections"; default: recognised from the first bytes)."""
    mv = memoryview(data)
    auto = kind is None
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
        if auto:
            try:
                return Blob.parse(mv, model, layout, envelope=None, name=name)
            except LayoutAmbiguousError:
                raise
            except StateError as exc:
                raise StateError(f"{name or 'input'}: not a llama.cpp state file (no session 'ggsn' or sequence "
                                 "'ggsq' magic, no sequence-blob magic, no architecture name at offset 0); read as "
                                 f"bare memory sections: {exc}") from None
        return Blob.parse(mv, model, layout, envelope=None, name=name)
    raise E.InvalidArgumentError(f"unknown state kind {kind!r}")


def load(path: PathLike, model: Any = None, layout: Any = None, kind: Optional[str] = None, strict: bool = True,
         progress: Progress = None) -> Union[Session, SeqState, Blob]:
    """Read and parse any llama.cpp state file (see :func:`parse`)."""
    return parse(mapped.read(path, progress), layout, model, kind, strict, name=os.fspath(path))
