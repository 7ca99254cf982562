"""flora_ext.Flora as a torch.optim.Optimizer: API conventions, errors, resume."""
import copy
import io

import pytest
import torch

import flora_ext
from conftest import DEVICES

BASE = dict(lr=1e-2)

BAD_CONSTRUCTOR = [
    (dict(lr=-1.0), ValueError, "lr must be"),
    (dict(lr=float("nan")), ValueError, "lr must be"),
    (dict(lr=None), ValueError, "lr is required unless relative_step"),
    (dict(lr=1e-3, relative_step=True), ValueError, "exclusive"),
    (dict(lr=1e-3, warmup_init=True), ValueError, "warmup_init=True requires relative_step"),
    (dict(rank=-1), ValueError, "rank must be"),
    (dict(rank=2.5), ValueError, "rank must be"),
    (dict(kappa=0), ValueError, "kappa must be"),
    (dict(kappa=1.5), ValueError, "kappa must be"),
    (dict(kappa=2**63), ValueError,
     r"kappa must be an int in \[1, 2\*\*63 - 1\], got 9223372036854775808$"),
    (dict(rank=2**63), ValueError,
     r"rank must be None or an int in \[0, 2\*\*63 - 1\], got 9223372036854775808$"),
    (dict(beta1=1.0), ValueError, "beta1 must be"),
    (dict(beta1=-0.1), ValueError, "beta1 must be"),
    (dict(eps=1e-3), ValueError, "eps must be a pair"),
    (dict(eps=(1e-30,)), ValueError, "eps must be a pair"),
    (dict(eps=(-1.0, 1e-3)), ValueError, "eps must be a pair"),
    (dict(eps=(float("nan"), 1e-3)), ValueError, "eps must be a pair"),
    (dict(eps=(0.0, 1e-3)), ValueError, r"eps1 >= 2\*\*-126 \(float32's smallest normal"),
    (dict(eps=(1e-40, 1e-3)), ValueError, r"eps1 >= 2\*\*-126 \(float32's smallest normal"),
    (dict(clip_threshold=0.0), ValueError, "clip_threshold must be"),
    (dict(decay_rate=0.5), ValueError, "decay_rate must be"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(seed=2**63), ValueError, "seed must be"),
    (dict(scale_parameter="yes"), TypeError, "scale_parameter must be a bool"),
    (dict(tf32=1), TypeError, "tf32 must be a bool"),
    (dict(stochastic_rounding=None), TypeError, "stochastic_rounding must be a bool"),
    (dict(lr=torch.tensor(0.1)), ValueError,
     r"^flora: lr as a Tensor needs capturable=True; pass a Python float \(e.g. lr.item\(\)\)$"),
    (dict(quantization=1), TypeError, "quantization must be a bool"),
    (dict(capturable=True, skip_nonfinite=True), ValueError,
     "skip_nonfinite=True is not supported with capturable=True"),
    (dict(capturable=True, quantization=True), ValueError,
     "capturable=True is not supported with quantization=True"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CONSTRUCTOR, ids=[m for _, _, m in BAD_CONSTRUCTOR])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    args = dict(BASE)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        flora_ext.Flora([torch.nn.Parameter(torch.randn(3, 3))], **args)


def test_constructor_rejects_unsupported_parameter_dtype():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        flora_ext.Flora([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], lr=1e-2)


def test_bad_param_group_is_not_added():
    opt = flora_ext.Flora([torch.nn.Parameter(torch.randn(3))], lr=1e-2)
    with pytest.raises(ValueError, match="kappa"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "kappa": 0})
    assert len(opt.param_groups) == 1


def test_defaults_match_flora_opt():
    opt = flora_ext.Flora([torch.nn.Parameter(torch.randn(3))], relative_step=True)
    expected = dict(lr=None, rank=None, kappa=1000, eps=(1e-30, 1e-3), clip_threshold=1.0,
                    decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True,
                    relative_step=True, warmup_init=False, factorize_second_moment=True, seed=0)
    # ours on top: keyword-only, CUDA projection precision, bf16 rounding, non-finite
    # skips, the down projection, the aspect-ratio limit (flora-opt's 4), CUDA graphs
    expected.update(tf32=True, stochastic_rounding=False, skip_nonfinite=False,
                    projection="gaussian", max_aspect_ratio=4.0, capturable=False)
    assert opt.defaults == expected


