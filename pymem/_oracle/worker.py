"""A persistent child process that runs llama.cpp for tests (the "oracle worker").

A ``GGML_ASSERT`` in llama.cpp aborts the process that runs it. :class:`OracleWorker` keeps
llama.cpp in one long-lived child process, talks to it over a pair of pipes (length-prefixed
pickle frames) and restarts it transparently after a crash:

* if the child dies during a call (SIGABRT, SIGSEGV, SIGFPE, exit), the call raises
  :class:`OracleCrashed` (exit code / signal plus the tail of the child's stderr, which holds
  the assert message and the llama.cpp log);
* the next call starts a fresh child; handles from before the crash raise
  :class:`StaleHandleError`;
* a call that exceeds its timeout (default 120 s) kills the child and raises
  :class:`OracleTimeout` (a subclass of OracleCrashed).

Exceptions raised by the child's Python code (ValueError, capi.LlamaError, ...) are re-raised
in the parent with the same type; the remote traceback is attached as ``__cause__``.

The child is started as ``python -c <bootstrap>`` with the parent's ``sys.path`` (the folder
holding this very ``pymem`` package first) and imports :mod:`pymem._oracle.worker` normally.

Example::

    with OracleWorker() as w:
        paths = w.ensure_models(["llama"])
        m = w.model(paths["llama"])
        c = w.context(m, n_ctx=256, n_seq_max=2, kv_unified=True, flash_attn=False)
        assert c.decode([(1, 0, [0]), (2, 1, [0])]) == 0
        blob = c.state_seq_get(0)
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..llama._loader import OracleUnavailable

__all__ = [
    "OracleWorker",
    "OracleError",
    "OracleCrashed",
    "OracleTimeout",
    "StaleHandleError",
    "OracleCallError",
    "ModelHandle",
    "ContextHandle",
    "CONTEXT_METHODS",
]

_HDR = struct.Struct("<Q")
_PROTO = pickle.HIGHEST_PROTOCOL
_STDERR_MAX = 4 << 20  # truncate the captured child stderr beyond this size

#: capi.Context methods a ContextHandle forwards to the child
CONTEXT_METHODS: Tuple[str, ...] = (
    "n_ctx", "n_ctx_seq", "n_batch", "n_ubatch", "n_seq_max", "info",
    "decode", "decode_seq", "logits",
    "clear", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div", "pos_min", "pos_max",
    "can_shift", "positions",
    "state_get_size", "state_get", "state_set", "state_seq_get_size", "state_seq_get",
    "state_seq_set", "state_save_file", "state_load_file", "state_seq_save_file",
    "state_seq_load_file", "last_log", "creation_log",
)


# ----------------------------------------------------------------------------------------
# exceptions
# ----------------------------------------------------------------------------------------
class OracleError(RuntimeError):
    """Base class of worker errors."""


class OracleCrashed(OracleError):
    """The worker process died (or was killed) during a call; the next call restarts it.

    Attributes: ``method``, ``returncode`` (negative = signal), ``signal`` (int or None),
    ``signal_name``, ``stderr_tail`` (last part of the child's stderr: assert message and
    llama.cpp log lines), ``log_lines`` (the same, split in lines).
    """

    def __init__(self, message: str, method: str = "", returncode: Optional[int] = None,
                 stderr_tail: str = "") -> None:
        self.method = method
        self.returncode = returncode
        self.signal: Optional[int] = -returncode if returncode is not None and returncode < 0 else None
        try:
            self.signal_name: Optional[str] = signal.Signals(self.signal).name if self.signal else None
        except ValueError:
            self.signal_name = f"signal {self.signal}"
        self.stderr_tail = stderr_tail
        self.log_lines: List[str] = stderr_tail.splitlines()
        super().__init__(message)


class OracleTimeout(OracleCrashed):
    """A call exceeded its timeout; the worker was killed (and restarts on the next call)."""


class StaleHandleError(OracleError):
    """A model/context handle from before a worker restart (or a closed one) was used."""


class OracleCallError(OracleError):
    """The child raised an exception that could not be re-created in the parent."""

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "") -> None:
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        super().__init__(message)


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return "\n--- traceback in the oracle worker ---\n" + self.tb


# ----------------------------------------------------------------------------------------
# framing helpers
# ----------------------------------------------------------------------------------------
def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _send(fd: int, obj: Any) -> None:
    body = pickle.dumps(obj, protocol=_PROTO)
    _write_all(fd, _HDR.pack(len(body)) + body)


class _EOF(Exception):
    pass


class _Timeout(Exception):
    pass


def _read_frame(fd: int, deadline: Optional[float]) -> bytes:
    """Read one length-prefixed frame (the peer sends exactly one frame per request)."""
    buf = b""
    need = _HDR.size
    n = -1
    while True:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            r, _, _ = select.select([fd], [], [], remaining)
            if not r:
                raise _Timeout()
        chunk = os.read(fd, max(need - len(buf), 1 << 16))
        if not chunk:
            raise _EOF()
        buf = buf + chunk if buf else chunk
        if n < 0 and len(buf) >= _HDR.size:
            (n,) = _HDR.unpack_from(buf)
            need = _HDR.size + n
        if n >= 0 and len(buf) >= need:
            return buf[_HDR.size:need]


# ----------------------------------------------------------------------------------------
# handles
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelHandle:
    """A model loaded in the worker. ``info`` has path, arch, n_vocab, n_layer, n_embd,
    n_head, n_head_kv, n_swa, n_ctx_train, is_recurrent, is_hybrid (also as attributes)."""

    id: int
    generation: int
    info: Dict[str, Any] = field(compare=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        info = object.__getattribute__(self, "info")
        if name in info:
            return info[name]
        raise AttributeError(name)


class ContextHandle:
    """A llama.cpp context living in the worker; methods mirror :class:`capi.Context`.

    Use as a context manager or call :meth:`close`; an unreferenced handle is freed in the
    child with the next call. ``many([(method, args...), ...])`` runs several methods in one
    round trip and returns their results.
    """

    def __init__(self, worker: "OracleWorker", ctx_id: int, generation: int,
                 model: ModelHandle, info: Dict[str, Any]) -> None:
        self._w = worker
        self.id = ctx_id
        self.generation = generation
        self.model = model
        self.params = info
        self._closed = False

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StaleHandleError(f"context {self.id} is closed")
        return self._w._call_gen(self.generation, "ctx", self.id, name, args, kwargs)

    def many(self, calls: Sequence[Sequence[Any]]) -> List[Any]:
        """Run ``[(method, *args), ...]`` in one round trip; returns the list of results."""
        if self._closed:
            raise StaleHandleError(f"context {self.id} is closed")
        norm = []
        for c in calls:
            name, args = c[0], tuple(c[1:])
            if name not in CONTEXT_METHODS:
                raise AttributeError(f"unknown context method {name!r}")
            norm.append((name, args))
        return self._w._call_gen(self.generation, "ctx_many", self.id, norm)

    def close(self) -> None:
        """Free the context in the worker (no-op if the worker restarted meanwhile)."""
        if self._closed:
            return
        self._closed = True
        if self.generation == self._w.generation and self._w.running:
            self._w._queue_free(self.generation, self.id)

    def __enter__(self) -> "ContextHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._closed = True
                self._w._queue_free(self.generation, self.id)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<ContextHandle {self.id} gen={self.generation} model={self.model.info.get('path')}>"


def _make_proxy(name: str) -> Any:
    from . import capi

    target = getattr(capi.Context, name)

    @functools.wraps(target)
    def proxy(self: ContextHandle, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    return proxy


for _name in CONTEXT_METHODS:
    setattr(ContextHandle, _name, _make_proxy(_name))
del _name


# ----------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------
_BOOTSTRAP = r"""
import json, sys
cfg = json.loads(sys.argv[1])
sys.path[:] = cfg["sys_path"]
from pymem._oracle.worker import _child_main
_child_main(cfg["rfd"], cfg["wfd"], cfg["echo_log"])
"""


class OracleWorker:
    """Runs llama.cpp in a persistent child process (see the module docstring).

    Parameters: ``timeout`` per call in seconds (None = no limit), ``start_timeout`` for the
    child's startup (first start may copy/patch the wheel), ``env`` extra environment
    variables for the child, ``stderr`` "capture" (default; kept for crash reports) or
    "inherit" (child writes to this process's stderr).
    """

    _bootstrap = _BOOTSTRAP                 # what the child runs (a subclass may run another binding)
    _stderr_prefix = "pymem-oracle-"

    def __init__(self, timeout: Optional[float] = 120.0, start_timeout: float = 120.0,
                 env: Optional[Dict[str, str]] = None, stderr: str = "capture") -> None:
        if stderr not in ("capture", "inherit"):
            raise ValueError("stderr must be 'capture' or 'inherit'")
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._env_extra = dict(env or {})
        self._stderr_mode = stderr
        self._lock = threading.RLock()
        self._proc: Optional[subprocess.Popen] = None
        self._rfd = -1
        self._wfd = -1
        self._errfd = -1
        self._pending_free: List[int] = []
        self.generation = 0
        self.restarts = 0
        self.child_info: Dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while a child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> "OracleWorker":
        """Start the child if it is not running (called automatically by :meth:`call`)."""
        with self._lock:
            if self._proc is None:
                self._spawn()
        return self

    def _spawn(self) -> None:
        root = str(Path(__file__).resolve().parent.parent.parent)  # the folder holding this pymem
        c2p_r, c2p_w = os.pipe()
        p2c_r, p2c_w = os.pipe()
        if self._stderr_mode == "capture":
            fd, path = tempfile.mkstemp(prefix=self._stderr_prefix, suffix=".stderr")
            os.close(fd)
            self._errfd = os.open(path, os.O_RDWR | os.O_APPEND)
            os.unlink(path)
            err: Any = self._errfd
        else:
            err = None
        env = dict(os.environ)
        env.setdefault("GGML_NO_BACKTRACE", "1")  # no gdb attach on GGML_ABORT
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._env_extra)
        cfg = {"sys_path": [root] + [p for p in sys.path if p != root], "rfd": p2c_r, "wfd": c2p_w,
               "echo_log": self._stderr_mode == "capture"}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", self._bootstrap, json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=(p2c_r, c2p_w),
                env=env, close_fds=True)
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self._rfd, self._wfd = c2p_r, p2c_w
        self._pending_free = []
        status, payload = self._recv(time.monotonic() + self.start_timeout, "startup")
        if status == "unavailable":
            self._teardown(kill=True)
            raise OracleUnavailable(payload)
        if status != "ready":
            self._teardown(kill=True)
            raise OracleError(f"unexpected worker handshake {status!r}: {payload!r}")
        self.child_info = payload

    def _teardown(self, kill: bool) -> Optional[int]:
        proc, self._proc = self._proc, None
        for fd in (self._wfd, self._rfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._rfd = -1
        rc = None
        if proc is not None:
            if kill and proc.poll() is None:
                proc.kill()
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        return rc

    def _stderr_tail(self, nbytes: int = 8192) -> str:
        if self._errfd < 0:
            return ""
        try:
            size = os.fstat(self._errfd).st_size
            data = os.pread(self._errfd, nbytes, max(0, size - nbytes))
            return data.decode("utf-8", "replace")
        except OSError:
            return ""

    def _close_errfd(self) -> None:
        if self._errfd >= 0:
            try:
                os.close(self._errfd)
            except OSError:
                pass
            self._errfd = -1

    def _died(self, method: str, timed_out: bool = False) -> OracleCrashed:
        rc = self._teardown(kill=True)
        tail = self._stderr_tail()
        self._close_errfd()
        self.generation += 1
        self.restarts += 1
        self._pending_free = []
        if timed_out:
            return OracleTimeout(
                f"oracle worker call {method!r} timed out; the worker was killed "
                f"(it restarts on the next call). stderr tail:\n{tail[-2000:]}",
                method, rc, tail)
        what = (f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 and
                -rc in signal.Signals._value2member_map_ else f"exit code {rc}")
        return OracleCrashed(
            f"oracle worker died during {method!r} ({what}); it restarts on the next call. "
            f"stderr tail:\n{tail[-2000:]}", method, rc, tail)

    def close(self) -> None:
        """Stop the child (politely, then by force)."""
        with self._lock:
            if self._proc is not None:
                if self._wfd >= 0:
                    try:
                        os.close(self._wfd)  # EOF -> child exits
                    except OSError:
                        pass
                    self._wfd = -1
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                self._teardown(kill=True)
                self.generation += 1
            self._close_errfd()

    def restart(self) -> None:
        """Kill and restart the child (invalidates all handles)."""
        with self._lock:
            self.close()
            self.start()

    def __enter__(self) -> "OracleWorker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- calls ---------------------------------------------------------------------------
    def _recv(self, deadline: Optional[float], method: str) -> Tuple[str, Any]:
        try:
            body = _read_frame(self._rfd, deadline)
        except _EOF:
            raise self._died(method) from None
        except _Timeout:
            raise self._died(method, timed_out=True) from None
        return pickle.loads(body)

    def _queue_free(self, generation: int, ctx_id: int) -> None:
        if generation == self.generation:
            self._pending_free.append(ctx_id)

    def _call_gen(self, generation: Optional[int], method: str, *args: Any,
                  _timeout: Any = "default", **kwargs: Any) -> Any:
        with self._lock:
            if generation is not None and generation != self.generation:
                raise StaleHandleError(
                    f"handle from worker generation {generation} used after a restart "
                    f"(now generation {self.generation}); create it again")
            if self._proc is None:
                self._spawn()
            if self._errfd >= 0 and os.fstat(self._errfd).st_size > _STDERR_MAX:
                os.ftruncate(self._errfd, 0)
            timeout = self.timeout if _timeout == "default" else _timeout
            frees, self._pending_free = self._pending_free, []
            try:
                body = pickle.dumps((method, args, kwargs, frees), protocol=_PROTO)
            except BaseException:
                self._pending_free.extend(frees)
                raise
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                _write_all(self._wfd, _HDR.pack(len(body)) + body)
                status, payload = self._recv(deadline, method)
            except OracleCrashed:
                raise  # _recv already tore the child down
            except (BrokenPipeError, ConnectionError, OSError):
                raise self._died(method) from None
            except BaseException:
                # KeyboardInterrupt etc. in the middle of a call: the protocol is out of
                # sync, so the child must go.
                self._died(method)
                raise
        if status == "ok":
            return payload
        exc_blob, type_name, msg, tb = payload
        exc: Optional[BaseException] = None
        if exc_blob is not None:
            try:
                exc = pickle.loads(exc_blob)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = OracleCallError(f"{type_name}: {msg}", type_name, tb)
        raise exc from _RemoteTraceback(tb)

    def call(self, method: str, *args: Any, timeout: Any = "default", **kwargs: Any) -> Any:
        """Run ``method`` in the child (see ``_Server.op_*``) and return its result.

        ``timeout`` overrides the worker's per-call timeout (None = no limit).
        """
        return self._call_gen(None, method, *args, _timeout=timeout, **kwargs)

    # -- conveniences --------------------------------------------------------------------
    def ping(self, *args: Any) -> Any:
        """Round trip; returns ``args``."""
        return self.call("ping", *args)

    def info(self) -> Dict[str, Any]:
        """llama.cpp version, system info, loaded package folder, default context params."""
        return self.call("info")

    def model(self, path: Union[str, os.PathLike], metadata_only: bool = False) -> ModelHandle:
        """Load (or reuse) the model at ``path`` in the child (``metadata_only``: see
        :class:`capi.Model`)."""
        mid, info = self.call("model", os.fspath(path), metadata_only)
        return ModelHandle(mid, self.generation, info)

    def context(self, model: Union[ModelHandle, str, os.PathLike], **params: Any) -> ContextHandle:
        """Create a context (params as for :class:`capi.Context`) and return its handle."""
        if not isinstance(model, ModelHandle):
            model = self.model(model)
        cid, info = self._call_gen(model.generation, "context", model.id, params)
        return ContextHandle(self, cid, model.generation, model, info)

    def build_model(self, name: str, out_dir: Union[str, os.PathLike], seed: Optional[int] = None) -> str:
        """Generate tiny model ``name`` into ``out_dir`` in the child; returns its path."""
        return self.call("build_model", name, os.fspath(out_dir), seed)

    def ensure_models(self, names: Optional[Iterable[str]] = None,
                      cache_dir: Union[str, os.PathLike, None] = None,
                      seed: Optional[int] = None) -> Dict[str, str]:
        """Cached tiny models ``{name: path}``; only missing ones are built (in the child)."""
        from . import tinymodels

        seed = tinymodels.DEFAULT_SEED if seed is None else seed
        wanted = tinymodels.names() if names is None else list(names)
        out: Dict[str, str] = {}
        for n in wanted:
            p = tinymodels.cached_path(n, cache_dir, seed)
            if not p.exists():
                self.call("build_model", n, str(p.parent), seed, p.name)
            out[n] = str(p)
        return out

    def log(self, n: int = 40, min_level: int = 0) -> str:
        """The child's last ``n`` captured llama.cpp log lines."""
        return self.call("log", n, min_level)


# ----------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------
class _Server:
    """Executes requests in the child. Public operations are the ``op_*`` methods."""

    def __init__(self) -> None:
        from ..llama import _loader
        from . import capi, tinymodels

        self._loader, self.capi, self.tinymodels = _loader, capi, tinymodels
        self.models: Dict[int, Any] = {}
        self.model_keys: Dict[Tuple[str, int, int], int] = {}
        self.contexts: Dict[int, Any] = {}
        self.next_id = 1

    def _new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def free(self, ids: Sequence[int]) -> None:
        for i in ids:
            c = self.contexts.pop(i, None)
            if c is not None:
                c.close()

    # -- operations ----------------------------------------------------------------------
    def op_ping(self, *args: Any) -> Any:
        return args

    def op_info(self) -> Dict[str, Any]:
        L = self._loader
        return {"llama_version": L.llama_version(), "system_info": L.system_info(),
                "package_dir": str(L.loaded_package_dir()), "wheel_version": L.installed_version(),
                "glibc": L.glibc_version(), "pid": os.getpid(),
                "context_default_params": self.capi.context_default_params()}

    def op_model(self, path: str, metadata_only: bool = False) -> Tuple[int, Dict[str, Any]]:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, bool(metadata_only))
        mid = self.model_keys.get(key)
        if mid is None:
            m = self.capi.Model(path, metadata_only=metadata_only)
            mid = self._new_id()
            self.models[mid] = m
            self.model_keys[key] = mid
        return mid, self.models[mid].info()

    def op_context(self, model_id: int, params: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
        m = self.models.get(model_id)
        if m is None:
            raise KeyError(f"no model with id {model_id} in the worker")
        c = self.capi.Context(m, **params)
        cid = self._new_id()
        self.contexts[cid] = c
        return cid, c.info()

    def _ctx(self, ctx_id: int) -> Any:
        c = self.contexts.get(ctx_id)
        if c is None:
            raise KeyError(f"no context with id {ctx_id} in the worker (closed?)")
        return c

    def op_ctx(self, ctx_id: int, name: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        if name not in CONTEXT_METHODS:
            raise AttributeError(f"unknown context method {name!r}")
        return getattr(self._ctx(ctx_id), name)(*args, **kwargs)

    def op_ctx_many(self, ctx_id: int, calls: Sequence[Tuple[str, Sequence[Any]]]) -> List[Any]:
        c = self._ctx(ctx_id)
        out = []
        for name, args in calls:
            if name not in CONTEXT_METHODS:
                raise AttributeError(f"unknown context method {name!r}")
            out.append(getattr(c, name)(*args))
        return out

    def op_free_contexts(self, ids: Sequence[int]) -> None:
        self.free(ids)

    def op_build_model(self, name: str, out_dir: str, seed: Optional[int] = None,
                       filename: Optional[str] = None) -> str:
        seed = self.tinymodels.DEFAULT_SEED if seed is None else seed
        return self.tinymodels.build(name, out_dir, seed=seed, filename=filename)

    def op_log(self, n: int = 40, min_level: int = 0) -> str:
        return self._loader.log_text(n, min_level)

    def op_clear_log(self) -> None:
        self._loader.clear_log()

    def op_debug_crash(self, sig: int = int(signal.SIGABRT)) -> None:
        """Kill the worker with ``sig`` (to test crash handling)."""
        sys.stderr.flush()
        os.kill(os.getpid(), sig)
        time.sleep(10)

    def op_debug_sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def op_debug_exit(self, code: int = 3) -> None:
        os._exit(code)


def _child_main(rfd: int, wfd: int, echo_log: bool = True) -> None:
    """Child process entry point (see _BOOTSTRAP)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    from ..llama import _loader

    if echo_log:  # into the captured stderr file: context for crash reports
        _loader.set_log_echo(True)
    try:
        _loader.load()
        server = _Server()
    except OracleUnavailable as e:
        _send(wfd, ("unavailable", str(e)))
        return
    except BaseException as e:  # pragma: no cover - reported to the parent
        _send(wfd, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    _send(wfd, ("ready", {"pid": os.getpid(), "package_dir": str(_loader.loaded_package_dir())}))
    while True:
        try:
            body = _read_frame(rfd, None)
        except _EOF:
            return
        method, args, kwargs, frees = pickle.loads(body)
        try:
            if frees:
                server.free(frees)
            fn = getattr(server, "op_" + method, None) if not method.startswith("_") else None
            if fn is None:
                raise AttributeError(f"unknown worker method {method!r}")
            result = fn(*args, **kwargs)
            out = ("ok", result)
        except BaseException as e:
            tb = traceback.format_exc()
            try:
                blob: Optional[bytes] = pickle.dumps(e, protocol=_PROTO)
                pickle.loads(blob)
            except Exception:
                blob = None
            out = ("err", (blob, type(e).__name__, str(e), tb))
        try:
            _send(wfd, out)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            _send(wfd, ("err", (None, type(e).__name__, f"result not picklable: {e}", "")))
