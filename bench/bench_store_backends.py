#!/usr/bin/env python3
"""Prompt-cache backend benchmark: put / get latency and throughput of the embedded FS backend
(fsync on and off) and of Redis (a real redis-server on loopback), for 64 KiB and 4 MiB values.

Every put stores a new key (put_if_absent of a fresh value); every get fetches one of them
(with the LRU touch, as the store does).  For each backend and value size the script prints the
median latency of put and get, the throughput at the median (value bytes / median latency), and
for reference the median of the same bytes written to a file with write + fsync + rename
(``raw file``) and copied in memory (``memcpy``).  Timings are ``time.perf_counter``; keys and
values are made before timing; all backends and the references are timed interleaved (rotating
which goes first) so machine load hits them alike; the stores live in a temporary directory.

Usage: python bench/bench_store_backends.py [--quick] [--n N] [--backends fs,fs-nofsync,redis]
                                            [--redis URL] [--dir DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interleaved(fns: Dict[str, Callable[[int], Any]], n: int) -> Dict[str, float]:
    """Median seconds of each fn(i), i = 0..n-1, the fns interleaved (rotating which goes first)
    so that the shared machine's load and the disk's state hit all of them alike."""
    names = list(fns)
    ts: Dict[str, List[float]] = {k: [] for k in names}
    for i in range(n):
        r = i % len(names)
        for name in names[r:] + names[:r]:
            t = time.perf_counter()
            fns[name](i)
            ts[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def _raw_file(d: str, data: bytes) -> Callable[[int], None]:
    """write + fsync + rename of ``data`` to a new file: the floor of an atomic durable put."""
    os.makedirs(d, exist_ok=True)

    def one(i: int) -> None:
        tmp = os.path.join(d, f".raw-{i}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(d, f"raw-{i}"))

    return one


def _memcpy(data: bytes) -> Callable[[int], None]:
    import numpy as np

    src = np.frombuffer(data, dtype=np.uint8)
    dst = np.empty_like(src)
    return lambda i: np.copyto(dst, src)


def bench_size(backends: Dict[str, Any], size: int, n: int, base: str) -> Dict[str, Dict[str, float]]:
    """put and get medians of every backend for ``size``-byte values, interleaved with the raw
    file floor (puts) and memcpy (gets)."""
    from pymem.store.backends import Entry

    values = [os.urandom(64) * (size // 64) for _ in range(min(n, 8))]
    keys = {name: [f"{name.replace('-', '')[:4]}{size:08x}{i:024x}" for i in range(n)] for name in backends}

    def putter(name: str) -> Callable[[int], Any]:
        b = backends[name]
        return lambda i: b.put_if_absent(Entry(keys[name][i], 0, "block", 256, None), values[i % len(values)])

    def getter(name: str) -> Callable[[int], Any]:
        b = backends[name]

        def one(i: int) -> None:
            v = b.get(keys[name][i])
            assert v is not None and len(v) == size, "a get returned the wrong value"
        return one

    puts = _interleaved({**{k: putter(k) for k in backends},
                         "raw file": _raw_file(os.path.join(base, f"raw{size}"), values[0])}, n)
    gets = _interleaved({**{k: getter(k) for k in backends}, "memcpy": _memcpy(values[0])}, n)
    for name, b in backends.items():
        b.delete(keys[name])
    return {"put": puts, "get": gets}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    ap.add_argument("--n", type=int, default=0, help="operations per measurement (default 200 / 30 for 4 MiB)")
    ap.add_argument("--backends", default="fs,fs-nofsync,redis")
    ap.add_argument("--redis", help="use this Redis URL instead of starting redis-server")
    ap.add_argument("--dir", help="directory for the embedded stores (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pymem.store.backends import open_backend

    sizes = [64 << 10, 4 << 20]
    names = [s for s in args.backends.split(",") if s]
    base = tempfile.mkdtemp(prefix="pymem-bench-store-", dir=args.dir)
    server = None
    redis_url = args.redis
    if "redis" in names and not redis_url:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from redis_server import RedisServer, find_redis_server

        if find_redis_server():
            server = RedisServer().start()
            redis_url = server.url
        else:
            print("# redis-server not found: skipping redis")
            names.remove("redis")
    openers = {
        "fs": lambda: open_backend(os.path.join(base, "fs")),
        "fs-nofsync": lambda: open_backend(os.path.join(base, "fsn"), fsync=False),
        "redis": lambda: open_backend(redis_url, prefix="bench:"),
    }
    results: List[Dict[str, Any]] = []
    backends = {name: openers[name]() for name in names}
    try:
        print(f"# pymem store backends: medians, interleaved; {os.cpu_count()} cpus; dir {base}")
        print(f"{'backend':<12} {'value':>7} {'n':>4} {'put ms':>9} {'put MB/s':>9} {'get ms':>9} {'get MB/s':>9}")
        for size in sizes:
            n = args.n or ((5 if size > (1 << 20) else 20) if args.quick else (30 if size > (1 << 20) else 200))
            label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
            r = bench_size(backends, size, n, base)
            for name in [*names, "raw file", "memcpy"]:
                p, g = r["put"].get(name), r["get"].get(name)
                row = {"backend": name, "size": size, "n": n, "put_s": p, "get_s": g,
                       "put_MBps": p and size / p / 1e6, "get_MBps": g and size / g / 1e6}
                results.append(row)
                cols = [f"{p * 1e3:>9.3f} {size / p / 1e6:>9.1f}" if p else f"{'':>9} {'':>9}",
                        f"{g * 1e3:>9.3f} {size / g / 1e6:>9.1f}" if g else f"{'':>9} {'':>9}"]
                note = {"raw file": "   (write + fsync + rename, no index)", "memcpy": "   (numpy copyto)"}
                print(f"{name:<12} {label:>7} {n:>4} {cols[0]} {cols[1]}{note.get(name, '')}")
            raw = r["put"]["raw file"]
            print("# put / raw file: " + ", ".join(f"{k} {r['put'][k] / raw:.2f}x" for k in names))
        if args.json:
            print(json.dumps(results, indent=1))
        print("# done")
    finally:
        for b in backends.values():
            b.close()
        if server is not None:
            server.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
