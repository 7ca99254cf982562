#!/usr/bin/env bash
# Build and test flora_ext on the GPU machine (the device tool runs this from the
# repo root with $OUT set; wheels for missing test packages travel in .whl/).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flora_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$OUT/env.txt"
start=$(date +%s)
# In place (no pip): the machine has no network for pip's build isolation.
# The image's CXX (/opt/gcc) links libstdc++ statically into the extension: a
# second libstdc++ beside torch's, whose uninitialised locale crashed the first
# number formatted in an error message. The system compiler links it shared.
export CXX=/usr/bin/g++ CC=/usr/bin/gcc
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16 \
  python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest -q -ra tests "$@" 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
