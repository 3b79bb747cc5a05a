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


def parse_kv(r: Reader) -> Dict[str, Any]:
    """A KV section: everything but the K/V payload bytes, plus the raw cell metadata."""
    start = r.o
    sec: Dict[str, Any] = {"n_stream": r.take("I"), "streams": []}
    for _ in range(sec["n_stream"]):
        m0 = r.o
        cc = r.take("I")
        st: Dict[str, Any] = {"cell_count": cc, "cells": []}
        sec["streams"].append(st)
        for _ in range(cc):
            pos, n = r.take("iI")
            st["cells"].append((pos, tuple(r.take("i") for _ in range(n))))
        st["meta"] = r.b[m0:r.o]
        if cc == 0:
            continue  # empty streams write nothing more
        st["v_trans"], st["n_layer"], st["k_rot"], st["v_rot"] = r.take("IIII")
        st["k"], st["v"], st["k_off"] = [], [], []
        for _ in range(st["n_layer"]):
            t, row = r.take("iQ")
            st["k"].append((t, row))
            st["k_off"].append(r.o)
            r.skip(cc * row)
        for _ in range(st["n_layer"]):
            t = r.take("i")
            if st["v_trans"]:
                el, ne = r.take("II")
                st["v"].append((t, el, ne))
                r.skip(ne * cc * el)
            else:
                row = r.take("Q")
                st["v"].append((t, row))
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
