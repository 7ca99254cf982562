#!/usr/bin/env python3
"""Optimizer step time on a model sharded by FSDP2 (fully_shard): Flora against torch's AdamW.

    # CPU, gloo, 2 processes, small LLaMA-like shapes (what the results file has for CPU)
    python benchmarks/bench_fsdp.py --device cpu

    # the GPU machine: 2 processes on one GPU over gloo, or NCCL with 2 GPUs (--backend auto
    # picks NCCL when 2 GPUs are visible); LLaMA-like shapes of about 0.13B parameters
    python benchmarks/bench_fsdp.py --device cuda --dims 768,2048,12,32000

Each process holds a model whose parameters have LLaMA's shapes (an embedding, per layer
q, k, v, o, gate, up, down and two norms, a final norm and an output head; every layer and
the root wrapped with fully_shard on a 1-D mesh of all processes), sets random gradients of
its shards (no forward or backward: the time is the optimizer's) and times optimizer.step()
alone: a barrier, the step, a device synchronisation. A step's time is the slowest rank's;
the figure is the median over the timed steps after the warm-up ones. Also reported per
optimizer: bytes of state per local parameter on rank 0, the collectives one step issues on
rank 0 (counted by wrapping torch.distributed's functions), and, with --profile, the torch
ops that took the most time in one Flora step on rank 0.

Results go to benchmarks/results/bench_fsdp.md (--out): one section per device, backend and
shape, replaced when run again with the same ones.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import flora_ext  # noqa: E402
from bench_comm import spawn  # noqa: E402  (process group per spawned worker)
from bench_step import commit, llama_shapes, named_llama_shapes  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor",
               "reduce_scatter_single", "reduce_scatter_tensor", "all_gather",
               "all_gather_object", "broadcast", "reduce_scatter")


class Layer(torch.nn.Module):
    def __init__(self, shapes, device):
        super().__init__()
        for name, shape in shapes:
            self.register_parameter(name, torch.nn.Parameter(
                torch.randn(shape, device=device).mul_(0.02)))


class Model(torch.nn.Module):
    """Parameters of the shapes of named_llama_shapes(), grouped as its layers."""

    def __init__(self, dims, device):
        super().__init__()
        hidden, intermediate, layers, vocab = dims
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, device=device).mul_(0.02))
        per_layer = [(name.split(".")[-1], shape)
                     for name, shape in named_llama_shapes(hidden, intermediate, 1, vocab)
                     if name.startswith("layers.0.")]
        self.layers = torch.nn.ModuleList(Layer(per_layer, device) for _ in range(layers))
        self.norm = torch.nn.Parameter(torch.ones(hidden, device=device))
        self.head = torch.nn.Parameter(torch.randn(vocab, hidden, device=device).mul_(0.02))


def one_process_state_bytes(make, dims):
    """Bytes of state per parameter that ``make``'s optimizer keeps in one process (from the
    state shapes Flora gives each parameter; AdamW: two fp32 moments)."""
    from flora_ext.optimizer import _expected_state_shapes

    shapes = llama_shapes(*dims)
    probe = make([torch.nn.Parameter(torch.empty(2, 2))])
    if not isinstance(probe, flora_ext.Flora):
        return 8.0
    group = probe.param_groups[0]
    total = sum(4 * math.prod(state_shape) for shape in shapes
                for state_shape in _expected_state_shapes(torch.empty(shape, device="meta"),
                                                          group)[0].values())
    return total / sum(math.prod(shape) for shape in shapes)


def optimizers(rank):
    def flora(**kw):
        return lambda ps: flora_ext.Flora(ps, lr=1e-3, **kw)

    def adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=1e-3, **kw)

    return {
        f"Flora rank={rank}, beta1=0.9": flora(rank=rank, beta1=0.9),
        "Flora defaults (no momentum)": flora(),
        "AdamW foreach": adamw(foreach=True),
        "AdamW fused": adamw(fused=True),
    }


@contextlib.contextmanager
def counting_collectives(counts):
    """Counts calls of torch.distributed's collectives (by name) while inside."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return counted

    # flora_ext._sharded binds the all-gather and reduce-scatter functions when imported
    from flora_ext import _sharded
    bound = {attr: getattr(_sharded, attr) for attr in ("_ALL_GATHER", "_REDUCE_SCATTER")
             if hasattr(_sharded, attr)}
    try:
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        for attr, fn in bound.items():
            if fn is not None:
                setattr(_sharded, attr, wrap(fn.__name__, fn))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for attr, fn in bound.items():
            setattr(_sharded, attr, fn)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(opt):
    return sum(_local(t).numel() * _local(t).element_size()
               for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def _set_grads(params, gen, device):
    from torch.distributed.tensor import DTensor

    for p in params:
        local = torch.randn(p.to_local().shape, generator=gen).mul_(1e-3).to(device)
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker(rank, world, args, device_name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = (torch.device("cuda", torch.cuda.current_device()) if device_name == "cuda"
              else torch.device("cpu"))
    mesh = init_device_mesh(device.type, (world,))
    results = {}
    for name, make in optimizers(args.rank).items():
        torch.manual_seed(0)
        model = Model(args.dims, device)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        local_numel = sum(p.to_local().numel() for p in params)
        try:
            opt = make(params)
            gen = torch.Generator().manual_seed(1 + rank)
            times = []
            for step in range(args.warmup + args.steps):
                _set_grads(params, gen, device)
                counts = {}
                dist.barrier()
                _sync(device)
                with counting_collectives(counts) if step == 0 else contextlib.nullcontext():
                    start = time.perf_counter()
                    opt.step()
                    _sync(device)
                    elapsed = time.perf_counter() - start
                if step == 0:
                    collectives = counts
                if step >= args.warmup:
                    times.append(elapsed)
            slowest = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            results[name] = dict(median_s=statistics.median(slowest.tolist()),
                                 state_per_param=_state_bytes(opt) / local_numel,
                                 one_process=one_process_state_bytes(make, args.dims),
                                 collectives=collectives)
            if args.profile and name.startswith("Flora rank"):
                results[name]["profile"] = _profile_step(opt, params, gen, device)
        except Exception as err:  # noqa: BLE001 - reported in the table (e.g. no fused AdamW)
            results[name] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["_numel"] = sum(math.prod(s) for s in llama_shapes(*args.dims))
    results["_local_numel"] = local_numel
    results["_params"] = len(params)
    if device.type == "cuda":
        results["_device"] = torch.cuda.get_device_name(device)
    return results


def _profile_step(opt, params, gen, device, top=10):
    """The ops with the most self time in one step on this rank: (name, calls, ms)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    _set_grads(params, gen, device)
    dist.barrier()
    with profile(activities=activities) as prof:
        opt.step()
        _sync(device)
    cuda = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        rows.append((event.key, event.count, self_us / 1e3, event.self_cpu_time_total / 1e3))
    rows.sort(key=lambda row: -row[2])
    total_cpu = sum(row[3] for row in rows)
    total = sum(row[2] for row in rows)
    return dict(rows=rows[:top], total_ms=total, total_cpu_ms=total_cpu,
                ops=sum(row[1] for row in rows if row[0].startswith("aten::")),
                device_time=cuda)


def _rank_worker(rank, world, args, device_name):
    """One process of bench_comm.spawn: its GPU (ranks share GPUs round-robin over gloo),
    the benchmark, then a barrier so that no rank leaves the group while others still time."""
    if device_name == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    result = _worker(rank, world, args, device_name)
    dist.barrier()
    return result


def run(args):
    """Spawns the processes; returns rank 0's results."""
    return spawn(_rank_worker, args.nprocs, (args, args.device), args.backend, args.timeout)


def _collectives(counts):
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"


def section(args, results):
    hidden, intermediate, layers, vocab = args.dims
    device = results.get("_device", f"CPU ({os.cpu_count()} cores)")
    title = (f"## {args.device.upper()}, {args.backend}, {args.nprocs} processes, "
             f"hidden {hidden}, intermediate {intermediate}, {layers} layers, vocab {vocab}")
    lines = [title, "",
             f"Measured on: {device}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
             f"{commit()}. Command: `python {' '.join(sys.argv)}`", "",
             f"{results['_numel']:,} parameters (fp32), {results['_local_numel']:,} on rank 0; "
             f"median of {args.steps} steps after {args.warmup} warm-up ones, each step the "
             f"slowest rank's." + (" The processes share one GPU over gloo: the times include"
                                   " gloo's copies through host memory and say nothing of NCCL."
                                   if args.device == "cuda" and args.backend == "gloo"
                                   else ""), "",
             "| optimizer | step (median) | vs AdamW foreach | state bytes / local parameter "
             "(rank 0) | one process, per parameter | collectives in a step (rank 0) |",
             "|---|---:|---:|---:|---:|---|"]
    base = results.get("AdamW foreach", {}).get("median_s")
    for name, res in results.items():
        if name.startswith("_"):
            continue
        if "error" in res:
            lines.append(f"| {name} | failed: {res['error']} | | | | |")
            continue
        ratio = f"{res['median_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {res['median_s'] * 1e3:.1f} ms | {ratio} | "
                     f"{res['state_per_param']:.3f} | {res['one_process']:.3f} | "
                     f"{_collectives(res['collectives'])} |")
    for name, res in results.items():
        prof = res.get("profile") if isinstance(res, dict) else None
        if not prof:
            continue
        kind = "GPU" if prof["device_time"] else "CPU"
        lines += ["", f"Where one step of {name} spends its time (rank 0, torch.profiler, "
                      f"self {kind} time; {prof['ops']:,} aten op calls for "
                      f"{results['_params']} parameters, "
                      f"{prof['total_cpu_ms']:.1f} ms of CPU time in all):", "",
                  f"| op | calls | self {kind} time |", "|---|---:|---:|"]
        for key, count, ms, _ in prof["rows"]:
            lines.append(f"| {key} | {count:,} | {ms:.2f} ms |")
    return title, "\n".join(lines) + "\n"


def write(out, title, text):
    """Replaces the section with this title in ``out``, or appends it."""
    header = ("# FSDP2 optimizer step: Flora against AdamW\n\n"
              "`benchmarks/bench_fsdp.py`: optimizer.step() alone on a model of LLaMA-like "
              "shapes sharded with fully_shard over every process (random gradients, no "
              "forward or backward). Flora's FSDP2 step runs torch ops per parameter plus a few "
              "collectives per parameter group (docs/FLORA.md §10.3), not the fused kernels of "
              "the single-device step; AdamW is torch's, on the same DTensor parameters.\n")
    existing = open(out).read() if os.path.exists(out) else header
    sections = re.split(r"(?m)^(?=## )", existing)
    kept = [s for s in sections if not s.startswith(title + "\n")]
    with open(out, "w") as f:
        f.write("".join(kept).rstrip("\n") + "\n\n" + text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: nccl when the device is cuda and 2+ GPUs are visible")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--dims", default=None,
                        help="hidden,intermediate,layers,vocab (default 512,1376,2,2000 on cpu, "
                             "768,2048,12,32000 on cuda)")
    parser.add_argument("--rank", type=int, default=256, help="Flora's rank (headline row)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one Flora step and list the costliest ops")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_fsdp.md"),
                        help="results file ('' for none)")
    args = parser.parse_args(argv)
    if args.dims is None:
        args.dims = "512,1376,2,2000" if args.device == "cpu" else "768,2048,12,32000"
    args.dims = tuple(int(x) for x in args.dims.split(","))
    if args.backend == "auto":
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        args.backend = "nccl" if gpus >= args.nprocs else "gloo"
    if args.backend == "nccl" and (args.device != "cuda"
                                   or torch.cuda.device_count() < args.nprocs):
        parser.error(f"--backend nccl needs --device cuda and {args.nprocs} GPUs (one a process)")
    results = run(args)
    title, text = section(args, results)
    print(text)
    if args.out:
        write(args.out, title, text)
    return results


if __name__ == "__main__":
    main()
