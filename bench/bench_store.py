"""pymem.store benchmark: time to first token with and without the store, restore throughput of
pymem's own part (fetch + assemble) against memcpy, and bytes stored per token against llama.cpp's
own state across prompts that share a system prompt.

    python bench/bench_store.py [--url memory://] [--n-prompt 2048] [--width 1024] [--layers 4]
                                [--reps 3] [--quick]

The model is a random-weight llama (``--layers`` layers of width ``--width``, 16 heads, 4 KV heads,
F16 cache) generated like pymem's tiny test models and cached in pymem's cache folder.
Everything runs in-process on the llama-cpp-py-sync wheel (b11739).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

import pymem
import pymem.store
from pymem.store import keys as K


def _tiny() -> Any:
    from pymem._oracle import tinymodels

    return tinymodels


def _capi() -> Any:
    from pymem._oracle import capi

    return capi


def bench_spec(width: int, layers: int) -> str:
    """Register the benchmark model's tiny-model spec; returns its name."""
    tm = _tiny()
    name = f"bench_llama_w{width}_l{layers}"
    if name not in tm.SPECS:
        heads, heads_kv = 16, 4
        kv = tm._common(n_embd=width, n_layer=layers, n_ff=width * 2, n_head=heads, n_head_kv=heads_kv)
        lay = tm._layout("llama", "kv", layers, width, [heads] * layers, [heads_kv] * layers)
        tm.SPECS[name] = tm.TinySpec(name, "llama", tuple(kv), lay, "store benchmark model")
    return name


def bench_model(width: int, layers: int) -> str:
    name = bench_spec(width, layers)
    return _tiny().ensure_models([name])[name]