def test_param_groups_have_their_own_settings():
    a, b, c = (torch.nn.Parameter(torch.randn(16, 40)) for _ in range(3))
    opt = flora_ext.Flora([{"params": [a], "rank": 4}, {"params": [b], "rank": None},
                           {"params": [c], "beta1": None}], lr=1e-2, beta1=0.9)
    late = torch.nn.Parameter(torch.randn(16, 40))
    opt.add_param_group({"params": [late], "rank": 8, "kappa": 2, "seed": 100})
    for p in (a, b, c, late):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[a]["momentum"].shape == (4, 40) and opt.state[a]["seed"] == 1
    assert opt.state[b]["momentum"].shape == (16, 40) and "seed" not in opt.state[b]
    assert "momentum" not in opt.state[c]
    assert opt.state[late]["momentum"].shape == (8, 40) and opt.state[late]["seed"] == 104
    assert flora_ext.state_bytes(opt) == 4 * ((16 + 40) * 4 + 4 * 40 + 16 * 40 + 8 * 40)


def test_seeds_are_base_plus_position_and_advance_every_kappa_steps():
    ps = [torch.nn.Parameter(torch.randn(16, 40)) for _ in range(3)]
    opt = flora_ext.Flora(ps, lr=1e-2, beta1=0.9, rank=4, kappa=3, seed=10)
    for t in range(1, 7):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        if t == 1:
            assert [opt.state[p]["seed"] for p in ps] == [11, 12, 13]
    assert opt.state[ps[0]]["seed"] == flora_ext.next_seed(flora_ext.next_seed(11))


def test_step_with_closure_returns_loss_and_keeps_gradients():
    model = torch.nn.Linear(8, 4)
    opt = flora_ext.Flora(model.parameters(), lr=1e-2, beta1=0.9, rank=2)
    x = torch.randn(16, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g is not None for g in grads)
    opt.step()  # the kept gradients step again
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = flora_ext.Flora(model.parameters(), lr=3e-2, beta1=0.9, rank=8, kappa=10)
    x = torch.randn(256, 16)
    y = x[:, :1] * x[:, 1:2]
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lr_scheduler_controls_the_step():
    p = torch.nn.Parameter(torch.randn(16, 40))
    opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, rank=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    sched.step()
    assert not torch.equal(p, before) and opt.param_groups[0]["lr"] == 0.0
    after_first = p.detach().clone()
    opt.step()
    assert torch.equal(p, after_first) and opt.state[p]["step"] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_keep_their_dtype_and_fp32_state(dtype):
    p = torch.nn.Parameter(torch.randn(16, 40).to(dtype))
    opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, rank=4)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    assert p.dtype == dtype and not torch.equal(p, before)
    assert all(t.dtype == torch.float32 for t in opt.state[p].values()
               if isinstance(t, torch.Tensor))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.state[p]["momentum"].dtype == torch.float32


def make_run(device, shapes=((16, 40), (40, 16), (37,), (8, 64)), dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    params0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(10)]
    return params0, grads


def new_opt(params0, device):
    ps = [torch.nn.Parameter(p.clone().to(device)) for p in params0]
    opt = flora_ext.Flora([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.1}],
                          lr=1e-2, beta1=0.9, rank=4, kappa=3)
    return ps, opt


def run_steps(ps, opt, grads):
    for g in grads:
        for p, gi in zip(ps, g):
            p.grad = gi.to(p.device)
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_state_dict_is_bitwise(device, dtype):
    params0, grads = make_run(device, dtype=dtype)
    ref, ref_opt = new_opt(params0, device)
    run_steps(ref, ref_opt, grads)

    ps, opt = new_opt(params0, device)
    run_steps(ps, opt, grads[:4])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [p.detach().clone() for p in ps]
    del opt
    resumed = [torch.nn.Parameter(p) for p in saved_params]
    _, opt2 = new_opt(params0, device)
    opt2 = flora_ext.Flora(opt2.param_groups[:0] or [{"params": resumed[:2]},
                           {"params": resumed[2:], "weight_decay": 0.1}],
                           lr=1e-2, beta1=0.9, rank=4, kappa=3)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    run_steps(resumed, opt2, grads[4:])
    for a, b in zip(resumed, ref):
        assert torch.equal(a, b)
    for a, b in zip(resumed, ref):
        for key, value in ref_opt.state[b].items():
            other = opt2.state[a][key]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


