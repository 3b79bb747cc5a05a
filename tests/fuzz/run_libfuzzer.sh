#!/usr/bin/env bash
# Build the libFuzzer targets (clang) and fuzz each for SECONDS (default 15), starting from a
# copy of its seed corpus (libFuzzer adds new inputs to its first corpus folder; the copy keeps
# the committed corpus unchanged).  A crash stops the run with a non-zero exit; the input is
# saved as crash-<target>-* in the build folder: add it to tests/fuzz/corpus/<target>/ as a
# regression seed once fixed (the replay programs run every corpus file in CI).
#
#   tests/fuzz/run_libfuzzer.sh [SECONDS] [TARGET ...]     e.g.  tests/fuzz/run_libfuzzer.sh 600
# Environment: PYMEM_LF_BUILD (build folder, default a temporary one), CC (default clang).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SECONDS_PER_TARGET=${1:-15}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(fuzz_kv_state fuzz_mem_state fuzz_batch)
BUILD=${PYMEM_LF_BUILD:-$(mktemp -d)}
WORK=$(mktemp -d)
CC=${CC:-clang} cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYMEM_FUZZ=ON >/dev/null
cmake --build "$BUILD" -j2 --target "${TARGETS[@]}" >/dev/null
for t in "${TARGETS[@]}"; do
    cp -r "$ROOT/tests/fuzz/corpus/$t" "$WORK/$t"
    echo "--- $t: ${SECONDS_PER_TARGET} s"
    rc=0
    "$BUILD/tests/fuzz/$t" -max_total_time="$SECONDS_PER_TARGET" -max_len=16384 -timeout=20 \
        -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$BUILD/crash-$t-" "$WORK/$t" \
        >"$WORK/$t.log" 2>&1 || rc=$?
    grep -E "^(Done|stat::number_of_executed_units|stat::new_units_added)" "$WORK/$t.log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$WORK/$t.log"
        echo "$t: crash (exit $rc), input in $BUILD/crash-$t-*"
        exit 1
    fi
done
rm -rf "$WORK"
