"""The steps ncu profiles: a Flora step without momentum on the LLaMA 1.35B shapes,
after three warm-up steps (so the profiled launches are steady-state ones).

    ncu --kernel-name regex:stats_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/probes/ncu_probe.py float32

(one batch a step: the fourth launch of a kernel is the first steady-state one).
A second argument `compressed` steps with rank 256 and beta1 0.9 instead.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_step import MODELS, llama_shapes, make_params  # noqa: E402
import flora_ext  # noqa: E402


def warmed_up(make, shapes, dtype, steps=3):
    """An optimizer made by ``make`` over parameters of ``shapes`` with gradients attached,
    after ``steps`` steps (plans made, workspaces cached)."""
    params, grads = make_params(shapes, dtype)
    opt = make(params)
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    return opt


def stepped_flora(dtype, compressed, steps=4):
    """Flora on the 1.35B shapes with gradients attached, after `steps` steps (the ones
    ncu profiles); with rank 256 and beta1 0.9 if `compressed`, else beta1=None."""
    kw = dict(rank=256, beta1=0.9) if compressed else dict(beta1=None)
    return warmed_up(lambda ps: flora_ext.Flora(ps, lr=1e-3, **kw),
                     llama_shapes(*MODELS["1.35b"]), dtype, steps)


if __name__ == "__main__":
    stepped_flora(getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32"),
                  sys.argv[2:] == ["compressed"])
