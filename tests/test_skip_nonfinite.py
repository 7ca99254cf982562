"""skip_nonfinite=True (docs/FLORA.md §4.8): a parameter whose gradient holds a NaN or inf
keeps its value and state on that step (its step count advances; compressed momentum moves
to the next basis on a resampling step, with nothing added), the other parameters step as
without it, and opt.nonfinite_skips counts the skipped parameter-steps on the device.

CPU against the float64 reference (tests/reference.py), CUDA against CPU (on the GPU)."""
import pytest
import torch

import reference as ref
import flora_ext
from conftest import DEVICES, rel_err, requires_cuda

# name: (shape, hyper-parameters): every layout, and on CUDA the row-stats and tile
# passes, fused (TF32) and unfused (exact) compressed momentum. kappa=2: the poisoned
# second step is a resampling step.
KINDS = {
    "1-D": ((50,), dict()),
    "1-D dense momentum": ((50,), dict(beta1=0.9)),
    "N-D": ((4, 6, 5), dict()),
    "unfactored 2-D": ((16, 24), dict(factorize_second_moment=False)),
    "unfactored 2-D dense momentum": ((16, 24), dict(factorize_second_moment=False, beta1=0.9)),
    "factored 2-D": ((16, 24), dict()),
    "factored 2-D wide rows": ((8, 1024), dict()),
    "factored 2-D dense momentum": ((16, 24), dict(beta1=0.9)),
    "compressed left": ((64, 96), dict(beta1=0.9, rank=8, kappa=2)),
    "compressed left exact": ((64, 96), dict(beta1=0.9, rank=8, kappa=2, tf32=False)),
    "compressed right": ((96, 64), dict(beta1=0.9, rank=8, kappa=2)),
    "compressed right exact": ((96, 64), dict(beta1=0.9, rank=8, kappa=2, tf32=False)),
    "compressed kappa 3": ((64, 96), dict(beta1=0.9, rank=8, kappa=3)),
}
POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
CLEAN_SHAPE = (12, 20)  # the other parameter, stepped in the same call
STEPS = 4
POISONED_STEP = 1  # 0-based: the second step


def make_inputs(shape, poison=float("nan"), poisoned_steps=(POISONED_STEP,)):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen), torch.randn(CLEAN_SHAPE, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(STEPS)]
    for k in poisoned_steps:
        grads[k][0].view(-1)[7] = poison
    return params, grads


def snapshot(opt, p):
    state = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
             for k, v in opt.state[p].items()}
    return p.detach().cpu().clone(), state


def run_extension(params, grads, hp, device, skip=True, dtype=torch.float32):
    ps = [torch.nn.Parameter(x.clone().to(device=device, dtype=dtype)) for x in params]
    opt = flora_ext.Flora(ps, lr=1e-2, skip_nonfinite=skip, **hp)
    history = []  # after each step: (param, state) of every parameter
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
        history.append([snapshot(opt, p) for p in ps])
    return opt, history


def run_reference(params, grads, hp):
    full = ref.full_hp(lr=1e-2, **{k: v for k, v in hp.items() if k != "tf32"})
    states = [ref.init_state(x, full, ref.param_seed(0, k + 1)) for k, x in enumerate(params)]
    ps = [x.double() for x in params]
    history = []
    for step_grads in grads:
        ps = [ref.reference_step(p, g.double(), s, full, skip_nonfinite=True)
              for p, g, s in zip(ps, step_grads, states)]
        history.append([(p.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                     for k, v in s.items()}) for p, s in zip(ps, states)])
    return history


def assert_state_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}: {key} changed"
        else:
            assert a[key] == b[key], f"{what}: {key} {a[key]} != {b[key]}"


def check_skipped(history, hp, shape):
    """The poisoned parameter's value and state are those of the step before, but for the
    step count and, on a resampling step, the compressed momentum and its seed."""
    (p_before, s_before), (p_after, s_after) = history[POISONED_STEP - 1][0], \
        history[POISONED_STEP][0]
    assert torch.equal(p_after, p_before), "the skipped parameter changed"
    assert s_after["step"] == s_before["step"] + 1, "the step count did not advance"
    lay = ref.layout(shape, hp.get("rank"), hp.get("beta1"),
                     hp.get("factorize_second_moment", True))
    resample = lay["momentum"] == "compressed" and s_after["step"] % hp["kappa"] == 0
    keep = {k: v for k, v in s_before.items() if k != "step" and
            not (resample and k in ("momentum", "seed"))}
    assert_state_equal({k: s_after[k] for k in keep}, keep, "skipped parameter's state")
    if resample:
        assert s_after["seed"] == ref.next_seed(s_before["seed"])
        assert not torch.equal(s_after["momentum"], s_before["momentum"]), \
            "the momentum was not moved to the next basis"
        assert torch.isfinite(s_after["momentum"]).all()
    return resample


