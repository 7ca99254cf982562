#!/usr/bin/env bash
# Step-time benchmarks and the kernel profile on the GPU machine (after
# tools/gpu_check.sh built the extension in place); results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flora_out}
mkdir -p "$OUT"
B="python3 benchmarks/bench_step.py"
FLORA="flora_r256_b0.9 flora_r256_b0.9_resample flora_r256_b0.9_exact flora_nomomentum"
{
  $B --out "$OUT/bench_step.md"
  $B --dtype bfloat16 --only adamw_fused $FLORA --out "$OUT/bench_step.md"
  $B --small-tensors 200 --only adamw_fused $FLORA --out "$OUT/bench_step.md"
  for bytes in 8388608 134217728 1073741824; do
    FLORA_BATCH_BYTES=$bytes $B --only flora_nomomentum flora_r256_b0.9 --steps 5 \
      --out "$OUT/bench_step.md"
  done
  for rank in 64 1024; do
    $B --rank $rank --only flora_r${rank}_b0.9 --steps 5 --out "$OUT/bench_step.md"
  done
  for model in 0.1b 0.35b; do
    $B --model $model --only adamw_fused flora_r256_b0.9 flora_nomomentum --steps 5 \
      --out "$OUT/bench_step.md"
  done
  python3 benchmarks/profile_step.py --out "$OUT/profile_step.md"
} > "$OUT/bench.log" 2>&1
grep -v "^|" "$OUT/bench.log" | grep -E "median|failed|Error|error" | head -60
