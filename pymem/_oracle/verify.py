"""Prove offline state edits against real llama.cpp: the reference is llama.cpp doing the
same operations itself, then its next update (a decode), then saving.

Used by ``pymem demo`` and the tests.  The reference runs in a llama.cpp context (a
:class:`~pymem._oracle.worker.ContextHandle` or :class:`~pymem._oracle.capi.Context`):

* :func:`llama_ops` applies :class:`pymem.state.Op` operations as llama.cpp calls would;
* :func:`llama_update` makes llama.cpp apply its pending update (K-shift, stream copies)
  the only way its public API allows, a decode: one token in an unused *scratch* sequence,
  which is then removed again (it leaves no cell behind, so the saved state is that of the
  operations followed by the update).

:func:`check_session_edit` runs the whole proof for a session file.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["llama_ops", "llama_update", "states_close", "EditCheck", "check_session_edit"]


def llama_ops(ctx: Any, ops: Sequence[Any], n_seq_max: int) -> bool:
    """Apply operations in llama.cpp; False as soon as llama_memory_seq_rm returns false.
    ``truncate n`` is ``seq_rm(-1, n, -1)``, or per sequence where llama.cpp refuses -1
    (recurrent and hybrid memories)."""
    from ..state import Op

    for raw in ops:
        op = Op.coerce(raw)
        a = op.args
        if op.name == "seq_rm":
            if not ctx.seq_rm(*a):
                return False
        elif op.name == "truncate":
            if not ctx.seq_rm(-1, a[0], -1):
                for s in range(n_seq_max):
                    if ctx.pos_max(s) >= 0 and not ctx.seq_rm(s, a[0], -1):
                        return False
        elif op.name == "seq_cp":
            ctx.seq_cp(*a)
        elif op.name == "seq_keep":
            ctx.seq_keep(a[0])
        elif op.name == "seq_mv":
            if a[0] != a[1]:
                ctx.seq_cp(a[0], a[1], -1, -1)
                if not ctx.seq_rm(a[0], -1, -1):
                    return False
        elif op.name == "seq_add":
            ctx.seq_add(*a)
        elif op.name == "seq_div":
            ctx.seq_div(*a)
        else:  # pragma: no cover
            raise ValueError(op.name)
    return True


def llama_update(ctx: Any, scratch_seq: int) -> int:
    """Let llama.cpp apply its pending update (K-shift, stream copies) without placing
    anything: llama_decode applies the update first, then fails to place a batch larger than
    the scratch sequence's stream (it returns 1, "no KV slot", and nothing else changed).
    Where the batch fits after all (a purely recurrent memory, which never has an update, or
    an empty cache) the scratch sequence is removed again.  Returns the decode's rc."""
    if ctx.pos_max(scratch_seq) >= 0:
        raise ValueError(f"scratch sequence {scratch_seq} is not empty")
    per_stream = ctx.n_ctx_seq() or ctx.n_ctx()
    n = min(ctx.n_batch(), per_stream + 1)
    rc = ctx.decode([(1, i, [scratch_seq]) for i in range(n)], logits=False)
    if rc == 0:
        if not ctx.seq_rm(scratch_seq, -1, -1):
            raise RuntimeError("llama.cpp refused to remove the scratch sequence")
    elif rc != 1:
        raise RuntimeError(f"llama.cpp: the update decode returned {rc}")
    return rc


def states_close(a: bytes, b: bytes, k_tolerance: float = 0.0) -> bool:
    """Equal bytes, or (with a tolerance) equal except K rows within ``k_tolerance``
    (relative) after dequantization: a K-shift of a quantized cache re-quantizes."""
    if a == b:
        return True
    if k_tolerance <= 0 or len(a) != len(b):
        return False
    from .. import state
    from .mirror import _k_close

    try:
        x, y = state.parse(a), state.parse(b)
    except Exception:
        return False
    if type(x) is not type(y) or x.layout.pattern != y.layout.pattern or x._header_chunks() != y._header_chunks():
        return False
    for sp, p, q in zip(x.state.specs, x.state.sections, y.state.sections):
        if sp.kind != "kv":
            if p.dump() != q.dump():
                return False
            continue
        for s, t in zip(p.streams, q.streams):
            if s.cells != t.cells or len(s.layers) != len(t.layers):
                return False
            for la, lb in zip(s.layers, t.layers):
                if la.v != lb.v or (la.k_type, la.k_row) != (lb.k_type, lb.k_row):
                    return False
                if la.k != lb.k and not _k_close(bytes(la.k), bytes(lb.k), la.k_type, k_tolerance):
                    return False
    return True


def _max_diff(x: np.ndarray, y: np.ndarray) -> float:
    """Largest |x - y|; NaN where exactly one side is NaN (equal NaNs count as equal)."""
    both = np.isnan(x) & np.isnan(y)
    d = np.abs(np.where(both, 0.0, x) - np.where(both, 0.0, y))
    return float(np.max(d)) if d.size else 0.0