@pytest.mark.parametrize("poison", list(POISON), ids=list(POISON))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_cpu_skips_the_parameter_and_matches_the_reference(kind, poison):
    shape, hp = KINDS[kind]
    params, grads = make_inputs(shape, POISON[poison])
    opt, history = run_extension(params, grads, hp, "cpu")
    check_skipped(history, hp, shape)
    assert opt.nonfinite_skips.dtype == torch.int64
    assert opt.nonfinite_skips.item() == 1
    expected = run_reference(params, grads, hp)
    for got, want in zip(history, expected):
        for (p, s), (p_ref, s_ref) in zip(got, want):
            assert torch.isfinite(p).all()
            assert rel_err(p, p_ref) <= 1e-5
            assert s["step"] == s_ref["step"] and s.get("seed") == s_ref.get("seed")
            for key, value in s.items():
                if isinstance(value, torch.Tensor):
                    assert rel_err(value, s_ref[key]) <= 1e-5, key


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_cpu_other_parameters_step_bitwise_as_without_the_option(kind):
    shape, hp = KINDS[kind]
    params, grads = make_inputs(shape)
    _, skipped = run_extension(params, grads, hp, "cpu")
    # The same run without the option, the poisoned parameter finite: the other parameter
    # (the same seed offset, its own state) must step bitwise the same.
    clean = [[g.nan_to_num(0.0, 0.0, 0.0) for g in step_grads] for step_grads in grads]
    _, plain = run_extension(params, clean, hp, "cpu", skip=False)
    for k in range(STEPS):
        assert torch.equal(skipped[k][1][0], plain[k][1][0]), f"step {k + 1}"
        assert_state_equal(skipped[k][1][1], plain[k][1][1], f"step {k + 1}")
    # Before the poisoned step both runs are one (the option changes no finite step).
    assert torch.equal(skipped[0][0][0], plain[0][0][0])


def test_finite_gradients_step_bitwise_as_without_the_option():
    params, grads = make_inputs((64, 96), poisoned_steps=())
    hp = dict(beta1=0.9, rank=8, kappa=2)
    opt, on = run_extension(params, grads, hp, "cpu")
    _, off = run_extension(params, grads, hp, "cpu", skip=False)
    for a, b in zip(on, off):
        for (pa, sa), (pb, sb) in zip(a, b):
            assert torch.equal(pa, pb)
            assert_state_equal(sa, sb, "state")
    assert opt.nonfinite_skips.item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_the_counter_counts_every_skipped_parameter_step(device):
    params, grads = make_inputs((16, 24), poisoned_steps=(1, 3))
    grads[2][1].view(-1)[0] = float("inf")  # the other parameter, once
    opt, _ = run_extension(params, grads, dict(beta1=0.9), device)
    skips = opt.nonfinite_skips
    assert skips.device.type == device and skips.dtype == torch.int64 and skips.dim() == 0
    assert skips.item() == 3
    # A copy: reading it changes nothing, and it does not follow later steps.
    skips += 5
    assert opt.nonfinite_skips.item() == 3


def test_without_the_option_no_counter_is_made_and_nan_propagates():
    params, grads = make_inputs((16, 24))
    opt, history = run_extension(params, grads, {}, "cpu", skip=False)
    assert opt._nonfinite_skips == {}
    assert opt.nonfinite_skips.item() == 0
    assert torch.isnan(history[POISONED_STEP][0][0]).all()


def test_the_counter_survives_copies_but_not_state_dict():
    import copy
    params, grads = make_inputs((16, 24))
    opt, _ = run_extension(params, grads, {}, "cpu")
    assert copy.deepcopy(opt).nonfinite_skips.item() == 1
    fresh = flora_ext.Flora([torch.nn.Parameter(x.clone()) for x in params], lr=1e-2,
                            skip_nonfinite=True)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["skip_nonfinite"] is True
    assert fresh.nonfinite_skips.item() == 0


def test_step_param_and_a_group_without_the_option():
    params, grads = make_inputs((16, 24))
    a, b = (torch.nn.Parameter(x.clone()) for x in params)
    opt = flora_ext.Flora([{"params": [a]}, {"params": [b], "skip_nonfinite": False}],
                          lr=1e-2, skip_nonfinite=True)
    before = a.detach().clone()
    opt.step_param(a, grads[1][0])  # poisoned: skipped
    assert torch.equal(a.detach(), before) and opt.state[a]["step"] == 1
    b.grad = grads[1][1].clone()
    b.grad.view(-1)[0] = float("nan")
    opt.step()  # b's group does not skip: NaN as without the option
    assert torch.isnan(b.detach()).all()
    assert opt.nonfinite_skips.item() == 1