def test_loaded_state_does_not_alias_the_source():
    params0, grads = make_run("cpu")
    ps, opt = new_opt(params0, "cpu")
    run_steps(ps, opt, grads[:2])
    sd = opt.state_dict()
    ps2, opt2 = new_opt(params0, "cpu")
    opt2.load_state_dict(sd)
    run_steps(ps2, opt2, grads[2:3])
    assert not torch.equal(opt.state[ps[0]]["momentum"], opt2.state[ps2[0]]["momentum"])


def _stepped(shapes, **kw):
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = flora_ext.Flora(ps, **{**dict(lr=1e-2, beta1=0.9, rank=4), **kw})
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    return ps, opt


@pytest.mark.parametrize("source,match", [
    (dict(shapes=[(40, 16)]), "must have shape"),        # transposed parameter
    (dict(shapes=[(640,)]), "has keys"),                 # same numel, 1-D
    (dict(shapes=[(16, 40), (3,)]), "has 2 parameters"),
])
def test_state_dict_of_another_layout_is_rejected_and_changes_nothing(source, match):
    ps, opt = _stepped([(16, 40)])
    _, other = _stepped(**source)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, value in before["state"][0].items():
        assert torch.equal(after["state"][0][key], value) if isinstance(value, torch.Tensor) \
            else after["state"][0][key] == value


def test_loading_takes_the_saved_hyper_parameters_with_their_state():
    ps, opt = _stepped([(16, 40)])
    _, other = _stepped([(16, 40)], rank=8)
    opt.load_state_dict(other.state_dict())
    assert opt.param_groups[0]["rank"] == 8 and opt.state[ps[0]]["momentum"].shape == (8, 40)
    ps[0].grad = torch.randn_like(ps[0])
    opt.step()


def test_corrupted_state_tensor_is_rejected():
    _, opt = _stepped([(16, 40)])
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["momentum"] = torch.zeros(5, 40)
    with pytest.raises(ValueError, match=r"momentum .* must have shape \(4, 40\)"):
        opt.load_state_dict(sd)
    sd["state"][0]["momentum"] = torch.zeros(4, 40)
    sd["state"][0]["seed"] = -3
    with pytest.raises(ValueError, match="seed must be"):
        opt.load_state_dict(sd)


def test_state_dict_with_other_group_count_is_rejected():
    _, opt = _stepped([(16, 40)])
    sd = opt.state_dict()
    sd["param_groups"] = sd["param_groups"] * 2
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(sd)


def test_bad_gradient_rejects_the_whole_step():
    a = torch.nn.Parameter(torch.randn(16, 40))
    b = torch.nn.Parameter(torch.randn(10, 4))
    opt = flora_ext.Flora([a, b], lr=1e-2, beta1=0.9, rank=4)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    state_before = copy.deepcopy(opt.state_dict())
    a_before = a.detach().clone()
    b.grad = torch.randn_like(b).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step()
    assert torch.equal(a, a_before)
    assert torch.equal(opt.state[a]["momentum"], state_before["state"][0]["momentum"])
    assert opt.state[a]["step"] == 1


def test_changed_group_setting_that_breaks_state_is_reported_before_any_write():
    a = torch.nn.Parameter(torch.randn(16, 40))
    opt = flora_ext.Flora([a], lr=1e-2, beta1=0.9, rank=4)
    a.grad = torch.randn_like(a)
    opt.step()
    opt.param_groups[0]["rank"] = 8
    before = a.detach().clone()
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    assert torch.equal(a, before)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_skips_steps_with_inf_and_nan(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 16).to(device)
    opt = flora_ext.Flora(model.parameters(), lr=1e-2, beta1=0.9, rank=4)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x = torch.randn(4, 8, device=device)

    def backward(poison=None):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if poison is not None:
            model.weight.grad[0, 0] = poison

    backward()
    scaler.step(opt)
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    for poison in (float("inf"), float("nan")):
        scale = scaler.get_scale()
        backward(poison)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() < scale
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        assert opt.state_dict()["state"][0]["step"] == state["state"][0]["step"] == 1
        assert torch.equal(opt.state_dict()["state"][0]["momentum"], state["state"][0]["momentum"])
    backward()
    scaler.step(opt)
    assert not torch.equal(model.weight, params[0])


