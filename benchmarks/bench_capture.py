"""Flora's step captured in a CUDA graph (capturable=True) against the eager steps.

One process, one GPU, LLaMA shapes of bench_step.py. For each model and dtype, rows:
  plain             Flora(capturable=False), eager opt.step()
  plain_resample    the same with kappa=1: every step changes basis (what a capturable step
                    always plans and runs: the next basis, the transfer of M to it and a
                    second down GEMM, used or not; docs/cuda.md, "CUDA graphs")
  capturable        Flora(capturable=True), eager opt.step()
  graph             the capturable step captured once (torch.cuda.graph) and replayed
Columns: median GPU time of a step (CUDA events around it: the host time shows where the
GPU waits for it), median host time of the call (time.perf_counter, no sync), and the
workspace a capturable optimizer keeps between steps (its plan's tables and temporaries;
the plain step allocates that much from the caching allocator during each step).

    python benchmarks/bench_capture.py --models 0.1b 1.35b --dtype float32 bfloat16 \
        --out benchmarks/results/bench_capture.md
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from bench_step import MODELS, llama_shapes, make_params, measured_by, measured_on, report


def timed(fn):
    """fn() between two CUDA events: (GPU ms, host ms of the call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host


def workspace_bytes(opt):
    return sum(w.numel() * w.element_size() for _, spaces in opt._workspaces.values()
               for w in spaces.values())


def measure(mode, params, grads, rank, steps, warmup):
    import flora_ext

    for p, g in zip(params, grads):
        p.grad = g  # the same gradient tensors every step: what a captured graph reads
    opt = flora_ext.Flora(params, lr=1e-3, rank=rank, beta1=0.9,
                          kappa=1 if mode == "plain_resample" else 1000,
                          capturable=mode in ("capturable", "graph"))
    step = opt.step
    if mode == "graph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        step = graph.replay
    else:
        for _ in range(warmup):
            opt.step()
    torch.cuda.synchronize()
    gc.collect()
    times = [timed(step) for _ in range(steps)]
    kept = workspace_bytes(opt)
    del opt, step
    gc.collect()
    torch.cuda.empty_cache()
    return [t for t, _ in times], [h for _, h in times], kept


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["0.1b", "1.35b"], choices=sorted(MODELS))
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2,
                    help="measure the modes in turn this many times; medians over all steps")
    ap.add_argument("--out", help="append a Markdown table to this file")
    args = ap.parse_args()
    modes = ("plain", "plain_resample", "capturable", "graph")
    for model in args.models:
        shapes = llama_shapes(*MODELS[model])
        for dtype_name in args.dtype:
            params, grads = make_params(shapes, getattr(torch, dtype_name))
            gpu, host, kept = {m: [] for m in modes}, {m: [] for m in modes}, {}
            for _ in range(args.rounds):
                for mode in modes:
                    try:
                        t, h, kept[mode] = measure(mode, params, grads, args.rank, args.steps,
                                                   args.warmup)
                    except Exception as err:  # report, keep measuring the others
                        print(f"{model} {dtype_name} {mode}: failed: {type(err).__name__}: "
                              f"{err}", file=sys.stderr)
                        continue
                    gpu[mode] += t
                    host[mode] += h
            numel = sum(p.numel() for p in params)
            text = (f"\n### {model} ({numel / 1e9:.2f}B parameters), {dtype_name}, rank "
                    f"{args.rank}\n\n{measured_on()}. {measured_by()}\n\n"
                    f"| mode | step (GPU, median ms) | host time of the call (median ms) | "
                    f"kept workspace (MiB) |\n|---|---|---|---|\n")
            for mode in modes:
                if not gpu[mode]:
                    text += f"| {mode} | failed | | |\n"
                    continue
                text += (f"| {mode} | {statistics.median(gpu[mode]):.3f} | "
                         f"{statistics.median(host[mode]):.3f} | "
                         f"{kept.get(mode, 0) / 2**20:.1f} |\n")
            report(text, args.out)
            del params, grads
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
