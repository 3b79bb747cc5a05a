"""A bridge between a live llama.cpp context and pymem memories.

Two llama.cpp builds are supported, each through its own loaded library and with its own
state format: the ``llama-cpp-py-sync`` wheel pymem targets (0.11739, llama.cpp b11739, state
format 11), and llama-cpp-python 0.3.36 (``llama_cpp``, llama.cpp 0c1e570, format 10; its
``Llama``, ``LlamaContext`` and raw ``llama_context_p`` pointers, see
:mod:`pymem.llama._bridge_lcp`, which also converts ``LlamaState`` objects). A llama-cpp-python
release pymem does not know is refused (:class:`pymem.UnsupportedError`).

::

    import pymem.llama.bridge as bridge

    llama_cpp_py_sync = bridge.llama_cpp()      # the wheel, loadable on this system (see below)
    llm = llama_cpp_py_sync.Llama("model.gguf", n_ctx=4096, n_gpu_layers=0)
    ...                                        # decode in llama.cpp
    mem = bridge.export_state(llm)             # the whole memory, as a pymem memory
    mem.seq_rm(0, 10, 30); mem.seq_add(0, 30, -1, -20)     # edit in pymem: drop 10..29, close the gap
    bridge.import_state(llm, mem)              # back into llama.cpp (pending K-shifts applied)

    one = bridge.export_state(llm, seq_id=0, dst_seq_id=3)      # sequence 0 -> pymem sequence 3
    bridge.import_state(llm, one, seq_id=3, dst_seq_id=1)       # pymem sequence 3 -> llama seq 1

A *context* is any of:

* a ``llama_cpp_py_sync.Llama`` object: the high-level class. The bridge uses its ``_ctx``
  pointer and its own loaded library;
* a :class:`pymem._oracle.capi.Context` (in-process), or a
  :class:`pymem._oracle.worker.ContextHandle` (a context in pymem's oracle worker process);
* a raw cffi ``struct llama_context *`` pointer, with ``model_path=`` (llama.cpp does not keep the
  file name of a model).

Memory layout (:func:`context_params`, :func:`memory_for`)
--------------------------------------------------------
pymem builds the memory llama.cpp built (:func:`pymem.plan.memory_spec`) from the model's GGUF
file and the context parameters. The parameters are recovered like this:

* ``n_ctx``, ``n_ctx_seq``, ``n_seq_max``, ``n_batch``, ``n_ubatch`` and ``n_rs_seq`` come from the C
  getters (``llama_n_ctx`` ...).
* ``kv_unified`` comes from the ``n_stream`` field that every KV section of a state blob has, even
  when the cache is empty. For pure recurrent models it comes from whether ``llama_n_ctx_seq``
  equals ``llama_n_ctx``. With ``n_seq_max == 1`` both settings build the same memory.
* ``flash_attn``, ``type_k`` and ``type_v`` have no getter. They come from the first KV stream that
  holds cells in a state blob: its ``v_trans`` field and the K and V type ids. The bridge reads
  these from the blob it is exporting anyway, or from the blob of the shortest non-empty sequence.
  An **empty** KV cache writes no types. Then the values the context was created with are used
  where they are known: ``capi.Context`` and ``ContextHandle`` record them. Otherwise the bridge
  falls back to the defaults: ``llama_context_default_params()`` (f16 and flash attention "auto",
  which is on for the CPU backend), or the ``Llama`` constructor's default (flash attention off
  unless ``$LLAMA_FLASH_ATTENTION`` says otherwise). These values are *assumed* (see
  :attr:`ContextParams.assumed`). They do not matter while the cache is empty. A later import of
  a non-empty memory whose types disagree is refused by llama.cpp, and the bridge then raises
  :class:`pymem.StateError` with llama.cpp's reason. Pass ``type_k=`` / ``type_v=`` /
  ``flash_attn=`` to override them.
* ``swa_full`` (iSWA and hybrid-iSWA only) matters only when the two choices give different SWA
  cache sizes. llama.cpp reports that difference through ``llama_memory_can_shift``, which is
  true only when both halves have one size. Architectures that can never shift fall back to the
  recorded value or the default (``True``).
* Not recoverable: RoPE / YaRN overrides in ``llama_context_params`` (``rope_freq_base``,
  ``rope_freq_scale``, ``yarn_*``). pymem's K-shift uses the model's own values. State bytes are
  not affected. Only ``seq_add`` / ``seq_div`` followed by ``update()`` in pymem would rotate K
  differently from such a context.

Every built memory is checked against the context: its sizes against the getters,
``can_shift``, and the state blob it was derived from (:meth:`pymem.Memory.state_check`).

Failures
--------
Where llama.cpp would abort (a sequence id out of range), the bridge raises
:class:`pymem.InvalidArgumentError` instead. A context without a memory module raises
:class:`pymem.UnsupportedError`. Before it
calls llama.cpp to import, the bridge checks the memory against every parameter that is known
and not assumed. A failed llama.cpp restore would leave the context cleared or half restored
(llama_state_set_data clears the memory first), so mismatches it finds raise :class:`pymem.StateError` with the context unchanged.
When llama.cpp itself returns 0, its error log lines are captured and become the
:class:`pymem.StateError` message.

glibc < 2.38
------------
The wheel's libraries need glibc 2.38. On older systems (Debian 12), ``import llama_cpp_py_sync``
works, but the first ``Llama(...)`` fails with ``version `GLIBC_2.38' not found``. pymem loads
a patched private copy instead (:mod:`pymem.llama._loader`). Use :func:`llama_cpp` to get a
``llama_cpp_py_sync`` module that works, before creating ``Llama`` objects. It returns the
module pymem loaded (also in ``sys.modules``, so a later ``import llama_cpp_py_sync`` gets it).
A ``llama_cpp_py_sync`` imported earlier whose libraries never loaded is redirected to the same
copy, so references to it keep working. The bridge always drives a context through the library
that created it. It never needs pymem's loader for a ``Llama`` object or a ``capi.Context``. A raw
pointer is driven through the ``llama_cpp_py_sync`` already loaded in the process, or else
through pymem's loader.

``Llama`` objects
-----------------
``Llama.generate()`` and ``create_chat_completion()`` clear the memory before they start (chat
completions keep a cached token prefix instead, which :func:`import_state` invalidates). An
imported state is therefore for the low-level API: ``llama_decode(llm._ctx, ...)`` continuing at
the imported positions, or ``Llama._eval_tokens(tokens, n_past)``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from . import _loader
from ._ctxparams import ContextParams, _hparams, _Probe, _probe_blob
from ._scan import _scan
from ._wheel import _bindings_for_pointer, _captured_log, _is_cdata, _llama_default_flash, _reason, llama_cpp

__all__ = [
    "ContextParams",
    "context_params",
    "memory_for",
    "export_state",
    "import_state",
    "llama_cpp",
    "WHEEL_FORMAT",
    "from_llama_state",
    "to_llama_state",
]

#: state format of the llama-cpp-py-sync build pymem targets (b11739)
WHEEL_FORMAT = 11

_PKG = _loader.PKG
_FLAGS_OK = (0, 1)  # none, PARTIAL_ONLY (ON_DEVICE keeps tensor bytes out of the blob)


def _E() -> Any:
    from .. import _errors

    return _errors


# ---------------------------------------------------------------------------------------------
# live contexts
# ---------------------------------------------------------------------------------------------
@dataclass
class _Model:
    arch: str
    n_layer: int
    n_embd: int
    n_ctx_train: int


class _Live:
    """One llama.cpp context, whatever object holds it."""

    kind = "?"
    format = WHEEL_FORMAT  # the state format of the build that owns the context
    model_path: Optional[str] = None
    #: creation parameters the owning object recorded (flash_attn, type_k, type_v, swa_full, kv_unified)
    created: Dict[str, Any]
    #: values assumed when the state cannot tell (and nothing was recorded)
    defaults: Dict[str, Any]
    owner: Any = None

    def getters(self) -> Dict[str, int]:
        raise NotImplementedError

    def model(self) -> _Model:
        raise NotImplementedError

    def can_shift(self) -> bool:
        raise NotImplementedError

    def pos_range(self, seq: int) -> Tuple[int, int]:
        raise NotImplementedError

    def state_get(self) -> Any:
        raise NotImplementedError

    def seq_get(self, seq: int, flags: int) -> Any:
        raise NotImplementedError

    def state_set(self, blob: Any) -> Tuple[int, str]:
        raise NotImplementedError

    def seq_set(self, blob: Any, seq: int, flags: int) -> Tuple[int, str]:
        raise NotImplementedError

    def after_import(self) -> None:
        pass


_C_DEFAULTS = {"flash_attn": True, "type_k": "f16", "type_v": "f16", "swa_full": True, "kv_unified": False}


def _created_from_params(p: Dict[str, Any]) -> Dict[str, Any]:
    """Creation parameters recorded by capi.Context.requested / ContextHandle.params."""
    from ..params import type_name

    out: Dict[str, Any] = {}
    if "flash_attn_type" in p:
        out["flash_attn"] = int(p["flash_attn_type"]) != 0  # -1 (auto) is on for the CPU backend
    for k in ("type_k", "type_v"):
        if p.get(k) is not None:
            out[k] = type_name(int(p[k]))
    for k in ("swa_full", "kv_unified"):
        if p.get(k) is not None:
            out[k] = bool(p[k])
    return out


class _InProcess(_Live):
    def __init__(self, kind: str, ffi: Any, lib: Any, ptr: Any, model_path: Optional[str],
                 created: Dict[str, Any], defaults: Dict[str, Any], owner: Any = None) -> None:
        E = _E()
        self.kind, self.ffi, self.lib, self.ptr = kind, ffi, lib, ptr
        self.model_path = model_path
        self.created, self.defaults, self.owner = created, defaults, owner
        if ptr is None or ptr == ffi.NULL:
            raise E.InvalidStateError(f"the llama.cpp context of this {kind} is closed or NULL")
        self.mem = lib.llama_get_memory(ptr)
        if self.mem == ffi.NULL:
            raise E.UnsupportedError("this llama.cpp context has no memory module (nothing to export)")

    def getters(self) -> Dict[str, int]:
        lib, p = self.lib, self.ptr
        n_rs = getattr(lib, "llama_n_rs_seq", None)
        return {"n_ctx": int(lib.llama_n_ctx(p)), "n_ctx_seq": int(lib.llama_n_ctx_seq(p)),
                "n_seq_max": int(lib.llama_n_seq_max(p)), "n_batch": int(lib.llama_n_batch(p)),
                "n_ubatch": int(lib.llama_n_ubatch(p)), "n_rs_seq": int(n_rs(p)) if n_rs else 0}

    def model(self) -> _Model:
        ffi, lib = self.ffi, self.lib
        m = lib.llama_get_model(self.ptr)
        key = b"general.architecture"
        n = lib.llama_model_meta_val_str(m, key, ffi.NULL, 0)
        arch = ""
        if n >= 0:
            buf = ffi.new("char[]", n + 1)
            lib.llama_model_meta_val_str(m, key, buf, n + 1)
            arch = ffi.string(buf).decode("utf-8", "replace")
        return _Model(arch, int(lib.llama_model_n_layer(m)), int(lib.llama_model_n_embd(m)),
                      int(lib.llama_model_n_ctx_train(m)))

    def can_shift(self) -> bool:
        return bool(self.lib.llama_memory_can_shift(self.mem))

    def pos_range(self, seq: int) -> Tuple[int, int]:
        return (int(self.lib.llama_memory_seq_pos_min(self.mem, seq)),
                int(self.lib.llama_memory_seq_pos_max(self.mem, seq)))

    def _get(self, size: int, call: Any, what: str) -> memoryview:
        ffi = self.ffi
        buf = bytearray(max(size, 1))
        with _captured_log(ffi, self.lib) as lines:
            w = int(call(ffi.from_buffer("uint8_t[]", buf), size))
        if w == 0:
            raise _E().StateError(f"llama.cpp could not write {what}: {_reason(lines)}")
        return memoryview(buf)[:w]

    def state_get(self) -> memoryview:
        lib, p = self.lib, self.ptr
        return self._get(int(lib.llama_state_get_size(p)),
                         lambda b, n: lib.llama_state_get_data(p, b, n), "the context state")

    def seq_get(self, seq: int, flags: int) -> memoryview:
        lib, p = self.lib, self.ptr
        return self._get(int(lib.llama_state_seq_get_size_ext(p, seq, flags)),
                         lambda b, n: lib.llama_state_seq_get_data_ext(p, b, n, seq, flags),
                         f"the state of sequence {seq}")

    def _set(self, blob: Any, call: Any) -> Tuple[int, str]:
        ffi = self.ffi
        src = ffi.from_buffer("uint8_t[]", blob)
        with _captured_log(ffi, self.lib) as lines:
            n = int(call(src, len(src)))
        return n, ("" if n else _reason(lines))

    def state_set(self, blob: Any) -> Tuple[int, str]:
        lib, p = self.lib, self.ptr
        return self._set(blob, lambda b, n: lib.llama_state_set_data(p, b, n))

    def seq_set(self, blob: Any, seq: int, flags: int) -> Tuple[int, str]:
        lib, p = self.lib, self.ptr
        return self._set(blob, lambda b, n: lib.llama_state_seq_set_data_ext(p, b, n, seq, flags))

    def after_import(self) -> None:
        # llama_cpp_py_sync.Llama reuses a cached token prefix for chat completions; the
        # memory no longer holds those tokens
        o = self.owner
        if self.kind == "Llama" and o is not None:
            for attr in ("_chat_cache_tokens", "_chat_cache_key"):
                if hasattr(o, attr):
                    setattr(o, attr, None)


class _Remote(_Live):
    """A pymem._oracle.worker.ContextHandle (the context lives in the oracle worker)."""

    kind = "ContextHandle"

    def __init__(self, h: Any, model_path: Optional[str]) -> None:
        self.h = h
        info = dict(getattr(h.model, "info", {}) or {})
        self.info = info
        self.model_path = model_path or info.get("path")
        self.created = _created_from_params(dict(h.params))
        self.defaults = dict(_C_DEFAULTS)
        self.owner = h
        if not h.params.get("has_memory", True):
            raise _E().UnsupportedError("this llama.cpp context has no memory module (nothing to export)")

    def getters(self) -> Dict[str, int]:
        n_ctx, n_ctx_seq, n_seq_max, n_batch, n_ubatch = self.h.many(
            [("n_ctx",), ("n_ctx_seq",), ("n_seq_max",), ("n_batch",), ("n_ubatch",)])
        return {"n_ctx": n_ctx, "n_ctx_seq": n_ctx_seq, "n_seq_max": n_seq_max, "n_batch": n_batch,
                "n_ubatch": n_ubatch, "n_rs_seq": int(self.h.params.get("n_rs_seq") or 0)}

    def model(self) -> _Model:
        i = self.info
        return _Model(i.get("arch") or "", int(i.get("n_layer", 0)), int(i.get("n_embd", 0)),
                      int(i.get("n_ctx_train", 0)))

    def can_shift(self) -> bool:
        return bool(self.h.can_shift())

    def pos_range(self, seq: int) -> Tuple[int, int]:
        a, b = self.h.many([("pos_min", seq), ("pos_max", seq)])
        return int(a), int(b)

    def state_get(self) -> bytes:
        b = self.h.state_get()
        if not b:
            raise _E().StateError(f"llama.cpp could not write the context state: {self.h.last_log(10, 4)}")
        return b

    def seq_get(self, seq: int, flags: int) -> bytes:
        b = self.h.state_seq_get(seq, flags)
        if not b:
            raise _E().StateError(f"llama.cpp could not write the state of sequence {seq}: "
                                  f"{self.h.last_log(10, 4)}")
        return b

    def state_set(self, blob: Any) -> Tuple[int, str]:
        n = int(self.h.state_set(bytes(blob)))
        return n, ("" if n else self.h.last_log(6, 4).strip())

    def seq_set(self, blob: Any, seq: int, flags: int) -> Tuple[int, str]:
        n = int(self.h.state_seq_set(bytes(blob), seq, flags))
        return n, ("" if n else self.h.last_log(6, 4).strip())


def _check_wheel_version(obj: Any) -> None:
    """Refuse a llama_cpp_py_sync object of a release whose state format pymem does not know."""
    mod = sys.modules.get((type(obj).__module__ or "").split(".")[0])
    ver = getattr(mod, "__version__", None)
    if ver is not None and str(ver) != _loader.PINNED_VERSION:
        raise _E().UnsupportedError(
            f"llama-cpp-py-sync {ver} bundles a llama.cpp build whose state format pymem does not know; refusing "
            f"to read or write its states. Known: {_loader.PINNED_VERSION} (llama.cpp {_loader.PINNED_TAG}, format "
            f"{WHEEL_FORMAT}) and llama-cpp-python 0.3.36 (llama.cpp 0c1e570, format 10)")


def _live(ctx: Any, model_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> _Live:
    if isinstance(ctx, _Live):
        return ctx
    mp = None if model_path is None else os.fspath(model_path)
    E = _E()
    from . import _bridge_lcp as _lcp  # llama-cpp-python: its own llama.cpp build, its own state format

    if _lcp.is_lcp_object(ctx):
        return _lcp.LcpLive(ctx, mp)
    # pymem._oracle.capi.Context
    if hasattr(ctx, "requested") and hasattr(ctx, "_lib") and hasattr(ctx, "ptr") and hasattr(ctx, "model"):
        return _InProcess("capi.Context", ctx._ffi, ctx._lib, ctx.ptr, mp or getattr(ctx.model, "path", None),
                          _created_from_params(ctx.requested), dict(_C_DEFAULTS), ctx)
    # llama_cpp_py_sync.Llama (high level): its own ffi / lib / context pointer
    if hasattr(ctx, "_ctx") and hasattr(ctx, "_lib") and hasattr(ctx, "_ffi") and hasattr(ctx, "model_path"):
        _check_wheel_version(ctx)
        d = dict(_C_DEFAULTS, flash_attn=_llama_default_flash())
        return _InProcess("Llama", ctx._ffi, ctx._lib, ctx._ctx, mp or ctx.model_path, {}, d, ctx)
    # pymem._oracle.worker.ContextHandle
    if hasattr(ctx, "many") and hasattr(ctx, "params") and hasattr(ctx, "model") and hasattr(ctx, "generation"):
        return _Remote(ctx, mp)
    # a raw pointer (cdata of any ffi, or an address)
    if _is_cdata(ctx) or (isinstance(ctx, int) and not isinstance(ctx, bool)):
        if mp is None:
            raise E.InvalidArgumentError("a raw llama_context pointer needs model_path= (the GGUF file of "
                                         "its model): llama.cpp does not keep the file name")
        ffi, lib = _bindings_for_pointer()
        if isinstance(ctx, int):
            ptr = ffi.cast("struct llama_context *", ctx)
        else:
            ptr = ffi.cast("struct llama_context *", ffi.cast("uintptr_t", ctx))
        return _InProcess("pointer", ffi, lib, ptr, mp, {}, dict(_C_DEFAULTS), ctx)
    raise TypeError(f"not a llama.cpp context: {type(ctx).__name__} (expected llama_cpp_py_sync.Llama, "
                    "pymem._oracle.capi.Context, pymem._oracle.worker.ContextHandle or a llama_context pointer)")


def _resolve(live: _Live, probes: List[_Probe], overrides: Dict[str, Any]) -> Tuple[ContextParams, List[_Probe]]:
    from ..plan import memory_spec
    from ..params import type_id, type_name

    E = _E()
    if not live.model_path:
        raise E.InvalidArgumentError("the model's GGUF path is unknown: pass model_path=")
    hp = _hparams(live.model_path)
    m = live.model()
    have = (m.arch, m.n_layer, m.n_embd, m.n_ctx_train)
    want = (hp.arch, hp.n_layer, hp.n_embd, hp.n_ctx_train)
    if m.arch and have != want:
        raise E.InvalidArgumentError(
            f"{live.model_path} is not the context's model: (arch, n_layer, n_embd, n_ctx_train) = {want} "
            f"in the file, {have} in the context")
    g = live.getters()
    src: Dict[str, str] = {k: "getter" for k in ("n_ctx", "n_ctx_seq", "n_seq_max", "n_batch", "n_ubatch", "n_rs_seq")}
    kind = hp.memory_kind
    has_kv = kind != "recurrent"
    cell_ext = hp.n_pos_per_embd > 1
    n_seq_max = g["n_seq_max"]

    facts: Dict[str, Any] = {}
    probes = list(probes)

    def scan_all() -> None:
        for blob, seq, flags in probes:
            f = _scan(blob, seq, flags, kind, cell_ext, live.format)
            for k, v in f.items():
                facts.setdefault(k, v)

    scan_all()
    if has_kv and ("v_trans" not in facts or "n_stream" not in facts) \
            and not all(overrides.get(k) is not None for k in ("flash_attn", "type_k", "type_v", "kv_unified")):
        extra = _probe_blob(live, n_seq_max)
        if not any(p[1] == extra[1] and p[2] == extra[2] for p in probes):
            probes.append(extra)
            scan_all()

    vals: Dict[str, Any] = {}

    def pick(name: str, from_state: Any, relevant: bool = True) -> None:
        if overrides.get(name) is not None:
            vals[name], src[name] = overrides[name], "argument"
        elif from_state is not None:
            vals[name], src[name] = from_state
        elif name in live.created:
            vals[name], src[name] = live.created[name], ("created" if relevant else "n/a")
        else:
            vals[name], src[name] = live.defaults[name], ("default" if relevant else "n/a")

    # kv_unified
    uni = None
    if n_seq_max > 1:
        if has_kv and "n_stream" in facts:
            uni = (facts["n_stream"] == 1, "state")
        else:
            uni = (g["n_ctx_seq"] == g["n_ctx"], "n_ctx_seq")
    pick("kv_unified", uni, relevant=n_seq_max > 1)
    if n_seq_max == 1 and src["kv_unified"] not in ("argument",):
        src["kv_unified"] = "n/a"
    # flash_attn / types
    pick("flash_attn", (not facts["v_trans"], "state") if "v_trans" in facts else None, relevant=has_kv)
    pick("type_k", (facts["type_k"], "state") if "type_k" in facts else None, relevant=has_kv)
    pick("type_v", (facts["type_v"], "state") if "type_v" in facts else None, relevant=has_kv)
    vals["type_k"] = type_name(type_id(vals["type_k"]))
    vals["type_v"] = type_name(type_id(vals["type_v"]))
    if isinstance(vals["flash_attn"], str) or int(vals["flash_attn"]) < 0:  # "auto" / -1: on for CPU
        vals["flash_attn"] = True
    vals["flash_attn"] = bool(vals["flash_attn"])

    # swa_full: only matters when the two choices size the SWA cache differently
    base = dict(n_seq_max=n_seq_max, type_k=vals["type_k"], type_v=vals["type_v"], flash_attn=vals["flash_attn"],
                unified=bool(vals["kv_unified"]), n_ubatch=g["n_ubatch"], n_rs_seq=g["n_rs_seq"],
                n_batch=g["n_batch"])
    swa_guess = None
    swa_relevant = False
    if kind in ("iswa", "hybrid_iswa"):
        s_on = memory_spec(hp, g["n_ctx"], swa_full=True, **base).part("swa").size
        s_off = memory_spec(hp, g["n_ctx"], swa_full=False, **base).part("swa").size
        swa_relevant = s_on != s_off
        if swa_relevant and hp.can_shift:
            swa_guess = (live.can_shift(), "can_shift")
    pick("swa_full", swa_guess, relevant=swa_relevant)

    p = ContextParams(
        model_path=str(live.model_path), arch=hp.arch, kind=kind,
        n_ctx=g["n_ctx"], n_ctx_seq=g["n_ctx_seq"], n_seq_max=n_seq_max, n_batch=g["n_batch"],
        n_ubatch=g["n_ubatch"], n_rs_seq=g["n_rs_seq"], kv_unified=bool(vals["kv_unified"]),
        flash_attn=vals["flash_attn"], swa_full=bool(vals["swa_full"]), type_k=vals["type_k"],
        type_v=vals["type_v"], sources=src, hparams=hp)
    return p, probes


def _overrides(type_k: Any, type_v: Any, flash_attn: Any, kv_unified: Any, swa_full: Any) -> Dict[str, Any]:
    return {"type_k": type_k, "type_v": type_v, "flash_attn": flash_attn, "kv_unified": kv_unified,
            "swa_full": swa_full}


def context_params(ctx: Any, *, model_path: Any = None, type_k: Optional[str] = None,
                   type_v: Optional[str] = None, flash_attn: Optional[bool] = None,
                   kv_unified: Optional[bool] = None, swa_full: Optional[bool] = None) -> ContextParams:
    """The parameters of ``ctx`` that shape its memory (see the module docstring), each with its
    source in :attr:`ContextParams.sources`. Keyword arguments override what would be recovered.
    ``model_path`` is needed only for a raw context pointer."""
    live = _live(ctx, model_path)
    p, _ = _resolve(live, [], _overrides(type_k, type_v, flash_attn, kv_unified, swa_full))
    return p


def _build(live: _Live, params: ContextParams, probes: List[_Probe], format: int) -> Any:
    """Build the memory of ``params`` and check it against the context."""
    from ..plan import build_memory

    E = _E()
    spec = params.spec(format)
    got = (spec.n_ctx, spec.n_ctx_seq, spec.n_seq_max)
    want = (params.n_ctx, params.n_ctx_seq, params.n_seq_max)
    if got != want:
        raise E.UnsupportedError(
            f"cannot reproduce this context's memory: (n_ctx, n_ctx_seq, n_seq_max) = {want} in llama.cpp, "
            f"{got} in pymem's layout ({params.describe()})")
    if spec.can_shift != live.can_shift():
        raise E.UnsupportedError(
            f"cannot reproduce this context's memory: llama_memory_can_shift is {live.can_shift()}, "
            f"pymem's layout gives {spec.can_shift} ({params.describe()})")
    mem = build_memory(spec)
    for blob, seq, flags in probes:
        if format != live.format:
            break
        try:
            mem.state_check(blob, seq_id=seq, flags=flags, envelope="llama")
        except E.StateError as exc:
            raise E.StateError(
                f"the memory built for this context does not read its state ({exc}); parameters: "
                f"{params.describe()}") from exc
    return mem


def memory_for(ctx: Any, format: Optional[int] = None, *, model_path: Any = None, type_k: Optional[str] = None,
               type_v: Optional[str] = None, flash_attn: Optional[bool] = None, kv_unified: Optional[bool] = None,
               swa_full: Optional[bool] = None) -> Any:
    """An empty pymem memory laid out as the memory of the live context ``ctx``, as
    :func:`pymem.from_gguf` would build it with the context's parameters (recovered as the
    module docstring explains; keyword arguments override them). ``format`` is the state
    format of the pymem memory. The wheel writes format 11, and only a format-11 memory can
    exchange states with it."""
    live = _live(ctx, model_path)
    params, probes = _resolve(live, [], _overrides(type_k, type_v, flash_attn, kv_unified, swa_full))
    return _build(live, params, probes, live.format if format is None else format)


# ---------------------------------------------------------------------------------------------
# export / import
# ---------------------------------------------------------------------------------------------
def _check_seq(seq: int, n_seq_max: int, what: str) -> None:
    if not 0 <= int(seq) < n_seq_max:
        raise _E().InvalidArgumentError(f"{what} {seq} is not a sequence of this llama.cpp context "
                                        f"(0..{n_seq_max - 1}); llama.cpp would abort")


def _check_flags(flags: int, seq: int) -> None:
    E = _E()
    if flags not in _FLAGS_OK:
        raise E.InvalidArgumentError(f"flags {flags}: only 0 and STATE_PARTIAL_ONLY (1) move state bytes "
                                     "(ON_DEVICE keeps the tensors out of the blob)")
    if flags and seq < 0:
        raise E.InvalidArgumentError("flags apply to one sequence; the whole state takes none")


def _mem_format(mem: Any) -> Optional[int]:
    parts = mem.kv_parts()
    return parts[0].format if parts else None


def export_state(ctx: Any, mem: Any = None, seq_id: int = -1, dst_seq_id: Optional[int] = None,
                 flags: int = 0, *, model_path: Any = None, format: Optional[int] = None, **params: Any) -> Any:
    """Copy the state of the live context ``ctx`` into a pymem memory and return the memory.

    * ``seq_id=-1``: the whole memory (``llama_state_get_data``), restored into ``mem`` as
      ``mem.state_read(blob, envelope="llama")`` does. It replaces everything in ``mem``.
    * ``seq_id=s``: one sequence (``llama_state_seq_get_data_ext(s, flags)``), restored into
      sequence ``dst_seq_id`` (default ``s``) of ``mem``, as llama.cpp restores a sequence.

    ``mem=None`` builds the memory (:func:`memory_for`; ``params`` are its keyword overrides,
    ``format`` its state format). The memory then reads the very blob it was checked against.
    A given ``mem`` must match the context; otherwise :class:`pymem.StateError` is raised and
    ``mem`` is unchanged."""
    E = _E()
    live = _live(ctx, model_path)
    seq_id = int(seq_id)
    _check_flags(int(flags), seq_id)
    if mem is not None and params:
        raise TypeError(f"parameter overrides {sorted(params)} apply only when the memory is built (mem=None)")
    if seq_id < 0:
        if seq_id != -1:
            raise E.InvalidArgumentError(f"seq_id {seq_id}: -1 (whole state) or a sequence id")
        blob, probe = live.state_get(), (-1, 0)
    else:
        n_seq_max = live.getters()["n_seq_max"]
        _check_seq(seq_id, n_seq_max, "seq_id")
        blob, probe = live.seq_get(seq_id, int(flags)), (seq_id, int(flags))
    if seq_id < 0 and dst_seq_id is not None and int(dst_seq_id) != -1:
        raise E.InvalidArgumentError("dst_seq_id needs seq_id (a whole state has no sequence)")
    dst = seq_id if dst_seq_id is None else int(dst_seq_id)
    if mem is None:
        unknown = set(params) - {"type_k", "type_v", "flash_attn", "kv_unified", "swa_full"}
        if unknown:
            raise TypeError(f"unknown parameter(s) {sorted(unknown)}")
        ov = _overrides(*(params.get(k) for k in ("type_k", "type_v", "flash_attn", "kv_unified", "swa_full")))
        cp, probes = _resolve(live, [(blob, *probe)], ov)
        # the check in _build reads the blob as it was written (the source sequence id)
        mem = _build(live, cp, [pr for pr in probes if pr[0] is not blob] + [(blob, *probe)],
                     live.format if format is None else format)
    elif _mem_format(mem) not in (None, live.format):
        raise E.StateError(f"the memory uses state format {_mem_format(mem)}; this llama.cpp writes "
                           f"format {live.format}")
    try:
        mem.state_read(blob, seq_id=dst if seq_id >= 0 else -1, flags=int(flags), envelope="llama")
    except E.StateError as exc:
        raise E.StateError(f"the memory does not match this llama.cpp context ({exc}); "
                           "build it with pymem.llama.bridge.memory_for(ctx)") from exc
    return mem


def _check_compatible(mem: Any, params: ContextParams, fmt: int = WHEEL_FORMAT) -> None:
    """Raise StateError (before llama.cpp is touched) if ``mem`` cannot be this context's memory
    in a parameter that is known (not assumed)."""
    E = _E()
    spec = params.spec(fmt)
    problems: List[str] = []
    if getattr(mem, "arch", None) and mem.arch != params.arch:
        problems.append(f"arch {mem.arch!r} (context: {params.arch!r})")
    if mem.kind != spec.kind:
        problems.append(f"memory kind {mem.kind!r} (context: {spec.kind!r})")
    else:
        known = lambda name: params.sources.get(name) not in ("default",)  # noqa: E731
        kv_specs = [p for p in spec.parts if p.kind == "kv"]
        for part, ps in zip(mem.kv_parts(), kv_specs):
            kw = ps.kwargs
            checks = [("cells per stream", part.size, kw["size"], known("swa_full") or ps.name != "swa"),
                      ("streams", part.n_stream, 1 if kw["unified"] else kw["n_seq_max"], known("kv_unified")),
                      ("n_seq_max", part.n_seq_max, kw["n_seq_max"], True),
                      ("type_k", part.type_k, kw["type_k"], known("type_k")),
                      ("type_v", part.type_v, kw["type_v"], known("type_v")),
                      ("v_trans", part.v_trans, kw["v_trans"], known("flash_attn")),
                      ("layers", part.layers, list(kw["layers"]), True)]
            for what, have, want, check in checks:
                if check and have != want:
                    problems.append(f"{ps.name} {what} {have!r} (context: {want!r})")
        rec = getattr(mem, "recurrent", None)
        rs = [p for p in spec.parts if p.kind == "recurrent"]
        if rec is not None and rs:
            kw = rs[0].kwargs
            for what, have, want in (("recurrent cells", rec.size, kw["size"]),
                                     ("recurrent layers", rec.layers, list(kw["layers"])),
                                     ("n_rs_seq", rec.n_rs_seq, kw["n_rs_seq"])):
                if have != want:
                    problems.append(f"{what} {have!r} (context: {want!r})")
    if problems:
        raise E.StateError("the memory does not match this llama.cpp context (nothing was imported): "
                           + "; ".join(problems))


def import_state(ctx: Any, mem: Any, seq_id: int = -1, dst_seq_id: Optional[int] = None, flags: int = 0,
                 *, update: bool = True, model_path: Any = None, check: bool = True) -> int:
    """Copy the state of a pymem memory into the live context ``ctx``. Returns the number of bytes
    llama.cpp read.

    * ``seq_id=-1``: the whole memory (``mem.state_write(envelope="llama")`` into
      ``llama_state_set_data``). It replaces the context's whole memory.
    * ``seq_id=s``: sequence ``s`` of ``mem`` (with ``flags``) into sequence ``dst_seq_id``
      (default ``s``) of the context (``llama_state_seq_set_data_ext``).

    ``update`` first applies the memory's pending K-shifts and stream copies (``mem.update()``),
    as llama.cpp would before its next decode. A state written with a shift still pending pairs
    the new positions with unrotated K (K is saved as stored), and llama.cpp does not keep a pending shift
    through a restore. Pass ``update=False`` to write such a state anyway.

    ``check`` first compares the memory's layout with the context's parameters (all but the
    assumed ones, see :attr:`ContextParams.assumed`). To learn the cache types it reads the state
    of the context's shortest non-empty sequence, so ``check=False`` saves that copy. A mismatch raises
    :class:`pymem.StateError` before llama.cpp is touched. When llama.cpp refuses the state
    (returns 0), :class:`pymem.StateError` carries its logged reason. In that case llama.cpp
    has already changed the context: a failed whole restore clears its memory, and a failed
    sequence restore removes the destination sequence."""
    E = _E()
    live = _live(ctx, model_path)
    seq_id = int(seq_id)
    flags = int(flags)
    _check_flags(flags, seq_id)
    if _mem_format(mem) not in (None, live.format):
        raise E.StateError(f"the memory uses state format {_mem_format(mem)}; this llama.cpp reads "
                           f"format {live.format}")
    g = live.getters()
    dst = seq_id if dst_seq_id is None else int(dst_seq_id)
    if seq_id < 0:
        if seq_id != -1:
            raise E.InvalidArgumentError(f"seq_id {seq_id}: -1 (whole state) or a sequence id")
        if dst_seq_id is not None and dst != -1:
            raise E.InvalidArgumentError("dst_seq_id needs seq_id (a whole state has no sequence)")
    else:
        _check_seq(dst, g["n_seq_max"], "dst_seq_id")
    params = None
    if check:
        params, _ = _resolve(live, [], {})
        _check_compatible(mem, params, live.format)
    if update:
        mem.update()
    if seq_id < 0:
        blob = bytearray(mem.state_size(envelope="llama"))
        mem.state_write_into(blob, envelope="llama")
        n, why = live.state_set(blob)
        what = "the whole state"
    else:
        blob = bytearray(mem.state_size(seq_id, flags, envelope="llama"))
        mem.state_write_into(blob, seq_id, flags, envelope="llama")
        n, why = live.seq_set(blob, dst, flags)
        what = f"sequence {seq_id} as sequence {dst}"
    if n == 0:
        hint = ""
        if params is not None and params.assumed:
            hint = (f" The context's {', '.join(params.assumed)} could not be read from its state (an empty "
                    "cache writes no types) and were assumed; pass them to memory_for()/export_state().")
        after = ("llama.cpp has cleared the context's memory" if seq_id < 0
                 else f"llama.cpp has removed sequence {dst} from the context")
        raise E.StateError(f"llama.cpp refused {what}: {why} ({after}).{hint}")
    live.after_import()
    return n


# ---------------------------------------------------------------------------------------------
# llama-cpp-python LlamaState objects (pymem.llama._bridge_lcp)
# ---------------------------------------------------------------------------------------------
def from_llama_state(ls: Any, model: Any = None, layout: Any = None) -> Any:
    """A llama-cpp-python ``LlamaState`` as a :class:`pymem.state.Session` (see
    :func:`pymem.llama._bridge_lcp.from_llama_state`)."""
    from ._bridge_lcp import from_llama_state as f

    return f(ls, model=model, layout=layout)


def to_llama_state(session: Any, like: Any = None, seed: Optional[int] = None) -> Any:
    """A :class:`pymem.state.Session` as a llama-cpp-python ``LlamaState`` that
    ``Llama.load_state`` accepts (see :func:`pymem.llama._bridge_lcp.to_llama_state`)."""
    from ._bridge_lcp import to_llama_state as f

    return f(session, like=like, seed=seed)
