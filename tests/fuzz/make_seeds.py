#!/usr/bin/env python3
"""Write the synthetic part of the fuzz seed corpus (the real llama.cpp blobs, llama_*, come
from tests/vectors/regen.py):

* corpus/fuzz_batch/seed_*: command streams in fuzz_batch.c's input format, one or two per
  configuration: batches of one and several sequences, coupled tokens, NULL positions,
  embeddings, then sequence operations, updates and state round trips;
* corpus/fuzz_kv_state/synth_*: whole and per-sequence states of the small configurations
  (9-14 of fuzz_kv_state.c), written by pymem after a few decodes.

Deterministic; needs the installed pymem package:  python tests/fuzz/make_seeds.py
"""
from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---- fuzz_batch -------------------------------------------------------------------------------


def batch(tokens, flags=0b111, mask=0):
    """tokens: (tok, [ids], pos byte or raw int, out).  flags: bit0 pos, bit1 ids, bit2 output,
    bit3 embeddings, bit4 raw positions; mask: KQ-mask mode (3 bits)."""
    out = bytearray([0, len(tokens), flags | (mask << 5)])
    for tok, ids, pos, o in tokens:
        out.append(tok & 0xFF)
        if flags & 2:
            out.append(len(ids) - 1)
        out += bytes(i & 0xFF for i in (ids if flags & 2 else ids[:1]))
        out += struct.pack("<i", pos) if flags & 16 else bytes([pos & 0xFF])
        out.append(o)
    return bytes(out)


def op(cmd, seq, p0, p1, sub=0, extra=b""):
    return bytes([cmd, seq & 0xFF, p0 & 0xFF, p1 & 0xFF, sub & 0xFF]) + extra


def fuzz_batch_seeds() -> dict[str, bytes]:
    seeds = {}
    for cfg in range(10):
        one = [(i * 3 % 128, [0], 0, 1 if i == 5 else 0) for i in range(6)]
        two = [(i, [i % 2], 0, 1) for i in range(8)]
        coupled = [(7, [0, 1], 0, 0), (8, [1, 0], 0, 1)]
        body = (batch(one) + batch(two) + op(5, 0, 3, 5) + batch(coupled) + op(6, 0, 0, 0, 0, bytes([1]))
                + op(7, 1, 1, 0, 2) + op(8, 0, 0, 0, 1) + batch([(9, [0], 0, 1)], flags=0b011)
                + op(7, 0, 1, 0, 3) + op(9, 0, 0, 0, 0, bytes([1])) + op(8, 1, 0, 0, 0)
                + batch([(1, [0], 0, 1), (2, [1], 0, 1)], flags=0b1110, mask=3))
        seeds[f"seed_c{cfg}_mixed"] = bytes([cfg, cfg % 8]) + body
        raw = [(5, [0], 1000 + i, 1) for i in range(4)] + [(6, [1], 2**31 - 2, 1), (7, [1], 2**31 - 1, 1)]
        body2 = (batch(raw, flags=0b10111) + op(7, 0, 0, 255, 0x81, struct.pack("<i", 2**31 - 1))
                 + batch([(1, [0], 0, 1)] * 3, flags=0) + op(5, 250, 255, 255)
                 + op(7, 1, 0, 255, 0x80, struct.pack("<i", -(2**31))))
        seeds[f"seed_c{cfg}_edges"] = bytes([cfg, 8 | (cfg * 3 % 8)]) + body2
    return seeds


# ---- fuzz_kv_state ------------------------------------------------------------------------------
# configurations 9-14 of fuzz_kv_state.c: size, n_seq_max, unified, v_trans, format, n_swa,
# n_pos, type_k, type_v, swa_type, head, n_layer_model, cell_ext, arch
SYNTH = {
    9: (16, 2, 1, 1, 11, 0, 1, "f32", "f32", "none", 32, 3, 0, "tiny"),
    10: (8, 3, 0, 0, 11, 0, 1, "f16", "f16", "none", 32, 2, 0, "tiny"),
    11: (32, 2, 1, 1, 11, 4, 1, "f16", "f16", "standard", 32, 2, 0, "swa"),
    12: (16, 2, 1, 0, 11, 0, 1, "f16", "f16", "none", 32, 2, 1, "ext"),
    13: (16, 2, 1, 0, 11, 0, 4, "f16", "bf16", "none", 32, 2, 1, "mrope"),
    14: (24, 3, 1, 0, 10, 3, 1, "q8_0", "f32", "chunked", 32, 3, 0, None),
}


