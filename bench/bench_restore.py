"""pymem's own part of a store restore, against memcpy, without llama.cpp in the loop.

    python bench/bench_restore.py [--tokens 2048,8192] [--reps 31] [--redis]

1. fetch + assemble (lookup plan, reading every block value, checksums, the assembled
   ``llama_state_seq_set_data`` blob) of a stored prompt, for the in-process and the embedded
   backend (and Redis with --redis, when redis-server is installed), as a fraction of a numpy
   memcpy of the same bytes;
2. the checkpoint search of a long prompt on a recurrent model (one stored checkpoint near the
   start: the worst case, every candidate token count is looked up);
3. ``state_read`` / ``state_write_into`` of a unified 65,536-cell, 64-sequence cache (whole and
   one sequence) against memcpy.

The memories are pymem's own (``from_gguf`` of a metadata-only GGUF of bench_store's model: 4
layers of width 1024, 4 KV heads of 64, F16, V transposed; no llama.cpp needed), so the cache
contents are zeros; the store does not look at them.  Medians; ratios are memcpy time / pymem time (1.0 = memcpy speed).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, List

import numpy as np

import pymem
import pymem.store
from pymem.store import keys as K

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_store import bench_spec  # noqa: E402


def meta_model(name: str, folder: str) -> str:
    """A metadata-only GGUF of a tiny-model spec (hyper-parameters, no tensors: no llama.cpp)."""
    from pymem._oracle import tinymodels

    path = os.path.join(folder, name + ".gguf")
    if not os.path.exists(path):
        tinymodels.write_metadata_gguf(path, tinymodels.spec(name))
    return path


def med(f: Callable[[], Any], reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def memcpy_time(n: int, reps: int) -> float:
    src = np.frombuffer(os.urandom(n), np.uint8)
    dst = np.empty_like(src)
    return med(lambda: np.copyto(dst, src), reps)


class Redis:
    """A throw-away redis-server on a free loopback port (None when it is not installed)."""

    def __enter__(self) -> Any:
        exe = shutil.which("redis-server")
        self.proc = None
        if exe is None:
            return None
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.proc = subprocess.Popen([exe, "--port", str(port), "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return f"redis://127.0.0.1:{port}/0"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def fetch_assemble(urls: List[str], tokens: List[int], reps: int, folder: str) -> None:
    path = meta_model(bench_spec(1024, 4), folder)
    print("## 1. fetch + assemble of a stored prompt (4 layers x 1024, F16, V transposed; median)")
    print(f"{'tokens':>7} {'MB':>7} {'backend':10} {'pymem ms':>9} {'memcpy ms':>10} {'ratio':>6}")
    for n in tokens:
        mem = pymem.from_gguf(path, n + 256, n_seq_max=1)
        P = np.random.default_rng(n).integers(1, 200, n).tolist()
        mem.decode(pymem.Batch(tokens=P, pos=list(range(n)), seq_ids=[[0]] * n), n_ubatch=512)
        for url in urls:
            with pymem.store.open(url, block_tokens=256) as st:
                st.put(mem, P, 0)
                ctx = st._ctx(mem, None)
                toks = K.tokens_array(P)
                out: dict = {}

                def run() -> None:
                    p = st._plan(ctx, toks, n)
                    assert p.n == n
                    out["sec"] = st._assemble(ctx, toks, p, 0)

                run()
                st._buf = bytearray(out["sec"])      # reused across restores, as restore() does
                t = med(run, reps)
                nb = len(out["sec"])
                c = memcpy_time(nb, reps)
                kind = url.split("://")[0] if "://" in url else "embedded"
                print(f"{n:7d} {nb / 1e6:7.2f} {kind:10} {t * 1e3:9.3f} {c * 1e3:10.3f} {c / t:6.2f}")
                if kind == "embedded":
                    floor(st, [K.Chain(ctx.seed, 256, toks).block(i).hex() for i in range(n // 256)], c, reps)
        mem.close()


def floor(st: Any, keys: List[str], c: float, reps: int) -> None:
    """What any verified read of these block values costs, without pymem: the kernel's copy of
    the value files from the page cache (open + preadv + close, into one reused buffer) and one
    XXH3-128 pass over the bytes."""
    import xxhash

    paths = [st.backend._value_path(k) for k in keys]
    size = sum(os.path.getsize(p) for p in paths)
    buf = memoryview(bytearray(size))

    def read() -> None:
        o = 0
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            o += os.preadv(fd, [buf[o:]], 0)
            os.close(fd)

    def hash_() -> None:
        xxhash.xxh3_128_digest(buf)

    r, h = med(read, reps), med(hash_, reps)
    print(f"{'':7} {size / 1e6:7.2f} {'(floor)':10} {r * 1e3:9.3f} {'':10} {c / r:6.2f}  page-cache read of the block files alone")
    print(f"{'':7} {'':7} {'(floor)':10} {(r + h) * 1e3:9.3f} {'':10} {c / (r + h):6.2f}  + one XXH3-128 pass: "
          f"the most a verified read from the embedded store can reach")


def ckpt_search(urls: List[str], n: int, reps: int, folder: str) -> None:
    path = meta_model("mamba", folder)
    mem = pymem.from_gguf(path, 16, n_seq_max=1)
    P = np.random.default_rng(1).integers(1, 100, n).tolist()
    mem.decode(pymem.Batch(tokens=P[:300], pos=list(range(300)), seq_ids=[[0]] * 300))
    print(f"\n## 2. lookup of a {n}-token prompt, recurrent (mamba), one checkpoint at 300 tokens (median)")
    for url in urls:
        with pymem.store.open(url, block_tokens=256) as st:
            st.put(mem, P[:300], 0)
            assert st.lookup(P, mem).n_tokens == 300
            t = med(lambda: st.lookup(P, mem), max(3, reps // 6))
            kind = url.split("://")[0] if "://" in url else "embedded"
            print(f"{kind:10} {t * 1e3:8.1f} ms")
    mem.close()


def state_io(reps: int) -> None:
    from bench_kv import FULL, make_pymem

    cfg = FULL["a"]
    pm = make_pymem(cfg, None)
    per = cfg.per_stream // cfg.n_seq
    for s in range(cfg.n_seq):
        pm.decode(pymem.Batch(tokens=[1] * per, pos=list(range(per)), seq_ids=[[s]] * per), n_ubatch=per)
    s = 5
    sblob, whole = pm.state_write(s, envelope="llama"), pm.state_write(envelope="llama")
    pbuf, wbuf = bytearray(len(sblob)), bytearray(len(whole))
    print(f"\n## 3. state I/O of a {cfg.label} cache (median; ratio = memcpy / pymem)")
    for name, blob, f in (("state_read (whole)", whole, lambda: pm.state_read(whole, envelope="llama")),
                          ("state_write_into (whole)", whole, lambda: pm.state_write_into(wbuf, envelope="llama")),
                          ("state_read (seq)", sblob, lambda: pm.state_read(sblob, s, envelope="llama")),
                          ("state_write_into (seq)", sblob, lambda: pm.state_write_into(pbuf, s, envelope="llama"))):
        r = reps if len(blob) < 1 << 20 else max(5, reps // 3)
        t, c = med(f, r), memcpy_time(len(blob), r)
        print(f"{name:26} {len(blob) / 1e6:7.2f} MB {t * 1e3:8.3f} ms  memcpy {c * 1e3:7.3f} ms  {c / t:5.2f}")
    pm.close()


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="2048,8192", help="prompt lengths for part 1")
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--redis", action="store_true", help="also a throw-away redis-server")
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    a = ap.parse_args(argv)
    tokens = [int(x) for x in a.tokens.split(",")]
    if a.quick:
        tokens, a.reps = [512], 3
    with tempfile.TemporaryDirectory() as d, (Redis() if a.redis else contextlib.nullcontext()) as redis_url:
        urls = [f"memory://bench-restore-{os.getpid()}", os.path.join(d, "store")]
        if redis_url:
            urls.append(redis_url)
        fetch_assemble(urls, tokens, a.reps, d)
        ckpt_search(urls, 1024 if a.quick else 8192, a.reps, d)   # (another model: other keys)
        if not a.quick:
            state_io(a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
