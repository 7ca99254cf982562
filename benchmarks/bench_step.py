"""Optimizer step time on LLaMA-shaped parameters: Flora against the optimizers it replaces.

One process, one GPU. For each optimizer: median step time over --steps steps after
--warmup steps (CUDA events around opt.step() alone), optimizer-state bytes per
parameter, and the extra peak memory during a step (max_memory_allocated during the
step minus memory_allocated before it). With --rounds, the optimizers are measured in
turn that many times and each median is over all its steps. Gradients are random and
fixed; they are re-attached before every step (flora-opt sets p.grad = None), outside
the timed region.

    python benchmarks/bench_step.py --out benchmarks/results/bench_step.md
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import subprocess
import sys

import torch

MODELS = {  # hidden, intermediate, layers, vocab (LLaMA family shapes of the Flora/GaLore papers)
    "0.1b": (768, 2048, 12, 32000),
    "0.35b": (1024, 2736, 24, 32000),
    "1.35b": (2048, 5504, 24, 32000),
    "1b-128k": (2048, 8192, 16, 128256),  # LLaMA-3.2-1B widths: a large vocabulary
    "7b": (4096, 11008, 32, 32000),  # bench_memory.py's model: its step, without the model
}


def commit():
    """The checkout's short commit hash, or "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - outside a checkout
        return "unknown"


def measured_on():
    """The device, torch version and UTC time a result table records."""
    return (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def measured_by():
    """The batching knob and the command line a result table records."""
    return (f"FLORA_BATCH_BYTES={os.environ.get('FLORA_BATCH_BYTES', 'default')}. "
            f"Command: `python {' '.join(sys.argv)}`")


def report(text, out):
    """Prints a Markdown result and appends it to ``out`` (if given)."""
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text)


def named_llama_shapes(hidden, intermediate, layers, vocab):
    """(name, shape) of every parameter of a LLaMA decoder, layer by layer."""
    shapes = [("embed", (vocab, hidden))]
    for i in range(layers):
        shapes += [(f"layers.{i}.{name}", (hidden, hidden)) for name in "qkvo"]
        shapes += [(f"layers.{i}.gate", (intermediate, hidden)),
                   (f"layers.{i}.up", (intermediate, hidden)),
                   (f"layers.{i}.down", (hidden, intermediate)),
                   (f"layers.{i}.norm1", (hidden,)), (f"layers.{i}.norm2", (hidden,))]
    shapes += [("norm", (hidden,)), ("head", (vocab, hidden))]
    return shapes


def llama_shapes(hidden, intermediate, layers, vocab):
    """The shapes of named_llama_shapes, in its order."""
    return [shape for _, shape in named_llama_shapes(hidden, intermediate, layers, vocab)]


def make_params(shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).mul_(0.02).to(dtype))
              for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=gen).mul_(1e-3).to(dtype) for s in shapes]
    return params, grads


class PerParamSteps:
    """A Flora whose step() steps each parameter in its own call, last parameter first: what
    FloraAccumulator's backward hooks do (one ``_step_param`` a parameter, no kept norms)."""

    def __init__(self, opt, params):
        self.opt, self.params = opt, list(params)

    @property
    def state(self):
        return self.opt.state

    def step(self):
        for p in reversed(self.params):
            self.opt._step_param(p, p.grad)


class GroupedSteps(PerParamSteps):
    """The same, gathering parameters (last first) into calls of ``group_bytes`` of
    gradients: FloraAccumulator(step_group_bytes=group_bytes)'s hooks."""

    def __init__(self, opt, params, group_bytes):
        super().__init__(opt, params)
        self.group_bytes = group_bytes

    def step(self):
        group = self.opt.param_groups[0]
        batch, size = [], 0
        for p in reversed(self.params):
            batch.append(p)
            size += p.grad.numel() * p.grad.element_size()
            if size >= self.group_bytes:
                self.opt._step_params(group, batch, [q.grad for q in batch])
                batch, size = [], 0
        if batch:
            self.opt._step_params(group, batch, [q.grad for q in batch])


