"""``pymem estimate --budget``: the largest context a memory budget holds, capped at the
model's training context (llama.cpp warns past it and the model was not trained for it), and
plain words for memories that do not grow with the context (recurrent-only models)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict


def grows_with_context(hp: Any, kw: Dict[str, Any]) -> bool:
    """Whether the memory's bytes depend on n_ctx (False for recurrent-only models, and
    hybrid-iSWA models whose attention layers all slide, without swa_full)."""
    from . import plan

    per = 256 * (1 if kw.get("unified", True) else max(1, int(kw.get("n_seq_max", 1))))
    return plan.estimate(hp, per, **kw).total != plan.estimate(hp, 8 * per, **kw).total


def fixed_size_note(hp: Any) -> str:
    """Why a memory that does not grow with n_ctx does not."""
    if getattr(hp, "memory_kind", "") == "recurrent":
        return "the memory does not grow with n_ctx (recurrent state: one fixed-size cell per sequence)"
    return "the memory does not grow with n_ctx (recurrent state and sliding-window caches of fixed size)"


def report(args: argparse.Namespace, hp: Any, kw: Dict[str, Any], label: str, human: Callable[[int], str]) -> int:
    from . import plan

    n_fit = plan.max_context(hp, args.budget, **kw)
    grows = grows_with_context(hp, kw)
    train = int(getattr(hp, "n_ctx_train", 0) or 0)
    n = n_fit
    capped = False
    if n_fit and train and n_fit > train:
        n = plan.estimate(hp, 0, **kw).spec.n_ctx   # llama.cpp's context for n_ctx = 0 (the training one)
        capped = n < n_fit
    e = plan.estimate(hp, n, **kw) if n else None
    if args.json:
        json.dump({"model": args.model, "shape": args.shape, "arch": hp.arch, "budget": args.budget, "max_n_ctx": n,
                   "bytes": e.total if e else None, "n_ctx_train": train or None, "capped_at_n_ctx_train": capped,
                   "fits_n_ctx": n_fit, "grows_with_context": grows}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if n == 0:
        print(f"{label} ({hp.arch}): not even 256 cells per stream fit in {human(args.budget)}")
        return 0
    head = f"{label} ({hp.arch}): "
    if not grows:
        print(head + f"{fixed_size_note(hp).replace('the memory', f'the memory ({human(e.total)})')}, so it fits at "
              f"any n_ctx; the model's training context is {train or '?'}: n_ctx {n}")
    elif capped:
        print(head + f"largest n_ctx within {human(args.budget)}: {n} = the model's training context "
              f"({human(e.total)} of memory); the budget would hold {n_fit}, past what the model was trained for "
              "(llama.cpp warns: n_ctx_seq > n_ctx_train)")
    else:
        print(head + f"largest n_ctx within {human(args.budget)}: {n} ({human(e.total)} of memory)")
    return 0
