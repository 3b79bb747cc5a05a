"""Helpers of the pinned tests (tests/test_pinned_*.py): an in-process llama.cpp context that
also decodes embedding batches (M-RoPE positions) and records, through ggml's graph-eval
callback, what llama.cpp's graph actually reads for each ubatch: the positions (``inp_pos``)
and the KQ masks (``attn_inp_kq_mask*``).

The callback reads ``struct ggml_tensor`` fields at their fixed offsets (ggml.h of b11739:
``type`` at 0, ``ne[4]`` at 16, ``src[10]`` at 152, ``data`` at 248, ``name`` at 256); :func:`_check_layout`
verifies the name offset against ``ggml_get_name`` so a layout change fails loudly."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

_SRC_OFF, _NAME_OFF, _NE_OFF, _DATA_OFF = 152, 256, 16, 248
_GGML_MAX_SRC = 10


class Probe:
    """Per computed ubatch, a dict ``{tensor name: np.ndarray}`` of the inputs wanted (as
    first read by a graph node): ``inp_pos`` (int32, flat) and every KQ mask as
    ``mask@<first model layer reading it>`` (float32 ``[n_stream, n_tps, n_kv]``)."""

    def __init__(self) -> None:
        from pymem.llama import _loader

        self.ffi, _, self.ggml = _loader.load()
        self.ubatches: List[Dict[str, np.ndarray]] = []
        self._nodes: set = set()
        self._seen: set = set()
        self.callback = self.ffi.callback("bool(struct ggml_tensor *, bool, void *)", self._cb)

    def _name(self, t: Any) -> str:
        return self.ffi.string(self.ggml.ggml_get_name(t)).decode()

    def _srcs(self, t: Any) -> List[Any]:
        arr = self.ffi.cast("struct ggml_tensor **", self.ffi.cast("char *", t) + _SRC_OFF)
        return [arr[i] for i in range(_GGML_MAX_SRC) if arr[i] != self.ffi.NULL]

    @staticmethod
    def _wanted(name: str) -> bool:
        return name == "inp_pos" or name.startswith("attn_inp_kq_mask")

    def _cb(self, t: Any, ask: bool, _ud: Any) -> bool:
        try:
            _check_layout(self.ffi, self.ggml, t)
            name = self._name(t)
            srcs = [s for s in self._srcs(t) if self._wanted(self._name(s))]
            if ask:
                return bool(srcs)
            if name in self._nodes or not self.ubatches:  # a new graph computation
                self.ubatches.append({})
                self._nodes, self._seen = set(), set()
            self._nodes.add(name)
            layer = name.rsplit("-", 1)[-1]
            for s in srcs:
                key = int(self.ffi.cast("uintptr_t", s))
                if key in self._seen:
                    continue
                self._seen.add(key)
                sname = self._name(s)
                # the iSWA masks share one name: tell them apart by the first layer reading them
                self.ubatches[-1][sname if sname == "inp_pos" else f"mask@{layer}"] = self._read(s)
        except Exception as exc:  # never raise into C
            self.ubatches.append({"error": np.array([str(exc)])})
        return True

    def _read(self, t: Any) -> np.ndarray:
        ffi, ggml = self.ffi, self.ggml
        typ = ffi.cast("int32_t *", t)[0]
        ne = list(ffi.cast("int64_t *", ffi.cast("char *", t) + _NE_OFF)[0:4])
        nbytes = int(ggml.ggml_nbytes(t))
        data = ffi.cast("void **", ffi.cast("char *", t) + _DATA_OFF)[0]  # CPU backend: host memory
        buf = ffi.buffer(ffi.cast("char *", data), nbytes)[:]
        dt = {0: np.float32, 1: np.float16, 26: np.int32}[typ]
        a = np.frombuffer(bytes(buf), dt)
        if dt == np.int32:
            return a.copy()
        return a.astype(np.float32).reshape(ne[3], ne[2] * ne[1], ne[0])

    def take(self) -> List[Dict[str, np.ndarray]]:
        out, self.ubatches, self._nodes = self.ubatches, [], set()
        for u in out:
            if "error" in u:
                raise AssertionError(f"probe failed: {u['error'][0]}")
        return out


def _check_layout(ffi: Any, ggml: Any, t: Any) -> None:
    got = int(ffi.cast("uintptr_t", ggml.ggml_get_name(t))) - int(ffi.cast("uintptr_t", t))
    assert got == _NAME_OFF, f"struct ggml_tensor layout changed (name at {got})"


def make_context_class():
    """capi.Context with ``decode_embd`` (imported lazily: llama.cpp loads on first use)."""
    from pymem._oracle import capi

    class EmbdContext(capi.Context):
        def decode_embd(self, embd: Any, pos: Any, seq_ids: Sequence[Any], output: Any = None) -> int:
            """``llama_decode`` of an embedding batch: ``embd`` ``[n, n_embd]``, ``pos``
            ``[n]`` or ``[n_pos_per_embd, n]`` (llama.cpp reads n * n_pos_per_embd positions)."""
            ffi, lib = self._ffi, self._lib
            e = np.ascontiguousarray(embd, np.float32)
            n = e.shape[0]
            p = np.ascontiguousarray(np.asarray(pos, np.int32).reshape(-1))
            ids = [[s] if isinstance(s, (int, np.integer)) else list(s) for s in seq_ids]
            b = ffi.new("llama_batch *")
            keep = [ffi.from_buffer("float[]", e), ffi.from_buffer("int32_t[]", p),
                    ffi.new("int32_t[]", [len(x) for x in ids])]
            arrs = [ffi.new("llama_seq_id[]", x) for x in ids]
            keep.append(ffi.new("llama_seq_id *[]", arrs))
            b.n_tokens, b.token, b.embd, b.pos = n, ffi.NULL, keep[0], keep[1]
            b.n_seq_id, b.seq_id = keep[2], keep[3]
            if output is None:
                b.logits = ffi.NULL
            else:
                keep.append(ffi.new("int8_t[]", [int(bool(x)) for x in output]))
                b.logits = keep[-1]
            return int(lib.llama_decode(self.ptr, b[0]))

    return EmbdContext


def mask_visible(m: np.ndarray) -> np.ndarray:
    """True where a KQ mask lets the token see the cell."""
    return np.isfinite(m)


def first_diff(a: np.ndarray, b: np.ndarray) -> Optional[tuple]:
    d = np.argwhere(a != b)
    return None if len(d) == 0 else tuple(int(x) for x in d[0])
