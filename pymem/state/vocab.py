"""Token ids as text, from the vocabulary of a GGUF model (``tokenizer.ggml.tokens``), for
``pymem inspect --model``.  A plain join of the pieces with the usual markers undone
(SentencePiece ``▁``, GPT-2 byte-level ``Ġ`` / ``Ċ``, ``<0xNN>`` byte tokens): enough to recognise
a prompt, not a full detokenizer."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["vocabulary", "tokens_text"]

_CACHE: Dict[Tuple[str, int, int], Optional[List[str]]] = {}
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def vocabulary(model: Any) -> Optional[List[str]]:
    """The token pieces of a GGUF model, or None when it has none (or cannot be read)."""
    try:
        st = os.stat(model)
        key = (os.path.realpath(model), st.st_size, st.st_mtime_ns)
    except (OSError, TypeError, ValueError):
        return None
    if key in _CACHE:
        return _CACHE[key]
    toks: Optional[List[str]] = None
    try:
        from gguf import GGUFReader

        f = GGUFReader(os.fspath(model)).fields.get("tokenizer.ggml.tokens")
        if f is not None:
            toks = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
    except Exception:   # a model we cannot read has no vocabulary to show; inspect goes on
        toks = None
    if len(_CACHE) > 8:
        _CACHE.clear()
    _CACHE[key] = toks
    return toks


def _piece(p: str) -> bytes:
    m = _BYTE.fullmatch(p)
    if m:
        return bytes([int(m.group(1), 16)])
    return p.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n").encode()


def tokens_text(model: Any, tokens: Sequence[int], limit: int = 160) -> Optional[str]:
    """``tokens`` as a quoted string (its middle elided beyond ``limit`` characters), or None
    when the model has no vocabulary."""
    vocab = vocabulary(model)
    if not vocab:
        return None
    raw = b"".join(_piece(vocab[t]) if 0 <= t < len(vocab) else f"<?{t}>".encode() for t in tokens)
    s = raw.decode("utf-8", "replace")
    if len(s) > limit:
        half = max(1, limit // 2 - 2)
        s = s[:half] + " ... " + s[-half:]
    return repr(s)
