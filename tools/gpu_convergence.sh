#!/usr/bin/env bash
# Issue 5 on one GPU within a fixed wall-clock budget: the learning-rate sweep, part 1
# (3 seeds at each optimizer's best lr) and part 2 (fine-tuning from the best part-1
# checkpoint), several training processes at a time on the one GPU.
#
# Run from the repository root after the extension is built, with flora_ext importable
# (this script puts the repository root on PYTHONPATH) and the carried wheels (galore-torch,
# flora-opt) on PYTHONPATH, e.g. /tmp/site. The prepared data (benchmarks/data.py output)
# must be under data_cache/ (or set CONV_DATA).
#
#   CONV_DEADLINE=$(( $(date +%s) + 540 )) OUT=/some/dir bash tools/gpu_convergence.sh
#
# Time plan (all adaptive, nothing assumes a GPU speed):
#   0. environment check (flora_ext CUDA kernels, galore-torch, flora-opt importable)
#   1. calibration: CAL_STEPS steps of every optimizer, P_SWEEP processes at once (the
#      concurrency of the sweep), and CAL_UPDATES part-2 updates of every part-2 run at
#      once; each run logs its steady-state tokens/s (first steps excluded)
#   2. plan: from the measured seconds per step, the time left and the number of runs,
#      the step budget S shared by the sweep and part 1 (same S, so the sweep's seed-0
#      run at the chosen lr is part 1's seed 0); part 2 keeps about a fifth of the time
#      (PLAN below; written to RUNS/plan.json with all inputs)
#   3. sweep: every optimizer at each lr of convergence.py's LR_GRIDS, seed 0
#   4. part 1: seeds 0,1,2 at the lr chosen by convergence.py --lr-from (lowest final
#      validation loss of the sweep; RUNS/part1/lr_choice.json), plus Flora with kappa=1000
#   5. part 2: U updates (fitted to the time then left) of flora_accum, naive, lora and
#      small_batch, seeds 0,1,2, from the best finished part-1 run
#   5b. with time left (the plan is conservative): up to 3 more part-1 seeds of Flora,
#      Adafactor with and without momentum and flora-opt, as many as fit
#   6. report (if matplotlib is there), then RUNS minus checkpoints -> OUT/convergence_runs.tar.gz
# Every phase gets a graceful deadline (runs save, mark themselves stopped_early and stop)
# and a hard `timeout` a little later; the script ends by CONV_DEADLINE in any case, and
# whatever finished is in the tarball. Rerunning with the same RUNS resumes.
#
# Settings (environment): CONV_DEADLINE (Unix time by which this script must have ended;
# default now + CONV_BUDGET_S, 540), OUT, CONV_RUNS (default /tmp/convergence_runs),
# CONV_DATA, CONV_DEVICE (cuda; cpu for a local smoke run), CONV_MODEL_ARGS, CONV_RANK,
# CONV_GALORE_RANK, CONV_KAPPA, CONV_P_SWEEP, CONV_P_PART1, CONV_THREADS, CONV_CAL_STEPS,
# CONV_CAL_UPDATES, CONV_S_MIN, CONV_S_MAX, CONV_U_MIN, CONV_U_MAX, CONV_STARTUP_S, PYTHON.
set -uo pipefail
T_START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flora_out}
RUNS=${CONV_RUNS:-/tmp/convergence_runs}
mkdir -p "$OUT" "$RUNS/logs"
exec > >(tee -a "$OUT/convergence.log") 2>&1

