"""pymem.llama: the real llama.cpp (llama-cpp-py-sync==0.11739, build b11739) as an oracle.

* :mod:`pymem.llama._loader` loads the wheel's libraries (glibc < 2.38 compatibility copy,
  log capture); :mod:`pymem.llama.capi` wraps the C API in-process;
  :mod:`pymem.llama.worker` runs it in a crash-isolated persistent child process;
  :mod:`pymem.llama.tinymodels` generates tiny random-weight GGUF models.

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
]
