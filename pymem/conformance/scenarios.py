"""The scenarios the conformance vectors are recorded from: one per memory type and
configuration. A scenario's steps are abstract (positions come from the recording build:
``"next"`` = the sequence's pos_max + 1); the recorded vector holds the concrete ones."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple


@dataclass
class Scenario:
    name: str
    memory: str
    model: str
    ctx: Dict[str, Any]
    steps: List[Tuple[Any, ...]] = field(default_factory=list)


def _steps(shift: bool = True, rollback: bool = False) -> List[Tuple[Any, ...]]:
    s: List[Tuple[Any, ...]] = [
        ("decode", 0, 20, 0),            # (decode, seq, n tokens, first token)
        ("seq_cp", 0, 1, -1, -1),
        ("decode", 1, 6, 40),
        ("decode", 2, 5, 70),
        ("seq_rm", 0, 4, 8),             # a middle range: recurrent parts refuse
    ]
    if rollback:
        s.append(("seq_rm", 0, 18, -1))  # a suffix within the rollback snapshots
    if shift:
        s += [("seq_add", 1, 8, -1, -4), ("decode", 1, 3, 90)]   # a context shift, then K re-rotated
    s += [("seq_div", 2, 2, -1, 2)] if shift else []
    s += [("restore_seq", 1, 3), ("decode", 3, 2, 100), ("seq_keep", 3), ("decode", 3, 2, 110)]
    return s


def _ctx(**kw: Any) -> Dict[str, Any]:
    d = dict(n_ctx=256, n_seq_max=4, kv_unified=True, flash_attn=False, swa_full=True, type_k="f16", type_v="f16")
    d.update(kw)
    return d


SCENARIOS: List[Scenario] = [
    Scenario("kv_unified_vtrans", "kv", "llama", _ctx(), _steps()),
    Scenario("kv_streams_fa", "kv", "llama", _ctx(kv_unified=False, flash_attn=True), _steps()),
    Scenario("kv_q8_0_hd64_fa", "kv", "llama_hd64", _ctx(flash_attn=True, type_k="q8_0", type_v="q8_0"), _steps()),
    Scenario("kv_neox_ubatch3", "kv", "llama_neox", _ctx(n_ubatch=3), _steps()),
    Scenario("iswa_swa_full", "iswa", "gemma2", _ctx(swa_full=True), _steps()),
    Scenario("iswa_swa_small_streams_fa", "iswa", "gemma3", _ctx(swa_full=False, kv_unified=False, flash_attn=True),
             _steps()),
    Scenario("recurrent_mamba", "recurrent", "mamba", _ctx(), _steps()),
    Scenario("recurrent_rwkv6_streams", "recurrent", "rwkv6", _ctx(kv_unified=False), _steps()),
    Scenario("hybrid_jamba", "hybrid", "jamba", _ctx(), _steps()),
    Scenario("hybrid_lfm2_rollback", "hybrid", "lfm2", _ctx(n_rs_seq=2, flash_attn=True), _steps(rollback=True)),
    Scenario("hybrid_lfm2_streams_fa", "hybrid", "lfm2", _ctx(kv_unified=False, flash_attn=True), _steps()),
    # 0c1e570 aborts on a K-shift here (its base KV cache has no layers): no shift steps
    Scenario("hybrid_iswa_lfm2_swa", "hybrid_iswa", "lfm2_swa", _ctx(flash_attn=True), _steps(shift=False)),
]