DEADLINE=${CONV_DEADLINE:-$((T_START + ${CONV_BUDGET_S:-540}))}
END_RESERVE=${CONV_END_RESERVE_S:-30}      # report + tarball after training
export TRAIN_DEADLINE=$((DEADLINE - END_RESERVE))
PY=${PYTHON:-python3}
DEVICE=${CONV_DEVICE:-cuda}
MODEL_ARGS=${CONV_MODEL_ARGS:---model-size base --batch-size 64}
RANK=${CONV_RANK:-128}                     # Flora / flora-opt momentum rank, part-2 rank
GALORE_RANK=${CONV_GALORE_RANK:-64}        # state of GaLore r=64 ~ Flora r=128 (1.28 vs 1.03 B/param)
KAPPA=${CONV_KAPPA:-100}                   # resampling interval (GaLore: 2x, its update_proj_gap)
export P_SWEEP=${CONV_P_SWEEP:-9} P_PART1=${CONV_P_PART1:-9}
P2_JOBS=${CONV_P2_JOBS:-}                  # default: all part-2 runs at once
THREADS=${CONV_THREADS:-1}
CAL_STEPS=${CONV_CAL_STEPS:-60}
CAL_UPDATES=${CONV_CAL_UPDATES:-8}
export S_MIN=${CONV_S_MIN:-100} S_MAX=${CONV_S_MAX:-3000} U_MIN=${CONV_U_MIN:-20} U_MAX=${CONV_U_MAX:-120}
export STARTUP_S=${CONV_STARTUP_S:-15} EVAL_WINDOWS=${CONV_EVAL_WINDOWS:-512}
export EVAL_BATCH=128 P2_SEEDS=0,1,2 P2_MODES=flora_accum,naive,lora,small_batch
P2_ARGS="--accum 16 --micro-batch-size 4 --lr 3e-3 --lora-lr 1e-3 --rank $RANK"
SWEEP_SPECS="flora:rank=$RANK:kappa=$KAPPA,adafactor_momentum,adafactor,adamw,galore:rank=$GALORE_RANK:kappa=$((2 * KAPPA)),flora_opt:rank=$RANK:kappa=$KAPPA"
EXTRA_SPECS=${CONV_EXTRA_SPECS-flora:rank=$RANK:kappa=1000}

if [[ -z "${CONV_DATA:-}" ]]; then
  CONV_DATA=$(dirname "$(ls -d data_cache/*/meta.json 2>/dev/null | head -1)")
fi
DATA=$CONV_DATA
[[ -f "$DATA/meta.json" ]] || { echo "no prepared data (data_cache/<key>/meta.json); run benchmarks/data.py"; exit 2; }

now() { date +%s; }
say() { echo "[$(date -u +%H:%M:%S) +$(( $(now) - T_START ))s] $*"; }

# run_conv NAME GRACEFUL_DEADLINE ARGS...: convergence.py with a graceful --deadline and a
# hard timeout 20 s later (never past TRAIN_DEADLINE + 15 s).
run_conv() {
  local name=$1 dl=$2; shift 2
  local hard=$(( dl + 20 < TRAIN_DEADLINE + 15 ? dl + 20 : TRAIN_DEADLINE + 15 ))
  local left=$(( hard - $(now) ))
  if (( left < 10 )); then say "$name: skipped, no time left"; return 1; fi
  local cmd=("$PY" benchmarks/convergence.py --data "$DATA" --device "$DEVICE" --deadline "$dl"
             --threads "$THREADS" --no-progress --eval-batch-size "$EVAL_BATCH" "$@")
  echo "${cmd[*]}" >>"$RUNS/commands.txt"
  say "$name: ${cmd[*]}  (hard limit ${left}s)"
  timeout -k 5 "$left" "${cmd[@]}" >"$RUNS/logs/$name.log" 2>&1
  local rc=$?
  grep -E '^\[(lr|init|pool|[0-9]+/[0-9]+)\]|Error|error' "$RUNS/logs/$name.log" | tail -60
  say "$name: exit $rc"
  return $rc
}