def test_compressed_state_is_a_fraction_of_adamw():
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
    opt = flora_ext.Flora(model.parameters(), lr=1e-2, beta1=0.9, rank=16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    # rank-16 momentum of (256 x 512)-shaped weights: ~r/min(n, m) of a dense one
    assert flora_ext.state_bytes(opt) < 0.1 * 8 * numel


def test_stochastic_rounding_rejects_float16_params():
    p = torch.nn.Parameter(torch.randn(4, 4).half())
    with pytest.raises(ValueError, match="stochastic_rounding supports bfloat16"):
        flora_ext.Flora([p], lr=1e-2, stochastic_rounding=True)
    # the op says the same to callers that bypass the class
    from test_ops import step_args
    args, kwargs = step_args("full-dense", dtype=torch.float16)
    before = args[0].clone()
    with pytest.raises(RuntimeError, match="stochastic_rounding supports bfloat16"):
        torch.ops.flora.step_(*args, **kwargs, stochastic_rounding=True)
    assert torch.equal(args[0], before)


def test_stochastic_rounding_changes_nothing_for_float32():
    results = []
    for sr in (False, True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 40).view(4, 10))
        opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, stochastic_rounding=sr)
        for k in range(3):
            p.grad = torch.cos(torch.arange(40.0) * (k + 1)).view(4, 10)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


# step() re-checks only what can have changed since its last successful step (a per-group
# plan, compared by identity): these tests change each thing it compares after a step.

def _assert_same_run(a_params, a_opt, b_params, b_opt):
    for a, b in zip(a_params, b_params):
        assert torch.equal(a, b)
        assert a_opt.state[a].keys() == b_opt.state[b].keys()
        for key, value in a_opt.state[a].items():
            other = b_opt.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_steps_that_skip_the_checks_equal_checked_steps():
    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 40), (40, 16), (37,), (8, 64), (24, 24)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]

    def run(recheck_every_step):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = flora_ext.Flora([{"params": ps[:2]}, {"params": ps[2:4], "weight_decay": 0.1}],
                              lr=1e-2, beta1=0.9, rank=4, kappa=2)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
        for t, g in enumerate(grads):
            if t == 3:
                opt.add_param_group({"params": [ps[4]], "rank": 8})
            if t == 5:
                opt.param_groups[1]["weight_decay"] = 0.2
            if t == 7:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            for k, (p, gk) in enumerate(zip(ps, g)):
                p.grad = None if (t == 6 and k == 1) else gk.clone()
            if recheck_every_step:
                opt._plans.clear()
            opt.step()
            sched.step()
        return ps, opt

    cached, checked = run(False), run(True)
    _assert_same_run(*cached, *checked)
    assert cached[1].state[cached[0][4]]["step"] == 9


def test_steady_state_steps_skip_the_per_parameter_checks(monkeypatch):
    ps, opt = _stepped([(16, 40), (40, 16), (37,)])
    calls = []
    monkeypatch.setattr(opt, "_check_state", lambda *args, **kw: calls.append(args))
    monkeypatch.setattr(opt, "_check_grad", lambda *args, **kw: calls.append(args))
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    assert not calls and all(opt.state[p]["step"] == 4 for p in ps)
    opt.param_groups[0]["lr"] = 5e-3  # what LR schedulers do
    opt.step()
    assert not calls


def test_lr_changed_after_a_step_takes_effect():
    def run(second_lr):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(16, 40))
        opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, rank=4)
        after = []
        for lr in (1e-2, second_lr):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.ones_like(p)
            opt.step()
            after.append(p.detach().clone())
        return after

    first, second = run(0.0)
    assert torch.equal(first, second)
    assert not torch.equal(run(1e-2)[1], run(3e-2)[1])


def _snapshot(ps, opt):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def _assert_unchanged(ps, opt, snapshot):
    params, sd = snapshot
    assert all(torch.equal(p, q) for p, q in zip(ps, params))
    now = opt.state_dict()
    for k, state in sd["state"].items():
        for key, value in state.items():
            other = now["state"][k].get(key)
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value


@pytest.mark.parametrize("lr,exc,match", [
    (-1.0, ValueError, "lr must be"), (float("nan"), ValueError, "lr must be"),
    (float("inf"), ValueError, "lr must be"), (None, ValueError, "lr is required"),
    (torch.tensor(0.1), ValueError, "lr as a Tensor needs capturable=True"),
    ("0.1", ValueError, "lr must be"),
])
def test_invalid_lr_set_after_a_step_is_rejected(lr, exc, match):
    ps, opt = _stepped([(16, 40), (37,)])
    before = _snapshot(ps, opt)
    opt.param_groups[0]["lr"] = lr
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged(ps, opt, before)
    opt.param_groups[0]["lr"] = 1  # an int is a valid lr too
    opt.step()
    assert opt.state[ps[0]]["step"] == 2


