"""Row data gathered on demand: :class:`GatheredRows` stands for the rows (or transposed V
columns) of one layer of an edited state, each output cell's row taken from some cell of
the input's row buffers (zero-copy views of a memory-mapped file).  The bytes are produced
in bounded chunks while the file is written (:meth:`GatheredRows.chunks`), and the input
pages read for a chunk are handed back to the page cache afterwards
(:func:`pymem.state.mapped.release`), so writing an edit of a large file keeps only a few
MiB resident."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from . import mapped

__all__ = ["GatheredRows", "row_pieces", "CHUNK"]

#: bytes gathered at a time
CHUNK = 4 << 20


def _u8(view: Any) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8) if len(view) else np.zeros(0, np.uint8)


class GatheredRows:
    """``n`` rows (``cols=False``: ``n`` rows of ``row`` bytes) or transposed V
    (``cols=True``: ``embd`` lines of ``n`` elements of ``row`` bytes), output cell ``i``
    taken from cell ``cell[i]`` of input buffer ``stream[i]``.  ``sources`` maps an input
    stream to ``(buffer, cell_count)``.  Behaves as read-only bytes where it must
    (``len``, slicing, ``bytes()``, ``==``); :meth:`chunks` yields the bytes without
    holding them whole."""

    def __init__(self, sources: Dict[int, Tuple[Any, int]], stream: np.ndarray, cell: np.ndarray, row: int,
                 cols: bool = False, embd: int = 1) -> None:
        self.sources, self.stream, self.cell = _compose(sources, np.asarray(stream, np.int64),
                                                        np.asarray(cell, np.int64), bool(cols))
        self.row = int(row)
        self.cols = bool(cols)
        self.embd = int(embd) if cols else 1
        self.n = int(len(cell))

    def __len__(self) -> int:
        return self.n * self.row * self.embd

    # -- streaming ---------------------------------------------------------------------------
    def _contiguous(self) -> Tuple[int, int] | None:
        """(source stream, first cell) when the rows are one run of one source."""
        if self.n == 0:
            return None
        s0 = int(self.stream[0])
        a = int(self.cell[0])
        if (self.stream == s0).all() and (self.cell == np.arange(a, a + self.n)).all():
            return s0, a
        return None

    def chunks(self, limit: int = CHUNK) -> Iterator[Any]:
        """The bytes, in pieces of about ``limit`` bytes or less."""
        if len(self) == 0:
            return
        run = self._contiguous()
        try:
            if not self.cols:
                yield from (self._rows_run(run, limit) if run else self._rows(limit))
            else:
                yield from (self._cols_run(run, limit) if run else self._cols(limit))
        finally:
            self._release()

    def _release(self) -> None:
        for view, _ in self.sources.values():
            mapped.release(view)

    def _rows_run(self, run: Tuple[int, int], limit: int) -> Iterator[Any]:
        view = memoryview(self.sources[run[0]][0]).cast("B")
        a = run[1] * self.row
        end = a + len(self)
        step = max(self.row, limit // self.row * self.row)
        for o in range(a, end, step):
            yield view[o:min(end, o + step)]
            mapped.release(view[o:min(end, o + step)])

    def _rows(self, limit: int) -> Iterator[Any]:
        srcs = {s: _u8(v).reshape(cc, self.row) for s, (v, cc) in self.sources.items()}
        step = max(1, limit // max(1, self.row))
        for i0 in range(0, self.n, step):
            i1 = min(self.n, i0 + step)
            yield self._gather_rows(srcs, self.stream[i0:i1], self.cell[i0:i1]).reshape(-1).data
            self._release()

    def _gather_rows(self, srcs: Dict[int, np.ndarray], stream: np.ndarray, cell: np.ndarray) -> np.ndarray:
        ids = np.unique(stream)
        if len(ids) == 1:
            return srcs[int(ids[0])][cell]
        out = np.empty((len(cell), self.row), np.uint8)
        for s in ids:
            m = stream == s
            out[m] = srcs[int(s)][cell[m]]
        return out

    def _cols_run(self, run: Tuple[int, int], limit: int) -> Iterator[Any]:
        view, cc = self.sources[run[0]]
        view = memoryview(view).cast("B")
        el, n, a = self.row, self.n, run[1]
        if a == 0 and n == cc:   # the whole buffer
            total = len(self)
            for o in range(0, total, limit):
                yield view[o:min(total, o + limit)]
                mapped.release(view[o:min(total, o + limit)])
            return
        done = 0
        for j in range(self.embd):
            o = (j * cc + a) * el
            yield view[o:o + n * el]
            done += n * el
            if done >= limit:
                self._release()
                done = 0

    def _cols(self, limit: int) -> Iterator[Any]:
        srcs = {s: _u8(v).reshape(self.embd, cc, self.row) for s, (v, cc) in self.sources.items()}
        per = max(1, self.n * self.row)
        step = max(1, limit // per)
        ids = np.unique(self.stream)
        for j0 in range(0, self.embd, step):
            j1 = min(self.embd, j0 + step)
            if len(ids) == 1:
                out = srcs[int(ids[0])][j0:j1][:, self.cell, :]
            else:
                out = np.empty((j1 - j0, self.n, self.row), np.uint8)
                for s in ids:
                    m = self.stream == s
                    out[:, m, :] = srcs[int(s)][j0:j1][:, self.cell[m], :]
            yield np.ascontiguousarray(out).reshape(-1).data
            self._release()

    # -- bytes-like behaviour (materialises: for small states and tests) -----------------------
    def __bytes__(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())

    def __getitem__(self, key: Any) -> bytes:
        return bytes(self)[key]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GatheredRows):
            other = bytes(other)
        try:
            return bytes(self) == bytes(other)  # type: ignore[call-overload]
        except TypeError:
            return NotImplemented

    def __ne__(self, other: object) -> bool:
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<GatheredRows {self.n} cells x {self.row * self.embd} bytes{' (transposed)' if self.cols else ''}>"


def _compose(sources: Dict[int, Tuple[Any, int]], stream: np.ndarray, cell: np.ndarray, cols: bool
             ) -> Tuple[Dict[int, Tuple[Any, int]], np.ndarray, np.ndarray]:
    """Sources that are themselves gathered (an edit of an edited state) are replaced by the
    buffers they gather from, so rows are always read from the original input."""
    if not any(isinstance(v, GatheredRows) for v, _ in sources.values()):
        return sources, stream, cell
    out: Dict[int, Tuple[Any, int]] = {}
    keys: Dict[Tuple[int, int], int] = {}
    ns, nc = np.empty_like(stream), np.empty_like(cell)

    def key(buf: Any, cc: int) -> int:
        k = keys.get((id(buf), cc))
        if k is None:
            k = keys[(id(buf), cc)] = len(out)
            out[k] = (buf, cc)
        return k

    for s, (buf, cc) in sources.items():
        m = stream == s
        if isinstance(buf, GatheredRows):
            if buf.cols != cols:   # pragma: no cover (one cache has one V layout)
                raise ValueError("gathered rows of another layout")
            lut = np.zeros(max(buf.sources, default=0) + 1, np.int64)
            for k, (b, c) in buf.sources.items():
                lut[k] = key(b, c)
            ns[m] = lut[buf.stream[cell[m]]]
            nc[m] = buf.cell[cell[m]]
        else:
            ns[m] = key(buf, cc)
            nc[m] = cell[m]
    return out, ns, nc


def row_pieces(x: Any) -> List[Any] | Iterator[Any]:
    """The pieces of one row-data field: gathered rows stream, anything else is one piece."""
    if isinstance(x, GatheredRows):
        return x.chunks()
    return (x,)
