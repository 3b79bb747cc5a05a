"""What the store reads from and writes to: a pymem memory, or a live llama.cpp context.

Every adapter gives the memory layout (a pymem memory of that layout), the model file, the bare
per-sequence section of a sequence, and an all-or-nothing write of such a section into a sequence.
Live in-process contexts also decode tokens (for ``Store.prefill``)."""
from __future__ import annotations

import os
import weakref
from typing import Any, Optional

import numpy as np

from .. import _errors as E
from .errors import StoreError, TargetError

__all__ = ["adapt", "MemoryTarget", "LiveTarget"]



class _Target:
    mem: Any                       # a pymem memory with the target's layout
    model_path: Optional[str]
    live = False

    def pos_max(self, seq: int) -> int:
        raise NotImplementedError

    def read_seq(self, seq: int) -> bytes:
        raise NotImplementedError

    def write_seq(self, blob: Any, seq: int) -> None:
        """Replace sequence ``seq`` with ``blob`` (a llama.cpp sequence blob: envelope + section);
        on failure raise StoreError with the target exactly as before."""
        raise NotImplementedError

    def check_seq(self, seq: int) -> None:
        n = int(getattr(self.mem, "n_seq_max", 0) or 0)
        if not n:
            parts = self.mem.kv_parts()
            n = parts[0].n_seq_max if parts else self.mem.recurrent.n_seq_max
        if not 0 <= int(seq) < n:
            raise E.InvalidArgumentError(f"seq_id {seq} is not a sequence of this target (0..{n - 1})")


class MemoryTarget(_Target):
    def __init__(self, mem: Any, model: Optional[str]) -> None:
        self.mem = mem
        self.model_path = model if model is not None else getattr(mem, "model_path", None)

    def pos_max(self, seq: int) -> int:
        return int(self.mem.seq_pos_max(seq))

    def read_seq(self, seq: int) -> bytes:
        return self.mem.state_write(seq_id=seq)

    def write_seq(self, blob: Any, seq: int) -> None:
        try:
            self.mem.state_read(blob, seq_id=seq, envelope="llama")     # pymem: all or nothing
        except E.Error as exc:
            raise StoreError(f"the memory refused the assembled state: {exc}") from exc


