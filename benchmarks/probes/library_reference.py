"""What tuned library kernels take for the parts of Flora's two GEMM passes, on the tensors
of a LLaMA model that take fused compressed momentum (aspect ratio <= 4), bf16 parameters:

- the up GEMM alone: cuBLAS fp16 A B with K = rank, the n x m product written (2 bytes an
  element) and nothing else read;
- cuBLAS addmm in place, p = p - lr A B (bf16; p read and written: 4 bytes an element);
- the apply pass's stream alone: torch._foreach_add_(p, g) (reads g and p, writes p:
  6 bytes an element, the fused apply pass's least traffic);
- the down GEMM as the unfused path runs it: (P diag a) G (left, n < m) or G (diag b P)
  (right), bf16 operands, K = the short side, a float32 r x m (n x r) result.

Tensors of one shape share one batched GEMM (torch.bmm), as Flora's shape groups do.

The fused apply pass does the up GEMM and the stream in one kernel; if the two overlapped
perfectly it would take about the larger of the two. The figures place the fused passes
(profile_step.py) against what a library reaches on the same shapes.

Usage (GPU machine): python benchmarks/probes/library_reference.py [--models 1.35b 7b]
"""
import argparse
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_floor import timed  # noqa: E402
from bench_step import MODELS, llama_shapes, measured_on  # noqa: E402


def median_ms(fn):
    """Median GPU time of fn() in ms over 5 calls after one warm-up call."""
    return timed(fn, steps=5, warmup=1)


def measure(model, rank):
    shapes = [s for s in llama_shapes(*MODELS[model]) if len(s) == 2 and max(s) <= 4 * min(s)]
    counts = Counter(shapes)  # tensors of one shape take batched GEMMs, as Flora's do
    dev, bf16, f16 = "cuda", torch.bfloat16, torch.float16
    ps, gs, a16, b16, projs = [], [], [], [], []
    for (n, m), c in counts.items():
        ps.append(torch.randn(c, n, m, device=dev, dtype=bf16))
        gs.append(torch.randn(c, n, m, device=dev, dtype=bf16))
        a16.append(torch.randn(c, n, rank, device=dev, dtype=f16))
        b16.append(torch.randn(c, rank, m, device=dev, dtype=f16))
        # P along the short side, as Flora draws it
        projs.append(torch.randn((c, rank, n) if n < m else (c, m, rank), device=dev,
                                 dtype=bf16))
    a_bf, b_bf = [a.to(bf16) for a in a16], [b.to(bf16) for b in b16]
    p_list = [t for p in ps for t in p.unbind(0)]
    g_list = [t for g in gs for t in g.unbind(0)]
    elements = sum(p.numel() for p in ps)
    flop = 2 * rank * elements

    def up_gemm():
        for a, b in zip(a16, b16):
            torch.bmm(a, b)

    def addmm():
        for p, a, b in zip(ps, a_bf, b_bf):
            torch.baddbmm(p, a, b, beta=1.0, alpha=-1e-3, out=p)

    def stream():
        torch._foreach_add_(p_list, g_list, alpha=-1e-3)

    def down_gemm():
        for g, proj, (n, m) in zip(gs, projs, counts):
            a, b = (proj, g) if n < m else (g, proj)
            torch.bmm(a, b, out_dtype=torch.float32)

    rows = []
    t = median_ms(up_gemm)
    rows.append(("up GEMM alone, fp16, n x m written", t, f"{flop / t / 1e9:.0f} TFLOP/s"))
    t = median_ms(addmm)
    rows.append(("addmm in place, bf16 (p read and written)", t,
                 f"{4 * elements / t / 1e6:.0f} GB/s of p, {flop / t / 1e9:.0f} TFLOP/s"))
    t = median_ms(stream)
    rows.append(("stream p += g (6 bytes an element)", t, f"{6 * elements / t / 1e6:.0f} GB/s"))
    t = median_ms(down_gemm)
    rows.append(("down GEMM, bf16, float32 result", t,
                 f"{flop / t / 1e9:.0f} TFLOP/s, G at {2 * elements / t / 1e6:.0f} GB/s"))
    return len(shapes), elements, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["1.35b", "7b"], choices=sorted(MODELS))
    ap.add_argument("--rank", type=int, default=256)
    args = ap.parse_args()
    print(f"{measured_on()}. Command: `python {' '.join(sys.argv)}`\n")
    print("| model | tensors | elements (G) | kernel | ms | rate |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        count, elements, rows = measure(model, args.rank)
        for what, ms, rate in rows:
            print(f"| {model} | {count} | {elements / 1e9:.3f} | {what} | {ms:.2f} | {rate} |",
                  flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
