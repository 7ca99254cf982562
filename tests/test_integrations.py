"""Flora with what training code around it expects: torch's cycling LR schedulers
(OneCycleLR, CyclicLR with cycle_momentum=True) and Hugging Face Trainer
(flora_ext.integrations.hf), the latter on a tiny random-init Llama on the CPU."""
import copy
import math
import pickle

import pytest
import torch

import flora_ext

FLORA = dict(lr=1e-2, beta1=0.9, rank=4, kappa=3)


# ---------------------------------------------------------------- cycle_momentum schedulers
def params():
    torch.manual_seed(0)
    # (8, 16) compressed momentum, (16,) dense momentum
    return [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16))]


def grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(8, 16, generator=gen), torch.randn(16, generator=gen)]


def one_cycle_momentum(step, total, pct=0.3, low=0.85, high=0.95):
    """OneCycleLR's beta1 at scheduler step ``step`` (cos annealing, two phases): high ->
    low over the first pct * total - 1 steps, then back to high at step total - 1."""
    peak, end = pct * total - 1, total - 1

    def cos(start, stop, t):
        return stop + (start - stop) / 2 * (math.cos(math.pi * t) + 1)

    if step <= peak:
        return cos(high, low, step / peak)
    return cos(low, high, (step - peak) / (end - peak))


def cyclic_momentum(step, up, low=0.8, high=0.9):
    """CyclicLR's (triangular, symmetric) beta1: high at a cycle's start, low at its lr peak."""
    t = step % (2 * up)
    scale = t / up if t <= up else (2 * up - t) / up
    return high - (high - low) * scale


SCHEDULERS = {
    "OneCycleLR": (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05,
                                                                   total_steps=10),
                   lambda k: one_cycle_momentum(k, 10)),
    "CyclicLR": (lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=0.05,
                                                               step_size_up=3),
                 lambda k: cyclic_momentum(k, 3)),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_cycle_momentum_drives_beta1(name):
    make_scheduler, expected = SCHEDULERS[name]
    ps, ref_ps, fixed_ps = params(), params(), params()
    opt = flora_ext.Flora(ps, **FLORA)
    sched = make_scheduler(opt)
    ref = flora_ext.Flora(ref_ps, **FLORA)  # beta1 and lr set by hand each step
    fixed = flora_ext.Flora(fixed_ps, **FLORA)  # lr by hand, beta1 left at its first value
    group = opt.param_groups[0]
    for k in range(9):
        assert group["beta1"] == pytest.approx(expected(k), abs=1e-12), k
        assert group["momentum"] == group["beta1"] and "momentum" in group
        saved = opt.state_dict()["param_groups"][0]
        assert saved["beta1"] == group["beta1"] and "momentum" not in saved
        ref.param_groups[0].update(lr=group["lr"], beta1=group["beta1"])
        fixed.param_groups[0].update(lr=group["lr"], beta1=expected(0))
        for p, q, r, g in zip(ps, ref_ps, fixed_ps, grads(k)):
            p.grad, q.grad, r.grad = g, g.clone(), g.clone()
        opt.step()
        ref.step()
        fixed.step()
        sched.step()
        for p, q in zip(ps, ref_ps):
            assert torch.equal(p, q), k
    # beta1 did change the steps: the run with a constant beta1 went elsewhere
    assert not all(torch.equal(p, r) for p, r in zip(ps, fixed_ps))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_cycle_momentum_resumes_from_state_dicts(name):
    make_scheduler, _ = SCHEDULERS[name]

    def run(steps, resume=None):
        ps = params()
        opt = flora_ext.Flora(ps, **FLORA)
        sched = make_scheduler(opt)
        start = 0
        if resume is not None:
            with torch.no_grad():
                for p, saved_p in zip(ps, resume[3]):
                    p.copy_(saved_p)
            opt.load_state_dict(resume[0])
            sched.load_state_dict(resume[1])
            start = resume[2]
        for k in range(start, steps):
            for p, g in zip(ps, grads(k)):
                p.grad = g
            opt.step()
            sched.step()
        saved = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()), steps,
                 [p.detach().clone() for p in ps])
        return ps, saved, opt

    full, _, _ = run(9)
    _, saved, _ = run(4)
    resumed, _, opt = run(9, resume=saved)
    assert all(torch.equal(p, q) for p, q in zip(full, resumed))
    # the aliasing survives load_state_dict, pickling and deepcopy
    for clone in (opt, pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        clone.param_groups[0]["momentum"] = 0.5
        assert clone.param_groups[0]["beta1"] == 0.5
        assert "momentum" in clone.defaults


def test_cycle_momentum_without_beta1_is_refused():
    opt = flora_ext.Flora(params(), lr=1e-2)  # beta1=None: no momentum state
    for make_scheduler, _ in SCHEDULERS.values():
        with pytest.raises(ValueError, match="cycle_momentum=False"):
            make_scheduler(opt)
        assert opt.param_groups[0]["beta1"] is None
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10, cycle_momentum=False)
    assert opt.param_groups[0]["beta1"] is None


def test_cycle_momentum_cannot_reach_zero_or_one():
    opt = flora_ext.Flora(params(), **FLORA)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=0.05, step_size_up=2,
                                              base_momentum=0.0, max_momentum=0.9)
    for k in range(2):
        for p, g in zip(opt.param_groups[0]["params"], grads(k)):
            p.grad = g
        opt.step()
        if k == 0:
            sched.step()
    assert opt.param_groups[0]["beta1"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match="turn the first moment off"):
        sched.step()  # beta1 would reach 0 at the lr peak
    assert opt.param_groups[0]["beta1"] == pytest.approx(0.45)
    with pytest.raises(ValueError, match=r"momentum .* must be a float in \[0, 1\), got 1.0"):
        opt.param_groups[0]["momentum"] = 1.0
    with pytest.raises(ValueError, match="Flora's name for the first-moment coefficient is beta1"):
        flora_ext.Flora([{"params": params(), "momentum": 0.9}], **FLORA)