def med(f: Callable[[], Any], reps: int, setup: Callable[[], Any] = lambda: None) -> float:
    ts = []
    for _ in range(reps):
        setup()
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="store URL (default: a fresh memory:// store)")
    ap.add_argument("--n-prompt", type=int, default=2048)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block", type=int, default=256, help="block_tokens")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.n_prompt, a.width, a.layers, a.reps, a.block = 256, 128, 2, 1, 32
    capi = _capi()
    path = bench_model(a.width, a.layers)
    N, B = a.n_prompt, a.block
    rng = np.random.default_rng(0)
    n_vocab = _tiny().N_VOCAB
    P = rng.integers(1, n_vocab - 1, N).tolist()
    url = a.url or f"memory://bench-{os.getpid()}"
    model = capi.Model(path)
    cp = dict(n_ctx=N + 512, n_batch=N + 512, n_ubatch=512, n_seq_max=1, kv_unified=True, flash_attn=False,
              n_threads=a.threads)
    print(f"model: llama, {a.layers} layers, width {a.width}, 16 heads / 4 KV heads, F16 cache, V transposed; "
          f"prompt {N} tokens; {a.threads} threads; store {url}; block_tokens {B}")

    # --- 1. time to first token -----------------------------------------------------------------
    def fresh() -> Any:
        return capi.Context(model, **cp)

    ctxs: Dict[str, Any] = {}

    def full_decode() -> None:
        c = ctxs["c"]
        assert c.decode_seq(0, P, 0, logits=[False] * (N - 1) + [True]) == 0
        assert c.logits(-1) is not None

    def setup() -> None:
        old = ctxs.pop("c", None)
        if old is not None:
            old.close()
        ctxs["c"] = fresh()

    t_full = med(full_decode, a.reps, setup)
    st = pymem.store.open(url, block_tokens=B)
    c0 = fresh()
    r = st.prefill(c0, P)
    assert r.n_restored == 0
    ref_logits = c0.logits(-1)

    res: Dict[str, Any] = {}

    def with_store(tokens: List[int]) -> Callable[[], None]:
        def run() -> None:
            res["r"] = st.prefill(ctxs["c"], tokens)
            res["logits"] = ctxs["c"].logits(-1)
        return run

    def one_token() -> None:
        assert ctxs["c"].decode_seq(0, P[:1], 0) == 0

    t_one = med(one_token, a.reps, setup)
    t_hit = med(with_store(P), a.reps, setup)
    assert res["r"].n_restored == N - 1, res["r"]
    diff = float(np.max(np.abs(res["logits"] - ref_logits)) / np.max(np.abs(ref_logits)))
    new = min(256, N // 4) // B * B or B
    qs = [P[:N - new] + rng.integers(1, n_vocab - 1, new).tolist() for _ in range(a.reps)]

    def partial() -> None:
        res["r"] = st.prefill(ctxs["c"], qs.pop())
        assert res["r"].n_restored == N - new, res["r"]

    t_part = med(partial, a.reps, setup)
    print("\n## time to first token (median of %d)" % a.reps)
    print(f"decode the whole prompt ({N} tokens)            {t_full * 1e3:9.1f} ms")
    print(f"store, same prompt ({N - 1} restored + 1 decoded)  {t_hit * 1e3:9.1f} ms   speedup x{t_full / t_hit:.1f}")
    print(f"store, {N - new} restored + {new} new decoded          {t_part * 1e3:9.1f} ms   speedup x{t_full / t_part:.1f}")
    print(f"(llama.cpp's first decode of one token in a fresh context: {t_one * 1e3:.1f} ms)")
    print(f"next-token logits after a full hit vs full decode: max rel diff {diff:.3g}")

    # --- 2. restore throughput of pymem's part --------------------------------------------------
    c = ctxs["c"]
    ctx = st._ctx(c, None)
    toks = K.tokens_array(P)
    n = N
    out: Dict[str, Any] = {}

    def fetch_assemble() -> None:
        p = st._plan(ctx, toks, n)
        assert p.n == n
        out["sec"] = st._assemble(ctx, toks, p, 0)

    fetch_assemble()
    st._buf = bytearray(out["sec"])           # the store reuses its assembly buffer the same way
    reps = max(9, a.reps * 3)
    t_fa = med(fetch_assemble, reps)
    nbytes = len(out["sec"])
    blob = bytes(out["sec"])
    src = np.frombuffer(blob, np.uint8)
    dst = np.empty_like(src)
    t_cp = med(lambda: np.copyto(dst, src), reps)
    import xxhash
    t_xx = med(lambda: xxhash.xxh3_128(blob).digest(), reps)
    c2 = fresh()
    t_set = med(lambda: c2.state_seq_set(blob, 0), reps)
    t_val = med(lambda: (ctx.target.mem.state_read(blob, seq_id=0, envelope="llama"),
                         ctx.target.mem.clear(data=False)), reps)
    t_rest = med(lambda: st.restore(c2, P, 0), reps)
    assert st.restore(c2, P, 0) == n
    gb = lambda t: nbytes / t / 1e9  # noqa: E731
    print(f"\n## restore of {n} tokens: {nbytes / 1e6:.2f} MB of per-sequence state (median)")
    print(f"memcpy of the same bytes (numpy copyto)          {t_cp * 1e3:8.2f} ms  {gb(t_cp):6.2f} GB/s")
    kind = url.split("://")[0] if "://" in url else "embedded"
    print(f"pymem lookup + fetch + assemble ({kind:8s})     {t_fa * 1e3:8.2f} ms  {gb(t_fa):6.2f} GB/s"
          f"  = {t_cp / t_fa * 100:.0f}% of memcpy")
    print(f"  of which XXH3-128 checksums of the values       {t_xx * 1e3:8.2f} ms  {gb(t_xx):6.2f} GB/s")
    print(f"pymem validation (state_read into an empty memory) {t_val * 1e3:8.2f} ms  {gb(t_val):6.2f} GB/s")
    print(f"llama_state_seq_set_data                         {t_set * 1e3:8.2f} ms  {gb(t_set):6.2f} GB/s")
    print(f"whole Store.restore (plan, fetch, assemble, validate, save, set) {t_rest * 1e3:8.2f} ms")

    # --- 3. bytes per token with 16 prompts sharing a system prompt ----------------------------
    n_sys, n_user = (N * 3) // 4, N // 4
    system = rng.integers(1, n_vocab - 1, n_sys).tolist()
    st2 = pymem.store.open(f"memory://bench-dedup-{os.getpid()}", block_tokens=B)
    llama_bytes = 0
    for i in range(16):   # prefill: the system prompt is restored, only the user part is decoded
        prompt = system + rng.integers(1, n_vocab - 1, n_user).tolist()
        c = fresh()
        st2.prefill(c, prompt, 0)
        llama_bytes += len(c.state_seq_get(0))
        c.close()
    s = st2.stats()
    tok = 16 * (n_sys + n_user)
    print(f"\n## 16 prompts of {n_sys + n_user} tokens sharing a {n_sys}-token system prompt")
    print(f"llama.cpp per-sequence states   {llama_bytes / 1e6:9.2f} MB  {llama_bytes / tok:8.1f} B/token")
    print(f"store ({s['entries']} entries)           {s['bytes'] / 1e6:9.2f} MB  {s['bytes'] / tok:8.1f} B/token"
          f"  = {s['bytes'] / llama_bytes:.3f} of llama.cpp (x{llama_bytes / s['bytes']:.1f} smaller)")
    st.close()
    st2.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