def test_lr_removed_after_a_step_names_its_group():
    """step(), step_param() and load_state_dict() name the group, as construction does."""
    a, b = torch.nn.Parameter(torch.randn(16, 40)), torch.nn.Parameter(torch.randn(37))
    opt = flora_ext.Flora([{"params": [a]}, {"params": [b], "weight_decay": 0.1}], lr=1e-2)
    a.grad, b.grad = torch.randn(16, 40), torch.randn(37)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    before = _snapshot([a, b], opt)
    opt.param_groups[1]["lr"] = None
    message = (r"^flora: lr is required unless relative_step=True; param group 1 has none "
               r"\(give it an 'lr', or pass lr to Flora\)$")
    with pytest.raises(ValueError, match=message):
        opt.step()
    with pytest.raises(ValueError, match=message):
        opt.step_param(b)
    _assert_unchanged([a, b], opt, before)
    saved["param_groups"][1]["lr"] = None
    opt.param_groups[1]["lr"] = 1e-2
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    _assert_unchanged([a, b], opt, before)


def test_lr_with_relative_step_set_after_a_step_is_rejected():
    ps, opt = _stepped([(16, 40)], lr=None, relative_step=True)
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match="exclusive"):
        opt.step()


def test_hyper_parameter_edits_after_a_step_are_checked():
    ps, opt = _stepped([(16, 40)])
    group = opt.param_groups[0]
    group["kappa"] = 0
    with pytest.raises(ValueError, match="kappa must be"):
        opt.step()
    group["kappa"] = 1000
    group["eps"] = [1e-30, 1e-3]
    opt.step()
    before = _snapshot(ps, opt)
    group["eps"][0] = -1.0  # in place: the list is the same object
    with pytest.raises(ValueError, match="eps must be a pair"):
        opt.step()
    _assert_unchanged(ps, opt, before)


@pytest.mark.parametrize("name,shape", [("momentum", (5, 40)), ("row_second_moment", (15,)),
                                        ("col_second_moment", (4, 40))])
def test_state_tensor_replaced_after_a_step_is_checked(name, shape):
    ps, opt = _stepped([(16, 40), (37,)])
    before = _snapshot(ps, opt)
    original, opt.state[ps[0]][name] = opt.state[ps[0]][name], torch.zeros(shape)
    with pytest.raises(ValueError, match=f"{name} .* must have shape"):
        opt.step()
    opt.state[ps[0]][name] = original
    _assert_unchanged(ps, opt, before)


def test_state_tensor_replaced_after_a_step_is_the_one_stepped():
    ps, opt = _stepped([(16, 40), (37,)])
    old = opt.state[ps[0]]["momentum"]
    old_value = old.clone()
    new = torch.zeros_like(old)
    opt.state[ps[0]]["momentum"] = new
    opt.step()
    assert torch.equal(old, old_value) and new.abs().sum() > 0


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(step=-1), "step must be an int"),
    (lambda s: s.update(step=1.0), "step must be an int"),
    (lambda s: s.update(seed=-3), "seed must be"),
    (lambda s: s.update(extra=s.pop("seed")), "has keys"),
    (lambda s: s.pop("momentum"), "has keys"),
], ids=["negative-step", "float-step", "negative-seed", "renamed-key", "removed-key"])
def test_state_edits_after_a_step_are_checked(edit, match):
    ps, opt = _stepped([(16, 40), (37,)])
    before = _snapshot(ps, opt)
    edit(opt.state[ps[0]])
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before[0]))
    assert opt.state[ps[1]]["step"] == 1


def test_state_reset_after_a_step_starts_over():
    ps, opt = _stepped([(16, 40), (37,)])
    opt.state[ps[0]] = {}
    del opt.state[ps[1]]
    opt.step()
    assert opt.state[ps[0]]["step"] == opt.state[ps[1]]["step"] == 1


