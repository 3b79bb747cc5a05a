"""The prompt-cache round of ``pymem demo`` (pymem/store/demo.py): prefill in one process, restore in
a new one, all five memory kinds, through the embedded store."""
from __future__ import annotations

import pytest

from store_backends import KIND_MODELS, model_path, needs_llama


@needs_llama
def test_store_demo_round(tmp_path):
    from pymem.store import StoreError
    from pymem.store.backends import open_backend
    from pymem.store.demo import run

    try:
        open_backend(str(tmp_path / "probe")).close()
    except StoreError:
        pytest.skip("the embedded backend is not in this tree")
    paths = {n: model_path(n) for n in KIND_MODELS.values()}
    rows, failures = run(paths)
    assert failures == 0, rows
    assert len(rows) == 10
    assert all(r[3].startswith("ok") for r in rows), rows
    assert sum("53/53 tokens restored" in r[3] for r in rows) == 5
