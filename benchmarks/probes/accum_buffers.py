"""Training quality of FloraAccumulator's buffer dtypes: float32, bfloat16 and 8-bit (uint8).

A small byte-level GPT (benchmarks/convergence.py's model) trained from scratch with
Flora(rank, beta1=0.9) + FloraAccumulator(micro_batches, rank, buffer_dtype) on the cached
corpus; per seed every dtype starts from the same initial model and sees the same batches,
so the spread over seeds is the noise the dtypes' differences compare against. Prints the
final validation loss of each run and the differences from float32 buffers.

    PYTHONPATH=. python benchmarks/probes/accum_buffers.py --data data_cache/<key>
"""
import argparse
import contextlib
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import flora_ext  # noqa: E402
from convergence import GPT, eval_windows, evaluate, loss_fn, sample_batch  # noqa: E402
from data import load_splits  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def train(dtype, seed, splits, args):
    torch.manual_seed(seed)
    model = GPT(args.d_model, args.layers, args.heads, args.context).to(args.device)
    opt = flora_ext.Flora(model.parameters(), lr=args.lr, rank=args.rank, beta1=0.9,
                          kappa=args.kappa, seed=seed)
    flora_ext.FloraAccumulator(opt, micro_batches=args.micro_batches, rank=args.rank,
                               buffer_dtype=dtype)
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(args.steps):
        for _ in range(args.micro_batches):
            x, y = sample_batch(splits["train"], args.batch_size, args.context, gen)
            (loss_fn(model, x.to(args.device), y.to(args.device)) / args.micro_batches).backward()
    windows = eval_windows(splits["validation"], args.context, args.eval_windows)
    return evaluate(model, windows, 64, torch.device(args.device), contextlib.nullcontext)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a benchmarks/data.py cache directory")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (300)")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences a micro-batch (8)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32, help="momentum and accumulation rank (32)")
    ap.add_argument("--kappa", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-2,
                    help="Flora's lr (3e-2: convergence.md's best for Flora; relative to RMS(p))")
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    splits = load_splits(pathlib.Path(args.data))
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"torch {torch.__version__}, {args.device}; GPT d_model {args.d_model}, "
          f"{args.layers} layers, context {args.context}; Flora(rank={args.rank}, beta1=0.9, "
          f"kappa={args.kappa}, lr={args.lr:g}) + FloraAccumulator(micro_batches="
          f"{args.micro_batches}, rank={args.rank}); {args.steps} steps of "
          f"{args.micro_batches} x {args.batch_size} x {args.context} tokens", flush=True)
    losses = {name: [] for name in DTYPES}
    for seed in seeds:
        for name, dtype in DTYPES.items():
            start = time.perf_counter()
            losses[name].append(train(dtype, seed, splits, args))
            print(f"seed {seed} {name}: validation loss {losses[name][-1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print("| buffer_dtype | " + " | ".join(f"seed {s}" for s in seeds)
          + " | mean | mean difference from float32 (min, max over seeds) |")
    print("|---|" + "---|" * len(seeds) + "---|---|")
    for name in DTYPES:
        diffs = [a - b for a, b in zip(losses[name], losses["float32"])]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in losses[name])
              + f" | {statistics.mean(losses[name]):.4f} | {statistics.mean(diffs):+.4f} "
              f"({min(diffs):+.4f}, {max(diffs):+.4f}) |")
    spread = statistics.pstdev(losses["float32"]) if len(seeds) > 1 else float("nan")
    print(f"\nspread of float32 buffers over seeds (population std): {spread:.4f}")


if __name__ == "__main__":
    main()
