"""Helpers for the differential tests against llama-cpp-python 0.3.36 (llama.cpp 0c1e570)."""
from __future__ import annotations

from pymem.llama.mirror import Mirror


class LcpMirror(Mirror):
    """A Mirror against 0c1e570 at state format 10.

    One semantic difference from b11739 (and pymem) is checked as such instead of skipped:
    0c1e570's plain KV cache ignores LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY (its sequence state
    with the flag is the whole sequence state), while b11739 writes no KV section for it.

    ``no_shift``: 0c1e570 aborts (``GGML_ASSERT(buffer)`` in ggml-backend.cpp while applying the
    K-shift) when a hybrid-iSWA memory whose base KV cache has no layers (lfm2 with a sliding
    window) decodes after seq_add / seq_div; those steps are skipped on both sides (counted).
    Also skipped: a seq_rm rolling back (n_rs_seq > 0) a recurrent cell that several sequences
    share (0c1e570 rolls it back for all of them and returns true, b11739 refuses), and a seq_add moving a recurrent tail to a negative position (0c1e570 then
    corrupts its heap in the next decode)."""

    no_shift = False

    def seq_add(self, s, p0, p1, d):
        if self.no_shift:
            self._count("seq_add skipped (0c1e570 aborts)")
            return None
        if getattr(self.mem, "recurrent", None) is not None and d < 0:
            # 0c1e570 corrupts its heap (SIGSEGV / "double free" in a later decode) when seq_add
            # moves a recurrent tail to a negative position; b11739 and pymem free the cell
            tail = self.mem.seq_pos_max(s)
            lo, hi = max(p0, 0), (p1 if p1 >= 0 else 1 << 62)
            if tail >= 0 and lo <= tail < hi and tail + d < 0:
                self._count("seq_add skipped (negative recurrent position: 0c1e570 corrupts its heap)")
                return None
        return super().seq_add(s, p0, p1, d)

    def seq_rm(self, s, p0=-1, p1=-1):
        if s >= 0 and self._shared_rollback(s, p0, p1):
            self._count("seq_rm skipped (rollback of a shared recurrent cell: 0c1e570 moves every sequence in it)")
            return None
        return super().seq_rm(s, p0, p1)

    def _shared_rollback(self, s, p0, p1):
        """A suffix seq_rm that rolls back a recurrent tail cell other sequences share: 0c1e570
        rolls the cell back (moving all its sequences) and returns true; b11739 / pymem refuse."""
        rec = getattr(self.mem, "recurrent", None)
        if rec is None or not getattr(rec, "n_rs_seq", 0):
            return False
        from pymem.state import Blob, Layout

        st = Blob.parse(self.mem.state_write(envelope="llama"), layout=Layout.from_memory(self.mem)).state
        hi = p1 if p1 >= 0 else 1 << 62
        return any(s in c.seq_ids and len(c.seq_ids) > 1 and 0 < p0 <= c.pos < hi
                   for c in st.rec_section().cells)

    def seq_div(self, s, p0, p1, d):
        if self.no_shift:
            self._count("seq_div skipped (0c1e570 aborts)")
            return None
        return super().seq_div(s, p0, p1, d)

    def compare(self, seqs=None, per_seq=True, partial=None):
        if self.mem.kind != "kv":
            return super().compare(seqs, per_seq, partial)
        out = super().compare(seqs, per_seq, partial=False)
        if per_seq and partial is not False:
            for s in (range(self.n_seq_max) if seqs is None else seqs):
                self._cmp_blob(out, f"seq {s} PARTIAL_ONLY state (0c1e570: the whole sequence)",
                               self.llama.state_seq_get(s, 1), self.mem.state_write(s, envelope="llama"), seq=s)
        return out
