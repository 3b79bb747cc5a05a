"""llama-cpp-python (``llama_cpp``) contexts for the bridge, and its ``LlamaState`` objects.

llama-cpp-python bundles its own llama.cpp build. pymem knows which state format each
release writes (:data:`KNOWN_BUILDS`); a context of any other release is refused with
:class:`pymem.UnsupportedError`, never driven with a guessed format:

==================  ================  ============  ==========================
llama-cpp-python    llama.cpp commit  state format  session / sequence files
==================  ================  ============  ==========================
0.3.36              0c1e570           10            ggsn v10 / ggsq v3
==================  ================  ============  ==========================

The bridge (:mod:`pymem.llama.bridge`) accepts a ``llama_cpp.Llama``, its
``llama_cpp._internals.LlamaContext`` and a raw ``llama_context_p`` (the int / ``c_void_p``
that ``llama_cpp.llama_init_from_model`` returns, with ``model_path=``), and drives them
through the ``llama_cpp`` module already loaded in the process, i.e. llama-cpp-python's own
``libllama``.

``LlamaState`` (``Llama.save_state()``): :func:`from_llama_state` reads one into a
:class:`pymem.state.Session` (its tokens are ``input_ids[:n_tokens]``), and
:func:`to_llama_state` writes a session (edited, or made from a pymem memory with
:meth:`pymem.state.Session.from_memory`) back into a ``LlamaState`` that ``Llama.load_state``
accepts, with ``n_tokens``, ``input_ids`` and ``scores`` consistent with the memory.

The test oracle (:mod:`pymem._oracle.lcp`) finds llama-cpp-python 0.3.36 installed, or
in the folder ``tools/build_lcp.sh`` builds (:func:`oracle_dir`).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import bridge as _bridge
from ._loader import OracleUnavailable

__all__ = ["KNOWN_BUILDS", "ORACLE_VERSION", "BUILD_HINT", "oracle_dir", "locate", "import_llama_cpp",
           "format_of_version", "is_lcp_object", "from_llama_state", "to_llama_state"]

#: llama-cpp-python release -> (state format, bundled llama.cpp commit)
KNOWN_BUILDS: Dict[str, Tuple[int, str]] = {"0.3.36": (10, "0c1e570")}
ORACLE_VERSION = "0.3.36"
BUILD_HINT = ("build it once with tools/build_lcp.sh (llama-cpp-python 0.3.36 from its sdist, a few minutes; "
              "into $PYMEM_LCP_DIR, default ~/.cache/pymem-oracle/llama-cpp-python-0.3.36), "
              "or pip install llama-cpp-python==0.3.36")


def _E() -> Any:
    from .. import _errors

    return _errors


# ---------------------------------------------------------------------------------------------
# finding and importing llama-cpp-python
# ---------------------------------------------------------------------------------------------
def oracle_dir() -> Path:
    """The folder tools/build_lcp.sh builds llama-cpp-python into (``pip install --target``)."""
    env = os.environ.get("PYMEM_LCP_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pymem-oracle" / f"llama-cpp-python-{ORACLE_VERSION}"


def _installed_version() -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version("llama-cpp-python")
    except Exception:
        return None


def locate() -> Optional[str]:
    """Where llama-cpp-python 0.3.36 comes from: ``"installed"``, the oracle folder, or None."""
    if _installed_version() == ORACLE_VERSION and importlib.util.find_spec("llama_cpp") is not None:
        return "installed"
    d = oracle_dir()
    if (d / ".complete").exists() and (d / "llama_cpp").is_dir():
        return str(d)
    return None


def import_llama_cpp() -> Any:
    """Import llama-cpp-python 0.3.36 (installed, else the oracle folder, appended to sys.path so
    the environment's own numpy stays first). Raises OracleUnavailable with how to get it."""
    if "llama_cpp" in sys.modules:
        return sys.modules["llama_cpp"]
    where = locate()
    if where is None:
        raise OracleUnavailable(f"llama-cpp-python {ORACLE_VERSION} is not available: {BUILD_HINT}")
    if where != "installed" and where not in sys.path:
        sys.path.append(where)
    try:
        return importlib.import_module("llama_cpp")
    except (ImportError, OSError, RuntimeError) as e:
        raise OracleUnavailable(f"could not import llama-cpp-python from {where}: {e}") from e


def format_of_version(version: Optional[str]) -> Optional[int]:
    """The state format a llama-cpp-python release writes, None if pymem does not know it."""
    got = KNOWN_BUILDS.get(str(version))
    return got[0] if got else None


def _module_of(obj: Any) -> Optional[Any]:
    top = (type(obj).__module__ or "").split(".")[0]
    if top == "llama_cpp":
        return sys.modules.get("llama_cpp")
    return None


def _pysync_loaded() -> bool:
    b = sys.modules.get(_bridge._PKG + "._cffi_bindings")
    return b is not None and getattr(b, "_lib", None) is not None


def is_lcp_object(ctx: Any) -> bool:
    """True for a llama-cpp-python Llama / LlamaContext, a ctypes ``c_void_p``, or an int while
    llama-cpp-python (and not llama-cpp-py-sync) is loaded in this process."""
    if _module_of(ctx) is not None and (hasattr(ctx, "_ctx") or hasattr(ctx, "ctx")):
        return True
    if isinstance(ctx, ctypes.c_void_p):
        return True
    if isinstance(ctx, int) and not isinstance(ctx, bool):
        return "llama_cpp" in sys.modules and not _pysync_loaded()
    return False


# ---------------------------------------------------------------------------------------------
# log capture (llama-cpp-python installs its own logger; restore it afterwards)
# ---------------------------------------------------------------------------------------------
_LOCK = threading.RLock()
_CB: List[Any] = []
_SINK: List[List[Tuple[int, str]]] = []


@contextlib.contextmanager
def _captured(L: Any) -> Iterator[List[Tuple[int, str]]]:
    with _LOCK:
        if not _CB:
            def on_log(level: int, text: bytes, _ud: Any) -> None:
                try:
                    if _SINK:
                        _SINK[-1].append((int(level), text.decode("utf-8", "replace")))
                except Exception:  # never into C
                    pass

            _CB.append(L.llama_log_callback(on_log))
        prev_cb = L.llama_log_callback()
        prev_ud = ctypes.c_void_p()
        L.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
        lines: List[Tuple[int, str]] = []
        _SINK.append(lines)
        L.llama_log_set(_CB[0], ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            L.llama_log_set(prev_cb, prev_ud)
            _SINK.pop()


# ---------------------------------------------------------------------------------------------
# the bridge's view of a llama-cpp-python context
# ---------------------------------------------------------------------------------------------
def _ptr(x: Any) -> int:
    if isinstance(x, ctypes.c_void_p):
        return int(x.value or 0)
    return int(x or 0)


class LcpLive(_bridge._Live):
    """A context of llama-cpp-python, driven through its own ``llama_cpp`` module."""

    def __init__(self, ctx: Any, model_path: Optional[str]) -> None:
        E = _E()
        L = _module_of(ctx) or sys.modules.get("llama_cpp")
        if L is None:
            raise E.InvalidArgumentError("a llama-cpp-python context pointer, but llama_cpp is not imported")
        version = getattr(L, "__version__", None)
        fmt = format_of_version(version)
        if fmt is None:
            known = ", ".join(f"{v} (llama.cpp {c}, format {f})" for v, (f, c) in KNOWN_BUILDS.items())
            raise E.UnsupportedError(
                f"llama-cpp-python {version} bundles a llama.cpp build whose state format pymem does not know; "
                f"refusing to read or write its states. Known releases: {known}")
        self.L, self.version, self.format = L, version, fmt
        self.owner, self.created = ctx, {}
        dp = L.llama_context_default_params()
        self.defaults = {"flash_attn": int(dp.flash_attn_type) != 0, "type_k": "f16", "type_v": "f16",
                         "swa_full": bool(dp.swa_full), "kv_unified": bool(dp.kv_unified)}
        params = None
        if hasattr(ctx, "_ctx") and hasattr(ctx, "context_params"):      # llama_cpp.Llama
            self.kind = "llama_cpp.Llama"
            inner = ctx._ctx
            ptr = getattr(inner, "ctx", None) if inner is not None else None
            params, model_path = ctx.context_params, model_path or ctx.model_path
        elif hasattr(ctx, "ctx") and hasattr(ctx, "params") and hasattr(ctx, "model"):  # _internals.LlamaContext
            self.kind = "llama_cpp LlamaContext"
            ptr, params = ctx.ctx, ctx.params
            model_path = model_path or getattr(ctx.model, "path_model", None)
        else:
            self.kind = "llama_context_p"
            ptr = ctx
            if model_path is None:
                raise E.InvalidArgumentError("a raw llama_context pointer needs model_path= (the GGUF file of "
                                             "its model): llama.cpp does not keep the file name")
        if params is not None:
            from ..memory import type_name

            self.created = {"flash_attn": int(params.flash_attn_type) != 0, "type_k": type_name(int(params.type_k)),
                            "type_v": type_name(int(params.type_v)), "swa_full": bool(params.swa_full),
                            "kv_unified": bool(params.kv_unified)}
        self.ptr = _ptr(ptr)
        self.model_path = None if model_path is None else os.fspath(model_path)
        if not self.ptr:
            raise E.InvalidStateError(f"the llama.cpp context of this {self.kind} is closed or NULL")
        self.mem = L.llama_get_memory(self.ptr)
        if not self.mem:
            raise E.UnsupportedError("this llama.cpp context has no memory module (nothing to export)")

    def getters(self) -> Dict[str, int]:
        L, p = self.L, self.ptr
        return {"n_ctx": int(L.llama_n_ctx(p)), "n_ctx_seq": int(L.llama_n_ctx_seq(p)),
                "n_seq_max": int(L.llama_n_seq_max(p)), "n_batch": int(L.llama_n_batch(p)),
                "n_ubatch": int(L.llama_n_ubatch(p)), "n_rs_seq": int(L.llama_n_rs_seq(p))}

    def model(self) -> Any:
        L = self.L
        m = L.llama_get_model(self.ptr)
        buf = ctypes.create_string_buffer(256)
        n = L.llama_model_meta_val_str(m, b"general.architecture", buf, len(buf))
        arch = buf.value.decode("utf-8", "replace") if n >= 0 else ""
        return _bridge._Model(arch, int(L.llama_model_n_layer(m)), int(L.llama_model_n_embd(m)),
                              int(L.llama_model_n_ctx_train(m)))

    def can_shift(self) -> bool:
        return bool(self.L.llama_memory_can_shift(self.mem))

    def pos_range(self, seq: int) -> Tuple[int, int]:
        return int(self.L.llama_memory_seq_pos_min(self.mem, seq)), int(self.L.llama_memory_seq_pos_max(self.mem, seq))

    def _get(self, size: int, call: Any, what: str) -> memoryview:
        buf = (ctypes.c_uint8 * max(size, 1))()
        with _captured(self.L) as lines:
            w = int(call(buf, size))
        if w == 0:
            raise _E().StateError(f"llama.cpp could not write {what}: {_bridge._reason(lines)}")
        return memoryview(bytearray(buf))[:w]

    def state_get(self) -> memoryview:
        L, p = self.L, self.ptr
        return self._get(int(L.llama_state_get_size(p)), lambda b, n: L.llama_state_get_data(p, b, n),
                         "the context state")

    def seq_get(self, seq: int, flags: int) -> memoryview:
        L, p = self.L, self.ptr
        return self._get(int(L.llama_state_seq_get_size_ext(p, seq, flags)),
                         lambda b, n: L.llama_state_seq_get_data_ext(p, b, n, seq, flags),
                         f"the state of sequence {seq}")

    def _set(self, blob: Any, call: Any) -> Tuple[int, str]:
        data = bytes(blob)
        src = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        with _captured(self.L) as lines:
            n = int(call(src, len(data)))
        return n, ("" if n else _bridge._reason(lines))

    def state_set(self, blob: Any) -> Tuple[int, str]:
        L, p = self.L, self.ptr
        return self._set(blob, lambda b, n: L.llama_state_set_data(p, b, n))

    def seq_set(self, blob: Any, seq: int, flags: int) -> Tuple[int, str]:
        L, p = self.L, self.ptr
        return self._set(blob, lambda b, n: L.llama_state_seq_set_data_ext(p, b, n, seq, flags))

    # what the prompt-cache store asks of contexts it cannot decode in (pymem.store.targets)
    @property
    def h(self) -> "LcpLive":
        return self

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(self.L.llama_memory_seq_rm(self.mem, seq, p0, p1))

    # prefill (pymem.store) decodes through Llama's own eval, so Llama's token bookkeeping stays true
    def can_eval(self) -> bool:
        return self.kind == "llama_cpp.Llama"

    def set_tokens(self, tokens: Any, seq: int) -> None:
        """The context's sequence ``seq`` now holds exactly ``tokens`` (restored): tell Llama."""
        o = self._llama(seq)
        n = len(tokens)
        o.input_ids[:n] = tokens
        o.n_tokens = n

    def eval_tokens(self, tokens: Any, pos0: int, seq: int) -> None:
        o = self._llama(seq)
        if int(o.n_tokens) != int(pos0):
            raise _E().InvalidStateError(f"Llama holds {o.n_tokens} tokens, the decode starts at {pos0}")
        o.eval([int(t) for t in tokens])

    def _llama(self, seq: int) -> Any:
        if not self.can_eval():
            raise _E().UnsupportedError(f"decoding needs a llama_cpp.Llama (got a {self.kind})")
        if int(seq) != 0:
            raise _E().InvalidArgumentError(f"a llama_cpp.Llama decodes sequence 0 only (got seq_id {seq})")
        return self.owner

    def after_import(self) -> None:
        # Llama keeps the tokens it believes are in the memory (n_tokens, input_ids) and reuses
        # their longest common prefix with the next prompt; after an import they are unknown.
        # n_tokens = 0 makes the next Llama.eval/generate start afresh (use LlamaState objects,
        # to_llama_state(), to move tokens and memory together).
        o = self.owner
        if self.kind == "llama_cpp.Llama" and o is not None and hasattr(o, "n_tokens"):
            o.n_tokens = 0
            if hasattr(o, "_requires_eval"):
                o._requires_eval = True


# ---------------------------------------------------------------------------------------------
# LlamaState <-> pymem.state.Session
# ---------------------------------------------------------------------------------------------
def _state_cls() -> Any:
    for name in ("llama_cpp.llama", "llama_cpp"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "LlamaState"):
            return mod.LlamaState
    return None


def from_llama_state(ls: Any, model: Any = None, layout: Any = None) -> Any:
    """A :class:`pymem.state.Session` (version 10, format 10) holding a ``LlamaState``: the
    tokens ``input_ids[:n_tokens]``, the architecture and the whole memory state. ``model``
    (GGUF path) or ``layout`` give the section layout where the bytes alone cannot. Raises
    :class:`pymem.StateError` for an inconsistent object (sizes, token count)."""
    from .. import state as S

    E = _E()
    try:
        raw = bytes(ls.llama_state)
        size = int(ls.llama_state_size)
        n_tokens = int(ls.n_tokens)
        ids = [int(t) for t in list(ls.input_ids)]
    except (AttributeError, TypeError, ValueError) as exc:
        raise E.StateError(f"not a llama-cpp-python LlamaState: {exc}") from None
    if size != len(raw):
        raise E.StateError(f"LlamaState: llama_state_size {size} but llama_state holds {len(raw)} bytes")
    if not 0 <= n_tokens <= len(ids):
        raise E.StateError(f"LlamaState: n_tokens {n_tokens} but input_ids holds {len(ids)} entries")
    tokens = ids[:n_tokens]
    head = struct.pack("<III", S.MAGIC_SESSION, 10, n_tokens) + struct.pack(f"<{n_tokens}i", *tokens)
    return S.Session.parse(head + raw, model=model, layout=layout, name="(LlamaState)")


def to_llama_state(session: Any, like: Any = None, seed: Optional[int] = None) -> Any:
    """A ``llama_cpp.LlamaState`` for a :class:`pymem.state.Session` (format 10, the format of
    llama-cpp-python 0.3.36; a format-11 session is converted with ``with_version(10)``), which
    ``Llama.load_state`` accepts.

    ``n_tokens`` is the session's token count; it must match sequence 0 of the memory
    (positions 0 .. n_tokens-1, as ``Llama.eval`` leaves them), else :class:`pymem.StateError`.
    ``like`` gives the shapes: the ``Llama`` that will load the state (exact), or a
    ``LlamaState`` saved by it. ``input_ids`` keeps its length (n_ctx), ``scores`` its width
    and row capacity (``Llama.scores`` holds n_ctx rows with ``logits_all``, else n_batch;
    ``scores`` has min(n_tokens, rows) rows), and the rows of the tokens both share are kept
    (with ``like``'s tokens); other rows are zero. Without ``like``: no scores, n_tokens ids."""
    import numpy as np

    E = _E()
    cls = _state_cls()
    if cls is None:
        raise E.UnsupportedError("llama-cpp-python (llama_cpp.LlamaState) is not imported")
    if session.version != 10:
        session = session.with_version(10)
    tokens = [int(t) for t in session.tokens]
    n = len(tokens)
    have = session.sequences().get(0)
    hi = max(i.pos_max for i in have) if have else -1
    if hi + 1 != n:
        raise E.StateError(f"the session holds {n} tokens but sequence 0 of its memory "
                           + (f"ends at position {hi}" if have else "is empty")
                           + ": Llama expects positions 0 .. n_tokens-1")
    old: List[int] = []
    src = None
    if like is None:
        ids = np.zeros((max(n, 1),), dtype=np.intc)
        rows, width = 0, 0
    elif hasattr(like, "save_state"):                       # a Llama
        ids = np.array(like.input_ids, dtype=np.intc).copy()
        src = np.asarray(like.scores, dtype=np.single)
        rows, width = src.shape
        old = [int(t) for t in ids[: int(like.n_tokens)]]
        src = src[: len(old)]
        seed = getattr(like, "_seed", None) if seed is None else seed
    else:                                                    # a LlamaState
        ids = np.array(like.input_ids, dtype=np.intc).copy()
        src = np.asarray(like.scores, dtype=np.single)
        width = src.shape[1] if src.ndim == 2 else 0
        rows = src.shape[0] if src.shape[0] < int(like.n_tokens) else len(ids)
        old = [int(t) for t in ids[: int(like.n_tokens)]]
        seed = like.seed if seed is None else seed
    if len(ids) < n:
        raise E.StateError(f"{n} tokens do not fit the {len(ids)} input_ids of the Llama (n_ctx)")
    scores = np.zeros((min(n, rows), width), dtype=np.single)
    if src is not None:
        keep = 0
        while keep < min(n, len(old)) and old[keep] == tokens[keep]:
            keep += 1
        k = min(keep, scores.shape[0], src.shape[0])
        scores[:k] = src[:k]
    ids[:n] = tokens
    blob = session.context_blob()
    return cls(input_ids=ids, scores=scores, n_tokens=n, llama_state=bytes(blob), llama_state_size=len(blob),
               seed=0 if seed is None else int(seed))