_LAYOUTS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class LiveTarget(_Target):
    live = True
    save_buf: Optional[list] = None

    def __init__(self, ctx: Any, model: Optional[str]) -> None:
        from ..llama import bridge

        self._bridge = bridge
        try:
            self.lv = bridge._live(ctx, model)
        except TypeError as exc:
            raise TargetError(str(exc)) from None
        self.ctx = ctx
        self.model_path = self.lv.model_path
        self.mem = self._layout()
        # llama_cpp.Llama decodes through its own eval (it keeps its own token list)
        self.evals = bool(getattr(self.lv, "can_eval", lambda: False)())

    def _layout(self) -> Any:
        """An empty pymem memory laid out as the context's (cached per context once the cache
        types could be read from a state, i.e. nothing had to be assumed)."""
        try:
            cached = _LAYOUTS.get(self.ctx)
        except TypeError:
            cached = None
        if cached is not None:
            return cached
        b = self._bridge
        params = b.context_params(self.lv)
        mem = b.memory_for(self.lv)
        if not params.assumed:
            try:
                _LAYOUTS[self.ctx] = mem
            except TypeError:
                pass
        return mem

    def pos_max(self, seq: int) -> int:
        return int(self.lv.pos_range(seq)[1])

    def read_seq(self, seq: int) -> Any:
        blob = self.lv.seq_get(seq, 0)
        return memoryview(blob)[8:]

    def write_seq(self, blob: Any, seq: int) -> None:
        # 1. validate the whole blob in an empty pymem memory of the same layout
        scratch = self.mem
        try:
            scratch.state_read(blob, seq_id=seq, envelope="llama")
        except E.Error as exc:
            raise StoreError(f"the assembled state does not fit this context: {exc}") from exc
        finally:
            try:
                scratch.clear(data=False)
            except E.Error:
                pass
        # 2. save the destination sequence (nothing to save when it is empty), 3. write; on refusal
        # put the saved sequence back (or remove what llama.cpp left of the failed one)
        saved = self._save(seq) if self.pos_max(seq) >= 0 else None
        n, why = self.lv.seq_set(blob, seq, 0)
        if n == 0:
            if saved is None:
                self._rm(seq)
                n2, why2 = (1, "")
            else:
                n2, why2 = self.lv.seq_set(saved, seq, 0)
            if n2 == 0:
                raise StoreError(f"llama.cpp refused the restore ({why}) and then the saved sequence "
                                 f"({why2}); sequence {seq} is lost")
            raise StoreError(f"llama.cpp refused the restore: {why} (sequence {seq} put back)")
        self.lv.after_import()

    def _save(self, seq: int) -> Any:
        """The destination sequence's blob, into a buffer reused across restores when in-process."""
        lv = self.lv
        if not hasattr(lv, "lib"):
            return lv.seq_get(seq, 0)
        ffi, lib, ptr = lv.ffi, lv.lib, lv.ptr
        size = int(lib.llama_state_seq_get_size_ext(ptr, seq, 0))
        hold = self.save_buf            # [bytearray]: the Store's, reused across restores
        buf = hold[0] if hold else bytearray()
        if len(buf) < size:
            buf = bytearray(size)
            if hold is not None:
                hold[:] = [buf]
        w = int(lib.llama_state_seq_get_data_ext(ptr, ffi.from_buffer("uint8_t[]", buf), size, seq, 0))
        if w == 0:
            raise StoreError(f"llama.cpp could not save sequence {seq} before the restore (nothing changed)")
        return memoryview(buf)[:w]

    def _rm(self, seq: int) -> None:
        lv = self.lv
        if hasattr(lv, "lib"):
            lv.lib.llama_memory_seq_rm(lv.lib.llama_get_memory(lv.ptr), seq, -1, -1)
        else:
            lv.h.seq_rm(seq, -1, -1)

    # -- decoding (in-process contexts) ---------------------------------------------------------
    def _api(self) -> Any:
        lv = self.lv
        if not hasattr(lv, "lib"):
            raise TargetError(f"prefill needs an in-process context (got a {lv.kind})")
        return lv.ffi, lv.lib, lv.ptr

    def check_decode(self, seq: int) -> None:
        """Raise unless this context can decode into ``seq`` (before prefill changes anything)."""
        if self.evals:
            self.lv._llama(seq)
        else:
            self._api()

    def set_tokens(self, tokens: np.ndarray, seq: int) -> None:
        """Sequence ``seq`` now holds exactly ``tokens`` (after a restore, or empty): bindings that
        keep their own token list (llama_cpp.Llama) are told."""
        if self.evals:
            self.lv.set_tokens(tokens, seq)

    def decode(self, tokens: np.ndarray, pos0: int, seq: int, logits_last: bool) -> None:
        if self.evals:
            try:
                self.lv.eval_tokens(tokens, pos0, seq)
            except E.Error as exc:
                raise TargetError(str(exc)) from None
            except Exception as exc:  # llama-cpp-python raises RuntimeError / ValueError
                raise StoreError(f"Llama.eval failed at position {pos0}: {exc}") from exc
            return
        ffi, lib, ptr = self._api()
        n_batch = max(1, int(lib.llama_n_batch(ptr)))
        total = len(tokens)
        off = 0
        while off < total:
            chunk = tokens[off:off + n_batch]
            n = len(chunk)
            batch = lib.llama_batch_init(n, 0, 1)
            try:
                batch.n_tokens = n
                for i in range(n):
                    batch.token[i] = int(chunk[i])
                    batch.pos[i] = pos0 + off + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 0
                if logits_last and off + n >= total:
                    batch.logits[n - 1] = 1
                rc = int(lib.llama_decode(ptr, batch))
            finally:
                lib.llama_batch_free(batch)
            if rc != 0:
                raise StoreError(f"llama_decode failed with code {rc} at position {pos0 + off}")
            off += n

    def logits(self) -> np.ndarray:
        return last_logits(self.ctx)

    def seq_rm(self, seq: int, p0: int) -> None:
        if self.evals:
            self.lv.seq_rm(seq, p0, -1)
            return
        ffi, lib, ptr = self._api()
        lib.llama_memory_seq_rm(lib.llama_get_memory(ptr), seq, p0, -1)


def last_logits(ctx: Any) -> np.ndarray:
    """The logits of the last decoded token of a live in-process context (a float32 copy)."""
    from ..llama import bridge

    lv = bridge._live(ctx)
    if not hasattr(lv, "lib"):
        raise TargetError(f"logits need an in-process context (got a {lv.kind})")
    ffi, lib, ptr = lv.ffi, lv.lib, lv.ptr
    p = lib.llama_get_logits_ith(ptr, -1)
    if p == ffi.NULL:
        raise StoreError("llama.cpp has no logits for the last token")
    n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(lib.llama_get_model(ptr))))
    return np.frombuffer(ffi.buffer(p, 4 * n_vocab), dtype=np.float32).copy()


def adapt(target: Any, model: Any = None) -> _Target:
    """The adapter for a target (pymem memory or live context)."""
    mp = None if model is None else os.fspath(model)
    from ..memory import Memory

    if isinstance(target, _Target):
        return target
    if isinstance(target, Memory):
        return MemoryTarget(target, mp)
    return LiveTarget(target, mp)
