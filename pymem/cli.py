"""The ``pymem`` command line (also ``python -m pymem``).

    pymem demo            build tiny models, run them in real llama.cpp, mirror their memory in
                          pymem, and print what matched (exit status 1 on any mismatch)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

__all__ = ["main"]


def _demo_steps() -> list[tuple[str, Callable]]:
    """The demo scenario: (description, function(mirror)) pairs."""

    def fill(seq: int, n: int, start: int = 0, tok: int = 0) -> Callable:
        return lambda m: m.decode([((tok + i) % 128, start + i, [seq]) for i in range(n)])

    return [
        ("decode a 24-token prompt into seq 0", fill(0, 24)),
        ("fork seq 0 into seq 1 (seq_cp)", lambda m: m.seq_cp(0, 1)),
        ("continue seq 1 with 6 tokens", fill(1, 6, start=24, tok=50)),
        ("drop seq 0 tokens 4..8 (seq_rm)", lambda m: m.seq_rm(0, 4, 8)),
        ("context shift of seq 1 (seq_rm + seq_add)", lambda m: (m.seq_rm(1, 0, 8), m.seq_add(1, 8, -1, -8))),
        ("decode after the shift (K re-rotated)", lambda m: m.decode(
            [((90 + i) % 128, m.mem.seq_pos_max(1) + 1 + i, [1]) for i in range(3)])),
        ("save seq 1, restore it as seq 2", lambda m: m.seq_restore(1, 2)),
        ("keep only seq 2 (seq_keep)", lambda m: m.seq_keep(2)),
        ("whole state through llama.cpp's bytes", lambda m: m.whole_restore(from_llama=True)),
        ("continue seq 2", lambda m: m.decode([((7 + i) % 128, m.mem.seq_pos_max(2) + 1 + i, [2])
                                               for i in range(4)])),
    ]


def demo(args: argparse.Namespace) -> int:
    try:
        from .llama import OracleUnavailable, OracleWorker, tinymodels
        from .llama.mirror import Mirror
    except ImportError as exc:  # pragma: no cover
        print(f"pymem demo: {exc}", file=sys.stderr)
        return 2
    import pymem

    configs = [
        ("llama", dict(kv_unified=True, flash_attn=False)),
        ("llama", dict(kv_unified=False, flash_attn=True)),
        ("gemma2", dict(kv_unified=True, flash_attn=False)),
        ("mamba", dict(kv_unified=True, flash_attn=False)),
        ("jamba", dict(kv_unified=False, flash_attn=False)),
        ("lfm2_swa", dict(kv_unified=True, flash_attn=True)),
    ]
    t0 = time.perf_counter()
    try:
        w = OracleWorker()
        w.start()
    except OracleUnavailable as exc:
        print(f"pymem demo needs real llama.cpp: {exc}", file=sys.stderr)
        return 2
    failures = 0
    rows = []
    with w:
        paths = w.ensure_models(sorted({name for name, _ in configs}))
        for name, cfg in configs:
            layout = tinymodels.layout(name)
            n_seq_max = 3
            ctx = w.context(paths[name], n_ctx=256, n_seq_max=n_seq_max, swa_full=True, **cfg)
            mem = pymem.from_gguf(paths[name], 256, n_seq_max=n_seq_max, unified=cfg["kv_unified"],
                                  flash_attn=cfg["flash_attn"], swa_full=True)
            m = Mirror(ctx, mem, n_ubatch=ctx.n_ubatch(), n_vocab=layout["n_vocab"], n_seq_max=n_seq_max)
            label = f"{name} ({mem.kind}), {'unified' if cfg['kv_unified'] else 'per-seq streams'}, " \
                    f"{'flash attn' if cfg['flash_attn'] else 'V transposed'}"
            for what, fn in _demo_steps():
                try:
                    fn(m)
                    bad = m.compare()
                except AssertionError as exc:
                    bad = [str(exc)]
                ok = not bad
                failures += not ok
                whole = len(m.mem.state_write(envelope="llama"))
                rows.append((label, what, whole, "match" if ok else "MISMATCH: " + "; ".join(map(str, bad))[:120]))
            ctx.close()
    width = max(len(r[1]) for r in rows)
    current = None
    for label, what, size, status in rows:
        if label != current:
            print(f"\n{label}")
            print(f"  {'step':{width}s}  {'state bytes':>11s}  result")
            current = label
        print(f"  {what:{width}s}  {size:11d}  {status}")
    n = len(rows)
    print(f"\n{n - failures}/{n} steps byte-identical to llama.cpp b11739 "
          f"(positions, whole state and every sequence state), {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pymem",
        description="llama.cpp's inference memory module, byte-compatible, from Python.",
        epilog="examples:\n  pymem demo\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="run tiny models in real llama.cpp and mirror their memory in pymem")
    p.set_defaults(func=demo)
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
