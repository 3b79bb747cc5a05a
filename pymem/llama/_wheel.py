"""The ``llama_cpp_py_sync`` wheel as the bridge uses it: the module, loadable on this system
(:func:`llama_cpp`), the bindings that drive a raw context pointer, llama.cpp's log captured
around one call, and llama_cpp_py_sync.Llama's default flash-attention choice."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from . import _loader

_PKG = _loader.PKG
_ENV_FA_OFF = ("0", "", "false", "off", "disabled")


def llama_cpp() -> Any:
    """The ``llama_cpp_py_sync`` module, with libraries that load on this system.

    On glibc >= 2.38 this is the installed package. On older glibc it is pymem's patched copy
    (see the module docstring). A ``llama_cpp_py_sync`` imported before this call, whose
    libraries never loaded, is redirected to the same copy. Raises
    :class:`pymem.llama.OracleUnavailable` when the wheel is missing."""
    stale = {n: m for n, m in sys.modules.items() if n == _PKG or n.startswith(_PKG + ".")}
    _loader.load()
    mod = sys.modules.get(_PKG)
    bindings = sys.modules.get(_PKG + "._cffi_bindings")
    if mod is None or bindings is None:  # pragma: no cover - load() imports both
        import importlib

        mod = importlib.import_module(_PKG)
        bindings = importlib.import_module(_PKG + "._cffi_bindings")
    old = stale.get(_PKG + "._cffi_bindings")
    if old is not None and old is not bindings and getattr(old, "_lib", None) is None \
            and not getattr(old, "_ggml_libraries", None):
        _redirect(old, Path(bindings.__file__).resolve().parent)
    return mod


_LOG_LOCK = threading.RLock()


_LOG_CB: Dict[int, Any] = {}       # id(ffi) -> (ffi, callback): one cffi callback per FFI


_LOG_SINK: List[Any] = []          # [list of (level, text), prev callback, prev user data]


def _redirect(bindings: Any, lib_dir: Path) -> None:
    """Make an unloaded llama_cpp_py_sync._cffi_bindings load its libraries from ``lib_dir``
    (its ``_load_library`` / ``_get_ggml_library`` look ``_find_library`` up at call time)."""
    llama = lib_dir / "libllama.so"
    mtmd = lib_dir / "libmtmd.so"
    bindings._find_library = lambda: str(llama) if llama.exists() else None
    bindings._find_mtmd_library = lambda: str(mtmd) if mtmd.exists() else None


def _log_callback(ffi: Any) -> Any:
    got = _LOG_CB.get(id(ffi))
    if got is not None and got[0] is ffi:
        return got[1]

    def on_log(level: int, text: Any, _ud: Any) -> None:
        try:
            if _LOG_SINK:
                lines, prev, prev_ud = _LOG_SINK[-1]
                lines.append((int(level), ffi.string(text).decode("utf-8", "replace")))
                if prev != ffi.NULL:
                    prev(level, text, prev_ud)  # keep the previous logger's output
        except Exception:  # never let an exception escape into C
            pass

    cb = ffi.callback("void(enum ggml_log_level, const char *, void *)", on_log)
    _LOG_CB[id(ffi)] = (ffi, cb)
    return cb


@contextlib.contextmanager
def _captured_log(ffi: Any, lib: Any) -> Iterator[List[Tuple[int, str]]]:
    """Capture llama.cpp's log lines during the block (forwarding them to the logger that was
    installed), then restore that logger."""
    with _LOG_LOCK:
        prev_cb = ffi.new("ggml_log_callback *")
        prev_ud = ffi.new("void **")
        lib.llama_log_get(prev_cb, prev_ud)
        lines: List[Tuple[int, str]] = []
        cb = _log_callback(ffi)
        prev = prev_cb[0]
        # never forward to ourselves (a capture nested in another one)
        fwd = ffi.NULL if int(ffi.cast("uintptr_t", prev)) == int(ffi.cast("uintptr_t", cb)) else prev
        _LOG_SINK.append((lines, fwd, prev_ud[0]))
        lib.llama_log_set(cb, ffi.NULL)
        try:
            yield lines
        finally:
            lib.llama_log_set(prev_cb[0], prev_ud[0])
            _LOG_SINK.pop()


def _reason(lines: List[Tuple[int, str]]) -> str:
    errs: List[str] = []
    keep = False
    for level, text in lines:
        if level != 5:  # 5 = continuation of the previous line
            keep = level >= 4
        if keep:
            errs.append(text)
    if not errs:
        errs = [t for _, t in lines[-3:]]
    return "".join(errs).strip() or "(llama.cpp logged no reason)"


def _llama_default_flash() -> bool:
    """The flash-attention choice of ``llama_cpp_py_sync.Llama(flash_attn_type=None)``."""
    v = os.environ.get("LLAMA_FLASH_ATTENTION", "0").strip().lower()
    return v not in _ENV_FA_OFF  # "auto"/"-1" is on for the CPU backend, as any other value


def _bindings_for_pointer() -> Tuple[Any, Any]:
    """(ffi, lib) to drive a raw context pointer: the llama_cpp_py_sync already loaded in this
    process, else pymem's loader."""
    b = sys.modules.get(_PKG + "._cffi_bindings")
    if b is not None and getattr(b, "_lib", None) is not None:
        return b.get_ffi(), b._lib
    ffi, lib, _ = _loader.load()
    return ffi, lib


def _is_cdata(x: Any) -> bool:
    try:
        import _cffi_backend
    except ImportError:  # pragma: no cover - cffi is a dependency
        return False
    return isinstance(x, _cffi_backend._CDataBase)
