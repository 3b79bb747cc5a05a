"""pymem: llama.cpp's inference memory module (KV cache, iSWA, recurrent, hybrid) with
llama.cpp's exact semantics and byte-compatible state, as a small C core with Python classes.

Target: llama.cpp b11739 (state format 11); format 10 reads and writes the older layout of
llama-cpp-python 0.3.36.  See README.md."""
from __future__ import annotations

from . import kernels, shapes, state
from ._errors import (
    BatchError,
    BufferTooSmallError,
    Error,
    InvalidArgumentError,
    InvalidStateError,
    NoSlotError,
    ShiftError,
    StateError,
    StateFileError,
    UnsupportedError,
)
from ._native import ffi as _ffi
from ._native import lib as _lib
from .batch import Batch, BatchContext, UBatch, seq_set_order
from .gguf import read_hparams
from .plan import estimate, from_gguf, max_context, memory_spec
from .memory import (
    STATE_PARTIAL_ONLY,
    STATE_SWA_ONLY,
    HybridISWAMemory,
    HybridMemory,
    KVCache,
    KVCacheISWA,
    KVPart,
    Memory,
    RecurrentMemory,
    RecurrentPart,
    Rope,
    row_size,
    type_id,
    type_name,
)

__version__ = _ffi.string(_lib.pm_version()).decode()

__all__ = [
    "Batch",
    "BatchContext",
    "BatchError",
    "BufferTooSmallError",
    "Error",
    "InvalidArgumentError",
    "InvalidStateError",
    "HybridISWAMemory",
    "HybridMemory",
    "KVCache",
    "KVCacheISWA",
    "KVPart",
    "RecurrentMemory",
    "RecurrentPart",
    "Memory",
    "NoSlotError",
    "Rope",
    "STATE_PARTIAL_ONLY",
    "STATE_SWA_ONLY",
    "ShiftError",
    "StateError",
    "StateFileError",
    "UBatch",
    "UnsupportedError",
    "estimate",
    "from_gguf",
    "kernels",
    "max_context",
    "memory_spec",
    "read_hparams",
    "row_size",
    "seq_set_order",
    "state",
    "type_id",
    "type_name",
]
