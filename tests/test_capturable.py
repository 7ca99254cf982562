"""capturable=True: step counts and seeds in device tensors, the CUDA step captured in a CUDA
graph and replayed (docs/cuda.md, "CUDA graphs").

On CPU the flag only moves the counters into tensors: every step is bitwise the plain one's,
and state_dicts load across the two. On CUDA a replayed graph is bitwise the eager
capturable step, and within float32 rounding the plain step (beta2 = 1 - t**decay_rate comes
from CUDA's pow instead of the host's, which may differ in the last bit).
"""
import copy

import pytest
import torch

import flora_ext
from conftest import DEVICES, requires_cuda, set_grads, warm_up_and_capture

KAPPA = 3
STEPS = 3 * KAPPA - 1  # resamples at steps 3 and 6


def groups_of(params, lr=1e-2):
    """Compressed, dense and no momentum, bfloat16 with stochastic rounding, relative_step."""
    w1, w2, b1, w3, b3, w4 = params
    return [
        {"params": [w1, w2, b1], "beta1": 0.9, "rank": 8, "lr": lr},
        {"params": [w3, b3], "beta1": None, "stochastic_rounding": True, "weight_decay": 0.01},
        {"params": [w4], "beta1": 0.5, "rank": 8, "relative_step": True, "lr": None},
    ]


def make_params(device):
    torch.manual_seed(0)
    shapes = [((64, 96), torch.float32), ((128, 64), torch.float32), ((64,), torch.float32),
              ((48, 40), torch.bfloat16), ((40,), torch.bfloat16), ((32, 64), torch.float32)]
    return [torch.nn.Parameter(torch.randn(shape, device=device).to(dtype))
            for shape, dtype in shapes]


def make(device, capturable, lr=1e-2, **kwargs):
    params = make_params(device)
    return params, flora_ext.Flora(groups_of(params, lr), lr=1e-3, kappa=KAPPA,
                                   capturable=capturable, **kwargs)


def gradients(params, steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=generator).to(p.dtype).to(p.device) for p in params]
            for _ in range(steps)]


def assert_same_run(params_a, opt_a, params_b, opt_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                assert torch.equal(va.cpu(), vb.cpu()), key
            else:
                assert int(va) == int(vb), key


def test_state_holds_the_counters_in_int64_tensors():
    params, opt = make("cpu", True)
    set_grads(params, gradients(params, 1)[0])
    opt.step()
    for p in params:
        state = opt.state[p]
        step = state["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.dim() == 0
        assert int(step) == 1
        if "momentum" in state and state["momentum"].shape != p.shape:
            seed = state["seed"]
            assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64
    assert opt.param_groups[0]["capturable"] is True


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_cpu_capturable_steps_bitwise_as_plain_ones(tensor_lr):
    params_a, opt_a = make("cpu", False)
    # float64: the very lr of the float (a float32 tensor would round it)
    params_b, opt_b = make("cpu", True,
                           lr=torch.tensor(1e-2, dtype=torch.float64) if tensor_lr else 1e-2)
    for k, grads in enumerate(gradients(params_a)):
        if k == 4:  # an lr change, as a scheduler makes it
            opt_a.param_groups[0]["lr"] = 5e-3
            if tensor_lr:
                opt_b.param_groups[0]["lr"].fill_(5e-3)
            else:
                opt_b.param_groups[0]["lr"] = 5e-3
        set_grads(params_a, grads)
        set_grads(params_b, grads)
        opt_a.step()
        opt_b.step()
        assert_same_run(params_a, opt_a, params_b, opt_b)


def test_cpu_step_param_with_capturable():
    params_a, opt_a = make("cpu", False)
    params_b, opt_b = make("cpu", True)
    for grads in gradients(params_a, 4):
        for pa, pb, g in zip(params_a, params_b, grads):
            opt_a.step_param(pa, g)
            opt_b.step_param(pb, g)
    assert_same_run(params_a, opt_a, params_b, opt_b)


def test_cpu_accumulator_steps_capturable_groups_as_plain_ones():
    """FloraAccumulator steps each parameter alone (step_param) in its backward hook."""
    def run(capturable):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 8))
        opt = flora_ext.Flora(net.parameters(), lr=1e-2, rank=4, beta1=0.9, kappa=2,
                              capturable=capturable)
        flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
        generator = torch.Generator().manual_seed(1)
        for k in range(12):
            (net(torch.randn(4, 16, generator=generator)).pow(2).mean() / 2).backward()
            if k % 2:
                opt.step()
        return list(net.parameters()), opt

    params_a, opt_a = run(False)
    params_b, opt_b = run(True)
    assert_same_run(params_a, opt_a, params_b, opt_b)
    assert int(opt_b.state[params_b[0]]["step"]) == 6


