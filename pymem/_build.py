"""What this installed pymem is: its version, the llama.cpp builds whose memory and state
formats it conforms to (vendor/llama-cpp.json, installed as pymem/_llama_cpp.json), and the
SIMD kernel the C core chose on this CPU.  ``pymem --version`` prints ``version_text()``."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

__all__ = ["llama_cpp_builds", "info", "version_text"]

_HERE = os.path.dirname(os.path.abspath(__file__))
# installed next to the package by CMakeLists.txt; the source tree keeps it in vendor/
_PIN_PATHS = (os.path.join(_HERE, "_llama_cpp.json"),
              os.path.join(os.path.dirname(_HERE), "vendor", "llama-cpp.json"))


def _pin() -> Dict[str, Any]:
    for path in _PIN_PATHS:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except OSError:
            continue
    raise FileNotFoundError("pymem's llama.cpp pin (pymem/_llama_cpp.json) is missing from this install")


def llama_cpp_builds() -> List[Dict[str, Any]]:
    """The llama.cpp builds pymem conforms to, target first: tag or commit, state format, and the
    PyPI distribution that ships each."""
    pin = _pin()
    t, s = pin["target"], pin["sources"]
    return [
        {"build": t["llama_cpp_tag"], "commit": t["llama_cpp_commit"], "state_format": t["state_format"],
         "pypi": f'{t["wheel"]}=={t["version"]}'},
        {"build": s["llama_cpp_commit"][:7], "commit": s["llama_cpp_commit"], "state_format": s["state_format"],
         "pypi": f'{s["package"]}=={s["version"]}'},
    ]


def info() -> Dict[str, Any]:
    """version, llama_cpp (llama_cpp_builds()), kernel (active), kernels (this CPU can run)."""
    import pymem

    from . import kernels

    return {"version": pymem.__version__, "llama_cpp": llama_cpp_builds(),
            "kernel": kernels.active(), "kernels": kernels.available()}


def version_text() -> str:
    i = info()
    lines = [f"pymem {i['version']}"]
    for n, b in enumerate(i["llama_cpp"]):
        label = "conforms to llama.cpp" if n == 0 else "                  and"
        commit = "" if b["commit"].startswith(b["build"]) else f"commit {b['commit'][:9]}, "
        lines.append(f"{label} {b['build']} ({commit}state format {b['state_format']}, {b['pypi']})")
    lines.append(f"SIMD kernel: {i['kernel']} (this CPU can run: {', '.join(i['kernels'])})")
    return "\n".join(lines)