def test_compiled_step_skips_as_the_eager_one():
    params, grads = make_inputs((64, 96))
    hp = dict(beta1=0.9, rank=8, kappa=2)
    _, eager = run_extension(params, grads, hp, "cpu")
    ps = [torch.nn.Parameter(x.clone()) for x in params]
    opt = flora_ext.Flora(ps, lr=1e-2, skip_nonfinite=True, **hp)
    step = torch.compile(opt.step, fullgraph=True)
    for k, step_grads in enumerate(grads):
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        step()
        for (pe, se), p in zip(eager[k], ps):
            assert torch.equal(p.detach(), pe)
            assert_state_equal(snapshot(opt, p)[1], se, f"step {k + 1}")
    assert opt.nonfinite_skips.item() == 1


@pytest.mark.parametrize("rank", [None, 2], ids=["dense", "compressed"])
def test_accumulator_skips_the_cycle_of_a_parameter_with_a_non_finite_micro_batch(rank):
    """A NaN in any micro-batch gradient reaches the cycle's summed gradient (compressed or
    dense), so that cycle's step of the parameter is skipped; the next cycle steps. A NaN
    input element reaches the weights' gradients, not the biases' (their gradients do not
    read the input)."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt = flora_ext.Flora([*a.parameters(), *b.parameters()], lr=1e-2, skip_nonfinite=True)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=rank)
    x = torch.randn(4, 8)
    b(a(x)).sum().backward()  # cycle 1: every parameter steps
    b(a(x)).sum().backward()
    before = [p.detach().clone() for p in (a.weight, a.bias, b.weight, b.bias)]
    poisoned = x.clone()
    poisoned[0, 0] = float("nan")
    b(a(poisoned)).sum().backward()  # cycle 2: a NaN micro-batch reaches every parameter
    b(a(x)).sum().backward()
    after = [p.detach().clone() for p in (a.weight, a.bias, b.weight, b.bias)]
    assert [torch.equal(u, v) for u, v in zip(before, after)] == [True, False, True, False]
    assert all(torch.isfinite(p).all() for p in after)
    assert opt.nonfinite_skips.item() == 2
    assert all(opt.state[p]["step"] == 2 for p in (a.weight, a.bias, b.weight, b.bias))
    b(a(x)).sum().backward()  # cycle 3 steps again
    b(a(x)).sum().backward()
    assert all(torch.isfinite(p).all() for p in (a.weight, a.bias, b.weight, b.bias))
    assert not torch.equal(a.weight.detach(), after[0])
    assert opt.nonfinite_skips.item() == 2
    acc.remove()


# ------------------------------------------------------------------ CUDA against CPU

CUDA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@requires_cuda
@pytest.mark.parametrize("dtype", list(CUDA_DTYPES))
@pytest.mark.parametrize("poison", list(POISON), ids=list(POISON))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_cuda_skips_as_the_cpu_does(kind, poison, dtype):
    shape, hp = KINDS[kind]
    dtype = CUDA_DTYPES[dtype]
    params, grads = make_inputs(shape, POISON[poison])
    opt, gpu = run_extension(params, grads, hp, "cuda", dtype=dtype)
    _, cpu = run_extension(params, grads, hp, "cpu", dtype=dtype)
    check_skipped(gpu, hp, shape)
    assert opt.nonfinite_skips.item() == 1
    fused = hp.get("tf32", True) and "rank" in hp
    tol = (2e-2 if fused else 1e-5) if dtype == torch.float32 else 2e-2
    for k, (a, b) in enumerate(zip(gpu, cpu)):
        for (pa, sa), (pb, sb) in zip(a, b):
            assert torch.isfinite(pa.float()).all(), f"step {k + 1}"
            assert rel_err(pa.float(), pb.float()) <= tol, f"step {k + 1}"
            assert sa["step"] == sb["step"] and sa.get("seed") == sb.get("seed")
            for key, value in sa.items():
                if isinstance(value, torch.Tensor):
                    assert rel_err(value, sb[key]) <= (2e-2 if fused else 1e-4), \
                        (f"step {k + 1}", key)


@requires_cuda
@pytest.mark.parametrize("tf32", [True, False], ids=["fused", "unfused"])
def test_cuda_many_tensors_in_one_call_skip_only_the_poisoned(tf32):
    """Many tensors of every layout in one call (one batch, one launch a pass): only the
    poisoned ones are skipped, the others match a run without the option in which the
    poisoned ones get finite gradients instead. Both runs plan the same tasks: a run that
    leaves tensors out plans other shape groups, whose TF32 GEMMs round differently."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(64, 96), (96, 64), (16, 24), (8, 1024), (50,), (4, 6, 5), (128, 128)] * 3
    params = [torch.randn(s, generator=gen) for s in shapes]
    poisoned = {0, 3, 4, 8, 13, 20}
    hp = dict(beta1=0.9, rank=8, kappa=2, tf32=tf32)
    runs = {}
    for skip in (True, False):
        ps = [torch.nn.Parameter(x.clone().cuda()) for x in params]
        opt = flora_ext.Flora(ps, lr=1e-2, skip_nonfinite=skip, **hp)
        g2 = torch.Generator().manual_seed(2)
        for step in range(4):
            for k, p in enumerate(ps):
                g = torch.randn(p.shape, generator=g2)
                if k in poisoned and step in (1, 2) and skip:
                    g.view(-1)[k] = float("nan")
                p.grad = g.cuda()
            opt.step()
        runs[skip] = (opt, [p.detach().cpu() for p in ps])
    opt, skipped = runs[True]
    _, plain = runs[False]
    assert opt.nonfinite_skips.item() == 2 * len(poisoned)
    for k in range(len(shapes)):
        assert torch.isfinite(skipped[k]).all(), k
        if k not in poisoned:
            assert rel_err(skipped[k], plain[k]) <= 1e-6, k


