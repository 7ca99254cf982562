"""The steps ncu profiles: a Flora step without momentum on the LLaMA 1.35B shapes,
after three warm-up steps (so the profiled launches are steady-state ones).

    ncu --kernel-name regex:stats_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/probes/ncu_probe.py float32

(one batch a step: the fourth launch of a kernel is the first steady-state one).
A second argument `compressed` steps with rank 256 and beta1 0.9 instead; a third names
another model of bench_step.MODELS (`7b`: a step there launches some kernels several
times, one a batch, so --launch-skip counts more launches a step).
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


def stepped_flora(dtype, compressed, steps=4, model="1.35b"):
    """Flora on the shapes of `model` with gradients attached, after `steps` steps (the
    ones ncu profiles); with rank 256 and beta1 0.9 if `compressed`, else beta1=None."""
    kw = dict(rank=256, beta1=0.9) if compressed else dict(beta1=None)
    return warmed_up(lambda ps: flora_ext.Flora(ps, lr=1e-3, **kw),
                     llama_shapes(*MODELS[model]), dtype, steps)


if __name__ == "__main__":
    args = sys.argv[1:]
    stepped_flora(getattr(torch, args[0] if args else "float32"),
                  len(args) > 1 and args[1] == "compressed",
                  model=args[2] if len(args) > 2 else "1.35b")
