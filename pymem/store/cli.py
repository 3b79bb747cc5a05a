"""``pymem store``: look after a prompt-cache store from the command line.

    pymem store stats URL [--json]              entries, bytes (by kind), pinned, counters
    pymem store ls URL [--json] [--kind K] [--sort S] [--limit N]
                                                one line per entry (key, kind, tokens, bytes, ...)
    pymem store verify URL [--json] [--delete]  check every value's envelope and checksum, and that
                                                every chain is whole
    pymem store gc URL [--budget BYTES] [--json]
                                                remove orphans (killed writers, broken chains) and,
                                                with --budget, evict LRU entries down to the budget

URL is a store directory, ``file://...``, ``redis://host:port/db``, ``rediss://`` or ``unix://``.
The command never creates a store.  Long scans show a progress bar on stderr when it is a
terminal (or with ``--progress``).  Exit status: 0 ok; 1 failure (verify: bad values found).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

from .. import _cliargs

__all__ = ["add_parser", "main"]

T = TypeVar("T")



def _human(n: int) -> str:
    for unit, k in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# ---------------------------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------------------------
def _open(url: str):
    """The backend at ``url``; never creates an embedded store."""
    from .backends import open_backend

    if "://" not in url or url.lower().startswith("file://"):
        return open_backend(url, create=False)
    return open_backend(url)


def _progress(args: argparse.Namespace, it: Iterable[T], total: Optional[int], desc: str) -> Iterator[T]:
    """``it`` with a tqdm bar on stderr when stderr is a terminal or ``--progress`` was given."""
    if not (getattr(args, "progress", False) or sys.stderr.isatty()):
        yield from it
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with gguf
        yield from it
        return
    with tqdm(it, total=total, desc=desc, unit=" entries", file=sys.stderr, leave=False,
              mininterval=0.2, dynamic_ncols=True) as bar:
        yield from bar


def _count(backend: Any) -> Optional[int]:
    count = getattr(backend, "count", None)
    return int(count()) if callable(count) else None


def _entries(args: argparse.Namespace, backend: Any, desc: str = "scan") -> List[Any]:
    return list(_progress(args, backend.scan(), _count(backend), desc))


def _emit(args: argparse.Namespace, obj: Dict[str, Any], text: Callable[[], None]) -> None:
    if args.json:
        json.dump(obj, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        text()


def _check(e: Any, v: bytes) -> Optional[str]:
    """None, or what is wrong with value ``v`` of entry ``e`` (the store's envelope check)."""
    from .._errors import Error
    from . import values as V

    try:
        kind, n_tokens, _seed = V.check_value(v, bytes.fromhex(e.key))
    except (Error, ValueError) as exc:
        return str(exc) or type(exc).__name__
    if kind != e.kind:
        return f"the value is a {kind!r}, the index says {e.kind!r}"
    if n_tokens != e.n_tokens:
        return f"the value holds {n_tokens} tokens, the index says {e.n_tokens}"
    return None


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args.url) as b:
        entries = _entries(args, b)
        counters = b.counters()
        by_kind: Dict[str, Dict[str, int]] = {}
        for e in entries:
            k = by_kind.setdefault(e.kind, {"entries": 0, "bytes": 0})
            k["entries"] += 1
            k["bytes"] += e.size
        out: Dict[str, Any] = {
            "url": b.url, "entries": len(entries), "bytes": sum(e.size for e in entries),
            "by_kind": dict(sorted(by_kind.items())), "pinned": sum(1 for e in entries if e.pinned),
            "pinned_bytes": sum(e.size for e in entries if e.pinned),
            "tokens_max": max((e.n_tokens for e in entries), default=0),
            "oldest_use": min((e.last_used for e in entries), default=0.0),
            "newest_use": max((e.last_used for e in entries), default=0.0),
            "counters": dict(sorted(counters.items())),
        }

    def text() -> None:
        kinds = ", ".join(f"{k} {v['entries']}" for k, v in out["by_kind"].items())
        print(f"store     {out['url']}")
        print(f"entries   {out['entries']}" + (f" ({kinds})" if kinds else "") +
              f", {out['pinned']} pinned")
        print(f"bytes     {out['bytes']} ({_human(out['bytes'])})")
        print(f"last use  {_when(out['oldest_use'])} .. {_when(out['newest_use'])}")
        for k, v in out["counters"].items():
            print(f"{k:<9} {v}")

    _emit(args, out, text)
    return 0


