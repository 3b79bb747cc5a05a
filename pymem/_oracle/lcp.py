"""llama-cpp-python (llama.cpp 0c1e570, state format 10) as a second test oracle.

:class:`LcpWorker` is an :class:`pymem._oracle.worker.OracleWorker` whose child process imports
``llama_cpp`` (llama-cpp-python) instead of the ``llama-cpp-py-sync`` wheel. The two packages
ship different builds of ``libllama`` / ``libggml*`` with the same file names, and
llama-cpp-python loads its libraries ``RTLD_GLOBAL``, so they never share a process. The child
serves the same protocol: ``model()``, ``context()`` and :class:`ContextHandle` methods (the
memory, decode and state calls of :class:`pymem._oracle.capi.Context`), here through
llama-cpp-python's ctypes API (:class:`Context` below). Crash isolation, restarts and
timeouts are the worker's.

Unlike the py-sync worker, this child imports the whole pymem package (its C extension has no
llama.cpp in it), so ``worker.call("run", "module:function", *args)`` can run code that needs
both a live ``llama_cpp.Llama`` and pymem, e.g. the bridge, in the child.

Where llama-cpp-python comes from: an installed ``llama_cpp`` 0.3.36, else the folder
``tools/build_lcp.sh`` builds (:func:`pymem.llama._bridge_lcp.oracle_dir`).
"""
from __future__ import annotations

import collections
import ctypes
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..llama import _bridge_lcp as _lcp
from ..llama._loader import OracleUnavailable
from .worker import CONTEXT_METHODS, OracleWorker, _EOF, _read_frame, _send

__all__ = ["LcpWorker", "Model", "Context", "load", "lcp_available"]

GGML_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}

_LOG: Deque[Tuple[int, int, str]] = collections.deque(maxlen=20000)
_SERIAL = [0]
_ECHO = [False]
_KEEP: List[Any] = []
_L: List[Any] = []


def lcp_available() -> bool:
    """True if llama-cpp-python 0.3.36 can be imported (installed, or the oracle folder)."""
    return _lcp.locate() is not None


def load() -> Any:
    """Import llama-cpp-python (once per process) and capture its log; returns ``llama_cpp``."""
    if _L:
        return _L[0]
    L = _lcp.import_llama_cpp()

    @L.llama_log_callback
    def on_log(level: int, text: bytes, _ud: Any) -> None:
        try:
            s = text.decode("utf-8", "replace")
            _SERIAL[0] += 1
            _LOG.append((_SERIAL[0], int(level), s))
            if _ECHO[0]:
                sys.stderr.write(s)
        except Exception:  # never let an exception escape into C
            pass

    _KEEP.append(on_log)
    L.llama_log_set(on_log, ctypes.c_void_p(0))
    L.llama_backend_init()
    _L.append(L)
    return L


def _log_since(mark: int, min_level: int = 0) -> str:
    out, keep = [], False
    for serial, level, text in list(_LOG):
        if level != 5:
            keep = level >= min_level
        if serial > mark and keep:
            out.append(text)
    return "".join(out)


def _log_text(n: int = 20, min_level: int = 0) -> str:
    lines, keep = [], False
    for _s, level, text in list(_LOG):
        if level != 5:
            keep = level >= min_level
        if keep:
            lines.append(text)
    return "".join(lines[-n:])


class LlamaError(RuntimeError):
    """A llama.cpp call failed (NULL model or context); the message has the log tail."""


