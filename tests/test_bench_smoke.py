"""Smoke test of the benchmark script: `bench/bench_kv.py --quick` runs and prints its table.
No timing is asserted (the machines are noisy); the script itself checks that llama.cpp and
pymem hold identical state and that the numpy mask equals pymem's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pymem.llama import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_kv.py")
HAVE_LLAMA = _loader.is_available()


def _run(*extra: str) -> str:
    r = subprocess.run([sys.executable, SCRIPT, "--quick", *extra], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout
    for key in ("a", "b", "c"):
        assert f"## [{key}]" in out, out[-2000:]
    for op in ("seq_pos_max(seq)", "seq_keep(seq)", "state set (whole)", "state_write_into (whole) vs np.copyto",
               "kq_mask prealloc: numpy vs pymem kernel=scalar", "cffi floor", "## ratio summary", "# done"):
        assert op in out, (op, out[-2000:])
    return out


@pytest.mark.skipif(not os.path.exists(SCRIPT), reason="bench/ not in this tree")
def test_bench_quick_pymem_only():
    """Oracle-free: pymem vs memcpy / numpy only."""
    out = _run("--no-llama")
    assert "llama.cpp: not used" in out


@pytest.mark.oracle
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-py-sync is not installed")
@pytest.mark.skipif(not os.path.exists(SCRIPT), reason="bench/ not in this tree")
def test_bench_quick_vs_llama():
    """With llama.cpp in-process: both caches filled from one blob and compared."""
    out = _run()
    assert "identical whole state: True" in out
    assert "K-shift (approx)" in out