@dataclass
class EditCheck:
    """Outcome of :func:`check_session_edit`."""

    ops: List[Any]
    path: str = ""                      # "model" / "structure"
    llama_ok: bool = True               # llama.cpp accepted every operation
    refused: str = ""                   # pymem's EditError message, if it refused
    state_equal: bool = False           # pymem's edit == llama.cpp's state after ops + update
    loaded: bool = False                # llama_state_load_file accepted pymem's file
    tokens_ok: bool = False
    logits_equal: bool = False
    logits_max_diff: float = 0.0
    next_state_equal: bool = False
    #: logits of the same continuation in the reference context itself (not saved and
    #: reloaded, so its cells may sit elsewhere: equal up to float summation order)
    direct_logits_max_diff: float = 0.0
    session_bytes: int = 0
    edited_bytes: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if not self.llama_ok:
            return bool(self.refused)              # both refused
        return (not self.refused and self.state_equal and self.loaded and self.tokens_ok
                and self.logits_equal and self.next_state_equal)


def check_session_edit(worker: Any, model_path: str, ctx_kwargs: Dict[str, Any], setup: Callable[[Any], Any],
                       ops: Sequence[Any], tokens: Sequence[int], n_next: int = 3, next_seq: int = 0,
                       scratch_seq: Optional[int] = None, structure: bool = False, k_tolerance: float = 0.0,
                       logit_tolerance: float = 0.0, tmpdir: Optional[str] = None) -> EditCheck:
    """The proof of one session edit: llama.cpp builds a context (``setup(ctx)``) and saves a
    session with ``tokens``; pymem edits the file (model path, or the structure path with
    ``structure``); llama.cpp loads the edit and decodes ``n_next`` tokens of ``next_seq``.
    The reference: the same context applies the operations itself, then its update (see
    :func:`llama_update`), is saved, loaded into a fresh context and continued the same way.  Compared: the edited
    state with the reference state (bytes; K within ``k_tolerance`` after shifts of
    quantized caches), the continuation's logits and the state after it."""
    from .. import state

    n_seq_max = int(ctx_kwargs.get("n_seq_max", 1))
    scratch = n_seq_max - 1 if scratch_seq is None else scratch_seq
    res = EditCheck([state.Op.coerce(o) for o in ops])
    own_tmp = None
    if tmpdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="pymem-verify-")
        tmpdir = own_tmp.name
    f0 = os.path.join(tmpdir, "original.session")
    f1 = os.path.join(tmpdir, "edited.session")
    ctxs = []

    def ctx() -> Any:
        c = worker.context(model_path, **ctx_kwargs)
        ctxs.append(c)
        return c

    try:
        a = ctx()
        setup(a)
        if not a.state_save_file(f0, list(tokens)):
            raise RuntimeError("llama_state_save_file failed")
        res.session_bytes = os.path.getsize(f0)
        sess = state.Session.load(f0, model=model_path)
        try:
            edited = sess.edit(res.ops, model=None if structure else model_path)
            res.path = edited.edit_path or ""
        except state.EditError as exc:
            res.refused = str(exc)
            edited = None
        res.llama_ok = llama_ops(a, res.ops, n_seq_max)
        if not res.llama_ok or edited is None:
            return res
        edited.save(f1)
        res.edited_bytes = os.path.getsize(f1)
        llama_update(a, scratch)
        ref = a.state_get()
        res.state_equal = states_close(edited.context_blob(), ref, k_tolerance)
        want_tokens = list(edited.tokens)
        b = ctx()
        ok, toks = b.state_load_file(f1)
        res.loaded = bool(ok)
        res.tokens_ok = toks == want_tokens
        c = ctx()
        if c.state_set(ref) != len(ref):
            raise RuntimeError("llama.cpp rejected its own reference state")
        p0 = c.pos_max(next_seq) + 1
        batch = [((7 * i + 3) % 64, p0 + i, [next_seq]) for i in range(n_next)]
        rb, rc_, ra = b.decode(batch), c.decode(batch), a.decode(batch)
        if rb != 0 or rc_ != 0 or ra != 0:
            res.notes.append(f"continuation decode returned {rb} / {rc_} / {ra}")
            return res
        la, lc = b.logits(-1), c.logits(-1)
        res.logits_max_diff = _max_diff(la, lc)
        res.direct_logits_max_diff = _max_diff(la, a.logits(-1))
        res.logits_equal = res.logits_max_diff <= logit_tolerance
        res.next_state_equal = states_close(b.state_get(), c.state_get(), k_tolerance)
        return res
    finally:
        for c in ctxs:
            try:
                c.close()
            except Exception:
                pass
        if own_tmp is not None:
            own_tmp.cleanup()
