"""quantization=True: 8-bit storage of momentum and unfactored second moments (docs/FLORA.md §11).

A quantized state tensor is two entries of ``opt.state[p]``: ``<name>`` (uint8 codes, the
float tensor's shape) and ``<name>_absmax`` (float32, one entry per block of BLOCK elements
of the flat tensor). step_group_ reads and writes an unfactored second moment and a dense
momentum as codes itself (CPU and CUDA). Compressed momentum is read for a bounded chunk of
parameters into one float32 scratch buffer, stepped there by step_group_, and written back,
so the extra memory of a step is the scratch, not a float32 copy of every state.
"""
from __future__ import annotations

import functools

import torch

from ._ops import param_layout

BLOCK = 256  # elements per absmax (csrc/common/quantize.h, kQuantBlock)
# The state tensors kept 8-bit, and whether each takes the signed map.
SIGNED = {"second_moment": False, "momentum": True}
ABSMAX = {name: f"{name}_absmax" for name in SIGNED}
STATE_KEYS = tuple(ABSMAX.values())
# Bound of the float32 scratch of one step_group_ call: 64 MiB, or one parameter's
# compressed momentum when that is larger (a step needs a whole parameter).
SCRATCH_BYTES = 64 << 20

# Each state's place in the scratch starts at a multiple of 64 floats (256 bytes), as a
# fresh allocation would: the CUDA kernels take vectorised paths only on aligned state.
_ALIGN = 64
_zero_code = {}


def _aligned(numel: int) -> int:
    return -(-numel // _ALIGN) * _ALIGN


def blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def zero_code(signed: bool) -> int:
    """The code of 0.0 in the map (codes of a fresh state)."""
    if signed not in _zero_code:
        _zero_code[signed] = int(torch.ops.flora.dynamic_map(signed).eq(0).nonzero().item())
    return _zero_code[signed]


def zeros(name, shape, device):
    """A fresh (zero) quantized state: codes and absmax."""
    codes = torch.full(shape, zero_code(SIGNED[name]), dtype=torch.uint8, device=device)
    absmax = torch.zeros(blocks(codes.numel()), dtype=torch.float32, device=device)
    return codes, absmax


def quantize(name, values):
    """Codes and absmax of the float32 ``values`` (contiguous) as state ``name``."""
    codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
    absmax = torch.empty(blocks(values.numel()), dtype=torch.float32, device=values.device)
    requantize_(name, values, codes, absmax)
    return codes, absmax


def requantize_(name, values, codes, absmax):
    """Writes the float32 ``values`` (contiguous) into the existing ``codes`` and ``absmax``."""
    torch.ops.flora.quantize_blockwise_(values, codes, absmax, SIGNED[name])


def write_back_(name, values, codes, absmax):
    """Writes a step's float32 ``values`` back into the state ``codes`` and ``absmax`` they
    were read from: a block the step left bitwise as it read back keeps its codes and
    absmax (a skipped step does not round the state again)."""
    torch.ops.flora.requantize_blockwise_(values, codes, absmax, SIGNED[name])


def dequantize(name, codes, absmax, out=None):
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device) if out is None else out
    torch.ops.flora.dequantize_blockwise_(codes, absmax, out, SIGNED[name])
    return out


def _chunks(sizes, limit):
    """Consecutive ranges [k0, k1) of parameters whose scratch sizes sum to <= limit (a
    parameter larger than limit alone)."""
    ranges, start, total = [], 0, 0
    for k, size in enumerate(sizes):
        if k > start and total + size > limit:
            ranges.append((start, k))
            start, total = k, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


@functools.lru_cache(maxsize=4096)
def _dense_momentum(shape, rank, beta1, factorize_second_moment, max_aspect_ratio):
    return param_layout(shape, rank, beta1, factorize_second_moment,
                        max_aspect_ratio)["momentum"] == "dense"


# Whether CUDA parameters hand their 8-bit state to step_group_ as codes, as the CPU's do.
# False reads it into the float32 scratch instead: the route the tests compare it with
# (the two step bitwise alike).
CUDA_STEPS_CODES = True


def in_op(name, param, hyper_parameters):
    """Whether step_group_ reads and writes this 8-bit state itself (an unfactored second
    moment, a dense momentum); compressed momentum goes through the float32 scratch."""
    if param.device.type == "cuda" and not CUDA_STEPS_CODES:
        return False
    if name == "second_moment":
        return True
    h = hyper_parameters
    return _dense_momentum(tuple(param.shape), h["rank"], h["beta1"],
                           h["factorize_second_moment"], h["max_aspect_ratio"])


def step_group(params, grads, states, order, steps, seeds, hyper_parameters, norms=None,
               known=(), scratch_bytes=None, skips=None):
    """step_group_ over parameters whose states (``states``: their state dicts; ``order``:
    the state names as step_group_ takes them) hold quantized tensors. An unfactored second
    moment and a dense momentum go to the op as codes and absmax, which it steps in place;
    compressed momentum is read into the scratch, allocated before anything is written,
    and written back after the op."""
    if not params:
        return
    # Each parameter's 8-bit states that step_group_ takes as codes, decided once.
    via_op = [{name for name in SIGNED if name in state and in_op(name, p, hyper_parameters)}
              for p, state in zip(params, states)]
    sizes = [sum(_aligned(state[name].numel()) for name in SIGNED
                 if name in state and name not in codes)
             for state, codes in zip(states, via_op)]
    limit = max((SCRATCH_BYTES if scratch_bytes is None else scratch_bytes) // 4, max(sizes))
    ranges = _chunks(sizes, limit)
    scratch = torch.empty(max(sum(sizes[k0:k1]) for k0, k1 in ranges), dtype=torch.float32,
                          device=params[0].device)
    for k0, k1 in ranges:
        flat, pending, offset = [], [], 0
        for state, codes in zip(states[k0:k1], via_op[k0:k1]):
            for name in order:
                if name not in state:
                    continue
                t = state[name]
                if name in codes:
                    flat += (t, state[ABSMAX[name]])
                    continue
                if name in SIGNED:
                    view = scratch[offset:offset + t.numel()].view(t.shape)
                    offset += _aligned(t.numel())
                    dequantize(name, t, state[ABSMAX[name]], out=view)
                    pending.append((name, view, t, state[ABSMAX[name]]))
                    t = view
                flat.append(t)
        extra = {}
        if norms is not None:
            extra = dict(param_norms=norms[k0:k1], norms_known=list(known[k0:k1]))
        try:
            torch.ops.flora.step_group_(params[k0:k1], grads[k0:k1], flat, steps[k0:k1],
                                        seeds[k0:k1], nonfinite_skips=skips, **extra,
                                        **hyper_parameters)
        except RuntimeError as err:
            # Only a fault at run time gets here (Flora.step checked every input first):
            # the chunks before this one stay stepped.
            if k0 and hasattr(err, "add_note"):
                err.add_note(f"flora: quantization=True had already stepped the first {k0} "
                             f"of the {len(params)} parameters of this call")
            raise
        for name, view, codes, absmax in pending:
            write_back_(name, view, codes, absmax)
