"""Does a parsed state fit a model?  The section layout of a model says which sections follow;
this checks what the layout cannot: every KV layer's K and V widths and every recurrent
layer's r and s widths against the model's (``n_head_kv * n_embd_head_k``, ``n_embd_r``, ...),
so that a state of another model of the same architecture (other dimensions) is caught when
it is read with ``model=``, not only when an edit loads it into a memory."""
from __future__ import annotations

from typing import Any, Optional

from .._errors import StateError
from .layout import _tname, _width
from .memstate import MemoryState

__all__ = ["check_model"]


def _mismatch(what: str, where: str, got: int, want: int, t: Optional[int]) -> StateError:
    return StateError(f"{what}: {where} is {got} wide ({_tname(t)}) in the state, the model's is {want}: "
                      "a state of another model with the same architecture (llama.cpp refuses it: "
                      "mismatched row sizes)")


def check_model(state: MemoryState, hp: Any, what: str) -> None:
    """Raise :class:`pymem.StateError` naming the first layer whose row width differs from
    the model's.  Widths that the bytes do not give (no cells, unknown types) are skipped."""
    for sp, sec in zip(state.specs, state.sections):
        label = sp.name or sp.kind
        if sp.kind == "kv":
            if sp.layers is None:
                continue
            for si, st in enumerate(sec.streams):
                if not st.cells:
                    continue
                for l, L in enumerate(st.layers[:len(sp.layers)]):
                    il = sp.layers[l]
                    wk = _width(L.k_type, L.k_row)
                    if wk is not None and wk != hp.n_embd_k_gqa(il):
                        raise _mismatch(what, f"{label} section stream {si} layer {il} K", wk, hp.n_embd_k_gqa(il),
                                        L.k_type)
                    if L.v_type is None:
                        continue
                    wv = L.v_embd if st.v_trans else _width(L.v_type, L.v_row)
                    if wv is not None and wv != hp.n_embd_v_gqa(il):
                        raise _mismatch(what, f"{label} section stream {si} layer {il} V", wv, hp.n_embd_v_gqa(il),
                                        L.v_type)
        else:
            if not sec.cells:
                continue
            ids = sp.layers or tuple(range(len(sec.layers)))
            for l, L in enumerate(sec.layers):
                il = ids[l] if l < len(ids) else l
                for name, t, row, want in (("r", L.r_type, L.r_row, hp.n_embd_r), ("s", L.s_type, L.s_row, hp.n_embd_s)):
                    w = _width(t, row) if row else None
                    if w is not None and w != want:
                        raise _mismatch(what, f"recurrent layer {il} {name}", w, want, t)
