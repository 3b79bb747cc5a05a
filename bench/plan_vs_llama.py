"""The memory planner next to real llama.cpp: every built-in shape (pymem.shapes) x the
planner settings, pymem's figures and llama.cpp's context-creation log side by side (llama.cpp
builds each model from metadata alone and allocates nothing).  Prints a Markdown table.

    python bench/plan_vs_llama.py [SHAPE ...]
"""
import os
import sys
import tempfile

from pymem import shapes
from pymem._oracle import OracleWorker

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from plancheck import PLAN_SETTINGS, check_plan, mib  # noqa: E402  (tests/plancheck.py)


def settings_label(st: dict) -> str:
    return (f"{st['n_ctx']}x{st['n_seq_max']} {st['type_k']}/{st['type_v']} "
            f"fa={'on' if st['flash_attn'] else 'off'} {'uni' if st['unified'] else 'streams'}"
            f"{' swa_full' if st['swa_full'] else ''}"
            + (f" ub={st['n_ubatch']}" if 'n_ubatch' in st else "")
            + (f" rs_seq={st['n_rs_seq']}" if st.get('n_rs_seq') else ""))


def main() -> int:
    names = sys.argv[1:] or shapes.names()
    n_ok = n_all = 0
    print("| shape | settings | part | cells | pymem MiB (K+V / R+S) | llama.cpp MiB | match |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d, OracleWorker(timeout=300) as w:
        for name in names:
            path = shapes.path(name, d)
            for st in PLAN_SETTINGS:
                _, rows = check_plan(w, path, **st)
                for r in rows:
                    mine = f"{mib(r.nbytes[0])} + {mib(r.nbytes[1])}"
                    theirs = "-" if r.llama is None else f"{r.llama['mib'][0]} + {r.llama['mib'][1]}"
                    print(f"| {name} | {settings_label(st)} | {r.part} | {r.cells} | {mine} | {theirs} | "
                          f"{'yes' if r.ok else 'NO'} |")
                    n_ok += r.ok
                    n_all += 1
    print(f"\n{n_ok}/{n_all} memory parts match ({len(names)} shapes x {len(PLAN_SETTINGS)} settings)")
    return 0 if n_ok == n_all else 1


if __name__ == "__main__":
    sys.exit(main())
