#!/usr/bin/env bash
# The CUDA variant of the CMake build, on the GPU machine: libflora with FLORA_WITH_CUDA=ON and
# its C++ tests against the machine's torch, ctest (with the CUDA test, which is skipped where
# there is no GPU), examples/cpp against the `cmake --install`ed library on CPU and CUDA
# (tools/cpp_test.sh); then, when flora_ext imports (tools/gpu_check.sh built it in place),
# tests/test_cpp.py: the C++ optimizer against the Python one, step for step.
#
#   bash tools/gpu_cmake_check.sh          (from the repository root; logs go to $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flora_out}
mkdir -p "$OUT"
# The image's default CXX (/opt/gcc) links libstdc++ statically, a second libstdc++ beside
# torch's that crashed (see tools/gpu_check.sh): build with the system compilers.
export CXX=/usr/bin/g++ CC=/usr/bin/gcc
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
BUILD=${BUILD:-build/cmake-cuda}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
  cmake --version | head -1; "$CUDA_HOME/bin/nvcc" --version | tail -1; } | tee "$OUT/cmake_env.txt"

start=$(date +%s)
PYTHON=python3 FLORA_CMAKE_CUDA=ON JOBS=$(nproc) bash tools/cpp_test.sh "$BUILD" 2>&1 \
  | tee "$OUT/cmake_cuda.log"
rc=${PIPESTATUS[0]}
cp "$BUILD/Testing/Temporary/LastTest.log" "$OUT/ctest_LastTest.log" 2>/dev/null
echo "cmake CUDA build + ctest + example: rc=$rc, $(( $(date +%s) - start )) s"

if ls .whl/*.whl >/dev/null 2>&1; then  # pytest and friends, as tools/gpu_check.sh does
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if python3 -c "import flora_ext" >/dev/null 2>&1; then
  FLORA_CPP_TESTS="$BUILD/tests/cpp/flora_cpp_tests" FLORA_REQUIRE_CPP_TESTS=1 \
    python3 -m pytest -q -ra tests/test_cpp.py tests/test_library.py 2>&1 | tee "$OUT/pytest_cpp.log"
  prc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] && rc=$prc
else
  echo "note: flora_ext does not import here (tools/gpu_check.sh builds it in place first);" \
       "tests/test_cpp.py not run"
fi
exit "$rc"