def test_parameter_or_gradient_changed_after_a_step_is_checked():
    ps, opt = _stepped([(16, 40), (37,)])
    before = _snapshot(ps, opt)
    ps[1].grad.data = ps[1].grad.data.double()  # in place: p.grad is the same tensor
    with pytest.raises(TypeError, match="grad dtype"):
        opt.step()
    _assert_unchanged(ps, opt, before)
    ps[1].grad = torch.randn_like(ps[1])
    ps[0].data = torch.randn(12, 40)  # as Module surgery does
    ps[0].grad = torch.randn(12, 40)
    with pytest.raises(ValueError, match=r"row_second_moment .* must have shape \(12,\)"):
        opt.step()
    assert torch.equal(ps[1], before[0][1])


def test_bad_gradient_in_a_later_group_rejects_the_whole_step():
    # The first group's op call checks its own tensors; a later group's are checked in
    # Python before the first call writes anything.
    a, b = torch.nn.Parameter(torch.randn(16, 40)), torch.nn.Parameter(torch.randn(10, 4))
    opt = flora_ext.Flora([{"params": [a]}, {"params": [b]}], lr=1e-2, beta1=0.9, rank=4)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    before = _snapshot([a, b], opt)
    b.grad = torch.randn_like(b).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    _assert_unchanged([a, b], opt, before)
    b.grad = torch.randn_like(b)
    a.grad.data = a.grad.data.double()  # in place: the first group's op call refuses it
    with pytest.raises(TypeError, match="grad dtype"):
        opt.step()
    _assert_unchanged([a, b], opt, before)


def test_state_made_non_contiguous_in_place_is_refused_and_changes_nothing():
    ps, opt = _stepped([(16, 40), (37,)])
    before = _snapshot(ps, opt)
    col = opt.state[ps[0]]["col_second_moment"]
    col.data = torch.stack([col.data, col.data], 1)[:, 0]  # same tensor, now strided
    with pytest.raises((RuntimeError, ValueError), match="col_second_moment must be contiguous"):
        opt.step()
    _assert_unchanged(ps, opt, before)


def test_removed_group_drops_its_plan():
    a, b = torch.nn.Parameter(torch.randn(16, 40)), torch.nn.Parameter(torch.randn(37))
    opt = flora_ext.Flora([{"params": [a]}, {"params": [b]}], lr=1e-2, beta1=0.9, rank=4)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    del opt.param_groups[1]
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
    assert len(opt._plans) == 1


def test_state_dict_replaced_by_a_copy_after_a_step_is_the_one_stepped():
    ps, opt = _stepped([(16, 40)])
    old = opt.state[ps[0]]
    opt.state[ps[0]] = dict(old)  # the very same values, in another dict
    opt.step()
    assert opt.state[ps[0]]["step"] == 2 and old["step"] == 1


def test_copied_optimizer_steps_its_own_state():
    ps, opt = _stepped([(16, 40)])
    clone = copy.deepcopy(opt)
    (q,) = clone.param_groups[0]["params"]
    q.grad = torch.randn_like(q)
    clone.step()  # steps the copy's parameter and state, not opt's
    assert opt.state[ps[0]]["step"] == 1 and clone.state[q]["step"] == 2
    opt.step()
    assert opt.state[ps[0]]["step"] == 2


def test_reuse_param_norms_must_be_a_bool():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(TypeError, match="reuse_param_norms must be a bool, got 1"):
        flora_ext.Flora([p], lr=1e-2, reuse_param_norms=1)
    assert flora_ext.Flora([p], lr=1e-2, reuse_param_norms=False).reuse_param_norms is False


# Per-group lr, int64 bounds, tensor lr, eps1 (issue 29).

def test_lr_may_be_given_by_every_param_group_instead_of_the_constructor():
    """As torch.optim and flora-opt: no global lr when each group has its own."""
    torch.manual_seed(0)
    a0, b0 = torch.randn(6, 8), torch.randn(8)
    grads = [(torch.randn(6, 8), torch.randn(8)) for _ in range(3)]

    def run(make):
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        opt = make(a, b)
        for ga, gb in grads:
            a.grad, b.grad = ga.clone(), gb.clone()
            opt.step()
        return a, b, opt

    *per_group, opt = run(lambda a, b: flora_ext.Flora(
        [{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-2}], beta1=0.9, rank=2))
    *shared, _ = run(lambda a, b: flora_ext.Flora([a, b], lr=1e-2, beta1=0.9, rank=2))
    assert opt.defaults["lr"] is None
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]
    assert all(torch.equal(p, q) for p, q in zip(per_group, shared))
    # relative_step in a group needs no lr either
    c = torch.nn.Parameter(torch.randn(4))
    opt = flora_ext.Flora([{"params": [c], "relative_step": True}])
    c.grad = torch.ones(4)
    opt.step()
    assert opt.state[c]["step"] == 1


