"""pm_copy_hash128 (the store's copy + checksum pass, kernels/copyhash.inc): for every kernel
table, the copies land where the runs say and the digest is Python xxhash's XXH3-128 of the
sources in run order; bad arguments are refused."""
from __future__ import annotations

import numpy as np
import pytest
import xxhash

import pymem
from pymem import kernels
from pymem._native import ffi, lib
from pymem.store.gather import _addr, copy_hash
from pymem.store.errors import CorruptValueError


def _runs(rng, src, dst):
    """Random runs over src/dst: contiguous and strided, short rows (grouped per chunk) and rows
    longer than a chunk, hash-only runs (dst 0), empty runs; plus the bytes they hash and the
    expected dst."""
    runs, hashed, want = [], [], dst.copy()
    s = d = 0
    for _ in range(12):
        n_rows = int(rng.integers(0, 40))
        row = int(rng.choice([0, 1, 7, 512, 5000, 40000]))
        s_stride = row + int(rng.choice([0, 0, 3]))
        d_stride = row + int(rng.integers(0, 9))
        span_s, span_d = n_rows * s_stride, n_rows * d_stride
        if s + span_s > len(src) or d + span_d > len(dst):
            break
        copy = bool(rng.integers(0, 3))
        runs.append((_addr(src) + s, _addr(dst) + d if copy else 0, n_rows, row, s_stride, d_stride))
        for i in range(n_rows):
            piece = src[s + i * s_stride:s + i * s_stride + row]
            hashed.append(piece.tobytes())
            if copy:
                want[d + i * d_stride:d + i * d_stride + row] = piece
        s += span_s
        d += span_d if copy else 0
    return np.array(runs, np.uint64).reshape(-1, 6), b"".join(hashed), want


@pytest.mark.parametrize("kernel", kernels.available())
def test_copies_and_digest_match_xxhash(kernel):
    rng = np.random.default_rng(5)
    with kernels.forced(kernel):
        for _ in range(30):
            src = rng.integers(0, 256, 2_000_000, dtype=np.uint8)
            dst = np.zeros(2_500_000, np.uint8)
            runs, hashed, want = _runs(rng, src, dst)
            digest = xxhash.xxh3_128(hashed).digest()
            copy_hash(runs, digest)                              # raises unless equal
            assert np.array_equal(dst, want)
            bad = bytearray(digest)
            bad[3] ^= 1
            with pytest.raises(CorruptValueError, match="checksum mismatch"):
                copy_hash(runs, bytes(bad))


def test_bad_arguments():
    out = ffi.new("uint8_t[16]")
    runs = ffi.new("pm_copy_run[]", 1)
    runs[0].n_rows, runs[0].row_bytes = 1, 8                     # no source
    assert lib.pm_copy_hash128(runs, 1, out) == lib.PM_E_INVALID_ARG
    assert lib.pm_copy_hash128(ffi.NULL, 1, out) == lib.PM_E_INVALID_ARG
    assert lib.pm_copy_hash128(runs, 0, ffi.NULL) == lib.PM_E_INVALID_ARG
    buf = ffi.new("uint8_t[8]")
    runs[0].src = buf
    runs[0].n_rows, runs[0].src_stride = 2 ** 63, 2 ** 62              # past the address space
    assert lib.pm_copy_hash128(runs, 1, out) == lib.PM_E_INVALID_ARG
    assert lib.pm_copy_hash128(runs, 0, out) == 0                      # nothing: the empty hash
    assert bytes(out) == xxhash.xxh3_128(b"").digest()
    with pytest.raises(pymem.InvalidArgumentError, match="pm_copy_hash128"):
        copy_hash(np.array([[0, 0, 1, 8, 0, 0]], np.uint64), b"\0" * 16)
