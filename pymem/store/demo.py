"""The prompt-cache round of ``pymem demo``: for one tiny model of each memory kind, a first process
runs ``Store.prefill`` on a prompt P into an embedded store; a second, new process prefills P + more
tokens from the same store, and compares the next-token logits with a context that decoded
everything itself.  Uses only public names (``pymem.store``, ``pymem.llama.llama_cpp``).

``python -m pymem.store.demo`` runs it alone with the tiny models of pymem's cache folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Tuple

__all__ = ["run", "KIND_MODELS"]

KIND_MODELS = {"kv": "llama", "iswa": "gemma2", "recurrent": "mamba", "hybrid": "jamba",
               "hybrid_iswa": "lfm2_swa"}
_B = 16


def _prompt(seed: int, n: int) -> List[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(1, 127, n).tolist()


def _llm(path: str) -> Any:
    from pymem.llama import llama_cpp

    return llama_cpp().Llama(path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)


def _logits(llm: Any) -> Any:
    """Next-token logits; for a model whose Llama context keeps none (the Llama class always enables
    embeddings, and the tiny LFM2 then outputs only those), the last token's output embedding."""
    import numpy as np

    from .errors import StoreError
    from .targets import last_logits

    try:
        return last_logits(llm)
    except StoreError:
        lib, ffi = llm._lib, llm._ffi
        p = lib.llama_get_embeddings_ith(llm._ctx, -1)
        if p == ffi.NULL:
            raise
        n = int(lib.llama_model_n_embd(lib.llama_get_model(llm._ctx)))
        return np.frombuffer(ffi.buffer(p, 4 * n), dtype=np.float32).copy()


def _child(stage: str, args_json: str) -> int:
    import numpy as np

    import pymem.store

    a = json.loads(args_json)  # the arguments, as JSON on the command line
    out: Dict[str, Any] = {}
    for kind, path in a["models"].items():
        P = _prompt(1, 3 * _B + 5)
        more = _prompt(2, 9)
        with pymem.store.open(a["store"], block_tokens=_B) as st:
            llm = _llm(path)
            if stage == "put":
                r = st.prefill(llm, P)
                out[kind] = {"n_restored": r.n_restored, "n_decoded": r.n_decoded, "bytes": r.bytes_added}
            else:
                r = st.prefill(llm, P + more)
                got = _logits(llm)
                ref_llm = _llm(path)
                with pymem.store.open("memory://", block_tokens=_B) as empty:
                    empty.prefill(ref_llm, P + more)
                ref = _logits(ref_llm)
                diff = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
                out[kind] = {"n_restored": r.n_restored, "n_decoded": r.n_decoded, "want": len(P),
                             "diff": diff, "reason": r.reason}
            llm.close()
    print(json.dumps(out))  # the last line of stdout is the answer
    return 0


def run(paths: Dict[str, str], store: str = "") -> Tuple[List[tuple], int]:
    """Rows ``(label, what, bytes, status)`` for ``pymem demo`` and the number of failures.
    ``paths`` maps tiny-model names to GGUF files (models missing from it are skipped)."""
    models = {k: paths[n] for k, n in KIND_MODELS.items() if n in paths}
    rows: List[tuple] = []
    with tempfile.TemporaryDirectory(prefix="pymem-store-demo-") as tmp:
        url = store or os.path.join(tmp, "prompt-cache")
        from .backends import open_backend
        from .errors import StoreError

        try:
            open_backend(url).close()
        except StoreError as exc:  # a build without the embedded backend: nothing to show
            return [("prompt cache", "open the embedded store", 0, f"skipped: {exc}")], 0
        res = {}
        for stage in ("put", "restore"):
            args = json.dumps({"models": models, "store": url})
            p = subprocess.run([sys.executable, "-m", "pymem.store.demo", "--child", stage, args],
                               capture_output=True, text=True, cwd=tmp, timeout=600)
            if p.returncode != 0:
                tail = (p.stderr.strip().splitlines() or ["?"])[-1][:120]
                return [("prompt cache", f"{stage} in a new process", 0, f"MISMATCH: {tail}")], 1
            res[stage] = json.loads(p.stdout.strip().splitlines()[-1])
    failures = 0
    for kind, path in models.items():
        name = KIND_MODELS[kind]
        put, got = res["put"][kind], res["restore"][kind]
        ok = got["n_restored"] == got["want"] and got["diff"] <= 1e-4
        failures += not ok
        rows.append((f"{name} ({kind})", "prefill P, store", put["bytes"],
                     f"ok: {put['n_decoded']} tokens decoded, {put['bytes']} bytes stored"))
        rows.append((f"{name} ({kind})", "new process: prefill P + 9", put["bytes"],
                     ("ok" if ok else "MISMATCH") + f": {got['n_restored']}/{got['want']} tokens restored, "
                     f"{got['n_decoded']} decoded, next-token logits max rel diff {got['diff']:.2g}"))
    return rows, failures


def main(argv: List[str]) -> int:
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[2])
    from pymem._oracle import tinymodels
    paths = tinymodels.ensure_models(list(KIND_MODELS.values()))
    rows, failures = run(paths)
    for r in rows:
        print(f"{r[0]:24} {r[1]:28} {r[3]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
