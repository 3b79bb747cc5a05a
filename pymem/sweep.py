"""``pymem estimate --sweep``: the memory llama.cpp allocates against the context length, for
several cache types, as a table (and with ``--plot FILE`` a chart, needing matplotlib: the
``pymem[plot]`` extra).  Every figure is :func:`pymem.estimate` (llama.cpp's rounding and
padding included)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import _errors as E

__all__ = ["default_contexts", "sweep", "report", "add_args"]

DEFAULT_TYPES = ("f16", "q8_0", "q4_0")


def add_args(p: argparse.ArgumentParser) -> None:
    from . import _cliargs

    g = p.add_argument_group("sweep")
    g.add_argument("--sweep", action="store_true",
                   help="a table of memory against context length for several cache types (K and V alike)")
    g.add_argument("--sweep-ctx", metavar="N,N,...", type=_int_list,
                   help="the context lengths (default: doublings up to the training context)")
    g.add_argument("--sweep-types", metavar="T,T,...", type=_type_list, default=list(DEFAULT_TYPES),
                   help="cache types to compare (default f16,q8_0,q4_0; valid: " + ", ".join(_cliargs.CACHE_TYPES) + ")")
    g.add_argument("--plot", metavar="OUT.png", type=_cliargs.out_file, help="with --sweep: also write a chart (needs matplotlib: "
                                                     "pip install 'pymem[plot]')")


def _int_list(text: str) -> List[int]:
    from . import _cliargs

    vals = [_cliargs.positive(x) for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one context length")
    return vals


def _type_list(text: str) -> List[str]:
    from . import _cliargs

    vals = [_cliargs.cache_type(x) for x in text.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("give at least one cache type")
    return vals


def default_contexts(n_ctx_train: int, points: int = 8) -> List[int]:
    """Doublings ending at the training context (at least 256), ``points`` of them at most."""
    top = max(256, int(n_ctx_train or 4096))
    out = [top]
    while len(out) < points and out[-1] // 2 >= 256:
        out.append(out[-1] // 2)
    return sorted(out)


def sweep(hp: Any, contexts: Sequence[int], types: Sequence[str], **kw: Any) -> Dict[str, List[Optional[int]]]:
    """``{type: [bytes at each context, or None where llama.cpp refuses the type]}``."""
    from . import plan

    kw = {k: v for k, v in kw.items() if k not in ("type_k", "type_v")}
    out: Dict[str, List[Optional[int]]] = {}
    for t in types:
        row: List[Optional[int]] = []
        for n in contexts:
            try:
                row.append(plan.estimate(hp, int(n), type_k=t, type_v=t, **kw).total)
            except E.UnsupportedError:   # e.g. a quantized V cache without flash attention
                row.append(None)
            except E.InvalidArgumentError as exc:
                raise E.InvalidArgumentError(f"--sweep-ctx {n}: {exc}") from None
        out[t] = row
    return out


def report(args: argparse.Namespace, hp: Any, kw: Dict[str, Any], label: str, human: Callable[[int], str]) -> int:
    ctxs = list(args.sweep_ctx or default_contexts(getattr(hp, "n_ctx_train", 0)))
    types = list(args.sweep_types)
    table = sweep(hp, ctxs, types, **kw)
    from . import _budget
    from ._budget import grows_with_context

    grows = grows_with_context(hp, kw)
    if args.json:
        json.dump({"model": args.model, "shape": args.shape, "arch": hp.arch, "n_ctx": ctxs, "types": types,
                   "bytes": table, "grows_with_context": grows}, sys.stdout)
        sys.stdout.write("\n")
    else:
        fa = kw.get("flash_attn")
        print(f"{label} ({hp.arch}): memory by context length and cache type (K = V type, "
              f"{kw.get('n_seq_max', 1)} sequence{'s' if kw.get('n_seq_max', 1) != 1 else ''}, flash attention "
              f"{'auto (on)' if fa == 'auto' else 'on' if fa else 'off'})")
        print(f"  {'n_ctx':>9}" + "".join(f"  {t:>11}" for t in types))
        for i, n in enumerate(ctxs):
            print(f"  {n:>9}" + "".join(f"  {human(table[t][i]) if table[t][i] is not None else '-':>11}"
                                        for t in types))
        if any(v is None for r in table.values() for v in r):
            print("  - : llama.cpp refuses this type here (a quantized V cache needs flash attention)")
        if not grows:
            print("  " + _budget.fixed_size_note(hp))
        train = getattr(hp, "n_ctx_train", 0)
        if train and max(ctxs) > train:
            print(f"  the model was trained for {train} tokens")
    if args.plot:
        write_chart(args.plot, ctxs, table, f"{label} ({hp.arch})", train=getattr(hp, "n_ctx_train", 0))
        sys.stderr.write(f"wrote {args.plot}\n")
    return 0


def write_chart(path: str, ctxs: Sequence[int], table: Dict[str, List[Optional[int]]], title: str,
                train: int = 0) -> None:
    """A line chart of ``table`` (bytes) against ``ctxs``, as a PNG."""
    import io

    from .picture import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t, row in table.items():
        pts = [(n, v / 2 ** 30) for n, v in zip(ctxs, row) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ctxs))
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in ctxs])
    ax.set_xlabel("context length (n_ctx)")
    ax.set_ylabel("memory (GiB)")
    if train and min(ctxs) <= train <= max(ctxs):
        ax.axvline(train, color="#718096", linestyle="--", linewidth=1)
        ax.annotate("training context", (train, ax.get_ylim()[1]), ha="right", va="top", fontsize=8,
                    color="#4a5568", rotation=90)
    ax.grid(True, alpha=0.3)
    ax.legend(title="K/V cache type")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from .state.files import atomic_write

    data = buf.getvalue()
    atomic_write(path, [data], len(data))
