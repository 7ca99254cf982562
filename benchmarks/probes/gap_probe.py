"""Where the GPU idles inside a Flora step (1.35B shapes, or a model of bench_step.MODELS
named among the arguments; rank 256 and beta1 0.9, or `none` for beta1=None; `bfloat16`
for bf16 parameters), as bench_step.py times it (GPU idle at the start): torch.profiler
with CUDA activity, one step at a time, then the gaps of 10 us or more between kernels and
copies, with the step's CPU start (the record_function range)
as time 0, and the step's GPU time split into busy time and the idle time between its
kernels (the gaps of any length)."""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ncu_probe import MODELS, stepped_flora  # noqa: E402

args = sys.argv[1:]
dtype = torch.bfloat16 if "bfloat16" in args else torch.float32
model = next((a for a in args if a in MODELS), "1.35b")
opt = stepped_flora(dtype, compressed="none" not in args, model=model)
for rep in range(2):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("flora_step"):
            opt.step()
        torch.cuda.synchronize()
    events = prof.events()
    start = min(e.time_range.start for e in events if e.name == "flora_step")
    gpu = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    last = max(e for _, e, _ in gpu)
    print(f"{args} round {rep}: first GPU work at {gpu[0][0] - start:.0f} us after the "
          f"step began (the CPU profiler slows the host part), last ends at "
          f"{last - start:.0f} us, {len(gpu)} GPU events")
    end, idle, gaps = gpu[0][1], 0.0, 0
    for s, e, name in gpu[1:]:
        if s > end:
            idle += s - end
            gaps += 1
        if s - end >= 10:
            print(f"  gap {s - end:7.0f} us at {s - start:7.0f} us, before {name}")
        end = max(end, e)
    print(f"  from the first GPU work to the last: {last - gpu[0][0]:.0f} us, of which idle "
          f"{idle:.0f} us in {gaps} gaps between kernels")