def test_a_param_group_without_any_lr_is_named_and_nothing_changes():
    a, b = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(8))
    before = [a.detach().clone(), b.detach().clone()]
    message = (r"^flora: lr is required unless relative_step=True; param group 1 has none "
               r"\(give it an 'lr', or pass lr to Flora\)$")
    with pytest.raises(ValueError, match=message):
        flora_ext.Flora([{"params": [a], "lr": 1e-2}, {"params": [b]}])
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert a.grad is None and b.grad is None
    with pytest.raises(ValueError, match="param group 0 has none"):
        flora_ext.Flora([a])
    # The other arguments are still checked when lr is left to the groups.
    with pytest.raises(ValueError, match="kappa must be"):
        flora_ext.Flora([{"params": [a], "lr": 1e-2}], kappa=0)
    # ... and a group added later gets the same error and is not added.
    opt = flora_ext.Flora([{"params": [a], "lr": 1e-2}])
    a.grad = torch.randn(6, 8)
    opt.step()
    snapshot, groups = _snapshot([a], opt), list(opt.param_groups)
    with pytest.raises(ValueError, match="param group 1 has none"):
        opt.add_param_group({"params": [b]})
    assert opt.param_groups == groups
    _assert_unchanged([a], opt, snapshot)
    opt.add_param_group({"params": [b], "lr": 1e-3})
    assert opt.param_groups[1]["lr"] == 1e-3


@pytest.mark.parametrize("name,value", [("kappa", 2**63), ("rank", 2**63), ("kappa", 2**64),
                                        ("rank", -(2**63) - 1)])
def test_int_beyond_int64_set_after_a_step_is_rejected_before_any_write(name, value):
    """Such a value used to reach the op and fail in the dispatcher, kappa after the
    state was made: now the check names it, and nothing changes."""
    ps, opt = _stepped([(16, 40), (37,)], beta1=0.9, rank=4)
    before = _snapshot(ps, opt)
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=rf"^flora: {name} must be .*2\*\*63 - 1\], got {value}$"):
        opt.step()
    _assert_unchanged(ps, opt, before)
    # before the first step: no state is made
    p = torch.nn.Parameter(torch.randn(16, 40))
    opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, rank=4)
    opt.param_groups[0][name] = value
    p.grad = torch.randn(16, 40)
    p0 = p.detach().clone()
    with pytest.raises(ValueError, match=f"{name} must be"):
        opt.step()
    assert torch.equal(p, p0) and not opt.state.get(p)


def test_largest_int64_kappa_and_rank_step():
    """The bound is the op's: 2**63 - 1 reaches the kernels (rank beyond the shape: dense)."""
    p = torch.nn.Parameter(torch.randn(16, 40))
    opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, kappa=2**63 - 1, rank=2**63 - 1)
    for _ in range(2):
        p.grad = torch.randn(16, 40)
        opt.step()
    assert opt.state[p]["momentum"].shape == (16, 40) and torch.isfinite(p).all()
    q = torch.nn.Parameter(torch.randn(16, 40))
    opt = flora_ext.Flora([q], lr=1e-2, beta1=0.9, kappa=2**63 - 1, rank=4)
    for _ in range(2):
        q.grad = torch.randn(16, 40)
        opt.step()
    assert opt.state[q]["seed"] == 1 and opt.state[q]["step"] == 2  # never resampled


def test_tensor_lr_in_a_param_group_is_refused_like_torch_optim():
    p = torch.nn.Parameter(torch.randn(6, 8))
    with pytest.raises(ValueError, match="lr as a Tensor needs capturable=True"):
        flora_ext.Flora([{"params": [p], "lr": torch.tensor(1e-2)}])
    assert not flora_ext.Flora([p], lr=1e-2).state  # the refused optimizer left nothing


