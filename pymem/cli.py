"""The ``pymem`` command line (also ``python -m pymem``).

    pymem demo                      run tiny models of every memory type in real llama.cpp, mirror
                                    their memory in pymem, save / inspect / edit / reload sessions
    pymem inspect FILE              what a llama.cpp state file or blob holds
    pymem diff A B                  where two states differ
    pymem edit FILE --seq-rm ... -o OUT
                                    change a state offline (proven against llama.cpp by the tests)
    pymem estimate MODEL.gguf       bytes of the memory llama.cpp allocates; --budget: largest n_ctx

Exit status: 0 success; 1 failure (bad input, refused edit; diff: the states differ); 2 usage
errors (diff: trouble).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List, Optional, Sequence

from . import _cliargs

__all__ = ["main"]



class CLIError(Exception):
    """A user-facing error: printed as ``pymem CMD: error: ...``, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
def _progress_for(label: str, size: int, force: Optional[bool] = None) -> Any:
    """A tqdm bar on stderr for work over a second (``--progress`` shows it at once)."""
    from . import _progress

    return _progress.bar(label, force)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------
def _load(path: str, args: argparse.Namespace, strict: bool = False) -> Any:
    from . import state

    if path == "-":  # standard input (read until EOF like any stream)
        path = "/dev/stdin"
    bar = _progress_for(f"reading {os.path.basename(path)}", _file_size(path), getattr(args, "progress", None))
    try:
        return state.load(path, model=args.model, layout=args.layout, kind=args.kind, strict=strict,
                          progress=bar)
    finally:
        if bar:
            bar.close()


def _check_model(args: argparse.Namespace) -> None:
    if getattr(args, "model", None) and not os.path.isfile(args.model):
        raise CLIError(f"model file not found: {args.model}")


def _add_state_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("--model", "-m", metavar="M.gguf",
                   help="the model that wrote the state(s): gives the section layout and layer ids, "
                        "and for edit the RoPE parameters of K-shifts")
    p.add_argument("--layout", metavar="LAYOUT",
                   help="explicit section layout when the bytes are ambiguous and no model is at hand: "
                        "kv | kv+kv | rec:N | kv+rec:N | kv+kv+rec:N (N = recurrent layers), or a memory "
                        "kind (kv, iswa, recurrent:N, hybrid:N, hybrid_iswa:N); @10 for format 10")
    p.add_argument("--kind", choices=["session", "seq_file", "context", "seq", "sections"],
                   help="what the file%s holds (default: recognised from the first bytes)" % ("s" if many else ""))
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: for work over a second when stderr is a terminal)")


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    _check_model(args)
    obj = _load(args.file, args, strict=False)
    if args.json:
        d = obj.summary(cells=args.cells)
        d["file"] = args.file
        from . import _inspect_extra

        d.update(_inspect_extra.json_extra(args, obj))
        json.dump(d, sys.stdout, indent=1 if args.pretty else None)
        sys.stdout.write("\n")
    else:
        print(f"{args.file}:")
        print(obj.describe(width=args.width, cells=args.cells is not False))
    from . import _inspect_extra

    _inspect_extra.finish(args, obj)
    return 0


# ---------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace) -> int:
    from . import state

    _check_model(args)
    a = _load(args.a, args)
    b = _load(args.b, args)
    d = state.diff(a, b, ignore_order=args.ignore_order)
    if args.json:
        json.dump({"same": d.same, "first": d.first, "differences": d.lines, "counts": d.counts,
                   "a": {"file": args.a, "type": a.what, "bytes": a.nbytes, "layout": a.layout.describe()},
                   "b": {"file": args.b, "type": b.what, "bytes": b.nbytes, "layout": b.layout.describe()}},
                  sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"A: {args.a}: {a.what}, {a.nbytes} bytes, {a.layout.describe()}")
        print(f"B: {args.b}: {b.what}, {b.nbytes} bytes, {b.layout.describe()}")
        if d.same:
            print("identical" + (" (up to the order of cells)" if args.ignore_order and not state.mapped.same_bytes(a, b) else ""))
        else:
            print(d.text())
    return 0 if d.same else 1