class Model:
    """A model loaded by llama-cpp-python's ``libllama`` (CPU, no progress output)."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        L = self._L = load()
        self.path = os.fspath(path)
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._progress = L.llama_progress_callback(lambda p, ud: True)
        mp.progress_callback = self._progress
        mark = _SERIAL[0]
        self.ptr = L.llama_model_load_from_file(self.path.encode(), mp)
        if not self.ptr:
            self.ptr = None
            raise LlamaError(f"llama_model_load_from_file({self.path!r}) failed:\n{_log_since(mark, 3)}")
        vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(vocab))
        self.n_layer = int(L.llama_model_n_layer(self.ptr))
        self.n_embd = int(L.llama_model_n_embd(self.ptr))
        self.n_head = int(L.llama_model_n_head(self.ptr))
        self.n_head_kv = int(L.llama_model_n_head_kv(self.ptr))
        self.n_swa = int(L.llama_model_n_swa(self.ptr))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.ptr))
        self.is_recurrent = bool(L.llama_model_is_recurrent(self.ptr))
        self.is_hybrid = bool(L.llama_model_is_hybrid(self.ptr))
        self.arch = self.meta("general.architecture")

    def meta(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(512)
        n = self._L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def info(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "path", "arch", "n_vocab", "n_layer", "n_embd", "n_head", "n_head_kv", "n_swa",
            "n_ctx_train", "is_recurrent", "is_hybrid")}

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._L.llama_model_free(self.ptr)
        self.ptr = None


def _u8(blob: bytes) -> Any:
    return (ctypes.c_uint8 * max(len(blob), 1)).from_buffer_copy(bytes(blob) or b"\0")


class Context:
    """A llama-cpp-python context with :class:`pymem._oracle.capi.Context`'s methods (those in
    :data:`pymem._oracle.worker.CONTEXT_METHODS`). ``None`` keeps
    ``llama_context_default_params()``; ``n_threads=1``."""

    def __init__(self, model: Model, n_ctx: Optional[int] = None, n_seq_max: Optional[int] = None,
                 kv_unified: Optional[bool] = None, flash_attn: Union[bool, int, None] = None,
                 swa_full: Optional[bool] = None, type_k: Union[int, str, None] = None,
                 type_v: Union[int, str, None] = None, n_rs_seq: Optional[int] = None,
                 n_batch: Optional[int] = None, n_ubatch: Optional[int] = None, n_threads: int = 1) -> None:
        L = self._L = load()
        self.model = model
        self.ptr = None
        cp = L.llama_context_default_params()
        given = dict(n_ctx=n_ctx, n_seq_max=n_seq_max, kv_unified=kv_unified, swa_full=swa_full,
                     type_k=GGML_TYPE[type_k] if isinstance(type_k, str) else type_k,
                     type_v=GGML_TYPE[type_v] if isinstance(type_v, str) else type_v,
                     n_rs_seq=n_rs_seq, n_batch=n_batch, n_ubatch=n_ubatch,
                     flash_attn_type=None if flash_attn is None else int(flash_attn))
        for k, v in given.items():
            if v is not None:
                setattr(cp, k, v)
        cp.n_threads = cp.n_threads_batch = n_threads
        self.requested = {k: getattr(cp, k) for k in (
            "n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq", "kv_unified", "swa_full",
            "flash_attn_type", "type_k", "type_v", "n_threads")}
        mark = _SERIAL[0]
        ptr = L.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise LlamaError("llama_init_from_model failed:\n" + _log_since(mark, 3))
        self.ptr = ptr
        self._creation_log = _log_since(mark, 2)
        self.mem = L.llama_get_memory(ptr)
        self.n_vocab = model.n_vocab

    # sizes
    def n_ctx(self) -> int:
        return int(self._L.llama_n_ctx(self.ptr))

    def n_ctx_seq(self) -> int:
        return int(self._L.llama_n_ctx_seq(self.ptr))

    def n_batch(self) -> int:
        return int(self._L.llama_n_batch(self.ptr))

    def n_ubatch(self) -> int:
        return int(self._L.llama_n_ubatch(self.ptr))

    def n_seq_max(self) -> int:
        return int(self._L.llama_n_seq_max(self.ptr))

    def info(self) -> Dict[str, Any]:
        d = dict(self.requested)
        d.update(n_ctx_eff=self.n_ctx(), n_ctx_seq=self.n_ctx_seq(), n_batch_eff=self.n_batch(),
                 n_ubatch_eff=self.n_ubatch(), n_seq_max_eff=self.n_seq_max(), has_memory=bool(self.mem))
        return d

    # decode
    def decode(self, items: Sequence[Tuple[int, Optional[int], Any]],
               logits: Union[None, bool, Sequence[bool]] = None) -> int:
        L, n = self._L, len(items)
        cap = max(n, 1)
        tok = (ctypes.c_int32 * cap)(*[int(t) for t, _, _ in items])
        b = L.llama_batch()
        b.n_tokens = n
        b.token = tok
        keep: List[Any] = [tok]
        if n and all(it[1] is None for it in items):
            b.pos = None
        else:
            pos = (ctypes.c_int32 * cap)(*[int(p) for _, p, _ in items])
            keep.append(pos)
            b.pos = pos
        if n and all(it[2] is None for it in items):
            b.n_seq_id, b.seq_id = None, None
        else:
            nseq = (ctypes.c_int32 * cap)()
            ptrs = (ctypes.POINTER(ctypes.c_int32) * (cap + 1))()
            for i, (_, _, s) in enumerate(items):
                ids = [s] if isinstance(s, int) else list(s)
                arr = (ctypes.c_int32 * max(len(ids), 1))(*ids)
                keep.append(arr)
                nseq[i] = len(ids)
                ptrs[i] = ctypes.cast(arr, ctypes.POINTER(ctypes.c_int32))
            keep += [nseq, ptrs]
            b.n_seq_id, b.seq_id = nseq, ptrs
        if logits is None:
            b.logits = None
        else:
            flags = [logits] * n if isinstance(logits, bool) else [bool(x) for x in logits]
            lg = (ctypes.c_int8 * cap)(*[int(x) for x in flags])
            keep.append(lg)
            b.logits = lg
        return int(L.llama_decode(self.ptr, b))

    def decode_seq(self, seq: int, tokens: Iterable[int], pos0: int = 0, logits: Any = None) -> int:
        return self.decode([(t, pos0 + i, [seq]) for i, t in enumerate(tokens)], logits=logits)

    def logits(self, i: int = -1) -> Any:
        import numpy as np

        p = self._L.llama_get_logits_ith(self.ptr, i)
        if not p:
            return None
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).astype(np.float32).copy()

    # memory
    def clear(self, data: bool = True) -> None:
        self._L.llama_memory_clear(self.mem, data)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(self._L.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._L.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self._L.llama_memory_seq_keep(self.mem, seq)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        self._L.llama_memory_seq_add(self.mem, seq, p0, p1, delta)

    def seq_div(self, seq: int, p0: int, p1: int, d: int) -> None:
        self._L.llama_memory_seq_div(self.mem, seq, p0, p1, d)

    def pos_min(self, seq: int) -> int:
        return int(self._L.llama_memory_seq_pos_min(self.mem, seq))

    def pos_max(self, seq: int) -> int:
        return int(self._L.llama_memory_seq_pos_max(self.mem, seq))

    def can_shift(self) -> bool:
        return bool(self._L.llama_memory_can_shift(self.mem))

    def positions(self, seqs: Optional[Iterable[int]] = None) -> Dict[int, Tuple[int, int]]:
        seqs = range(self.n_seq_max()) if seqs is None else seqs
        return {s: (self.pos_min(s), self.pos_max(s)) for s in seqs}

    # state in memory
    def state_get_size(self) -> int:
        return int(self._L.llama_state_get_size(self.ptr))

    def state_get(self, size: Optional[int] = None) -> bytes:
        n = self.state_get_size() if size is None else size
        buf = (ctypes.c_uint8 * max(n, 1))()
        w = int(self._L.llama_state_get_data(self.ptr, buf, n))
        return bytes(buf)[:w]

    def state_set(self, blob: bytes, size: Optional[int] = None) -> int:
        n = len(blob) if size is None else size
        return int(self._L.llama_state_set_data(self.ptr, _u8(blob), n))

    def state_seq_get_size(self, seq: int, flags: int = 0) -> int:
        return int(self._L.llama_state_seq_get_size_ext(self.ptr, seq, flags))

    def state_seq_get(self, seq: int, flags: int = 0, size: Optional[int] = None) -> bytes:
        n = self.state_seq_get_size(seq, flags) if size is None else size
        buf = (ctypes.c_uint8 * max(n, 1))()
        w = int(self._L.llama_state_seq_get_data_ext(self.ptr, buf, n, seq, flags))
        return bytes(buf)[:w]

    def state_seq_set(self, blob: bytes, seq: int, flags: int = 0, size: Optional[int] = None) -> int:
        n = len(blob) if size is None else size
        return int(self._L.llama_state_seq_set_data_ext(self.ptr, _u8(blob), n, seq, flags))

    # state files
    @staticmethod
    def _toks(tokens: Sequence[int]) -> Any:
        return (ctypes.c_int32 * max(len(tokens), 1))(*tokens)

    def state_save_file(self, path: Any, tokens: Sequence[int] = ()) -> bool:
        return bool(self._L.llama_state_save_file(self.ptr, os.fsencode(path), self._toks(tokens), len(tokens)))

    def state_load_file(self, path: Any, capacity: int = 4096, tokens_out: bool = True,
                        with_count: bool = False) -> Any:
        buf = (ctypes.c_int32 * max(capacity, 1))()
        n = ctypes.c_size_t(0)
        ok = bool(self._L.llama_state_load_file(self.ptr, os.fsencode(path), buf if tokens_out else None,
                                                capacity, ctypes.byref(n)))
        cnt = int(n.value)
        toks = list(buf[:min(cnt, capacity)]) if (tokens_out and ok) else (None if not tokens_out else [])
        return (ok, toks, cnt) if with_count else (ok, toks)

    def state_seq_save_file(self, path: Any, seq: int, tokens: Sequence[int] = ()) -> int:
        return int(self._L.llama_state_seq_save_file(self.ptr, os.fsencode(path), seq, self._toks(tokens),
                                                     len(tokens)))

    def state_seq_load_file(self, path: Any, seq: int, capacity: int = 4096, tokens_out: bool = True,
                            with_count: bool = False) -> Any:
        buf = (ctypes.c_int32 * max(capacity, 1))()
        n = ctypes.c_size_t(0)
        r = int(self._L.llama_state_seq_load_file(self.ptr, os.fsencode(path), seq, buf if tokens_out else None,
                                                  capacity, ctypes.byref(n)))
        cnt = int(n.value)
        toks = list(buf[:min(cnt, capacity)]) if (tokens_out and r) else (None if not tokens_out else [])
        return (r, toks, cnt) if with_count else (r, toks)

    # logs and lifetime
    def creation_log(self) -> str:
        return self._creation_log

    @staticmethod
    def last_log(n: int = 20, min_level: int = 0) -> str:
        return _log_text(n, min_level)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._L.llama_free(self.ptr)
        self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------
_BOOTSTRAP = r"""
import json, sys
cfg = json.loads(sys.argv[1])
sys.path[:] = cfg["sys_path"]
from pymem._oracle.lcp import _child_main
_child_main(cfg["rfd"], cfg["wfd"], cfg["echo_log"])
"""


class LcpWorker(OracleWorker):
    """An :class:`OracleWorker` whose child runs llama-cpp-python (see the module docstring).
    ``info()`` reports the llama-cpp-python version, its folder and the state format its
    build writes."""

    _bootstrap = _BOOTSTRAP
    _stderr_prefix = "pymem-lcp-"

    def ensure_models(self, *a: Any, **k: Any) -> Dict[str, str]:
        raise NotImplementedError("generate tiny models with the py-sync OracleWorker; this one loads them")


class _Server:
    def __init__(self) -> None:
        self.models: Dict[int, Model] = {}
        self.model_keys: Dict[Tuple[str, int, int], int] = {}
        self.contexts: Dict[int, Context] = {}
        self.next_id = 1

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def free(self, ids: Sequence[int]) -> None:
        for i in ids:
            c = self.contexts.pop(i, None)
            if c is not None:
                c.close()

    def op_ping(self, *args: Any) -> Any:
        return args

    def op_info(self) -> Dict[str, Any]:
        L = load()
        return {"llama_cpp_version": L.__version__, "package_dir": str(Path(L.__file__).parent),
                "format": _lcp.format_of_version(L.__version__), "pid": os.getpid(),
                "system_info": L.llama_print_system_info().decode("utf-8", "replace")}

    def op_model(self, path: str, metadata_only: bool = False) -> Tuple[int, Dict[str, Any]]:
        if metadata_only:
            raise ValueError("metadata-only models need the py-sync oracle")
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
        mid = self.model_keys.get(key)
        if mid is None:
            mid = self._new_id()
            self.models[mid] = Model(path)
            self.model_keys[key] = mid
        return mid, self.models[mid].info()

    def op_context(self, model_id: int, params: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        c = Context(self.models[model_id], **params)
        cid = self._new_id()
        self.contexts[cid] = c
        return cid, c.info()

    def op_ctx(self, ctx_id: int, name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        if name not in CONTEXT_METHODS:
            raise AttributeError(f"unknown context method {name!r}")
        return getattr(self.contexts[ctx_id], name)(*args, **kwargs)

    def op_ctx_many(self, ctx_id: int, calls: Sequence[Tuple[str, Sequence[Any]]]) -> List[Any]:
        c = self.contexts[ctx_id]
        return [getattr(c, name)(*args) for name, args in calls if name in CONTEXT_METHODS]

    def op_free_contexts(self, ids: Sequence[int]) -> None:
        self.free(ids)

    def op_log(self, n: int = 40, min_level: int = 0) -> str:
        return _log_text(n, min_level)

    def op_run(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``module:function(*args, **kwargs)`` in the child and return its result."""
        mod, _, fn = target.partition(":")
        return getattr(importlib.import_module(mod), fn)(*args, **kwargs)

    def op_debug_crash(self, sig: int = 6) -> None:
        sys.stderr.flush()
        os.kill(os.getpid(), sig)
        time.sleep(10)


def _child_main(rfd: int, wfd: int, echo_log: bool = True) -> None:
    import pickle
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ECHO[0] = echo_log
    try:
        load()
        server = _Server()
    except OracleUnavailable as e:
        _send(wfd, ("unavailable", str(e)))
        return
    except BaseException as e:  # pragma: no cover - reported to the parent
        _send(wfd, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    _send(wfd, ("ready", {"pid": os.getpid()}))
    while True:
        try:
            body = _read_frame(rfd, None)
        except _EOF:
            return
        method, args, kwargs, frees = pickle.loads(body)
        try:
            if frees:
                server.free(frees)
            fn = getattr(server, "op_" + method, None) if not method.startswith("_") else None
            if fn is None:
                raise AttributeError(f"unknown worker method {method!r}")
            out = ("ok", fn(*args, **kwargs))
        except BaseException as e:
            tb = traceback.format_exc()
            try:
                blob: Optional[bytes] = pickle.dumps(e)
                pickle.loads(blob)
            except Exception:
                blob = None
            out = ("err", (blob, type(e).__name__, str(e), tb))
        try:
            _send(wfd, out)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            _send(wfd, ("err", (None, type(e).__name__, f"result not picklable: {e}", "")))
