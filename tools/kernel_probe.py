"""Run the SIMD kernels of an installed pymem through its public API and print the kernel the C
core chose at start-up and a digest of the results.  Every CPU must give the same digest:
.ci/wheels.sh runs this under qemu-x86_64 -cpu <model> (detection picks scalar / avx2) and
natively (avx512 where the CPU has it) and compares.

Exercised: f32 -> f16 and f32 -> bf16 K/V row conversion (store), the K-shift RoPE and the
cache writes of update() after seq_add, and the state writer."""
import hashlib
import sys

import numpy as np

import pymem


def digest() -> str:
    h = hashlib.sha256()
    rng = np.random.default_rng(7)
    for type_k, type_v in (("f16", "f16"), ("f32", "bf16")):
        kv = pymem.KVCache(n_layer=2, n_head_kv=2, n_embd_head_k=64, size=64, n_seq_max=2,
                           type_k=type_k, type_v=type_v,
                           rope=pymem.Rope(n_rot=64, freq_base=10000.0), arch="llama")
        n = 37
        ctx = kv.decode(pymem.Batch(tokens=list(range(n)), pos=list(range(n)), seq_ids=[[0]] * n))
        for ub in ctx:
            for layer in range(2):
                rows = (rng.standard_normal((ub.n_tokens, 128)) * 4).astype(np.float32)
                ub.store(layer, k=rows, v=rows[::-1].copy())
        kv.seq_cp(0, 1)
        kv.seq_add(1, 5, -1, 11)
        kv.update()
        h.update(kv.state_write())
    return h.hexdigest()


if __name__ == "__main__":
    print(pymem.kernels.active(), digest())
    sys.exit(0)
