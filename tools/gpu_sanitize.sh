#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck and synccheck over a selection of the CUDA tests, on
# the GPU machine, in one device call (from the repo root, $OUT set):
#
#   bash tools/gpu_sanitize.sh            # build in place (as tools/gpu_check.sh), then the three tools
#   SKIP_BUILD=1 bash tools/gpu_sanitize.sh   # reuse a CUDA build left by an earlier call
#
# Each tool runs pytest under the sanitizer with its own time limit (MEMCHECK_S, RACECHECK_S,
# SYNCCHECK_S seconds) so that the whole run stays inside one device call; racecheck and
# synccheck instrument every shared-memory access and barrier and are far slower, so they get
# a few representative tests of each kernel family. Logs go to $OUT/<tool>.<pid>.log (sanitizer
# report, one per process) and $OUT/<tool>-pytest.txt; one summary line per tool is printed and written to
# $OUT/sanitize_summary.txt. Exit status 0 only when every tool ran to its end with 0 errors
# and its tests passed.
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: with torch's caching allocator a kernel reading past its
# tensor lands in another block of the same cudaMalloc and memcheck cannot see it; without it
# every tensor is its own allocation. API errors are not reported (--report-api-errors no):
# torch probes the driver with calls that fail on purpose; the kernels' errors are what counts.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flora_out}
mkdir -p "$OUT"
SANITIZER=${SANITIZER:-/usr/local/cuda/bin/compute-sanitizer}
MEMCHECK_S=${MEMCHECK_S:-170}
RACECHECK_S=${RACECHECK_S:-130}
SYNCCHECK_S=${SYNCCHECK_S:-100}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u;
  "$SANITIZER" --version | tail -1; git rev-parse --short HEAD 2>/dev/null;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$OUT/sanitize_env.txt"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$(date +%s)
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc  # see tools/gpu_check.sh
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16 \
    python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
python3 -c "import flora_ext, sys; sys.exit(0 if flora_ext.cuda_compiled() else 1)" \
  || { echo "flora_ext was built without CUDA kernels"; exit 1; }

# Every kernel family once: the layouts (factored, N-D, 1-D, no/dense/compressed momentum),
# half parameters, batched groups, fused momentum with TF32, row stats and tile passes,
# many small tensors, stochastic rounding, projections, resume.
MEMCHECK_K="test_cuda_step_matches_cpu or test_cuda_half_params_match_cpu or test_cuda_step_with_tf32 \
or test_batched_group_matches_cpu or test_fused_momentum_matches_cpu or test_unfusable_momentum_falls_back \
or test_row_stats_match_cpu or test_many_small_tensors_one_call or test_stochastic_rounding_same_bits \
or test_projection_same_on_cpu_and_cuda or test_mixed_resample_batches_match_cpu \
or test_compressed_tensors_sharing_a_batch_match_cpu or test_resume_cpu_checkpoint_on_cuda"
# racecheck / synccheck: shared memory and barriers; one small case per family.
SHARED_K="(test_cuda_step_matches_cpu and (24 or 37 or 3000 or 96)) \
or (test_fused_momentum_matches_cpu and 200 and float32) or test_cuda_half_params_match_cpu[shape0-hp0-dtype0] \
or (test_row_stats_match_cpu and 512) or test_many_small_tensors_one_call \
or test_batched_group_matches_cpu[0.9-4096]"

summary="$OUT/sanitize_summary.txt"
: > "$summary"
status=0
run_tool() {  # tool, seconds, -k expression, extra sanitizer options...
  local tool=$1 limit=$2 select=$3
  shift 3
  local start rc errors state
  start=$(date +%s)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --signal=INT --kill-after=20 "$limit" \
    "$SANITIZER" --tool "$tool" --target-processes all --report-api-errors no "$@" \
    --log-file "$OUT/$tool.%p.log" \
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "$select" \
    > "$OUT/$tool-pytest.txt" 2>&1
  rc=$?
  # memcheck and synccheck end with "ERROR SUMMARY: N errors", racecheck with
  # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)".
  errors=$(cat "$OUT/$tool".*.log 2>/dev/null \
           | grep -Eo "ERROR SUMMARY: [0-9]+ error|hazards displayed \([0-9]+ error" \
           | grep -Eo "[0-9]+ error" | awk '{n += $1} END {print n + 0}')
  case $rc in
    0) state="tests passed" ;;
    124|137) state="TIMED OUT after ${limit} s (partial)"; status=1 ;;
    *) state="pytest exit $rc"; status=1 ;;
  esac
  [ "$errors" -eq 0 ] || status=1
  local tests
  tests=$(grep -Eo "[0-9]+ (passed|failed|skipped|deselected|error)" "$OUT/$tool-pytest.txt" | paste -sd, -)
  printf '%-10s errors: %s  (%s; %s; %d s)\n' "$tool" "$errors" "$state" "${tests:-no pytest summary}" \
    "$(( $(date +%s) - start ))" | tee -a "$summary"
}

run_tool memcheck "$MEMCHECK_S" "$MEMCHECK_K" --leak-check no
run_tool racecheck "$RACECHECK_S" "$SHARED_K" --racecheck-report all
run_tool synccheck "$SYNCCHECK_S" "$SHARED_K"
exit $status
