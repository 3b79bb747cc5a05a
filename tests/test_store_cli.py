"""``pymem store stats|ls|verify|gc URL``: against embedded stores and a real redis-server, with
values sealed by the store's own envelope (pymem.store.values) when it is in the tree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

import pytest

from pymem import cli
from pymem.store.backends import Entry, open_backend
from redis_server import needs_redis_client, redis_server, redis_url  # noqa: F401


def run(capsys, *argv) -> tuple:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv):
    rc, out, err = run(capsys, *argv, "--json")
    return rc, json.loads(out)


def hexkey(i: int) -> str:
    return f"{i:032x}"


def chain(b, n: int, size: int = 1000, kind: str = "block", start: int = 0, parent=None) -> List[str]:
    """n raw entries chained parent -> child (values are not sealed: enough for stats / ls / gc)."""
    keys = []
    for i in range(start, start + n):
        k = hexkey(i)
        assert b.put_if_absent(Entry(k, 0, kind, 256 * (i - start + 1), parent), bytes([i % 251]) * size)
        keys.append(k)
        parent = k
    return keys


@pytest.fixture(params=["fs", "redis"])
def url(request, tmp_path):
    if request.param == "fs":
        u = str(tmp_path / "store")
        open_backend(u).close()
        return u
    return request.getfixturevalue("redis_url")


def test_stats(capsys, url):
    with open_backend(url) as b:
        chain(b, 3, 1000)
        chain(b, 2, 500, kind="ckpt", start=10)
        b.set_pinned([hexkey(0)])
        b.incr("hits", 7)
        b.incr("tokens_saved", 512)
    rc, st = run_json(capsys, "store", "stats", url)
    assert rc == 0
    assert st["entries"] == 5 and st["bytes"] == 4000
    assert st["by_kind"] == {"block": {"entries": 3, "bytes": 3000}, "ckpt": {"entries": 2, "bytes": 1000}}
    assert st["pinned"] == 1 and st["pinned_bytes"] == 1000 and st["tokens_max"] == 768
    assert st["counters"] == {"hits": 7, "tokens_saved": 512}
    rc, out, _ = run(capsys, "store", "stats", url)
    assert rc == 0 and "entries   5 (block 3, ckpt 2), 1 pinned" in out and "hits      7" in out


def test_ls(capsys, url):
    with open_backend(url) as b:
        keys = chain(b, 4, 100)
        chain(b, 1, 10, kind="tail", start=20, parent=keys[-1])
        b.get(keys[1])                      # most recently used
    rc, ls = run_json(capsys, "store", "ls", url)
    assert rc == 0 and len(ls["entries"]) == 5
    assert ls["entries"][0]["key"] == keys[1]
    by_key = {r["key"]: r for r in ls["entries"]}
    assert by_key[hexkey(20)]["parent"] == keys[-1] and by_key[hexkey(20)]["kind"] == "tail"
    assert by_key[keys[2]]["n_tokens"] == 768 and by_key[keys[2]]["size"] == 100
    rc, ls = run_json(capsys, "store", "ls", url, "--kind", "tail")
    assert [r["key"] for r in ls["entries"]] == [hexkey(20)]
    rc, ls = run_json(capsys, "store", "ls", url, "--sort", "n_tokens", "--limit", "2")
    assert [r["n_tokens"] for r in ls["entries"]] == [256, 256]
    rc, out, _ = run(capsys, "store", "ls", url)
    assert rc == 0 and len(out.splitlines()) == 6 and keys[0] in out


def test_missing_store_is_an_error_and_not_created(capsys, tmp_path):
    for sub in ("stats", "ls", "verify", "gc"):
        rc, out, err = run(capsys, "store", sub, tmp_path / "nope")
        assert rc == 1 and "no pymem store" in err, (sub, err)
    assert not (tmp_path / "nope").exists()


@needs_redis_client
def test_unreachable_redis(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out, err = run(capsys, "store", "stats", f"redis://127.0.0.1:{port}/0")
    assert rc == 1 and "cannot reach" in err and out == ""


def test_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as ei:
        cli.main(["store", "gc", str(tmp_path), "--budget", "lots"])
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        cli.main(["store", "frobnicate", str(tmp_path)])
    assert ei.value.code == 2
    assert cli.main(["store"]) == 2


def test_progress_bar_only_when_asked(capsys, tmp_path):
    u = str(tmp_path / "s")
    with open_backend(u) as b:
        chain(b, 3)
    rc, out, err = run(capsys, "store", "stats", u)
    assert rc == 0 and err == ""                       # stderr is not a terminal here
    rc, out, err = run(capsys, "store", "stats", u, "--progress")
    assert rc == 0 and "scan" in err and "/3 [" in err


def test_gc_sweeps_orphans_of_killed_writers(capsys, tmp_path):
    u = str(tmp_path / "s")
    with open_backend(u) as b:
        chain(b, 2)
        d = os.path.dirname(b._value_path(hexkey(0)))
        with open(os.path.join(d, ".tmp-dead-1-x"), "wb") as f:
            f.write(b"half a value")
        with open(b._value_path(hexkey(9)), "wb") as f:   # renamed, never indexed
            f.write(b"no row")
    rc, res = run_json(capsys, "store", "gc", u, "--grace", "0")
    assert rc == 0 and res["swept"] == {"temp": 1, "files": 1, "rows": 0}
    assert res["entries_after"] == 2 and res["bytes_after"] == 2000
    files = sorted(f for _, _, fs in os.walk(os.path.join(u, "v")) for f in fs)
    assert files == [hexkey(0), hexkey(1)]


def test_console_script(tmp_path):
    u = str(tmp_path / "s")
    with open_backend(u) as b:
        chain(b, 2)
    exe = os.path.join(os.path.dirname(sys.executable), "pymem")
    r = subprocess.run([exe, "store", "stats", u, "--json"], capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"] == 2


# ---------------------------------------------------------------------------------------------
# verify and gc --budget use the store's envelope and policy
# ---------------------------------------------------------------------------------------------
def sealed(b, n: int, payload: int = 3000, start: int = 0, kind: str = "block") -> List[str]:
    V = pytest.importorskip("pymem.store.values")
    keys, parent = [], None
    for i in range(start, start + n):
        k = hexkey(i)
        v = V.seal(kind, 256 * (i - start + 1), b"s" * 16, bytes.fromhex(k), os.urandom(payload))
        assert b.put_if_absent(Entry(k, 0, kind, 256 * (i - start + 1), parent), v)
        keys.append(k)
        parent = k
    return keys


def test_verify_good_store(capsys, url):
    with open_backend(url) as b:
        sealed(b, 4)
    rc, res = run_json(capsys, "store", "verify", url)
    assert rc == 0 and res["ok"] and res["checked"] == 4 and res["bad"] == []
    rc, out, _ = run(capsys, "store", "verify", url)
    assert rc == 0 and "4 values checked" in out and ": ok" in out


def test_verify_finds_flipped_truncated_and_foreign_values(capsys, url):
    with open_backend(url) as b:
        keys = sealed(b, 6)
        values = {k: b.get(k, touch=False) for k in keys}
        b.delete([keys[1], keys[2], keys[3]])
        flipped = bytearray(values[keys[1]])
        flipped[100] ^= 0x40
        b.put_if_absent(Entry(keys[1], 0, "block", 512, keys[0]), bytes(flipped))   # a flipped byte
        b.put_if_absent(Entry(keys[2], 0, "block", 768, keys[1]), values[keys[2]][:-9])  # truncated
        b.put_if_absent(Entry(keys[3], 0, "block", 1024, keys[2]), b"garbage" * 50)      # foreign
        b.put_if_absent(Entry("ab" * 16, 0, "block", 256, None), values[keys[4]])     # under another key
    rc, res = run_json(capsys, "store", "verify", url)
    assert rc == 1 and not res["ok"] and res["checked"] == 7
    assert sorted(r["key"] for r in res["bad"]) == sorted([keys[1], keys[2], keys[3], "ab" * 16])
    assert all(r["problem"] for r in res["bad"])
    rc, res = run_json(capsys, "store", "verify", url, "--delete")
    assert rc == 1 and res["deleted"] == 4
    rc, res = run_json(capsys, "store", "verify", url)
    assert rc == 0 and res["checked"] == 3


def test_verify_after_sigkill_during_puts(capsys, tmp_path):
    pytest.importorskip("pymem.store.values")
    u = str(tmp_path / "s")
    open_backend(u).close()
    code = (
        "import os, sys\n"
        "from pymem.store.backends import open_backend, Entry\n"
        "from pymem.store import values as V\n"
        "b = open_backend(sys.argv[1]); i = 0\n"
        "while True:\n"
        "    k = '%032x' % i\n"
        "    b.put_if_absent(Entry(k, 0, 'block', 256, None), V.seal('block', 256, b's' * 16, bytes.fromhex(k),"
        " os.urandom(1 << 20)))\n"
        "    if i == 2: print('started', flush=True)\n"
        "    i += 1\n")
    p = subprocess.Popen([sys.executable, "-c", code, u], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(tmp_path))
    assert p.stdout.readline().strip() == "started", p.stderr.read()
    import signal
    import time

    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    p.stdout.close()
    p.stderr.close()
    rc, res = run_json(capsys, "store", "verify", u)
    assert rc == 0 and res["checked"] >= 3, res


def test_gc_budget_keeps_chains_whole(capsys, url):
    pytest.importorskip("pymem.store.policy")
    with open_backend(url) as b:
        a = chain(b, 6, 1000)
        c = chain(b, 4, 1000, start=10, parent=a[1])     # a branch off the second block
        b.set_pinned([a[0]])
    rc, res = run_json(capsys, "store", "gc", url, "--budget", "4500B")
    assert rc == 0 and res["bytes_before"] == 10_000 and res["bytes_after"] <= 4500
    with open_backend(url) as b:
        left = {e.key: e for e in b.scan()}
        assert b.total_bytes() == res["bytes_after"] == sum(e.size for e in left.values())
    assert a[0] in left                                   # pinned
    for e in left.values():                               # no chain has a hole
        assert e.parent is None or e.parent in left
    rc, res = run_json(capsys, "store", "gc", url, "--budget", "0")
    with open_backend(url) as b:
        assert [e.key for e in b.scan()] == [a[0]]        # only the pinned root stays


def test_gc_drops_broken_chains(capsys, url):
    pytest.importorskip("pymem.store.policy")
    with open_backend(url) as b:
        a = chain(b, 5, 100)
        b.delete([a[2]])                                  # a hole in the middle of the chain
    rc, res = run_json(capsys, "store", "gc", url)
    assert rc == 0
    with open_backend(url) as b:
        assert sorted(e.key for e in b.scan()) == [a[0], a[1]]
