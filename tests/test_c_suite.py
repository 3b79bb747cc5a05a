"""The C tests (tests/c, run by ctest) inside the pytest run: configure, build and run them
once, and report ctest's summary.  CI also runs them under ASan/UBSan (.ci/run)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE = shutil.which("cmake")
CTEST = shutil.which("ctest")


@pytest.mark.skipif(CMAKE is None or CTEST is None, reason="needs cmake/ctest")
@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "tests", "c")), reason="C tests not in this tree")
def test_c_suite():
    with tempfile.TemporaryDirectory(prefix="pymem-ctest-") as build:
        cfg = subprocess.run([CMAKE, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                              "-DPYMEM_BUILD_TESTS=ON", f"-DPython_EXECUTABLE={sys.executable}"],
                             capture_output=True, text=True)
        assert cfg.returncode == 0, cfg.stdout + cfg.stderr
        b = subprocess.run([CMAKE, "--build", build, "-j2"], capture_output=True, text=True)
        assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-4000:]
        env = dict(os.environ, PYMEM_VECTORS_DIR=os.path.join(ROOT, "tests", "vectors"))
        r = subprocess.run([CTEST, "--test-dir", build, "--output-on-failure"], capture_output=True,
                           text=True, env=env)
        summary = [line for line in r.stdout.splitlines() if "tests passed" in line or "passed," in line]
        print("\n".join(summary))
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        _check_isa_confinement(build)


def _check_isa_confinement(build: str) -> None:
    """Portability: AVX instructions (VEX/EVEX-encoded, ymm/zmm) appear only in the kernel
    files compiled for them; everything else runs on baseline x86-64 (no -march=native)."""
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() not in ("x86_64", "AMD64"):
        return
    objs = [os.path.join(d, f) for d, _, fs in os.walk(build) for f in fs
            if f.endswith(".o") and "pymem_core.dir" in d]
    assert objs, "no object files of pymem_core found"
    for obj in objs:
        asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", obj], capture_output=True, text=True).stdout
        avx = [ln for ln in asm.splitlines() if "\t" in ln and ln.split("\t")[-1].startswith("v")]
        name = os.path.basename(obj)
        if name.startswith(("avx2.c", "avx512.c")):
            assert avx, f"{name}: no AVX instructions (the kernel flags did not apply)"
        else:
            assert not avx, f"{name} uses AVX instructions outside the kernels: {avx[:3]}"