@requires_cuda
def test_cuda_op_refuses_a_counter_on_the_host():
    p, grad = torch.randn(4, 6, device="cuda"), torch.randn(4, 6, device="cuda")
    grad[0, 0] = float("nan")
    states = [torch.zeros(4, device="cuda"), torch.zeros(6, device="cuda")]
    before = [p.clone(), *(t.clone() for t in states)]
    counter = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="nonfinite_skips must be on the parameters' device"):
        torch.ops.flora.step_group_(
            [p], [grad], states, [1], [0], lr=1e-2, beta1=0.0, eps1=1e-30, eps2=1e-3,
            clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, rank=0, kappa=1,
            scale_parameter=True, relative_step=False, warmup_init=False,
            factorize_second_moment=True, skip_nonfinite=True, nonfinite_skips=counter)
    assert all(torch.equal(a, b) for a, b in zip(before, [p, *states]))
    assert counter.item() == 0


@requires_cuda
def test_cuda_skip_needs_no_host_sync():
    params, grads = make_inputs((64, 96), poisoned_steps=(2,))
    ps = [torch.nn.Parameter(x.cuda()) for x in params]
    opt = flora_ext.Flora(ps, lr=1e-2, beta1=0.9, rank=8, kappa=3, skip_nonfinite=True)
    for k, step_grads in enumerate(grads):
        for p, g in zip(ps, step_grads):
            p.grad = g.cuda()
        if k == 0:
            opt.step()  # the first step makes the state and the counter
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            skips = opt.nonfinite_skips
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert skips.item() == 1


@requires_cuda
def test_cuda_param_norm_cache_is_not_written_by_a_skip():
    """A skipped parameter keeps its sum(p^2) in the norm cache: the next step's step size
    is that of the unchanged parameter (as with reuse_param_norms=False)."""
    params, grads = make_inputs((16, 24))
    results = []
    for reuse in (True, False):
        ps = [torch.nn.Parameter(x.clone().cuda()) for x in params]
        opt = flora_ext.Flora(ps, lr=1e-2, skip_nonfinite=True, reuse_param_norms=reuse)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.cuda()
            opt.step()
        results.append([p.detach().cpu() for p in ps])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ FSDP2: refused


def _fsdp2_refusal_worker(rank, world_size):
    from test_fsdp import sharded_model

    model = sharded_model(world_size, torch.float32, torch.device("cpu"))
    messages = []
    try:
        flora_ext.Flora(model.parameters(), lr=1e-2, skip_nonfinite=True)
    except ValueError as err:
        messages.append(str(err))
    opt = flora_ext.Flora(model.parameters(), lr=1e-2)
    opt.param_groups[0]["skip_nonfinite"] = True
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    try:
        opt.step()
    except ValueError as err:
        messages.append(str(err))
    unchanged = all(torch.equal(p.detach().full_tensor(), b)
                    for p, b in zip(model.parameters(), before))
    return messages, unchanged


def test_fsdp2_groups_refuse_the_option():
    from dist_utils import spawn_workers

    (messages, unchanged), = spawn_workers(_fsdp2_refusal_worker, nprocs=1, args=(),
                                           timeout_s=120)
    assert len(messages) == 2
    assert all(m.startswith("flora: skip_nonfinite=True is not supported for FSDP2")
               for m in messages)
    assert unchanged
