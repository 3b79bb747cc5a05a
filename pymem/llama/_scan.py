"""What a llama.cpp state blob tells the bridge about a context's memory layout (cache types,
V layout) when llama.cpp has no getter for it: a bounded scan of the first KV stream with cells."""
from __future__ import annotations

import struct
from typing import Any, Dict

_SEQ_MAGIC = 0xAF143CD8


def _E() -> Any:
    from .. import _errors

    return _errors


def _section_start(blob: Any, seq: int) -> int:
    """Offset of the memory section in a llama.cpp blob (context blob: arch string; sequence
    blob: io magic + seq id)."""
    mv = memoryview(blob)
    if len(mv) < 8:
        raise _E().StateError(f"llama.cpp state blob of {len(mv)} bytes is too short")
    if seq < 0:
        (n,) = struct.unpack_from("<I", mv, 0)
        return 4 + n
    (magic,) = struct.unpack_from("<I", mv, 0)
    if magic != _SEQ_MAGIC:
        raise _E().StateError(f"not a llama.cpp sequence blob (magic {magic:#x})")
    return 8


def _kv_part_count(kind: str, flags: int) -> int:
    """How many KV sections precede the recurrent one in a blob of this kind."""
    if kind in ("iswa", "hybrid_iswa"):
        return 1 if flags & 1 else 2
    if kind == "kv":
        return 0 if flags & 1 else 1
    if kind == "hybrid":
        return 0 if flags & 1 else 1
    return 0


def _scan(blob: Any, seq: int, flags: int, kind: str, cell_ext: bool, fmt: int) -> Dict[str, Any]:
    """n_stream of the first KV section, and v_trans / K type / V type of the first KV stream
    that holds cells and layers. Returns what it could read (no copy of any row)."""
    from ..params import type_name

    out: Dict[str, Any] = {}
    mv = memoryview(blob)
    try:
        off = _section_start(mv, seq)

        def u32() -> int:
            nonlocal off
            (v,) = struct.unpack_from("<I", mv, off)
            off += 4
            return v

        def u64() -> int:
            nonlocal off
            (v,) = struct.unpack_from("<Q", mv, off)
            off += 8
            return v

        for part in range(_kv_part_count(kind, flags)):
            n_stream = u32()
            if part == 0:
                out["n_stream"] = n_stream
            for _ in range(n_stream):
                cc = u32()
                if cc == 0:
                    continue
                for _ in range(cc):
                    off += 4                                  # pos
                    n = u32()
                    off += (12 if cell_ext else 0) + 4 * n    # ext, seq ids
                v_trans = u32()
                n_layer = u32()
                off += 8 if fmt >= 11 else 0                  # k_rot, v_rot (format 11)
                k_type = None
                for _ in range(n_layer):
                    t = struct.unpack_from("<i", mv, off)[0]
                    off += 4
                    row = u64()
                    off += row * cc
                    k_type = t if k_type is None else k_type
                v_type = None
                for _ in range(n_layer):
                    t = struct.unpack_from("<i", mv, off)[0]
                    off += 4
                    if v_trans:
                        el, n_embd = u32(), u32()
                        off += el * n_embd * cc
                    else:
                        row = u64()
                        off += row * cc
                    v_type = t if v_type is None else v_type
                if off > len(mv):
                    return out
                if n_layer and "v_trans" not in out:
                    out.update(v_trans=bool(v_trans), type_k=type_name(k_type), type_v=type_name(v_type))
                    return out
    except (struct.error, ValueError, KeyError):
        pass
    return out
