"""Load the prebuilt llama.cpp (``llama-cpp-py-sync`` wheel) for use as an oracle.

``load()`` returns ``(ffi, lib, ggml_base_lib)``: the wheel's cffi FFI object with a few
extra ggml/gguf declarations added (needed by :mod:`pymem._oracle.tinymodels`), the loaded
``libllama`` and the loaded ``libggml-base``.

The pinned target is llama.cpp build b11739 (``llama-cpp-py-sync==0.11739``); pymem's
state format is byte-compatible with exactly that build.

glibc < 2.38 (e.g. Debian 12)
-----------------------------
The wheel is tagged manylinux2014, but its shared libraries need the symbol version
``GLIBC_2.38`` for four C23 aliases (``__isoc23_sscanf``/``strtol``/``strtoul``/``strtoull``).
On such systems the installed package is **copied** (never modified) into a private cache
folder (``$PYMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pymem``, else ``~/.cache/pymem``).
In the copy every ``GLIBC_2.38`` version need is marked ``VER_FLG_WEAK`` and a tiny
unversioned shim defining the ``__isoc23_*`` functions is compiled with ``cc``. The shim is
loaded ``RTLD_GLOBAL`` and the copy is imported instead of the installed package; the copy's
libraries find each other through their ``$ORIGIN`` RUNPATH. The copy is built in a temporary
folder and renamed into place, so concurrent processes are safe (the loser of the race
discards its copy). The cache folder name contains the package version and a hash of the
installed ``libllama.so``, so an upgrade triggers a fresh copy.

Logging
-------
llama.cpp's log output is silenced and captured in a bounded in-process buffer
(:func:`log_lines`, :func:`log_text`), so error messages (e.g. why a state blob was rejected)
can be reported. Set ``PYMEM_LLAMA_LOG=1`` (or ``ORACLE_LOG=1``) to echo it to stderr.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Deque, List, Optional, Tuple

from .._cache import cache_root  # noqa: F401  (re-exported)

__all__ = [
    "OracleUnavailable",
    "OracleVersionWarning",
    "PINNED_VERSION",
    "PINNED_TAG",
    "PIP_HINT",
    "is_available",
    "load",
    "is_loaded",
    "loaded_package_dir",
    "glibc_version",
    "needs_glibc_compat",
    "cache_root",
    "installed_package_dir",
    "installed_version",
    "compat_dir",
    "log_lines",
    "log_text",
    "log_mark",
    "log_since",
    "clear_log",
    "set_log_echo",
    "llama_version",
    "system_info",
]

PINNED_VERSION = "0.11739"
PINNED_TAG = "b11739"
PKG = "llama_cpp_py_sync"
DIST = "llama-cpp-py-sync"
PIP_HINT = 'pip install "pymem[llama]"   (i.e. pip install llama-cpp-py-sync==0.11739)'

#: Bump when the patching / shim recipe changes, so old cache folders are not reused.
_COMPAT_RECIPE = "c1"
_COMPLETE_MARKER = "PYMEM_COMPLETE.json"
_SHIM_NAME = "libisoc23_shim.so"

_SHIM_C = r"""
/* pymem: unversioned definitions of the glibc 2.38 C23 aliases used by llama.cpp */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
int __isoc23_sscanf(const char *s, const char *fmt, ...) { va_list ap; va_start(ap, fmt); int r = vsscanf(s, fmt, ap); va_end(ap); return r; }
int __isoc23_vsscanf(const char *s, const char *fmt, va_list ap) { return vsscanf(s, fmt, ap); }
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
"""

# extra declarations from ggml / gguf (libggml-base) used by the tiny-model generator
_EXTRA_CDEF = """
struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; };
struct gguf_context * gguf_init_from_file(const char * fname, struct gguf_init_params params);
void    gguf_free(struct gguf_context * ctx);
int64_t ggml_nelements(const struct ggml_tensor * tensor);
size_t  ggml_nbytes(const struct ggml_tensor * tensor);
const char * ggml_get_name(const struct ggml_tensor * tensor);
void    ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset, size_t size);
"""


class OracleUnavailable(RuntimeError):
    """The llama.cpp oracle (llama-cpp-py-sync wheel) cannot be imported or loaded."""


class OracleVersionWarning(UserWarning):
    """The installed llama-cpp-py-sync is not the pinned version (state format may differ)."""


# ----------------------------------------------------------------------------------------
# the loaded library (the only process-global state of this module)
# ----------------------------------------------------------------------------------------
class _Loaded:
    def __init__(self, ffi: Any, lib: Any, ggml: Any, pkg_dir: Path, callbacks: list) -> None:
        self.ffi = ffi
        self.lib = lib
        self.ggml = ggml
        self.pkg_dir = pkg_dir
        self.callbacks = callbacks  # keep cffi callbacks alive


_LOCK = threading.Lock()
_LOADED: Optional[_Loaded] = None
_LOG: Deque[Tuple[int, int, str]] = collections.deque(maxlen=20000)  # (serial, level, text)
_LOG_SERIAL = [0]
_ECHO = [os.environ.get("PYMEM_LLAMA_LOG", "") not in ("", "0")
         or os.environ.get("ORACLE_LOG", "") not in ("", "0")]


# ----------------------------------------------------------------------------------------
# discovery helpers (no loading)
# ----------------------------------------------------------------------------------------
def is_available() -> bool:
    """True if the llama-cpp-py-sync package is installed (does not load it)."""
    try:
        return importlib.util.find_spec(PKG) is not None
    except (ImportError, ValueError):
        return False


def installed_package_dir() -> Path:
    """Folder of the installed ``llama_cpp_py_sync`` package (never modified by pymem)."""
    spec = importlib.util.find_spec(PKG)
    if spec is None or not spec.submodule_search_locations:
        raise OracleUnavailable(
            f"llama.cpp oracle not available: the package {DIST} is not installed. "
            f"Install it with: {PIP_HINT}")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def installed_version() -> Optional[str]:
    """Version of the installed llama-cpp-py-sync distribution, or None if unknown."""
    try:
        from importlib import metadata
        return metadata.version(DIST)
    except Exception:
        pass
    try:
        txt = (installed_package_dir() / "_version.py").read_text()
        for line in txt.splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    except Exception:
        pass
    return None


def glibc_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the running glibc, or None when not running on glibc."""
    try:
        s = os.confstr("CS_GNU_LIBC_VERSION")  # e.g. "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return None
    if not s or not s.startswith("glibc"):
        return None
    try:
        major, minor = s.split()[1].split(".")[:2]
        return int(major), int(minor)
    except (IndexError, ValueError):
        return None


