"""Keys of the prompt-cache store: fingerprints and chained block hashes.

* The **model fingerprint** hashes a GGUF file in three parts: its metadata (every key and value),
  its tensor layout (names, types, shapes, offsets) and its tensor data.  It is computed once per
  file and cached by (path, size, mtime) in ``<pymem cache>/store/fingerprints.json``.
* The **layout fingerprint** lists every memory parameter that changes the bytes of a sequence
  state (kind, state format, per part: cache types, v_trans, layers and their row sizes, n_swa,
  SWA cache size; recurrent types and row sizes).
* Both are flattened into one ``settings`` dict (``{"model.data": ..., "base.type_k": "f16", ...}``)
  whose digest seeds the chain, so a different model or layout never shares an entry, and a miss
  can name the setting that differs.
* The key of block ``i`` is ``H(key(i-1) || tokens of block i)`` (key(-1) = the seed).  A prefix of
  ``m`` tokens that is not block-aligned is identified by ``H("tail", key(m // B - 1), tokens[.. m])``.

Hash: xxHash XXH3-128 (the ``xxhash`` package); keys are 32 hex digits.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
import xxhash

from .._errors import Error
from ..state.files import atomic_write
from .errors import FingerprintError, StoreError

__all__ = ["model_fingerprint", "layout_settings", "Chain", "digest", "tokens_array", "cache_dir"]

_CHUNK = 16 << 20
_LOCK = threading.Lock()


def digest(*parts: bytes) -> bytes:
    """XXH3-128 of the length-prefixed parts (16 bytes)."""
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(struct.pack("<Q", len(p)))
        h.update(p)
    return h.digest()


def cache_dir() -> Path:
    """pymem's cache folder ($PYMEM_CACHE_DIR, $XDG_CACHE_HOME/pymem, ~/.cache/pymem)."""
    env = os.environ.get("PYMEM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pymem"


def tokens_array(tokens: Any) -> np.ndarray:
    """Tokens as a contiguous int32 array (pymem.store.StoreError for anything else)."""
    try:
        a = np.asarray(tokens)
    except Exception as exc:  # pragma: no cover - numpy accepts nearly anything
        raise StoreError(f"tokens must be a sequence of token ids ({exc})") from None
    if a.ndim != 1:
        raise StoreError(f"tokens must be one-dimensional, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.int32)
    if a.dtype.kind not in "iu":
        raise StoreError(f"tokens must be integers, got dtype {a.dtype}")
    if a.min() < 0 or a.max() > 0x7FFFFFFF:
        raise StoreError("token ids must be in 0..2**31-1")
    return np.ascontiguousarray(a, dtype="<i4")


# ---------------------------------------------------------------------------------------------
# model fingerprint
# ---------------------------------------------------------------------------------------------
def _file_fingerprint(path: str) -> Dict[str, str]:
    try:
        from gguf import GGUFReader

        r = GGUFReader(path, "r")
    except Exception as exc:
        raise FingerprintError(f"{path}: not a readable GGUF file ({exc})") from None
    meta = xxhash.xxh3_128()
    for name, f in r.fields.items():
        meta.update(name.encode())
        for part in f.parts:
            meta.update(bytes(memoryview(part)))
    lay = xxhash.xxh3_128()
    first = None
    for t in r.tensors:
        lay.update(f"{t.name}|{int(t.tensor_type)}|{list(map(int, t.shape))}|{int(t.data_offset)}\n".encode())
        first = int(t.data_offset) if first is None else min(first, int(t.data_offset))
    data = xxhash.xxh3_128()
    start = first if first is not None else os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(start)
        while True:
            b = fh.read(_CHUNK)
            if not b:
                break
            data.update(b)
    arch = ""
    f = r.fields.get("general.architecture")
    if f is not None and f.data:
        arch = bytes(memoryview(f.parts[f.data[0]])).decode("utf-8", "replace")
    return {"arch": arch, "meta": meta.hexdigest(), "tensors": lay.hexdigest(), "data": data.hexdigest()}


def model_fingerprint(path: Union[str, "os.PathLike[str]"], use_cache: bool = True) -> Dict[str, str]:
    """The fingerprint of a GGUF model file: ``{"arch", "meta", "tensors", "data"}`` (hex digests),
    cached by path, size and mtime."""
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
    except OSError as exc:
        raise FingerprintError(f"model file {p}: {exc.strerror}") from None
    ident = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cfile = cache_dir() / "store" / "fingerprints.json"
    if use_cache:
        with _LOCK:
            try:
                cached = json.loads(cfile.read_text())
                if isinstance(cached, dict) and isinstance(cached.get(ident), dict):
                    return dict(cached[ident])
            except (OSError, ValueError):
                pass
    fp = _file_fingerprint(p)
    if use_cache:
        with _LOCK:
            try:
                cfile.parent.mkdir(parents=True, exist_ok=True)
                try:
                    cached = json.loads(cfile.read_text())
                    if not isinstance(cached, dict):
                        cached = {}
                except (OSError, ValueError):
                    cached = {}
                # drop stale entries of the same path
                cached = {k: v for k, v in cached.items() if k.split("|")[0] != p}
                cached[ident] = fp
                data = json.dumps(cached).encode()
                atomic_write(cfile, [data], len(data))
            except (OSError, Error):
                pass  # an unwritable cache only costs a re-hash
    return fp


# ---------------------------------------------------------------------------------------------
# memory-layout fingerprint
# ---------------------------------------------------------------------------------------------
def part_roles(mem: Any) -> List[str]:
    """"full" or "swa" for each KV part of ``mem`` (full = rebuildable from blocks)."""
    return ["swa" if (p.n_swa > 0 and p.swa_type != "none") else "full" for p in mem.kv_parts()]


def _part_names(kind: str, n: int) -> List[str]:
    if kind in ("iswa", "hybrid_iswa"):
        return ["base", "swa"][:n]
    if kind == "hybrid":
        return ["attn"][:n]
    return ["kv"][:n]


def layout_settings(mem: Any) -> Dict[str, Any]:
    """Every memory parameter that changes the bytes of a sequence state, flattened."""

    kind = mem.kind
    out: Dict[str, Any] = {"kind": kind}
    parts = mem.kv_parts()
    roles = part_roles(mem)
    fmt = None
    for name, p, role in zip(_part_names(kind, len(parts)), parts, roles):
        fmt = p.format if fmt is None else fmt
        out[f"{name}.type_k"] = p.type_k
        out[f"{name}.type_v"] = p.type_v
        out[f"{name}.v_trans"] = bool(p.v_trans)
        out[f"{name}.cell_ext"] = bool(p.cell_ext)
        out[f"{name}.rot"] = [int(p.k_rot), int(p.v_rot)]
        # a sequence section lists every stream (one per sequence when not unified)
        out[f"{name}.n_stream"] = int(p.n_stream)
        dims = []
        for il in p.layers:
            li = p._layers[il][1]
            dims.append([int(il), int(li.n_embd_k_gqa), int(li.n_embd_v_gqa), int(li.k_row_bytes),
                         int(li.v_row_bytes)])
        out[f"{name}.layers"] = dims
        if role == "swa":
            out[f"{name}.n_swa"] = int(p.n_swa)
            out[f"{name}.swa_type"] = p.swa_type
            # the window checkpoint must fit the SWA cache (swa_full, n_seq_max, unified, n_ubatch)
            out[f"{name}.size"] = int(p.size)
    rec = getattr(mem, "recurrent", None)
    if rec is not None:
        out["recurrent.type_r"] = rec.type_r
        out["recurrent.type_s"] = rec.type_s
        out["recurrent.n_rs_seq"] = int(rec.n_rs_seq)
        out["recurrent.layers"] = [[int(il), *[int(x) for x in rec._layers[il][1].row_bytes]] for il in rec.layers]
    out["format"] = int(fmt) if fmt is not None else int(getattr(mem, "format", 11) or 11)
    return out


def settings_digest(settings: Dict[str, Any], block_tokens: int) -> bytes:
    return digest(b"pymem-store/1", json.dumps(settings, sort_keys=True).encode(), struct.pack("<I", block_tokens))


def describe_difference(stored: Dict[str, Any], mine: Dict[str, Any]) -> str:
    """Name the settings that differ between two flattened fingerprints."""
    diffs = []
    for k in sorted(set(stored) | set(mine)):
        a, b = stored.get(k, "(absent)"), mine.get(k, "(absent)")
        if a != b:
            if k.startswith("model."):
                what = {"model.data": "the model's tensor data (other weights)",
                        "model.tensors": "the model's tensor layout",
                        "model.meta": "the model's GGUF metadata",
                        "model.arch": "the model architecture",
                        "model.fingerprint": "the model fingerprint"}.get(k, k)
                diffs.append(what)
            else:
                sa, sb = json.dumps(a), json.dumps(b)
                if len(sa) > 60 or len(sb) > 60:
                    diffs.append(f"{k} differs")
                else:
                    diffs.append(f"{k}: stored {sa}, target {sb}")
    return "; ".join(diffs)


class Chain:
    """Block keys of one token sequence under one seed (fingerprint digest)."""

    def __init__(self, seed: bytes, block_tokens: int, tokens: np.ndarray) -> None:
        self.seed, self.B, self.tokens = seed, int(block_tokens), tokens
        self._blocks: List[bytes] = []

    def block(self, i: int) -> bytes:
        """Key of block i (covering tokens [i*B, (i+1)*B)); i = -1 is the seed."""
        if i < 0:
            return self.seed
        B, t = self.B, self.tokens
        if (i + 1) * B > len(t):
            raise StoreError(f"block {i} needs {(i + 1) * B} tokens, have {len(t)}")
        while len(self._blocks) <= i:
            j = len(self._blocks)
            prev = self._blocks[-1] if self._blocks else self.seed
            self._blocks.append(digest(prev, t[j * B:(j + 1) * B].tobytes()))
        return self._blocks[i]

    def prefix(self, m: int) -> bytes:
        """Identity of the prefix of m tokens (the block key when m is block-aligned)."""
        q, r = divmod(int(m), self.B)
        if r == 0:
            return self.block(q - 1)
        return digest(b"tail", self.block(q - 1), self.tokens[q * self.B:m].tobytes())

    def ckpt(self, m: int) -> bytes:
        return digest(b"ckpt", self.prefix(m))

    @staticmethod
    def probe(tokens: np.ndarray, block_tokens: int, slot: int) -> bytes:
        """Fingerprint-free key of the first block: records which settings stored it."""
        return digest(b"probe", struct.pack("<II", block_tokens, slot), tokens[:block_tokens].tobytes())


def hexkey(b: bytes) -> str:
    return b.hex()