# plan CMD: the budget arithmetic (reads the calibration logs and RUNS/plan.json).
plan() {
  "$PY" - "$@" <<'PY'
import json, math, os, pathlib, sys, time

cmd, runs = sys.argv[1], pathlib.Path(sys.argv[2])
E = os.environ
path = runs / "plan.json"
plan = json.loads(path.read_text()) if path.is_file() else {}
now = time.time()
deadline = float(E["TRAIN_DEADLINE"])
STARTUP, O_RUN = float(E["STARTUP_S"]), 4.0   # per invocation, per run (build, checkpoint)
SAFETY = 0.85


def logs(d):
    out = []
    for p in sorted(pathlib.Path(d).glob("*/log.json")):
        lg = json.loads(p.read_text())
        if lg.get("steady_tokens_per_s"):
            out.append(lg)
    return out


def seconds_per_unit(lgs, tokens_per_unit, warm=5):
    """Seconds per unit (part-1 step, part-2 accumulation cycle) of each run, measured over
    the window in which all the calibration runs were training at once (their clock
    points); the run's steady-state tokens/s where there is no such window."""
    def at(clock, t):  # step reached at time t, linear between clock points
        for (s0, t0), (s1, t1) in zip(clock, clock[1:]):
            if t0 <= t <= t1:
                return s0 + (s1 - s0) * (t - t0) / max(t1 - t0, 1e-9)
        return clock[0][0] if t < clock[0][1] else clock[-1][0]
    clocks = [lg.get("clock") or [] for lg in lgs]
    out, how = {}, "steady tokens/s of each run (no common window)"
    if clocks and all(len(c) >= 3 for c in clocks):
        starts = [next((t for s, t in c if s >= warm), c[1][1]) for c in clocks]
        t0, t1 = max(starts), min(c[-1][1] for c in clocks)
        longest = max(c[-1][1] - st for c, st in zip(clocks, starts))
        if t1 - t0 >= max(1.0, 0.3 * longest):
            how = f"common window of {t1 - t0:.1f} s with all {len(lgs)} runs training"
            for lg, c in zip(lgs, clocks):
                n = at(c, t1) - at(c, t0)
                if n > 0:
                    out[lg["run"]] = (t1 - t0) / n * tokens_per_unit(lg) / lg["tokens_per_unit_clock"]
    for lg in lgs:
        out.setdefault(lg["run"], tokens_per_unit(lg) / lg["steady_tokens_per_s"])
    return out, how


if cmd == "plan1":
    specs = E["SWEEP_SPECS"].split(",")
    extra = [s for s in E["EXTRA_SPECS"].split(",") if s]
    n_lrs = int(E["N_LRS"])
    batch, ctx = int(E["BATCH"]), int(E["CONTEXT"])
    p_sweep, p1 = int(E["P_SWEEP"]), int(E["P_PART1"])
    # seconds per training step of each optimizer, P_SWEEP runs sharing the GPU
    lg1 = logs(runs / "calib" / "part1")
    # start-up of an invocation (spawn, imports, data, model, first evaluation): from the
    # launch of the calibration to its runs' first training step (after the barrier)
    # plus the shutdown of its worker processes: from the runs' last step to its exit
    def overhead(lgs, t0, t1):
        clocks = [lg["clock"] for lg in lgs if lg.get("clock")]
        if not clocks or not t0 or not t1:
            return None
        return (min(c[0][1] for c in clocks) - float(t0)) + (float(t1) - max(c[-1][1] for c in clocks))
    o1 = overhead(lg1, E.get("CAL1_T0"), E.get("CAL1_T1"))
    if o1 is not None:
        STARTUP = max(5.0, 1.2 * o1)
    for lg in lg1:
        lg["tokens_per_unit_clock"] = lg["tokens_per_step"]   # clock points count steps
    per_run, how1 = seconds_per_unit(lg1, lambda lg: lg["tokens_per_step"])
    t1 = {}
    for lg in lg1:
        t1.setdefault(lg["optimizer"]["name"], []).append(per_run[lg["run"]])
    t1 = {k: sum(v) / len(v) for k, v in t1.items()}
    if not t1:
        sys.exit("plan1: no calibration result in calib/part1")
    t_worst = max(t1.values())
    t_of = lambda spec: t1.get(spec.split(":")[0], t_worst)
    # wall seconds per step of S: the GPU is shared, so a run's step time grows with the
    # number of runs at once and each run costs t / CAL_N of the GPU's time (t measured with
    # CAL_N runs at once, as many as the sweep and part 1 run)
    cal_n = int(E["CAL_N"])
    sweep_w = sum(n_lrs * t_of(s) for s in specs) / cal_n
    part1_w = (sum(2 * t_of(s) for s in specs) + sum(3 * t_of(s) for s in extra)) / cal_n
    n_sweep, n_p1 = n_lrs * len(specs), 2 * len(specs) + 3 * len(extra)
    evals = 12 * int(E["EVAL_WINDOWS"]) / (3.0 * batch)             # ~12 evaluations, fwd = 1/3 step
    fixed1 = 2 * STARTUP + O_RUN * (math.ceil(n_sweep / p_sweep) + math.ceil(n_p1 / p1))
    # part 2: seconds per update of the slowest mode, all part-2 runs at once
    # (--steps counts accumulation cycles: accum micro-batches, also for small_batch)
    lg2 = logs(runs / "calib" / "part2")
    for lg in lg2:   # clock points count updates (micro-batch updates for small_batch)
        lg["tokens_per_unit_clock"] = lg["tokens_per_update"]
    per_run2, how2 = seconds_per_unit(   # per accumulation cycle (what --steps counts)
        lg2, lambda lg: lg["accum"] * lg["micro_batch_size"] * lg["model"]["context"], warm=2)
    t2_modes = {}
    for lg in lg2:
        t2_modes.setdefault(lg["mode"], []).append(per_run2[lg["run"]])
    t2_modes = {k: sum(v) / len(v) for k, v in t2_modes.items()}
    # all part-2 runs at once (P2_JOBS = N_P2): the slowest mode sets the time; fewer
    # workers: the runs' total over the workers
    n_p2, p2_jobs = int(E["N_P2"]), int(E["P2_JOBS"])
    per_mode_runs = n_p2 / max(1, len(t2_modes))
    t2 = (max(max(t2_modes.values()), sum(t2_modes.values()) * per_mode_runs / p2_jobs)
          if t2_modes else 4 * t_worst)
    eval2 = 9 * min(int(E["EVAL_WINDOWS"]), 400) / (3.0 * batch) * min(t1.values())
    o2 = overhead(lg2, E.get("CAL2_T0"), E.get("CAL2_T1"))
    STARTUP2 = max(5.0, 1.2 * o2) if o2 is not None else STARTUP
    T2 = lambda u: STARTUP2 + O_RUN + u * t2 + eval2
    u_min, u_max = int(E["U_MIN"]), int(E["U_MAX"])
    A = deadline - now
    t2_budget = min(T2(u_max), max(T2(u_min), 0.2 * A))
    per_step = sweep_w + part1_w
    S = (SAFETY * (A - t2_budget - 10) - fixed1) / per_step - evals
    s_min, s_max = int(E["S_MIN"]), int(E["S_MAX"])
    S_raw = S
    S = int(max(s_min, min(s_max, S)) // 10 * 10) or s_min
    est_sweep = STARTUP + O_RUN * math.ceil(n_sweep / p_sweep) + (S + evals) * sweep_w
    est_p1 = STARTUP + O_RUN * math.ceil(n_p1 / p1) + (S + evals) * part1_w
    plan.update({
        "planned_at": now, "train_deadline": deadline, "seconds_available": A,
        "calibration_seconds_per_step": t1, "calibration_part1_timing": how1,
        "calibration_part2_seconds_per_update_by_mode": t2_modes,
        "calibration_part2_seconds_per_update": t2, "calibration_part2_timing": how2,
        "p_sweep": p_sweep, "p_part1": p1, "calibration_processes": cal_n,
        "steps": S, "steps_unclamped": S_raw, "eval_every": max(1, S // 10),
        "tokens_per_run": S * batch * ctx, "runs_sweep": n_sweep, "runs_part1_new": n_p1,
        "est_sweep_s": est_sweep, "est_part1_s": est_p1, "part2_budget_s": t2_budget,
        "part2_min_s": T2(u_min), "part2_evals_s": eval2, "safety": SAFETY, "startup_s": STARTUP, "startup_part2_s": STARTUP2, "startup_default_s": float(E["STARTUP_S"]),
        "rule": "S = (safety * (available - part-2 budget - 10 s) - start-ups - per-run "
                "overheads) / (sum over the sweep's and part 1's new runs of t / CAL_N) - "
                "evaluation cost; t = "
                "seconds per step of the run's optimizer measured with CAL_N calibration runs "
                "sharing the GPU; part-2 budget = min(time for U_MAX updates, max(time for "
                "U_MIN updates, 20% of the time available)); part 2's U is fitted again to "
                "75% of the time left when it starts",
    })
    path.write_text(json.dumps(plan, indent=1))
    print(S, max(1, S // 10))
elif cmd == "deadline":
    phase = sys.argv[3]
    plan.setdefault("part2_min_s", 60.0)
    if phase == "sweep":
        dl = min(now + 1.3 * plan["est_sweep_s"],
                 deadline - 0.85 * (plan["est_part1_s"] + plan["part2_min_s"]))
    else:
        dl = min(now + 1.3 * plan["est_part1_s"], deadline - plan["part2_min_s"])
    dl = max(dl, now + 30)
    plan[f"deadline_{phase}"] = dl
    path.write_text(json.dumps(plan, indent=1))
    print(int(dl))
elif cmd == "plan2":
    STARTUP = plan.get("startup_part2_s", STARTUP)
    t2 = plan.get("calibration_part2_seconds_per_update")
    left = deadline - now
    u_min, u_max = int(E["U_MIN"]), int(E["U_MAX"])
    if not t2:
        U = u_min
    else:
        evals = plan.get("part2_evals_s", 0.0)
        U = int((0.75 * left - STARTUP - O_RUN - evals) / t2)
        U = max(u_min, min(u_max, U))
    plan.update({"part2_updates": U, "part2_eval_every": max(1, U // 8),
                 "part2_planned_at": now, "part2_seconds_left": left})
    path.write_text(json.dumps(plan, indent=1))
    print(U, max(1, U // 8))
elif cmd == "extra":
    # time left after part 2: more part-1 seeds of the optimizers of the claim, as many
    # (0-3 each) as fit in 80% of it, all at once
    specs = sys.argv[3].split(",")
    t1 = plan.get("calibration_seconds_per_step", {})
    if not t1 or "steps" not in plan:
        print(0)
        sys.exit()
    t_worst = max(t1.values())
    per_seed = sum(t1.get(s.split(":")[0], t_worst) for s in specs) / int(E["CAL_N"])
    evals = 12 * int(E["EVAL_WINDOWS"]) / (3.0 * int(E["BATCH"]))
    cost = lambda k: plan.get("startup_s", STARTUP) + 2 * O_RUN + k * (plan["steps"] + evals) * per_seed
    left = deadline - now
    k = max([k for k in range(4) if cost(k) <= 0.8 * left], default=0)
    plan.update({"extra_seeds": k, "extra_seeds_est_s": cost(k), "extra_seconds_left": left})
    path.write_text(json.dumps(plan, indent=1))
    print(k)
PY
}

say "flora_ext convergence on $DEVICE; deadline in $(( DEADLINE - $(now) )) s; data $DATA; runs $RUNS"

# ---- 0. environment
"$PY" - "$DEVICE" "$RUNS/env.json" "$MODEL_ARGS" <<'PY' || { say "environment check failed"; exit 3; }
import json, platform, subprocess, sys, datetime
sys.path.insert(0, "benchmarks")
import torch, flora_ext
device, out = sys.argv[1], sys.argv[2]
env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "flora_ext": getattr(flora_ext, "__version__", "?"), "device": device,
       "cuda_compiled": flora_ext.cuda_compiled(), "host_cpus": __import__("os").cpu_count()}
if device.startswith("cuda"):
    if not torch.cuda.is_available() or not flora_ext.cuda_compiled():
        sys.exit("no CUDA device, or flora_ext built without CUDA kernels")
    env["device_name"] = torch.cuda.get_device_name(0)
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        env["nvidia_smi"] = str(e)
else:
    env["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
import convergence
args = convergence.build_parser().parse_args(["--data", "x", "--run-dir", "x"] + sys.argv[3].split())
env["context"], env["batch_size"] = convergence.model_dims(args)[3], args.batch_size
for name, check in (("galore", convergence.import_galore),
                    ("flora_opt", lambda: __import__("flora_ext.testing").testing.import_flora_opt())):
    try:
        check()
        env[f"{name}_ok"] = True
    except Exception as e:
        env[f"{name}_ok"] = False
        env[f"{name}_error"] = f"{type(e).__name__}: {e}"
try:
    import importlib.metadata as md
    env["galore_torch"] = md.version("galore-torch")
    env["transformers"] = md.version("transformers")
except Exception:
    pass
json.dump(env, open(out, "w"), indent=1)
print(json.dumps(env))
PY
drop_spec() {  # drop_spec NAME: remove an optimizer whose package failed to import
  SWEEP_SPECS=$(tr ',' '\n' <<<"$SWEEP_SPECS" | grep -v "^$1\(:\|$\)" | paste -sd, -)
}
for name in galore flora_opt; do
  if ! grep -q "\"${name}_ok\": true" "$RUNS/env.json"; then
    say "WARNING: $name cannot be imported (see env.json); it is left out"; drop_spec "$name"
  fi
done
if grep -q '"nvidia_smi": "[^"]*Exclusive' "$RUNS/env.json"; then
  say "WARNING: the GPU is in an exclusive compute mode: one process at a time"
  P_SWEEP=1 P_PART1=1 P2_JOBS=1
fi
export SWEEP_SPECS EXTRA_SPECS
export BATCH=$(grep -o '"batch_size": [0-9]*' "$RUNS/env.json" | grep -o '[0-9]*$')
export CONTEXT=$(grep -o '"context": [0-9]*' "$RUNS/env.json" | grep -o '[0-9]*$')
export N_LRS=3

# ---- 1. calibration (same concurrency as the sweep; short runs, timing only)
N_SPECS=$(tr ',' '\n' <<<"$SWEEP_SPECS" | wc -l)
N_P2=$(( $(tr ',' '\n' <<<"$P2_MODES" | wc -l) * $(tr ',' '\n' <<<"$P2_SEEDS" | wc -l) ))
P2_JOBS=${P2_JOBS:-$N_P2}
export N_P2 P2_JOBS
CAL_DL=$(( $(now) + 120 < TRAIN_DEADLINE - 60 ? $(now) + 120 : TRAIN_DEADLINE - 60 ))
CAL1_JOBS=$(( P_SWEEP == 1 ? 1 : N_SPECS ))
export CAL_N=$(( P_SWEEP > CAL1_JOBS ? P_SWEEP : CAL1_JOBS ))
CAL_COMMON=(--part 1 --run-dir "$RUNS/calib/part1" --steps "$CAL_STEPS" --eval-every 100000
            --ckpt-every 100000 --eval-windows 32 --log-every 2 --barrier "$CAL_N" $MODEL_ARGS)
export CAL1_T0=$(date +%s.%N)
run_conv calib1 "$CAL_DL" "${CAL_COMMON[@]}" --optimizers "$SWEEP_SPECS" --seeds 0 --jobs "$CAL1_JOBS" &
CAL_PIDS=($!)
if (( P_SWEEP > N_SPECS )); then   # fill the GPU with as many processes as the sweep will run
  EXTRA_CAL=$(tr ',' '\n' <<<"$SWEEP_SPECS" | head -n $(( P_SWEEP - N_SPECS )) | paste -sd, -)
  run_conv calib1b "$CAL_DL" "${CAL_COMMON[@]}" --optimizers "$EXTRA_CAL" --seeds 1 \
    --jobs $(( P_SWEEP - N_SPECS )) &
  CAL_PIDS+=($!)
fi
wait "${CAL_PIDS[@]}"
export CAL1_T1=$(date +%s.%N) CAL2_T0=$(date +%s.%N)
run_conv calib2 "$(( $(now) + 90 ))" --part 2 --run-dir "$RUNS/calib/part2" \
  --init-from "best:$RUNS/calib/part1" --steps "$CAL_UPDATES" --eval-every 100000 \
  --eval-windows 32 --modes "$P2_MODES" --seeds "$P2_SEEDS" --jobs "$P2_JOBS" --barrier "$P2_JOBS" $P2_ARGS
export CAL2_T1=$(date +%s.%N)

# ---- 2. plan
read -r STEPS EVAL_EVERY < <(plan plan1 "$RUNS") || true
if [[ -z "${STEPS:-}" ]]; then say "planning failed (no calibration result?); using S=$S_MIN"; STEPS=$S_MIN; EVAL_EVERY=$(( S_MIN / 10 )); fi
say "plan: $STEPS steps per part-1 run, eval every $EVAL_EVERY ($(grep -o '"est_sweep_s": [0-9.]*' "$RUNS/plan.json"), $(grep -o '"est_part1_s": [0-9.]*' "$RUNS/plan.json"))"
P1_COMMON=(--part 1 --run-dir "$RUNS/part1" --steps "$STEPS" --eval-every "$EVAL_EVERY"
           --ckpt-every 1000000 --eval-windows "$EVAL_WINDOWS" $MODEL_ARGS)

# ---- 3. learning-rate sweep
DL=$(plan deadline "$RUNS" sweep); DL=${DL:-$(( TRAIN_DEADLINE - 120 ))}
run_conv sweep "$DL" "${P1_COMMON[@]}" --lr-sweep --optimizers "$SWEEP_SPECS" --seeds 0 --jobs "$P_SWEEP"

# ---- 4. part 1: 3 seeds at the chosen lr (seed 0 is the sweep's run)
DL=$(plan deadline "$RUNS" part1); DL=${DL:-$(( TRAIN_DEADLINE - 60 ))}
run_conv part1 "$DL" "${P1_COMMON[@]}" --lr-from "$RUNS/part1" \
  --optimizers "$SWEEP_SPECS${EXTRA_SPECS:+,$EXTRA_SPECS}" --seeds 0,1,2 --jobs "$P_PART1"

# ---- 5. part 2 from the best finished part-1 run
read -r UPDATES EVAL2 < <(plan plan2 "$RUNS") || true
UPDATES=${UPDATES:-$U_MIN}; EVAL2=${EVAL2:-$(( U_MIN / 8 ))}
say "part 2: $UPDATES updates per run"
run_conv part2 "$TRAIN_DEADLINE" --part 2 --run-dir "$RUNS/part2" --init-from "best:$RUNS/part1" \
  --steps "$UPDATES" --eval-every "$EVAL2" --eval-windows "$EVAL_WINDOWS" --modes "$P2_MODES" \
  --seeds "$P2_SEEDS" --jobs "$P2_JOBS" $P2_ARGS

# ---- 5b. time left: more seeds of the optimizers the claim compares (narrower noise)
CLAIM_SPECS=$(tr ',' '\n' <<<"$SWEEP_SPECS" | grep -E '^(flora|adafactor_momentum|adafactor|flora_opt)(:|$)' | paste -sd, -)
K=$(plan extra "$RUNS" "$CLAIM_SPECS" 2>/dev/null || echo 0)
if (( ${K:-0} > 0 )); then
  EXTRA_SEEDS=$(seq -s, 3 $(( 2 + K )))
  say "time left for $K more seed(s) of $CLAIM_SPECS: seeds $EXTRA_SEEDS"
  run_conv part1_extra "$TRAIN_DEADLINE" "${P1_COMMON[@]}" --lr-from "$RUNS/part1" \
    --optimizers "$CLAIM_SPECS" --seeds "$EXTRA_SEEDS" --jobs "$P_PART1"
fi

# ---- 6. report and results
cp "$RUNS/plan.json" "$OUT/plan.json" 2>/dev/null
left=$(( DEADLINE - $(now) - 10 ))
if (( left > 15 )); then
  timeout -k 2 $(( left < 45 ? left : 45 )) "$PY" benchmarks/convergence_report.py "$RUNS" \
    --out "$RUNS/report" >"$RUNS/logs/report.log" 2>&1 \
    && cp "$RUNS/report/convergence.md" "$OUT/convergence.md" \
    || { say "report failed or timed out (see logs/report.log)"; tail -5 "$RUNS/logs/report.log"; }
fi
tar -czf "$OUT/convergence_runs.tar.gz" -C "$(dirname "$RUNS")" --exclude='*.pt' \
  --exclude='*.tmp' "$(basename "$RUNS")"
say "done: $(du -h "$OUT/convergence_runs.tar.gz" | cut -f1) in $OUT/convergence_runs.tar.gz; $(( DEADLINE - $(now) )) s before the deadline"
