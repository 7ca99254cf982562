"""Per-kernel profile of one Flora step on LLaMA shapes: time and achieved bandwidth.

torch.profiler records the CUDA kernels of --steps steps; for Flora's own passes the
bytes each must move are computed from the parameter layouts (the floor of that pass:
every tensor it reads or writes once), so achieved GB/s = bytes / time. cuBLAS and
other kernels get their time only.

    python benchmarks/profile_step.py --out benchmarks/results/profile_step.md
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import parse_tuning, tuning_args  # noqa: E402
from bench_step import (MODELS, PerParamSteps, llama_shapes, make_params,  # noqa: E402
                        measured_by, measured_on, report)


def pass_bytes(params, opt, per_param=False):
    """Bytes each of Flora's passes must move in a steady-state step, from the state
    layouts: the stats pass reads p only without reuse_param_norms (sum p^2 is kept from
    the last step), and factored tensors without momentum have no rms pass (row stats).
    Compressed momentum is counted as the fused path moves it (tf32=True, the default):
    no rms pass, and an apply pass that reads G and p and writes p (its fp16 GEMM
    operands, r x (n + m), are left out); the unfused path moves more."""
    from flora_ext import param_layout

    group = opt.param_groups[0]
    # one call a parameter keeps no norms (FloraAccumulator's path reads p every step)
    p_read = 0 if opt.reuse_param_norms and group["scale_parameter"] and not per_param else 1
    total = defaultdict(int)
    for p in params:
        e = p.element_size()
        n = p.numel()
        lay = param_layout(p.shape, group["rank"], group["beta1"], group["factorize_second_moment"])
        mom = lay["momentum"]
        if lay["factored"]:
            total["stats"] += (1 + p_read) * e * n                        # read G (and p)
            if mom == "dense":  # reads G and M, writes M (= D)
                total["rms"] += e * n + 8 * n
            total["apply"] += 3 * e * n + (4 * n if mom == "dense" else 0)
        else:
            total["stats"] += (1 + p_read) * e * n + 8 * n + (8 * n if mom == "dense" else 0)
            total["apply"] += 2 * e * n + (4 * n if mom == "dense" else e * n + 4 * n)
    return total


def short_name(kernel):
    # The statistics pass of wide rows and of 8-bit unfactored tasks runs as launches of
    # its own; the pass's floor counts all its tensors, so they share its row.
    for key in ("stats_wide_kernel", "stats_quantized_kernel"):
        if key in kernel:
            return "stats"
    # scale_projection_t before projection_t, whose name it contains (down_library=1).
    for key in ("fused_down_kernel", "down_epilogue_kernel", "gram_dot_kernel",
                "scale_projection_t_kernel", "projection_t_kernel", "stats_kernel",
                "finalize_kernel", "scalars_kernel", "norms_kernel", "rms_kernel", "clip_kernel",
                "apply_kernel", "projection_pair_kernel", "fill_projection_kernel",
                "momentum_mix_kernel", "row_factor_kernel"):
        if key in kernel:
            return key.replace("_kernel", "")
    if "gemm" in kernel.lower() or "sm90" in kernel or "cutlass" in kernel.lower():
        return "cublas gemm"
    return kernel[:60]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.35b", choices=sorted(MODELS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--per-param", action="store_true",
                    help="step each parameter in its own call, last first, as FloraAccumulator's "
                         "hooks do, instead of one opt.step()")
    ap.add_argument("--configs", nargs="*", default=["none", "compressed"],
                    help="none (beta1=None), compressed (rank --rank, beta1 0.9) and/or q8 "
                         "(compressed with quantization=True)")
    ap.add_argument("--tuning", nargs="+", type=parse_tuning, default=[], metavar="KEY=INT",
                    help="torch.ops.flora._set_tuning(KEY=INT, ...) for every step profiled (a "
                         "variant of the CUDA step, e.g. down_library=1)")
    args = ap.parse_args()
    import flora_ext

    tuning = dict(args.tuning)
    if tuning:
        torch.ops.flora._set_tuning(**tuning)

    dtype = getattr(torch, args.dtype)
    params, grads = make_params(llama_shapes(*MODELS[args.model]), dtype)
    how = ", one call a parameter (--per-param)" if args.per_param else ""
    if tuning:
        how += ", " + ", ".join(tuning_args(tuning))
    text = (f"\n### Kernel profile, LLaMA {args.model} shapes, {args.dtype} params{how}\n\n"
            f"{measured_on()}, {measured_by()}\n")
    configs = {"none": ("no momentum", dict(beta1=None)),
               "compressed": (f"rank {args.rank}, beta1 0.9, TF32", dict(beta1=0.9, rank=args.rank)),
               "q8": (f"rank {args.rank}, beta1 0.9, TF32, quantization=True",
                      dict(beta1=0.9, rank=args.rank, quantization=True))}
    for label, kw in (configs[c] for c in args.configs):
        opt = flora_ext.Flora(params, lr=1e-3, **kw)
        if args.per_param:
            opt = PerParamSteps(opt, params)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                opt.step()
            torch.cuda.synchronize()
        times, counts = defaultdict(float), defaultdict(int)
        for evt in prof.events():
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            name = short_name(evt.name)
            times[name] += evt.time_range.elapsed_us() / 1e3 / args.steps   # ms per step
            counts[name] += 1
        floor = pass_bytes(params, getattr(opt, "opt", opt), args.per_param)
        total = sum(times.values())
        text += (f"\n{label}: kernel time {total:.2f} ms a step\n\n"
                   "| kernel | ms / step | launches / step | bytes moved (floor) | GB/s |\n"
                   "|---|---|---|---|---|\n")
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            b = floor.get(name)
            bw = f"{b / (ms * 1e-3) / 1e9:.0f}" if b and ms > 0 else "-"
            text += (f"| {name} | {ms:.3f} | {counts[name] / args.steps:.0f} | "
                       f"{f'{b / 1e9:.2f} GB' if b else '-'} | {bw} |\n")
        del opt
        torch.cuda.empty_cache()
    report(text, args.out)


if __name__ == "__main__":
    main()