def needs_glibc_compat() -> bool:
    """True on Linux with glibc < 2.38 (the wheel's libraries need the compatibility copy)."""
    v = glibc_version()
    return sys.platform.startswith("linux") and v is not None and v < (2, 38)


def _file_hash(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def compat_dir() -> Path:
    """Cache folder holding the patched copy for the installed wheel (may not exist yet)."""
    pkg = installed_package_dir()
    lib = pkg / "libllama.so"
    if not lib.exists():
        raise OracleUnavailable(f"{DIST} is installed at {pkg} but has no libllama.so; "
                                f"reinstall it with: {PIP_HINT}")
    ver = installed_version() or "unknown"
    return cache_root() / f"{PKG}-{ver}-{_file_hash(lib)}-{_COMPAT_RECIPE}"


# ----------------------------------------------------------------------------------------
# ELF patch (set VER_FLG_WEAK on GLIBC_2.38 needs) and shim
# ----------------------------------------------------------------------------------------
def _patch_elf_weak(path: Path, bad: bytes = b"GLIBC_2.38") -> int:
    """Mark every ``bad`` version need in ``.gnu.version_r`` as weak; returns #entries changed."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return 0  # only ELF64 little-endian is relevant (the wheel is x86_64)
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, _ = struct.unpack_from("<HHH", data, 0x3A)
    secs = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        _name, typ, _fl, _addr, offset, size, link, info = struct.unpack_from("<IIQQQQII", data, off)
        secs.append((typ, offset, size, link, info))
    n = 0
    for typ, offset, _size, link, info in secs:
        if typ != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        strtab = secs[link][1]
        off = offset
        for _ in range(info):
            _ver, vn_cnt, _file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, off)
            aoff = off + vn_aux
            for _ in range(vn_cnt):
                _hash, flags, _other, name, nxt = struct.unpack_from("<IHHII", data, aoff)
                end = data.index(b"\0", strtab + name)
                if bytes(data[strtab + name:end]) == bad and not flags & 2:
                    struct.pack_into("<H", data, aoff + 4, flags | 2)  # VER_FLG_WEAK
                    n += 1
                aoff += nxt
            if vn_next == 0:
                break
            off += vn_next
    if n:
        path.write_bytes(bytes(data))
    return n


def _build_shim(out_dir: Path) -> Path:
    src = out_dir / "isoc23_shim.c"
    out = out_dir / _SHIM_NAME
    src.write_text(_SHIM_C)
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OracleUnavailable(
            f"the llama.cpp oracle needs a C compiler on this system (glibc {glibc_version()} < 2.38: "
            f"a small compatibility shim must be compiled), but '{cc}' was not found. "
            "Install one (e.g. apt-get install gcc) or set $CC.")
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise OracleUnavailable(f"compiling the glibc compatibility shim with '{cc}' failed:\n"
                                f"{e.stderr}") from e
    return out


def _ensure_compat_copy() -> Path:
    """Create (once, race-free) the patched copy of the installed package; returns its folder."""
    final = compat_dir()
    if (final / _COMPLETE_MARKER).exists():
        return final
    src_pkg = installed_package_dir()
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + final.name + "-", dir=root))
    try:
        dst_pkg = tmp / PKG
        shutil.copytree(src_pkg, dst_pkg, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "_orig_libs", "libisoc23_shim*"))
        patched = {}
        for f in sorted(dst_pkg.iterdir()):
            if f.is_symlink() or not f.is_file() or ".so" not in f.name:
                continue
            patched[f.name] = _patch_elf_weak(f)
        _build_shim(tmp)
        info = {"source": str(src_pkg), "version": installed_version(), "patched": patched,
                "recipe": _COMPAT_RECIPE}
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(info, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        for attempt in range(2):
            try:
                os.rename(tmp, final)  # atomic; fails if `final` exists (concurrent winner)
                return final
            except OSError:
                if (final / _COMPLETE_MARKER).exists():
                    return final  # somebody else won the race
                if attempt == 0 and final.exists():
                    # an incomplete leftover (should not happen with atomic renames): move aside
                    stale = root / f".stale-{final.name}-{os.getpid()}"
                    try:
                        os.rename(final, stale)
                        shutil.rmtree(stale, ignore_errors=True)
                    except OSError:
                        pass
                    continue
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# import + load
# ----------------------------------------------------------------------------------------
def _purge_modules() -> None:
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def _import_bindings(pkg_parent: Optional[Path]) -> Any:
    """Import llama_cpp_py_sync._cffi_bindings, from `pkg_parent` if given."""
    if pkg_parent is not None:
        want = (pkg_parent / PKG).resolve()
        mod = sys.modules.get(PKG)
        if mod is not None and Path(mod.__file__).resolve().parent != want:
            b = sys.modules.get(PKG + "._cffi_bindings")
            if b is not None and (getattr(b, "_lib", None) is not None or getattr(b, "_ggml_libraries", None)):
                raise OracleUnavailable(
                    f"{PKG} was already imported from {Path(mod.__file__).parent} and its libraries "
                    "loaded before pymem could apply the glibc < 2.38 compatibility copy; "
                    "load it through pymem.llama first.")
            _purge_modules()
        sys.path.insert(0, str(pkg_parent))
        try:
            return importlib.import_module(PKG + "._cffi_bindings")
        finally:
            try:
                sys.path.remove(str(pkg_parent))
            except ValueError:
                pass
    return importlib.import_module(PKG + "._cffi_bindings")


def _check_version(pkg_dir: Path) -> None:
    ver = None
    try:
        ver = importlib.import_module(PKG + "._version").__version__
    except Exception:
        ver = installed_version()
    if ver != PINNED_VERSION:
        warnings.warn(
            f"{DIST} {ver} is installed, but pymem targets {PINNED_VERSION} (llama.cpp {PINNED_TAG}); "
            f"the state byte format may differ. Install the pinned version: {PIP_HINT}",
            OracleVersionWarning, stacklevel=3)


def load() -> Tuple[Any, Any, Any]:
    """Load llama.cpp once per process; returns ``(ffi, lib, ggml_base_lib)``.

    Raises :class:`OracleUnavailable` with an installation hint if the wheel is missing or
    its libraries cannot be loaded.
    """
    global _LOADED
    if _LOADED is not None:
        return _LOADED.ffi, _LOADED.lib, _LOADED.ggml
    with _LOCK:
        if _LOADED is not None:
            return _LOADED.ffi, _LOADED.lib, _LOADED.ggml
        if not is_available():
            raise OracleUnavailable(
                f"llama.cpp oracle not available: the package {DIST} is not installed. "
                f"Install it with: {PIP_HINT}")
        parent: Optional[Path] = None
        if needs_glibc_compat():
            try:
                parent = _ensure_compat_copy()
            except OSError as e:
                raise OracleUnavailable(
                    f"could not prepare the glibc<2.38 compatibility copy of {DIST} in "
                    f"{cache_root()} ({e}); set $PYMEM_CACHE_DIR to a writable folder") from e
            try:
                ctypes.CDLL(str(parent / _SHIM_NAME), mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise OracleUnavailable(f"could not load the glibc compatibility shim: {e}") from e
        try:
            b = _import_bindings(parent)
            ffi = b.get_ffi()
            lib = b.get_lib()
            ggml = b.get_backend_base_lib()
        except OracleUnavailable:
            raise
        except (ImportError, RuntimeError, OSError) as e:
            raise OracleUnavailable(f"could not load llama.cpp from {DIST}: {e}. "
                                    f"(Re)install it with: {PIP_HINT}") from e
        pkg_dir = Path(b.__file__).resolve().parent
        _check_version(pkg_dir)
        try:
            ffi.cdef(_EXTRA_CDEF)
        except Exception:  # already declared (e.g. by another helper in this process)
            pass

        @ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def _log_cb(level: int, text: Any, _ud: Any) -> None:
            try:
                s = ffi.string(text).decode("utf-8", "replace")
                _LOG_SERIAL[0] += 1
                _LOG.append((_LOG_SERIAL[0], int(level), s))
                if _ECHO[0]:
                    sys.stderr.write(s)
            except Exception:  # never let an exception escape into C
                pass

        lib.llama_log_set(_log_cb, ffi.NULL)
        lib.llama_backend_init()
        _LOADED = _Loaded(ffi, lib, ggml, pkg_dir, [_log_cb])
        return ffi, lib, ggml


def is_loaded() -> bool:
    """True once :func:`load` succeeded in this process."""
    return _LOADED is not None


def loaded_package_dir() -> Optional[Path]:
    """Folder the llama.cpp libraries were loaded from (the cache copy on old glibc)."""
    return _LOADED.pkg_dir if _LOADED is not None else None


# ----------------------------------------------------------------------------------------
# log capture
# ----------------------------------------------------------------------------------------
def log_lines(n: Optional[int] = None, min_level: int = 0) -> List[Tuple[int, str]]:
    """Captured llama.cpp log lines ``(ggml_log_level, text)``, oldest first (the last ``n``).

    ``min_level`` filters by level (1 debug, 2 info, 3 warn, 4 error); continuation lines
    (level 5) are kept with their predecessor.
    """
    out: List[Tuple[int, str]] = []
    keep = False
    for _serial, level, text in list(_LOG):
        if level != 5:
            keep = level >= min_level
        if keep:
            out.append((level, text))
    return out if n is None else out[-n:]


def log_mark() -> int:
    """A marker for :func:`log_since` (the serial number of the last captured line)."""
    return _LOG_SERIAL[0]


def log_since(mark: int, min_level: int = 0) -> List[Tuple[int, str]]:
    """Log lines captured after :func:`log_mark` returned ``mark`` (as far as still buffered)."""
    out: List[Tuple[int, str]] = []
    keep = False
    for serial, level, text in list(_LOG):
        if level != 5:
            keep = level >= min_level
        if serial > mark and keep:
            out.append((level, text))
    return out


def log_text(n: int = 40, min_level: int = 0) -> str:
    """The last ``n`` captured log lines joined into one string."""
    return "".join(t for _, t in log_lines(n, min_level))


def clear_log() -> None:
    """Forget the captured log lines."""
    _LOG.clear()


def set_log_echo(on: bool) -> None:
    """Echo llama.cpp log lines to stderr (also enabled by PYMEM_LLAMA_LOG=1 / ORACLE_LOG=1)."""
    _ECHO[0] = bool(on)


def llama_version() -> str:
    """``llama_version()`` of the loaded library (b11739 reports '0.7.0-dev')."""
    ffi, lib, _ = load()
    try:
        return ffi.string(lib.llama_version()).decode()
    except AttributeError:
        return "n/a"


def system_info() -> str:
    """``llama_print_system_info()`` of the loaded library."""
    ffi, lib, _ = load()
    return ffi.string(lib.llama_print_system_info()).decode()
