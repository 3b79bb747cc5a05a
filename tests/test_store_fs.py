"""The embedded FS backend beyond the shared contract: orphans and the sweep, damaged value files
and indexes, safe file names, file:// URLs, locked indexes, forked children, and failures of the
file system (full disk, another user's store) that raise a clear pymem.Error and change nothing."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from pymem.store.backends import (
    BackendCorruptError,
    BackendError,
    BackendUnavailableError,
    BackendURLError,
    open_backend,
)
from pymem.store.backends import fs as fs_mod
from backend_helpers import ent, snapshot


def _orphans(b: fs_mod.FSBackend):
    """Make the three kinds of orphan by hand: a temporary file, a file without a row, a row
    without a file."""
    b.put_if_absent(ent("aa01"), b"keep")
    b.put_if_absent(ent("aa02"), b"row without file")
    os.unlink(b._value_path("aa02"))
    lonely = b._value_path("aa03")
    with open(lonely, "wb") as f:
        f.write(b"file without row")
    tmp = os.path.join(os.path.dirname(lonely), ".tmp-aa04-123-abc")
    with open(tmp, "wb") as f:
        f.write(b"half")
    return lonely, tmp


def test_orphans_are_absent_and_swept(tmp_path):
    b = fs_mod.FSBackend(str(tmp_path / "s"))
    lonely, tmp = _orphans(b)
    assert b.get("aa03") is None and b.entry("aa03") is None  # a file without a row is not an entry
    assert b.get("aa02") is None                              # a row without a file reads as absent
    assert b.sweep() == {"temp": 0, "files": 0, "rows": 0}    # all younger than the grace period
    assert os.path.exists(lonely) and os.path.exists(tmp)
    assert b.sweep(grace=0) == {"temp": 1, "files": 1, "rows": 1}
    assert not os.path.exists(lonely) and not os.path.exists(tmp)
    assert [e.key for e in b.scan()] == ["aa01"] and b.get("aa01") == b"keep"
    assert b.total_bytes() == 4
    b.close()


def test_sweep_on_open_respects_grace_and_interval(tmp_path):
    b = fs_mod.FSBackend(str(tmp_path / "s"))
    lonely, tmp = _orphans(b)
    b.close()
    old = time.time() - 10_000
    os.utime(lonely, (old, old))
    os.utime(tmp, (old, old))
    fs_mod.FSBackend(str(tmp_path / "s")).close()          # swept less than an hour ago: skipped
    assert os.path.exists(lonely) and os.path.exists(tmp)
    fs_mod.FSBackend(str(tmp_path / "s"), sweep_interval=0).close()   # old orphans go
    assert not os.path.exists(lonely) and not os.path.exists(tmp)


def test_fs_touch_interval(tmp_path):
    with fs_mod.FSBackend(str(tmp_path / "s"), touch_interval=3600) as b:
        b.put_if_absent(ent("t1", created=time.time() - 10), b"v")
        b.put_if_absent(ent("t2", created=time.time() - 7200), b"v")
        lu1, lu2 = b.entry("t1").last_used, b.entry("t2").last_used
        assert b.get("t1") == b"v" and b.get("t2") == b"v"
        assert b.entry("t1").last_used == lu1              # used within the interval: no write
        assert b.entry("t2").last_used > lu2 + 7000        # older than the interval: refreshed


def test_damaged_value_file_reads_as_absent(tmp_path):
    with fs_mod.FSBackend(str(tmp_path / "s")) as b:
        b.put_if_absent(ent("ab"), b"0123456789")
        with open(b._value_path("ab"), "r+b") as f:
            f.truncate(4)
        assert b.get("ab") is None            # never a prefix of a value
        assert b.entry("ab").size == 10       # the row stays (the store decides what to delete)


def test_non_hex_keys_map_to_safe_file_names(tmp_path):
    with fs_mod.FSBackend(str(tmp_path / "s")) as b:
        for k in ("../../etc/passwd", "ckpt:ab/cd", "Ä", "ABCDEF"):
            assert b.put_if_absent(ent(k), k.encode())
            assert b.get(k) == k.encode()
            assert os.path.dirname(os.path.dirname(b._value_path(k))) == os.path.join(b.path, "v")
        assert sorted(e.key for e in b.scan()) == sorted(("../../etc/passwd", "ckpt:ab/cd", "Ä", "ABCDEF"))


def test_fs_urls(tmp_path):
    for url in (str(tmp_path / "a"), "file://" + str(tmp_path / "b"), tmp_path / "c"):
        with open_backend(url) as b:
            assert isinstance(b, fs_mod.FSBackend)
            b.put_if_absent(ent("k"), b"v")
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with open_backend("file://rel/dir") as b:
            assert b.path == str(tmp_path / "rel" / "dir")
    finally:
        os.chdir(cwd)


def test_fs_refuses_what_is_not_a_store(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(BackendURLError, match="not a directory"):
        open_backend(str(f))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(BackendURLError, match="not a pymem store"):
        open_backend(str(tmp_path / "home"))
    assert os.listdir(tmp_path / "home") == ["notes.txt"]       # nothing created there
    with pytest.raises(BackendError):
        open_backend(str(f / "sub"))                               # parent is a file


def test_fs_damaged_index(tmp_path):
    d = tmp_path / "s"
    open_backend(str(d)).close()
    for name in os.listdir(d):
        if name.startswith("index.sqlite"):
            os.unlink(d / name)
    (d / "index.sqlite").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(BackendCorruptError):
        open_backend(str(d))


def test_fs_foreign_index_format(tmp_path):
    d = tmp_path / "s"
    open_backend(str(d)).close()
    db = sqlite3.connect(str(d / "index.sqlite"))
    db.execute("UPDATE meta SET value = 'pymem-store-fs 99' WHERE name = 'format'")
    db.commit()
    db.close()
    with pytest.raises(BackendCorruptError, match="99"):
        open_backend(str(d))


def test_fs_locked_index_fails_cleanly(tmp_path):
    d = str(tmp_path / "s")
    b = fs_mod.FSBackend(d, busy_timeout=0.2)
    b.put_if_absent(ent("a0"), b"v")
    before = snapshot(b)
    holder = sqlite3.connect(os.path.join(d, "index.sqlite"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")               # another process holds the write lock
    try:
        with pytest.raises(BackendUnavailableError, match="locked"):
            b.put_if_absent(ent("a1"), b"w")
        with pytest.raises(BackendUnavailableError):
            b.incr("hits")
        with pytest.raises(BackendUnavailableError):
            b.delete(["a0"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert snapshot(b) == before and b.counters() == {}
    assert not any(n.startswith(".tmp-") for _, _, fs in os.walk(d) for n in fs)  # no temp left
    assert b.put_if_absent(ent("a1"), b"w")          # and it works once the lock is gone
    b.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fs_forked_child_gets_its_own_connection(tmp_path):
    b = fs_mod.FSBackend(str(tmp_path / "s"))
    b.put_if_absent(ent("f0"), b"parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ok = b.get("f0") == b"parent" and b.put_if_absent(ent("f1"), b"child")
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert b.get("f1") == b"child" and b.get("f0") == b"parent"
    b.close()




# ---------------------------------------------------------------------------------------------
# failures of the file system: the operation fails with a pymem.Error and changes nothing
# ---------------------------------------------------------------------------------------------
_LIMITED = textwrap.dedent(r"""
    import json, os, resource, signal, sys
    from pymem.store.backends import open_backend, Entry
    import pymem
    url, mode = sys.argv[1], sys.argv[2]
    out = {}
    if mode == "fsize":              # a full disk, as far as this process can tell
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    else:                            # another user: cannot write the store
        import pymem.store.backends.fs   # (imported first: the interpreter may live where nobody can read)
        if os.getuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
    try:
        b = open_backend(url)
    except pymem.Error as exc:
        print(json.dumps({"open": type(exc).__name__ + ": " + str(exc)}))
        sys.exit(0)
    for name, size in (("big", 2 << 20), ("small", 1000)):
        try:
            out[name] = b.put_if_absent(Entry("ab" + name.encode().hex(), 0, "block", 1, None), b"x" * size)
        except pymem.Error as exc:
            out[name] = type(exc).__name__ + ": " + str(exc)
    out["get"] = None if b.get("0a", touch=False) is None else len(b.get("0a", touch=False))
    print(json.dumps(out))
