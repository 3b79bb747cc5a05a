"""Run the same memory operations in real llama.cpp and in a pymem memory, and compare their
states byte for byte.

llama.cpp computes K/V rows in its forward pass; pymem does not run models.  After each
successful decode the mirror copies the rows llama.cpp computed for the *newly placed*
cells (and only those) into pymem, located through pymem's own placement.  Everything
else (metadata, placement, sequence operations, K-shift rotation, stream copies, state
writes and restores) is pymem's own work, so an opaque copy of llama.cpp's bytes cannot
pass: a wrong placement puts rows in the wrong cells and the next comparison fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .. import _errors as E
from ..state.sections import KVSection, RecSection, parse_kv, parse_rec
from ..batch import Batch
from ..memory import KVPart, Memory, RecurrentPart

__all__ = ["Mirror", "Mismatch", "first_difference"]

Item = tuple  # (token, pos or None, seq ids)


@dataclass
class Mismatch:
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


def first_difference(a: bytes, b: bytes) -> str:
    if a == b:
        return ""
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k] != b[k]), n)
    return (f"lengths {len(a)} / {len(b)}, first difference at byte {i}: "
            f"{a[i:i + 8].hex()} vs {b[i:i + 8].hex()}")


def _kv_parts(mem: Memory) -> list[KVPart]:
    return list(mem.kv_parts())


def _shift_refused_by_design(mem: Memory) -> bool:
    """pymem's deliberate can_shift divergence: llama.cpp reports True for a K type it cannot
    rotate (bf16; quantized K without a power-of-two Hadamard rotation) and fails at the next
    decode; pymem reports False and refuses the shift at seq_add / seq_div."""
    for p in _kv_parts(mem):
        t, r = p.type_k, int(p.k_rot)
        if t == "bf16" or (t not in ("f32", "f16") and (r <= 0 or r & (r - 1))):
            return True
    return False


def _rec_part(mem: Memory) -> RecurrentPart | None:
    return getattr(mem, "recurrent", None)


@dataclass
class Mirror:
    """``llama``: a worker ContextHandle (or capi.Context); ``mem``: the pymem memory built for
    the same model and context parameters."""

    llama: Any
    mem: Memory
    n_ubatch: int
    n_vocab: int = 0
    n_seq_max: int = 1
    k_tolerance: float = 0.0
    log: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    #: KV rows pymem cannot know: rows llama.cpp's model wrote into cells that were freed
    #: again within the same batch (SWA purges).  They are invisible in states, except
    #: through the stale view of a pending cross-stream copy; comparisons skip them there.
    unknown: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)
    #: sequences restored (from pymem's own blob) while a rollback was pending: their recurrent
    #: rows came from snapshot planes pymem cannot know; compared again once they are decoded
    rec_stale: set = field(default_factory=set)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _log(self, *op: Any) -> None:
        self.log.append(op)

    # -- batches -----------------------------------------------------------------------------
    def decode(self, items: Sequence[Item], output: Any = None) -> int:
        """llama_decode on both; returns the common return code (0, 1 or -1)."""
        self._log("decode", list(items))
        auto = all(it[1] is None for it in items)
        rc_l = self.llama.decode([(t, p, list(s) if not isinstance(s, int) else [s]) for t, p, s in items],
                                 output)
        batch = Batch(tokens=[it[0] for it in items],
                      pos=None if auto else [it[1] for it in items],
                      seq_ids=[it[2] for it in items], output=output)
        return self._decode_pymem(rc_l, batch, [it[2] for it in items])

    def decode_embd(self, embd: Any, pos: Any, seq_ids: Sequence[Any], output: Any = None) -> int:
        """An embedding batch (``embd`` float32 ``[n, n_embd]``) on both sides; ``pos`` is
        ``[n]`` or ``[n_pos_per_embd, n]`` (M-RoPE sections: pos, y, x, 0).  llama.cpp's side
        needs a ``decode_embd`` method (tests/test_pinned_mrope.py gives one)."""
        self._log("decode_embd", np.asarray(pos).tolist(), list(seq_ids))
        rc_l = self.llama.decode_embd(embd, pos, seq_ids, output)
        batch = Batch(tokens=None, n_tokens=len(seq_ids), pos=pos, seq_ids=list(seq_ids), output=output)
        return self._decode_pymem(rc_l, batch, list(seq_ids))

    def _decode_pymem(self, rc_l: int, batch: Batch, seq_ids: Sequence[Any]) -> int:
        rec = _rec_part(self.mem)
        rolling = rec.rs_idx() if rec is not None and rec.n_rs_seq > 0 else None
        try:
            ctx = self.mem.decode(batch, n_ubatch=self.n_ubatch, n_vocab=self.n_vocab)
            rc_p = 0
        except E.BatchError as exc:
            rc_p, ctx, why = -1, None, str(exc)
        except E.NoSlotError as exc:
            rc_p, ctx, why = 1, None, str(exc)
        if rc_l != rc_p:
            raise AssertionError(f"decode: llama.cpp returned {rc_l}, pymem {rc_p}"
                                 + (f" ({why})" if ctx is None else ""))
        self._count(f"decode rc={rc_l}")
        if rc_l in (0, 1):  # the update ran: queued stream copies carry unknown rows along
            for part, src, dst in self.pending:
                self.unknown[(part, dst)] = set(self.unknown.get((part, src), ()))
            self.pending.clear()
        if rc_l == 0:
            seqs = {q for s in seq_ids for q in ([s] if isinstance(s, int) else s)}
            if rolling is not None:
                # a pending rollback of a sequence the batch does not hold is applied by this
                # decode too: its tail now holds snapshot rows pymem never saw (llama.cpp's)
                done = np.flatnonzero((rolling != 0) & (rec.rs_idx() == 0))
                seqs |= {int(q) for q in done}
            self._copy_new_rows(ctx, seqs)
            self.rec_stale -= seqs
        return rc_l

    def _copy_new_rows(self, ctx: Any, seqs: set) -> None:
        whole = self.llama.state_get()
        n = int.from_bytes(whole[:4], "little")
        off = 4 + n
        for part_index, kv in enumerate(_kv_parts(self.mem)):
            sec, off = parse_kv(whole, off, format=kv.format, cell_ext=kv.cell_ext)
            self._copy_part(ctx, part_index, kv, sec)
        rec = _rec_part(self.mem)
        if rec is not None:
            sec, off = parse_rec(whole, off, len(rec.layers))
            self._copy_rec(seqs, rec, sec)

    def _copy_rec(self, seqs: set, rec: RecurrentPart, sec: RecSection) -> None:
        """The new states of the sequences the batch computed (every id of every token), in
        the cells they end up in (a later ubatch of the same batch may move a state to another
        cell); every other row was moved by pymem itself."""
        cells = rec.cells_view()
        used = np.flatnonzero(np.any(cells.seq != 0, axis=1))
        if len(used) != len(sec.cells):
            raise AssertionError(f"recurrent: pymem holds {len(used)} cells, llama.cpp {len(sec.cells)}")
        new = {int(cells.tail[q]) for q in seqs if q < len(cells) and cells.tail[q] >= 0}
        for cell in sorted(new):
            rank = int(np.searchsorted(used, cell))
            if rank >= len(used) or used[rank] != cell:
                continue
            for li, il in enumerate(rec.layers):
                L = sec.layers[li]
                for which, row, data in ((0, L.r_row, L.r), (1, L.s_row, L.s)):
                    if row == 0:
                        continue
                    view = (rec.r if which == 0 else rec.s)(il).view(np.uint8).reshape(-1, row)
                    view[cell] = np.frombuffer(data[rank * row:(rank + 1) * row], np.uint8)

    def _copy_part(self, ctx: Any, part: int, kv: KVPart, sec: KVSection) -> None:
        for ub in ctx:
            streams, cells = ub._cells(part)
            for g, strm in enumerate(streams):
                used = np.flatnonzero(kv.cells_view(int(strm)).pos != -1)
                lst = sec.streams[int(strm)]
                if len(used) != len(lst.cells):
                    raise AssertionError(f"stream {strm}: pymem holds {len(used)} cells, llama.cpp {len(lst.cells)}")
                unknown = self.unknown.setdefault((part, int(strm)), set())
                for cell in cells[g]:
                    rank = int(np.searchsorted(used, cell))
                    if rank >= len(used) or used[rank] != cell:
                        unknown.add(int(cell))  # freed later in the same batch
                        continue
                    unknown.discard(int(cell))
                    for li, il in enumerate(kv.layers):
                        kview = kv.k(il, int(strm)).view(np.uint8).reshape(kv.size, -1)
                        kview[cell] = np.frombuffer(lst.k_row_of(li, rank), np.uint8)
                        vv = kv.v(il, int(strm))
                        vb = np.frombuffer(lst.v_row_of(li, rank), np.uint8)
                        if kv.v_trans:
                            el = vv.dtype.itemsize
                            vu = vv.view(np.uint8).reshape(vv.shape[0], kv.size, el)
                            vu[:, cell, :] = vb.reshape(-1, el)
                        else:
                            vv.view(np.uint8).reshape(kv.size, -1)[cell] = vb

    # -- operations ------------------------------------------------------------------------------
    def seq_rm(self, s: int, p0: int = -1, p1: int = -1) -> bool:
        self._log("seq_rm", s, p0, p1)
        a = self.llama.seq_rm(s, p0, p1)
        b = self.mem.seq_rm(s, p0, p1)
        if a != b:
            raise AssertionError(f"seq_rm({s}, {p0}, {p1}): llama.cpp {a}, pymem {b}")
        self._count("seq_rm")
        return a

    def seq_cp(self, a: int, b: int, p0: int = -1, p1: int = -1) -> None:
        self._log("seq_cp", a, b, p0, p1)
        self.llama.seq_cp(a, b, p0, p1)
        self.mem.seq_cp(a, b, p0, p1)
        for part, kv in enumerate(_kv_parts(self.mem)):
            if kv.n_stream > 1 and a != b:
                self.pending.append((part, a, b))
        self._count("seq_cp")

    def seq_keep(self, s: int) -> None:
        self._log("seq_keep", s)
        self.llama.seq_keep(s)
        self.mem.seq_keep(s)
        self._count("seq_keep")

    def seq_add(self, s: int, p0: int, p1: int, d: int) -> None:
        self._log("seq_add", s, p0, p1, d)
        self.llama.seq_add(s, p0, p1, d)
        self.mem.seq_add(s, p0, p1, d)
        self._count("seq_add")

    def seq_div(self, s: int, p0: int, p1: int, d: int) -> None:
        self._log("seq_div", s, p0, p1, d)
        self.llama.seq_div(s, p0, p1, d)
        self.mem.seq_div(s, p0, p1, d)
        self._count("seq_div")

    def clear(self, data: bool = True) -> None:
        self._log("clear", data)
        self.llama.clear(data)
        self.mem.clear(data)
        if data:
            self.unknown.clear()
        self._count("clear")

    def seq_restore(self, src: int, dst: int, flags: int = 0) -> int:
        """Save sequence src and restore it into dst, each side with its own blob.

        When the restore fails (no room), llama.cpp leaves a half-restored state while pymem
        leaves everything unchanged (its documented divergence): both sides then go back to
        the state before the attempt so the comparison can continue."""
        self._log("seq_restore", src, dst, flags)
        stale = self._rollback_pending()
        before = self.llama.state_get()
        lb = self.llama.state_seq_get(src, flags)
        pb = self.mem.state_write(src, flags=flags, envelope="llama")
        ok_l = self.llama.state_seq_set(lb, dst, flags)
        try:
            self.mem.state_read(pb, dst, flags=flags, envelope="llama")
            ok_p = len(pb)
        except (E.StateError, E.NoSlotError):
            ok_p = 0
        if (ok_l != 0) != (ok_p != 0):
            raise AssertionError(f"seq restore {src}->{dst}: llama.cpp returned {ok_l}, pymem {ok_p}")
        if ok_l != 0 and stale:
            self.rec_stale.add(dst)
        if ok_l != 0:  # the restored cells hold known rows
            for part, kv in enumerate(_kv_parts(self.mem)):
                strm = dst if kv.n_stream > 1 else 0
                seqbits = kv.cells_view(strm).seq
                held = np.flatnonzero((seqbits[:, dst // 64] >> np.uint64(dst % 64)) & np.uint64(1))
                self.unknown.get((part, strm), set()).difference_update(int(c) for c in held)
        if ok_l == 0:
            if self.mem.state_write(envelope="llama") != before:
                raise AssertionError("a failed restore changed pymem's memory")
            self.llama.state_set(before)
            self.mem.state_read(before, envelope="llama")
            self._count("seq_restore failed (both sides reset)")
        self._count("seq_restore")
        return ok_l

    def whole_restore(self, from_llama: bool = True) -> None:
        """Restore one whole blob into both sides: llama.cpp's (from_llama) or pymem's.  A whole
        restore repacks the cells, so both sides must read the same bytes to stay aligned."""
        self._log("whole_restore", from_llama)
        blob = self.llama.state_get() if from_llama else self.mem.state_write(envelope="llama")
        if self.llama.state_set(blob) != len(blob):
            raise AssertionError("llama.cpp rejected the whole state")
        self.mem.state_read(blob, envelope="llama")
        self.unknown.clear()
        self._count("whole_restore")

    # -- comparison -------------------------------------------------------------------------------
    def compare(self, seqs: Iterable[int] | None = None, per_seq: bool = True,
                partial: bool | None = None) -> list[Mismatch]:
        """Differences between the two memories: positions, whole blob, per-sequence blobs
        (and their PARTIAL_ONLY variants)."""
        out: list[Mismatch] = []
        seqs = list(range(self.n_seq_max)) if seqs is None else list(seqs)
        for s in seqs:
            lp = (self.llama.pos_min(s), self.llama.pos_max(s))
            pp = (self.mem.seq_pos_min(s), self.mem.seq_pos_max(s))
            if lp != pp:
                out.append(Mismatch(f"seq {s} positions", f"llama.cpp {lp}, pymem {pp}"))
        cs = (bool(self.llama.can_shift()), self.mem.can_shift)
        if cs[0] != cs[1] and not (cs == (True, False) and _shift_refused_by_design(self.mem)):
            out.append(Mismatch("can_shift", f"llama.cpp {cs[0]}, pymem {cs[1]}"))
        self._cmp_blob(out, "whole state", self.llama.state_get(), self.mem.state_write(envelope="llama"), seq=-1)
        if partial is None:
            partial = True
        skip = sum(1 for p in _kv_parts(self.mem) if p.swa_type == "none")  # no partial state
        if per_seq:
            for s in seqs:
                self._cmp_blob(out, f"seq {s} state", self.llama.state_seq_get(s),
                               self.mem.state_write(s, envelope="llama"), seq=s)
                if partial:
                    self._cmp_blob(out, f"seq {s} partial state", self.llama.state_seq_get(s, 1),
                                   self.mem.state_write(s, flags=1, envelope="llama"), kv_skip=skip, seq=s)
        self._count("compare")
        self.stats["bytes compared"] = self.stats.get("bytes compared", 0)
        return out

    def _cmp_blob(self, out: list, what: str, a: bytes, b: bytes, kv_skip: int = 0, seq: int = -1) -> None:
        self.stats["states compared"] = self.stats.get("states compared", 0) + 1
        self.stats["bytes compared"] = self.stats.get("bytes compared", 0) + len(a)
        if a == b:
            return
        if self.k_tolerance > 0 and len(a) == len(b) and self._close(a, b, kv_skip=kv_skip):
            self._count("compared within K tolerance")
            return
        if len(a) == len(b) and any(self.unknown.values()) and self._close(a, b, kv_skip=kv_skip, seq=seq):
            self._count("compared without rows unknown to pymem")
            return
        if len(a) == len(b) and self._rollback_pending() and self._close(a, b, False, kv_skip):
            # llama.cpp's rollback snapshots (planes 1..n_rs_seq) are computed by its model and
            # not readable through its API, so pymem cannot hold them: while a rollback is
            # pending, the recurrent rows are compared after the next decode instead
            self._count("compared without pending rollback rows")
            return
        out.append(Mismatch(what, first_difference(a, b)))

    def _rollback_pending(self) -> bool:
        rec = _rec_part(self.mem)
        return rec is not None and rec.n_rs_seq > 0 and (bool(rec.rs_idx().any()) or bool(self.rec_stale))

    def _close(self, a: bytes, b: bytes, rec_rows: bool = True, kv_skip: int = 0, seq: int | None = None) -> bool:
        """Equal metadata and V, K within tolerance (after K-shifts of quantized caches);
        with rec_rows False, recurrent sections compare by metadata only."""
        try:
            return self._close_parsed(a, b, rec_rows, list(enumerate(_kv_parts(self.mem)))[kv_skip:], seq)
        except E.StateError:
            return False

    def _rows_cells(self, part: int, kv: KVPart, strm: int, seq: int) -> np.ndarray:
        """The cells whose rows a blob lists for this stream, in row order (pymem's selection)."""
        cv = kv.cells_view(strm)
        used = cv.pos != -1
        if seq < 0:
            return np.flatnonzero(used)
        has = used & (((cv.seq[:, seq // 64] >> np.uint64(seq % 64)) & np.uint64(1)) != 0)
        if kv.swa_type != "none" and has.any():
            pmax = int(cv.pos[has].max())
            p0 = cv.pos.astype(np.int64)
            n = kv.n_swa
            if kv.swa_type == "standard":
                masked = pmax - p0 >= n
            elif kv.swa_type == "chunked":
                masked = p0 < (pmax // n) * n
            else:
                masked = (pmax - p0 < -(n // 2)) | (pmax - p0 > n // 2)
            has &= ~masked
        return np.flatnonzero(has)

    def _close_parsed(self, a: bytes, b: bytes, rec_rows: bool, kvs: list, seq: int | None = None) -> bool:
        if a[:4] != b[:4]:
            return False
        off = 8 if a.startswith(b"\xd8\x3c\x14\xaf") else 4 + int.from_bytes(a[:4], "little")
        if a[:off] != b[:off]:
            return False
        for part, kv in kvs:
            sa, oa = parse_kv(a, off, kv.format, kv.cell_ext)
            sb, ob = parse_kv(b, off, kv.format, kv.cell_ext)
            if oa != ob:
                return False
            for strm, (x, y) in enumerate(zip(sa.streams, sb.streams)):
                if x.cells != y.cells or len(x.layers) != len(y.layers):
                    return False
                skip = set()
                if seq is not None and self.unknown.get((part, strm)):
                    cells = self._rows_cells(part, kv, strm, seq) if len(x.cells) else np.array([], int)
                    if len(cells) != len(x.cells):
                        return False
                    skip = {r for r, c in enumerate(cells) if int(c) in self.unknown[(part, strm)]}
                for li, (la, lb) in enumerate(zip(x.layers, y.layers)):
                    if la.k_row != lb.k_row or la.k_type != lb.k_type:
                        return False
                    for r in range(len(x.cells)):
                        if r in skip:
                            continue
                        ka, kb = x.k_row_of(li, r), y.k_row_of(li, r)
                        if ka != kb and not _k_close(ka, kb, la.k_type, self.k_tolerance):
                            return False
                        if x.v_row_of(li, r) != y.v_row_of(li, r):
                            return False
            off = oa
        rec = _rec_part(self.mem)
        if rec is None or rec_rows:
            return a[off:] == b[off:]  # recurrent rows are never shifted: exact
        ra, _ = parse_rec(a, off, len(rec.layers))
        rb, _ = parse_rec(b, off, len(rec.layers))
        return ra.cells == rb.cells and ra.n_layer == rb.n_layer and \
            [(L.r_row, L.s_row) for L in ra.layers] == [(L.r_row, L.s_row) for L in rb.layers]

    def check(self, seqs: Iterable[int] | None = None, per_seq: bool = True) -> None:
        bad = self.compare(seqs, per_seq)
        if bad:
            ops = "\n  ".join(repr(op) for op in self.log[-40:])
            raise AssertionError("; ".join(map(str, bad)) + f"\nlast operations:\n  {ops}")


def _k_close(a: bytes, b: bytes, type_id: int, tol: float) -> bool:
    from ..params import type_name
    from .._native import ffi, lib

    name = type_name(type_id)
    if name == "f32":
        x, y = np.frombuffer(a, np.float32), np.frombuffer(b, np.float32)
    elif name == "f16":
        x, y = np.frombuffer(a, np.float16).astype(np.float32), np.frombuffer(b, np.float16).astype(np.float32)
    else:
        block = lib.pm_type_block_size(type_id)
        n = len(a) // lib.pm_type_size(type_id) * block
        x = np.empty(n, np.float32)
        y = np.empty(n, np.float32)
        lib.pm_type_to_float(type_id, ffi.from_buffer(a), ffi.from_buffer("float[]", x, require_writable=True), n)
        lib.pm_type_to_float(type_id, ffi.from_buffer(b), ffi.from_buffer("float[]", y, require_writable=True), n)
    return bool(np.all(np.abs(x - y) <= tol * (1.0 + np.abs(y))))
