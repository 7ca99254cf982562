"""quantization=True: 8-bit storage of momentum and unfactored second moments (docs/FLORA.md §11).

A quantized state tensor is two entries of ``opt.state[p]``: ``<name>`` (uint8 codes, the
float tensor's shape) and ``<name>_absmax`` (float32, one entry per block of BLOCK elements
of the flat tensor). step_group_ reads and writes them as codes itself (CPU and CUDA), so no
float32 copy of the state exists outside the op's own workspace.
"""
from __future__ import annotations

import torch

BLOCK = 256  # elements per absmax (csrc/common/quantize.h, kQuantBlock)
# The state tensors kept 8-bit, and whether each takes the signed map.
SIGNED = {"second_moment": False, "momentum": True}
ABSMAX = {name: f"{name}_absmax" for name in SIGNED}
STATE_KEYS = tuple(ABSMAX.values())
# Each state's place in the test route's scratch (CUDA_STEPS_CODES) starts at a multiple
# of 64 floats (256 bytes), as a fresh allocation would: the CUDA kernels take vectorised
# paths only on aligned state.
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


# Whether CUDA parameters hand their 8-bit state to step_group_ as codes, as the CPU's do.
# False reads every 8-bit state of the call into one float32 scratch instead, steps it
# there and writes it back: the route the tests compare the op's with (the two step
# bitwise alike).
CUDA_STEPS_CODES = True


def step_group(params, grads, states, order, steps, seeds, hyper_parameters, norms=None,
               known=(), skips=None):
    """step_group_ over parameters whose states (``states``: their state dicts; ``order``:
    the state names as step_group_ takes them) hold quantized tensors: each goes to the op
    as its codes followed by its absmax, and the op steps them in place (docs/FLORA.md §11).
    A fault in the op leaves every parameter and state as it was."""
    if not params:
        return
    via_scratch = params[0].device.type == "cuda" and not CUDA_STEPS_CODES
    scratch = None
    if via_scratch:
        floats = sum(_aligned(state[name].numel())
                     for state in states for name in SIGNED if name in state)
        scratch = torch.empty(floats, dtype=torch.float32, device=params[0].device)
    flat, pending, offset = [], [], 0
    for state in states:
        for name in order:
            if name not in state:
                continue
            t = state[name]
            if name not in SIGNED:
                flat.append(t)
            elif not via_scratch:
                flat += (t, state[ABSMAX[name]])
            else:
                view = scratch[offset:offset + t.numel()].view(t.shape)
                offset += _aligned(t.numel())
                dequantize(name, t, state[ABSMAX[name]], out=view)
                pending.append((name, view, t, state[ABSMAX[name]]))
                flat.append(view)
    extra = {}
    if norms is not None:
        extra = dict(param_norms=norms, norms_known=list(known))
    torch.ops.flora.step_group_(params, grads, flat, steps, seeds, nonfinite_skips=skips,
                                **extra, **hyper_parameters)
    for name, view, codes, absmax in pending:
        write_back_(name, view, codes, absmax)
