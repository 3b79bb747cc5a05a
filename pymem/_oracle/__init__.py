"""pymem._oracle: the real llama.cpp (llama-cpp-py-sync==0.11739, build b11739) as a test oracle.

Private: it serves pymem's tests, benchmarks and ``pymem demo``; users call :mod:`pymem.llama`.

* :mod:`pymem._oracle.capi` wraps llama.cpp's C API in-process (libraries loaded by
  :mod:`pymem.llama._loader`);
* :mod:`pymem._oracle.worker` runs it in a crash-isolated persistent child process;
* :mod:`pymem._oracle.tinymodels` generates tiny random-weight GGUF models;
* :mod:`pymem._oracle.mirror` runs the same operations in llama.cpp and in a pymem memory;
* :mod:`pymem._oracle.verify` proves offline state edits against llama.cpp.

Importing this package does not load llama.cpp.
"""

from ..llama._loader import PIP_HINT, PINNED_VERSION, OracleUnavailable, is_available
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
]
