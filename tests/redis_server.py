"""A real ``redis-server`` (Debian package redis-server) for the tests: started on a free loopback
port in a temporary directory, without persistence, and stopped afterwards.

    from redis_server import redis_server          # a pytest fixture (session scope): a URL
    from redis_server import RedisServer           # with RedisServer() as srv: srv.url

Tests that use it skip when the binary cannot be found, unless ``PYMEM_REQUIRE_REDIS=1`` (CI sets
it), in which case they fail.  ``PYMEM_REDIS_SERVER`` names the binary explicitly."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterator, Optional

import pytest

__all__ = ["RedisServer", "find_redis_server", "redis_server", "redis_url", "needs_redis_client",
           "shared_server", "fresh_url"]

_REQUIRED = os.environ.get("PYMEM_REQUIRE_REDIS", "") not in ("", "0")


def _have_client() -> bool:
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return True


# tests that talk to Redis (even to no server) need the client: pip install 'pymem[redis]'
needs_redis_client = pytest.mark.skipif(not _have_client() and not _REQUIRED,
                                        reason="the redis client is not installed (pip install redis)")


def find_redis_server() -> Optional[str]:
    exe = os.environ.get("PYMEM_REDIS_SERVER")
    if exe:
        return exe
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``url`` is ``redis://127.0.0.1:PORT/0`` once started."""

    def __init__(self, exe: Optional[str] = None, unixsocket: bool = False) -> None:
        self.exe = exe or find_redis_server()
        self.unixsocket = unixsocket
        if not self.exe:
            raise FileNotFoundError("redis-server not found (apt-get install redis-server)")
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.dir = ""
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    def start(self, timeout: float = 20.0) -> "RedisServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="pymem-redis-")
        self.dir = self._tmp.name
        last = ""
        for _attempt in range(5):  # the free port can be taken between probe and bind: retry
            self.port = _free_port()
            log = os.path.join(self.dir, f"redis-{self.port}.log")
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                 "--logfile", log, *(["--unixsocket", self.socket_path] if self.unixsocket else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _ping(self.port):
                    return self
                time.sleep(0.05)
            last = self._read_log(log) or (self.proc.stderr.read().decode(errors="replace")
                                           if self.proc.poll() is not None and self.proc.stderr else "")
            self._kill()
        self.stop()
        raise RuntimeError(f"redis-server did not start: {last[-2000:]}")

    @staticmethod
    def _read_log(path: str) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def stop(self) -> None:
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _require() -> str:
    """The redis-server binary, or skip (fail under PYMEM_REQUIRE_REDIS=1) the calling test."""
    exe = find_redis_server()
    if not exe:
        if _REQUIRED:
            pytest.fail("PYMEM_REQUIRE_REDIS is set but redis-server is not installed")
        pytest.skip("redis-server not found (apt-get install redis-server)")
    if not _have_client():
        if _REQUIRED:
            pytest.fail("PYMEM_REQUIRE_REDIS is set but the redis client is not installed")
        pytest.skip("the redis client is not installed (pip install redis)")
    return exe


_SHARED: list = []


def shared_server() -> RedisServer:
    """One redis-server per test process, started on first use and stopped at exit (for URL
    factories that are not fixtures); skips or fails like the fixture."""
    exe = _require()
    if not _SHARED:
        srv = RedisServer(exe).start()
        atexit.register(srv.stop)
        _SHARED.append(srv)
    return _SHARED[0]


_N = [0]


def fresh_url(srv: RedisServer) -> str:
    """A URL on ``srv`` with a key prefix no other test uses."""
    _N[0] += 1
    return f"{srv.url}?prefix=t{os.getpid()}-{_N[0]}:"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A running redis-server for the whole session (skips if absent, fails under
    PYMEM_REQUIRE_REDIS=1)."""
    yield shared_server()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL with a key prefix of its own per test (so tests never see each other's keys)."""
    return fresh_url(redis_server)
