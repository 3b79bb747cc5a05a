"""The embedded prompt-cache backend: a directory of immutable value files plus an SQLite index.

Layout of a store directory::

    index.sqlite            entries (key, size, kind, n_tokens, parent, created, last_used, pinned),
                            counters, meta (format, last sweep); WAL journal, busy timeout
    v/<aa>/<name>           one file per value, fanned out by the first two characters of <name>
                            (<name> = the key when it is lowercase hex, else "k" + hex(utf-8 key))
    v/<aa>/.tmp-<name>-*.tmp  a value being written (or left by a killed writer)

Writes are atomic and safe across processes on one machine: the value goes to a temporary file
(``pymem.state.files.write_temp``: written, fsynced, closed) outside any lock; then, inside one
SQLite write transaction (``BEGIN IMMEDIATE``, which serialises writers), the key's row is checked,
the file is renamed to its final name (``publish``) and the row inserted.  The primary key decides
put_if_absent races: the loser finds the row, deletes its temporary file and returns False.  Because
every rename and unlink of a final name happens while holding the write lock, a reader that finds a
row finds the whole file.

A killed writer leaves at most a temporary file or (killed between rename and commit) a file without
a row; damage from outside can leave a row without a file.  Readers treat all three as absent, and
:meth:`FSBackend.sweep` (run on open at most once per ``sweep_interval``) removes those older than
``grace`` seconds.
"""
from __future__ import annotations

import errno
import os
import re
import sqlite3
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ...state.files import publish, write_temp
from .base import GONE_KEEP, Backend, Entry
from .errors import (
    BackendClosedError,
    BackendCorruptError,
    BackendError,
    BackendUnavailableError,
    BackendURLError,
    check_entry,
    check_key,
)

__all__ = ["FSBackend"]

_FORMAT = "pymem-store-fs 1"
_INDEX = "index.sqlite"
_VALUES = "v"
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "preadv") else 0
except (ValueError, OSError):
    _IOV_MAX = 16