def optimizers(rank):
    import flora_ext

    def flora(**kw):
        return lambda ps: flora_ext.Flora(ps, lr=1e-3, **kw)

    def per_param(**kw):
        return lambda ps: PerParamSteps(flora_ext.Flora(ps, lr=1e-3, **kw), ps)

    table = {
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch_adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
        f"flora_r{rank}_b0.9": flora(rank=rank, beta1=0.9, kappa=1000),
        f"flora_r{rank}_b0.9_resample": flora(rank=rank, beta1=0.9, kappa=1),
        # one call a parameter, as in FloraAccumulator's hooks (layer-by-layer stepping)
        f"flora_r{rank}_b0.9_per_param": per_param(rank=rank, beta1=0.9, kappa=1000),
        "flora_nomomentum_per_param": per_param(beta1=None),
        # ... with the library down GEMM: cuBLAS splits a lone tensor's contraction, where
        # fused_down_kernel has a block for each 128 outputs (32 for a 4096 x 4096 tensor)
        f"flora_r{rank}_b0.9_per_param_down_library": (
            per_param(rank=rank, beta1=0.9, kappa=1000), {"down_library": 1}),
        # the same in calls of 256 MiB or 1 GiB of gradients
        # (FloraAccumulator(step_group_bytes=...))
        **{f"flora_r{rank}_b0.9_grouped{name}": (
            lambda ps, size=size: GroupedSteps(
                flora_ext.Flora(ps, lr=1e-3, rank=rank, beta1=0.9, kappa=1000), ps, size))
           for name, size in (("256m", 256 << 20), ("1g", 1 << 30))},
        # the same without the row-stats blocks a tensor is given alone (the column-bytes
        # floor only: a few dozen blocks for a 4096-row bf16 tensor)
        f"flora_r{rank}_b0.9_per_param_floor": (per_param(rank=rank, beta1=0.9, kappa=1000),
                                                {"stats_task_blocks": 0}),
        "flora_nomomentum_per_param_floor": (per_param(beta1=None), {"stats_task_blocks": 0}),
        # max_aspect_ratio=None: the embedding and head get compressed momentum too (no
        # dense float32 momentum, which a bf16 model's step otherwise streams for them)
        f"flora_r{rank}_b0.9_no_aspect_limit": flora(rank=rank, beta1=0.9, kappa=1000,
                                                     max_aspect_ratio=None),
        # quantization=True: 8-bit momentum and second moments, stepped as codes by the
        # op (docs/FLORA.md §11)
        f"flora_r{rank}_b0.9_q8": flora(rank=rank, beta1=0.9, kappa=1000, quantization=True),
        f"flora_r{rank}_b0.9_q8_per_param": per_param(rank=rank, beta1=0.9, kappa=1000,
                                                      quantization=True),
        f"flora_r{rank}_b0.9_exact": flora(rank=rank, beta1=0.9, kappa=1000, tf32=False),
        f"flora_r{rank}_b0.9_unfused": (flora(rank=rank, beta1=0.9, kappa=1000),
                                        {"fused_momentum": 0}),
        # projection="orthogonal": W = s R^-T cached, computed on a tensor's first and
        # resample steps only (docs/cuda.md §4): kappa=1 computes it every step
        f"flora_r{rank}_b0.9_orthogonal": flora(rank=rank, beta1=0.9, kappa=1000,
                                                projection="orthogonal"),
        f"flora_r{rank}_b0.9_orthogonal_resample": flora(rank=rank, beta1=0.9, kappa=1,
                                                         projection="orthogonal"),
        f"flora_r{rank}_b0.9_orthogonal_exact": flora(rank=rank, beta1=0.9, kappa=1000,
                                                      tf32=False, projection="orthogonal"),
        # Factored tensors with dense momentum (embedding and head past the aspect-ratio
        # limit) gathering their statistics by row stats or by the tile passes; they
        # weigh most on --model 1b-128k (two 128256 x 2048 tensors, 0.5B parameters).
        # rows of 6144-12288 columns (LLaMA-7B's 4096 x 11008) with their stats pass's
        # column sums in shared memory instead of registers
        f"flora_r{rank}_b0.9_wide_shared": (flora(rank=rank, beta1=0.9, kappa=1000),
                                            {"wide_row_regs": 0}),
        # ... or in registers with a deeper ring than the other rows' (one 16-bit row of
        # 11008 columns a stage; by default 2 stages: one row loading while one is summed)
        **{f"flora_r{rank}_b0.9_wide_stages{s}": (flora(rank=rank, beta1=0.9, kappa=1000),
                                                  {"wide_stats_stages": s}) for s in (4, 6)},
        # 16-bit tensors' down GEMM in cuBLAS (P scaled in the gradient's dtype) and a
        # momentum epilogue kernel instead of fused_down_kernel
        f"flora_r{rank}_b0.9_down_library": (flora(rank=rank, beta1=0.9, kappa=1000),
                                             {"down_library": 1}),
        f"flora_r{rank}_b0.9_resample_down_library": (flora(rank=rank, beta1=0.9, kappa=1),
                                                      {"down_library": 1}),
        f"flora_r{rank}_b0.9_dense_row_stats": (flora(rank=rank, beta1=0.9, kappa=1000),
                                                {"row_stats_dense": 1}),
        f"flora_r{rank}_b0.9_dense_tile_passes": (flora(rank=rank, beta1=0.9, kappa=1000),
                                                  {"row_stats_dense": 0}),
        "flora_nomomentum": flora(beta1=None),
        # The same optimizer with a tuning knob changed for its steps (A/B in one process):
        # FLORA_* environment variables, or torch.ops.flora._set_tuning's variants.
        "flora_nomomentum_read_p": flora(beta1=None, reuse_param_norms=False),
        "flora_nomomentum_tile_passes": (flora(beta1=None), {"row_stats": 0}),
        "flora_nomomentum_batch1g": (flora(beta1=None), {"FLORA_BATCH_BYTES": str(1 << 30)}),
        "flora_nomomentum_batch256m": (flora(beta1=None), {"FLORA_BATCH_BYTES": str(256 << 20)}),
        "flora_nomomentum_stages2": (flora(beta1=None), {"stats_stages": 2}),
        "flora_nomomentum_stages3": (flora(beta1=None), {"stats_stages": 3}),
        "flora_nomomentum_batch4g": (flora(beta1=None), {"FLORA_BATCH_BYTES": str(4 << 30)}),
        **{f"flora_r{rank}_b0.9_share{share}": (flora(rank=rank, beta1=0.9, kappa=1000),
                                                 {"fused_share": share})
           for share in (16, 8, 4, 2)},
        **{f"flora_r{rank}_b0.9_sides{sides}": (flora(rank=rank, beta1=0.9, kappa=1000),
                                                 {"FLORA_SIDE_STREAMS": str(sides)})
           for sides in (0, 1, 3)},
    }
    try:
        from flora_ext.testing import import_flora_opt
        FloraOpt = import_flora_opt().Flora
        table[f"flora_opt_r{rank}_b0.9"] = lambda ps: FloraOpt(ps, lr=1e-3, rank=rank, beta1=0.9,
                                                                kappa=1000)
    except Exception as err:  # noqa: BLE001 - reported, the rest still runs
        print(f"flora-opt not available: {err}", file=sys.stderr)
    try:
        from transformers.optimization import Adafactor as HFAdafactor
        table["hf_adafactor_b0.9"] = lambda ps: HFAdafactor(ps, lr=1e-3, beta1=0.9,
                                                             relative_step=False,
                                                             scale_parameter=True)
    except ImportError as err:
        print(f"transformers not available: {err}", file=sys.stderr)
    return table


