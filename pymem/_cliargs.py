"""Argument types of the ``pymem`` command line that give clean errors: non-negative counts,
cache types (listing the valid ones), and option values that start with '-'."""
from __future__ import annotations

import argparse
from typing import List, Sequence

__all__ = ["count", "positive", "cache_type", "out_file", "CACHE_TYPES", "join_negative_values", "size"]

#: the cache types llama.cpp accepts for --cache-type-k / --cache-type-v (and pymem implements)
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def _int(text: str) -> int:
    try:
        return int(text.strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def count(text: str) -> int:
    """An integer >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative (give 0 or more)")
    return v


def positive(text: str) -> int:
    """An integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return v


def cache_type(text: str) -> str:
    t = text.strip().lower()
    if t not in CACHE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown cache type {text!r}; valid: {', '.join(CACHE_TYPES)}")
    return t


def join_negative_values(argv: Sequence[str], options: Sequence[str]) -> List[str]:
    """``--budget -1GB`` -> ``--budget=-1GB`` so that argparse hands the value to its type
    (which then says what is wrong) instead of taking it for an unknown option."""
    out: List[str] = []
    it = list(argv)
    i = 0
    while i < len(it):
        a = it[i]
        if a in options and i + 1 < len(it) and it[i + 1].startswith("-") and len(it[i + 1]) > 1 \
                and (it[i + 1][1].isdigit() or it[i + 1][1] == "."):
            out.append(f"{a}={it[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def out_file(text: str) -> str:
    """An output file name whose folder exists (checked before any work is done)."""
    import os

    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    d = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(d):
        raise argparse.ArgumentTypeError(f"{text}: the folder {d} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    return text


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """A byte size: a number >= 0 with an optional unit (B, KB ... TB, KiB ... TiB), below 2^64;
    ValueError naming what is wrong."""
    t = text.strip().lower().replace("_", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 8GiB, 512MB, 1e9)") from None
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if not value * _UNITS[unit] < 2 ** 64:  # also inf and nan
        raise ValueError(f"{text!r} is not a size below 2^64 bytes")
    return int(value * _UNITS[unit])


def size(text: str) -> int:
    """:func:`parse_size` as an argparse type."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None