_SORT = {"last_used": lambda e: e.last_used, "created": lambda e: e.created, "size": lambda e: e.size,
         "n_tokens": lambda e: e.n_tokens, "key": lambda e: e.key}


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args.url) as b:
        entries = [e for e in _entries(args, b) if args.kind is None or e.kind == args.kind]
    entries.sort(key=lambda e: (_SORT[args.sort](e), e.key), reverse=args.sort in ("last_used", "size"))
    if args.limit is not None:
        entries = entries[:args.limit]
    rows = [{"key": e.key, "kind": e.kind, "n_tokens": e.n_tokens, "size": e.size, "parent": e.parent,
             "created": e.created, "last_used": e.last_used, "pinned": e.pinned} for e in entries]

    def text() -> None:
        print(f"{'key':<32}  {'kind':<5} {'tokens':>7} {'bytes':>11}  {'last used':<19}  pin  parent")
        for r in rows:
            key = r["key"] if len(r["key"]) <= 32 else r["key"][:31] + "~"
            parent = "-" if r["parent"] is None else r["parent"][:16]
            print(f"{key:<32}  {r['kind']:<5} {r['n_tokens']:>7} {r['size']:>11}  "
                  f"{_when(r['last_used']):<19}  {'yes' if r['pinned'] else '   '}  {parent}")

    _emit(args, {"entries": rows} if args.json else {}, text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import policy

    bad: List[Dict[str, Any]] = []
    checked = nbytes = 0
    with _open(args.url) as b:
        entries = _entries(args, b)
        for e in _progress(args, entries, len(entries), "verify"):
            v = b.get(e.key, touch=False)
            if v is None:
                if b.entry(e.key) is None:
                    continue  # deleted since the scan
                problem: Optional[str] = "the value is missing or truncated"
            else:
                checked += 1
                nbytes += len(v)
                problem = _check(e, v)
            if problem:
                bad.append({"key": e.key, "kind": e.kind, "n_tokens": e.n_tokens, "problem": problem})
        flagged = {r["key"] for r in bad}
        # whole values whose chain has a hole (counting the bad values as gone)
        for k in sorted(policy.orphans(e for e in b.scan() if e.key not in flagged) - flagged):
            e = b.entry(k)
            if e is not None:
                bad.append({"key": k, "kind": e.kind, "n_tokens": e.n_tokens,
                            "problem": "its chain has a hole (an earlier block is missing)"})
        deleted = b.delete([r["key"] for r in bad]) if (args.delete and bad) else 0
        url = b.url
    out = {"url": url, "entries": len(entries), "checked": checked, "bytes": nbytes,
           "bad": bad, "deleted": deleted, "ok": not bad}

    def text() -> None:
        for r in bad:
            print(f"BAD {r['key']} ({r['kind']}, {r['n_tokens']} tokens): {r['problem']}")
        verdict = "ok" if not bad else f"{len(bad)} bad" + (f", {deleted} deleted" if deleted else "")
        print(f"{url}: {checked} values checked ({_human(nbytes)}): {verdict}")

    _emit(args, out, text)
    return 0 if not bad else 1


def cmd_gc(args: argparse.Namespace) -> int:
    from . import policy

    with _open(args.url) as b:
        before = b.total_bytes()
        swept: Dict[str, int] = {}
        sweep = getattr(b, "sweep", None)
        if callable(sweep):  # the embedded backend: temp files and file / row mismatches
            swept = sweep(grace=args.grace)
        out: Dict[str, Any] = {"url": b.url, "budget": args.budget, "bytes_before": before, "swept": swept}
        # the store's policy (as Store.gc): drop broken chains, then evict LRU leaves to the budget
        broken = policy.orphans(_entries(args, b))
        out["orphans"] = b.delete(broken) if broken else 0
        if args.budget is not None:
            out["evicted"], out["freed_bytes"] = policy.evict_to_budget(b, args.budget)
            if out["evicted"]:
                b.incr("evictions", out["evicted"])
        out["bytes_after"] = b.total_bytes()
        count = _count(b)
        out["entries_after"] = count if count is not None else sum(1 for _ in b.scan())

    def text() -> None:
        parts = [f"{k} {v}" for k, v in out.items()
                 if k not in ("url", "budget", "bytes_before", "bytes_after", "entries_after", "swept")]
        parts += [f"swept {k} {v}" for k, v in swept.items() if v]
        budget = "no budget" if args.budget is None else f"budget {_human(args.budget)}"
        print(f"{out['url']}: {_human(before)} -> {_human(out['bytes_after'])} ({budget}); "
              f"{out['entries_after']} entries left" + (f"; {', '.join(parts)}" if parts else ""))

    _emit(args, out, text)
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``store`` (with its subcommands) to the ``pymem`` subparsers ``sub``."""
    p = sub.add_parser("store", help="look after a prompt-cache store: stats, ls, verify, gc",
                       description=__doc__.split("\n\n")[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ss = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("url", metavar="URL", help="store directory, file://, redis://, rediss:// or unix:// URL")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.add_argument("--progress", action="store_true", help="progress bar on stderr even if not a terminal")

    q = ss.add_parser("stats", help="entries, bytes, pinned, counters")
    common(q)
    q.set_defaults(func=cmd_stats)

    q = ss.add_parser("ls", help="list the entries")
    common(q)
    q.add_argument("--kind", help="only entries of this kind (block, tail, ckpt, ...)")
    q.add_argument("--sort", choices=sorted(_SORT), default="last_used",
                   help="order (last_used and size: largest first; default last_used)")
    q.add_argument("--limit", type=int, help="at most this many lines")
    q.set_defaults(func=cmd_ls)

    q = ss.add_parser("verify", help="check every value's envelope and checksum (exit 1 if any is bad)")
    common(q)
    q.add_argument("--delete", action="store_true", help="delete the bad values")
    q.set_defaults(func=cmd_verify)

    q = ss.add_parser("gc", help="remove orphans; with --budget evict least recently used entries")
    common(q)
    q.add_argument("--budget", type=_cliargs.size, help="byte budget (e.g. 8GiB, 500MB)")
    q.add_argument("--grace", type=float, default=600.0,
                   help="embedded stores: seconds before leftovers of writers count as orphans (600)")
    q.set_defaults(func=cmd_gc)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pymem.store.cli ...`` (the same as ``pymem store ...``)."""
    from ..cli import main as pymem_main

    return pymem_main(["store", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
