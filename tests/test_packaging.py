"""The installed distribution: one version everywhere (pyproject.toml -> CMake -> pm_version() ->
pymem.__version__ -> the wheel's metadata), the llama.cpp pin shipped in the package, the
license in the wheel, and ``pymem --version`` reporting version, llama.cpp builds and the
SIMD kernel actually chosen at start-up."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys

import pytest

import pymem
from pymem import _build, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
PIN = os.path.join(ROOT, "vendor", "llama-cpp.json")
PYMEM = [sys.executable, "-m", "pymem"]  # this interpreter's pymem, whatever is on PATH


def test_one_version():
    v = pymem.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", v)
    assert md.version("pymem") == v
    if os.path.exists(PYPROJECT):  # tests run from a checkout; the sdist / wheel tests may not have it
        with open(PYPROJECT, encoding="utf-8") as f:
            m = re.search(r'^version = "([^"]+)"', f.read(), re.M)
        assert m and m.group(1) == v
    major, minor = (int(x) for x in v.split(".")[:2])
    assert (pymem._lib.PM_VERSION_MAJOR, pymem._lib.PM_VERSION_MINOR) == (major, minor)


def test_license_and_pin_installed():
    files = {str(f).replace("\\", "/") for f in md.files("pymem") or ()}
    assert any(f.endswith(".dist-info/licenses/LICENSE") or f.endswith(".dist-info/LICENSE") for f in files)
    assert "pymem/_llama_cpp.json" in files
    meta = md.metadata("pymem")
    assert meta["License"] == "MIT" or "MIT" in (meta.get("License-Expression") or "")
    assert "Programming Language :: Python :: 3.9" in meta.get_all("Classifier")
    builds = _build.llama_cpp_builds()
    assert [b["state_format"] for b in builds] == [11, 10]
    if os.path.exists(PIN):  # the installed copy is the checkout's pin
        with open(PIN, encoding="utf-8") as f:
            pin = json.load(f)
        assert builds[0]["build"] == pin["target"]["llama_cpp_tag"]
        assert builds[0]["pypi"] == f'{pin["target"]["wheel"]}=={pin["target"]["version"]}'
        assert builds[1]["commit"] == pin["sources"]["llama_cpp_commit"]


@pytest.mark.parametrize("env", [{}, {"PYMEM_FORCE_SCALAR": "1"}])
def test_version_command(env, tmp_path):
    """The kernel line is the start-up choice of the process: the best this CPU runs, or the
    forced scalar table."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PYMEM_FORCE")}
    full.update(env)
    r = subprocess.run([*PYMEM, "--version"], capture_output=True, text=True, env=full, timeout=60,
                       cwd=tmp_path)  # not the source tree
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"pymem {pymem.__version__}"
    pin = _build.llama_cpp_builds()
    assert pin[0]["build"] in lines[1] and pin[0]["pypi"] in lines[1] and "state format 11" in lines[1]
    assert pin[1]["build"] in lines[2] and "state format 10" in lines[2]
    want = "scalar" if env else kernels.available()[-1]
    assert lines[3].startswith(f"SIMD kernel: {want} (")
    assert ", ".join(kernels.available()) in lines[3]
