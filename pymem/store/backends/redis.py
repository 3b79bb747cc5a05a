"""The Redis / Valkey prompt-cache backend (many machines share one store).

Keys, under one prefix ``P`` (default ``pymem:``, ``?prefix=`` in the URL or ``prefix=``)::

    P v:<key>      the value (a string)
    P t:<key>:<id> a value on its way in (SET with a 1 h expiry, then RENAMEd by the commit script)
    P m:<key>      its metadata (a hash: size, kind, n_tokens, parent, created, last_used, pinned);
                   the entry exists exactly when this hash exists
    P stats        hash: bytes, entries (kept by the scripts below, so total_bytes is one HGET)
    P counters     hash: the store's counters (HINCRBY)
    P g:<key>      why a deleted key went (evicted, corrupt): a string kept for a week

put_if_absent's commit, delete and pinning are Lua scripts and get is a MULTI / EXEC of a metadata
check (with the last_used update) and a GET: each is one atomic step on the server, so concurrent
clients on any machine never see half an entry and never both win a put.  scan walks ``P m:*`` with SCAN (never KEYS) and fetches metadata in pipelines.  Every driver
exception becomes a :class:`BackendError` (connection problems: :class:`BackendUnavailableError`).
A server that evicts keys by itself (``maxmemory-policy``) may drop a value before its hash: such an
entry reads as absent; the store's budget should stay below ``maxmemory``.
"""
from __future__ import annotations

import contextlib
import re
import time
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

from .base import GONE_TTL, Backend, Entry
from .errors import (
    BackendClosedError,
    BackendError,
    BackendUnavailableError,
    BackendURLError,
    check_entry,
    check_key,
)

try:
    import redis as _redis
except ImportError:  # pragma: no cover - exercised only without the extra
    _redis = None

__all__ = ["RedisBackend"]

_FIELDS = (b"size", b"kind", b"n_tokens", b"parent", b"created", b"last_used", b"pinned")
_EXISTS_FIRST = 256 << 10  # larger values: ask EXISTS before sending the bytes
_BATCH = 500               # keys per metadata pipeline in scan

_TMP_TTL = 3600  # seconds a value written by a client that died before its commit survives

# KEYS: temporary value, value, metadata, stats; ARGV: size, kind, n_tokens, parent, created,
# last_used, pinned.  The value was SET under the temporary key in the same pipeline: RENAME moves
# it in O(1) (a value passed through Lua costs twice a plain SET at 4 MiB).
_COMMIT = """
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[3], 'size', ARGV[1], 'kind', ARGV[2], 'n_tokens', ARGV[3], 'parent', ARGV[4],
           'created', ARGV[5], 'last_used', ARGV[6], 'pinned', ARGV[7])
redis.call('HINCRBY', KEYS[4], 'bytes', ARGV[1])
redis.call('HINCRBY', KEYS[4], 'entries', 1)
return 1
"""

_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == '1' then
  local lu = tonumber(redis.call('HGET', KEYS[1], 'last_used') or '0') or 0
  if tonumber(ARGV[1]) > lu then redis.call('HSET', KEYS[1], 'last_used', ARGV[1]) end
end
return 1
"""

_DEL = """
local n = 0
for i = 2, #KEYS, 2 do
  local size = redis.call('HGET', KEYS[i + 1], 'size')
  if size then
    redis.call('DEL', KEYS[i], KEYS[i + 1])
    redis.call('HINCRBY', KEYS[1], 'bytes', -tonumber(size))
    redis.call('HINCRBY', KEYS[1], 'entries', -1)
    n = n + 1
  end
end
return n
"""

_PIN = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('HSET', KEYS[i], 'pinned', ARGV[1]) end
end
return 0
"""


