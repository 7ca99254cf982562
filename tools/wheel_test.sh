#!/usr/bin/env bash
# The wheel as a cluster admin gets it: `pip wheel . --no-build-isolation -w DIST`, installed
# into a fresh venv with the same torch (from PyPI), smoke-tested there from an empty directory
# with no compiler on PATH (tools/wheel_smoke.py, which checks too that the wheel's
# Requires-Dist pins the build's torch release; pip check there as well), then examples/cpp
# built against the installed wheel through flora_ext.cmake_prefix_path and run.
#
#   tools/wheel_test.sh [DIST]           (default dist)
#
# Environment: PYTHON (the build environment's python, with torch; default .venv/bin/python),
# WHEEL_VENV (default build/wheel-venv, made anew), TORCH_CUDA_ARCH_LIST (default of setup.py:
# 8.0;9.0a;9.0+PTX), SKIP_EXAMPLE=1 to leave out the C++ example, MISMATCH_TORCH=VERSION to check
# too that the wheel refuses, at import, a torch of another version and that pip check reports
# the conflict with its torch pin (a second venv; skipped unless pip finds that torch among its
# local wheels, --find-links, with no download).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
DIST=$(realpath -m "${1:-dist}")
VENV=$(realpath -m "${WHEEL_VENV:-build/wheel-venv}")
TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__)')
# What setup.py pins: the build's torch release, without a local label (+cu130).
TORCH_REQUIREMENT=$("$PYTHON" -c 'from importlib import metadata
print("torch==" + metadata.version("torch").split("+")[0])')
BASE_PYTHON=$("$PYTHON" -c 'import sys; print(sys._base_executable)')

stage() { printf '== %s (%s)\n' "$1" "$(date -u +%T)"; stage_start=$(date +%s); }
took() { printf '== %s: %d s\n' "$1" "$(( $(date +%s) - stage_start ))"; }

# The fresh venv and its torch download in the background while the wheel compiles.
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
venv_log="$(dirname "$VENV")/wheel-venv.log"
( "$BASE_PYTHON" -m venv "$VENV" \
  && "$VENV/bin/pip" install -q "torch==${TORCH_VERSION%%+*}" ) >"$venv_log" 2>&1 &
venv_pid=$!
mismatch_pid=
if [ -n "${MISMATCH_TORCH:-}" ]; then
  ( rm -rf "$VENV-mismatch" && "$BASE_PYTHON" -m venv "$VENV-mismatch" \
    && { "$VENV-mismatch/bin/pip" install -q --no-index --no-deps "torch==$MISMATCH_TORCH" \
         || { echo "no local wheel of torch $MISMATCH_TORCH"; exit 3; }; } \
    && "$VENV-mismatch/bin/pip" install -q "torch==$MISMATCH_TORCH" ) >"$venv_log-mismatch" 2>&1 &
  mismatch_pid=$!
fi

stage "pip wheel (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-setup.py default})"
rm -f "$DIST"/flora_ext-*.whl
"$PYTHON" -m pip wheel . --no-build-isolation --no-deps -w "$DIST"
wheel=$(ls "$DIST"/flora_ext-*.whl)
took "pip wheel"
echo "$wheel: $(du -h "$wheel" | cut -f1)"
"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["flora_ext/libflora.so", "flora_ext/_build_info.py", "flora_ext/include/flora/flora.h",
        "flora_ext/include/flora/ops.h", "flora_ext/share/cmake/Flora/FloraConfig.cmake",
        "flora_ext/share/cmake/Flora/FloraConfigVersion.cmake", "flora_ext/cmake_args.py"]
missing = [n for n in need if n not in names]
stray = [n for n in names if n.endswith((".cpp", ".cu", ".o")) or "/_C" in n]
assert not missing and not stray, f"wheel: missing {missing}, unexpected {stray}"
print("wheel holds:", ", ".join(n for n in names if not n.endswith(".py")))
PY

stage "fresh venv with torch==${TORCH_VERSION%%+*}"
if ! wait "$venv_pid"; then cat "$venv_log"; exit 1; fi
"$VENV/bin/pip" install -q --no-deps "$wheel"
"$VENV/bin/pip" check  # the wheel's requirements (its torch pin) hold in the fresh venv
took "fresh venv"

stage "smoke test: empty directory, no compiler on PATH"
empty=$(mktemp -d)
(cd "$empty" && env -i HOME="$HOME" PATH="$VENV/bin" FLORA_TORCH_REQUIREMENT="$TORCH_REQUIREMENT" \
  "$VENV/bin/python" "$ROOT/tools/wheel_smoke.py")
took "smoke test"

if [ "${SKIP_EXAMPLE:-0}" != 1 ]; then
  stage "examples/cpp against the installed wheel"
  read -r -a flora_args <<<"$(cd "$empty" && "$VENV/bin/python" -m flora_ext.cmake_args)"
  generator=()
  command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
  launcher=()
  command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S "$ROOT/examples/cpp" -B "$empty/example" "${generator[@]}" "${launcher[@]}" "${flora_args[@]}"
  cmake --build "$empty/example"
  "$empty/example/train_mlp" --device cpu --steps 200
  took "example against the wheel"
fi

if [ -n "$mismatch_pid" ]; then
  stage "torch $MISMATCH_TORCH instead of $TORCH_VERSION: refused at import"
  rc=0; wait "$mismatch_pid" || rc=$?
  if [ "$rc" = 3 ]; then
    echo "skipped: $(tail -1 "$venv_log-mismatch")"
  elif [ "$rc" != 0 ]; then
    cat "$venv_log-mismatch"; exit 1
  else
    "$VENV-mismatch/bin/pip" install -q --no-deps "$wheel"
    # The pin tells pip: its check names the conflict (a plain install would refuse it).
    "$VENV-mismatch/bin/pip" check && { echo "pip check accepts torch $MISMATCH_TORCH"; exit 1; }
    out=$(cd "$empty" && "$VENV-mismatch/bin/python" -c 'import flora_ext' 2>&1) && {
      echo "flora_ext imported under torch $MISMATCH_TORCH"; exit 1; }
    echo "$out" | tail -1
    echo "$out" | tail -1 | grep -q "ImportError: flora_ext was built against torch $TORCH_VERSION, but torch $MISMATCH_TORCH" || exit 1
    rm -rf "$VENV-mismatch"
  fi
  took "mismatch"
fi
rm -rf "$empty" "$VENV"  # kept when a stage fails, for a look; several GB
