"""A :class:`pymem._oracle.mirror.Mirror` against llama-cpp-python 0.3.36 (llama.cpp 0c1e570) at
state format 10, knowing that build's differences from b11739 (the traces, the demo and the
conformance kit use it)."""
from __future__ import annotations

from typing import Any

from .mirror import Mirror

__all__ = ["LcpMirror", "KNOWN_DIFFERENCES"]

#: behaviour of 0c1e570 that differs from b11739 (and pymem) beyond the byte format
KNOWN_DIFFERENCES = {
    "partial_kv": "a plain KV cache ignores LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY (the sequence state with the "
                  "flag is the whole sequence state); b11739 writes no KV section",
    "shift_empty_base": "a K-shift of a hybrid-iSWA memory whose base KV cache has no layers (lfm2 with a "
                        "sliding window) aborts: GGML_ASSERT(buffer) in ggml-backend.cpp",
    "negative_recurrent": "seq_add moving a recurrent tail to a negative position corrupts the heap "
                          "(SIGSEGV / 'double free' in a later decode); b11739 handles it",
    "shared_rollback": "with n_rs_seq > 0, a suffix seq_rm on a recurrent cell shared by several sequences "
                       "rolls the cell back for all of them and returns true; b11739 refuses (false)",
    "rwkv7_ubatches": "decoding rwkv7 in several ubatches corrupts the heap (SIGSEGV / SIGABRT)",
}


class LcpMirror(Mirror):
    """A Mirror against 0c1e570 at state format 10.

    The PARTIAL_ONLY difference is checked as such (0c1e570's flagged state of a plain KV
    cache must equal pymem's whole sequence state). Operations on which 0c1e570 aborts or
    corrupts its heap are skipped on both sides and counted in ``stats``: seq_add / seq_div
    when ``no_shift`` (hybrid-iSWA with an empty base cache), seq_add moving a recurrent tail
    below 0, and a rollback seq_rm of a shared recurrent cell."""

    no_shift = False

    @classmethod
    def for_memory(cls, llama: Any, mem: Any, **kw: Any) -> "LcpMirror":
        m = cls(llama, mem, **kw)
        m.no_shift = mem.kind == "hybrid_iswa" and not any(p.layers for p in mem.kv_parts()[:1])
        return m

    def compare(self, seqs: Any = None, per_seq: bool = True, partial: Any = None) -> list:
        if self.mem.kind != "kv":
            return super().compare(seqs, per_seq, partial)
        out = super().compare(seqs, per_seq, partial=False)
        if per_seq and partial is not False:
            for s in (range(self.n_seq_max) if seqs is None else seqs):
                self._cmp_blob(out, f"seq {s} PARTIAL_ONLY state (0c1e570: the whole sequence)",
                               self.llama.state_seq_get(s, 1), self.mem.state_write(s, envelope="llama"), seq=s)
        return out

    def seq_add(self, s: int, p0: int, p1: int, d: int) -> Any:
        if self.no_shift:
            self._count("seq_add skipped (0c1e570 aborts)")
            return None
        if getattr(self.mem, "recurrent", None) is not None and d < 0:
            tail = self.mem.seq_pos_max(s)
            lo, hi = max(p0, 0), (p1 if p1 >= 0 else 1 << 62)
            if tail >= 0 and lo <= tail < hi and tail + d < 0:
                self._count("seq_add skipped (negative recurrent position: 0c1e570 corrupts its heap)")
                return None
        return super().seq_add(s, p0, p1, d)

    def seq_div(self, s: int, p0: int, p1: int, d: int) -> Any:
        if self.no_shift:
            self._count("seq_div skipped (0c1e570 aborts)")
            return None
        return super().seq_div(s, p0, p1, d)

    def seq_rm(self, s: int, p0: int = -1, p1: int = -1) -> Any:
        if s >= 0 and self._shared_rollback(s, p0, p1):
            self._count("seq_rm skipped (rollback of a shared recurrent cell: 0c1e570 moves every sequence in it)")
            return None
        return super().seq_rm(s, p0, p1)

    def _shared_rollback(self, s: int, p0: int, p1: int) -> bool:
        rec = getattr(self.mem, "recurrent", None)
        if rec is None or not getattr(rec, "n_rs_seq", 0):
            return False
        from ..state import Blob, Layout

        st = Blob.parse(self.mem.state_write(envelope="llama"), layout=Layout.from_memory(self.mem)).state
        hi = p1 if p1 >= 0 else 1 << 62
        return any(s in c.seq_ids and len(c.seq_ids) > 1 and 0 < p0 <= c.pos < hi for c in st.rec_section().cells)
