"""An independent reader of llama.cpp state sections for the tests (it shares no code with
pymem's own parser, so the layout facts it reports check pymem rather than restate it)."""
from __future__ import annotations

import struct
from typing import Any, Dict


class Reader:
    def __init__(self, b: bytes, off: int = 0) -> None:
        self.b, self.o = b, off

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from("<" + fmt, self.b, self.o)
        self.o += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def skip(self, n: int) -> None:
        assert self.o + n <= len(self.b), "truncated blob"
        self.o += n


def parse_kv(r: Reader, rot: bool = True) -> Dict[str, Any]:
    """A KV section: everything but the K/V payload bytes, plus the raw cell metadata.
    ``rot``: the stream header has the k_rot / v_rot words (format 11; format 10 has not).
    Each stream's ``off`` holds the byte offsets of its fields (first cell, first layer), and
    ``k_off`` / ``v_off`` the offset of every layer's payload."""
    start = r.o
    sec: Dict[str, Any] = {"n_stream": r.take("I"), "streams": []}
    for _ in range(sec["n_stream"]):
        m0 = r.o
        cc = r.take("I")
        off: Dict[str, int] = {"n_stream": start, "cc": m0}
        st: Dict[str, Any] = {"cell_count": cc, "cells": [], "off": off}
        sec["streams"].append(st)
        for i in range(cc):
            if i == 0:
                off["pos0"], off["nid0"], off["id0"] = r.o, r.o + 4, r.o + 8
            pos, n = r.take("iI")
            st["cells"].append((pos, tuple(r.take("i") for _ in range(n))))
        st["meta"] = r.b[m0:r.o]
        if cc == 0:
            continue  # empty streams write nothing more
        off["v_trans"], off["n_layer"] = r.o, r.o + 4
        st["v_trans"], st["n_layer"] = r.take("II")
        st["k_rot"] = st["v_rot"] = None
        if rot:
            off["k_rot"], off["v_rot"] = r.o, r.o + 4
            st["k_rot"], st["v_rot"] = r.take("II")
        st["k"], st["v"], st["k_off"], st["v_off"] = [], [], [], []
        for _ in range(st["n_layer"]):
            off.setdefault("k_type", r.o)
            off.setdefault("k_row", r.o + 4)
            t, row = r.take("iQ")
            st["k"].append((t, row))
            off.setdefault("k_data", r.o)
            st["k_off"].append(r.o)
            r.skip(cc * row)
        for _ in range(st["n_layer"]):
            off.setdefault("v_type", r.o)
            t = r.take("i")
            if st["v_trans"]:
                off.setdefault("v_el", r.o)
                off.setdefault("v_ne", r.o + 4)
                el, ne = r.take("II")
                st["v"].append((t, el, ne))
                st["v_off"].append(r.o)
                r.skip(ne * cc * el)
            else:
                off.setdefault("v_row", r.o)
                row = r.take("Q")
                st["v"].append((t, row))
                st["v_off"].append(r.o)
                r.skip(cc * row)
    sec["span"] = (start, r.o)
    return sec


def parse_rec(r: Reader, n_recr: int) -> Dict[str, Any]:
    """A REC section (n_recr = layers that hold recurrent state; not derivable from the bytes)."""
    start = r.o
    cc = r.take("I")
    sec: Dict[str, Any] = {"cell_count": cc, "cells": []}
    for _ in range(cc):
        pos, n = r.take("iI")
        sec["cells"].append((pos, tuple(r.take("i") for _ in range(n))))
    sec["meta"] = r.b[start:r.o]
    sec["s_trans"], sec["n_layer"] = r.take("II")
    for key in ("r", "s"):
        sec[key] = []
        for _ in range(n_recr):
            t, row = r.take("iQ")
            sec[key].append((t, row))
            r.skip(cc * row)
    sec["span"] = (start, r.o)
    return sec