""")


def _limited(tmp_path, url: str, mode: str) -> dict:
    import json

    r = subprocess.run([sys.executable, "-c", _LIMITED, url, mode], capture_output=True, text=True, timeout=120,
                       cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_fs_full_disk_fails_cleanly(tmp_path):
    u = str(tmp_path / "s")
    with open_backend(u) as b:
        b.put_if_absent(ent("0a"), b"v" * 10)
        before = snapshot(b)
    res = _limited(tmp_path, u, "fsize")
    assert res["big"].startswith("BackendError") and "cannot write value" in res["big"], res
    assert res["small"] is True and res["get"] == 10           # the store still works
    with open_backend(u) as b:
        after = snapshot(b)
        assert after.pop("ab" + b"small".hex())[1] == b"x" * 1000
        assert after == before
    assert not any(n.startswith(".tmp-") for _, _, fs in os.walk(u) for n in fs)   # no temp left


def test_fs_permission_denied_is_a_clear_error(tmp_path):
    u = tmp_path / "s"
    with open_backend(str(u)) as b:
        b.put_if_absent(ent("0a"), b"v" * 10)
        before = snapshot(b)
    os.chmod(tmp_path, 0o755)
    if os.getuid() != 0:
        for d, _, _ in os.walk(u):
            os.chmod(d, 0o555)
    try:
        res = _limited(tmp_path, str(u), "user")
    finally:
        for d, _, _ in os.walk(u):
            os.chmod(d, 0o755)
    # either the open (the index cannot be written) or the puts fail, naming the permission problem
    msgs = [v for v in res.values() if isinstance(v, str)]
    assert msgs and all("BackendUnavailableError" in m and "permission denied" in m for m in msgs), res
    assert res.get("small") is not True
    with open_backend(str(u)) as b:
        assert snapshot(b) == before
