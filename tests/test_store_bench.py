"""Smoke test: ``bench/bench_store.py --quick`` runs and prints its three tables (no timing asserted)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from store_backends import needs_llama

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_store.py")


@needs_llama
@pytest.mark.skipif(not os.path.exists(SCRIPT), reason="bench/ not in this tree")
def test_bench_store_quick(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for line in ("## time to first token", "## restore of", "% of memcpy", "B/token", "of llama.cpp"):
        assert line in r.stdout, r.stdout


RESTORE = os.path.join(os.path.dirname(SCRIPT), "bench_restore.py")


@pytest.mark.skipif(not os.path.exists(RESTORE), reason="bench/ not in this tree")
def test_bench_restore_quick(tmp_path):
    """``bench/bench_restore.py --quick`` (no llama.cpp) runs its tables (no timing asserted)."""
    r = subprocess.run([sys.executable, RESTORE, "--quick"], capture_output=True, text=True, timeout=600,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for line in ("## 1. fetch + assemble", "memory", "embedded", "## 2. lookup"):
        assert line in r.stdout, r.stdout
