#!/usr/bin/env bash
# The C++ side of flora_ext, as a LibTorch user builds it: libflora and its tests with CMake
# against a Python environment's torch, ctest, `cmake --install`, then examples/cpp built
# against that install through find_package(Flora) and run.
#
#   tools/cpp_test.sh [BUILD_DIR]        (default build/cmake-cpu)
#
# Environment: PYTHON (a python with torch; default .venv/bin/python), FLORA_CMAKE_CUDA=ON to
# build the CUDA kernels too (default OFF), TORCH_CUDA_ARCH_LIST, JOBS (default: nproc),
# CXX/CC (the compilers; CMake's default otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BUILD=${1:-build/cmake-cpu}
BUILD=$(realpath -m "$BUILD")
CUDA=${FLORA_CMAKE_CUDA:-OFF}
JOBS=${JOBS:-$(nproc)}

if ! command -v cmake >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing cmake (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake
  else
    echo "error: cmake not found" >&2; exit 1
  fi
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
# Where torch is (and what pip's CUDA torch needs to configure); flora_ext is not built yet,
# so the file runs as a script.
read -r -a torch_args <<<"$("$PYTHON" flora_ext/cmake_args.py --torch-only)"

stage() { printf '== %s (%s)\n' "$1" "$(date -u +%T)"; stage_start=$(date +%s); }
took() { printf '== %s: %d s\n' "$1" "$(( $(date +%s) - stage_start ))"; }

stage "configure $BUILD (FLORA_WITH_CUDA=$CUDA)"
# A fresh cache (objects stay): a cache from other arguments, such as another nvcc, would make
# CMake drop the arguments given here.
rm -f "$BUILD/CMakeCache.txt" "$BUILD/example/CMakeCache.txt"
cmake -S . -B "$BUILD" "${generator[@]}" "${launcher[@]}" "${torch_args[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DFLORA_WITH_CUDA="$CUDA" -DFLORA_BUILD_TESTS=ON
took configure

stage "build"
cmake --build "$BUILD" -j "$JOBS"
took build

stage "ctest"
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"
took ctest

stage "install, then examples/cpp against the install"
cmake --install "$BUILD" --prefix "$BUILD/install" >/dev/null
cmake -S examples/cpp -B "$BUILD/example" "${generator[@]}" "${launcher[@]}" "${torch_args[@]}" \
  -DFlora_DIR="$BUILD/install/lib/cmake/Flora"
cmake --build "$BUILD/example" -j "$JOBS"
"$BUILD/example/train_mlp" --device cpu --checkpoint "$BUILD/example/flora_checkpoint.pt"
if [ "$CUDA" = ON ] && "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  "$BUILD/example/train_mlp" --device cuda
fi
took example