@pytest.mark.parametrize("first,second", [(True, False), (False, True)])
def test_state_dict_round_trip_across_capturable(first, second):
    """Saved by one, loaded into the other: the run goes on bitwise as if uninterrupted."""
    grads = gradients(make_params("cpu"))
    params_ref, opt_ref = make("cpu", False)
    params_a, opt_a = make("cpu", first)
    for g in grads[:4]:
        for params, opt in ((params_ref, opt_ref), (params_a, opt_a)):
            set_grads(params, g)
            opt.step()
    saved = copy.deepcopy(opt_a.state_dict())
    params_b, opt_b = make("cpu", second)
    with torch.no_grad():
        for pa, pb in zip(params_a, params_b):
            pb.copy_(pa)
    opt_b.load_state_dict(saved)
    assert all(g["capturable"] is second for g in opt_b.param_groups)
    for p in params_b:
        assert isinstance(opt_b.state[p]["step"], torch.Tensor) is second
    for g in grads[4:]:
        for params, opt in ((params_ref, opt_ref), (params_b, opt_b)):
            set_grads(params, g)
            opt.step()
    assert_same_run(params_ref, opt_ref, params_b, opt_b)


def test_tensor_lr_of_a_capturable_state_dict_loads_as_a_float():
    params, opt = make("cpu", True, lr=torch.tensor(2e-2))
    set_grads(params, gradients(params, 1)[0])
    opt.step()
    _, plain = make("cpu", False)
    plain.load_state_dict(opt.state_dict())
    assert plain.param_groups[0]["lr"] == pytest.approx(2e-2) and \
        type(plain.param_groups[0]["lr"]) is float
    with pytest.raises(ValueError, match="lr as a Tensor needs capturable=True"):
        flora_ext.Flora(make_params("cpu")[:1], lr=torch.tensor(1e-2))


def test_turning_capturable_on_and_off_between_steps():
    params_a, opt_a = make("cpu", False)
    params_b, opt_b = make("cpu", False)
    for k, g in enumerate(gradients(params_a)):
        for group in opt_b.param_groups:
            group["capturable"] = k % 3 == 1
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, g)
            opt.step()
        assert_same_run(params_a, opt_a, params_b, opt_b)


