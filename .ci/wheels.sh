#!/usr/bin/env bash
# CI step (called by .ci/run; runs alone too): what a user installs, not the source tree.
#  1. C tests on other CPUs: cross-compiled for aarch64 under qemu-aarch64 (NEON == scalar bit for
#     bit), and under qemu-x86_64 CPU models so detection picks each kernel (tools/qemu_tests.sh;
#     Debian's gcc-aarch64-linux-gnu and qemu-user are installed when missing and possible).
#  2. tools/build_wheels.sh: the sdist, the cp39-abi3 wheel built from it, auditwheel-repaired to
#     manylinux, glibc-only links and abi3audit checked.
#  3. The wheel installed (binary packages only) into a fresh virtual environment of every CPython
#     3.9-3.13 on the machine (pyenv's or on PATH; none is downloaded), each run with a PATH
#     holding nothing but that environment (no compiler): the oracle-free tests - all of them in
#     the oldest Python, a smoke subset in the others (PYMEM_WHEELS_FULL=1: all in every one) -
#     and `pymem estimate --shape llama3-8b` / `pymem --version`; then the installed wheel under
#     qemu-x86_64 CPU models (tools/kernel_probe.py: detected kernel, same state bytes).
#  4. The sdist installed with pip into a fresh environment (compiles), smoke tests again.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYMEM_CACHE_DIR=${PYMEM_CACHE_DIR:-$WORK/cache}
T0=$(date +%s)
step() { printf '\n=== wheels: %s (%s, +%ss)\n' "$*" "$(date +%H:%M:%S)" "$(($(date +%s) - T0))"; }
SMOKE=(test_packaging.py test_types_unit.py test_vectors.py test_gguf.py test_state.py test_kv_unit.py)

step "C tests under qemu: aarch64 (cross-compiled) and x86-64 CPU models"
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
        || ! command -v qemu-x86_64 >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        $SUDO apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; } >"$WORK/apt.log" 2>&1 \
        || echo "(apt-get could not install gcc-aarch64-linux-gnu / qemu-user: see below)"
fi
if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
    tools/qemu_tests.sh "$WORK/qemu"
else
    tail -5 "$WORK/apt.log" 2>/dev/null || true
    echo "SKIPPED: no cross compiler / qemu on this machine"
fi

step "build: sdist, abi3 wheel from it, auditwheel repair, checks"
PYMEM_BUILD_TOOLS_VENV=$WORK/tools tools/build_wheels.sh "$WORK/dist"
WHL=$(ls "$WORK"/dist/pymem-*.whl)
SDIST=$(ls "$WORK"/dist/pymem-*.tar.gz)

# The tests run from a copy of the checkout in another directory: the installed wheel is what
# `import pymem` finds (pytest puts only tests/ on sys.path; commands run from $WORK), while the
# tests that read the sources (file sizes, the header, writers) read the ones the wheel was built from.
SRC=$WORK/src
mkdir -p "$SRC"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC" 2>/dev/null || true
else
    cp -r tests pymem csrc vendor bench tools pyproject.toml CMakeLists.txt README.md "$SRC/"
fi
TESTS=$SRC/tests

