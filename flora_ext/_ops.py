"""Python wrappers of the torch.ops.flora ops and their fake (meta) kernels."""
from __future__ import annotations

import functools
import itertools
import math
import numbers
import weakref

import torch

_MAX_SEED = 2**63 - 1


def next_seed(seed: int) -> int:
    """Seed of the projection that follows the one drawn from ``seed``."""
    if (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
            or not 0 <= seed <= _MAX_SEED):
        raise ValueError(f"flora: seed must be an int in [0, 2**63), got {seed!r}")
    return torch.ops.flora.next_seed(int(seed))


@functools.lru_cache(maxsize=4096)
def _param_layout(shape, rank, beta1, factorize_second_moment, max_aspect_ratio):
    # A pure function of its arguments, asked for every parameter on every step: cached, as a
    # dispatcher call from Python costs microseconds.
    factored, momentum, momentum_shape, left, layout_rank = torch.ops.flora.param_layout(
        list(shape), rank, beta1, factorize_second_moment, max_aspect_ratio)
    return factored, momentum, tuple(momentum_shape), left, layout_rank


def param_layout(shape, rank: int | None, beta1: float | None, factorize_second_moment: bool,
                 max_aspect_ratio: float | None = 4.0):
    """Which state a parameter gets: dict(factored, momentum, momentum_shape, left, rank);
    max_aspect_ratio None: compressed momentum whatever the shape's aspect ratio."""
    factored, momentum, momentum_shape, left, layout_rank = _param_layout(
        tuple(int(s) for s in shape), int(rank or 0), float(beta1 or 0.0),
        bool(factorize_second_moment), float(max_aspect_ratio or 0.0))
    return dict(factored=factored, momentum=momentum, momentum_shape=list(momentum_shape),
                left=left, rank=layout_rank)


def cuda_compiled() -> bool:
    """Whether the compiled library has the CUDA kernels."""
    return torch.ops.flora.cuda_compiled()


def projection(seed: int, rows: int, cols: int, rank: int, device="cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (rows x cols) projection of ``seed``: N(0, 1) entries / sqrt(rank).

    Entry e (row-major) comes from Philox4x32-10 with key ``seed`` and counter e // 4,
    through a double-precision Box-Muller, so CPU and CUDA give the same matrix.
    ``dtype`` float32 (default), bfloat16 or float16: the float32 matrix rounded to
    nearest, as its ``.to(dtype)`` would be, without the float32 copy.
    """
    if not isinstance(seed, int) or seed < 0 or seed >= 2**63:
        raise ValueError(f"flora: seed must be an int in [0, 2**63), got {seed!r}")
    if rank is None or rank <= 0:
        raise ValueError(f"flora: rank must be a positive int, got {rank!r}")
    if rows < 0 or cols < 0:
        raise ValueError(f"flora: projection shape must be non-negative, got ({rows}, {cols})")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"flora: projection dtype must be torch.float32, torch.bfloat16 or "
                         f"torch.float16, got {dtype!r}")
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    torch.ops.flora.fill_projection_(out, seed, 1.0 / math.sqrt(rank))
    return out


@torch.library.register_fake("flora::step_")
def _step_fake(param, grad, row_second_moment, col_second_moment, second_moment, momentum, *,
               step, seed, lr, beta1, eps1, eps2, clip_threshold, decay_rate, weight_decay,
               rank, kappa, scale_parameter, relative_step, warmup_init,
               factorize_second_moment, tf32=True, stochastic_rounding=False,
               skip_nonfinite=False, projection="gaussian", nonfinite_skips=None,
               max_aspect_ratio=4.0):
    torch._check(grad.shape == param.shape, lambda: "flora: grad must have the shape of param")
    return None


@torch.library.register_fake("flora::fill_projection_")
def _fill_projection_fake(out, seed, scale):
    torch._check(out.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: "flora: out must be float32, bfloat16 or float16")
    return None


@torch.library.register_fake("flora::step_group_")
def _step_group_fake(params, grads, states, steps, seeds, **hyper_parameters):
    torch._check(len(grads) == len(params), lambda: "flora: one grad per parameter")
    return None



# handle -> the object whose run(params, grads, states) a compiled step's op calls: a
# _CompiledStep of flora_ext.optimizer, kept alive by its optimizer.
compiled_plans = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


def register_compiled_plan(plan) -> int:
    """The handle by which step_group_compiled_ finds ``plan`` (a new one per plan)."""
    handle = next(_next_handle)
    compiled_plans[handle] = plan
    return handle


# Its work depends on Python values read when it runs (step counts, seeds, lr), which a
# CUDA graph replay would not read again: cudagraph_unsafe keeps it out of Inductor's.
_CUDAGRAPH_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t)


@torch.library.custom_op("flora::step_group_compiled_", mutates_args=("params", "states"),
                         tags=_CUDAGRAPH_UNSAFE)
def step_group_compiled_(params: list[torch.Tensor], grads: list[torch.Tensor],
                         states: list[torch.Tensor], plan: int) -> None:
    """The step of a torch.compile'd Flora.step(): the groups' hyper-parameters, step
    counts and seeds are read (and the counts advanced) when the op runs, from the groups
    and their states, as the eager step reads them, so that the graph holds no value that
    changes between steps. ``plan`` is the handle of the optimizer's compiled plan
    (register_compiled_plan); the tensors are those it lists (states flat, in step_group_'s
    order), given here so that the graph knows what the op reads and writes."""
    target = compiled_plans.get(plan)
    if target is None:
        raise RuntimeError("flora: this compiled step was traced for an optimizer (or a "
                           "state) that no longer exists; compile the new optimizer's step")
    target.run(params, grads, states)


@step_group_compiled_.register_fake
def _step_group_compiled_fake(params, grads, states, plan):
    torch._check(len(grads) == len(params), lambda: "flora: one grad per parameter")
    return None
