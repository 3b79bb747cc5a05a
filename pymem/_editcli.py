"""The reporting half of ``pymem edit``: ``--dry-run``, ``--strict``, ``--json``, and the warnings
(operations that changed nothing, cells shared with other sequences that a shift moves, a
token list that cannot follow the cache) on stderr."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = ["add_args", "finish"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="show the state before and after the edits without writing anything")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 without writing when an edit changes nothing (absent sequence, empty range, "
                        "nothing in the range)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")


def _seqs(obj: Any) -> Dict[str, Any]:
    return {str(q): [min(x.pos_min for x in infos), max(x.pos_max for x in infos)]
            for q, infos in obj.sequences().items()}


def _side(obj: Any) -> Dict[str, Any]:
    d: Dict[str, Any] = {"bytes": obj.nbytes, "sequences": _seqs(obj)}
    if hasattr(obj, "tokens"):
        d["n_tokens"] = len(obj.tokens)
    return d


def _table(obj: Any) -> str:
    return ", ".join(f"{q}:{a}..{b}" for q, (a, b) in _seqs(obj).items()) or "(empty)"


def finish(args: argparse.Namespace, obj: Any, new: Any, ops: List[Any], t0: float,
           save: Callable[[], None], how: str) -> int:
    """Warn, then write (unless --dry-run, or --strict and something changed nothing), then
    report.  Returns the exit status."""
    noop: List[str] = list(getattr(new, "noop", []) or [])
    sync: Optional[Dict[str, Any]] = getattr(new, "token_sync", None)
    warnings = list(noop)
    if sync and sync.get("note"):
        warnings.append(sync["note"])
    warnings += [n for n in (new.edit_notes or []) if "shared with sequence" in n]
    for w in warnings if not args.quiet else []:
        sys.stderr.write(f"pymem edit: warning: {w}\n")
    refused = bool(args.strict and noop)
    write = not args.dry_run and not refused
    if write:
        save()
    if refused:
        sys.stderr.write(f"pymem edit: error: --strict: an edit changed nothing; {args.output} not written\n")
    if args.json:
        json.dump({"file": args.file, "output": args.output, "written": write, "dry_run": bool(args.dry_run),
                   "edits": [str(o) for o in ops], "edit_path": new.edit_path,
                   "streamed": bool(getattr(new, "edit_streamed", False)), "notes": list(new.edit_notes or []),
                   "noop": noop, "tokens": sync, "warnings": warnings, "before": _side(obj), "after": _side(new)},
                  sys.stdout)
        sys.stdout.write("\n")
    elif not args.quiet or args.dry_run:
        print(f"{args.file}: {obj.what}, {obj.nbytes} bytes")
        print(f"  edits: {', '.join(str(o) for o in ops) or '-'}")
        print(f"  {how}")
        for n in new.edit_notes or []:
            print(f"  {n}")
        if hasattr(obj, "tokens") and hasattr(new, "tokens"):
            follow = " (follow the cache)" if sync and sync.get("mapped") and len(obj.tokens) != len(new.tokens) else ""
            print(f"  tokens: {len(obj.tokens)} -> {len(new.tokens)}{follow}")
        print(f"  sequences: {_table(obj)} -> {_table(new)}")
        if args.dry_run:
            print(f"dry run: {args.output} not written ({new.nbytes} bytes, "
                  f"{time.perf_counter() - t0:.2f} s)")
        elif write:
            print(f"wrote {args.output}: {new.nbytes} bytes ({time.perf_counter() - t0:.2f} s)")
    return 1 if refused else 0

