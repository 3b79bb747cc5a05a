"""In-process wrappers around llama.cpp's C API (model, context, decode, memory, state).

Only the low-level C API of the pinned llama.cpp build (b11739) is used, through the cffi
bindings of ``llama-cpp-py-sync`` (see :mod:`pymem.llama._loader`). Importing this module
does not load llama.cpp; the first :class:`Model` does.

A ``GGML_ASSERT`` inside llama.cpp aborts the whole process. Scenarios that may assert should
run in :class:`pymem._oracle.worker.OracleWorker`, which isolates llama.cpp in a child process.

Example::

    m = Model("llama.gguf")
    c = Context(m, n_ctx=256, n_seq_max=4, kv_unified=True, flash_attn=False)
    assert c.decode([(5, 0, [0]), (6, 1, [0])]) == 0
    c.seq_rm(0, 1, -1)
    blob = c.state_seq_get(0)
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..llama import _loader

__all__ = [
    "Model",
    "Context",
    "LlamaError",
    "BatchItem",
    "FLAGS_NONE",
    "FLAGS_SWA_ONLY",
    "FLAGS_PARTIAL_ONLY",
    "FLAGS_ON_DEVICE",
    "GGML_TYPE",
    "context_default_params",
    "log_text",
]

# llama_state_seq_flags
FLAGS_NONE = 0
FLAGS_SWA_ONLY = 1  # == LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
FLAGS_PARTIAL_ONLY = 1
FLAGS_ON_DEVICE = 2

#: ggml type ids usable as ``type_k`` / ``type_v``
GGML_TYPE: Dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
    "iq4_nl": 20, "bf16": 30,
}

#: one decode item: (token, pos or None, seq id / list of seq ids / None)
BatchItem = Tuple[int, Optional[int], Union[int, Sequence[int], None]]


_ROPE_TYPES = {-1: "none", 0: "norm", 2: "neox", 8: "mrope", 24: "vision", 40: "imrope"}


class LlamaError(RuntimeError):
    """A llama.cpp call failed (NULL model/context etc.); the message includes the log tail."""


def _ensure_type(t: Union[int, str, None]) -> Optional[int]:
    if t is None or isinstance(t, int):
        return t
    try:
        return GGML_TYPE[t.lower()]
    except KeyError:
        raise ValueError(f"unknown ggml type {t!r}; known: {sorted(GGML_TYPE)}") from None


def log_text(n: int = 20, min_level: int = 0) -> str:
    """The last ``n`` captured llama.cpp log lines (see :mod:`pymem.llama._loader`)."""
    return _loader.log_text(n, min_level)


def context_default_params() -> Dict[str, Any]:
    """``llama_context_default_params()`` of the loaded library as a plain dict."""
    ffi, lib, _ = _loader.load()
    cp = lib.llama_context_default_params()
    out = {}
    for f in dir(cp):
        v = getattr(cp, f)
        if isinstance(v, (int, float, bool)):
            out[f] = v
    return out


# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------
class Model:
    """A llama.cpp model loaded from a GGUF file (CPU only, no progress output).

    ``metadata_only=True`` builds the model from the GGUF's metadata alone, allocating no
    weights (``llama_model_init_from_user`` with ``no_alloc`` and a callback that does
    nothing): contexts created on it log the sizes of their memory without allocating it,
    which is how the planner is checked at full-size shapes. Such a model cannot decode."""

    def __init__(self, path: Union[str, os.PathLike], metadata_only: bool = False) -> None:
        ffi, lib, ggml = _loader.load()
        self._ffi, self._lib = ffi, lib
        self.path = os.fspath(path)
        self.metadata_only = bool(metadata_only)
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._progress = ffi.callback("bool(float, void *)", lambda p, ud: True)
        mp.progress_callback = self._progress  # silences the '....' progress dots
        mark = _loader.log_mark()
        if self.metadata_only:
            mp.no_alloc = True
            g = ggml.gguf_init_from_file(self.path.encode(), {"no_alloc": True, "ctx": ffi.NULL})
            if g == ffi.NULL:
                raise LlamaError(f"gguf_init_from_file({self.path!r}) failed")
            self._fill = ffi.callback("void(struct ggml_tensor *, void *)", lambda t, ud: None)
            try:
                self.ptr = lib.llama_model_init_from_user(g, self._fill, ffi.NULL, mp)
            finally:
                ggml.gguf_free(g)
        else:
            self.ptr = lib.llama_model_load_from_file(self.path.encode(), mp)
        if self.ptr == ffi.NULL:
            self.ptr = None
            what = "llama_model_init_from_user" if self.metadata_only else "llama_model_load_from_file"
            raise LlamaError(f"{what}({self.path!r}) failed:\n"
                             + "".join(t for _, t in _loader.log_since(mark, 3)))
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self.vocab)
        self.n_layer: int = lib.llama_model_n_layer(self.ptr)
        self.n_embd: int = lib.llama_model_n_embd(self.ptr)
        self.n_head: int = lib.llama_model_n_head(self.ptr)
        self.n_head_kv: int = lib.llama_model_n_head_kv(self.ptr)
        self.n_swa: int = lib.llama_model_n_swa(self.ptr)
        self.n_ctx_train: int = lib.llama_model_n_ctx_train(self.ptr)
        self.is_recurrent: bool = bool(lib.llama_model_is_recurrent(self.ptr))
        self.is_hybrid: bool = bool(lib.llama_model_is_hybrid(self.ptr))
        self.arch: Optional[str] = self.meta("general.architecture")
        rt = int(lib.llama_model_rope_type(self.ptr))
        # numeric values from llama.h (the wheel's cdef enum lost the explicit values)
        self.rope_type: str = _ROPE_TYPES.get(rt, str(rt))

    def meta(self, key: str) -> Optional[str]:
        """``llama_model_meta_val_str`` (None if the key is absent)."""
        ffi, lib = self._ffi, self._lib
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), ffi.NULL, 0)
        if n < 0:
            return None
        buf = ffi.new("char[]", n + 1)
        lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return ffi.string(buf).decode("utf-8", "replace")

    def info(self) -> Dict[str, Any]:
        """Plain-dict summary (picklable)."""
        return {k: getattr(self, k) for k in (
            "path", "arch", "n_vocab", "n_layer", "n_embd", "n_head", "n_head_kv", "n_swa",
            "n_ctx_train", "is_recurrent", "is_hybrid", "rope_type", "metadata_only")}

    def context(self, **params: Any) -> "Context":
        """Shortcut for ``Context(self, **params)``."""
        return Context(self, **params)

    def close(self) -> None:
        """Free the model (contexts using it must be closed first)."""
        if getattr(self, "ptr", None) is not None:
            self._lib.llama_model_free(self.ptr)
        self.ptr = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Model({self.path!r}, arch={self.arch!r}, n_layer={self.n_layer})"


# ----------------------------------------------------------------------------------------
# context
# ----------------------------------------------------------------------------------------
class Context:
    """A llama.cpp context.

    Every parameter left as ``None`` keeps the value of ``llama_context_default_params()``
    (b11739: n_ctx 512, n_batch 2048, n_ubatch 512, n_seq_max 1, kv_unified False,
    swa_full True, flash_attn auto (-1), type_k/type_v F16, n_rs_seq 0). The only
    deviation is ``n_threads=1`` (also used for ``n_threads_batch``). Pass ``kv_unified``,
    ``swa_full`` and ``flash_attn`` explicitly in differential tests.

    ``flash_attn``: True/1 = on, False/0 = off, -1 = auto. ``type_k``/``type_v``: ggml type id
    or name ("f16", "q8_0", ...). ``extra`` sets further ``llama_context_params`` fields by name.
    """

    def __init__(self, model: Model, n_ctx: Optional[int] = None, n_seq_max: Optional[int] = None,
                 kv_unified: Optional[bool] = None, flash_attn: Union[bool, int, None] = None,
                 swa_full: Optional[bool] = None, type_k: Union[int, str, None] = None,
                 type_v: Union[int, str, None] = None, n_rs_seq: Optional[int] = None,
                 n_batch: Optional[int] = None, n_ubatch: Optional[int] = None,
                 n_threads: int = 1, **extra: Any) -> None:
        ffi, lib, _ = _loader.load()
        self._ffi, self._lib = ffi, lib
        self.model = model
        self.ptr = None
        cp = lib.llama_context_default_params()
        given = dict(n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=kv_unified, swa_full=swa_full,
                     type_k=_ensure_type(type_k), type_v=_ensure_type(type_v), n_rs_seq=n_rs_seq,
                     n_batch=n_batch, n_ubatch=n_ubatch)
        if flash_attn is not None:
            given["flash_attn_type"] = int(flash_attn)
        given.update(extra)
        for k, v in given.items():
            if v is None:
                continue
            if not hasattr(cp, k):
                raise TypeError(f"unknown llama_context_params field {k!r}")
            setattr(cp, k, v)
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        self.requested = {k: getattr(cp, k) for k in (
            "n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq", "kv_unified", "swa_full",
            "flash_attn_type", "type_k", "type_v", "n_threads")}
        mark = _loader.log_mark()
        ptr = lib.llama_init_from_model(model.ptr, cp)
        if ptr == ffi.NULL:
            raise LlamaError("llama_init_from_model failed:\n"
                             + "".join(t for _, t in _loader.log_since(mark, 3)))
        self.ptr = ptr
        self._creation_log = "".join(t for _, t in _loader.log_since(mark, 2))
        self.mem = lib.llama_get_memory(ptr)
        self.n_vocab = model.n_vocab

    # -- sizes ---------------------------------------------------------------------------
    def n_ctx(self) -> int:
        """``llama_n_ctx`` (total cells, after rounding)."""
        return int(self._lib.llama_n_ctx(self.ptr))

    def n_ctx_seq(self) -> Optional[int]:
        """``llama_n_ctx_seq`` (cells per stream), None if this build lacks it."""
        f = getattr(self._lib, "llama_n_ctx_seq", None)
        return None if f is None else int(f(self.ptr))

    def n_batch(self) -> int:
        return int(self._lib.llama_n_batch(self.ptr))

    def n_ubatch(self) -> int:
        return int(self._lib.llama_n_ubatch(self.ptr))

    def n_seq_max(self) -> int:
        return int(self._lib.llama_n_seq_max(self.ptr))

    def info(self) -> Dict[str, Any]:
        """Requested parameters plus the effective sizes (picklable)."""
        d = dict(self.requested)
        d.update(n_ctx_eff=self.n_ctx(), n_ctx_seq=self.n_ctx_seq(), n_batch_eff=self.n_batch(),
                 n_ubatch_eff=self.n_ubatch(), n_seq_max_eff=self.n_seq_max(),
                 has_memory=self.mem != self._ffi.NULL)
        return d

    # -- decode --------------------------------------------------------------------------
    def decode(self, items: Sequence[BatchItem],
               logits: Union[None, bool, Sequence[bool]] = None) -> int:
        """One ``llama_decode`` call with exactly ``items``; returns its rc.

        ``items``: ``(token, pos, seq_ids)`` triples. ``pos`` None for *every* item passes a
        NULL pos array (llama.cpp then continues each seq at pos_max+1); ``seq_ids`` None for
        every item passes NULL ``n_seq_id``/``seq_id`` (seq 0). ``logits``: None passes a NULL
        logits array (llama.cpp's default: output for the last token only), True = every
        token, False = none, or a per-item sequence of bools.
        """
        ffi, lib = self._ffi, self._lib
        n = len(items)
        cap = max(n, 1)
        tok = ffi.new("llama_token[]", cap)
        pos_none = [it[1] is None for it in items]
        seq_none = [it[2] is None for it in items]
        if any(pos_none) and not all(pos_none):
            raise ValueError("pos must be None for all items or for none")
        if any(seq_none) and not all(seq_none):
            raise ValueError("seq_ids must be None for all items or for none")
        pos = ffi.NULL if (n and all(pos_none)) else ffi.new("llama_pos[]", cap)
        nseq = ffi.NULL if (n and all(seq_none)) else ffi.new("int32_t[]", cap)
        seq_ptrs = ffi.NULL if nseq == ffi.NULL else ffi.new("llama_seq_id *[]", cap + 1)
        keep: List[Any] = []
        for i, (t, p, s) in enumerate(items):
            tok[i] = t
            if pos != ffi.NULL:
                pos[i] = p
            if nseq != ffi.NULL:
                ids = [s] if isinstance(s, int) else list(s)
                arr = ffi.new("llama_seq_id[]", ids or [0])
                keep.append(arr)
                nseq[i] = len(ids)
                seq_ptrs[i] = arr
        if logits is None:
            lg = ffi.NULL
        else:
            if isinstance(logits, bool):
                flags = [logits] * n
            else:
                flags = [bool(x) for x in logits]
                if len(flags) != n:
                    raise ValueError(f"logits has {len(flags)} entries for {n} items")
            lg = ffi.new("int8_t[]", [int(x) for x in flags] or [0])
        b = ffi.new("llama_batch *")
        b.n_tokens = n
        b.token = tok
        b.embd = ffi.NULL
        b.pos = pos
        b.n_seq_id = nseq
        b.seq_id = seq_ptrs
        b.logits = lg
        return int(lib.llama_decode(self.ptr, b[0]))

    def decode_seq(self, seq: int, tokens: Iterable[int], pos0: int = 0,
                   logits: Union[None, bool, Sequence[bool]] = None) -> int:
        """Decode ``tokens`` for one seq at positions ``pos0, pos0+1, ...`` (one llama_decode)."""
        return self.decode([(t, pos0 + i, [seq]) for i, t in enumerate(tokens)], logits=logits)

    def logits(self, i: int = -1) -> Optional[np.ndarray]:
        """``llama_get_logits_ith`` as a float32 copy (None when llama.cpp returns NULL)."""
        p = self._lib.llama_get_logits_ith(self.ptr, i)
        if p == self._ffi.NULL:
            return None
        return np.frombuffer(self._ffi.buffer(p, 4 * self.n_vocab), dtype=np.float32).copy()

    # -- memory --------------------------------------------------------------------------
    def _m(self) -> Any:
        if self.mem == self._ffi.NULL:
            raise LlamaError("this context has no memory module")
        return self.mem

    def clear(self, data: bool = True) -> None:
        """``llama_memory_clear``."""
        self._lib.llama_memory_clear(self._m(), data)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """``llama_memory_seq_rm``."""
        return bool(self._lib.llama_memory_seq_rm(self._m(), seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """``llama_memory_seq_cp``."""
        self._lib.llama_memory_seq_cp(self._m(), src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        """``llama_memory_seq_keep``."""
        self._lib.llama_memory_seq_keep(self._m(), seq)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """``llama_memory_seq_add``."""
        self._lib.llama_memory_seq_add(self._m(), seq, p0, p1, delta)

    def seq_div(self, seq: int, p0: int, p1: int, d: int) -> None:
        """``llama_memory_seq_div``."""
        self._lib.llama_memory_seq_div(self._m(), seq, p0, p1, d)

    def pos_min(self, seq: int) -> int:
        """``llama_memory_seq_pos_min``."""
        return int(self._lib.llama_memory_seq_pos_min(self._m(), seq))

    def pos_max(self, seq: int) -> int:
        """``llama_memory_seq_pos_max``."""
        return int(self._lib.llama_memory_seq_pos_max(self._m(), seq))

    def can_shift(self) -> bool:
        """``llama_memory_can_shift``."""
        return bool(self._lib.llama_memory_can_shift(self._m()))

    def positions(self, seqs: Optional[Iterable[int]] = None) -> Dict[int, Tuple[int, int]]:
        """{seq: (pos_min, pos_max)} for ``seqs`` (default: 0 .. n_seq_max-1)."""
        seqs = range(self.n_seq_max()) if seqs is None else seqs
        return {s: (self.pos_min(s), self.pos_max(s)) for s in seqs}

    # -- state (in memory) ---------------------------------------------------------------
    def state_get_size(self) -> int:
        """``llama_state_get_size``."""
        return int(self._lib.llama_state_get_size(self.ptr))

    def state_get(self, size: Optional[int] = None) -> bytes:
        """``llama_state_get_data`` into a buffer of ``size`` bytes (default: get_size);
        returns the bytes written."""
        n = self.state_get_size() if size is None else size
        buf = self._ffi.new("uint8_t[]", max(n, 1))
        w = self._lib.llama_state_get_data(self.ptr, buf, n)
        return bytes(self._ffi.buffer(buf, w))

    def state_set(self, blob: bytes, size: Optional[int] = None) -> int:
        """``llama_state_set_data`` (``size`` overrides the length passed); returns bytes read."""
        n = len(blob) if size is None else size
        src = self._ffi.from_buffer("uint8_t[]", blob) if len(blob) else self._ffi.new("uint8_t[]", 1)
        return int(self._lib.llama_state_set_data(self.ptr, src, n))

    def state_seq_get_size(self, seq: int, flags: int = 0) -> int:
        """``llama_state_seq_get_size_ext``."""
        return int(self._lib.llama_state_seq_get_size_ext(self.ptr, seq, flags))

    def state_seq_get(self, seq: int, flags: int = 0, size: Optional[int] = None) -> bytes:
        """``llama_state_seq_get_data_ext``; returns the bytes written."""
        n = self.state_seq_get_size(seq, flags) if size is None else size
        buf = self._ffi.new("uint8_t[]", max(n, 1))
        w = self._lib.llama_state_seq_get_data_ext(self.ptr, buf, n, seq, flags)
        return bytes(self._ffi.buffer(buf, w))

    def state_seq_set(self, blob: bytes, seq: int, flags: int = 0, size: Optional[int] = None) -> int:
        """``llama_state_seq_set_data_ext`` into ``seq``; returns bytes read (0 = failure)."""
        n = len(blob) if size is None else size
        src = self._ffi.from_buffer("uint8_t[]", blob) if len(blob) else self._ffi.new("uint8_t[]", 1)
        return int(self._lib.llama_state_seq_set_data_ext(self.ptr, src, n, seq, flags))

    # -- state (files) -------------------------------------------------------------------
    def _tokens(self, tokens: Sequence[int]) -> Any:
        return self._ffi.new("llama_token[]", list(tokens) or [0])

    def state_save_file(self, path: Union[str, os.PathLike], tokens: Sequence[int] = ()) -> bool:
        """``llama_state_save_file`` (session file 'ggsn')."""
        return bool(self._lib.llama_state_save_file(self.ptr, os.fsencode(path),
                                                    self._tokens(tokens), len(tokens)))

    def state_load_file(self, path: Union[str, os.PathLike], capacity: int = 4096,
                        tokens_out: bool = True, with_count: bool = False
                        ) -> Union[Tuple[bool, Optional[List[int]]], Tuple[bool, Optional[List[int]], int]]:
        """``llama_state_load_file`` -> ``(ok, tokens)`` (``+ n_token_count`` if ``with_count``).

        ``tokens_out=False`` passes a NULL token buffer (with ``capacity``); tokens is then None.
        """
        ffi = self._ffi
        buf = ffi.new("llama_token[]", max(capacity, 1)) if tokens_out else ffi.NULL
        n = ffi.new("size_t *")
        ok = bool(self._lib.llama_state_load_file(self.ptr, os.fsencode(path), buf, capacity, n))
        cnt = int(n[0])
        toks = list(buf[0:min(cnt, capacity)]) if (tokens_out and ok) else (None if not tokens_out else [])
        return (ok, toks, cnt) if with_count else (ok, toks)

    def state_seq_save_file(self, path: Union[str, os.PathLike], seq: int,
                            tokens: Sequence[int] = ()) -> int:
        """``llama_state_seq_save_file`` (seq file 'ggsq'); returns the bytes written (0 = failure)."""
        return int(self._lib.llama_state_seq_save_file(self.ptr, os.fsencode(path), seq,
                                                       self._tokens(tokens), len(tokens)))

    def state_seq_load_file(self, path: Union[str, os.PathLike], seq: int, capacity: int = 4096,
                            tokens_out: bool = True, with_count: bool = False
                            ) -> Union[Tuple[int, Optional[List[int]]], Tuple[int, Optional[List[int]], int]]:
        """``llama_state_seq_load_file`` into ``seq`` -> ``(nread, tokens)`` (``+ count``).

        ``nread`` is the number of bytes read (0 = failure). ``tokens_out=False`` passes NULL.
        """
        ffi = self._ffi
        buf = ffi.new("llama_token[]", max(capacity, 1)) if tokens_out else ffi.NULL
        n = ffi.new("size_t *")
        r = int(self._lib.llama_state_seq_load_file(self.ptr, os.fsencode(path), seq, buf, capacity, n))
        cnt = int(n[0])
        toks = list(buf[0:min(cnt, capacity)]) if (tokens_out and r) else (None if not tokens_out else [])
        return (r, toks, cnt) if with_count else (r, toks)

    # -- logs ----------------------------------------------------------------------------
    def creation_log(self) -> str:
        """What llama.cpp logged (info and above) while creating this context: its
        parameters and the sizes of its memory parts."""
        return self._creation_log

    @staticmethod
    def last_log(n: int = 20, min_level: int = 0) -> str:
        """The last ``n`` captured llama.cpp log lines (process-wide)."""
        return _loader.log_text(n, min_level)

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context."""
        if getattr(self, "ptr", None) is not None:
            self._lib.llama_free(self.ptr)
        self.ptr = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
