#!/usr/bin/env bash
# Build the second llama.cpp test oracle, llama-cpp-python 0.3.36 (it bundles llama.cpp 0c1e570,
# state format 10), from its PyPI sdist ONCE into a cache folder outside any checkout, keyed by
# version. Idempotent: a complete folder is reused (a few ms). Prints the folder on stdout.
#   PYMEM_LCP_DIR   the folder (default ~/.cache/pymem-oracle/llama-cpp-python-0.3.36)
#   PYTHON          the interpreter whose pip builds it (default python3)
# The tests find the folder the same way (pymem/llama/_bridge_lcp.py: oracle_dir); `pip install --target` layout.
set -euo pipefail
VERSION=0.3.36
DIR=${PYMEM_LCP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pymem-oracle/llama-cpp-python-$VERSION}
PY=${PYTHON:-python3}
if [ -f "$DIR/.complete" ]; then echo "$DIR"; exit 0; fi
mkdir -p "$(dirname "$DIR")"
TMP="$DIR.partial.$$"
rm -rf "$TMP"
start=$(date +%s)
echo "building llama-cpp-python $VERSION from its sdist into $DIR (several minutes)" >&2
CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    nice -n "${PYMEM_LCP_NICE:-10}" "$PY" -m pip install -q --disable-pip-version-check \
    --no-binary llama-cpp-python --target "$TMP" "llama-cpp-python==$VERSION" >&2
# check that it loads (its own libllama, from the folder) before declaring it complete
PYTHONPATH="$TMP" "$PY" -c "import llama_cpp, sys; assert llama_cpp.__version__ == '$VERSION', llama_cpp.__version__" >&2
echo "$VERSION built in $(( $(date +%s) - start )) s" > "$TMP/.complete"
rm -rf "$DIR"
mv "$TMP" "$DIR"
echo "llama-cpp-python $VERSION ready in $(( $(date +%s) - start )) s" >&2
echo "$DIR"
