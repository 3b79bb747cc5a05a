"""The planner against real llama.cpp: ``pymem.estimate`` next to the sizes llama.cpp logs when it
creates a context (used by tests/test_planner.py and bench/plan_vs_llama.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["memory_log", "mib", "PlanRow", "check_plan", "PLAN_SETTINGS"]


# ---------------------------------------------------------------------------------------------
# the planner against llama.cpp's context-creation log
# ---------------------------------------------------------------------------------------------
_KV_LOG = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                     r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_RS_LOG = re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+) seqs +"
                     r"(\d+) rs_seq\), R \((\w+)\): +([\d.]+) MiB, S \((\w+)\): +([\d.]+) MiB")

#: settings the planner is checked with at full-size shapes (``pymem.shapes``)
PLAN_SETTINGS: List[Dict[str, Any]] = [
    dict(n_ctx=131072, n_seq_max=4, type_k="q8_0", type_v="q8_0", flash_attn=True, unified=True, swa_full=False),
    dict(n_ctx=32768, n_seq_max=4, type_k="f16", type_v="f16", flash_attn=False, unified=False, swa_full=True),
    dict(n_ctx=8192, n_seq_max=1, type_k="q4_0", type_v="q4_0", flash_attn=True, unified=True, swa_full=True),
    dict(n_ctx=65536, n_seq_max=2, type_k="f32", type_v="f16", flash_attn=False, unified=True, swa_full=False,
         n_ubatch=256, n_rs_seq=2),
    dict(n_ctx=100000, n_seq_max=3, type_k="q5_1", type_v="iq4_nl", flash_attn=True, unified=False,
         swa_full=False),
]


def mib(nbytes: int) -> str:
    """llama.cpp's ``%.2f`` of ``(float)bytes / (1024.0f * 1024.0f)``."""
    import numpy as np

    return "%.2f" % float(np.float32(nbytes) / np.float32(1024.0 * 1024.0))


def memory_log(log: str) -> List[Dict[str, Any]]:
    """The memory parts a llama.cpp context-creation log announces, in log order:
    ``kind`` ("kv" or "recurrent"), ``cells``, ``layers``, ``types`` (K, V / R, S), ``mib``
    (the two sizes as printed) and ``total_mib``."""
    out: List[Tuple[int, Dict[str, Any]]] = []
    for m in _KV_LOG.finditer(log):
        tot, cells, layers, _, _, tk, km, tv, vm = m.groups()
        out.append((m.start(), dict(kind="kv", cells=int(cells), layers=int(layers), types=(tk, tv),
                                    mib=(km, vm), total_mib=tot)))
    for m in _RS_LOG.finditer(log):
        tot, cells, layers, _, _, tr, rm, ts, sm = m.groups()
        out.append((m.start(), dict(kind="recurrent", cells=int(cells), layers=int(layers), types=(tr, ts),
                                    mib=(rm, sm), total_mib=tot)))
    return [d for _, d in sorted(out, key=lambda x: x[0])]


@dataclass
class PlanRow:
    """One memory part: pymem's plan (exact bytes) next to what llama.cpp logged."""

    part: str
    kind: str
    cells: int
    nbytes: Tuple[int, int]          # pymem: K, V (or R, S) bytes
    llama: Optional[Dict[str, Any]]  # memory_log entry (None: llama.cpp logged no such part)

    @property
    def ok(self) -> bool:
        ll = self.llama
        return ll is not None and ll["cells"] == self.cells and \
            ll["mib"] == (mib(self.nbytes[0]), mib(self.nbytes[1])) and ll["total_mib"] == mib(sum(self.nbytes))


def check_plan(worker: Any, path: str, **settings: Any) -> Tuple[Any, List[PlanRow]]:
    """Create a context for the GGUF at ``path`` in llama.cpp (built from its metadata alone:
    nothing is allocated) and compare ``pymem.estimate`` with the sizes llama.cpp logs.
    Returns ``(estimate, rows)``; a part llama.cpp did not log, or logged in excess, makes a
    row that is not ``ok``."""
    import pymem

    est = pymem.estimate(path, **settings)
    m = worker.model(path, metadata_only=True)
    params = dict(n_ctx=settings["n_ctx"], n_seq_max=settings.get("n_seq_max", 1),
                  kv_unified=settings.get("unified", True), flash_attn=settings.get("flash_attn", False),
                  swa_full=settings.get("swa_full", True), type_k=settings.get("type_k", "f16"),
                  type_v=settings.get("type_v", "f16"), n_rs_seq=settings.get("n_rs_seq", 0),
                  n_ubatch=settings.get("n_ubatch", 512))
    with worker.context(m, **params) as c:
        logged = memory_log(c.creation_log())
    rows: List[PlanRow] = []
    by_kind: Dict[str, List[Dict[str, Any]]] = {"kv": [], "recurrent": []}
    for d in logged:
        by_kind[d["kind"]].append(d)
    for spec_part, (name, cells, a, b) in zip(est.spec.parts, est.parts):
        queue = by_kind[spec_part.kind]
        rows.append(PlanRow(name, spec_part.kind, cells, (a, b), queue.pop(0) if queue else None))
    for kind, rest in by_kind.items():  # parts llama.cpp has and pymem does not plan
        rows += [PlanRow("(llama.cpp only)", kind, 0, (0, 0), d) for d in rest]
    return est, rows
