"""How much a Gaussian projection inflates the momentum, at every step and at a resample.

For an n x m parameter compressed on the left (P r x n, N(0, 1/r) entries, the projection of
docs/FLORA.md §5), a momentum X that Flora stores as M = down(X) is seen by the step as
up(M) = P^T P X; at a resample it becomes up'(down'(up(M))) = P'^T P' P^T P X.
Prints, over a few seeds, ||.|| / ||X||, the cosine with X, the RMS of the direction
D = (1 - beta1) U + beta1 up(M) with U = X (a gradient that does not change) and the clip
factor max(1, RMS(D)), with dense momentum (D = U) for comparison.

    PYTHONPATH=. python benchmarks/probes/transfer_norm.py
"""
import math

import torch

import flora_ext


def rms(x):
    return (x.norm() / math.sqrt(x.numel())).item()


def main():
    beta1 = 0.9
    print("| n x m | r | ||up(down X)||/||X|| | cos | after resample ||.||/||X|| | cos | "
          "RMS(D) steady | RMS(D) after resample | norm-preserving: ||.||/||X|| | cos |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, m, r in ((256, 1024, 64), (256, 1024, 128), (256, 256, 128), (512, 1024, 128),
                    (256, 1024, 256)):
        rows = []
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            X = torch.randn(n, m, generator=g, dtype=torch.float64)  # U with RMS 1
            P = flora_ext.projection(2 * seed + 1, r, n, r).double()
            Q = flora_ext.projection(2 * seed + 2, r, n, r).double()
            up = P.t() @ (P @ X)
            moved = Q.t() @ (Q @ up)
            kept = moved * (up.norm() / moved.norm())
            d_steady = (1 - beta1) * X + beta1 * up
            d_moved = (1 - beta1) * X + beta1 * moved
            cos = lambda a: (a * X).sum().item() / (a.norm() * X.norm()).item()
            rows.append([up.norm().item() / X.norm().item(), cos(up),
                         moved.norm().item() / X.norm().item(), cos(moved),
                         rms(d_steady), rms(d_moved),
                         kept.norm().item() / X.norm().item(), cos(kept)])
        mean = torch.tensor(rows).mean(0).tolist()
        print(f"| {n} x {m} | {r} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    print("expected: ||up(down X)||^2/||X||^2 = 1 + (n + 1)/r for Gaussian P; dense momentum "
          "with this U: RMS(D) = 1.000, clip factor 1")


if __name__ == "__main__":
    main()
