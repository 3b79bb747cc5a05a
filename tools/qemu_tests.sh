#!/usr/bin/env bash
# The C tests on CPUs this machine is not:
#  1. arm64: cross-compile the C core and the C tests with gcc-aarch64-linux-gnu and run every
#     ctest under qemu-aarch64: the NEON kernel table must be the one chosen, and test_kernels
#     compares each NEON kernel bit for bit with the scalar one; KV, vector, rope, type tests.
#  2. x86-64: run every C test program under qemu-x86_64 -cpu <model> so that each dispatch
#     choice is made by CPU detection (CPUID / XGETBV), not by PYMEM_FORCE_*: models without AVX,
#     with AVX but no AVX2, with AVX2 minus one needed feature (F16C), with AVX2 (qemu's TCG has
#     no AVX-512, so Skylake-Server's AVX-512 bits are dropped: avx2 again), and natively (avx512
#     when this CPU has it).  Each run must report the expected active kernel.
# Needs cmake, gcc, gcc-aarch64-linux-gnu and qemu-user (Debian: apt-get install
# gcc-aarch64-linux-gnu qemu-user).  Usage: tools/qemu_tests.sh [WORKDIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
for tool in cmake ctest aarch64-linux-gnu-gcc qemu-aarch64 qemu-x86_64; do
    command -v "$tool" >/dev/null || { echo "qemu_tests: '$tool' is not installed" >&2; exit 2; }
done
fail=0
TESTS=(test_types test_kernels test_rope test_kv test_vectors)

# the kernel a test_kernels run chose at start-up ("  kernels: active 'x', available: ...")
active_kernel() { sed -n "s/^  kernels: active '\([a-z0-9]*\)'.*/\1/p" "$1"; }

echo "--- arm64: cross-compile (gcc $(aarch64-linux-gnu-gcc -dumpversion)), run under $(qemu-aarch64 --version | head -1)"
A="$WORK/arm64"
cmake -S "$ROOT" -B "$A" -DCMAKE_TOOLCHAIN_FILE="$ROOT/tools/cross/aarch64-linux-gnu.cmake" \
      -DCMAKE_BUILD_TYPE=Release -DPYMEM_BUILD_TESTS=ON -DPYMEM_WERROR=ON >"$A.log" 2>&1 \
    || { cat "$A.log"; exit 1; }
cmake --build "$A" -j2 >>"$A.log" 2>&1 || { tail -40 "$A.log"; exit 1; }
file "$A/tests/c/test_kernels" | grep -q "ARM aarch64" || { echo "not an aarch64 binary" >&2; exit 1; }
if ctest --test-dir "$A" --output-on-failure >"$A.ctest" 2>&1; then
    grep "tests passed" "$A.ctest"
else
    cat "$A.ctest"; fail=1
fi
qemu-aarch64 -L /usr/aarch64-linux-gnu "$A/tests/c/test_kernels" >"$A.kernels" 2>&1 || fail=1
k=$(active_kernel "$A.kernels")
if [ "$k" = neon ] && ! grep -q "skipping kernel table 'neon'" "$A.kernels"; then
    echo "  arm64 test_kernels: active '$k', every NEON kernel bit-identical to scalar: $(tail -1 "$A.kernels")"
else
    echo "  arm64: expected the NEON kernels, got '$k'" >&2; cat "$A.kernels"; fail=1
fi

echo "--- x86-64: dispatch by CPU detection under $(qemu-x86_64 --version | head -1)"
X="$WORK/x86"
cmake -S "$ROOT" -B "$X" -DCMAKE_BUILD_TYPE=Release -DPYMEM_BUILD_TESTS=ON -DPYMEM_WERROR=ON >"$X.log" 2>&1 \
    || { cat "$X.log"; exit 1; }
cmake --build "$X" -j2 >>"$X.log" 2>&1 || { tail -40 "$X.log"; exit 1; }
native=scalar
if grep -qw avx2 /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && grep -qw fma /proc/cpuinfo \
        && grep -qw bmi2 /proc/cpuinfo; then
    native=avx2
    if grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo \
            && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512dq /proc/cpuinfo; then
        native=avx512
    fi
fi
# model (for qemu-x86_64 -cpu; "native" = no emulator) and the kernel detection must choose
for spec in "Nehalem scalar" "SandyBridge scalar" "Haswell,-f16c scalar" "Haswell avx2" \
            "Skylake-Server avx2" "native $native"; do
    read -r cpu want <<<"$spec"
    if [ "$cpu" = native ]; then run=(); else run=(qemu-x86_64 -cpu "$cpu"); fi
    line="  -cpu $cpu:"; [ "$cpu" = native ] && line="  this CPU, no emulator:"
    for t in "${TESTS[@]}"; do
        out="$X/$t.${cpu//[,]/_}.out"
        if (cd "$X/tests/c" && env -u PYMEM_FORCE_SCALAR -u PYMEM_FORCE_KERNEL "${run[@]}" "./$t") \
                >"$out" 2>&1; then
            line+=" $t ok"
        else
            line+=" $t FAILED"; fail=1; tail -20 "$out" >&2
        fi
        if [ "$t" = test_kernels ]; then
            k=$(active_kernel "$out")
            if [ "$k" = "$want" ]; then
                line+=" (detected '$k')"
            else
                line+=" (detected '$k', expected '$want')"; fail=1
            fi
        fi
    done
    echo "$line"
done
[ "$fail" = 0 ] && echo "qemu_tests: all passed" || echo "qemu_tests: FAILURES" >&2
exit "$fail"
