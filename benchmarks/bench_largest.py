#!/usr/bin/env python3
"""The largest LLaMA-shaped model each optimizer trains on one GPU, and its best configuration.

Models have LLaMA-7B's widths (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000,
sequence 2048) and L decoder layers: 6.74B parameters at L = 32, 0.202B more per layer. Every
trial is one child process of benchmarks/bench_memory.py (its own CUDA context and
allocator, bf16 parameters, random tokens), so a trial that runs out of memory costs only
itself. Optimizers (bench_memory's configurations):

  flora_accum     flora_ext.Flora(beta1=0.9, rank=256) + FloraAccumulator(rank=256)
  flora_accum_q8  the same with quantization=True (8-bit momentum)
  flora_accum_defaults  Flora's defaults (no momentum) + FloraAccumulator(rank=256), beside
                  the headline
  flora           flora_ext.Flora(beta1=0.9, rank=256) without the accumulator: autograd
                  keeps every gradient and one step after the backward steps them all
  adamw           torch.optim.AdamW(fused=True)
  adamw8bit       torchao.optim.AdamW8bit (when torchao imports; else reported as error)
  no_step         no optimizer: forward and backward, gradients dropped as they accumulate.
                  Its tokens/s at a configuration bounds every optimizer's there; asked for
                  by name (not in the default list)

For each optimizer two searches, a fixed number of tokens per optimizer step
(--tokens-per-step, 8192 = 4 sequences):

  best       at --best-layers (32: 7B), every (micro-batch size, checkpointing) of --grid;
             micro-batches = tokens per step / (micro-batch size x sequence). The best is
             the highest tokens/s among the trials that fit.
  largest    checkpointing on, micro-batch size 1: from --start-layers, up by --layer-step
             while a trial fits, down while it does not, then bisection to --resolution
             layers. Reported: the largest L that fits, with its tokens/s.

Model FLOPs utilisation = tokens/s x (6 N + 12 L hidden seq) / the device's dense bf16 peak
(--peak-tflops; 989 for an H100 or H200 SXM when not given): recomputation by checkpointing
is not counted as useful work.

    python benchmarks/bench_largest.py --optimizers flora_accum_q8 adamw --budget 1800 \\
        --out benchmarks/results/bench_largest.md
    python benchmarks/bench_largest.py --tiny --device cpu --out /tmp/largest.md   # smoke

The Markdown goes to --out and every trial as JSON next to it (.json). --profile DIR adds
one profiled step to every trial (bench_memory's --profile: GPU time by kernel kind and by
stream, the trace), its summary in the trial's JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import bench_memory  # its children run every trial (benchmarks/ is on sys.path)

OPTIMIZERS = ("flora_accum", "flora_accum_q8", "flora_accum_defaults", "flora", "adamw",
              "adamw8bit", "no_step")
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense bf16, SXM
HIDDEN, SEQ = 4096, 2048
TINY_HIDDEN, TINY_SEQ = 64, 64


def parse_grid(text):
    """'1:on 2:off' -> [(1, True), (2, False)]."""
    grid = []
    for item in text.split():
        mbs, _, ckpt = item.partition(":")
        if not mbs.isdigit() or int(mbs) < 1 or ckpt not in ("on", "off"):
            raise argparse.ArgumentTypeError(
                f"--grid entries are MICRO_BATCH_SIZE:on|off (checkpointing), got {item!r}")
        grid.append((int(mbs), ckpt == "on"))
    return grid


class Trials:
    """Runs bench_memory.py children under one deadline and keeps every result."""

    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget
        self.results = []

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, optimizer, layers, mbs, checkpointing, purpose):
        a = self.args
        seq = TINY_SEQ if a.tiny else SEQ
        if a.tokens_per_step % (mbs * seq):
            raise SystemExit(f"--tokens-per-step {a.tokens_per_step} is not a multiple of "
                             f"micro-batch size {mbs} x sequence {seq}")
        micro_batches = a.tokens_per_step // (mbs * seq)
        trial = dict(optimizer=optimizer, layers=layers, micro_batch_size=mbs,
                     micro_batches=micro_batches, checkpointing=checkpointing, purpose=purpose)
        rank = 8 if a.tiny else 256  # bench_memory's default ranks
        child_args = argparse.Namespace(
            device=a.device, steps=a.steps, warmup=a.warmup, micro_batches=micro_batches,
            micro_batch_size=mbs, layers=layers, no_checkpointing=not checkpointing,
            tiny=a.tiny, seq=None, lr=1e-4, rank=rank, flora_rank=rank, flora_beta1=0.9,
            min_config_s=a.min_trial_s, budget=a.budget, step_group_mb=a.step_group_mb,
            overlap_steps=a.overlap_steps, tuning=a.tuning,
            # one directory a trial: bench_memory names the files by configuration only
            profile=a.profile and os.path.join(
                a.profile, f"{optimizer}_L{layers}_mbs{mbs}_{'ckpt' if checkpointing else 'nockpt'}"))
        deadline = min(self.deadline, time.monotonic() + a.trial_timeout_s)
        child = bench_memory.run_config(child_args, optimizer, deadline,
                                        stdout=subprocess.DEVNULL if a.quiet else None)
        trial.update({k: child[k] for k in ("status", "error", "params", "peak_allocated_gib",
                                            "peak_reserved_gib", "median_step_s",
                                            "tokens_per_s", "optimizer_state_gib", "versions",
                                            "profile", "tuning")
                      if k in child})
        trial["wall_s"] = round(child.get("wall_s", 0.0), 1)
        self.results.append(trial)
        print(f"[trial] {optimizer} L={layers} mbs={mbs} ckpt={'on' if checkpointing else 'off'}"
              f": {trial['status']}, peak {fmt(trial.get('peak_allocated_gib'), '.2f')} GiB,"
              f" {trial.get('tokens_per_s', 0):,.0f} tokens/s ({trial['wall_s']} s; "
              f"{self.left():.0f} s left)", flush=True)
        return trial


def fits(trial):
    return trial["status"] == "ok"


def search_largest(trials, optimizer, args):
    """Largest layer count that fits (checkpointing on, micro-batch size 1), or None."""
    def probe(layers):
        return fits(trials.run(optimizer, layers, 1, True, "largest"))

    lo, hi = None, None  # lo fits, hi does not
    layers = args.start_layers
    while trials.left() >= args.min_trial_s and 1 <= layers <= args.max_layers:
        if probe(layers):
            lo = layers
            if hi is not None:
                break
            layers += args.layer_step
        else:
            hi = layers
            if lo is not None or layers == 1:
                break
            layers = max(1, layers - args.layer_step)
    while lo is not None and hi is not None and hi - lo > args.resolution:
        if trials.left() < args.min_trial_s:
            break
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def mfu(trial, peak_tflops, hidden, seq):
    if not fits(trial) or not peak_tflops or not trial.get("params"):
        return None
    flops_per_token = 6 * trial["params"] + 12 * trial["layers"] * hidden * seq
    return trial["tokens_per_s"] * flops_per_token / (peak_tflops * 1e12)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def row(trial, peak, hidden, seq):
    ok = fits(trial)
    return (f"| {trial['optimizer']} | {trial['purpose']} | {trial['layers']} | "
            f"{fmt(trial.get('params') and trial['params'] / 1e9, '.2f')} | "
            f"{trial['micro_batch_size']} x {trial['micro_batches']} | "
            f"{'on' if trial['checkpointing'] else 'off'} | "
            f"{fmt(trial.get('peak_allocated_gib'), '.1f')} | "
            f"{fmt(trial.get('tokens_per_s') if ok else None, ',.0f')} | "
            f"{fmt(mfu(trial, peak, hidden, seq), '.1%')} | {trial['status']}"
            + (f": {trial.get('error', '')[:120].replace('|', '/')}" if not ok and
               trial.get("error") else "") + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--optimizers", nargs="+", default=[o for o in OPTIMIZERS if o != "no_step"],
                    choices=OPTIMIZERS)
    ap.add_argument("--searches", nargs="+", default=["best", "largest"],
                    choices=("best", "largest"))
    ap.add_argument("--grid", type=parse_grid, default=parse_grid("1:on 1:off 2:off 4:off"),
                    help="micro-batch size:checkpointing of the best search "
                         "(default '1:on 1:off 2:off 4:off')")
    ap.add_argument("--best-layers", type=int, default=None, help="32 (7B); 2 with --tiny")
    ap.add_argument("--start-layers", type=int, default=None,
                    help="first layer count of the largest search (default 96; 2 --tiny)")
    ap.add_argument("--layer-step", type=int, default=None, help="32; 1 with --tiny")
    ap.add_argument("--max-layers", type=int, default=400)
    ap.add_argument("--resolution", type=int, default=4,
                    help="the largest search stops when it brackets the limit this closely")
    ap.add_argument("--tokens-per-step", type=int, default=None, help="8192; 256 with --tiny")
    ap.add_argument("--step-group-mb", type=int, default=0,
                    help="the Flora trials' FloraAccumulator(step_group_bytes=N MiB) (0)")
    ap.add_argument("--overlap-steps", action="store_true",
                    help="the Flora trials' FloraAccumulator(overlap_steps=True)")
    ap.add_argument("--tuning", nargs="+", type=bench_memory.parse_tuning, default=[],
                    metavar="KEY=INT", help="CUDA: bench_memory's --tuning for every trial "
                    "(torch.ops.flora._set_tuning(KEY=INT, ...), e.g. down_library=1)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile one more step of every trial that fits (bench_memory's "
                         "--profile: GPU time by kernel kind and by stream, the trace), in "
                         "DIR/<optimizer>_L<layers>_mbs<size>_<ckpt|nockpt>/")
    ap.add_argument("--steps", type=int, default=2, help="timed steps a trial (2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--budget", type=float, default=1800.0, help="wall seconds in all")
    ap.add_argument("--trial-timeout-s", type=float, default=240.0)
    ap.add_argument("--min-trial-s", type=float, default=45.0, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, for testing")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true", help="hide the children's output")
    ap.add_argument("--out", default="benchmarks/results/bench_largest.md")
    args = ap.parse_args(argv)
    args.tuning = dict(args.tuning)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny
    args.best_layers = args.best_layers or (2 if tiny else 32)
    args.start_layers = args.start_layers or (2 if tiny else 96)
    args.layer_step = args.layer_step or (1 if tiny else 32)
    args.tokens_per_step = args.tokens_per_step or (256 if tiny else 8192)
    if tiny:
        args.min_trial_s = min(args.min_trial_s, 5.0)
    hidden, seq = (TINY_HIDDEN, TINY_SEQ) if tiny else (HIDDEN, SEQ)
    started = datetime.datetime.now(datetime.timezone.utc)
    trials = Trials(args)
    summary = {}
    for optimizer in args.optimizers:
        if "best" in args.searches:
            for mbs, ckpt in args.grid:
                trials.run(optimizer, args.best_layers, mbs, ckpt, "best")
        if "largest" in args.searches:
            summary[optimizer] = search_largest(trials, optimizer, args)
    results = trials.results
    versions = next((t["versions"] for t in results if t.get("versions")), {})
    name = versions.get("device_name", args.device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    lines = [
        "# Largest model and best configuration on one GPU (benchmarks/bench_largest.py)", "",
        f"{name}, torch {versions.get('torch', '?')}, transformers "
        f"{versions.get('transformers', '?')}; {started:%Y-%m-%d %H:%M} UTC. Command: "
        f"`python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
        f"LLaMA widths (hidden {hidden}, sequence {seq}), bf16 parameters, "
        f"{args.tokens_per_step} tokens an optimizer step; peak = "
        "torch.cuda.max_memory_allocated; tokens/s from the median of "
        f"{args.steps} timed steps after {args.warmup}; MFU against "
        f"{fmt(peak, '.0f')} TFLOP/s dense bf16, recomputation not counted.", "",
        "| optimizer | search | layers | parameters (B) | micro-batch size x count | "
        "checkpointing | peak (GiB) | tokens/s | MFU | status |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(t, peak, hidden, seq) for t in results]
    lines += ["", "| optimizer | best tokens/s at "
              f"{args.best_layers} layers (configuration) | largest that fits (layers, B "
              "parameters, tokens/s, MFU) | smallest that did not fit (layers) |",
              "|---|---|---|---|"]
    for optimizer in args.optimizers:
        best = max((t for t in results if t["optimizer"] == optimizer and t["purpose"] == "best"
                    and fits(t)), key=lambda t: t["tokens_per_s"], default=None)
        best_cell = "-" if best is None else (
            f"{best['tokens_per_s']:,.0f} ({best['micro_batch_size']} x "
            f"{best['micro_batches']}, checkpointing "
            f"{'on' if best['checkpointing'] else 'off'}, "
            f"{fmt(best.get('peak_allocated_gib'), '.1f')} GiB)")
        lo, hi = summary.get(optimizer, (None, None))
        big = next((t for t in results if t["optimizer"] == optimizer
                    and t["purpose"] == "largest" and t["layers"] == lo and fits(t)), None)
        big_cell = "-" if big is None else (
            f"{lo}, {big['params'] / 1e9:.1f}B, {big['tokens_per_s']:,.0f}, "
            f"{fmt(mfu(big, peak, hidden, seq), '.1%')}")
        lines.append(f"| {optimizer} | {best_cell} | {big_cell} | {fmt(hi, 'd')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": sys.argv, "started": started.isoformat(), "peak_tflops": peak,
         "largest": summary, "trials": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
