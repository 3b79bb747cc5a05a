"""The wrappers around memory sections: session (``ggsn``) and sequence-file (``ggsq``) headers,
whole-context (``u32 len, arch``) and per-sequence (``u32 0xaf143cd8, i32 seq_id``) blob envelopes,
format-version tables, and :class:`EditError`."""
from __future__ import annotations

import os
import struct
from typing import Any, Callable, List, Optional, Tuple, Union

from .. import _errors as E
from .._errors import StateError


PathLike = Union[str, "os.PathLike[str]"]


Progress = Optional[Callable[[int, int], None]]


MAGIC_SESSION = 0x6767736E   # 'ggsn'


MAGIC_SEQ_FILE = 0x67677371  # 'ggsq'


MAGIC_SEQ_BLOB = 0xAF143CD8  # llama_state_seq_get_data's io magic


#: session file version -> KV state format
SESSION_VERSIONS = {11: 11, 10: 10}


#: sequence state file version -> KV state format
SEQ_FILE_VERSIONS = {4: 11, 3: 10}


_SESSION_OF_FORMAT = {v: k for k, v in SESSION_VERSIONS.items()}


_SEQ_FILE_OF_FORMAT = {v: k for k, v in SEQ_FILE_VERSIONS.items()}


_BUILD_OF_FORMAT = {11: "llama.cpp b11739", 10: "llama.cpp 0c1e570 / llama-cpp-python 0.3.36"}


_MAX_SEQ = 256


_CHUNK = 1 << 22


class EditError(E.Error, ValueError):
    """An offline edit that llama.cpp would refuse (e.g. a partial seq_rm on a recurrent
    memory, where llama_memory_seq_rm returns false) or that cannot be done without more
    information (a K-shift without the model).  Nothing was written."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _u32(buf: Any, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def wrap_seq(seq_id: int, sec: bytes) -> bytes:
    """``llama_state_seq_get_data``'s envelope: io magic + source seq id + sections."""
    return struct.pack("<Ii", MAGIC_SEQ_BLOB, int(seq_id)) + bytes(sec)


def unwrap_seq(blob: bytes) -> Tuple[int, bytes]:
    """Inverse of :func:`wrap_seq`: ``(seq_id, sections)``."""
    b = memoryview(blob)
    if len(b) < 8:
        raise StateError(f"sequence blob too short: {len(b)} bytes, the envelope alone needs 8 (offset 0)")
    magic, seq = struct.unpack_from("<Ii", b, 0)
    if magic != MAGIC_SEQ_BLOB:
        raise StateError(f"not a sequence blob: magic 0x{magic:08x} at offset 0, expected 0x{MAGIC_SEQ_BLOB:08x} "
                         "(llama_state_seq_set_data rejects it: 'wrong sequence state magic')")
    return seq, bytes(b[8:])


def wrap_context(arch: str, sec: bytes) -> bytes:
    """``llama_state_get_data``'s envelope: u32 length + architecture name + sections."""
    a = arch.encode()
    return struct.pack("<I", len(a)) + a + bytes(sec)


def _read_arch(b: Any, off: int, what: str) -> Tuple[str, int]:
    if len(b) - off < 4:
        raise StateError(f"truncated {what}: the architecture name length needs 4 bytes at offset {off}, "
                         f"{len(b) - off} left")
    n = _u32(b, off)
    if n == 0 or n > 256:
        raise StateError(f"{what}: architecture name length {n} at offset {off} is not in 1..256 "
                         "(not a llama.cpp context state)")
    if len(b) - off - 4 < n:
        raise StateError(f"truncated {what}: the architecture name needs {n} bytes at offset {off + 4}, "
                         f"{len(b) - off - 4} left")
    raw = bytes(b[off + 4:off + 4 + n])
    try:
        arch = raw.decode("ascii")
    except UnicodeDecodeError:
        arch = ""
    if not arch or not all(c.isalnum() or c in "_-." for c in arch):
        raise StateError(f"{what}: architecture name at offset {off + 4} is not a name: {raw[:32]!r}")
    return arch, off + 4 + n


def unwrap_context(blob: bytes) -> Tuple[str, bytes]:
    """Inverse of :func:`wrap_context`: ``(arch, sections)``."""
    arch, off = _read_arch(memoryview(blob), 0, "context blob")
    return arch, bytes(memoryview(blob)[off:])


def _looks_like_arch(b: Any, off: int = 0) -> bool:
    try:
        _read_arch(b, off, "")
        return True
    except StateError:
        return False


# ---------------------------------------------------------------------------------------------
# shared parsing
# ---------------------------------------------------------------------------------------------
def _expect_magic(mv: memoryview, magic: int, what: str) -> None:
    if len(mv) < 4:
        raise StateError(f"truncated {what}: the magic needs 4 bytes at offset 0, {len(mv)} left")
    m = _u32(mv, 0)
    if m != magic:
        hint = _guess_kind(mv)
        raise StateError(f"{what}: magic 0x{m:08x} at offset 0 is not 0x{magic:08x} "
                         f"('{struct.pack('<I', magic)[::-1].decode()}')" + (f"; this looks like a {hint}" if hint else ""))


def _guess_kind(mv: memoryview) -> str:
    if len(mv) >= 4:
        m = _u32(mv, 0)
        if m == MAGIC_SESSION:
            return "session file"
        if m == MAGIC_SEQ_FILE:
            return "sequence state file"
        if m == MAGIC_SEQ_BLOB:
            return "sequence blob"
        if bytes(mv[:4]) == b"GGUF":
            return "GGUF model file, not a state"
        if _looks_like_arch(mv):
            return "context blob"
    return ""


def _read_tokens(mv: memoryview, off: int, what: str) -> Tuple[List[int], int]:
    if len(mv) - off < 4:
        raise StateError(f"truncated {what}: the token count needs 4 bytes at offset {off}, {len(mv) - off} left")
    n = _u32(mv, off)
    off += 4
    if n * 4 > len(mv) - off:
        raise StateError(f"{what}: token count {n} at offset {off - 4} needs {4 * n} bytes, "
                         f"{len(mv) - off} left (truncated or corrupt)")
    toks = list(struct.unpack_from(f"<{n}i", mv, off))
    return toks, off + 4 * n
