"""The prompt-cache store: put / lookup / restore / prefill over one backend (see pymem.store)."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from .. import _errors as E
from .._cliargs import parse_size
from .._guard import integer
from . import assemble as A
from . import gather as G
from . import keys as K
from . import policy
from . import values as V
from .backends.base import Backend, Entry
from .errors import CorruptValueError, StoreError, TargetError
from .targets import adapt

__all__ = ["Store", "PutResult", "Lookup", "PrefillResult"]

_PROBE_SLOTS = 8
_GONE_MAX = 1 << 16
_GONE_SCAN = 1024   # checkpoint candidates a miss reason looks at for a kept deletion reason
_ORPHAN = "deleted by gc / verify: a block before it in its chain was gone"
_CKPT_BATCH = 256           # checkpoint candidates looked up per backend round trip
_NOSEED = b"\0" * 16


@dataclass(frozen=True)
class PutResult:
    n_tokens: int          # tokens the stored entries now cover for this prompt
    bytes_added: int       # bytes of new values written
    entries_added: int = 0


@dataclass(frozen=True)
class Lookup:
    n_tokens: int          # tokens a restore would give now
    reason: str = ""       # why fewer than asked ("" when all)

    def __int__(self) -> int:
        return self.n_tokens


@dataclass(frozen=True)
class PrefillResult:
    n_restored: int
    n_decoded: int
    bytes_added: int = 0
    reason: str = ""       # why the restore gave fewer than len(tokens) - 1


@dataclass
class _Ctx:
    target: Any
    lay: A.Layout
    settings: Dict[str, Any]
    seed: bytes


@dataclass
class _Plan:
    n: int
    reason: str
    n_blocks: int          # full blocks used
    tail_src: int = 0      # token count of the tail entry that serves the last partial block


def _budget(value: Any) -> Optional[int]:
    """A byte budget: None, an int >= 0 or a size like "8GiB" / "500MB"."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise E.InvalidArgumentError(f"budget_bytes: {exc}") from None
    return integer(value, "budget_bytes", 0, 2 ** 63 - 1)


