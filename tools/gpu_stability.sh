#!/usr/bin/env bash
# Issue 27 on one GPU within a fixed wall-clock budget: Flora over projection seeds at the lr
# where Adafactor + momentum does best, with flora-opt's momentum transfer and the
# norm-preserving one, and Adafactor + momentum over data-order seeds
# (benchmarks/stability.py sweep: calibration with every run at once, a step count that fits
# the time left, then every run at once). Logs go to $OUT/stability_runs.tar.gz; the
# report (markdown section + SVG plot, no plotting library) is made from the tarball:
#
#   tar xzf stability_runs.tar.gz -C /tmp && python benchmarks/stability.py report \
#       --runs /tmp/stability_runs --md benchmarks/results/convergence.md \
#       --plot benchmarks/results/stability.svg
#
# Run from the repository root after the extension is built; the prepared data
# (benchmarks/data.py) under data_cache/ (or STAB_DATA); flora-opt is not needed.
#   OUT=/some/dir STAB_BUDGET_S=450 bash tools/gpu_stability.sh
# Settings (environment): STAB_BUDGET_S (wall seconds for the whole script, default 450),
# STAB_DEVICE (cuda; cpu for a local smoke run), STAB_RUNS, STAB_DATA, PYTHON, and
# STAB_ARGS: more arguments of `stability.py sweep` (model size, --max-procs, --seeds, ...).
set -uo pipefail
T_START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT=${OUT:-/tmp/flora_out}
RUNS=${STAB_RUNS:-/tmp/stability_runs}
PY=${PYTHON:-python3}
DEVICE=${STAB_DEVICE:-cuda}
BUDGET=${STAB_BUDGET_S:-450}
TAR_RESERVE=15
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/stability.log") 2>&1
DATA=${STAB_DATA:-$(dirname "$(ls -d data_cache/*/meta.json 2>/dev/null | head -1)")}
[[ -f "$DATA/meta.json" ]] || { echo "no prepared data (data_cache/<key>/meta.json); run benchmarks/data.py"; exit 2; }

echo "[env] $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - "$DEVICE" <<'PY' || exit 3
import sys, torch, flora_ext
dev = sys.argv[1]
print("[env] torch", torch.__version__, "python", sys.version.split()[0], "device", dev,
      torch.cuda.get_device_name(0) if dev == "cuda" else "")
if dev == "cuda":
    p = torch.nn.Parameter(torch.randn(256, 512, device="cuda"))
    opt = flora_ext.Flora([p], lr=1e-2, rank=128, kappa=1, beta1=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    print("[env] flora_ext CUDA step ok")
PY
DEADLINE=$(( T_START + BUDGET - TAR_RESERVE ))
# shellcheck disable=SC2086
timeout -k 5 $(( DEADLINE - $(date +%s) + 10 )) "$PY" benchmarks/stability.py sweep \
  --data "$DATA" --runs "$RUNS" --deadline "$DEADLINE" --device "$DEVICE" ${STAB_ARGS:-}
echo "[sweep] exit $? at +$(( $(date +%s) - T_START ))s"
for f in "$RUNS"/runs/*.out; do tail -n 1 "$f"; done 2>/dev/null | sort | head -60
tar czf "$OUT/stability_runs.tar.gz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
ls -la "$OUT"
echo "[end] +$(( $(date +%s) - T_START ))s"