def _redact(url: str) -> str:
    """``url`` without its password (``redis://user:***@host``)."""
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url, count=1)


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RedisBackend(Backend):
    """Backend on a Redis or Valkey server named by ``url`` (``redis://``, ``rediss://``,
    ``unix://``; ``valkey://`` and ``valkeys://`` are accepted as synonyms).  ``prefix`` namespaces
    the keys; other keyword options go to ``redis.Redis`` (``socket_timeout``, ``password``...)."""

    def __init__(self, url: str, *, prefix: Optional[str] = None, socket_timeout: float = 30.0,
                 socket_connect_timeout: float = 5.0, **opts: Any) -> None:
        if _redis is None:
            raise BackendError("the Redis backend needs the redis client: pip install 'pymem[redis]'")
        scheme, sep, rest = url.partition("://")
        scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme.lower(), scheme.lower())
        url = scheme + sep + rest
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        for k, v in query:
            if k == "prefix" and prefix is None:
                prefix = v
        query = [(k, v) for k, v in query if k != "prefix"]
        q = urlencode(query)
        url = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{q}" if q else "")  # keeps unix:///
        self.url = _redact(url)
        self.prefix = "pymem:" if prefix is None else str(prefix)
        p = self.prefix.encode("utf-8")
        self._stats_key = p + b"stats"
        self._counters_key = p + b"counters"
        self._v = p + b"v:"
        self._t = p + b"t:"
        self._m = p + b"m:"
        self._g = p + b"g:"
        self._closed = False
        try:
            self._r = _redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                            socket_connect_timeout=socket_connect_timeout,
                                            decode_responses=False, **opts)
        except (ValueError, TypeError) as exc:
            raise BackendURLError(f"bad Redis URL {self.url!r}: {exc}") from exc
        self._commit = self._r.register_script(_COMMIT)
        self._touch = self._r.register_script(_TOUCH)
        self._del = self._r.register_script(_DEL)
        self._pin = self._r.register_script(_PIN)
        with self._errors("connect"):
            self._r.ping()

    # -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        if self._closed:
            raise BackendClosedError(f"{self.url}: the backend is closed")
        try:
            yield
        except _redis.exceptions.AuthenticationError as exc:
            raise BackendUnavailableError(f"{self.url}: {what}: authentication failed: {exc}") from exc
        except (_redis.exceptions.ConnectionError, _redis.exceptions.TimeoutError) as exc:
            raise BackendUnavailableError(f"{self.url}: {what}: cannot reach the server: {exc}") from exc
        except _redis.exceptions.RedisError as exc:
            raise BackendError(f"{self.url}: {what}: {exc}") from exc
        except OSError as exc:  # pragma: no cover - the client normally wraps these
            raise BackendUnavailableError(f"{self.url}: {what}: {exc}") from exc

    def _kb(self, key: str) -> bytes:
        return key.encode("utf-8")

    def _entry(self, key: str, h: Dict[bytes, bytes]) -> Optional[Entry]:
        if not h:
            return None
        try:
            parent = h.get(b"parent", b"").decode("utf-8") or None
            return Entry(key=key, size=int(h[b"size"]), kind=h[b"kind"].decode("utf-8"),
                         n_tokens=int(h[b"n_tokens"]), parent=parent, created=float(h[b"created"]),
                         last_used=float(h[b"last_used"]), pinned=h.get(b"pinned", b"0") == b"1")
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise BackendError(f"{self.url}: damaged metadata for {key!r}: {exc!r}") from exc

    # -----------------------------------------------------------------------------------------
    def get(self, key: str, *, touch: bool = True) -> Optional[bytes]:
        k = self._kb(check_key(key))
        with self._errors(f"get {key}"):
            # MULTI / EXEC: the metadata check (+ LRU touch) and the GET are one atomic step; the
            # value does not pass through Lua (a 4 MiB value costs several ms there)
            pipe = self._r.pipeline(transaction=True)
            self._touch(keys=[self._m + k], args=[repr(time.time()), "1" if touch else "0"], client=pipe)
            pipe.get(self._v + k)
            exists, out = pipe.execute()
        return None if (not exists or out is None) else bytes(out)

    def present(self, keys: Sequence[str]) -> List[bool]:
        ks = [self._m + self._kb(check_key(k)) for k in keys]
        with self._errors("present"):
            pipe = self._r.pipeline(transaction=False)
            for k in ks:
                pipe.exists(k)
            return [bool(x) for x in pipe.execute()] if ks else []

    def touch(self, keys: Iterable[str]) -> None:
        ks = [self._m + self._kb(check_key(k)) for k in keys]
        if not ks:
            return
        with self._errors("touch"):
            pipe = self._r.pipeline(transaction=False)
            now = repr(time.time())
            for k in ks:
                self._touch(keys=[k], args=[now, "1"], client=pipe)
            pipe.execute()

    def entry(self, key: str) -> Optional[Entry]:
        k = self._kb(check_key(key))
        with self._errors(f"entry {key}"):
            h = self._r.hgetall(self._m + k)
        return self._entry(key, h)

    def put_if_absent(self, entry: Entry, value: bytes) -> bool:
        check_entry(entry)
        key = entry.key
        try:
            data = memoryview(value).cast("B").tobytes() if not isinstance(value, bytes) else value
        except TypeError as exc:
            raise BackendError(f"a value is bytes-like, not {type(value).__name__}") from exc
        k = self._kb(key)
        now = time.time()
        created = entry.created or now
        last_used = entry.last_used or created
        with self._errors(f"put {key}"):
            if len(data) > _EXISTS_FIRST and self._r.exists(self._m + k):
                return False
            tmp = self._t + k + b":" + uuid.uuid4().hex.encode()
            pipe = self._r.pipeline(transaction=False)
            pipe.set(tmp, data, ex=_TMP_TTL)
            self._commit(keys=[tmp, self._v + k, self._m + k, self._stats_key],
                         args=[len(data), entry.kind, int(entry.n_tokens), entry.parent or "",
                               repr(float(created)), repr(float(last_used)), "1" if entry.pinned else "0"],
                         client=pipe)
            out = pipe.execute()[1]
        if out == -1:
            raise BackendError(f"{self.url}: put {key}: the server dropped the value before its commit "
                               "(maxmemory?)")
        return bool(out)

    def delete(self, keys: Iterable[str]) -> int:
        ks = [self._kb(check_key(k)) for k in dict.fromkeys(keys)]
        n = 0
        for i in range(0, len(ks), 256):
            flat: List[bytes] = [self._stats_key]
            for k in ks[i:i + 256]:
                flat += [self._v + k, self._m + k]
            with self._errors("delete"):
                n += int(self._del(keys=flat))
        return n

    def mark_gone(self, reasons: Dict[str, str]) -> None:
        items = [(self._g + self._kb(check_key(k)), str(w).encode("utf-8")) for k, w in reasons.items()]
        if not items:
            return
        with self._errors("mark_gone"):
            pipe = self._r.pipeline(transaction=False)
            for k, w in items:
                pipe.set(k, w, ex=GONE_TTL)
            pipe.execute()

    def why_gone(self, keys: Sequence[str]) -> Dict[str, str]:
        keys = [check_key(k) for k in keys]
        if not keys:
            return {}
        with self._errors("why_gone"):
            got = self._r.mget([self._g + self._kb(k) for k in keys])
        return {k: w.decode("utf-8", "replace") for k, w in zip(keys, got) if w is not None}

    def scan(self) -> Iterator[Entry]:
        match = _glob_escape(self.prefix).encode("utf-8") + b"m:*"
        cut = len(self._m)
        with self._errors("scan"):
            batch: List[bytes] = []
            for mk in self._r.scan_iter(match=match, count=1000):
                batch.append(mk)
                if len(batch) >= _BATCH:
                    yield from self._fetch(batch, cut)
                    batch = []
            if batch:
                yield from self._fetch(batch, cut)

    def _fetch(self, batch: List[bytes], cut: int) -> Iterator[Entry]:
        pipe = self._r.pipeline(transaction=False)
        for mk in batch:
            pipe.hgetall(mk)
        for mk, h in zip(batch, pipe.execute(raise_on_error=False)):
            if isinstance(h, Exception):
                if isinstance(h, (_redis.exceptions.ConnectionError, _redis.exceptions.TimeoutError)):
                    raise h
                continue  # e.g. WRONGTYPE: a key under the prefix that pymem did not write
            try:
                key = mk[cut:].decode("utf-8")
                e = self._entry(key, h)  # None: deleted between SCAN and HGETALL
            except (UnicodeDecodeError, BackendError):
                continue  # not written by pymem (or damaged): not an entry
            if e is not None:
                yield e

    def set_pinned(self, keys: Iterable[str], pinned: bool = True) -> None:
        ks = [self._m + self._kb(check_key(k)) for k in keys]
        for i in range(0, len(ks), 512):
            with self._errors("set_pinned"):
                self._pin(keys=ks[i:i + 512], args=["1" if pinned else "0"])

    def incr(self, name: str, n: int = 1) -> int:
        if not isinstance(name, str) or not name:
            raise BackendError(f"counter names are non-empty str, not {name!r}")
        with self._errors(f"incr {name}"):
            return int(self._r.hincrby(self._counters_key, name, int(n)))

    def counters(self) -> Dict[str, int]:
        with self._errors("counters"):
            h = self._r.hgetall(self._counters_key)
        return {k.decode("utf-8"): int(v) for k, v in h.items()}

    def total_bytes(self) -> int:
        with self._errors("total_bytes"):
            return int(self._r.hget(self._stats_key, "bytes") or 0)

    def count(self) -> int:
        """Number of entries (one HGET)."""
        with self._errors("count"):
            return int(self._r.hget(self._stats_key, "entries") or 0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._r.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"
