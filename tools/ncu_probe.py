"""The steps ncu profiles: a Flora step without momentum on the LLaMA 1.35B shapes,
after three warm-up steps (so the profiled launches are steady-state ones).

    ncu --kernel-name regex:stats_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python3 tools/ncu_probe.py float32

(one batch a step: the fourth launch of a kernel is the first steady-state one).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_step import MODELS, llama_shapes, make_params  # noqa: E402
import flora_ext  # noqa: E402

dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
params, grads = make_params(llama_shapes(*MODELS["1.35b"]), dtype)
opt = flora_ext.Flora(params, lr=1e-3, beta1=None)
for p, g in zip(params, grads):
    p.grad = g
for _ in range(4):
    opt.step()
torch.cuda.synchronize()