# every CPython 3.9-3.13 found: pyenv's versions, else pythonX.Y on PATH
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
PYTHONS=()
for v in 9 10 11 12 13; do
    p=""
    for cand in "$PYENV_ROOT"/versions/3."$v".*/bin/python3."$v"; do
        [ -x "$cand" ] && p=$cand
    done
    if [ -z "$p" ]; then
        p=$(command -v "python3.$v" || true)
        case "$p" in */shims/*) p="" ;; esac  # a pyenv shim of a version pyenv does not have
    fi
    if [ -n "$p" ] && "$p" -c 'import sys, venv; assert sys.implementation.name == "cpython"' 2>/dev/null; then
        PYTHONS+=("$p")
    else
        echo "CPython 3.$v: not on this machine (not downloaded; not tested)"
    fi
done
[ "${#PYTHONS[@]}" -gt 0 ] || { echo "no CPython 3.9-3.13 found" >&2; exit 1; }

# install_and_test PYTHON full|smoke: fresh venv, the wheel, the tests; PATH = the venv only
install_and_test() {
    local py=$1 mode=$2 ver V log rc
    ver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    V=$WORK/venv-$ver
    log=$WORK/py-$ver.log
    # (&& chains: `set -e` does not apply inside a function called as `f || ...`)
    local P=(env -u PYTHONPATH -u PYMEM_REQUIRE_REDIS -u PYMEM_REQUIRE_LCP PATH="$V/bin" PYMEM_CACHE_DIR="$PYMEM_CACHE_DIR")
    local sel=("${SMOKE[@]/#/$TESTS/}")
    [ "$mode" = full ] && sel=("$TESTS")
    {
        "$py" -m venv "$V" &&
        "${P[@]}" python -c 'import shutil, sys
found = [c for c in ("cc", "gcc", "clang", "c++", "g++", "cmake", "ld") if shutil.which(c)]
sys.exit(f"a compiler/build tool is on PATH: {found}" if found else 0)' &&
        "${P[@]}" python -m pip install -q --no-compile --only-binary :all: "$WHL" "pytest>=7" "hypothesis>=6.80" &&
        (cd "$WORK" && "${P[@]}" pymem --version && "${P[@]}" pymem estimate --shape llama3-8b) &&
        (cd "$WORK" && "${P[@]}" python -c 'import pymem, sys; sys.exit(0 if "site-packages" in pymem.__file__ else pymem.__file__)') &&
        (cd "$WORK" && "${P[@]}" pytest -q -m "not oracle" -p no:cacheprovider "${sel[@]}")
    } >"$log" 2>&1 && rc=0 || rc=$?
    echo "CPython $ver ($mode): $([ $rc = 0 ] && echo ok || echo FAILED) - $(grep -E '^[0-9]+ passed|passed|failed|error' "$log" | tail -1)"
    [ $rc = 0 ] || { tail -40 "$log"; return 1; }
}

step "install the wheel into CPython ${#PYTHONS[@]} versions, no compiler on PATH"
fail=0
# one at a time (the suite has timing-sensitive tests: SIGKILL mid-save, thread interleaving);
# the oldest Python runs the whole oracle-free suite, the others the smoke set
for i in "${!PYTHONS[@]}"; do
    mode=smoke
    [ "$i" = 0 ] || [ "${PYMEM_WHEELS_FULL:-0}" = 1 ] && mode=full
    install_and_test "${PYTHONS[$i]}" "$mode" || fail=1
done
grep -h -A1 "^pymem [0-9]" "$WORK"/py-*.log | head -2
[ "$fail" = 0 ] || exit 1

step "the installed wheel under qemu-x86_64 CPU models: detected kernel, same results"
if command -v qemu-x86_64 >/dev/null; then
    last=$("${PYTHONS[-1]}" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    LV=$WORK/venv-$last
    ref=$(cd "$WORK" && env -u PYMEM_FORCE_SCALAR -u PYMEM_FORCE_KERNEL "$LV/bin/python" "$ROOT/tools/kernel_probe.py")
    echo "  CPython $last, this CPU: $ref"
    # numpy's bundled OpenBLAS dies with SIGILL under qemu's older models unless its core type is
    # pinned (pymem needs no such thing: the C tests above ran bare)
    for spec in "Nehalem scalar" "Haswell,-f16c scalar" "Haswell avx2"; do
        read -r cpu want <<<"$spec"
        got=$(cd "$WORK" && env -u PYMEM_FORCE_SCALAR -u PYMEM_FORCE_KERNEL OPENBLAS_CORETYPE=NEHALEM \
              qemu-x86_64 -cpu "$cpu" "$LV/bin/python" "$ROOT/tools/kernel_probe.py" 2>/dev/null) || got="FAILED"
        echo "  -cpu $cpu: $got"
        [ "$got" = "$want ${ref#* }" ] || { echo "expected '$want ${ref#* }'" >&2; fail=1; }
    done
    [ "$fail" = 0 ] || exit 1
else
    echo "SKIPPED: no qemu-x86_64"
fi

step "sdist: pip install it into a fresh environment (builds from source), smoke tests"
SV=$WORK/venv-sdist
python3 -m venv "$SV"
"$SV/bin/python" -m pip install -q "$SDIST" "pytest>=7" "hypothesis>=6.80" >"$WORK/sdist.log" 2>&1 \
    || { tail -40 "$WORK/sdist.log"; exit 1; }
(cd "$WORK" && env -u PYTHONPATH -u PYMEM_REQUIRE_REDIS -u PYMEM_REQUIRE_LCP PATH="$SV/bin:$PATH" pymem --version | head -1)
(cd "$WORK" && env -u PYTHONPATH -u PYMEM_REQUIRE_REDIS -u PYMEM_REQUIRE_LCP PATH="$SV/bin:$PATH" pytest -q -m "not oracle" -p no:cacheprovider \
    "${SMOKE[@]/#/$TESTS/}" | tail -1)

step "done: $(basename "$WHL") ($(stat -c %s "$WHL") bytes) in ${#PYTHONS[@]} CPythons"
rm -rf "$WORK"
