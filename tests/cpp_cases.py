"""Inputs and configurations shared by the C++ tests (tests/cpp/) and their Python side.

tests/cpp/test_flora.cpp computes the same input formulas with the same torch ops (arange, sin,
cos on float64, then a cast), so both languages start from bitwise the same tensors:

    parameter k:           sin(i * (0.37 + 0.11 k)) / 2,             i = 0 .. numel-1
    gradient k at step t:  cos(i * (0.91 + 0.07 k + 0.013 t)) * (1 + 0.1 t)

k counts the parameters from 0 over all groups, t the steps from 1. The scenarios below are
spelled out again in test_flora.cpp (scenario()); test_cpp.py checks that both run the same.
"""
from __future__ import annotations

import math

import torch


def initial_param(k, shape, dtype=torch.float32):
    numel = math.prod(shape)
    return (torch.arange(numel, dtype=torch.float64).mul(0.37 + 0.11 * k).sin().mul(0.5)
            .reshape(shape).to(dtype))


def gradient(k, t, shape, dtype=torch.float32):
    numel = math.prod(shape)
    return (torch.arange(numel, dtype=torch.float64).mul(0.91 + 0.07 * k + 0.013 * t).cos()
            .mul(1.0 + 0.1 * t).reshape(shape).to(dtype))


def has_gradient(scenario, k, t):
    """Whether parameter k gets a gradient at step t: not when (k + t) % skip == 0."""
    skip = scenario.get("skip", 0)
    return skip == 0 or (k + t) % skip != 0


# Trajectory scenarios: (defaults, groups of (shapes with dtypes, group overrides), steps,
# optionally skip: see has_gradient).
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SCENARIOS = {
    # compressed left and right, resampling every 3 (group 0) or 2 (group 1) steps, dense
    # momentum for 1-D and for a shape outside the aspect-ratio limit, decay, a bf16 parameter
    "compressed": dict(
        defaults=dict(lr=1e-2, beta1=0.9, rank=4, kappa=3, seed=7),
        groups=[([((16, 40), F32), ((40, 16), F32)], {}),
                ([((37,), F32), ((8, 64), F32), ((12, 20), BF16)],
                 dict(weight_decay=0.1, kappa=2))],
        steps=7),
    # relative step with warm-up, no momentum, unfactored second moment, other eps and clip
    "relative_step": dict(
        defaults=dict(lr=None, relative_step=True, warmup_init=True, scale_parameter=False,
                      clip_threshold=0.5, decay_rate=-0.5, eps=(1e-20, 1e-2),
                      factorize_second_moment=False, rank=2),
        groups=[([((16, 40), F32), ((7,), F32)], {})],
        steps=5),
    # float16 parameters, resampling on every step
    "half": dict(
        defaults=dict(lr=5e-2, beta1=0.8, rank=8, kappa=1, seed=100),
        groups=[([((24, 24), F16), ((10, 3), F16)], {})],
        steps=4),
    # four groups of mixed dtypes: compressed left and right, dense momentum (aspect ratio,
    # 1-D, unfactored), none (beta1=0); resampling every 2 or 3 steps; per-group lr, rank,
    # clip, decay, weight decay, stochastic rounding; some parameters without a gradient
    # on some steps, so the batches of a group change from step to step
    "groups": dict(
        defaults=dict(lr=2e-2, beta1=0.9, rank=3, kappa=2, seed=11),
        groups=[([((12, 30), F32), ((30, 12), BF16), ((50,), F32), ((4, 40), F32)], {}),
                ([((16, 16), F16), ((9,), BF16), ((20, 10), F32)],
                 dict(rank=5, kappa=3, weight_decay=0.05, clip_threshold=0.5)),
                ([((24, 8), F32), ((6, 7), BF16)],
                 dict(lr=1e-2, factorize_second_moment=False, stochastic_rounding=True)),
                ([((10, 10), F32), ((5,), F16)],
                 dict(beta1=0.0, decay_rate=-0.5, scale_parameter=False))],
        steps=9,
        skip=5),
    # quantization=True: 8-bit compressed (left, right) and dense momentum (1-D, unfactored
    # 2-D) and unfactored second moments, a group without momentum, bf16 with stochastic
    # rounding
    "quantized": dict(
        defaults=dict(lr=1e-2, beta1=0.9, rank=4, kappa=3, seed=5, quantization=True),
        groups=[([((16, 40), F32), ((40, 16), F32), ((300,), F32)], {}),
                ([((24, 30), BF16), ((9,), BF16), ((20, 10), F32)],
                 dict(factorize_second_moment=False, stochastic_rounding=True, kappa=2)),
                ([((10, 10), F32), ((70,), F32)], dict(beta1=0.0)),
                ([((24, 30), BF16), ((30, 24), BF16), ((16, 40), BF16)],
                 dict(stochastic_rounding=True))],
        steps=6,
        skip=4),
    # projection="orthogonal" (docs/FLORA.md §5.1): left, right, square bf16, dense momentum
    # and 1-D in one group, resampling every 2 steps; a second group back on the Gaussian
    "orthogonal": dict(
        defaults=dict(lr=2e-2, beta1=0.9, rank=4, kappa=2, seed=3, projection="orthogonal"),
        groups=[([((16, 40), F32), ((40, 16), F32), ((24, 24), BF16), ((8, 64), F32),
                  ((9,), F32)], {}),
                ([((12, 30), F32)], dict(projection="gaussian"))],
        steps=7),
    # max_aspect_ratio=None: compressed momentum for shapes past the aspect-ratio limit
    # (left 8 x 64, right 64 x 8); a second group back on the default limit of 4 (dense)
    "aspect": dict(
        defaults=dict(lr=2e-2, beta1=0.9, rank=4, kappa=2, seed=9, max_aspect_ratio=None),
        groups=[([((8, 64), F32), ((64, 8), F32), ((12, 30), F32)], {}),
                ([((8, 64), F32), ((8, 33), F32)], dict(max_aspect_ratio=4.0))],
        steps=5),
}

# The step checked against tests/reference.py (tests/cpp/reference_values.h).
REFERENCE_CASE = dict(
    hp=dict(lr=1e-1, beta1=0.9, rank=2, kappa=2, weight_decay=0.1),
    seed=5,
    shapes=[(4, 6), (5,), (6, 3)],
    steps=3,
)
