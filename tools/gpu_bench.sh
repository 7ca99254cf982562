#!/usr/bin/env bash
# Step-time benchmarks and the kernel profile on the GPU machine (after
# tools/gpu_check.sh built the extension in place); results under $OUT.
# `gpu_bench.sh main`: the optimizers side by side (fp32 and bf16 in one process),
# the 200-small-tensor model and the byte floor (bench_floor.py); `gpu_bench.sh
# sweeps`: batch sizes, ranks, model sizes, the kernel profiles and the host probe;
# no argument: both. `gpu_bench.sh 7b`: the LLaMA-7B figures (bf16 step and its kernel
# profile, the memory options in the accumulation loop, each optimizer's best 7B
# configuration without checkpointing and the no_step ceiling, one profiled step of each of
# the last two; its commands took about 7 minutes in all on an H100 before the profiles),
# tables gathered in $OUT/bench_7b.md (adamw8bit needs torchao, e.g. from .whl/).
# `gpu_bench.sh variants`: the step variants still off by default against the default
# (library down GEMM, the wide rows' ring depth; per-parameter steps as the hooks take
# them, alone, grouped and with the library GEMM), their 7B kernel profiles, and the 7B
# loops with the library GEMM beside the default; tables in $OUT/bench_variants.md, the
# hooks' host time (benchmarks/probes/hook_probe.py) in $OUT/bench.log.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/flora_out}
mkdir -p "$OUT"
PART=${1:-all}
B="python3 benchmarks/bench_step.py"
FLORA="flora_r256_b0.9 flora_r256_b0.9_resample flora_r256_b0.9_exact flora_nomomentum"
{
  if [ "$PART" = all ] || [ "$PART" = main ]; then
    $B --dtype float32 bfloat16 --out "$OUT/bench_step.md"
    # A step of the small model takes ~0.6 ms, mostly host time: 5 rounds of 50 steps,
    # the optimizers in turn, so that no few milliseconds of a noisy host decide a row.
    $B --small-tensors 200 --only adamw_fused $FLORA --steps 50 --rounds 5 \
      --out "$OUT/bench_step.md"
    python3 benchmarks/bench_floor.py --dtype float32 bfloat16 --out "$OUT/bench_floor.md"
  fi
  if [ "$PART" = 7b ]; then
    T=$(mktemp -d)
    $B --model 7b --dtype bfloat16 --steps 5 --warmup 2 \
      --only adamw_fused flora_r256_b0.9 flora_r256_b0.9_q8 --out "$OUT/bench_7b.md"
    python3 benchmarks/profile_step.py --model 7b --dtype bfloat16 --steps 3 \
      --configs compressed q8 --out "$OUT/bench_7b.md"
    python3 benchmarks/bench_memory.py --chunked-loss --out "$T/memory.md" --configs \
      flora_accum flora_accum_lean8 flora_accum_q8_lean8 flora_accum_q8 adamw
    python3 benchmarks/bench_memory.py --chunked-loss --overlap-steps --configs flora_accum \
      --out "$T/memory_overlap.md"
    L="python3 benchmarks/bench_largest.py --searches best --quiet"
    $L --optimizers adamw adamw8bit --grid 2:off --out "$T/largest_adamw.md"
    $L --optimizers flora_accum flora_accum_q8 no_step --grid 4:off --out "$T/largest_flora.md"
    $L --optimizers flora_accum flora_accum_q8 --grid 4:off --overlap-steps \
      --out "$T/largest_overlap.md"
    # One profiled step of the loop with hook work on a side stream, and of the ceiling:
    # GPU time by stream ("streams" in $OUT/prof_7b/<config>.txt) and the traces there.
    P="python3 benchmarks/bench_memory.py --micro-batches 1 --micro-batch-size 4"
    $P --no-checkpointing --overlap-steps --configs flora_accum --profile "$OUT/prof_7b" \
      --out "$T/profile_overlap.md"
    $P --no-checkpointing --configs no_step --profile "$OUT/prof_7b" --out "$T/profile_no_step.md"
    cat "$T"/*.md >> "$OUT/bench_7b.md"
    rm -rf "$T"
  fi
  if [ "$PART" = variants ]; then
    T=$(mktemp -d)
    V="flora_r256_b0.9 flora_r256_b0.9_down_library"
    $B --model 1.35b --dtype bfloat16 --steps 10 --rounds 2 --only adamw_fused $V \
      --out "$OUT/bench_variants.md"
    $B --model 7b --dtype bfloat16 --steps 10 --rounds 2 --only adamw_fused $V \
      flora_r256_b0.9_wide_stages4 flora_r256_b0.9_wide_stages6 flora_r256_b0.9_per_param \
      flora_r256_b0.9_per_param_down_library flora_r256_b0.9_grouped256m \
      flora_r256_b0.9_grouped1g --out "$OUT/bench_variants.md"
    S="python3 benchmarks/profile_step.py --model 7b --dtype bfloat16 --configs compressed --steps 2"
    $S --per-param --out "$OUT/bench_variants.md"
    $S --per-param --tuning down_library=1 --out "$OUT/bench_variants.md"
    $S --tuning down_library=1 --out "$OUT/bench_variants.md"
    L="python3 benchmarks/bench_largest.py --searches best --quiet --min-trial-s 15"
    $L --optimizers adamw --grid 2:off --out "$T/largest_adamw.md"
    $L --optimizers no_step --grid 4:off --out "$T/largest_no_step.md"
    $L --optimizers flora_accum --grid 4:off --overlap-steps --out "$T/largest_accum.md"
    $L --optimizers flora_accum flora --grid 4:off --overlap-steps --tuning down_library=1 \
      --out "$T/largest_library.md"
    $L --optimizers flora --grid 4:off --out "$T/largest_flora.md"
    M="python3 benchmarks/bench_memory.py --chunked-loss --overlap-steps"
    $M --configs flora_accum adamw --out "$T/memory.md"
    $M --configs flora_accum --tuning down_library=1 --out "$T/memory_library.md"
    $M --configs flora_accum --step-group-mb 256 --out "$T/memory_grouped.md"
    cat "$T"/*.md >> "$OUT/bench_variants.md"
    rm -rf "$T"
    # host time a FloraAccumulator hook adds to the backward pass (the GPU kept busy)
    python3 benchmarks/probes/hook_probe.py --device cuda
    python3 benchmarks/probes/hook_probe.py --device cuda --overlap-steps --modes none steps compress
  fi
  if [ "$PART" != main ] && [ "$PART" != 7b ] && [ "$PART" != variants ]; then
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
    python3 benchmarks/profile_step.py --dtype bfloat16 --configs none --out "$OUT/profile_step.md"
    python3 benchmarks/probes/host_probe.py
  fi
} >> "$OUT/bench.log" 2>&1
grep -v "^|" "$OUT/bench.log" | grep -E "median|failed|Error|error| cpu " | head -80
