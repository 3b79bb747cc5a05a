"""``pymem demo --keep DIR``: leave real llama.cpp files to try pymem on.

Real llama.cpp (the ``llama-cpp-py-sync`` wheel, in the oracle worker) runs the tiny models and
saves every kind of file pymem reads, the way the llama.cpp tools write them:

=====================  ==========================================================================
``model.gguf``         the tiny llama model (a copy of ``llama.gguf``); ``<name>.gguf`` for the rest
``chat.session``       llama-cli's prompt cache: ``llama_state_save_file``, one sequence (0) at
                       positions 0..23 and its 24 tokens (``a.session`` is the same file)
``b.session``          the same prompt continued by 4 tokens
``slot0.bin``          llama-server's ``--slot-save-path`` file: ``llama_state_seq_save_file`` of
                       the slot's sequence and its tokens
``<name>.session``     a session of each memory kind (kv, iswa, recurrent, hybrid, hybrid_iswa)
                       with two sequences (1 is a fork of 0 plus 4 tokens)
``<name>.ctx.bin``     the raw whole-context blob ``llama_state_get_data`` (= llama-cpp-python's
                       ``Llama.save_state().llama_state``)
``<name>.seq1.bin``    the raw sequence blob ``llama_state_seq_get_data`` of sequence 1
=====================  ==========================================================================
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List

__all__ = ["KEEP_MODELS", "check_dir", "write"]

MARKER = ".pymem-demo-keep"

#: the models whose files --keep leaves, one per memory kind
KEEP_MODELS = ["llama", "gemma2", "mamba", "jamba", "lfm2_swa"]

PROMPT = [(7 * i + 3) % 128 for i in range(24)]
MORE = [(5 * i + 1) % 128 for i in range(4)]

_README = """\
Files left by `pymem demo --keep`: tiny random-weight models and what real llama.cpp
(b11739, the llama-cpp-py-sync wheel) saved with them.  Try:

  pymem inspect chat.session --model model.gguf
  pymem diff a.session b.session --model model.gguf
  pymem edit chat.session -m model.gguf --seq-rm 0:4:12 --seq-add 0:12::-8 -o shifted.session
  pymem inspect slot0.bin
  pymem inspect jamba.session --model jamba.gguf
  pymem inspect gemma2.ctx.bin --model gemma2.gguf
  pymem estimate model.gguf --ctx 4096

{table}
"""


def check_dir(out_dir: str) -> None:
    """Refuse a folder that holds other files (``model.gguf`` there might be a real model):
    --keep writes into a new or empty folder, or one an earlier --keep wrote."""
    from ._errors import InvalidArgumentError

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InvalidArgumentError(f"--keep {out_dir}: not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER)):
        raise InvalidArgumentError(f"--keep {out_dir}: the folder is not empty (the demo would write model.gguf, "
                                   "chat.session and more there); give a new or empty folder")


def write(w: Any, paths: Dict[str, str], out_dir: str) -> List[str]:
    """Write the files into ``out_dir`` (created if missing); returns their names."""
    check_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, MARKER), "w").close()
    made: List[str] = []

    def path(name: str) -> str:
        made.append(name)
        return os.path.join(out_dir, name)

    for name in KEEP_MODELS:
        shutil.copyfile(paths[name], path(f"{name}.gguf"))
    shutil.copyfile(paths["llama"], path("model.gguf"))
    kw = dict(n_ctx=256, n_seq_max=4, kv_unified=True, swa_full=True)

    # llama-cli: one sequence, the prompt's tokens, llama_context_default_params() otherwise
    c = w.context(paths["llama"], n_ctx=256)
    try:
        assert c.decode([(t, i, [0]) for i, t in enumerate(PROMPT)]) == 0
        assert c.state_save_file(path("chat.session"), PROMPT)
        shutil.copyfile(os.path.join(out_dir, "chat.session"), path("a.session"))
        assert c.decode([(t, len(PROMPT) + i, [0]) for i, t in enumerate(MORE)]) == 0
        assert c.state_save_file(path("b.session"), PROMPT + MORE)
    finally:
        c.close()
    # llama-server: the slot's sequence (slot 0 = sequence 0) and its tokens
    c = w.context(paths["llama"], n_ctx=256)
    try:
        assert c.decode([(t, i, [0]) for i, t in enumerate(PROMPT)]) == 0
        assert c.state_seq_save_file(path("slot0.bin"), 0, PROMPT) > 0
    finally:
        c.close()
    # one session and two raw blobs per memory kind
    for name in KEEP_MODELS:
        c = w.context(paths[name], **kw)
        try:
            assert c.decode([(t, i, [0]) for i, t in enumerate(PROMPT[:16])]) == 0
            c.seq_cp(0, 1)
            assert c.decode([(t, 16 + i, [1]) for i, t in enumerate(MORE)]) == 0
            assert c.state_save_file(path(f"{name}.session"), PROMPT[:16])
            with open(path(f"{name}.ctx.bin"), "wb") as f:
                f.write(c.state_get())
            with open(path(f"{name}.seq1.bin"), "wb") as f:
                f.write(c.state_seq_get(1))
        finally:
            c.close()
    doc = __doc__ or ""
    table = doc[doc.index("====="):].rstrip()
    with open(path("README.txt"), "w") as f:
        f.write(_README.format(table=table))
    return made
