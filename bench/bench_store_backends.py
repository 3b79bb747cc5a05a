#!/usr/bin/env python3
"""Prompt-cache backend benchmark: put / get latency and throughput of the embedded FS backend
(fsync on and off) and of Redis (a real redis-server on loopback), for 64 KiB and 4 MiB values.

Every put stores a new key (put_if_absent of a fresh value); every get fetches one of them
(with the LRU touch, as the store does).  For each backend and value size the script prints the
median latency of put and get, the throughput at the median (value bytes / median latency), and
for reference the median of the same bytes written to a file with write + fsync + rename
(``raw file``) and copied in memory (``memcpy``).  Timings are ``time.perf_counter``; keys and
values are made before timing; the stores live in a temporary directory (``--dir``).

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


def _median_s(fn: Callable[[int], Any], n: int) -> float:
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _raw_file(d: str, data: bytes, n: int) -> float:
    def one(i: int) -> None:
        tmp = os.path.join(d, f".raw-{i}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(d, f"raw-{i}"))

    os.makedirs(d, exist_ok=True)
    return _median_s(one, n)


def _memcpy(data: bytes, n: int) -> float:
    import numpy as np

    src = np.frombuffer(data, dtype=np.uint8)
    dst = np.empty_like(src)
    return _median_s(lambda i: np.copyto(dst, src), max(n, 20))


def bench_backend(open_fn: Callable[[], Any], size: int, n: int, tag: str) -> Dict[str, float]:
    from pymem.store.backends import Entry

    values = [os.urandom(64) * (size // 64) for _ in range(min(n, 8))]
    keys = [f"{tag}{size:08x}{i:024x}" for i in range(n)]
    b = open_fn()
    try:
        put = _median_s(lambda i: b.put_if_absent(Entry(keys[i], 0, "block", 256, None), values[i % len(values)]), n)
        got = []
        get = _median_s(lambda i: got.append(len(b.get(keys[i]))), n)
        assert got == [size] * n, "a get returned the wrong size"
        b.delete(keys)
    finally:
        b.close()
    return {"put_s": put, "get_s": get}


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
    try:
        print(f"# pymem store backends: medians; {os.cpu_count()} cpus; dir {base}")
        print(f"{'backend':<12} {'value':>7} {'n':>4} {'put ms':>9} {'put MB/s':>9} {'get ms':>9} {'get MB/s':>9}")
        for size in sizes:
            n = args.n or ((5 if size > (1 << 20) else 20) if args.quick else (30 if size > (1 << 20) else 200))
            label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
            for name in names:
                r = bench_backend(openers[name], size, n, name.replace("-", "")[:4])
                row = {"backend": name, "size": size, "n": n, **r,
                       "put_MBps": size / r["put_s"] / 1e6, "get_MBps": size / r["get_s"] / 1e6}
                results.append(row)
                print(f"{name:<12} {label:>7} {n:>4} {r['put_s'] * 1e3:>9.3f} {row['put_MBps']:>9.1f} "
                      f"{r['get_s'] * 1e3:>9.3f} {row['get_MBps']:>9.1f}")
            raw = _raw_file(os.path.join(base, f"raw{size}"), os.urandom(size), n)
            mc = _memcpy(os.urandom(size), n)
            results.append({"backend": "raw file", "size": size, "n": n, "put_s": raw, "put_MBps": size / raw / 1e6})
            results.append({"backend": "memcpy", "size": size, "n": n, "get_s": mc, "get_MBps": size / mc / 1e6})
            print(f"{'raw file':<12} {label:>7} {n:>4} {raw * 1e3:>9.3f} {size / raw / 1e6:>9.1f} "
                  f"{'':>9} {'':>9}   (write + fsync + rename)")
            print(f"{'memcpy':<12} {label:>7} {n:>4} {'':>9} {'':>9} {mc * 1e3:>9.3f} {size / mc / 1e6:>9.1f}")
        if args.json:
            print(json.dumps(results, indent=1))
        print("# done")
    finally:
        if server is not None:
            server.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