@pytest.mark.parametrize("factorize,shape", [(True, (6, 8)), (False, (6, 8)), (True, (7,))])
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_smallest_eps1_keeps_a_zero_gradient_row_finite(factorize, shape, flush_denormal):
    """eps1 = 0 (or one float32 loses) gives 0 / 0 on a zero gradient row: refused. The
    smallest accepted eps1 keeps it finite even with denormals flushed to zero."""
    from flora_ext.hyperparams import MIN_EPS1
    p = torch.nn.Parameter(torch.randn(shape))
    for eps1 in (0.0, MIN_EPS1 / 2):
        with pytest.raises(ValueError, match="eps must be a pair"):
            flora_ext.Flora([p], lr=1e-2, eps=(eps1, 1e-3))
    opt = flora_ext.Flora([p], lr=1e-2, eps=(MIN_EPS1, 1e-3), beta1=0.9,
                          factorize_second_moment=factorize)
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for _ in range(3):
            grad = torch.randn(shape)
            grad[0] = 0.0  # a zero row (2-D) or element (1-D)
            p.grad = grad
            opt.step()
    finally:
        torch.set_flush_denormal(False)  # torch's default
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(t).all() for t in opt.state[p].values()
               if isinstance(t, torch.Tensor))


# --- torch.distributed.checkpoint's state-creating step (flora_ext/_dcp.py) ----------------
RELATIVE = dict(lr=None, relative_step=True)


def _dcp_fresh(params0, **kw):
    """A module holding copies of ``params0`` and a fresh Flora over them (two groups)."""
    model = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in params0])
    ps = list(model)
    opt = flora_ext.Flora([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.1}],
                          beta1=0.9, rank=4, kappa=1, **{**BASE, **kw})
    return model, ps, opt


@pytest.mark.parametrize("kw", [RELATIVE, {}], ids=["relative_step", "lr"])
def test_dcp_state_dict_of_a_fresh_optimizer_changes_nothing(kw):
    """get_optimizer_state_dict on a fresh optimizer steps it with zero gradients and lr 0
    to create state: that call makes the state a first step makes and nothing else (no
    parameter moves, the step count stays 0 and the seeds stay: kappa=1 would resample)."""
    dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    params0, grads = make_run("cpu")
    _, ref, ref_opt = _dcp_fresh(params0, **kw)
    run_steps(ref, ref_opt, grads)

    model, ps, opt = _dcp_fresh(params0, **kw)
    saved = dcp_state.get_optimizer_state_dict(model, opt)
    assert all(torch.equal(p, p0) for p, p0 in zip(ps, params0))
    assert all(p.grad is None for p in ps)
    assert [g["lr"] for g in opt.param_groups] == [kw.get("lr", BASE["lr"])] * 2
    assert sorted(saved["state"]) == ["0", "1", "2", "3"]
    for k, p in enumerate(ps):
        state = opt.state[p]
        assert state["step"] == 0
        assert state.get("seed") in (None, opt.defaults["seed"] + k + 1)
        assert all(not t.any() for t in state.values() if isinstance(t, torch.Tensor))
    run_steps(ps, opt, grads)
    for a, b in zip(ps, ref):
        assert torch.equal(a, b)


def test_dcp_resume_with_relative_step_equals_an_uninterrupted_run():
    dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    params0, grads = make_run("cpu")
    _, ref, ref_opt = _dcp_fresh(params0, **RELATIVE)
    run_steps(ref, ref_opt, grads)

    model, ps, opt = _dcp_fresh(params0, **RELATIVE)
    run_steps(ps, opt, grads[:4])
    saved = copy.deepcopy(dcp_state.get_optimizer_state_dict(model, opt))
    model2, resumed, opt2 = _dcp_fresh([p.detach() for p in ps], **RELATIVE)
    dcp_state.set_optimizer_state_dict(model2, opt2, saved)
    assert [opt2.state[p]["step"] for p in resumed] == [4] * 4
    run_steps(resumed, opt2, grads[4:])
    for a, b in zip(resumed, ref):
        assert torch.equal(a, b)


def test_a_first_step_with_lr_0_and_real_gradients_still_counts():
    """Only the all-zero-gradient form is taken for the checkpoint's call: a warm-up that
    starts at lr 0 steps (updates the statistics, counts step 1) as before."""
    params0, grads = make_run("cpu")
    _, ps, opt = _dcp_fresh(params0, lr=0.0)
    run_steps(ps, opt, grads[:1])
    assert all(opt.state[p]["step"] == 1 for p in ps)
    assert all(torch.equal(p, p0) for p, p0 in zip(ps, params0))
    assert opt.state[ps[0]]["row_second_moment"].any()
    # a zero sparse gradient is not the checkpoint's call either: the step's check reports it
    _, ps, opt = _dcp_fresh(params0, lr=0.0)
    for p in ps:
        p.grad = torch.zeros_like(p).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step()
    assert not any(opt.state.values())