class Store:
    """A prompt cache over a backend.  Create with :func:`pymem.store.open`."""

    def __init__(self, backend: Backend, *, budget_bytes: Union[int, str, None] = None, block_tokens: int = 256,
                 checkpoint_every: int = 4, fingerprint: Any = None) -> None:
        self.block_tokens = integer(block_tokens, "block_tokens", 1, 2 ** 31 - 1)
        self.checkpoint_every = integer(checkpoint_every, "checkpoint_every", 1, 2 ** 31 - 1)
        self.budget_bytes = _budget(budget_bytes)
        self.backend = backend
        self.url = getattr(backend, "url", "")
        self.fingerprint = fingerprint
        self._pins: List[Tuple[bytes, np.ndarray]] = []
        self._seeds: Dict[bytes, A.Layout] = {}
        self._lock = threading.RLock()
        self._buf = bytearray()           # assembly buffer reused across restores
        self._save_buf: list = []         # [bytearray]: where a restore saves the destination sequence
        self._fetch_bufs: List[bytearray] = []   # per block index, for backends with get_into
        self._gather_scratch = bytearray()       # headers / transposed V of blocks read in place
        self._gather_head = bytearray()          # block 0's headers, read first
        self._gone: "OrderedDict[str, str]" = OrderedDict()   # deleted keys -> why (evicted, corrupt)
        self.last_reason = ""

    # -- context ---------------------------------------------------------------------------------
    def _ctx(self, target: Any, model: Any) -> _Ctx:
        ad = target if isinstance(target, _Ctx) else None
        if ad is not None:
            return ad
        t = adapt(target, model)
        lay = A.Layout.of(t.mem)
        settings: Dict[str, Any] = {}
        if self.fingerprint is not None:
            settings["model.fingerprint"] = str(self.fingerprint)
        else:
            if not t.model_path:
                raise TargetError("the store cannot tell which model this target belongs to: pass model= "
                                  "(the GGUF file), use a memory made by pymem.from_gguf, or open the store "
                                  "with fingerprint=")
            fp = K.model_fingerprint(t.model_path)
            settings.update({f"model.{k}": v for k, v in fp.items()})
        settings.update(K.layout_settings(t.mem))
        seed = K.settings_digest(settings, self.block_tokens)
        self._seeds[seed] = lay
        return _Ctx(t, lay, settings, seed)

    # -- backend helpers -------------------------------------------------------------------------
    def _has(self, key: bytes) -> bool:
        return self.backend.entry(key.hex()) is not None

    def _fetch(self, key: bytes, kind: str, seed: bytes, touch: bool = True,
               slot: Optional[int] = None) -> Tuple[int, memoryview]:
        """(n_tokens, payload) of a value; a value that fails its checks raises CorruptValueError
        and, unless ``touch`` is False (look-ups have no side effects), is deleted; a missing one
        raises KeyError."""
        get_into = getattr(self.backend, "get_into", None)
        if slot is not None and get_into is not None:
            # a backend that can read into a reusable buffer (the embedded one) does: no fresh
            # allocation and page faults per block; buffers grow to the largest value seen
            bufs = self._fetch_bufs
            while len(bufs) <= slot:
                bufs.append(bytearray())
            v = get_into(key.hex(), bufs[slot], touch=touch)
            if v is not None and len(v) > len(bufs[slot]):
                bufs[slot] = bytearray(len(v))
        else:
            v = self.backend.get(key.hex(), touch=touch)
        if v is None:
            raise KeyError(key.hex())
        try:
            return V.open_value(v, kind, seed, key)
        except CorruptValueError as exc:
            if touch:
                self._corrupt(key, exc)
            raise

    def _corrupt(self, key: bytes, exc: CorruptValueError) -> None:
        """Delete a value found corrupt, count it, remember why; raises ``exc``."""
        self._delete([key.hex()], f"a corrupt value was deleted ({exc})")
        self.backend.incr("corrupt")
        raise exc

    def _forget(self, reasons: Dict[str, str]) -> None:
        """Remember why keys went away (key -> why), for lookup reasons: here, and in the backend
        for every process that shares it."""
        if not reasons:
            return
        g = self._gone
        for key, why in reasons.items():
            g[key] = why
            g.move_to_end(key)
        while len(g) > _GONE_MAX:
            g.popitem(last=False)
        self.backend.mark_gone(reasons)

    def _delete(self, keys: List[str], why: str) -> int:
        n = self.backend.delete(keys) if keys else 0
        self._forget(dict.fromkeys(keys, why))
        return n

    def _why_gone(self, key: str) -> Optional[str]:
        return self._gone.get(key) or self.backend.why_gone([key]).get(key)

    def _put_value(self, key: bytes, kind: str, n_tokens: int, parent: Optional[bytes], seed: bytes,
                   payload: bytes, pinned: bool = False) -> int:
        val = V.seal(kind, n_tokens, seed, key, payload)
        e = Entry(key.hex(), len(val), kind, int(n_tokens), None if parent is None else parent.hex(),
                  pinned=pinned)
        return len(val) if self.backend.put_if_absent(e, val) else 0

    # -- lookup ----------------------------------------------------------------------------------
    def _tail_src(self, chain: K.Chain, m: int, total: int) -> int:
        """A stored entry whose first cells are the full-attention cells of the last partial block of
        the prefix of m tokens: the tail at m itself, the full block that contains m, or the tail
        at ``total`` (the whole token list, when it ends in the same block).  0 when none."""
        B = self.block_tokens
        if self._has(chain.prefix(m)):
            return m
        q = m // B
        if (q + 1) * B <= total and self._has(chain.block(q)):
            return (q + 1) * B          # the full block holding these cells
        if total > m and total // B == q and total % B and self._has(chain.prefix(total)):
            return total
        return 0

    def _plan(self, c: _Ctx, toks: np.ndarray, limit: int, explain: bool = False) -> _Plan:
        """What a restore of ``toks`` (at most ``limit`` tokens) would take, and why not more;
        ``explain`` (lookup) also searches the kept deletion reasons of checkpoints."""
        B, lay = self.block_tokens, c.lay
        chain = K.Chain(c.seed, B, toks)
        T = len(toks)
        N = min(int(limit), T)
        if N <= 0:
            return _Plan(0, "no tokens", 0)
        j = 0
        if lay.n_full:    # one backend round trip for every full block of the prompt
            have = self.backend.present([chain.block(i).hex() for i in range(N // B)])
            while j < len(have) and have[j]:
                j += 1
        else:
            j = N // B
        hi = min(N, (j + 1) * B - 1)

        def plan(m: int, start: int, src: int = 0) -> _Plan:
            return _Plan(m, "" if m == N else self._why_short(c, toks, chain, j, m, N, explain), start, src)
        if not lay.needs_ckpt:
            for m in range(hi, j * B, -1):
                src = self._tail_src(chain, m, T)
                if src:
                    return plan(m, j, src)
            return plan(j * B, j)
        for m in self._stored_ckpts(chain, hi):
            src = m
            if m % B and lay.n_full:
                src = self._tail_src(chain, m, T)
                if not src:
                    continue
            return plan(m, m // B, src)
        return plan(0, 0)

    @staticmethod
    def _ckpt_batches(chain: K.Chain, hi: int, lo: int = 1) -> Iterable[Tuple[range, List[str]]]:
        """Checkpoint candidates hi, hi-1, ..., lo and their keys, _CKPT_BATCH at a time (one
        backend round trip each)."""
        for top in range(hi, lo - 1, -_CKPT_BATCH):
            ms = range(top, max(top - _CKPT_BATCH, lo - 1), -1)
            yield ms, [chain.ckpt(m).hex() for m in ms]

    def _stored_ckpts(self, chain: K.Chain, hi: int) -> Iterable[int]:
        """Token counts m <= hi with a stored checkpoint, longest first."""
        for ms, keys in self._ckpt_batches(chain, hi):
            yield from (m for m, h in zip(ms, self.backend.present(keys)) if h)

    def _why_short(self, c: _Ctx, toks: np.ndarray, chain: K.Chain, j: int, m: int, N: int,
                   explain: bool = False) -> str:
        B, lay = self.block_tokens, c.lay
        if m == 0 and j == 0 and lay.n_full or (m == 0 and not lay.n_full):
            fp = self._probe_reason(c, toks)
            if fp:
                return fp
        parts = []
        if lay.n_full and (j + 1) * B <= N:
            gone = self._why_gone(chain.block(j).hex())
            parts.append(f"block {j} (tokens {j * B}..{(j + 1) * B - 1}) is not in the store ("
                         + (gone or "never stored with this prefix, or deleted too long ago for its reason to be kept") + ")")
        elif lay.n_full and not lay.needs_ckpt and N > m:
            gone = self._why_gone(chain.prefix(N).hex()) if N % B else None
            parts.append(f"tokens {m}..{N - 1} are not in the store (" + (
                f"the entry of this prompt's last {N % B} tokens: {gone}" if gone else
                "no stored prompt with this prefix goes further, or its entries were deleted") + ")")
        if lay.needs_ckpt:
            what = " and ".join((["sliding-window"] if "swa" in lay.roles else []) + (["recurrent"] if lay.recurrent else []))
            cover = min(N, j * B + B - 1) if lay.n_full else N
            if m:
                parts.append(f"tokens {m}..{N - 1} are not in the store: no checkpoint of the {what} part at "
                             f"a token count in {m + 1}..{cover} (checkpoints exist at stored prompt lengths "
                             f"and, after prefill, every checkpoint_every blocks)" + self._gone_ckpt(chain, m + 1, cover, explain))
            else:
                parts.append(f"no checkpoint of the {what} part at a token count <= {cover}"
                             + (f" (blocks cover {j * B} tokens)" if lay.n_full else "")
                             + self._gone_ckpt(chain, 1, cover, explain))
        return "; ".join(parts) or "not in the store"

    def _gone_ckpt(self, chain: K.Chain, lo: int, hi: int, explain: bool) -> str:
        """'; the checkpoint at m tokens: why' for the largest m in lo..hi whose checkpoint was
        deleted with a kept reason (looked up in batches, at most _GONE_SCAN candidates; only
        for ``explain``: a restore does not spend the look-ups on its reason)."""
        if not explain:
            return ""
        for ms, keys in self._ckpt_batches(chain, hi, max(lo, hi - _GONE_SCAN + 1)):
            kept = self.backend.why_gone(keys)
            for m, k in zip(ms, keys):
                why = self._gone.get(k) or kept.get(k)
                if why:
                    return f"; the checkpoint at {m} tokens: {why}"
        return ""

    def _probe_reason(self, c: _Ctx, toks: np.ndarray) -> str:
        diffs = []
        for slot in range(_PROBE_SLOTS):
            key = K.Chain.probe(toks, self.block_tokens, slot)
            try:
                _, payload = self._fetch(key, "probe", _NOSEED, touch=False)
            except KeyError:
                break
            except CorruptValueError:
                continue
            try:
                stored = json.loads(bytes(payload).decode())
            except ValueError:
                continue
            if stored == c.settings:
                return ""
            d = K.describe_difference(stored, c.settings)
            if d:
                diffs.append(d)
        if diffs:
            return "fingerprint mismatch: these tokens are stored for another model or memory layout (" + \
                " | ".join(diffs[:3]) + ")"
        return ""

    def lookup(self, tokens: Any, target: Any, *, model: Any = None) -> Lookup:
        """How many tokens of ``tokens`` a restore into ``target`` would give, and why not more.
        No side effects (no counters, no LRU refresh)."""
        c = self._ctx(target, model)
        toks = K.tokens_array(tokens)
        p = self._plan(c, toks, len(toks), explain=True)
        return Lookup(p.n, p.reason)

    # -- put -------------------------------------------------------------------------------------
    def _store_section(self, c: _Ctx, toks: np.ndarray, S: A.Section, orders: List[np.ndarray], n: int,
                       with_ckpt: bool, with_tail: bool = True) -> Tuple[int, int]:
        """Store blocks / tail / checkpoint for the prefix of n tokens of a parsed section."""
        B, lay = self.block_tokens, c.lay
        chain = K.Chain(c.seed, B, toks[:n])
        pinned = self._pinned_len(c.seed, toks)
        added = entries = 0
        if lay.n_full:
            for i in range(n // B):
                key = chain.block(i)
                if self._has(key):
                    continue
                b = self._put_value(key, "block", (i + 1) * B, chain.block(i - 1) if i else None, c.seed,
                                    A.block_payload(S.full, orders, i * B, (i + 1) * B), (i + 1) * B <= pinned)
                added += b
                entries += b > 0
            if n % B and with_tail:
                key = chain.prefix(n)
                if not self._has(key):
                    q = n // B
                    b = self._put_value(key, "tail", n, chain.block(q - 1) if q else None, c.seed,
                                        A.block_payload(S.full, orders, q * B, n), n <= pinned)
                    added += b
                    entries += b > 0
        if with_ckpt and lay.needs_ckpt:
            b = self._put_ckpt(c, chain, n, S.raw, n <= pinned, n)
            added += b
            entries += b > 0
        if entries:
            self._probe_put(c, toks)
        return added, entries

    def _stored(self, c: _Ctx, toks: np.ndarray, n: int) -> bool:
        """Whether every entry a put of the prefix of n tokens would write exists already."""
        B, lay = self.block_tokens, c.lay
        chain = K.Chain(c.seed, B, toks[:n])
        if lay.n_full:
            if not all(self._has(chain.block(i)) for i in range(n // B)):
                return False
            if n % B and not self._has(chain.prefix(n)):
                return False
        return not lay.needs_ckpt or self._has(chain.ckpt(n))

    def _put_ckpt(self, c: _Ctx, chain: K.Chain, n: int, raw: List[bytes], pinned: bool, parent_n: int) -> int:
        """Store the checkpoint at n; its parent is the entry that holds the full-attention cells
        up to ``parent_n`` (the block or tail at n, or a longer tail in the same block)."""
        key = chain.ckpt(n)
        if self._has(key):
            return 0
        parent = chain.prefix(parent_n) if c.lay.n_full and n >= 1 else None
        return self._put_value(key, "ckpt", n, parent, c.seed, A.ckpt_payload(raw), pinned)

    def _probe_put(self, c: _Ctx, toks: np.ndarray) -> None:
        payload = json.dumps(c.settings, sort_keys=True).encode()
        for slot in range(_PROBE_SLOTS):
            key = K.Chain.probe(toks, self.block_tokens, slot)
            try:
                _, got = self._fetch(key, "probe", _NOSEED, touch=False)
            except KeyError:
                if self._put_value(key, "probe", min(len(toks), self.block_tokens), None, _NOSEED, payload):
                    return
                continue
            except CorruptValueError:
                continue
            if bytes(got) == payload:
                return

    def _section(self, c: _Ctx, toks: np.ndarray, seq_id: int) -> Tuple[A.Section, List[np.ndarray]]:
        t = c.target
        t.check_seq(seq_id)
        N = len(toks)
        pm = t.pos_max(seq_id)
        if pm != N - 1:
            raise StoreError(f"sequence {seq_id} ends at position {pm}, but {N} tokens were given "
                             "(tokens are the sequence's tokens at positions 0..len-1)")
        S = A.parse_section(t.read_seq(seq_id), c.lay)
        orders = []
        for p in S.full:
            order = np.argsort(p.pos, kind="stable")
            if p.n != N or not np.array_equal(p.pos[order], np.arange(N, dtype=p.pos.dtype)):
                raise StoreError(f"sequence {seq_id} does not hold exactly positions 0..{N - 1} "
                                 f"({p.n} cells); the store keeps prompts decoded from position 0")
            orders.append(order)
        for n_cells, pmax in S.raw_pos:
            if n_cells and pmax != N - 1:
                raise StoreError(f"sequence {seq_id}: a part ends at position {pmax}, expected {N - 1}")
        return S, orders

    def put(self, target: Any, tokens: Any, seq_id: int = 0, *, model: Any = None) -> PutResult:
        """Store what is new of sequence ``seq_id`` of ``target``, whose tokens at positions
        0..len-1 are ``tokens``: missing blocks, a tail for the last partial block, and a
        checkpoint at len(tokens) for sliding-window and recurrent parts."""
        with self._lock:
            c = self._ctx(target, model)
            toks = K.tokens_array(tokens)
            if len(toks) == 0:
                return PutResult(0, 0, 0)
            S, orders = self._section(c, toks, int(seq_id))
            added, entries = self._store_section(c, toks, S, orders, len(toks), True)
            self.backend.incr("puts")
            self._enforce()
            return PutResult(len(toks), added, entries)

    # -- restore ---------------------------------------------------------------------------------
    def _gather(self, c: _Ctx, toks: np.ndarray, n: int, src: int = 0) -> Tuple[List[List[A.PartData]], List[Any]]:
        B, lay = self.block_tokens, c.lay
        src = src or n
        chain = K.Chain(c.seed, B, toks[:max(n, src)])
        blocks: List[List[A.PartData]] = []
        if lay.n_full:
            blocks = [self._block(c, chain, i)[0] for i in range(n // B)]
            if n % B:
                blocks.append(self._tail(c, chain, n, src))
        raw: List[Any] = []
        if lay.needs_ckpt:
            key = chain.ckpt(n)
            nt, pl = self._fetch(key, "ckpt", c.seed, slot=n // B + 1)
            n_raw = sum(1 for r in lay.roles if r != "full") + int(lay.recurrent)
            if nt != n:
                self._corrupt(key, CorruptValueError("checkpoint of the wrong length"))
            raw = A.decode_ckpt(pl, n_raw)
        return blocks, raw

    def _block(self, c: _Ctx, chain: K.Chain, i: int) -> Tuple[List[A.PartData], memoryview]:
        """Full block i of a prefix: its full-attention parts and its payload."""
        B, key = self.block_tokens, chain.block(i)
        nt, pl = self._fetch(key, "block", c.seed, slot=i)
        parts = A.decode_payload(pl, c.lay.n_full)
        if nt != (i + 1) * B or any(p.n != B for p in parts):
            self._corrupt(key, CorruptValueError(f"block {i} holds the wrong number of cells"))
        return parts, pl

    def _tail(self, c: _Ctx, chain: K.Chain, n: int, src: int) -> List[A.PartData]:
        """The cells of the last partial block of an n-token prefix, from the entry at ``src``
        tokens (a tail, or the full block holding them)."""
        B, key = self.block_tokens, chain.prefix(src)
        nt, pl = self._fetch(key, "tail" if src % B else "block", c.seed, slot=n // B)
        parts = A.decode_payload(pl, c.lay.n_full)
        if nt != src or (src - 1) // B != n // B or any(p.n != (src - 1) % B + 1 for p in parts):
            self._corrupt(key, CorruptValueError("tail holds the wrong number of cells"))
        return [A.head_cells(p, n % B) for p in parts]

    def _assemble(self, c: _Ctx, toks: np.ndarray, p: _Plan, seq_id: int) -> Any:
        """The sequence blob of the plan's prefix, for ``seq_id``."""
        if G.applies(c.lay, p.n, self.block_tokens):
            return G.gather_kv(self, c, toks, p, seq_id)
        blocks, raw = self._gather(c, toks, p.n, p.tail_src)
        return A.assemble(c.lay, blocks, raw, seq_id, self._buf)

    def _restore(self, c: _Ctx, toks: np.ndarray, seq_id: int, limit: int) -> Tuple[int, str]:
        c.target.check_seq(seq_id)
        reason = ""
        for _attempt in range(8):
            p = self._plan(c, toks, limit)
            reason = p.reason
            if p.n == 0:
                break
            try:
                sec = self._assemble(c, toks, p, seq_id)
            except KeyError:
                reason = "an entry was evicted during the restore"
                continue
            except CorruptValueError as exc:
                reason = f"a corrupt value was found and deleted ({exc})"
                continue
            try:
                if c.target.live:
                    c.target.save_buf = self._save_buf
                c.target.write_seq(sec, seq_id)
            except StoreError as exc:
                self.backend.incr("misses")
                return 0, str(exc)
            finally:
                if isinstance(sec, bytearray) and len(sec) > len(self._buf):
                    self._buf = sec           # reused by the next restore (no page faults)
                del sec
            self.backend.incr("hits")
            self.backend.incr("tokens_saved", p.n)
            return p.n, ("" if p.n == len(toks) else reason)
        self.backend.incr("misses")
        return 0, reason or "not in the store"

    def restore(self, target: Any, tokens: Any, seq_id: int = 0, *, model: Any = None) -> int:
        """Restore the longest stored prefix of ``tokens`` into ``seq_id`` (replacing it); returns its
        token count.  0: nothing restored and the target unchanged (``last_reason`` says why)."""
        with self._lock:
            c = self._ctx(target, model)
            toks = K.tokens_array(tokens)
            n, self.last_reason = self._restore(c, toks, int(seq_id), len(toks))
            return n

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(self, llm: Any, tokens: Any, seq_id: int = 0, *, model: Any = None) -> PrefillResult:
        """Restore the longest usable prefix of ``tokens`` into sequence ``seq_id`` of the live
        context ``llm``, decode the rest in block-aligned chunks (checkpoints every
        ``checkpoint_every`` blocks and at len-1 for sliding-window / recurrent parts), store
        what is new, and leave the context ready to sample after the last token."""
        with self._lock:
            c = self._ctx(llm, model)
        t = c.target
        if not t.live:
            raise TargetError("prefill needs a live llama.cpp context (use put / restore for memories)")
        toks = K.tokens_array(tokens)
        N = len(toks)
        if N == 0:
            raise E.InvalidArgumentError("prefill needs at least one token")
        seq = int(seq_id)
        t.check_decode(seq)
        with self._lock:                # decoding runs outside the lock: one Store serves many contexts
            m, reason = self._restore(c, toks, seq, N - 1)
        self.last_reason = reason
        if m == 0:
            t.seq_rm(seq, 0)
        t.set_tokens(toks[:m], seq)
        B, lay = self.block_tokens, c.lay
        stops: List[int] = []
        if lay.needs_ckpt:
            step = B * self.checkpoint_every
            stops = [k for k in range(step, N, step) if k > m]
            if N - 1 > m and (not stops or stops[-1] != N - 1):
                stops.append(N - 1)
        stops.append(N)
        added = 0
        pos = m
        last_raw: Optional[List[bytes]] = None
        for stop in stops:
            t.decode(toks[pos:stop], pos, seq, logits_last=(stop == N))
            pos = stop
            if stop < N:
                S, orders = self._section(c, toks[:stop], seq)
                # the cells of len-1 tokens come from the tail at len (same block): store only
                # blocks now, the checkpoint after the tail at len exists
                deferred = stop == N - 1 and bool(lay.n_full)
                with self._lock:
                    added += self._store_section(c, toks[:stop], S, orders, stop, not deferred,
                                                 with_tail=not deferred)[0]
                if deferred:
                    last_raw = S.raw
        with self._lock:
            if not self._stored(c, toks, N):       # a full hit stores nothing: skip the copy-out
                S, orders = self._section(c, toks, seq)
                added += self._store_section(c, toks, S, orders, N, True)[0]
            if last_raw is not None:
                # parent: the entry at len (the tail in the same block, or the block ending at len)
                chain = K.Chain(c.seed, B, toks)
                added += self._put_ckpt(c, chain, N - 1, last_raw, N - 1 <= self._pinned_len(c.seed, toks), N)
            self.backend.incr("puts")
            self._enforce()
        return PrefillResult(m, N - m, added, reason)

    # -- policy ----------------------------------------------------------------------------------
    def _pinned_len(self, seed: bytes, toks: np.ndarray) -> int:
        best = 0
        for s, p in self._pins:
            if s == seed and len(p) <= len(toks) and np.array_equal(toks[:len(p)], p):
                best = max(best, len(p))
        return best

    def pin(self, tokens: Any, target: Any = None, *, model: Any = None, pinned: bool = True) -> int:
        """Protect the entries of a prefix (a system prompt) from eviction, now and in later puts
        through this Store.  Without a target, every layout this Store has seen is used.
        Returns the number of entries (un)pinned now."""
        with self._lock:
            toks = K.tokens_array(tokens)
            seeds = [self._ctx(target, model).seed] if target is not None else list(self._seeds)
            n = 0
            B = self.block_tokens
            for seed in seeds:
                if pinned:
                    self._pins.append((seed, toks.copy()))
                else:
                    self._pins = [(s, p) for s, p in self._pins if not (s == seed and np.array_equal(p, toks))]
                chain = K.Chain(seed, B, toks)
                keys = [chain.block(i).hex() for i in range(len(toks) // B)]
                for m in range(1, len(toks) + 1):
                    if m % B:
                        keys.append(chain.prefix(m).hex())
                    keys.append(chain.ckpt(m).hex())
                present = [k for k in keys if self.backend.entry(k) is not None]
                self.backend.set_pinned(present, pinned)
                n += len(present)
            return n

    def _evict(self, budget: int) -> Tuple[int, int]:
        """Apply a byte budget: (entries evicted, bytes freed); the evicted keys are remembered."""
        gone: Dict[str, str] = {}
        n, freed = policy.evict_to_budget(self.backend, budget,
                                          lambda k: gone.__setitem__(k, "evicted by the byte budget"))
        self._forget(gone)
        if n:
            self.backend.incr("evictions", n)
        return n, freed

    def _enforce(self) -> None:
        if self.budget_bytes is not None:
            self._evict(self.budget_bytes)

    def gc(self, budget_bytes: Union[int, str, None] = None) -> Dict[str, int]:
        """Delete entries whose chain has a hole, then apply the byte budget."""
        with self._lock:
            bad = policy.orphans(self.backend.scan())
            n_orph = self._delete(bad, _ORPHAN)
            budget = self.budget_bytes if budget_bytes is None else _budget(budget_bytes)
            n_ev, freed = (0, 0) if budget is None else self._evict(budget)
            return {"orphans": n_orph, "evicted": n_ev, "freed_bytes": freed}

    def verify(self, delete: bool = True) -> Dict[str, Any]:
        """Check every value's envelope and checksum (and chain integrity); bad values are
        deleted unless ``delete=False``."""
        with self._lock:
            checked = 0
            bad: List[str] = []
            for e in list(self.backend.scan()):
                v = self.backend.get(e.key, touch=False)
                if v is None:
                    continue
                checked += 1
                try:
                    kind, n, _seed = V.check_value(v, bytes.fromhex(e.key))
                    if kind != e.kind and not (kind == "probe"):
                        raise CorruptValueError("kind differs from the index")
                except (CorruptValueError, ValueError):
                    bad.append(e.key)
            if delete:
                self._delete(bad, "found corrupt by verify and deleted")
            orph = sorted(policy.orphans(self.backend.scan()))
            if delete:
                self._delete(orph, _ORPHAN)
            return {"checked": checked, "bad": len(bad), "orphans": len(orph), "ok": not bad and not orph,
                    "bad_keys": bad, "orphan_keys": orph}

    def stats(self) -> Dict[str, Any]:
        """entries, bytes, hits, misses, tokens_saved, puts, evictions, corrupt, budget_bytes."""
        with self._lock:
            entries = list(self.backend.scan())
            cnt = self.backend.counters()
            out: Dict[str, Any] = {"entries": len(entries), "bytes": sum(e.size for e in entries)}
            by_kind: Dict[str, int] = {}
            for e in entries:
                by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
            out["by_kind"] = by_kind
            out["pinned"] = sum(1 for e in entries if e.pinned)
            for k in ("hits", "misses", "tokens_saved", "puts", "evictions", "corrupt"):
                out[k] = int(cnt.get(k, 0))
            out["budget_bytes"] = self.budget_bytes
            out["block_tokens"] = self.block_tokens
            out["url"] = self.url
            return out

    def close(self) -> None:
        self._buf, self._save_buf, self._fetch_bufs = bytearray(), [], []
        self._gather_scratch, self._gather_head = bytearray(), bytearray()
        self.backend.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, block_tokens={self.block_tokens})"
