"""The least time a step can take: the bytes it must move against the GPU's streaming bandwidth.

For one model's shapes and dtype, in one process on one GPU:
1. the bytes a step must move at the least, for fused AdamW and for each Flora
   configuration (the sum over tensors of what docs/FLORA.md's step reads and writes, each
   pass that needs a tensor reading it once, nothing else);
2. the bandwidth of torch's own streaming kernels (copy_, add_, sum) over buffers the
   size of the model's gradients and parameters; the best of them is W;
3. the measured median step of fused AdamW and of the Flora configurations (as
   bench_step.py measures it, CUDA events around opt.step()).

A step that moves B bytes takes at least B / W. Where B / W is close to or above a
target's share of AdamW's measured step, no kernel design that moves B bytes meets that
target; only one that moves fewer bytes (e.g. a gradient read from L2 instead of DRAM)
can.

    python benchmarks/bench_floor.py --dtype float32 bfloat16 --out benchmarks/results/bench_floor.md
"""
from __future__ import annotations

import argparse
import statistics

import torch

import bench_step
import flora_ext

_GB = 1e9


def flora_bytes(shapes, elem, rank, beta1):
    """Least bytes of one Flora step (gradient and parameter of `elem` bytes, state fp32).

    Factored tensors: the statistics pass reads G; the apply pass reads G and p, writes p
    (4 elem a parameter). Compressed momentum adds one read of G for down(U) and one read
    and write of the r x max(n, m) momentum (the clip's momentum terms come from that
    pass). Dense momentum adds a read of M before the write (the clip's <U, M>) and a read
    and write of M in the apply pass. Tensors with a full second moment read it twice and
    write it once. With cached parameter norms no pass reads p for RMS(p) alone.
    """
    total = 0
    for shape in shapes:
        layout = flora_ext.param_layout(shape, rank, beta1, True)
        numel = torch.Size(shape).numel()
        moved = 4 * elem * numel
        if not layout["factored"]:
            moved += 12 * numel
        if layout["momentum"] == "compressed":
            moved += elem * numel + 8 * torch.Size(layout["momentum_shape"]).numel()
        elif layout["momentum"] == "dense":
            moved += 12 * numel
        total += moved
    return total


def adamw_bytes(shapes, elem):
    """Fused AdamW: reads p, g, exp_avg, exp_avg_sq (state in the parameters' dtype) and
    writes p and both moments: 7 elem a parameter."""
    return 7 * elem * sum(torch.Size(s).numel() for s in shapes)


def timed(fn, steps=10, warmup=3):
    """Median GPU time of fn() in ms (CUDA events, the GPU idle before each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median([bench_step.timed_call(fn) for _ in range(steps)])


def streaming_bandwidth(numel, dtype):
    """{kernel: GB/s} of torch's copy_, add_ and sum over `numel`-element buffers."""
    elem = torch.empty((), dtype=dtype).element_size()
    grad = torch.randn(numel, device="cuda").to(dtype)
    param = torch.randn(numel, device="cuda").to(dtype)
    kernels = {
        "copy_ (read 1, write 1)": (lambda: param.copy_(grad), 2),
        "add_ (read 2, write 1)": (lambda: param.add_(grad, alpha=-1e-3), 3),
        "sum (read 1)": (lambda: torch.sum(grad, dtype=torch.float32), 1),
    }
    result = {name: moved * elem * numel / (timed(fn) * 1e-3) / _GB
              for name, (fn, moved) in kernels.items()}
    del grad, param
    torch.cuda.empty_cache()
    return result


def run(args, dtype_name):
    dtype = getattr(torch, dtype_name)
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = bench_step.llama_shapes(*bench_step.MODELS[args.model])
    numel = sum(torch.Size(s).numel() for s in shapes)
    bandwidth = streaming_bandwidth(numel, dtype)
    best = max(bandwidth.values())
    params, grads = bench_step.make_params(shapes, dtype)
    table = bench_step.optimizers(args.rank)
    configs = [("adamw_fused", adamw_bytes(shapes, elem)),
               (f"flora_r{args.rank}_b0.9", flora_bytes(shapes, elem, args.rank, 0.9)),
               ("flora_nomomentum", flora_bytes(shapes, elem, args.rank, None))]
    measured = {}
    for name, _ in configs:
        measured[name] = statistics.median(
            bench_step.measure(table[name], params, grads, args.steps, args.warmup)[0])
    del params, grads
    torch.cuda.empty_cache()
    adamw = measured["adamw_fused"]
    text = (f"\n### Byte floor, LLaMA {args.model} shapes, {dtype_name} params, rank {args.rank}\n\n"
            f"{bench_step.measured_on()}, {numel / 1e9:.3f}B parameters in {len(shapes)} "
            f"tensors. {bench_step.measured_by()}\n\n"
            "Streaming bandwidth of torch's kernels over buffers of the model's size:\n\n"
            "| kernel | GB/s |\n|---|---|\n" +
            "".join(f"| {k} | {v:.0f} |\n" for k, v in bandwidth.items()) +
            f"\nFloor = least bytes / {best:.0f} GB/s (the best above). The measured step is "
            "the median of bench_step.py's timing (host time before the first kernel "
            "included, for AdamW too).\n\n"
            "| step | least bytes/param | least GB | floor (ms) | measured (ms) | floor / AdamW measured | measured / floor |\n"
            "|---|---|---|---|---|---|---|\n")
    for name, moved in configs:
        floor = moved / (best * _GB) * 1e3
        text += (f"| {name} | {moved / numel:.2f} | {moved / _GB:.2f} | {floor:.2f} | "
                 f"{measured[name]:.2f} | {floor / adamw:.3f} | {measured[name] / floor:.2f} |\n")
    bench_step.report(text, args.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.35b", choices=sorted(bench_step.MODELS))
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="append a Markdown table to this file")
    args = ap.parse_args()
    for dtype_name in args.dtype:
        run(args, dtype_name)


if __name__ == "__main__":
    main()
