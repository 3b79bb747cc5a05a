"""pymem.llama: move state between a live llama.cpp context and pymem memories.

* :mod:`pymem.llama.bridge`: ``export_state``, ``import_state``, ``memory_for``,
  ``context_params``, ``ContextParams``, ``llama_cpp`` (re-exported here, imported on first use);
* :mod:`pymem.llama._loader` loads the ``llama-cpp-py-sync==0.11739`` wheel's libraries
  (glibc < 2.38 compatibility copy, log capture): ``is_available``, ``OracleUnavailable``.

Importing this package does not load llama.cpp.  (pymem's own tests run llama.cpp as an oracle
through the private :mod:`pymem._oracle`.)
"""

from ._loader import PIP_HINT, PINNED_VERSION, OracleUnavailable, is_available

__all__ = [
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


def __getattr__(name: str):  # PEP 562: the bridge loads on first use
    if name in _BRIDGE:
        from . import bridge

        return getattr(bridge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
