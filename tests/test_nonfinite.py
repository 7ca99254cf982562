"""Non-finite values: a NaN or inf in a gradient makes the whole parameter NaN, on every
path (docs/FLORA.md §4.7), as in flora-opt and the float64 reference. The clip factor
max(1, RMS(D) / d) and the step size's max(eps2, RMS(p)) are NaN when their argument is,
so no path steps the finite elements unclipped or at the eps2 floor."""
import pytest
import torch

import reference as ref
import flora_ext
from conftest import DEVICES

# name: (shape, hyper-parameters): every layout, and on CUDA the row-stats and tile
# passes, fused (TF32) and unfused (exact) compressed momentum.
KINDS = {
    "1-D": ((50,), dict()),
    "1-D dense momentum": ((50,), dict(beta1=0.9)),
    "N-D": ((4, 6, 5), dict()),
    "unfactored 2-D": ((16, 24), dict(factorize_second_moment=False)),
    "factored 2-D": ((16, 24), dict()),
    "factored 2-D wide rows": ((8, 1024), dict()),
    "factored 2-D dense momentum": ((16, 24), dict(beta1=0.9)),
    "compressed": ((64, 96), dict(beta1=0.9, rank=8, kappa=2)),
    "compressed exact": ((64, 96), dict(beta1=0.9, rank=8, kappa=2, tf32=False)),
    "compressed right": ((96, 64), dict(beta1=0.9, rank=8, kappa=2)),
}
POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def inputs(shape):
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    return param, grads


def run_extension(param, grads, hp, device):
    p = torch.nn.Parameter(param.clone().to(device))
    opt = flora_ext.Flora([p], lr=1e-2, **hp)
    out = []
    for g in grads:
        p.grad = g.to(device)
        opt.step()
        out.append(p.detach().cpu().clone())
    return out


def run_reference(param, grads, hp):
    full = ref.full_hp(lr=1e-2, **{k: v for k, v in hp.items() if k != "tf32"})
    state = ref.init_state(param, full, ref.param_seed(0, 0))
    p = param.double()
    out = []
    for g in grads:
        p = ref.reference_step(p, g.double(), state, full)
        out.append(p.clone())
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", list(POISON), ids=list(POISON))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_non_finite_gradient_makes_the_whole_parameter_nan(kind, poison, device):
    shape, hp = KINDS[kind]
    param, grads = inputs(shape)
    grads[1].view(-1)[7] = POISON[poison]  # one element, on the second step
    steps = run_extension(param, grads, hp, device)
    assert torch.isfinite(steps[0]).all(), "a finite step gave non-finite values"
    for k in (1, 2):  # the poisoned step, and a finite step after it
        nan = torch.isnan(steps[k])
        assert nan.all(), f"step {k + 1}: {int((~nan).sum())} of {nan.numel()} elements not NaN"
    expected = run_reference(param, grads, hp)
    assert torch.isfinite(expected[0]).all()
    assert torch.isnan(expected[1]).all() and torch.isnan(expected[2]).all(), \
        "the reference does not propagate NaN"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_nan_in_the_parameter_makes_it_nan_through_the_step_size(kind, device):
    # RMS(p) is NaN: the step size max(eps2, RMS(p)) must be NaN, not eps2 (which would
    # step every finite element at the floor). Finite gradients.
    shape, hp = KINDS[kind]
    param, grads = inputs(shape)
    param.view(-1)[3] = float("nan")
    steps = run_extension(param, grads[:1], hp, device)
    assert torch.isnan(steps[0]).all()
    assert torch.isnan(run_reference(param, grads[:1], hp)[0]).all()
    # Without scale_parameter the step size does not read p: only the NaN element stays NaN.
    steps = run_extension(param, grads[:1], dict(hp, scale_parameter=False), device)
    assert int(torch.isnan(steps[0]).sum()) == 1
