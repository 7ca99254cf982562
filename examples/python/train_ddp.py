#!/usr/bin/env python3
"""Data-parallel training with Flora's compressed gradient accumulation.

    torchrun --nproc_per_node 2 examples/python/train_ddp.py            # CPU, gloo
    torchrun --nproc_per_node 2 examples/python/train_ddp.py --device cuda   # a GPU a process

Each process trains the byte-level transformer of train_charlm.py on its own batches. The
model is wrapped in DistributedDataParallel and handed to FloraAccumulator(model=ddp): the
accumulator switches DDP's full-size gradient all-reduce off, compresses every micro-batch's
gradient of each weight matrix to rank r, and at the end of each cycle all-reduces only the
compressed buffers (plus the small 1-D gradients), so every process takes the same Flora step
from the same averaged gradient. The loop is backward only: the cycle's last backward steps.

At the end it checks that the processes hold identical parameters, prints the bytes a cycle
all-reduced next to what DDP would have sent, and saves a checkpoint (optimizer and
accumulator state) from rank 0.
"""

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_charlm import ByteTransformer, load_stdlib_corpus, loss_on, sample_batch  # noqa: E402

import flora_ext  # noqa: E402
from flora_ext import distributed as flora_dist  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps")
    ap.add_argument("--micro-batches", type=int, default=4, help="backward passes per step")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--accumulation-rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--checkpoint", default=None, help="save the optimizer state here")
    args = ap.parse_args()

    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it)
    model = ByteTransformer(args.context).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = flora_ext.Flora(ddp.parameters(), lr=args.lr, rank=8, kappa=100, beta1=0.9)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=args.micro_batches,
                                     rank=args.accumulation_rank, model=ddp)

    train, _, _ = load_stdlib_corpus()
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    k = args.micro_batches
    for step in range(1, args.steps + 1):
        total = 0.0
        for _ in range(k):
            x, y = sample_batch(train, args.batch_size, args.context, gen)
            loss = loss_on(ddp, x.to(device), y.to(device))
            (loss / k).backward()  # the k-th backward averages over ranks and steps
            total += loss.item() / k
        if step % 10 == 0 or step == 1:
            mean = torch.tensor([total], device=device)
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  train loss {mean.item() / world:.4f}", flush=True)

    # Same step on every rank: the parameters must be bitwise identical.
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    identical = all(torch.equal(copies[0], c) for c in copies[1:])

    sent = sum(math.prod(flora_dist.buffer_shape(p.shape, args.accumulation_rank, True))
               if p.dim() == 2 and args.accumulation_rank < min(p.shape) else p.numel()
               for p in model.parameters()) * 4
    full = sum(p.numel() for p in model.parameters()) * 4
    if rank == 0:
        print(f"{world} processes, parameters identical on all ranks: {identical}")
        print(f"all-reduce payload per step (from the shapes): {sent:,} bytes (DDP: {full:,}, "
              f"1/{full / sent:.1f})")
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "accumulator": acc.state_dict()}, args.checkpoint)
            print(f"saved {args.checkpoint}")
    acc.remove()
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("the ranks' parameters differ")


if __name__ == "__main__":
    main()
