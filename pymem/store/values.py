"""The versioned envelope around every stored value.

::

    magic "PMSV" | u16 version | u8 kind | u8 reserved | u32 n_tokens | 16 B seed | 16 B key
    | u64 payload length | payload | 16 B XXH3-128 of everything before it

``seed`` is the fingerprint digest the value was stored under and ``key`` the key it was stored
under, so a value copied under another key, or stored for another model or layout, is refused.
"""
from __future__ import annotations

import struct
from typing import Any, NamedTuple, Sequence, Tuple

import xxhash

from .errors import CorruptValueError

__all__ = ["MAGIC", "VERSION", "KINDS", "seal", "open_value", "open_header", "check_sum", "Header", "HEADER"]

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
    h = open_header(mv, len(mv))
    check_sum([mv[:HEADER + h.plen]], mv[HEADER + h.plen:])
    h.check(kind, seed, key)
    return h.n_tokens, mv[HEADER:HEADER + h.plen]


class Header(NamedTuple):
    kind: int
    n_tokens: int
    seed: bytes
    key: bytes
    plen: int

    def check(self, kind: str, seed: bytes, key: bytes) -> None:
        """The value is what the caller asked for (kind, fingerprint, key)."""
        if _KIND_NAMES.get(self.kind) != kind:
            raise CorruptValueError(f"kind {_KIND_NAMES.get(self.kind, self.kind)!r}, expected {kind!r}")
        if self.seed != seed:
            raise CorruptValueError("stored for another model or memory layout")
        if self.key != key:
            raise CorruptValueError("stored under another key")


def open_header(head: Any, size: int) -> Header:
    """Parse the envelope header (the first :data:`HEADER` bytes) of a value of ``size`` bytes and
    check its magic, version and payload length."""
    if size < HEADER + _SUM:
        raise CorruptValueError(f"value of {size} bytes is shorter than its envelope")
    magic, ver, k, _r, n, s, kk, plen = _HDR.unpack_from(head, 0)
    if magic != MAGIC:
        raise CorruptValueError(f"bad magic {bytes(magic)!r}")
    if ver != VERSION:
        raise CorruptValueError(f"envelope version {ver} (this pymem reads {VERSION})")
    if HEADER + plen + _SUM != size:
        raise CorruptValueError(f"payload length {plen} does not match the value size {size}")
    return Header(k, int(n), bytes(s), bytes(kk), int(plen))


def check_sum(pieces: Sequence[Any], digest: Any) -> None:
    """The value's checksum: ``pieces`` are its bytes before the checksum, in order (they may lie
    in several buffers), ``digest`` the stored 16 bytes."""
    h = xxhash.xxh3_128()
    for p in pieces:
        h.update(p)
    if h.digest() != bytes(digest):
        raise CorruptValueError("checksum mismatch")


def check_value(value: bytes, key: bytes) -> Tuple[str, int, bytes]:
    """Check a value against its own envelope only (checksum, key): ``(kind, n_tokens, seed)``.
    Used by ``verify``, which does not know the fingerprint a value was stored under."""
    mv = memoryview(value)
    h = open_header(mv, len(mv))
    if h.kind not in _KIND_NAMES:
        raise CorruptValueError("bad envelope")
    check_sum([mv[:HEADER + h.plen]], mv[HEADER + h.plen:])
    if h.key != key:
        raise CorruptValueError("stored under another key")
    return _KIND_NAMES[h.kind], h.n_tokens, h.seed
