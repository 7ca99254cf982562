"""Where a step's time goes on the host: CPU time of opt.step() (launches queued behind a
busy GPU), the GPU time of its kernels and gaps alone (queued behind a sleep, so the
CPU is ahead), the time the benchmark measures (GPU idle at the start), and a cProfile
of the Python side. For host-overhead work; prints only."""
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_step import MODELS, llama_shapes, timed_step  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_probe import warmed_up  # noqa: E402
import flora_ext  # noqa: E402


def probe(name, make, shapes, dtype, steps=20):
    opt = warmed_up(make, shapes, dtype)
    cpu, gpu_ahead, idle_start = [], [], []
    for _ in range(steps):
        torch.cuda._sleep(50_000_000)  # keeps the GPU busy while the CPU queues the step
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t = time.perf_counter()
        opt.step()
        cpu.append((time.perf_counter() - t) * 1e3)
        e.record()
        e.synchronize()
        gpu_ahead.append(s.elapsed_time(e))
        idle_start.append(timed_step(opt))  # as bench_step.py times a step
    med = statistics.median
    print(f"{name:28s} cpu {med(cpu):7.3f} ms  gpu(cpu ahead) {med(gpu_ahead):7.3f} ms  "
          f"bench-style {med(idle_start):7.3f} ms", flush=True)
    return opt


if __name__ == "__main__":
    llama = llama_shapes(*MODELS["1.35b"])
    small = [(64, 64)] * 200
    makers = {
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "flora_nomomentum": lambda ps: flora_ext.Flora(ps, lr=1e-3, beta1=None),
        "flora_nomomentum_nocache": lambda ps: flora_ext.Flora(ps, lr=1e-3, beta1=None,
                                                               reuse_param_norms=False),
    }
    for label, shapes, dtypes in (("1.35b", llama, ("float32", "bfloat16")),
                                  ("200x64x64", small, ("float32",))):
        for dt in dtypes:
            for name, make in makers.items():
                opt = probe(f"{label} {dt} {name}", make, shapes, getattr(torch, dt))
            del opt
            torch.cuda.empty_cache()
    # Python-side profile of Flora on the small model (host cost only).
    opt = warmed_up(lambda ps: flora_ext.Flora(ps, lr=1e-3, beta1=None), small, torch.float32)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        opt.step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
