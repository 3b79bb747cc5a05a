"""The backend conformance suite: every prompt-cache backend (memory when present, the embedded
FS backend, Redis against a real redis-server) against the contract in pymem/store/backends/base.py,
plus threads and processes sharing a store, SIGKILL in the middle of puts, open_backend's URLs and
the Redis specifics (unreachable or vanishing servers, prefixes, foreign keys) against a real
redis-server.  The embedded backend's own tests are in test_store_fs.py."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Dict

import numpy as np
import pytest

import pymem
from pymem.store.backends import (
    BackendError,
    BackendUnavailableError,
    BackendURLError,
    Entry,
    open_backend,
)
from pymem.store.backends import fs as fs_mod
from pymem.store.backends import redis as redis_mod
from backend_helpers import ent, value_of
from redis_server import RedisServer, needs_redis_client, redis_server, redis_url  # noqa: F401

try:
    from pymem.store.backends.memory import MemoryBackend  # noqa: F401  (written by `store`)

    HAVE_MEMORY = True
except ImportError:
    HAVE_MEMORY = False


class Opener:
    """Opens (and reopens) one backend store; ``persistent``: a reopen sees the same data."""

    def __init__(self, name: str, url: str, persistent: bool) -> None:
        self.name, self.url, self.persistent = name, url, persistent
        self.opened = []

    def open(self, **opts):
        b = open_backend(self.url, **opts)
        self.opened.append(b)
        return b


@pytest.fixture(params=["memory", "fs", "redis"])
def opener(request, tmp_path):
    if request.param == "memory":
        if not HAVE_MEMORY:
            pytest.skip("pymem.store.backends.memory is not in this tree yet")
        op = Opener("memory", "memory://", False)
    elif request.param == "fs":
        op = Opener("fs", str(tmp_path / "store"), True)
    else:
        op = Opener("redis", request.getfixturevalue("redis_url"), True)
    yield op
    for b in op.opened:
        b.close()


@pytest.fixture
def backend(opener):
    return opener.open()


@pytest.fixture(params=["fs", "redis"])
def shared(request, tmp_path):
    """URL of a store several processes can open (embedded and Redis)."""
    if request.param == "fs":
        return str(tmp_path / "store")
    return request.getfixturevalue("redis_url")



# ---------------------------------------------------------------------------------------------
# the contract, every backend
# ---------------------------------------------------------------------------------------------
def test_put_get_entry_roundtrip(backend):
    v = value_of("a1", 70_000)
    before = time.time()
    assert backend.put_if_absent(ent("a1", n_tokens=256), v) is True
    assert backend.get("a1") == v
    e = backend.entry("a1")
    assert (e.key, e.size, e.kind, e.n_tokens, e.parent, e.pinned) == ("a1", len(v), "block", 256, None, False)
    assert before - 1 <= e.created <= time.time() + 1 and e.last_used >= e.created
    assert backend.put_if_absent(ent("b2", kind="ckpt", n_tokens=300, parent="a1"), b"ck") is True
    e2 = backend.entry("b2")
    assert (e2.kind, e2.n_tokens, e2.parent, e2.size) == ("ckpt", 300, "a1", 2)
    assert backend.put_if_absent(ent("c3", kind="tail", n_tokens=301, parent="b2"), b"") is True
    assert backend.get("c3") == b"" and backend.entry("c3").size == 0


def test_put_if_absent_never_overwrites(backend):
    assert backend.put_if_absent(ent("k", n_tokens=10), b"first") is True
    before = backend.entry("k")
    assert backend.put_if_absent(ent("k", kind="ckpt", n_tokens=99, parent="p", pinned=True), b"second!") is False
    assert backend.get("k", touch=False) == b"first"
    assert backend.entry("k") == before
    assert backend.total_bytes() == len(b"first")


def test_bytes_like_values(backend):
    assert backend.put_if_absent(ent("ba"), bytearray(b"abc")) is True
    assert backend.put_if_absent(ent("mv"), memoryview(b"xyzw")[1:]) is True
    assert backend.get("ba") == b"abc" and backend.get("mv") == b"yzw"
    assert isinstance(backend.get("ba"), bytes)


def test_absent_keys(backend):
    assert backend.get("nope") is None
    assert backend.get("nope", touch=False) is None
    assert backend.entry("nope") is None
    assert backend.delete(["nope"]) == 0
    assert list(backend.scan()) == []
    assert backend.total_bytes() == 0


def test_touch_refreshes_last_used(backend):
    assert backend.put_if_absent(ent("t", created=1000.0, last_used=1000.0), b"v")
    assert backend.entry("t").created == 1000.0 and backend.entry("t").last_used == 1000.0
    assert backend.get("t", touch=False) == b"v"
    assert backend.entry("t").last_used == 1000.0
    now = time.time()
    assert backend.get("t") == b"v"
    e = backend.entry("t")
    assert e.last_used >= now - 1 and e.created == 1000.0


def test_delete(backend):
    for k in ("d1", "d2", "d3"):
        assert backend.put_if_absent(ent(k), value_of(k, 1000))
    assert backend.delete(["d1", "d1", "nope", "d3"]) == 2
    assert backend.get("d1") is None and backend.entry("d3") is None
    assert [e.key for e in backend.scan()] == ["d2"]
    assert backend.total_bytes() == 1000
    assert backend.delete([]) == 0
    # a deleted key can be put again, with a new value
    assert backend.put_if_absent(ent("d1", n_tokens=7), b"new") is True
    assert backend.get("d1") == b"new" and backend.entry("d1").n_tokens == 7


def test_scan_every_entry_across_batches(backend, monkeypatch):
    monkeypatch.setattr(fs_mod, "_SCAN_CHUNK", 7)
    monkeypatch.setattr(redis_mod, "_BATCH", 5)
    want = {}
    for i in range(40):
        k = hashlib.sha1(str(i).encode()).hexdigest()
        assert backend.put_if_absent(ent(k, n_tokens=i, parent=None if i == 0 else "p"), value_of(k, i))
        want[k] = (i, i)
    got = {e.key: (e.size, e.n_tokens) for e in backend.scan()}
    assert got == want
    assert backend.total_bytes() == sum(range(40))


def test_scan_while_deleting(backend, monkeypatch):
    monkeypatch.setattr(fs_mod, "_SCAN_CHUNK", 3)
    monkeypatch.setattr(redis_mod, "_BATCH", 3)
    for i in range(20):
        backend.put_if_absent(ent(f"s{i:02d}"), b"x")
    seen = set()
    for e in backend.scan():  # deleting what was seen must not break the walk
        seen.add(e.key)
        backend.delete([e.key])
    assert seen == {f"s{i:02d}" for i in range(20)}
    assert list(backend.scan()) == [] and backend.total_bytes() == 0


def test_pinning(backend):
    backend.put_if_absent(ent("p1"), b"1")
    backend.put_if_absent(ent("p2", pinned=True), b"2")
    assert backend.entry("p2").pinned is True
    backend.set_pinned(["p1", "absent"])
    assert backend.entry("p1").pinned is True
    assert backend.entry("absent") is None and backend.get("absent") is None  # no entry created
    backend.set_pinned(["p1", "p2"], False)
    assert not backend.entry("p1").pinned and not backend.entry("p2").pinned
    assert backend.get("p1") == b"1"


def test_counters(backend):
    assert backend.counters() == {}
    assert backend.incr("hits") == 1
    assert backend.incr("hits", 41) == 42
    assert backend.incr("tokens_saved", 1000) == 1000
    assert backend.incr("tokens_saved", -1) == 999
    assert backend.counters() == {"hits": 42, "tokens_saved": 999}
    assert backend.incr("misses", 0) == 0


def test_total_bytes_matches_entries(backend):
    sizes = [0, 1, 4096, 65_536, 100_003]
    for i, s in enumerate(sizes):
        backend.put_if_absent(ent(f"z{i}"), value_of(str(i), s))
    assert backend.total_bytes() == sum(sizes) == sum(e.size for e in backend.scan())


def test_large_value(backend):
    v = value_of("big", 4 << 20)
    assert backend.put_if_absent(ent("big"), v)
    assert backend.get("big") == v


@pytest.fixture
def checked(shared):
    """A backend that validates keys and entries (they become file names / Redis keys)."""
    b = open_backend(shared)
    yield b
    b.close()


@pytest.mark.parametrize("bad", [3, None, b"ab", "", " a", "a\n", "x" * 257])
def test_bad_keys_raise_pymem_error(checked, bad):
    backend = checked
    with pytest.raises(pymem.Error):
        backend.put_if_absent(Entry(key=bad, size=0, kind="block", n_tokens=1, parent=None), b"v")
    with pytest.raises(pymem.Error):
        backend.get(bad)
    assert list(backend.scan()) == []


@pytest.mark.parametrize("bad", [dict(kind=""), dict(kind="Block"), dict(kind="a b"), dict(kind=None),
                                 dict(n_tokens=-1), dict(n_tokens=1.5), dict(n_tokens=True),
                                 dict(parent=""), dict(parent=7)])
def test_bad_entries_raise_pymem_error(checked, bad):
    backend = checked
    with pytest.raises(pymem.Error):
        backend.put_if_absent(ent("k", **bad), b"v")
    with pytest.raises(pymem.Error):
        backend.put_if_absent(ent("k"), "text is not bytes")
    with pytest.raises(pymem.Error):
        backend.incr("")
    assert list(backend.scan()) == [] and backend.counters() == {}
    assert backend.put_if_absent(ent("k", kind="probe", n_tokens=np.int64(3)), b"v")  # other kinds are fine
    assert backend.entry("k").kind == "probe" and backend.entry("k").n_tokens == 3


def test_closed_backend_raises(opener):
    b = opener.open()
    b.put_if_absent(ent("c"), b"v")
    b.close()
    b.close()  # twice is fine
    with pytest.raises(pymem.Error):
        b.get("c")
    with pytest.raises(pymem.Error):
        b.put_if_absent(ent("d"), b"v")


def test_context_manager(opener):
    with opener.open() as b:
        b.put_if_absent(ent("cm"), b"v")
    with pytest.raises(pymem.Error):
        b.get("cm")


def test_reopen_sees_everything(opener):
    if not opener.persistent:
        pytest.skip(f"{opener.name}:// does not outlive close")
    with opener.open() as b:
        b.put_if_absent(ent("r1", kind="ckpt", n_tokens=512, parent="r0", pinned=True), b"val")
        b.incr("hits", 3)
        e = b.entry("r1")
    with opener.open() as b2:
        assert b2.get("r1", touch=False) == b"val"
        assert b2.entry("r1") == e
        assert b2.counters() == {"hits": 3}
        assert b2.total_bytes() == 3


def test_two_handles_one_store(opener):
    if not opener.persistent:
        pytest.skip(f"{opener.name}:// handles do not share data")
    a, b = opener.open(), opener.open()
    assert a.put_if_absent(ent("x"), b"from a") is True
    assert b.put_if_absent(ent("x"), b"from b") is False
    assert b.get("x") == b"from a"
    b.incr("n")
    a.incr("n")
    assert a.counters() == b.counters() == {"n": 2}
    assert b.delete(["x"]) == 1 and a.get("x") is None


def test_get_into(backend):
    v = value_of("gi", 100_000)
    backend.put_if_absent(ent("gi", created=1000.0, last_used=1000.0), v)
    buf = bytearray(200_000)
    out = backend.get_into("gi", buf, touch=False)
    assert out.readonly and bytes(out) == v
    assert backend.entry("gi").last_used == 1000.0
    small = bytearray(10)
    assert bytes(backend.get_into("gi", small)) == v            # too small: still the whole value
    assert backend.entry("gi").last_used > 1000.0
    assert backend.get_into("nope", buf) is None
    if isinstance(backend, fs_mod.FSBackend):                    # read straight into the buffer
        assert bytes(buf[:100_000]) == v and small == bytearray(10)
        with pytest.raises(pymem.Error):
            backend.get_into("gi", b"read-only" * 20_000)
        with open(backend._value_path("gi"), "ab") as f:       # a longer file is not the value
            f.write(b"!")
        assert backend.get_into("gi", buf) is None and backend.get("gi") is None


def test_threads_share_one_handle(backend):
    import threading

    keys = [f"{i:08x}" for i in range(40)]
    wins: Dict[int, list] = {t: [] for t in range(6)}
    errors: list = []

    def work(t: int) -> None:
        try:
            for k in keys[t % 3:] + keys[:t % 3]:
                if backend.put_if_absent(ent(k), value_of(k, 3000)):
                    wins[t].append(k)
                v = backend.get(k)
                assert v == value_of(k, 3000)
                backend.incr("n")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    won = [k for w in wins.values() for k in w]
    assert sorted(won) == keys                      # exactly one winner per key
    assert backend.counters() == {"n": 6 * len(keys)}
    assert backend.total_bytes() == 3000 * len(keys)


# ---------------------------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(r"""
    import hashlib, sys, time
    from pymem.store.backends import open_backend, Entry
    url, who, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def value_of(key, size):
        seed = hashlib.sha256(key.encode()).digest()
        return (seed * (size // len(seed) + 1))[:size]

    b = open_backend(url)
    won, bad = [], 0
    print("ready", flush=True)
    for i in range(n):
        k = hashlib.sha1(str(i).encode()).hexdigest()       # the same keys in both processes
        if b.put_if_absent(Entry(k, 0, "block", i, None), value_of(k, size + i)):
            won.append(k)
        b.incr("puts")
        m = (i * 7 + 3) % n                                 # sometimes not put yet by anyone
        j = hashlib.sha1(str(m).encode()).hexdigest()
        v = b.get(j)
        if v is not None and v != value_of(j, size + m):
            bad += 1
        if v is not None:
            b.incr("hits")
        else:
            b.incr("misses")
    print("won", " ".join(won), flush=True)
    print("bad", bad, flush=True)
    b.close()
""")


def _spawn(tmp_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WORKER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))


def test_two_processes_put_and_get_concurrently(shared, tmp_path):
    n, size = 120, 20_000
    open_backend(shared).close()  # create the store first (both children then race on data only)
    procs = [_spawn(tmp_path, shared, str(w), str(n), str(size)) for w in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    won = [set(next(l for l in out.splitlines() if l.startswith("won")).split()[1:]) for out, _ in outs]
    bads = [int(next(l for l in out.splitlines() if l.startswith("bad")).split()[1]) for out, _ in outs]
    assert bads == [0, 0]                              # never a torn or foreign value
    assert not (won[0] & won[1])                       # put_if_absent: exactly one winner per key
    keys = {hashlib.sha1(str(i).encode()).hexdigest() for i in range(n)}
    assert won[0] | won[1] == keys
    with open_backend(shared) as b:
        for i in range(n):
            k = hashlib.sha1(str(i).encode()).hexdigest()
            assert b.get(k, touch=False) == value_of(k, size + i)
            assert b.entry(k).n_tokens == i
        c = b.counters()
        assert c["puts"] == 2 * n and c.get("hits", 0) + c.get("misses", 0) == 2 * n   # counters exact
        assert b.total_bytes() == sum(size + i for i in range(n))


_KILLED = textwrap.dedent(r"""
    import hashlib, sys
    from pymem.store.backends import open_backend, Entry
    url = sys.argv[1]
    b = open_backend(url)
    i = 0
    while True:
        k = hashlib.sha1(b"kill%d" % i).hexdigest()
        seed = hashlib.sha256(k.encode()).digest()
        size = (1 << 20) + 4099 * (i % 300)
        v = (seed * (size // len(seed) + 1))[:size]
        b.put_if_absent(Entry(k, 0, "block", i, None), v)
        if i == 3:
            print("started", flush=True)
        i += 1
""")


def test_sigkill_during_puts_leaves_whole_values(shared, tmp_path):
    open_backend(shared).close()
    for delay in (0.0, 0.13, 0.29):
        p = subprocess.Popen([sys.executable, "-c", _KILLED, shared], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
        assert p.stdout.readline().strip() == "started", p.stderr.read()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        p.stdout.close()
        p.stderr.close()
    with open_backend(shared) as b:
        entries = list(b.scan())
        assert len(entries) >= 4          # "started" is printed after the 4th put
        for e in entries:
            v = b.get(e.key, touch=False)
            assert v is not None and v == value_of(e.key, e.size), e.key
        assert b.total_bytes() == sum(e.size for e in entries)
        if isinstance(b, redis_mod.RedisBackend):
            # a killed client leaves at most values on their way in: never entries, and they expire
            tmps = list(b._r.scan_iter(match=b._t + b"*"))
            assert all(0 < b._r.ttl(t) <= redis_mod._TMP_TTL for t in tmps)
        if isinstance(b, fs_mod.FSBackend):
            b.sweep(grace=0)
            # after the sweep the directory holds exactly the indexed values
            files = sorted(f for _, _, fs in os.walk(os.path.join(b.path, "v")) for f in fs)
            assert files == sorted(fs_mod._file_name(e.key) for e in entries)
            assert [e.key for e in b.scan()] == sorted(e.key for e in entries)


# ---------------------------------------------------------------------------------------------
# open_backend and Redis specifics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["ftp://host/x", "s3://bucket", "", "   "])
def test_bad_urls(url):
    with pytest.raises(BackendURLError):
        open_backend(url)


def test_backend_passes_through(tmp_path):
    with open_backend(str(tmp_path / "s")) as b:
        assert open_backend(b) is b


def test_bad_url_types():
    with pytest.raises(BackendURLError):
        open_backend(42)


@needs_redis_client
def test_redis_unreachable_is_a_clear_error():
    import socket

    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailableError, match="cannot reach") as ei:
        open_backend(f"redis://user:hunter2@127.0.0.1:{port}/0", socket_connect_timeout=2)
    assert "hunter2" not in str(ei.value) and "***" in str(ei.value)
    assert isinstance(ei.value, pymem.Error)


@needs_redis_client
def test_redis_bad_url():
    with pytest.raises(BackendURLError):
        open_backend("redis://127.0.0.1:notaport/0")


def test_redis_prefixes_are_separate(redis_server):
    with open_backend(redis_server.url + "?prefix=one:") as a, \
            open_backend(redis_server.url, prefix="two:") as b:
        a.put_if_absent(ent("k"), b"a")
        b.put_if_absent(ent("k"), b"b")
        a.incr("hits")
        assert a.get("k") == b"a" and b.get("k") == b"b"
        assert [e.key for e in a.scan()] == ["k"] and b.counters() == {}
        a.delete(["k"])
        assert b.get("k") == b"b"
        b.delete(["k"])


def test_redis_glob_characters_in_prefix(redis_server):
    with open_backend(redis_server.url, prefix="g*") as a, open_backend(redis_server.url, prefix="g?x") as b:
        a.put_if_absent(ent("k1"), b"1")
        b.put_if_absent(ent("k2"), b"2")
        assert [e.key for e in a.scan()] == ["k1"] and [e.key for e in b.scan()] == ["k2"]
        a.delete(["k1"])
        b.delete(["k2"])


@needs_redis_client
def test_redis_server_gone_mid_session(redis_server):  # the shared one only gates skip / fail
    srv = RedisServer().start()
    b = open_backend(srv.url, socket_timeout=2, socket_connect_timeout=2)
    b.put_if_absent(ent("k"), b"v")
    srv.stop()
    try:
        for op in (lambda: b.get("k"), lambda: b.put_if_absent(ent("j"), b"v"), lambda: list(b.scan()),
                   lambda: b.incr("hits"), b.counters, b.total_bytes):
            with pytest.raises(BackendUnavailableError):
                op()
    finally:
        b.close()


def test_redis_unix_socket_and_valkey_urls(redis_server):
    with RedisServer(unixsocket=True) as srv:
        with open_backend(f"unix://{srv.socket_path}?db=2&prefix=u:") as b:
            b.put_if_absent(ent("k"), b"over a socket")
            assert b.url.startswith("unix://") and b.prefix == "u:"
        with open_backend(f"valkey://127.0.0.1:{srv.port}/2", prefix="u:") as b:
            assert b.get("k") == b"over a socket"          # the same db 2, over TCP
        with open_backend(f"redis://127.0.0.1:{srv.port}/0", prefix="u:") as b:
            assert b.get("k") is None                     # another database


def test_redis_foreign_keys_under_the_prefix(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    with open_backend(redis_server.url, prefix="fk:") as b:
        b.put_if_absent(ent("good"), b"v")
        r.set(b"fk:m:str", b"a string where a hash belongs")
        r.hset(b"fk:m:half", mapping={b"size": b"3"})             # a hash without the other fields
        r.hset(b"fk:m:\xff", mapping={b"size": b"1"})            # a key that is not UTF-8
        assert [e.key for e in b.scan()] == ["good"]              # scan skips what pymem did not write
        with pytest.raises(BackendError):
            b.entry("half")
        with pytest.raises(BackendError):
            b.get("str")
        assert b.get("good") == b"v"
        r.delete(b"fk:m:str", b"fk:m:half", b"fk:m:\xff")
        b.delete(["good"])


def test_redis_entry_without_value_reads_absent(redis_server):
    import redis

    with open_backend(redis_server.url, prefix="ev:") as b:
        b.put_if_absent(ent("k"), b"v")
        redis.Redis.from_url(redis_server.url).delete(b"ev:v:k")   # e.g. evicted by maxmemory
        assert b.get("k") is None
        b.delete(["k"])
        assert b.total_bytes() == 0 and b.entry("k") is None


def test_bench_script_quick(tmp_path):
    """bench/bench_store_backends.py --quick runs and prints its table (no timing asserted)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                          "bench_store_backends.py")
    if not os.path.exists(script):
        pytest.skip("bench/ is not in this tree")
    r = subprocess.run([sys.executable, script, "--quick", "--n", "3", "--backends", "fs,fs-nofsync",
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for row in ("fs            64 KiB", "fs-nofsync     4 MiB", "raw file", "memcpy", "# put / raw file", "# done"):
        assert row in r.stdout, (row, r.stdout)
    assert os.listdir(tmp_path) == []      # the stores are removed afterwards



def test_get_head(backend):
    v = value_of("gh", 5000)
    backend.put_if_absent(ent("gh", created=1000.0, last_used=1000.0), v)
    buf = bytearray(100)
    assert backend.get_head("gh", buf) == 5000 and bytes(buf) == v[:100]
    big = bytearray(6000)
    assert backend.get_head("gh", big) == 5000 and bytes(big[:5000]) == v and not any(big[5000:])
    assert backend.entry("gh").last_used == 1000.0              # no touch
    assert backend.get_head("nope", buf) is None


def test_gone_reasons(opener):
    from pymem.store.backends.base import GONE_KEEP

    a = opener.open()
    b = opener.open() if opener.persistent else a
    a.mark_gone({"g1": "evicted by the byte budget", "g2": "a corrupt value was deleted (x)"})
    assert b.why_gone(["g1", "g2", "g3"]) == {"g1": "evicted by the byte budget",
                                              "g2": "a corrupt value was deleted (x)"}
    a.mark_gone({"g1": "found corrupt by verify and deleted"})      # the newest reason wins
    assert b.why_gone(["g1"]) == {"g1": "found corrupt by verify and deleted"}
    assert b.why_gone([]) == {}
    with pytest.raises(pymem.Error):
        a.mark_gone({"a\n": "x"})
    if opener.name != "redis":                  # Redis keeps reasons for a week instead
        a.mark_gone({f"{i:08x}": "evicted" for i in range(GONE_KEEP + 10)})
        kept = b.why_gone([f"{i:08x}" for i in range(GONE_KEEP + 10)] + ["g2"])
        assert len(kept) == GONE_KEEP
