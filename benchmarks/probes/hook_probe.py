"""Host time of FloraAccumulator's hooks: a chain of --layers square Linear layers (one
parameter each, --width small enough that the device work is negligible) runs backward
passes, and the host time of a pass is compared across

  none      gradients dropped (no optimizer)
  plain     one opt.step() after the backward (a batched step of every parameter)
  steps     FloraAccumulator(micro_batches=1): one step call a parameter, in its hook
  compress  FloraAccumulator(micro_batches=2), the first micro-batch: down(G) a parameter

so that (steps - none) / layers is the host time a hook adds to the backward (Python and
the op's host side). On CUDA the GPU is kept busy (torch.cuda._sleep) while the host
queues, so what is timed is the host alone. A model whose backward takes less GPU time a
layer than this is bound by the host when stepped in hooks. On the CPU the op's own
arithmetic is host time too, so there the figures bound the overhead from above. Prints
only.

    python benchmarks/probes/hook_probe.py --device cuda --layers 64 --width 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import flora_ext

MODES = ("none", "plain", "steps", "compress")


def make(mode, layers, width, device, dtype, rank, overlap):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(layers)]).to(device, dtype)
    params = list(model.parameters())
    opt = flora_ext.Flora(params, lr=1e-4, beta1=0.9, rank=rank) if mode != "none" else None
    accumulator = None
    if mode in ("steps", "compress"):
        accumulator = flora_ext.FloraAccumulator(
            opt, micro_batches=1 if mode == "steps" else 2, rank=rank,
            overlap_steps=overlap and device.type == "cuda")
    return model, params, opt, accumulator


def host_ms(mode, args, device, dtype):
    """Median host time (ms) of one backward pass (and the step, for plain)."""
    model, params, opt, accumulator = make(mode, args.layers, args.width, device, dtype,
                                           args.rank, args.overlap_steps)
    x = torch.randn(8, args.width, device=device, dtype=dtype)
    times = []
    for i in range(args.warmup + args.passes):
        loss = model(x).float().square().mean()
        if device.type == "cuda":
            torch.cuda._sleep(20_000_000)  # the GPU stays busy: the host runs ahead
        t = time.perf_counter()
        loss.backward()
        if mode == "plain":
            opt.step()
        elapsed = time.perf_counter() - t
        if mode in ("none", "plain"):
            for p in params:
                p.grad = None
        if mode == "compress" and accumulator.pending_micro_batches:
            # the cycle's second micro-batch steps; only the first one is timed
            model(x).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(elapsed * 1e3)
    if accumulator is not None:
        accumulator.remove()
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--overlap-steps", action="store_true",
                    help="FloraAccumulator(overlap_steps=True) (CUDA)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"{args.layers} layers of {args.width} x {args.width} {args.dtype} on {device}, "
          f"rank {args.rank}{', overlap_steps' if args.overlap_steps else ''}; "
          f"torch {torch.__version__}")
    results = {mode: host_ms(mode, args, device, dtype) for mode in args.modes}
    base = results.get("none")
    for mode, ms in results.items():
        extra = "" if base is None or mode == "none" else \
            f"  (+{(ms - base) / args.layers * 1e3:.0f} us a parameter over none)"
        print(f"{mode:9s} {ms:8.2f} ms host a backward pass{extra}", flush=True)
    return results


if __name__ == "__main__":
    main()
