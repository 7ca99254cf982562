"""The step() that torch.distributed.checkpoint makes to create optimizer state
(docs/FLORA.md §10.4).

``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` need every parameter's state to
exist (as the template that ``dcp.load`` fills in place). On an optimizer with no state yet they
create it by calling ``step()`` once with every trainable parameter's gradient set to zeros and
every group's ``lr`` set to 0, which is a no-op for torch's own optimizers apart from their
step counters. For Flora such a step would not be one: with ``relative_step`` the step size
does not come from ``lr`` (and ``lr`` must be None, so the call fails), and in any case it
would count as step 1, which shifts the beta2 schedule and the resampling (every ``kappa``
steps) of every step after it.

So a step() that has exactly that form creates the state a first step would create (zeros,
step count 0, the initial projection seed) and changes nothing else: the parameters, the step
counts and the seeds stay as they were, and the next real step is step 1, as without the
checkpoint call. The form: no parameter has state yet, every group's lr is 0 and every
parameter that requires a gradient has one, all zeros. A real step of that form could only add
eps1 to the second moments and count itself, so nothing a user relies on is lost.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _sharded


def _grads_all_zero(grads, meshes) -> bool:
    """Whether every gradient is zero; with DTensor gradients, on every rank of their meshes
    (the ranks must all take the same branch: the sharded step runs collectives)."""
    by_device = {}
    for g in grads:
        local = g.to_local() if isinstance(g, _sharded.DTensor) else g
        if local.numel():
            by_device.setdefault(local.device, []).append(local.ne(0).any())
    nonzero = any(bool(torch.stack(flags).any()) for flags in by_device.values())
    for mesh in meshes:
        flag = torch.tensor([float(nonzero)], device=mesh.device_type)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group())
        nonzero = bool(flag.item())
    return not nonzero


def init_state_if_checkpoint_step(optimizer) -> bool:
    """Creates the state of every parameter with a gradient and returns True when step()
    is torch.distributed.checkpoint's state-creating call (see above); else returns False and
    does nothing."""
    if any(optimizer.state.values()):
        return False
    groups = optimizer.param_groups
    # (DCP sets 0.0; a Tensor lr, which capturable groups may have, is not DCP's)
    if not all(type(group.get("lr")) in (int, float) and group["lr"] == 0 for group in groups):
        return False
    grads, meshes = [], {}
    for group in groups:
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                return False
            if p.grad is not None:
                if p.grad.layout != torch.strided:
                    return False  # not DCP's zeros: the step's checks report it
                grads.append(p.grad)
            if isinstance(p, _sharded.DTensor) and p.device_mesh.size() > 1:
                meshes.setdefault(id(p.device_mesh.get_group()), p.device_mesh)
    if not grads or not _grads_all_zero(grads, list(meshes.values())):
        return False
    for group in groups:
        sharded = _sharded.has_dtensors(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if sharded:
                _sharded.init_state(optimizer, p, group, state)
            else:
                optimizer._init_state(p, group, state)
    return True