def test_compile_refuses_capturable():
    torch._dynamo.reset()
    params, opt = make("cpu", True)
    set_grads(params, gradients(params, 1)[0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(Exception, match="does not take capturable=True groups"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    torch._dynamo.reset()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("device", DEVICES)
def test_op_checks_the_counters(device):
    p = torch.ones(4, 6, device=device)
    states = [torch.zeros(4, device=device), torch.zeros(6, device=device)]
    hyper = dict(lr=1e-3, beta1=0.0, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8,
                 weight_decay=0.0, rank=0, kappa=10, scale_parameter=True, relative_step=False,
                 warmup_init=False, factorize_second_moment=True)
    workspace = torch.empty(0, device=device)
    op = torch.ops.flora.step_group_capturable_
    with pytest.raises(RuntimeError, match=r"flora: steps\[0\] must be a 0-d int64 tensor"):
        op([p], [torch.ones_like(p)], states, [torch.zeros((), dtype=torch.int32, device=device)],
           [], workspace, **hyper)
    with pytest.raises(RuntimeError, match="seeds must have one tensor per parameter with "
                                           "compressed momentum"):
        op([p], [torch.ones_like(p)], states, [torch.zeros((), dtype=torch.int64, device=device)],
           [torch.zeros((), dtype=torch.int64, device=device)], workspace, **hyper)
    assert torch.equal(p, torch.ones(4, 6, device=device))
    step = torch.zeros((), dtype=torch.int64, device=device)
    op([p], [torch.ones_like(p)], states, [step], [], workspace, **hyper)
    assert int(step) == 1 and not torch.equal(p, torch.ones(4, 6, device=device))


# ---- CUDA graphs -----------------------------------------------------------------------


@requires_cuda
def test_replayed_graph_is_the_eager_capturable_step():
    """K replays across two resamplings and an lr change (a tensor lr a scheduler fill_()s),
    bitwise the eager capturable steps; the eager steps make no host sync."""
    params_a, opt_a = make("cuda", True, lr=torch.tensor(1e-2, device="cuda"))
    params_b, opt_b = make("cuda", True, lr=torch.tensor(1e-2, device="cuda"))
    grads = gradients(params_a)
    set_grads(params_a, grads[0])
    opt_a.step()
    graph = warm_up_and_capture(params_b, opt_b, grads[0])
    assert_same_run(params_a, opt_a, params_b, opt_b)  # the capture changed nothing
    for k in range(1, len(grads)):
        if k == 4:
            opt_a.param_groups[0]["lr"].fill_(5e-3)
            opt_b.param_groups[0]["lr"].fill_(5e-3)
        set_grads(params_a, grads[k])
        set_grads(params_b, grads[k])
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt_a.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph.replay()
        assert_same_run(params_a, opt_a, params_b, opt_b)
    assert int(opt_b.state[params_b[0]]["step"]) == len(grads)


@requires_cuda
def test_capturable_cuda_step_matches_the_plain_one():
    params_a, opt_a = make("cuda", False)
    params_b, opt_b = make("cuda", True)
    for k, g in enumerate(gradients(params_a)):
        if k == 4:
            opt_a.param_groups[0]["lr"] = opt_b.param_groups[0]["lr"] = 5e-3
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, g)
            opt.step()
    for pa, pb in zip(params_a, params_b):
        # bf16 parameters: a last-bit difference of the fp32 result may round elsewhere
        tol = dict(rtol=1e-2, atol=1e-2) if pa.dtype == torch.bfloat16 else \
            dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pb, pa, **tol)
        for key, va in opt_a.state[pa].items():
            vb = opt_b.state[pb][key]
            if isinstance(va, torch.Tensor):
                torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-6)
            else:
                assert int(vb) == va


@requires_cuda
def test_capture_needs_capturable():
    params, opt = make("cuda", False)
    set_grads(params, gradients(params, 1)[0])
    opt.step()
    before = [p.detach().clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"needs Flora\(\.\.\., capturable=True\)"):
        with torch.cuda.graph(graph):
            opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(opt.state[p]["step"] == 1 for p in params)


@requires_cuda
def test_capture_needs_a_warm_up_step_with_the_same_tensors():
    params, opt = make("cuda", True)
    set_grads(params, gradients(params, 1)[0])
    with pytest.raises(RuntimeError, match="stepped eagerly with capturable=True"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert not any(opt.state[p] for p in params)
    opt.step()
    grad = params[1].grad
    params[1].grad = grad.clone()  # another gradient tensor than the warm-up's
    with pytest.raises(RuntimeError, match=r"the gradient of parameter 1 \(shape \[128, 64\]\) "
                                           r"is another tensor"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    params[1].grad = grad
    opt.param_groups[0]["weight_decay"] = 0.5  # a setting the plan was made for
    with pytest.raises(RuntimeError, match=r"run one eager opt.step\(\) right before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert all(int(opt.state[p]["step"]) == 1 for p in params)
    opt.param_groups[0]["weight_decay"] = 0.0  # as the plan was made: the capture goes through
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.replay()
    assert all(int(opt.state[p]["step"]) == 2 for p in params)


@requires_cuda
def test_unfused_compressed_momentum_is_refused():
    params, opt = make("cuda", True, tf32=False)
    set_grads(params, gradients(params, 1)[0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="capturable=True steps compressed momentum on the "
                                           "fused tensor-core path only"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
