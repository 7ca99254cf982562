"""Rounding of the fused CUDA path's orthogonal basis, simulated on the CPU.

The fused path (docs/cuda.md, "Compressed momentum, fused") draws P in fp32 and rounds it
to fp16, takes the fp32 Gram of that fp16 P (fp32 accumulation), forms W = s R^-T from it
(R its upper Cholesky factor; float64 or float elimination, then rounded to fp16: the W
cache's tensor), the basis P_o = W P by an fp16 GEMM with fp32 accumulation, and rounds
P_o to fp16 for the down and up GEMMs. The CPU path forms P_o from the fp32 P in float64
and rounds it to float32. For r / long in {1/16, 1/8, 1/4, 1/2} this prints the worst
relative error (Frobenius) over a few draws of:
  gaussian   fp16(P) fp16(U) (fp32 accumulation) against P U in float64: the Gaussian fused
             down projection's rounding, for comparison;
  basis      fp16(P_o) against the CPU path's P_o;
  down       fp16(P_o) fp16(U) against P_o U in float64 (P_o the CPU path's);
  up         fp16(P_o)^T fp16(M) against P_o^T M in float64;
  orthonorm  ||fp16(P_o) fp16(P_o)^T / s^2 - I||_2 (the CPU path's: ~1e-7).

    python benchmarks/probes/orthogonal_rounding.py [--long 2048] [--cols 512] [--draws 2]
"""
import argparse
import math

import torch

F64 = torch.float64


def fp16(x):
    return x.to(torch.float16).to(F64)


def fp32(x):
    return x.to(torch.float32).to(F64)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def basis_w(gram, length):
    """W = s R^-T, gram = R^T R, s^2 = length / r: float64."""
    r = gram.shape[0]
    lower = torch.linalg.cholesky(gram)
    eye = torch.eye(r, dtype=F64)
    return math.sqrt(length / r) * torch.linalg.solve_triangular(lower, eye, upper=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", type=int, default=2048, help="P's long side")
    ap.add_argument("--cols", type=int, default=512, help="columns of U and M")
    ap.add_argument("--draws", type=int, default=2)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    length = args.long
    for denom in (16, 8, 4, 2):
        r = length // denom
        s2 = length / r
        eye = torch.eye(r, dtype=F64)
        worst = {}
        for _ in range(args.draws):
            # P as the fp32 draws of N(0, 1/r) are; U of RMS 1; M a compressed momentum.
            p = fp32(torch.randn(r, length, generator=gen, dtype=F64) / math.sqrt(r))
            u = torch.randn(length, args.cols, generator=gen, dtype=F64)
            m = torch.randn(r, args.cols, generator=gen, dtype=F64)
            p_o = fp32(basis_w(p @ p.T, length) @ p)  # the CPU path's basis
            p16 = fp16(p)
            w16 = fp16(basis_w(fp32(p16 @ p16.T), length))
            po16 = fp16(fp32(w16 @ p16))
            errors = {
                "gaussian": rel(fp32(p16 @ fp16(u)), p @ u),
                "basis": rel(po16, p_o),
                "down": rel(fp32(po16 @ fp16(u)), p_o @ u),
                "up": rel(fp32(po16.T @ fp16(m)), p_o.T @ m),
                "orthonorm": torch.linalg.matrix_norm(po16 @ po16.T / s2 - eye, 2).item(),
            }
            for name, e in errors.items():
                worst[name] = max(worst.get(name, 0.0), e)
        print(f"r/long = 1/{denom} (r = {r}): "
              + "  ".join(f"{name} {e:.2e}" for name, e in worst.items()), flush=True)


if __name__ == "__main__":
    main()