_TMP = ".tmp-"
_HEX = re.compile(r"[0-9a-f]+")
_SCAN_CHUNK = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key       TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    n_tokens  INTEGER NOT NULL,
    parent    TEXT,
    created   REAL NOT NULL,
    last_used REAL NOT NULL,
    pinned    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gone (key TEXT PRIMARY KEY, why TEXT NOT NULL, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gone_at ON gone (at);
"""


def _file_name(key: str) -> str:
    return key if _HEX.fullmatch(key) else "k" + key.encode("utf-8").hex()


def _key_of(name: str) -> Optional[str]:
    if _HEX.fullmatch(name):
        return name
    if name.startswith("k"):
        try:
            return bytes.fromhex(name[1:]).decode("utf-8")
        except ValueError:
            return None
    return None


class FSBackend(Backend):
    """Embedded backend in directory ``path`` (created if missing; an existing non-empty directory
    must already be a store).

    ``busy_timeout``: seconds a writer waits for another process's write lock before failing;
    ``grace``: age in seconds after which the sweep treats temporary files and file/row mismatches
    as orphans; ``sweep_interval``: the sweep on open runs at most this often (0: every open;
    None: never); ``fsync``: fsync each value file before it becomes visible (default True);
    ``touch_interval``: a get refreshes ``last_used`` only when it is older than this many seconds
    (default 0: exact LRU order; e.g. 1 saves the write transaction of most gets of hot values);
    ``create=False``: fail unless ``path`` already is a store (the command line inspects stores
    without creating them)."""

    def __init__(self, path: str, *, busy_timeout: float = 30.0, grace: float = 600.0,
                 sweep_interval: Optional[float] = 3600.0, fsync: bool = True, create: bool = True,
                 touch_interval: float = 0.0) -> None:
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.url = "file://" + self.path
        self.busy_timeout = float(busy_timeout)
        self.grace = float(grace)
        self.fsync = bool(fsync)
        self.touch_interval = float(touch_interval)
        self._lock = threading.RLock()
        self._db: Optional[sqlite3.Connection] = None
        self._pid = os.getpid()
        self._closed = False
        if not create and not os.path.isfile(os.path.join(self.path, _INDEX)):
            raise BackendURLError(f"no pymem store at {self.path!r}")
        self._prepare_dir()
        self._connect()
        if sweep_interval is not None:
            try:
                self._maybe_sweep(float(sweep_interval))
            except BaseException:
                self.close()
                raise

    # -----------------------------------------------------------------------------------------
    # opening
    # -----------------------------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> BackendError:
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return BackendUnavailableError(f"{self.url}: {what}: the index stayed locked by another "
                                           f"process for more than {self.busy_timeout:g} s")
        if isinstance(exc, sqlite3.OperationalError) and ("readonly" in str(exc) or "unable to open" in str(exc)):
            return BackendUnavailableError(f"{self.url}: {what}: permission denied or read-only file "
                                           f"system: {exc}")
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return BackendCorruptError(f"{self.url}: {what}: the index is damaged: {exc}")
        if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in (errno.EACCES,
                                                                                          errno.EPERM,
                                                                                          errno.EROFS)):
            return BackendUnavailableError(f"{self.url}: {what}: permission denied: {exc}")
        return BackendError(f"{self.url}: {what}: {exc}")

    def _prepare_dir(self) -> None:
        p = self.path
        try:
            if os.path.exists(p) and not os.path.isdir(p):
                raise BackendURLError(f"{p!r} exists and is not a directory (a store is a directory)")
            if os.path.isdir(p):
                names = set(os.listdir(p)) - {_VALUES, _INDEX + "-wal", _INDEX + "-shm",
                                              _INDEX + "-journal"}
                if names and _INDEX not in names:
                    raise BackendURLError(f"{p!r} is a non-empty directory that is not a pymem store "
                                          f"(no {_INDEX}); use a new or empty directory")
            os.makedirs(os.path.join(p, _VALUES), exist_ok=True)
        except (OSError, ValueError) as exc:
            raise self._fail("cannot create the store directory", exc) from exc

    def _connect(self) -> None:
        try:
            db = sqlite3.connect(os.path.join(self.path, _INDEX), timeout=self.busy_timeout,
                                 isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise self._fail("cannot open the index", exc) from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BackendError(f"{self.url}: the index cannot use WAL journaling (got {mode!r}); "
                                   "is the directory on a network file system?")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("BEGIN IMMEDIATE")
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (name, value) VALUES ('format', ?)", (_FORMAT,))
            elif row[0] != _FORMAT:
                raise BackendCorruptError(f"{self.url}: index format {row[0]!r}, this pymem reads "
                                          f"{_FORMAT!r}")
            db.execute("COMMIT")
        except BaseException as exc:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            db.close()
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise self._fail("cannot open the index", exc) from exc
            raise
        self._db = db
        self._pid = os.getpid()

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise BackendClosedError(f"{self.url}: the backend is closed")
        if self._pid != os.getpid():  # forked child: never share the parent's connection
            self._db = None
            self._connect()
        assert self._db is not None
        return self._db

    # -----------------------------------------------------------------------------------------
    # helpers
    # -----------------------------------------------------------------------------------------
    def _value_path(self, key: str) -> str:
        name = _file_name(key)
        return os.path.join(self.path, _VALUES, name[:2], name)

    def _write(self, fn, what: str):  # one write transaction, serialised across processes
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return out
            except (sqlite3.Error, OSError) as exc:
                raise self._fail(what, exc) from exc

    def _read(self, sql: str, args: tuple, what: str) -> List[tuple]:
        with self._lock:
            db = self._conn()
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._fail(what, exc) from exc

    @staticmethod
    def _entry(row: tuple) -> Entry:
        key, size, kind, n_tokens, parent, created, last_used, pinned = row
        return Entry(key=key, size=int(size), kind=kind, n_tokens=int(n_tokens), parent=parent,
                     created=float(created), last_used=float(last_used), pinned=bool(pinned))

    # -----------------------------------------------------------------------------------------
    # the Backend interface
    # -----------------------------------------------------------------------------------------
    def get(self, key: str, *, touch: bool = True) -> Optional[bytes]:
        out = self._fetch(key, None, touch)
        return None if out is None else bytes(out) if not isinstance(out, bytes) else out

    def get_into(self, key: str, buf: Any, *, touch: bool = True) -> Optional[memoryview]:
        """The value read straight into ``buf`` when it fits (no allocation, no extra copy)."""
        out = self._fetch(key, buf, touch)
        return None if out is None else memoryview(out).toreadonly()

    def _fetch(self, key: str, buf: Any, touch: bool) -> Union[bytes, memoryview, None]:
        check_key(key)
        rows = self._read("SELECT size, last_used FROM entries WHERE key = ?", (key,), "get")
        if not rows:
            return None
        size, last_used = rows[0]
        dst: Optional[memoryview] = None
        if buf is not None:
            try:
                dst = memoryview(buf).cast("B")
            except TypeError as exc:
                raise BackendError(f"get_into needs a writable buffer, not {type(buf).__name__}") from exc
            if dst.readonly:
                raise BackendError("get_into needs a writable buffer")
            dst = dst[:size] if dst.nbytes >= size else None
        try:
            with open(self._value_path(key), "rb", buffering=0) as f:
                if dst is None:
                    data: Union[bytes, memoryview] = f.readall()
                    ok = len(data) == size
                else:
                    got = 0
                    while got < size:
                        n = f.readinto(dst[got:])
                        if not n:
                            break
                        got += n
                    data = dst
                    ok = got == size and not f.read(1)
        except FileNotFoundError:
            return None  # a row without a file (damage from outside): absent; the sweep drops it
        except OSError as exc:
            raise self._fail(f"cannot read value {key}", exc) from exc
        if not ok:
            return None  # truncated or replaced from outside: never hand out a partial value
        now = time.time()
        if touch and now - last_used > self.touch_interval:  # hot values: one write per interval
            self._write(lambda db: db.execute("UPDATE entries SET last_used = ? WHERE key = ? AND "
                                              "last_used < ?", (now, key, now)), "get (touch)")
        return data

    def get_scattered(self, key: str, bufs: Sequence[memoryview], *, touch: bool = True) -> Optional[int]:
        """One ``preadv`` of the value file into ``bufs`` (see :meth:`Backend.get_scattered`).  No
        index read: values are immutable files renamed into place whole, and the caller checks
        the envelope (a file whose index row is gone is a value that was just evicted)."""
        check_key(key)
        want = sum(b.nbytes for b in bufs)
        if not _IOV_MAX or len(bufs) > _IOV_MAX:
            return super().get_scattered(key, bufs, touch=touch)
        size = self._read_file(key, lambda fd, size: size != want or os.preadv(fd, bufs, 0) == size)
        if size is not None and touch:
            self.touch([key])
        return size

    def get_head(self, key: str, buf: Any) -> Optional[int]:
        """One ``pread`` of the value file's first bytes (see :meth:`Backend.get_head`)."""
        check_key(key)
        dst = memoryview(buf).cast("B")

        def head(fd: int, size: int) -> bool:
            data = os.pread(fd, min(size, len(dst)), 0)
            dst[:len(data)] = data
            return len(data) == min(size, len(dst))
        return self._read_file(key, head)

    def _read_file(self, key: str, read: Any) -> Optional[int]:
        """Open the value file, ``read(fd, size)`` from it; the file's size, or None when it is
        absent or ``read`` says it was truncated from outside while being read (as in get())."""
        try:
            fd = os.open(self._value_path(key), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail(f"cannot read value {key}", exc) from exc
        try:
            size = os.fstat(fd).st_size
            return size if read(fd, size) else None
        except OSError as exc:
            raise self._fail(f"cannot read value {key}", exc) from exc
        finally:
            os.close(fd)

    def _read_in(self, select: str, keys: List[str], what: str) -> List[tuple]:
        """``select`` + `` WHERE key IN (...)`` over checked ``keys``, 500 at a time."""
        rows: List[tuple] = []
        for a in range(0, len(keys), 500):
            part = keys[a:a + 500]
            rows += self._read(f"{select} WHERE key IN ({','.join('?' * len(part))})", tuple(part), what)
        return rows

    def present(self, keys: Sequence[str]) -> List[bool]:
        keys = [check_key(k) for k in keys]
        have = {r[0] for r in self._read_in("SELECT key FROM entries", keys, "present")}
        return [k in have for k in keys]

    def touch(self, keys: Iterable[str]) -> None:
        keys = [check_key(k) for k in keys]
        if not keys:
            return
        now = time.time()
        old = now - self.touch_interval
        self._write(lambda db: db.executemany("UPDATE entries SET last_used = ? WHERE key = ? AND last_used < ?",
                                              [(now, k, old) for k in keys]), "touch")

    def entry(self, key: str) -> Optional[Entry]:
        check_key(key)
        rows = self._read("SELECT key, size, kind, n_tokens, parent, created, last_used, pinned "
                          "FROM entries WHERE key = ?", (key,), "entry")
        return self._entry(rows[0]) if rows else None

    def put_if_absent(self, entry: Entry, value: bytes) -> bool:
        check_entry(entry)
        key = entry.key
        try:
            view = memoryview(value).cast("B")
        except TypeError as exc:
            raise BackendError(f"a value is bytes-like, not {type(value).__name__}") from exc
        size = view.nbytes
        if self._read("SELECT 1 FROM entries WHERE key = ?", (key,), "put"):
            return False
        final = self._value_path(key)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = write_temp(os.path.dirname(final), view, f"{_TMP}{os.path.basename(final)}-", self.fsync)
        except OSError as exc:
            raise self._fail(f"cannot write value {key}", exc) from exc
        now = time.time()
        created = entry.created or now
        last_used = entry.last_used or created

        def commit(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone():
                return False
            publish(tmp, final)
            try:
                db.execute("INSERT INTO entries (key, size, kind, n_tokens, parent, created, last_used,"
                           " pinned) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (key, size, entry.kind, int(entry.n_tokens), entry.parent, created,
                            last_used, int(bool(entry.pinned))))
            except BaseException:
                _unlink(final)
                raise
            return True

        try:
            added = self._write(commit, f"put {key}")
        except BaseException:
            _unlink(tmp)
            raise
        if not added:
            _unlink(tmp)
        return added

    def delete(self, keys: Iterable[str]) -> int:
        keys = list(dict.fromkeys(check_key(k) for k in keys))
        removed = 0
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]

            def drop(db: sqlite3.Connection, chunk: List[str] = chunk) -> int:
                marks = ",".join("?" * len(chunk))
                found = [r[0] for r in db.execute(f"SELECT key FROM entries WHERE key IN ({marks})",
                                                  chunk)]
                db.execute(f"DELETE FROM entries WHERE key IN ({marks})", chunk)
                for k in found:  # unlinked under the write lock: no put of the same key interleaves
                    _unlink(self._value_path(k))
                return len(found)

            removed += self._write(drop, "delete")
        return removed

    def mark_gone(self, reasons: Dict[str, str]) -> None:
        rows = [(check_key(k), str(w), time.time()) for k, w in reasons.items()]
        if not rows:
            return

        def put(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR REPLACE INTO gone (key, why, at) VALUES (?, ?, ?)", rows)
            db.execute("DELETE FROM gone WHERE key IN (SELECT key FROM gone ORDER BY at DESC LIMIT -1 "
                       "OFFSET ?)", (GONE_KEEP,))
        self._write(put, "mark_gone")

    def why_gone(self, keys: Sequence[str]) -> Dict[str, str]:
        return dict(self._read_in("SELECT key, why FROM gone", [check_key(k) for k in keys], "why_gone"))

    def scan(self) -> Iterator[Entry]:
        last = ""
        while True:
            rows = self._read("SELECT key, size, kind, n_tokens, parent, created, last_used, pinned "
                              "FROM entries WHERE key > ? ORDER BY key LIMIT ?", (last, _SCAN_CHUNK),
                              "scan")
            for row in rows:
                yield self._entry(row)
            if len(rows) < _SCAN_CHUNK:
                return
            last = rows[-1][0]

    def set_pinned(self, keys: Iterable[str], pinned: bool = True) -> None:
        keys = [check_key(k) for k in keys]
        flag = int(bool(pinned))
        self._write(lambda db: db.executemany("UPDATE entries SET pinned = ? WHERE key = ?",
                                              [(flag, k) for k in keys]), "set_pinned")

    def incr(self, name: str, n: int = 1) -> int:
        if not isinstance(name, str) or not name:
            raise BackendError(f"counter names are non-empty str, not {name!r}")
        n = int(n)

        def bump(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
                       "SET value = value + excluded.value", (name, n))
            return int(db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

        return self._write(bump, f"incr {name}")

    def counters(self) -> Dict[str, int]:
        return {k: int(v) for k, v in self._read("SELECT name, value FROM counters", (), "counters")}

    def total_bytes(self) -> int:
        return int(self._read("SELECT COALESCE(SUM(size), 0) FROM entries", (), "total_bytes")[0][0])

    def count(self) -> int:
        """Number of entries (one index query)."""
        return int(self._read("SELECT COUNT(*) FROM entries", (), "count")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                try:
                    self._db.close()
                except sqlite3.Error:
                    pass
            self._db = None
            self._closed = True

    # -----------------------------------------------------------------------------------------
    # orphans
    # -----------------------------------------------------------------------------------------
    def _maybe_sweep(self, interval: float) -> None:
        rows = self._read("SELECT value FROM meta WHERE name = 'last_sweep'", (), "sweep")
        if rows and time.time() - float(rows[0][0]) < interval:
            return
        self.sweep()

    def sweep(self, grace: Optional[float] = None) -> Dict[str, int]:
        """Remove what killed writers and outside damage left: temporary files, value files
        without an index row and rows without a file, each only when older than ``grace`` seconds
        (default: the backend's ``grace``).  Returns counts: ``{"temp": .., "files": .., "rows": ..}``."""
        grace = self.grace if grace is None else float(grace)
        now = time.time()
        root = os.path.join(self.path, _VALUES)
        temps = 0
        candidates: List[Tuple[str, str]] = []  # (key, path) of files that may lack a row
        on_disk = set()
        try:
            subdirs = sorted(os.listdir(root))
        except OSError as exc:
            raise self._fail("sweep", exc) from exc
        for sub in subdirs:
            d = os.path.join(root, sub)
            try:
                with os.scandir(d) as it:
                    items = list(it)
            except NotADirectoryError:
                continue
            except OSError as exc:
                raise self._fail("sweep", exc) from exc
            for de in items:
                try:
                    age = now - de.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if de.name.startswith(_TMP):
                    if age >= grace and _unlink(de.path):
                        temps += 1
                    continue
                key = _key_of(de.name)
                if key is None or _file_name(key) != de.name or de.name[:2] != sub:
                    continue  # not ours: leave foreign files alone
                on_disk.add(key)
                if age >= grace:
                    candidates.append((key, de.path))

        def fix(db: sqlite3.Connection) -> Tuple[int, int]:
            files = 0
            for i in range(0, len(candidates), 500):
                chunk = candidates[i:i + 500]
                marks = ",".join("?" * len(chunk))
                have = {r[0] for r in db.execute(f"SELECT key FROM entries WHERE key IN ({marks})",
                                                 [k for k, _ in chunk])}
                for k, p in chunk:
                    if k not in have and _unlink(p):
                        files += 1
            rows = 0
            stale = [r[0] for r in db.execute("SELECT key FROM entries WHERE created <= ?",
                                              (now - grace,))]
            lost = [k for k in stale if k not in on_disk and not os.path.exists(self._value_path(k))]
            for i in range(0, len(lost), 500):
                chunk = lost[i:i + 500]
                db.execute(f"DELETE FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                rows += len(chunk)
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('last_sweep', ?)",
                       (repr(now),))
            return files, rows

        files, rows = self._write(fix, "sweep")
        return {"temp": temps, "files": files, "rows": rows}

    def __repr__(self) -> str:
        return f"FSBackend({self.path!r})"


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False