def timed_call(fn):
    """fn() between two CUDA events; its GPU time in ms (waits for the end)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def timed_step(opt):
    """One opt.step() between two CUDA events; its GPU time in ms."""
    return timed_call(opt.step)


def measure(make_opt, params, grads, steps, warmup):
    if isinstance(make_opt, tuple):  # (factory, knobs for its steps)
        make_opt, knobs = make_opt
        env = {k: v for k, v in knobs.items() if k.startswith("FLORA_")}
        tuning = {k: v for k, v in knobs.items() if not k.startswith("FLORA_")}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        if tuning:
            torch.ops.flora._set_tuning(reset=True, **tuning)
        try:
            return measure(make_opt, params, grads, steps, warmup)
        finally:
            if tuning:
                torch.ops.flora._set_tuning(reset=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    opt = make_opt(params)

    def attach():
        for p, g in zip(params, grads):
            p.grad = g

    for _ in range(warmup):
        attach()
        opt.step()
    torch.cuda.synchronize()
    gc.collect()  # the last optimizer's garbage is not collected during this one's steps
    times = []
    for _ in range(steps):
        attach()
        times.append(timed_step(opt))
    attach()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    extra_peak = torch.cuda.max_memory_allocated() - before
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    del opt
    torch.cuda.empty_cache()
    return times, state, extra_peak


def run_table(args, dtype_name, shapes, label):
    """Measures every selected optimizer on one dtype; returns {name: median ms}."""
    dtype = getattr(torch, dtype_name)
    params, grads = make_params(shapes, dtype)
    numel = sum(p.numel() for p in params)
    chosen = {name: make_opt for name, make_opt in optimizers(args.rank).items()
              if not args.only or name in args.only}
    # With --rounds R every optimizer is measured R times, in turn with the others, and
    # its median is taken over all R * steps steps: what happens to the machine during
    # one optimizer's few milliseconds (small models) no longer decides its row.
    times, measured = {name: [] for name in chosen}, {}
    for _ in range(args.rounds):
        for name, make_opt in chosen.items():
            if name in measured and measured[name] is None:
                continue  # failed in an earlier round
            try:
                steps, state, extra = measure(make_opt, params, grads, args.steps, args.warmup)
            except Exception as err:  # report, keep measuring the others
                print(f"{name}: failed: {type(err).__name__}: {err}", file=sys.stderr)
                measured[name] = None
                continue
            times[name] += steps
            measured[name] = (state, extra)
    rows = []
    for name, result in measured.items():
        if result is None:
            continue
        state, extra = result
        med, best = statistics.median(times[name]), min(times[name])
        rows.append((name, med, best, state / numel, extra / (numel * params[0].element_size())))
        print(f"{name:32s} median {med:8.2f} ms  min {best:8.2f} ms  state {state / numel:6.3f} B/param"
              f"  extra peak {100 * rows[-1][4]:6.2f}% of param bytes", flush=True)
    del params, grads
    torch.cuda.empty_cache()
    base = next((r[1] for r in rows if r[0] == "adamw_fused"), None)
    header = (f"\n### {label}, {dtype_name} params, rank {args.rank}\n\n"
              f"{measured_on()}, {numel / 1e9:.3f}B parameters in {len(shapes)} tensors. "
              f"Flora's projection GEMMs use TF32 (its default) except in *_exact. "
              f"{measured_by()}\n\n"
              "| optimizer | median step (ms) | min (ms) | x fused AdamW | state bytes/param | extra peak (% of params) |\n"
              "|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {n} | {m:.2f} | {b:.2f} | {m / base:.2f} | {s:.3f} | {100 * e:.2f} |\n" if base else
        f"| {n} | {m:.2f} | {b:.2f} | - | {s:.3f} | {100 * e:.2f} |\n" for n, m, b, s, e in rows)
    report(table, args.out)
    return {n: m for n, m, *_ in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.35b", choices=sorted(MODELS))
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="one table each; with both, also the bf16/fp32 ratio of each optimizer")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every optimizer this many times, in turn (median over all)")
    ap.add_argument("--only", nargs="*", help="names of optimizers to run (default: all)")
    ap.add_argument("--small-tensors", type=int, default=0,
                    help="instead of a model: this many 64x64 tensors (launch overhead)")
    ap.add_argument("--out", help="append a Markdown table to this file")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    if args.small_tensors:
        shapes, label = [(64, 64)] * args.small_tensors, f"{args.small_tensors} tensors of 64x64"
    else:
        shapes, label = llama_shapes(*MODELS[args.model]), f"LLaMA {args.model} shapes"
    medians = {d: run_table(args, d, shapes, label) for d in args.dtype}
    if {"float32", "bfloat16"} <= medians.keys():
        both = [n for n in medians["float32"] if n in medians["bfloat16"]]
        report(f"\n### bf16 / fp32 step time, {label} (the two tables above, one process)\n\n"
               "| optimizer | fp32 (ms) | bf16 (ms) | bf16 / fp32 |\n|---|---|---|---|\n" +
               "".join(f"| {n} | {medians['float32'][n]:.2f} | {medians['bfloat16'][n]:.2f} | "
                       f"{medians['bfloat16'][n] / medians['float32'][n]:.2f} |\n" for n in both),
               args.out)


if __name__ == "__main__":
    main()
