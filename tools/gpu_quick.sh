#!/usr/bin/env bash
# A short GPU cycle for kernel work: build and test (tools/gpu_check.sh, pytest
# arguments pass through), registers and stack of every kernel, step times of
# fused AdamW and Flora without momentum (fp32 and bf16 in one process, with its
# tuning knobs changed), and their per-kernel profile; under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/flora_out}
mkdir -p "$OUT"
bash tools/gpu_check.sh "$@" > "$OUT/check.log" 2>&1
rc=$?
tail -4 "$OUT/check.log"
cuobjdump --dump-resource-usage build/temp*/csrc/cuda/flora_kernel.o 2>/dev/null \
  | grep -A1 Function | grep -o "_Z[^ :]*\|REG:[0-9]*\|STACK:[0-9]*\|LOCAL:[0-9]*" \
  | paste - - - - | c++filt | awk -F'\t' '{print $2, $3, $4, substr($1, 1, 100)}' \
  > "$OUT/registers.txt"
grep -v "projection\|momentum_mix" "$OUT/registers.txt"
export PYTHONPATH=$PWD:/tmp/site
B="python3 benchmarks/bench_step.py --steps 10 --out $OUT/bench.md"
{
  $B --dtype float32 bfloat16 --only adamw_fused flora_nomomentum flora_nomomentum_read_p \
    flora_nomomentum_tile_passes flora_nomomentum_batch1g flora_nomomentum_stages2 \
    flora_nomomentum_batch4g \
    flora_r256_b0.9
  $B --small-tensors 200 --only adamw_fused flora_nomomentum
  python3 benchmarks/probes/host_probe.py
  for dtype in float32 bfloat16; do
    python3 benchmarks/profile_step.py --configs none --dtype $dtype --steps 3 --out "$OUT/profile.md"
  done
  python3 benchmarks/profile_step.py --configs compressed --steps 3 --out "$OUT/profile.md"
} > "$OUT/bench.log" 2>&1
grep -h "^| [af]" "$OUT/bench.md" | cut -c1-110
grep -h " cpu .* ms " "$OUT/bench.log"
grep -h "^| [a-z]" "$OUT/profile.md" | grep -v optimizer | cut -c1-90
tar czf "$OUT/logs.tgz" -C "$OUT" --remove-files check.log build.log bench.log env.txt 2>/dev/null
exit $rc
