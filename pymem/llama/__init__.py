"""pymem.llama: the real llama.cpp (llama-cpp-py-sync==0.11739, build b11739) as an oracle.

* :mod:`pymem.llama._loader` loads the wheel's libraries (glibc < 2.38 compatibility copy,
  log capture); :mod:`pymem.llama.capi` wraps the C API in-process;
  :mod:`pymem.llama.worker` runs it in a crash-isolated persistent child process;
  :mod:`pymem.llama.tinymodels` generates tiny random-weight GGUF models;
  :mod:`pymem.llama.bridge` moves state between a live llama.cpp context and pymem memories
  (``export_state``, ``import_state``, ``memory_for``, ``context_params``, ``llama_cpp``;
  re-exported here, imported on first use).

Nothing here imports pymem's C extension, and importing this package does not load llama.cpp.
"""

from ._loader import PIP_HINT, PINNED_VERSION, OracleUnavailable, is_available
from .worker import (
    ContextHandle,
    ModelHandle,
    OracleCallError,
    OracleCrashed,
    OracleError,
    OracleTimeout,
    OracleWorker,
    StaleHandleError,
)

__all__ = [
    "OracleWorker",
    "ModelHandle",
    "ContextHandle",
    "OracleError",
    "OracleCrashed",
    "OracleTimeout",
    "OracleCallError",
    "StaleHandleError",
    "OracleUnavailable",
    "is_available",
    "PINNED_VERSION",
    "PIP_HINT",
    "export_state",
    "import_state",
    "memory_for",
    "context_params",
    "ContextParams",
    "llama_cpp",
]

_BRIDGE = ("export_state", "import_state", "memory_for", "context_params", "ContextParams", "llama_cpp")


def __getattr__(name: str):  # PEP 562: the bridge (and pymem's C extension) load on first use
    if name in _BRIDGE:
        from . import bridge

        return getattr(bridge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
