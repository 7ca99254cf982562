"""Where the CPU time of opt.step() goes: torch.profiler's CPU view (the flora op, the
CUDA runtime calls it makes, the rest) of steps queued behind a busy GPU, and the
Python part alone (the op replaced by a no-op). For host-overhead work; prints only."""
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import MODELS, llama_shapes  # noqa: E402
from ncu_probe import warmed_up  # noqa: E402
import flora_ext  # noqa: E402


def cpu_ms(fn, steps=20):
    """Median CPU time of fn() in ms, each call queued behind a busy GPU."""
    times = []
    for _ in range(steps):
        torch.cuda._sleep(20_000_000)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def trace(name, make, shapes, dtype):
    opt = warmed_up(make, shapes, dtype)
    total = cpu_ms(opt.step)
    real = torch.ops.flora.step_group_
    calls = []

    def noop(*args, **kwargs):
        calls.append((args, kwargs))

    class NoOp:
        step_group_ = staticmethod(noop)

        def __getattr__(self, key):
            return getattr(real_ops, key)

    real_ops = torch.ops.flora
    torch.ops.flora = NoOp()
    try:
        python = cpu_ms(opt.step)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            opt.step()
        profiler.disable()
    finally:
        torch.ops.flora = real_ops
    args, kwargs = calls[-1]
    op = cpu_ms(lambda: real(*args, **kwargs))
    print(f"\n== {name}: step {total:.3f} ms CPU, Python part {python:.3f} ms, "
          f"op call {op:.3f} ms ({len(args[0])} params, "
          f"{len(args[2])} state tensors)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            torch.cuda._sleep(20_000_000)
            opt.step()
            torch.cuda.synchronize()
    print("CPU time a step (us), profiled: name, calls, self, total")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:16]:
        if e.self_cpu_time_total > 0 and "Synchronize" not in e.key:
            print(f"  {e.key[:48]:48s} {e.count / 10:6.1f} {e.self_cpu_time_total / 10:9.1f} "
                  f"{e.cpu_time_total / 10:9.1f}")
    print("Python part (op replaced by a no-op), 20 steps:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    llama = llama_shapes(*MODELS["1.35b"])
    small = [(64, 64)] * 200
    cases = [
        ("1.35b fp32 beta1=None", lambda ps: flora_ext.Flora(ps, lr=1e-3, beta1=None), llama),
        ("1.35b fp32 r256", lambda ps: flora_ext.Flora(ps, lr=1e-3, rank=256, beta1=0.9), llama),
        ("200x64x64 fp32 beta1=None", lambda ps: flora_ext.Flora(ps, lr=1e-3, beta1=None), small),
        ("0.1b fp32 r256", lambda ps: flora_ext.Flora(ps, lr=1e-3, rank=256, beta1=0.9),
         llama_shapes(*MODELS["0.1b"])),
    ]
    if len(sys.argv) > 1:  # names of cases to run
        cases = [c for c in cases if c[0] in sys.argv[1:]]
    for name, make, shapes in cases:
        trace(name, make, shapes, torch.float32)
        torch.cuda.empty_cache()