# ---------------------------------------------------------------------------------------------
# edit
# ---------------------------------------------------------------------------------------------
class _OpAction(argparse.Action):
    """Collects edit options in command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        from . import state
        from ._errors import Error

        name = option_string.lstrip("-")
        try:
            op = state.parse_op(name, values)
        except Error as exc:
            parser.error(str(exc))
        ops = list(getattr(ns, "ops", None) or [])
        ops.append(op)
        setattr(ns, "ops", ops)


def _seq_table(obj: Any) -> str:
    rows = []
    for q, infos in obj.sequences().items():
        rows.append(f"{q}:{min(x.pos_min for x in infos)}..{max(x.pos_max for x in infos)}")
    return ", ".join(rows) or "(empty)"


def cmd_edit(args: argparse.Namespace) -> int:
    ops = getattr(args, "ops", None) or []
    if not ops and args.set_version is None:
        raise CLIError("nothing to do: give at least one edit (--seq-rm, --seq-cp, --seq-keep, --seq-mv, "
                       "--truncate, --seq-add, --seq-div) or --set-version", 2)
    _check_model(args)
    if not args.output:
        raise CLIError("output file name is empty", 2)
    if os.path.isdir(args.output):
        raise CLIError(f"output {args.output} is a directory")
    t0 = time.perf_counter()
    obj = _load(args.file, args, strict=not args.force)
    new = obj
    if ops:
        new = obj.edit(ops, model=args.model)
    if args.set_version is not None:
        if not hasattr(new, "with_version"):
            raise CLIError(f"--set-version applies to session and sequence state files, not to a {obj.what}")
        ver = new.with_version(args.set_version)
        for a in ("edit_path", "edit_notes", "noop", "token_sync"):
            setattr(ver, a, getattr(new, a))
        new = ver
    def save() -> None:
        bar = _progress_for(f"writing {os.path.basename(args.output)}", new.nbytes, args.progress)
        try:
            new.save(args.output, progress=bar)
        finally:
            if bar:
                bar.close()

    path = new.edit_path or "none"
    how = {"model": f"model path: a pymem memory built from {os.path.basename(args.model or '')} "
                    "(llama.cpp's semantics in pymem's C core)",
           "structure": "structure path: a pymem memory with the state's own geometry, no model "
                        "(llama.cpp's semantics in pymem's C core; no K-shifts)"}.get(path, "no edit")
    from . import _editcli

    return _editcli.finish(args, obj, new, ops, t0, save, how)


# ---------------------------------------------------------------------------------------------
# estimate
# ---------------------------------------------------------------------------------------------
def _width_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v <= 100000:
        raise argparse.ArgumentTypeError(f"{text!r}: the width must be in [1, 100000] characters")
    return v


def _human(n: int) -> str:
    for unit, k in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _layer_ranges(layers: List[int]) -> str:
    out: List[str] = []
    for il in layers:
        if out and out[-1][1] == il - 1:
            out[-1][1] = il
        else:
            out.append([il, il])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def cmd_estimate(args: argparse.Namespace) -> int:
    from . import gguf, plan, shapes

    if args.list_shapes:
        for name in shapes.names():
            print(f"{name:16s} {shapes.describe(name)}")
        return 0
    if (args.model is None) == (args.shape is None):
        raise CLIError("give a MODEL.gguf or --shape NAME (pymem estimate --list-shapes lists them)")
    label = args.model
    if args.shape is not None:
        args.model = shapes.path(args.shape)
        label = f"{args.shape} (shape)"
    elif not os.path.isfile(args.model):
        raise CLIError(f"model file not found: {args.model}")
    fa: Any = {"on": True, "off": False, "auto": "auto"}[args.flash_attn]
    kw = dict(n_seq_max=args.n_seq_max, type_k=args.type_k, type_v=args.type_v, flash_attn=fa,
              unified=args.unified, swa_full=args.swa_full, n_ubatch=args.n_ubatch, n_rs_seq=args.n_rs_seq)
    try:
        hp = gguf.read_hparams(args.model)
    except Exception as exc:
        from ._errors import Error

        if isinstance(exc, Error):
            raise
        raise CLIError(f"cannot read {args.model}: {exc}") from None
    if getattr(args, "sweep", False) or getattr(args, "plot", None):
        from . import sweep

        if not args.sweep:
            raise CLIError("--plot needs --sweep", 2)
        return sweep.report(args, hp, kw, label, _human)
    if args.budget is not None:
        from . import _budget

        return _budget.report(args, hp, kw, label, _human)
    e = plan.estimate(hp, args.n_ctx, **kw)
    spec = e.spec
    if args.json:
        json.dump({"model": args.model, "shape": args.shape, "arch": hp.arch, "kind": spec.kind, "n_ctx": spec.n_ctx,
                   "n_ctx_seq": spec.n_ctx_seq, "n_stream": spec.n_stream, "total": e.total,
                   "parts": [{"name": p[0], "cells": p[1], "bytes_a": p[2], "bytes_b": p[3]} for p in e.parts],
                   "layers": e.layers}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{label}: {hp.arch}, {spec.kind} memory, n_ctx {spec.n_ctx} ({spec.n_ctx_seq} cells x "
          f"{spec.n_stream} stream{'s' if spec.n_stream > 1 else ''}), K {spec.type_k}, V {spec.type_v}, "
          f"{'flash attention' if spec.flash_attn else 'V transposed'}")
    for part, (name, cells, x, y) in zip(spec.parts, e.parts):
        a, b = ("K", "V") if part.kind == "kv" else ("R", "S")
        print(f"  {name:10s} {cells:8d} cells  {a} {_human(x):>11s}  {b} {_human(y):>11s}   "
              f"{len(part.layers)} layers: {_layer_ranges(list(part.layers))}")
    if args.layers:
        print(f"  {'part':10s} {'layer':>5s} {'width':>11s} {'bytes':>23s}")
        for d in e.layers:
            a, b = ("k", "v") if "k_bytes" in d else ("r", "s")
            print(f"  {d['part']:10s} {d['layer']:5d} {d['n_embd_' + a]:5d}/{d['n_embd_' + b]:<5d} "
                  f"{_human(d[a + '_bytes']):>11s} {_human(d[b + '_bytes']):>11s}")
    print(f"  total {_human(e.total)} ({e.total} bytes)")
    from . import _budget

    if not _budget.grows_with_context(hp, kw):
        print("  " + _budget.fixed_size_note(hp))
    return 0


def _demo_cmd(name: str, args: argparse.Namespace) -> int:
    from . import _demo  # loads the oracle only when asked

    return int(getattr(_demo, name)(args))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
_EPILOG = """\
examples:
  pymem demo
  pymem inspect prompt.session
  pymem inspect prompt.session --model model.gguf --json
  pymem diff a.session b.session --model model.gguf
  pymem edit prompt.session --seq-rm 0:100:200 --seq-add 0:200:-1:-100 --model model.gguf -o shifted.session
  pymem edit slot.bin --seq-keep 1 --seq-mv 1:0 -o out.bin
  pymem estimate model.gguf --n-ctx 32768 --n-seq-max 4 --type-k q8_0
  pymem estimate model.gguf --budget 8GiB

