"""The versioned envelope around every stored value.

::

    magic "PMSV" | u16 version | u8 kind | u8 reserved | u32 n_tokens | 16 B seed | 16 B key
    | u64 payload length | payload | 16 B XXH3-128 of everything before it

``seed`` is the fingerprint digest the value was stored under and ``key`` the key it was stored
under, so a value copied under another key, or stored for another model or layout, is refused.
"""
from __future__ import annotations

import struct
from typing import Tuple

import xxhash

from .errors import CorruptValueError

__all__ = ["MAGIC", "VERSION", "KINDS", "seal", "open_value", "HEADER"]

MAGIC = b"PMSV"
VERSION = 1
KINDS = {"block": 1, "tail": 2, "ckpt": 3, "probe": 4}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
_HDR = struct.Struct("<4sHBBI16s16sQ")
HEADER = _HDR.size
_SUM = 16


def seal(kind: str, n_tokens: int, seed: bytes, key: bytes, payload: bytes) -> bytes:
    """Wrap a payload into its envelope."""
    head = _HDR.pack(MAGIC, VERSION, KINDS[kind], 0, int(n_tokens), seed, key, len(payload))
    h = xxhash.xxh3_128()
    h.update(head)
    h.update(payload)
    return b"".join((head, payload, h.digest()))


def open_value(value: bytes, kind: str, seed: bytes, key: bytes) -> Tuple[int, memoryview]:
    """Check a value's envelope and checksum; returns ``(n_tokens, payload)``.  Raises
    :class:`CorruptValueError` naming the problem."""
    mv = memoryview(value)
    if len(mv) < HEADER + _SUM:
        raise CorruptValueError(f"value of {len(mv)} bytes is shorter than its envelope")
    magic, ver, k, _r, n, s, kk, plen = _HDR.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptValueError(f"bad magic {bytes(magic)!r}")
    if ver != VERSION:
        raise CorruptValueError(f"envelope version {ver} (this pymem reads {VERSION})")
    if HEADER + plen + _SUM != len(mv):
        raise CorruptValueError(f"payload length {plen} does not match the value size {len(mv)}")
    h = xxhash.xxh3_128()
    h.update(mv[:HEADER + plen])
    if h.digest() != bytes(mv[HEADER + plen:]):
        raise CorruptValueError("checksum mismatch")
    if _KIND_NAMES.get(k) != kind:
        raise CorruptValueError(f"kind {_KIND_NAMES.get(k, k)!r}, expected {kind!r}")
    if bytes(s) != seed:
        raise CorruptValueError("stored for another model or memory layout")
    if bytes(kk) != key:
        raise CorruptValueError("stored under another key")
    return int(n), mv[HEADER:HEADER + plen]


def check_value(value: bytes, key: bytes) -> Tuple[str, int, bytes]:
    """Check a value against its own envelope only (checksum, key): ``(kind, n_tokens, seed)``.
    Used by ``verify``, which does not know the fingerprint a value was stored under."""
    mv = memoryview(value)
    if len(mv) < HEADER + _SUM:
        raise CorruptValueError(f"value of {len(mv)} bytes is shorter than its envelope")
    magic, ver, k, _r, n, s, kk, plen = _HDR.unpack_from(mv, 0)
    if magic != MAGIC or ver != VERSION or k not in _KIND_NAMES:
        raise CorruptValueError("bad envelope")
    if HEADER + plen + _SUM != len(mv):
        raise CorruptValueError("payload length does not match the value size")
    h = xxhash.xxh3_128()
    h.update(mv[:HEADER + plen])
    if h.digest() != bytes(mv[HEADER + plen:]):
        raise CorruptValueError("checksum mismatch")
    if bytes(kk) != key:
        raise CorruptValueError("stored under another key")
    return _KIND_NAMES[k], int(n), bytes(s)
