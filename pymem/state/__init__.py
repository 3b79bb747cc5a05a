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

Formats: a session file is ``u32 'ggsn', u32 version, u32 n_tokens,
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
The structure path does not hold the state in memory: the operations run on a skeleton
of the cells, and the result's rows are gathered from the (memory-mapped) input while it is
saved (:mod:`pymem.state.streamedit`; ``result.edit_streamed``), so editing a large file
takes a few MiB beyond its cell lists.

Errors: :class:`pymem.StateError` (truncated, foreign or corrupt input, naming what and
where), :class:`LayoutAmbiguousError` (a subclass), :class:`EditError` (an edit llama.cpp
would refuse or that cannot be done).  Nothing is ever written partially: files are
written to a temporary name and renamed.
"""
from __future__ import annotations

from . import files  # noqa: F401  (pymem.state.files: read_file, atomic_write)
from .diff import Diff, diff
from .edit import Op, apply_ops, memory_params, parse_op
from .envelopes import (
    MAGIC_SEQ_BLOB,
    MAGIC_SEQ_FILE,
    MAGIC_SESSION,
    SEQ_FILE_VERSIONS,
    SESSION_VERSIONS,
    EditError,
    unwrap_context,
    unwrap_seq,
    wrap_context,
    wrap_seq,
)
from .layout import Layout, LayoutAmbiguousError, SectionSpec
from .memstate import MemoryState, SeqInfo
from .parse import infer_layout
from .saved import Blob, SeqState, Session, load, parse

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