def kv_state_seeds() -> dict[str, bytes]:
    import numpy as np

    import pymem

    seeds = {}
    for cfg, (size, nseq, unified, vt, fmt, nswa, npos, tk, tv, swt, head, nl, ext, arch) in SYNTH.items():
        heads = [1] * nl
        if nl > 2:
            heads[nl - 1] = 2
        mode = "mrope" if npos > 1 else "norm"
        mem = pymem.KVCache(n_layer=nl, layers=[0, nl - 1], n_head_kv=heads, n_embd_head_k=head, size=size,
                            n_seq_max=nseq, type_k=tk, type_v=tv, v_trans=bool(vt), unified=bool(unified),
                            n_swa=nswa, swa_type=swt, n_pos_per_embd=npos, cell_ext=bool(ext), format=fmt,
                            rope=pymem.Rope(n_rot=head, mode=mode), arch=arch)
        rng = np.random.default_rng(cfg)
        for s in range(nseq):
            n = min(5, size // nseq)
            pos = list(range(n))
            if npos > 1:
                pos = np.array([pos, pos, [p + 1 for p in pos], [0] * n])
            b = pymem.Batch(tokens=[(7 * i + s) % 128 for i in range(n)], pos=pos, seq_ids=[[s]] * n)
            for ub in mem.decode(b):
                for il in mem.layers:
                    li = mem._layers[il][1]
                    ub.store(il, k=rng.normal(size=(ub.n_tokens, li.n_embd_k_gqa)).astype(np.float32),
                             v=rng.normal(size=(ub.n_tokens, li.n_embd_v_gqa)).astype(np.float32))
        if unified and nseq > 1:
            mem.seq_cp(0, 1, 1, 3)
        mem.seq_rm(0, 2, 3)
        if arch is not None:
            seeds[f"synth_c{cfg}_whole_llama"] = bytes([cfg, 0b1]) + mem.state_write(envelope="llama")
        seeds[f"synth_c{cfg}_whole_bare"] = bytes([cfg, 0b100000]) + mem.state_write()
        seeds[f"synth_c{cfg}_seq1"] = bytes([cfg, 0b10100111]) + mem.state_write(1, envelope="llama")
        seeds[f"synth_c{cfg}_seq0_bare"] = bytes([cfg, 0b010]) + mem.state_write(0)
    return seeds


# ---- fuzz_mem_state ----------------------------------------------------------------------------


def mem_state_seeds() -> dict[str, bytes]:
    """Whole, per-sequence and PARTIAL_ONLY states of the memories of fuzz_mem_state.c (same
    parameters), written by pymem after the target's own prefill."""
    import pymem

    def kv(layers, unified, v_trans, swa):
        return dict(n_layer=4, layers=layers, n_head_kv=[1, 1, 2, 2] if layers != [0, 2] else [1, 1, 2, 1],
                    n_embd_head_k=32, size=16, n_seq_max=3, v_trans=v_trans, unified=unified,
                    swa_type="standard" if swa else "none", n_swa=4 if swa else 0,
                    rope=pymem.Rope(n_rot=32, mode="neox"), arch="fz")

    def rec(n_rs_seq):
        return dict(n_layer=4, layers=[1, 3], n_embd_r=32, n_embd_s=64, size=3, n_seq_max=3, n_rs_seq=n_rs_seq,
                    arch="fz")

    def make(kind):
        unified = kind % 2 == 0
        if kind < 2:
            base = kv([1, 3], unified, True, False)
            base["n_head_kv"] = [1, 1, 1, 2]
            swa = kv([0, 2], unified, True, True)
            swa["n_head_kv"] = [1, 1, 2, 1]
            return pymem.KVCacheISWA(base=base, swa=swa)
        if kind < 4:
            return pymem.RecurrentMemory(**rec(2 if kind == 3 else 0))
        if kind < 6:
            a = kv([0, 2], unified, False, False)
            a["n_head_kv"] = [1, 1, 2, 1]
            return pymem.HybridMemory(attn=a, recurrent=rec(2))
        base = kv([], unified, False, False)
        swa = kv([0, 2], unified, False, True)
        swa["n_head_kv"] = [1, 1, 2, 1]
        return pymem.HybridISWAMemory(attn={"base": base, "swa": swa}, recurrent=rec(0))

    out = {}
    for kind in range(8):
        m = make(kind)
        for s, n in ((0, 5), (1, 3)):
            m.decode(pymem.Batch(tokens=list(range(1, n + 1)), pos=list(range(n)), seq_ids=[[s]] * n), n_ubatch=8)
        for seq in (-1, 0, 1):
            for flags in (0, 1):
                for env in (None, "llama"):
                    if seq == -1 and flags:
                        continue
                    mode = (1 if env else 0) | (2 | (seq << 2) if seq >= 0 else 0) | (0x40 if flags else 0)
                    blob = m.state_write(seq, flags=flags, envelope=env)
                    out[f"synth_k{kind}_s{seq}_f{flags}_{env or 'bare'}"] = bytes([kind, mode]) + blob
                    out[f"synth_k{kind}_s{seq}_f{flags}_{env or 'bare'}_pre"] = bytes([kind, mode | 0x20]) + blob
    return out


def main() -> None:
    for target, seeds in (("fuzz_batch", fuzz_batch_seeds()), ("fuzz_kv_state", kv_state_seeds()),
                          ("fuzz_mem_state", mem_state_seeds())):
        d = HERE / "corpus" / target
        d.mkdir(parents=True, exist_ok=True)
        prefix = "seed_" if target == "fuzz_batch" else "synth_"
        for old in d.glob(prefix + "*"):
            old.unlink()
        for name, data in sorted(seeds.items()):
            (d / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
