"""Python wrappers of the torch.ops.flora ops and their fake (meta) kernels."""
from __future__ import annotations

import functools
import math
import numbers

import torch

_MAX_SEED = 2**63 - 1


def next_seed(seed: int) -> int:
    """Seed of the projection that follows the one drawn from ``seed``."""
    if (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
            or not 0 <= seed <= _MAX_SEED):
        raise ValueError(f"flora: seed must be an int in [0, 2**63), got {seed!r}")
    return torch.ops.flora.next_seed(int(seed))


@functools.lru_cache(maxsize=4096)
def _param_layout(shape, rank, beta1, factorize_second_moment):
    # A pure function of its arguments, asked for every parameter on every step: cached, as a
    # dispatcher call from Python costs microseconds.
    factored, momentum, momentum_shape, left, layout_rank = torch.ops.flora.param_layout(
        list(shape), rank, beta1, factorize_second_moment)
    return factored, momentum, tuple(momentum_shape), left, layout_rank


def param_layout(shape, rank: int | None, beta1: float | None, factorize_second_moment: bool):
    """Which state a parameter gets: dict(factored, momentum, momentum_shape, left, rank)."""
    factored, momentum, momentum_shape, left, layout_rank = _param_layout(
        tuple(int(s) for s in shape), int(rank or 0), float(beta1 or 0.0),
        bool(factorize_second_moment))
    return dict(factored=factored, momentum=momentum, momentum_shape=list(momentum_shape),
                left=left, rank=layout_rank)


def cuda_compiled() -> bool:
    """Whether the compiled library has the CUDA kernels."""
    return torch.ops.flora.cuda_compiled()


def projection(seed: int, rows: int, cols: int, rank: int, device="cpu") -> torch.Tensor:
    """The float32 (rows x cols) projection of ``seed``: N(0, 1) entries / sqrt(rank).

    Entry e (row-major) comes from Philox4x32-10 with key ``seed`` and counter e // 4,
    through a double-precision Box-Muller, so CPU and CUDA give the same matrix.
    """
    if not isinstance(seed, int) or seed < 0 or seed >= 2**63:
        raise ValueError(f"flora: seed must be an int in [0, 2**63), got {seed!r}")
    if rank is None or rank <= 0:
        raise ValueError(f"flora: rank must be a positive int, got {rank!r}")
    if rows < 0 or cols < 0:
        raise ValueError(f"flora: projection shape must be non-negative, got ({rows}, {cols})")
    out = torch.empty((rows, cols), dtype=torch.float32, device=device)
    torch.ops.flora.fill_projection_(out, seed, 1.0 / math.sqrt(rank))
    return out


@torch.library.register_fake("flora::step_")
def _step_fake(param, grad, row_second_moment, col_second_moment, second_moment, momentum, *,
               step, seed, lr, beta1, eps1, eps2, clip_threshold, decay_rate, weight_decay,
               rank, kappa, scale_parameter, relative_step, warmup_init,
               factorize_second_moment, tf32=True, stochastic_rounding=False):
    torch._check(grad.shape == param.shape, lambda: "flora: grad must have the shape of param")
    return None


@torch.library.register_fake("flora::fill_projection_")
def _fill_projection_fake(out, seed, scale):
    torch._check(out.dtype == torch.float32, lambda: "flora: out must be float32")
    return None


@torch.library.register_fake("flora::step_group_")
def _step_group_fake(params, grads, states, steps, seeds, **hyper_parameters):
    torch._check(len(grads) == len(params), lambda: "flora: one grad per parameter")
    return None
