"""What the bridge recovers about a live context: :class:`ContextParams` (the parameters that
shape its memory, and where each came from), the cached GGUF hyper-parameters and the
cheapest state blob that shows the cache types."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import _Live


@dataclass
class ContextParams:
    """The parameters of a llama.cpp context that shape its memory, and where each came from.

    ``sources`` maps every parameter to one of: ``"getter"`` (a llama.cpp C getter),
    ``"state"`` (read from a state blob), ``"can_shift"`` (deduced from
    ``llama_memory_can_shift``), ``"n_ctx_seq"`` (deduced from ``llama_n_ctx_seq``),
    ``"argument"`` (given by the caller), ``"created"`` (recorded by the object that created the
    context), ``"default"`` (assumed), ``"n/a"`` (no influence on this model's memory)."""

    model_path: str
    arch: str
    kind: str                  # memory kind: kv | iswa | recurrent | hybrid | hybrid_iswa
    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    n_rs_seq: int
    kv_unified: bool
    flash_attn: bool
    swa_full: bool
    type_k: str
    type_v: str
    sources: Dict[str, str] = field(default_factory=dict)
    hparams: Any = field(default=None, repr=False, compare=False)

    @property
    def assumed(self) -> List[str]:
        """Parameters that matter for this memory but could not be recovered (defaults)."""
        return [k for k, v in self.sources.items() if v == "default"]

    def spec(self, format: Optional[int] = None) -> Any:
        """The :class:`pymem.plan.MemorySpec` of this context's memory (``format`` default: the
        wheel's, ``pymem.llama.bridge.WHEEL_FORMAT``)."""
        from ..plan import memory_spec
        from .bridge import WHEEL_FORMAT

        format = WHEEL_FORMAT if format is None else format

        hp = self.hparams if self.hparams is not None else _hparams(self.model_path)
        return memory_spec(hp, self.n_ctx, n_seq_max=self.n_seq_max, type_k=self.type_k,
                           type_v=self.type_v, flash_attn=self.flash_attn, unified=self.kv_unified,
                           swa_full=self.swa_full, n_ubatch=self.n_ubatch, n_rs_seq=self.n_rs_seq,
                           format=format, n_batch=self.n_batch)

    def describe(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r} ({v})" for k, v in self.sources.items())


_Probe = Tuple[Any, int, int]  # (blob, seq id or -1, flags)


_HP_CACHE: Dict[Tuple[str, int, int], Any] = {}


def _hparams(path: str) -> Any:
    """read_hparams, cached per file version (a large vocabulary makes reading a GGUF slow)."""
    from ..gguf import read_hparams

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    hp = _HP_CACHE.get(key)
    if hp is None:
        hp = read_hparams(path)
        if len(_HP_CACHE) >= 16:
            _HP_CACHE.clear()
        _HP_CACHE[key] = hp
    return hp


def _probe_blob(live: "_Live", n_seq_max: int) -> _Probe:
    """The cheapest blob that shows the cache types: the shortest non-empty sequence, else the
    (small) whole state of an empty memory."""
    best = None
    for s in range(n_seq_max):
        lo, hi = live.pos_range(s)
        if hi >= 0:
            n = hi - max(lo, 0)
            if best is None or n < best[0]:
                best = (n, s)
    if best is None:
        return live.state_get(), -1, 0
    return live.seq_get(best[1], 0), best[1], 0