exit status: 0 ok; 1 failure (diff: the states differ); 2 usage error (diff: trouble)
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pymem",
        description="llama.cpp's inference memory module, byte-compatible, from Python: run the demo, "
                    "inspect, compare and edit saved llama.cpp states, estimate memory sizes.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=_version(),
                    help="pymem's version, the llama.cpp builds it conforms to, the active SIMD kernel")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run tiny models of all five memory types in real llama.cpp next to pymem",
                       description="Builds tiny models (no downloads), runs them in real llama.cpp b11739 and "
                                   "mirrors their memory in pymem, comparing states byte for byte; then saves "
                                   "sessions, inspects and edits them offline and loads the edits back into "
                                   "llama.cpp.  Exit status 1 on any mismatch.")
    p.add_argument("--keep", metavar="DIR",
                   help="leave the tiny models and the files llama.cpp saved (sessions, a llama-server slot file, "
                        "raw blobs) in DIR, with a README.txt of commands to try")
    p.set_defaults(func=lambda a: _demo_cmd("demo", a))

    p = sub.add_parser(
        "conformance", help="replay the conformance vectors against an installed llama.cpp build and pymem",
        description="Replays the shipped vectors (every memory type, recorded from llama.cpp b11739 and 0c1e570) "
                    "in an installed llama.cpp build and in pymem side by side, and prints per vector whether the "
                    "build reproduces the recording and pymem reproduces the build (or the first difference). "
                    "--record DIR records a new set from the build instead (refusing what pymem cannot replay).")
    p.add_argument("--llama", choices=["py-sync", "llama-cpp-python"], default="py-sync",
                   help="the build to run: the llama-cpp-py-sync wheel (b11739) or llama-cpp-python 0.3.36 (0c1e570)")
    p.add_argument("--json", action="store_true", help="one JSON object per vector instead of the table")
    p.add_argument("--record", metavar="DIR", help="record a vector set from the build into DIR")
    p.add_argument("--vectors", metavar="FILE", nargs="*", help="vector files to replay (default: the shipped set)")
    p.set_defaults(func=lambda a: _demo_cmd("_conformance", a))

    p = sub.add_parser(
        "inspect", help="what a llama.cpp state file or blob holds",
        description="Summarise a session file (llama_state_save_file), a sequence state file "
                    "(llama_state_seq_save_file), a context blob (llama_state_get_data), a sequence blob "
                    "(llama_state_seq_get_data) or bare memory sections: architecture, format, tokens, "
                    "sections, streams, cells, layers and sequences, with a picture of cell occupancy.",
        epilog="examples:\n  pymem inspect prompt.session\n  pymem inspect slot0.bin --model model.gguf --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    _add_state_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
    p.add_argument("--cells", action=argparse.BooleanOptionalAction, default=None,
                   help="cell pictures / JSON cell lists (default: pictures; JSON lists up to 4096 cells)")
    p.add_argument("--width", type=_width_arg, default=64, help="width of the occupancy pictures (default 64)")
    from . import _inspect_extra

    _inspect_extra.add_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "diff", help="where two states differ (exit 1 when they do)",
        description="Compare two states: container, tokens, layout, then per section the first differing "
                    "stream, cell or layer, and a summary.  Exit status 0 identical, 1 different, 2 trouble.",
        epilog="examples:\n  pymem diff before.session after.session\n"
               "  pymem diff a.bin b.bin --model model.gguf --ignore-order\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    _add_state_args(p, many=True)
    p.add_argument("--ignore-order", action="store_true",
                   help="compare cells sorted by position and sequence ids (same contents in other cells "
                        "compare equal)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "edit", help="change a state offline (seq_rm, seq_cp, seq_keep, seq_mv, truncate, seq_add, seq_div)",
        description="Apply sequence operations to a saved state without running the model, in the order "
                    "given, exactly as llama.cpp would apply them (followed by its next update: K-shift, "
                    "stream copies).  With --model the state is loaded into the memory llama.cpp creates "
                    "for that model; without it into a memory with the state's own geometry, which cannot "
                    "shift attention caches (--seq-add / --seq-div need --model).  The output is written to "
                    "a temporary file and renamed: never a partial file.  Positions are half-open ranges "
                    "[P0, P1); -1 or an empty field means open.",
        epilog="examples:\n"
               "  pymem edit a.session --truncate 512 -o b.session\n"
               "  pymem edit a.session -m model.gguf --seq-rm 0:4:260 --seq-add 0:260::-256 -o shifted.session\n"
               "  pymem edit slots.bin --seq-cp 0:3 --seq-keep 3 -o only3.bin\n"
               "  pymem edit seq1.ggsq --seq-mv 1:0 -o seq0.ggsq\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    _add_state_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (may be FILE itself)")
    g = p.add_argument_group("edits (applied in the order given; each may repeat)")
    g.add_argument("--seq-rm", action=_OpAction, metavar="S[:P0:P1]",
                   help="remove positions [P0,P1) of sequence S (S -1: all sequences; default: all positions)")
    g.add_argument("--seq-cp", action=_OpAction, metavar="SRC:DST[:P0:P1]",
                   help="let DST share SRC's cells (positions [P0,P1))")
    g.add_argument("--seq-keep", action=_OpAction, metavar="S", help="drop every sequence but S")
    g.add_argument("--seq-mv", action=_OpAction, metavar="SRC:DST", help="move sequence SRC to id DST")
    g.add_argument("--truncate", action=_OpAction, metavar="N",
                   help="drop positions >= N of every sequence, and a session's tokens after the first N")
    g.add_argument("--seq-add", action=_OpAction, metavar="S:P0:P1:DELTA",
                   help="move positions [P0,P1) of S by DELTA, rotating K (needs --model)")
    g.add_argument("--seq-div", action=_OpAction, metavar="S:P0:P1:D",
                   help="divide positions [P0,P1) of S by D, rotating K (needs --model)")
    p.add_argument("--set-version", type=int, metavar="V",
                   help="write another file version (session 11 <-> 10, sequence file 4 <-> 3)")
    p.add_argument("--force", action="store_true",
                   help="accept a session file with trailing bytes (llama.cpp would not load it)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    from . import _editcli

    _editcli.add_args(p)
    p.set_defaults(func=cmd_edit, ops=[])

    p = sub.add_parser(
        "estimate", help="memory llama.cpp allocates for a model and context (or the n_ctx a budget allows)",
        description="Bytes of the KV cache / recurrent state llama.cpp b11739 allocates for a GGUF model "
                    "and context parameters, per part; with --budget the largest n_ctx that fits.",
        epilog="examples:\n  pymem estimate model.gguf --n-ctx 32768\n"
               "  pymem estimate model.gguf --ctx 8192 --parallel 4 --no-unified --type-k q8_0 "
               "--type-v q8_0 --flash-attn\n  pymem estimate model.gguf --budget 8GiB\n"
               "  pymem estimate --shape gemma3-12b --ctx 131072 --layers\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.gguf", nargs="?", help="a GGUF file (metadata is enough)")
    p.add_argument("--shape", metavar="NAME",
                   help="a built-in published model shape instead of a file (see --list-shapes)")
    p.add_argument("--list-shapes", action="store_true", help="list the built-in shapes")
    p.add_argument("--n-ctx", "--ctx", type=_cliargs.count, default=0,
                   help="context size (default 0: the model's training context)")
    p.add_argument("--n-seq-max", "--parallel", type=_cliargs.positive, default=1, help="parallel sequences")
    p.add_argument("--type-k", "--cache-type-k", "-ctk", type=_cliargs.cache_type, default="f16",
                   help="K cache type (llama.cpp's --cache-type-k): " + ", ".join(_cliargs.CACHE_TYPES) +
                        " (default f16)")
    p.add_argument("--type-v", "--cache-type-v", "-ctv", type=_cliargs.cache_type, default="f16",
                   help="V cache type (llama.cpp's --cache-type-v; quantized V needs flash attention), same "
                        "choices (default f16)")
    p.add_argument("--flash-attn", "-fa", choices=["on", "off", "auto"], nargs="?", const="on", default="auto",
                   help="auto (default, as llama_context_default_params() and llama-cli: on for the CPU backend, "
                        "V rows not transposed); off: V transposed; --flash-attn alone = on")
    p.add_argument("--layers", action="store_true", help="also print every layer's sizes")
    p.add_argument("--unified", action=argparse.BooleanOptionalAction, default=True,
                   help="one stream for all sequences (default) or one per sequence")
    p.add_argument("--swa-full", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--n-ubatch", type=_cliargs.positive, default=512)
    p.add_argument("--n-rs-seq", type=_cliargs.count, default=0)
    p.add_argument("--budget", type=_cliargs.size, metavar="BYTES",
                   help="print the largest n_ctx whose memory fits (e.g. 8GiB, 500MB)")
    p.add_argument("--json", action="store_true")
    from . import sweep

    sweep.add_args(p)
    p.set_defaults(func=cmd_estimate)

    from .store.cli import add_parser as _add_store_parser  # pymem store stats|ls|verify|gc URL

    _add_store_parser(sub)
    return ap


def _version() -> str:
    try:
        from . import _build

        return _build.version_text()
    except Exception as exc:  # pragma: no cover - a broken install still gets its commands
        return f"pymem ? ({exc})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = _parser()
    args = ap.parse_args(_cliargs.join_negative_values(sys.argv[1:] if argv is None else list(argv),
                                                        ("--budget", "--n-ctx", "--ctx", "--n-seq-max", "--parallel",
                                                         "--n-ubatch", "--n-rs-seq", "--seq-rm", "--seq-cp",
                                                         "--seq-add", "--seq-div", "--seq-keep", "--seq-mv",
                                                         "--truncate", "--width")))
    if not getattr(args, "func", None):
        ap.print_help(sys.stderr)
        return 2
    from ._errors import Error

    debug = os.environ.get("PYMEM_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args))
    except CLIError as exc:
        code = exc.code
        msg = str(exc)
    except Error as exc:
        code = 1
        msg = str(exc)
    except BrokenPipeError:   # e.g. `pymem inspect big.session | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except (OSError, ValueError) as exc:
        if debug:
            raise
        code = 1
        msg = str(exc)
    except MemoryError:
        code = 1
        msg = "out of memory"
    except KeyboardInterrupt:
        sys.stderr.write(f"\npymem {args.command}: interrupted\n")
        return 130
    if args.command == "diff":
        code = 2
    sys.stderr.write(f"pymem {args.command}: error: {msg}\n")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
