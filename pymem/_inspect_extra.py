"""The additions to ``pymem inspect``: the occupancy picture by position (terminal), ``--html``
/ ``--png`` files of it, and the tokens as text when ``--model`` has a vocabulary."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict


def add_args(p: argparse.ArgumentParser) -> None:
    from ._cliargs import out_file

    p.add_argument("--html", metavar="OUT.html", type=out_file, help="write the cell-occupancy picture as an HTML page")
    p.add_argument("--png", metavar="OUT.png", type=out_file, help="write the cell-occupancy picture as a PNG (needs matplotlib: "
                                                    "pip install 'pymem[plot]')")


def json_extra(args: argparse.Namespace, obj: Any) -> Dict[str, Any]:
    """``occupancy`` (per stream: cells, highest position, each sequence's position ranges,
    holes) and, with a model that has a vocabulary, ``tokens_text``."""
    from . import picture

    d: Dict[str, Any] = {"occupancy": [
        {"where": o.label, "cells": o.n_cells, "pos_max": o.pos_max, "holes": o.n_holes,
         "hole_ranges": o.hole_ranges() if o.n_holes else None,
         "sequences": {str(q): o.ranges(q) for q in o.held}} for o in picture.occupancy(obj)]}
    if getattr(obj, "tokens", None) and args.model:
        from .state import vocab

        txt = vocab.tokens_text(args.model, obj.tokens, limit=1 << 20)
        if txt is not None:
            d["tokens_text"] = txt
    return d


def finish(args: argparse.Namespace, obj: Any) -> None:
    from . import picture

    title = f"{os.path.basename(args.file)}: cell occupancy by position"
    if not args.json:
        if getattr(obj, "tokens", None) and args.model:
            from .state import vocab

            txt = vocab.tokens_text(args.model, obj.tokens, limit=max(40, 2 * (args.width or 64)))
            if txt is not None:
                print(f"  tokens as text: {txt}")
        if args.cells is not False:
            pic = picture.text(obj, width=args.width if args.width and args.width > 0 else 64)
            if pic:
                print("  occupancy by position:")
                print(pic)
    if args.html:
        picture.write_html(obj, args.html, title)
        sys.stderr.write(f"wrote {args.html}\n")
    if args.png:
        picture.write_png(obj, args.png, title)
        sys.stderr.write(f"wrote {args.png}\n")
