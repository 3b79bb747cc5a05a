"""Offline edits: the operations (:class:`Op`, :func:`parse_op`, :func:`apply_ops`) and the pymem memory
they run in (built from a model, or from the state's own geometry)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _errors as E
from .. import _kinds as kinds
from .._errors import StateError
from .sections import KVSection
from .envelopes import EditError, _MAX_SEQ
from .layout import Layout, _hparams, _tname
from .memstate import MemoryState


def _seq_scope_ops(ops: List["Op"], s: int, what: str) -> Tuple[List["Op"], int]:
    """Map the operations on a one-sequence state to the sequence it holds."""
    out = []
    cur = s
    for op in ops:
        a = list(op.args)
        if op.name == "truncate":
            out.append(Op("seq_rm", (cur, a[0], -1)))
            continue
        if op.name in ("seq_rm", "seq_keep", "seq_add", "seq_div"):
            if a[0] == -1 and op.name == "seq_rm":
                a[0] = cur
            if a[0] != cur:
                raise EditError(f"{op}: this {what} holds sequence {cur} only")
            out.append(Op(op.name, tuple(a)))
        elif op.name == "seq_mv":
            if a[0] != cur:
                raise EditError(f"{op}: this {what} holds sequence {cur} only")
            out.append(Op("seq_mv", tuple(a)))
            cur = a[1]
        else:
            raise EditError(f"{op}: a {what} holds one sequence; {op.name} needs a whole state "
                            "(a session file or a context blob)")
    return out, cur


def _convert_format(st: MemoryState, fmt: int) -> MemoryState:
    if fmt == st.format:
        return st
    new = []
    for sp, s in zip(st.specs, st.sections):
        if sp.kind == "kv":
            if fmt == 10 and any(x.k_rot or x.v_rot for x in s.streams if x.cells):
                raise EditError("a cache with a Hadamard rotation (k_rot/v_rot) has no format-10 form")
            s = KVSection(s.streams, fmt, s.cell_ext, 0)
            s.nbytes = s.measure()
        new.append(s)
    offs = []
    o = 0
    for s in new:
        offs.append(o)
        o += s.nbytes
    return MemoryState(replace(st.layout, format=fmt), new, offs, fmt, st.scope, st.seq_id, st.flags)


# ---------------------------------------------------------------------------------------------
# memories for states
# ---------------------------------------------------------------------------------------------
def _pad(x: int, n: int = 256) -> int:
    return (x + n - 1) // n * n


def memory_params(state: MemoryState, extra_ids: Sequence[int] = ()) -> Dict[str, Any]:
    """The :func:`pymem.from_gguf` arguments implied by a state: ``unified`` (one stream),
    ``n_seq_max`` (the stream count when not unified, else the highest sequence id + 1,
    also covering ``extra_ids``), ``flash_attn`` (= not v_trans), ``type_k`` / ``type_v``,
    ``n_ctx`` (the smallest multiple of 256 cells per stream holding the state) and
    ``format``.

    Not in the bytes, so fixed: ``swa_full=True`` (an SWA cache as large as the base, which
    holds any state; llama.cpp's own context may have had a smaller one, where it cannot
    shift), ``n_rs_seq=0`` (rollback snapshots are not saved), ``n_ubatch`` 512, the
    original context size (only the cells in use are known) and, in a unified cache, the
    original ``n_seq_max`` (only the ids in use are known).  Cell placement and the search
    head are not saved either: a whole restore packs the cells at 0..n-1 in blob order, as
    llama.cpp's does.  K/V types of a cache without cells default to f16 (they do not
    matter until cells exist)."""
    g = state.geometry()
    n_stream = max([k["n_stream"] for k in g["kv"]] or [1])
    ids = list(state.seq_ids()) + [i for i in extra_ids if i is not None and i >= 0]
    if state.scope == "seq" and state.seq_id is not None:
        ids.append(state.seq_id)
    unified = n_stream == 1
    n_seq_max = n_stream if not unified else max(ids + [0]) + 1
    if n_seq_max > _MAX_SEQ:
        raise EditError(f"sequence id {max(ids)} is beyond llama.cpp's limit of {_MAX_SEQ} sequences")
    v_trans = next((k["v_trans"] for k in g["kv"] if k["v_trans"] is not None), True)
    tk = next((k["type_k"] for k in g["kv"] if k["type_k"] is not None), 1)
    tv = next((k["type_v"] for k in g["kv"] if k["type_v"] is not None), 1)
    cells = max(1, state.max_cells())
    size = _pad(cells)
    return {"n_ctx": size * (1 if unified else n_seq_max), "n_seq_max": n_seq_max, "unified": unified,
            "flash_attn": not v_trans, "type_k": tk, "type_v": tv if tv is not None else tk,
            "format": state.format, "swa_full": True, "n_rs_seq": 0}


def _build_memory(state: MemoryState, model: Any, arch: Optional[str], extra_ids: Sequence[int] = (),
                  n_seq_max: Optional[int] = None) -> Any:
    p = memory_params(state, extra_ids)
    if n_seq_max is not None:
        if not p["unified"] and n_seq_max != p["n_seq_max"]:
            raise E.InvalidArgumentError(f"a state with {p['n_seq_max']} streams needs n_seq_max {p['n_seq_max']}")
        p["n_seq_max"] = max(p["n_seq_max"], int(n_seq_max))
    if model is None:
        return _geometry_memory(state, p, arch)
    from ..plan import build_memory, memory_spec
    from ..params import type_name

    hp = _hparams(model)
    if arch is not None and hp.arch != arch:
        raise StateError(f"the state was saved by a '{arch}' model, the model is '{hp.arch}' "
                         "(llama.cpp: wrong model arch)")
    try:
        spec = memory_spec(hp, p["n_ctx"], n_seq_max=p["n_seq_max"], type_k=type_name(p["type_k"]),
                           type_v=type_name(p["type_v"]), flash_attn=p["flash_attn"], unified=p["unified"],
                           swa_full=True, n_rs_seq=0, format=p["format"])
    except E.Error as exc:
        raise StateError(f"no memory of this model can hold the state: {exc}") from None
    want = Layout.from_spec(spec, partial=state.layout.partial)
    if tuple(s.kind for s in want.sections) != state.layout.pattern or any(
            a.kind == "rec" and a.n_recurrent != b.n_recurrent for a, b in zip(want.sections, state.layout.sections)):
        raise StateError(f"the state's sections ({state.layout.describe()}) do not match the model's memory "
                         f"({want.describe()})")
    return build_memory(spec)


#: bytes a memory built from claims that no data backs may take (see _check_backed)
_UNBACKED_MAX = 64 << 20


def _check_backed(state: MemoryState, n_seq_max: int) -> None:
    """A recurrent section without cells still lists each layer's row sizes, but no row
    follows them: nothing in the input backs those numbers.  Refuse to allocate more than
    :data:`_UNBACKED_MAX` bytes on their word (a 36-byte file must not cost gigabytes)."""
    for sp, sec in zip(state.specs, state.sections):
        if sp.kind != "rec" or sec.cells:
            continue
        per_cell = sum(L.r_row + L.s_row + (L.p_row or 0) for L in sec.layers)
        need = per_cell * max(1, n_seq_max)
        if need > _UNBACKED_MAX:
            raise EditError(f"the recurrent section holds no cells, so its row sizes ({per_cell} bytes per cell) "
                            f"are not backed by any data; a memory of that shape would take {need} bytes "
                            f"(over {_UNBACKED_MAX >> 20} MiB): give the model (--model) to edit this state")


def _geometry_memory(state: MemoryState, p: Dict[str, Any], arch: Optional[str]) -> Any:
    """A memory shaped like the state (no model): layer widths and types from the rows, no
    RoPE (it cannot shift), no sliding window.  KV layers get model ids 0, 1, ... in section
    order; the recurrent layers the last ids of the model layer count the REC section
    records."""
    _check_backed(state, p["n_seq_max"])
    g = state.geometry()
    rec = g["rec"]
    kvs = g["kv"]
    n_kv = [len(k["layers"]) if k["layers"] is not None else 0 for k in kvs]
    n_r = rec["n_recurrent"] if rec else 0
    n_model = max(1, sum(n_kv) + n_r)
    if rec is not None:
        if rec["n_layer_model"] < sum(n_kv) + n_r:
            raise EditError(f"the recurrent section records {rec['n_layer_model']} model layers, fewer than the "
                            f"{sum(n_kv) + n_r} layers the state holds")
        n_model = rec["n_layer_model"]
    n_seq_max = p["n_seq_max"]
    size = p["n_ctx"] // (1 if p["unified"] else n_seq_max)
    ext = any(sp.cell_ext for sp, _ in state.kv_sections())
    kv_args = []
    first = 0
    for k, n in zip(kvs, n_kv):
        layers = list(range(first, first + n))
        first += n
        hk = [32] * n_model
        hv = [32] * n_model
        for l, (kt, kw, vt, vw) in enumerate(k["layers"] or []):
            if kw is None or (vt is not None and vw is None):
                raise EditError(f"pymem has no cache type {_tname(kt)}/{_tname(vt)}: this state can only be inspected")
            hk[layers[l]] = kw
            hv[layers[l]] = vw if vw else kw
        kv_args.append(dict(
            n_layer=n_model, layers=layers, n_head_kv=1, n_embd_head_k=hk, n_embd_head_v=hv, size=size,
            n_seq_max=n_seq_max, type_k=k["type_k"] if k["type_k"] is not None else p["type_k"],
            type_v=k["type_v"] if k["type_v"] is not None else p["type_v"],
            v_trans=bool(k["v_trans"]) if k["v_trans"] is not None else not p["flash_attn"],
            unified=p["unified"], rope=None, arch=arch, format=state.format, k_rot=k["k_rot"] or 0,
            v_rot=k["v_rot"] or 0, cell_ext=ext, can_shift=False))
    rec_args = None
    if rec is not None:
        layers = list(range(n_model - n_r, n_model))
        rr, ss, pp = [0] * n_model, [0] * n_model, [0] * n_model
        tr = ts = 0
        for l, (rt, rw, st_, sw, pw) in enumerate(rec["layers"]):
            if rw is None or sw is None or pw is None:
                raise EditError(f"pymem has no state type {_tname(rt)}/{_tname(st_)}: this state can only be inspected")
            rr[layers[l]], ss[layers[l]], pp[layers[l]] = rw, sw, pw
            tr, ts = rt, st_
        rec_args = dict(n_layer=n_model, layers=layers, n_embd_r=rr, n_embd_s=ss, n_embd_p=pp,
                        size=max(1, n_seq_max), n_seq_max=n_seq_max, type_r=tr, type_s=ts, n_rs_seq=0, arch=arch)
    kind = kinds.by_pattern(state.layout.pattern)
    if kind is not None:
        parts = dict(zip(kind.kv_parts, kv_args))
        if rec_args is not None:
            parts["recurrent"] = rec_args
        try:
            return kind.cls._from_parts(parts)
        except E.Error as exc:
            raise EditError(f"cannot build a memory shaped like this state: {exc}") from None
    raise EditError(f"no memory has the layout {state.layout.describe()}")


def _state_read(mem: Any, state: MemoryState, seq_id: int, flags: int, what: str) -> None:
    """Restore the sections into ``mem`` as llama.cpp would (whole: packed at 0..n-1)."""
    sec = state.dump()
    try:
        mem.state_read(sec, seq_id=seq_id, flags=flags)
    except (E.StateError, E.NoSlotError, E.InvalidArgumentError, E.UnsupportedError) as exc:
        raise StateError(f"{what}: the memory rejects the state: {exc}") from None


# ---------------------------------------------------------------------------------------------
# operations
# ---------------------------------------------------------------------------------------------
_OP_ARITY = {"seq_rm": (1, 3), "seq_cp": (2, 4), "seq_keep": (1, 1), "seq_mv": (2, 2), "truncate": (1, 1),
             "seq_add": (4, 4), "seq_div": (4, 4)}


@dataclass(frozen=True)
class Op:
    """One edit: ``seq_rm (s[, p0, p1])``, ``seq_cp (src, dst[, p0, p1])``, ``seq_keep (s)``,
    ``seq_mv (src, dst)`` (= seq_cp(src, dst) + seq_rm(src)), ``truncate (n)`` (drop
    positions >= n of every sequence, and a session's tokens beyond n), ``seq_add (s, p0,
    p1, delta)``, ``seq_div (s, p0, p1, d)``.  Positions are llama.cpp's half-open
    ``[p0, p1)``; -1 means open."""

    name: str
    args: Tuple[int, ...]

    @classmethod
    def coerce(cls, x: Any) -> "Op":
        if isinstance(x, Op):
            op = x
        else:
            t = tuple(x)
            if not t:
                raise E.InvalidArgumentError("empty operation")
            op = cls(str(t[0]).replace("-", "_"), tuple(int(v) for v in t[1:]))
        lo_hi = _OP_ARITY.get(op.name)
        if lo_hi is None:
            raise E.InvalidArgumentError(f"unknown operation {op.name!r} (one of {', '.join(_OP_ARITY)})")
        lo, hi = lo_hi
        if not lo <= len(op.args) <= hi or (op.name in ("seq_rm", "seq_cp") and len(op.args) == lo + 1):
            raise E.InvalidArgumentError(f"{op.name} takes {lo}{'' if lo == hi else f' or {hi}'} arguments, "
                                         f"got {len(op.args)}")
        if op.name in ("seq_rm", "seq_cp") and len(op.args) == lo:
            op = cls(op.name, op.args + (-1, -1))
        return op

    def seq_args(self) -> List[int]:
        if self.name in ("seq_cp", "seq_mv"):
            return [self.args[0], self.args[1]]
        if self.name == "truncate":
            return []
        return [self.args[0]]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(str, self.args))})"


def parse_op(name: str, value: str) -> Op:
    """An :class:`Op` from the CLI spelling: ``seq-rm S[:P0:P1]``, ``seq-cp SRC:DST[:P0:P1]``,
    ``seq-keep S``, ``seq-mv SRC:DST``, ``truncate N``, ``seq-add S:P0:P1:D``,
    ``seq-div S:P0:P1:D`` (an empty P1 means -1)."""
    n = name.replace("-", "_")
    parts = value.split(":")
    vals = []
    for i, x in enumerate(parts):
        x = x.strip()
        if x == "" and i > 0:
            vals.append(-1)
            continue
        try:
            vals.append(int(x))
        except ValueError:
            raise E.InvalidArgumentError(f"--{name.replace('_', '-')} {value}: {x!r} is not an integer") from None
    try:
        return Op.coerce((n, *vals))
    except E.InvalidArgumentError as exc:
        form = {"seq_rm": "S[:P0:P1]", "seq_cp": "SRC:DST[:P0:P1]", "seq_keep": "S", "seq_mv": "SRC:DST",
                "truncate": "N", "seq_add": "S:P0:P1:DELTA", "seq_div": "S:P0:P1:D"}.get(n, "")
        raise E.InvalidArgumentError(f"--{name.replace('_', '-')} {value}: expected {form} ({exc})") from None


def apply_ops(mem: Any, ops: Sequence[Any], structure_only: bool = False) -> List[str]:
    """Apply operations to a pymem memory as llama.cpp would, then its pending update
    (K-shift, stream copies).  Raises :class:`EditError` where llama.cpp refuses (seq_rm
    returning false) or would abort (bad ids, a partial cross-stream seq_cp).  Returns notes."""
    notes: List[str] = []
    has_kv = bool(mem.kv_parts())
    n_seq = _n_seq_max(mem)
    for raw in ops:
        op = Op.coerce(raw)
        a = op.args
        for s in op.seq_args():
            if s < -1 or s >= _MAX_SEQ or (s == -1 and op.name != "seq_rm"):
                raise EditError(f"{op}: sequence id {s} is not valid")
            if s >= n_seq:
                raise EditError(f"{op}: sequence id {s} >= n_seq_max {n_seq} of this memory")
        try:
            if op.name == "seq_rm":
                if not mem.seq_rm(a[0], a[1], a[2]):
                    raise EditError(_refusal(mem, op))
            elif op.name == "truncate":
                if mem.kind in ("kv", "iswa"):
                    mem.seq_rm(-1, a[0], -1)
                else:
                    for s in range(n_seq):
                        if mem.seq_pos_max(s) >= 0 and not mem.seq_rm(s, a[0], -1):
                            raise EditError(f"{op}: {_refusal(mem, Op('seq_rm', (s, a[0], -1)))}")
            elif op.name == "seq_cp":
                mem.seq_cp(*a)
            elif op.name == "seq_keep":
                mem.seq_keep(a[0])
            elif op.name == "seq_mv":
                if a[0] != a[1]:
                    mem.seq_cp(a[0], a[1], -1, -1)
                    if not mem.seq_rm(a[0], -1, -1):
                        raise EditError(_refusal(mem, op))  # pragma: no cover (a full removal always works)
            elif op.name in ("seq_add", "seq_div"):
                if structure_only and has_kv:
                    raise EditError(f"{op} needs the model (--model): the K rotation of a shift needs its RoPE "
                                    "parameters")
                if op.name == "seq_div" and a[3] <= 0:
                    raise EditError(f"{op}: the divisor must be >= 1")
                getattr(mem, op.name)(*a)
        except EditError:
            raise
        except E.UnsupportedError as exc:
            raise EditError(f"{op}: llama.cpp cannot do this: {exc}") from None
        except (E.InvalidArgumentError, E.InvalidStateError) as exc:
            raise EditError(f"{op}: {exc}") from None
    try:
        if mem.update():
            notes.append("pending updates applied (K-shift / stream copies), as before llama.cpp's next decode")
    except E.ShiftError as exc:
        raise EditError(f"the K-shift cannot be applied: {exc}") from None
    return notes


def _n_seq_max(mem: Any) -> int:
    n = getattr(mem, "n_seq_max", None)
    if n is None:
        parts = mem.kv_parts()
        n = parts[0].n_seq_max if parts else mem.recurrent.n_seq_max
    return int(n)


def _refusal(mem: Any, op: Op) -> str:
    if mem.kind in ("recurrent", "hybrid", "hybrid_iswa"):
        return (f"{op} refused: a recurrent state cannot lose part of a sequence (only whole sequences, or "
                "ranges not touching the last position), as llama_memory_seq_rm returns false")
    return f"{op} refused (llama_memory_seq_rm returns false)"
