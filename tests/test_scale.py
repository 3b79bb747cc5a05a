"""Scale (issue 14, point 4): inspect reads a large session through mmap, so its peak memory
stays well below the file size; progress bars are tqdm's."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from pymem import state


def write_big_session(path, n_cells=4096, n_layer=4, row=8192):
    """A llama.cpp session (format 11, one f16 KV stream, seq 0 at positions 0..n-1) whose row
    data are holes of a sparse file: large on disk, free to make."""
    arch = b"llama"
    with open(path, "wb") as f:
        f.write(struct.pack("<III", 0x6767736E, 11, n_cells))
        f.write(struct.pack(f"<{n_cells}i", *[i % 100 for i in range(n_cells)]))
        f.write(struct.pack("<I", len(arch)) + arch)
        f.write(struct.pack("<II", 1, n_cells))
        f.write(b"".join(struct.pack("<iIi", i, 1, 0) for i in range(n_cells)))
        f.write(struct.pack("<IIII", 0, n_layer, 0, 0))
        for _ in range(2 * n_layer):   # K layers, then V layers
            f.write(struct.pack("<iQ", 1, row))
            f.seek(n_cells * row, os.SEEK_CUR)
        f.truncate(f.tell())
    return os.path.getsize(path)


# VmHWM: this process's peak resident set (ru_maxrss would carry the forking parent's peak)
PEAK = ("import sys\nfrom pymem import cli\nrc = cli.main(sys.argv[1:])\nsys.stdout.flush()\n"
        "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "sys.stderr.write('PEAK %s\\n' % hwm)\nsys.exit(rc)\n")


def peak_kib(tmp_path, *argv, env=None):
    r = subprocess.run([sys.executable, "-c", PEAK, *map(str, argv)], capture_output=True, text=True, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.rsplit("PEAK", 1)[1].split()[0]), r.stdout


def test_inspect_large_session_peak_memory(tmp_path):
    big = tmp_path / "big.session"
    size = write_big_session(big)
    assert size > 256 << 20
    s = state.load(big)   # parses, zero-copy over the mapping
    assert len(s.tokens) == 4096 and s.sequences()[0][0].pos_max == 4095
    small = tmp_path / "small.session"
    write_big_session(small, n_cells=16, n_layer=4, row=256)
    base, _ = peak_kib(tmp_path, "inspect", small)
    peak, out = peak_kib(tmp_path, "inspect", big)
    assert "4096 cells" in out
    grew = (peak - base) * 1024
    print(f"inspect {size / 2**20:.0f} MiB session: peak RSS {peak / 1024:.0f} MiB "
          f"(+{grew / 2**20:.0f} MiB over a tiny file)")
    assert grew < size // 8, (grew, size)
    # the same read without mmap holds the whole file (the old behaviour)
    env = dict(os.environ, PYMEM_NO_MMAP="1")
    whole, _ = peak_kib(tmp_path, "inspect", big, env=env)
    assert (whole - base) * 1024 > size // 2


def test_mapped_file_edited_in_place(tmp_path, capsys):
    from pymem import cli
    from pymem.state import mapped

    p = tmp_path / "mid.session"
    size = write_big_session(p, n_cells=640, n_layer=2, row=8192)
    assert size >= mapped.MAP_MIN
    assert isinstance(mapped.read(p), __import__("mmap").mmap)
    rc = cli.main(["edit", str(p), "--truncate", "100", "-o", str(p)])
    out = capsys.readouterr()
    assert rc == 0 and "tokens: 640 -> 100" in out.out, out
    s = state.load(p)
    assert s.tokens == [i % 100 for i in range(100)] and s.sequences()[0][0].pos_max == 99


def test_diff_large_sessions_no_whole_copies(tmp_path):
    """diff compares chunk by chunk: besides the two mapped files it holds no copy of them
    (it used to join every section and dump both files whole: ~5x the file size)."""
    a, b = tmp_path / "a.session", tmp_path / "b.session"
    size = write_big_session(a, n_cells=2048, n_layer=2, row=8192)
    write_big_session(b, n_cells=2048, n_layer=2, row=8192)
    small = tmp_path / "small.session"
    write_big_session(small, n_cells=16, n_layer=2, row=256)
    base, _ = peak_kib(tmp_path, "diff", small, small)
    peak, out = peak_kib(tmp_path, "diff", a, b)
    assert out.strip().endswith("identical")
    grew = (peak - base) * 1024
    print(f"diff of two {size / 2**20:.0f} MiB sessions: +{grew / 2**20:.0f} MiB")
    assert grew < 2.5 * size, (grew, size)
