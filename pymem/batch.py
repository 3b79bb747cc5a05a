"""Decode batches and their ubatches.

A :class:`Batch` is what you would pass to ``llama_decode``: tokens (or, for an embedding
batch, just a token count), positions, sequence ids and output flags.  ``Memory.init_batch``
validates it exactly as llama.cpp does, splits it into ubatches with llama.cpp's rules and
dry-runs their placement; iterating the returned :class:`BatchContext` gives
:class:`UBatch` objects whose ``apply()`` places the tokens where llama.cpp would.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from . import _errors as E
from ._guard import Guard, u32
from ._native import as_i32, check, ffi, lib

__all__ = ["Batch", "BatchContext", "UBatch", "seq_set_order"]


def seq_set_order(ids: Sequence[int]) -> list[int]:
    """The order llama.cpp (libstdc++'s ``unordered_set``) gives to sequence ids inserted in
    this order; duplicates collapse.  The first id is the token's *primary* sequence."""
    arr = as_i32(list(ids), what="ids")
    out = ffi.new("pm_seq_id[]", max(1, arr.size))
    n = lib.pm_seq_set_order(ffi.from_buffer("pm_seq_id[]", arr), arr.size, out)
    return list(out[0:n])


class Batch:
    """A decode batch, as ``llama_batch``.

    Args:
        tokens: token ids, or None for an embedding batch (then give ``n_tokens``).
        pos: positions; None lets them follow each sequence's last position (llama.cpp's rule
            for a NULL ``pos``, using the first listed id of each token); a 2-D array
            ``[n_sections, n_tokens]`` gives M-RoPE sections.
        seq_ids: per token a list of sequence ids (or one int); None puts every token in
            sequence 0.  Each token's ids are ordered as llama.cpp orders them, so the
            *last* listed id of a small set becomes the primary one (see :attr:`primary`).
        output: per-token output flags; None marks only the last token, True marks all.
        n_tokens: token count of an embedding batch.
    """

    def __init__(
        self,
        tokens: Sequence[int] | np.ndarray | None = None,
        pos: Sequence[int] | np.ndarray | None = None,
        seq_ids: Sequence[Sequence[int] | int] | None = None,
        output: Sequence[bool] | bool | None = None,
        n_tokens: int | None = None,
    ) -> None:
        if tokens is not None:
            tok = as_i32(tokens, what="tokens")
            n = tok.size
            if n_tokens is not None and n_tokens != n:
                raise E.InvalidArgumentError(f"n_tokens {n_tokens} != len(tokens) {n}")
        else:
            if n_tokens is None:
                raise E.InvalidArgumentError("an embedding batch (tokens=None) needs n_tokens")
            tok = None
            n = int(n_tokens)
        if n < 0:
            raise E.InvalidArgumentError("n_tokens must be >= 0")
        u32(n, "n_tokens", "Batch")
        self._n = n
        pos_arr = None
        n_pos = 0
        if pos is not None:
            p = np.asarray(pos)
            if p.ndim == 1:
                pos_arr = as_i32(p, n, "pos")
                n_pos = 1
            elif p.ndim == 2 and p.shape[1] == n and 1 <= p.shape[0] <= 4:
                pos_arr = as_i32(p.reshape(-1), n * p.shape[0], "pos")
                n_pos = p.shape[0]
            else:
                raise E.InvalidArgumentError(f"pos must have shape [{n}] or [sections, {n}]")
        nsid = sid = None
        if seq_ids is not None:
            if len(seq_ids) != n:
                raise E.InvalidArgumentError(f"seq_ids needs {n} entries, got {len(seq_ids)}")
            lists = [[s] if isinstance(s, (int, np.integer)) else list(s) for s in seq_ids]
            nsid = as_i32([len(x) for x in lists], n, "n_seq_id")
            sid = as_i32([v for x in lists for v in x] or [0], what="seq_ids")
        out = None
        if output is True:
            out = np.ones(n, np.int8)
        elif output is not None and output is not False:
            out = np.ascontiguousarray(np.asarray(output, dtype=bool), dtype=np.int8)
            if out.size != n:
                raise E.InvalidArgumentError(f"output needs {n} entries, got {out.size}")
        elif output is False:
            out = np.zeros(n, np.int8)
        ptr = ffi.new("pm_batch **")
        keep = [tok, pos_arr, nsid, sid, out]
        check(
            lib.pm_batch_new(
                n,
                ffi.from_buffer("pm_token[]", tok) if tok is not None else ffi.NULL,
                ffi.from_buffer("pm_pos[]", pos_arr) if pos_arr is not None else ffi.NULL,
                n_pos,
                ffi.from_buffer("int32_t[]", nsid) if nsid is not None else ffi.NULL,
                ffi.from_buffer("pm_seq_id[]", sid) if sid is not None else ffi.NULL,
                ffi.from_buffer("int8_t[]", out) if out is not None else ffi.NULL,
                ptr,
            ),
            "Batch",
        )
        del keep
        self._ptr = ffi.gc(ptr[0], lib.pm_batch_free)
        self.tokens = None if tok is None else tok.copy()
        self.pos = None if pos_arr is None else pos_arr.reshape(n_pos, n).copy()

    def __len__(self) -> int:
        return self._n

    def seq_ids(self, i: int) -> list[int]:
        """Token i's sequence ids in llama.cpp's order (primary first)."""
        if not 0 <= i < self._n:
            raise IndexError(i)
        buf = ffi.new("pm_seq_id[]", 256)
        n = lib.pm_batch_seq_ids(self._ptr, i, buf, 256)
        return list(buf[0:n])

    @property
    def primary(self) -> list[int]:
        """The primary sequence id of every token (what llama.cpp's KQ mask uses)."""
        return [self.seq_ids(i)[0] for i in range(self._n)]

    def __repr__(self) -> str:
        return f"Batch(n_tokens={self._n}, embeddings={self.tokens is None})"


class UBatch:
    """One ubatch of a :class:`BatchContext`: apply it, then read its cells, store its K/V
    rows and compute its KQ mask.  Every call checks that the memory is still open."""

    def __init__(self, ctx: "BatchContext", index: int) -> None:
        if not isinstance(ctx, BatchContext):
            raise TypeError(f"UBatch needs a pymem.BatchContext, not {type(ctx).__name__}")
        index = u32(index, "index", "UBatch")
        n_ub = ctx._n_ubatch
        if index >= n_ub:
            raise E.InvalidArgumentError(f"UBatch: index {index} out of range (the context has {n_ub} ubatches)")
        self._ctx = ctx
        self.index = index
        info = ffi.new("pm_ubatch_info *")
        ctx._call("ubatch", lib.pm_mctx_ubatch_info, index, info)
        self.n_tokens: int = info.n_tokens
        self.n_seq_tokens: int = info.n_seq_tokens
        self.n_seqs: int = info.n_seqs
        self.n_seqs_unq: int = info.n_seqs_unq
        self.equal_seqs: bool = bool(info.equal_seqs)
        self.n_stream: int = info.n_stream
        n = self.n_tokens
        self.batch_idx = np.empty(n, np.uint32)
        self.pos = np.empty(n, np.int32)
        self.seq = np.empty(n, np.int32)
        self.output = np.empty(n, np.int8)
        ctx._call("ubatch", lib.pm_mctx_ubatch_tokens, index,
                  ffi.from_buffer("uint32_t[]", self.batch_idx, require_writable=True),
                  ffi.from_buffer("pm_pos[]", self.pos, require_writable=True),
                  ffi.from_buffer("pm_seq_id[]", self.seq, require_writable=True),
                  ffi.from_buffer("int8_t[]", self.output, require_writable=True))

    def _cells(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        ns = max(self.n_stream, 1)
        streams = np.empty(ns, np.uint32)
        cells = np.empty(self.n_tokens, np.uint32)
        self._ctx._call("cells", lib.pm_mctx_cells, self.index, part,
                        ffi.from_buffer("uint32_t[]", streams, require_writable=True),
                        ffi.from_buffer("uint32_t[]", cells, require_writable=True))
        return streams, cells.astype(np.int32).reshape(ns, self.n_tokens // ns)

    @property
    def cells(self) -> np.ndarray:
        """int32 ``[n_stream, n_tokens_per_stream]``: the cell of each token, as llama.cpp
        places it (known after init_batch; valid once applied)."""
        return self._cells(0)[1]

    @property
    def streams(self) -> np.ndarray:
        """The stream of each row of :attr:`cells`."""
        return self._cells(0)[0]

    def _info(self) -> Any:
        info = ffi.new("pm_ubatch_info *")
        self._ctx._call("ubatch", lib.pm_mctx_ubatch_info, self.index, info)
        return info

    @property
    def applied(self) -> bool:
        return bool(self._info().applied)

    @property
    def n_kv(self) -> int:
        """Cells the attention looks at (llama.cpp's padded n_kv), after apply."""
        return int(self._info().n_kv)

    @property
    def rec_range(self) -> tuple[int, int]:
        """(head, n) of the recurrent cells this applied ubatch used; sequence set s lives in
        cell head + s."""
        head = ffi.new("uint32_t *")
        n = ffi.new("uint32_t *")
        self._ctx._call("rec_range", lib.pm_mctx_rec_range, self.index, head, n)
        return int(head[0]), int(n[0])

    def store_state(self, layer: int, r: np.ndarray | bytes | None = None, s: np.ndarray | bytes | None = None) -> None:
        """Store the new recurrent states of MODEL layer ``layer`` for this applied ubatch: one
        raw r row and one s row per sequence set (``n_seqs`` rows each)."""
        rb, _ = _rows(r)
        sb, _ = _rows(s)
        rb = None if rb is None else np.ascontiguousarray(rb).view(np.uint8)
        sb = None if sb is None else np.ascontiguousarray(sb).view(np.uint8)
        layer = _layer_id(layer)
        self._ctx._call("store_state", lib.pm_mctx_store_rs, self.index, layer,
                        ffi.from_buffer(rb) if rb is not None else ffi.NULL, 0 if rb is None else rb.nbytes,
                        ffi.from_buffer(sb) if sb is not None else ffi.NULL, 0 if sb is None else sb.nbytes)

    def apply(self) -> None:
        """Place the ubatch in the memory (ubatches must be applied in order)."""
        self._ctx._call("apply", lib.pm_mctx_apply, self.index)

    def store(self, layer: int, k: np.ndarray | None = None, v: np.ndarray | None = None) -> None:
        """Store the K and V rows of this ubatch's tokens for MODEL layer ``layer``.

        ``k``/``v``: ``[n_tokens, n_embd_k_gqa]`` float32 rows (converted to f32/f16/bf16/q8_0
        caches), or raw rows of the cache type as bytes / uint8 ``[n_tokens, row_bytes]``.
        Valid for the latest applied ubatch."""
        kb, kf = _rows(k)
        vb, vf = _rows(v)
        if k is not None and v is not None and kf != vf:
            raise E.InvalidArgumentError("k and v must both be float32 or both raw rows")
        is_f32 = kf if k is not None else vf
        layer = _layer_id(layer)
        self._ctx._call("store", lib.pm_mctx_store, self.index, layer,
                        ffi.from_buffer(kb) if kb is not None else ffi.NULL, 0 if kb is None else kb.nbytes,
                        ffi.from_buffer(vb) if vb is not None else ffi.NULL, 0 if vb is None else vb.nbytes,
                        bool(is_f32))

    def __repr__(self) -> str:
        if self._ctx._guard.closed:
            return f"<UBatch {self.index}: {self.n_tokens} tokens, memory closed>"
        return (f"<UBatch {self.index}: {self.n_tokens} tokens, {self.n_seqs} sequence sets, "
                f"{self.n_stream} stream{'s' if self.n_stream != 1 else ''}, "
                f"{'applied' if self.applied else 'not applied'}>")


def _layer_id(layer: object) -> int:
    v = int(layer)  # type: ignore[call-overload]
    if not 0 <= v < 2**32:
        raise E.InvalidArgumentError(f"model layer {v} is not held by this memory")
    return v


def _rows(x: object) -> tuple[np.ndarray | None, bool]:
    if x is None:
        return None, False
    if isinstance(x, (bytes, bytearray, memoryview)):
        return np.frombuffer(x, np.uint8), False
    a = np.asarray(x)
    if a.dtype == np.float32:
        return np.ascontiguousarray(a), True
    if a.dtype in (np.float64, np.float16):
        return np.ascontiguousarray(a, dtype=np.float32), True
    return np.ascontiguousarray(a).view(np.uint8), False


class BatchContext:
    """The ubatches of one batch, ready to apply (llama.cpp's memory context).  It belongs to
    the memory that made it: it uses the memory's guard (lock, open check) for every call."""

    def __init__(self, guard: Guard, ptr: Any) -> None:
        if not isinstance(guard, Guard):
            raise TypeError("BatchContext objects come from Memory.init_batch() / Memory.decode()")
        self._guard = guard
        self._ptr = ffi.gc(ptr, lib.pm_mctx_free)
        self._n_ubatch = int(lib.pm_mctx_n_ubatch(self._ptr))
        self.ubatches = [UBatch(self, i) for i in range(self._n_ubatch)]

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        return self._guard.call_on(self._ptr, what, fn, *args)

    def __len__(self) -> int:
        return len(self.ubatches)

    def __iter__(self) -> Iterator[UBatch]:
        return iter(self.ubatches)

    def __getitem__(self, i: int) -> UBatch:
        return self.ubatches[i]

    def apply_all(self) -> None:
        """Apply every ubatch in order."""
        for ub in self.ubatches:
            ub.apply()

    def __repr__(self) -> str:
        return f"<BatchContext: {len(self)} ubatch{'es' if len(self) != 1 else ''}>"
