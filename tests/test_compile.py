"""torch.compile(opt.step, fullgraph=True): one graph, traced once, bitwise equal to eager."""
import pytest
import torch
from torch._inductor.compile_fx import compile_fx

import flora_ext
from conftest import DEVICES, requires_cuda

KAPPA = 3
STEPS = 3 * KAPPA + 1  # resamples at steps 3, 6 and 9


class CountingInductor:
    """A torch.compile backend that counts the graphs it compiles (Inductor compiles them)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def ops(self, k=0):
        return [node.target for node in self.graphs[k].graph.nodes
                if node.op == "call_function" and node.target is not torch._C._set_grad_enabled]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Linear(12, 16)            # compressed momentum (rank < 12)
        self.b = torch.nn.Linear(16, 6, bias=False)  # dense momentum (rank >= 6)
        self.c = torch.nn.Linear(6, 4)              # no momentum (beta1=None)
        self.unused = torch.nn.Parameter(torch.zeros(5, 3))  # never gets a gradient
        self.to(dtype)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def make(device, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    net = Net(dtype).to(device)
    groups = [
        {"params": list(net.a.parameters()), "beta1": 0.9, "rank": 4},
        {"params": [net.b.weight, net.unused], "beta1": 0.8, "rank": 8,
         "factorize_second_moment": False},
        {"params": list(net.c.parameters()), "beta1": None, "weight_decay": 0.01},
    ]
    return net, flora_ext.Flora(groups, lr=1e-2, kappa=KAPPA, **kwargs)


def scheduler(opt):
    """An LR scheduler: it writes a new float into every group's lr at every step. Made
    after torch.compile(opt.step): a scheduler wraps opt.step in a function of
    torch/optim/lr_scheduler.py, a file torch.compile does not trace (for torch's own
    optimizers as for Flora)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def backward(net, step, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 12, generator=gen).to(device, dtype)
    net.zero_grad(set_to_none=True)
    net(x).float().square().mean().backward()


def assert_same(net_a, opt_a, net_b, opt_b):
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a, b), f"parameter {name} differs"
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for k, state in sd_a["state"].items():
        assert state.keys() == sd_b["state"][k].keys()
        for key, value in state.items():
            other = sd_b["state"][k][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"state {k} {key} differs"
            else:
                assert type(value) is int and type(other) is int and value == other, (k, key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_is_one_graph_and_bitwise_eager(device, dtype):
    eager_net, eager_opt = make(device, dtype)
    net, opt = make(device, dtype)
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    eager_sched, sched = scheduler(eager_opt), scheduler(opt)
    seeds = set()
    for k in range(STEPS):
        backward(eager_net, k, device, dtype)
        backward(net, k, device, dtype)
        eager_opt.step()
        step()
        eager_sched.step()
        opt._opt_called = True  # what the scheduler's wrapper of opt.step sets
        sched.step()
        assert_same(net, opt, eager_net, eager_opt)
        seeds.add(opt.state[net.a.weight]["seed"])
    assert len(seeds) == 4  # the projection was resampled at every kappa boundary
    assert opt.state[net.a.weight]["step"] == STEPS
    assert net.unused not in opt.state or not opt.state[net.unused]
    assert len(backend.graphs) == 1, f"compiled {len(backend.graphs)} times"
    # One op for all parameter groups and nothing else (but step()'s no_grad).
    assert backend.ops() == [torch.ops.flora.step_group_compiled_.default]


@pytest.mark.parametrize("device", DEVICES)
def test_eager_and_compiled_steps_interleave(device):
    """The state holds the same ints whichever step ran, so either can follow the other
    (without another trace), and state_dict()s are interchangeable."""
    eager_net, eager_opt = make(device)
    net, opt = make(device)
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for k in range(2 * KAPPA + 2):
        backward(eager_net, k, device)
        backward(net, k, device)
        eager_opt.step()
        (step if k % 3 else opt.step)()
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 1
    # A compiled run's state_dict resumes an eager run and the other way round.
    for source_net, source, target_compiled in ((net, opt, False),
                                                (eager_net, eager_opt, True)):
        resumed_net, resumed = make(device)
        resumed_net.load_state_dict(source_net.state_dict())
        resumed.load_state_dict(source.state_dict())
        assert_same(resumed_net, resumed, source_net, source)
        resumed_step = (torch.compile(resumed.step, fullgraph=True) if target_compiled
                        else resumed.step)
        for k in range(2 * KAPPA + 2, 3 * KAPPA + 2):
            backward(resumed_net, k, device)
            backward(source_net, k, device)
            resumed_step()
            source.step()
            assert_same(resumed_net, resumed, source_net, source)


def test_load_state_dict_and_new_group_trace_again():
    net, opt = make("cpu")
    eager_net, eager_opt = make("cpu")
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for k in range(2):
        backward(net, k, "cpu")
        backward(eager_net, k, "cpu")
        step()
        eager_opt.step()
    # load_state_dict replaces the state tensors the graph was traced with: one new trace.
    opt.load_state_dict(eager_opt.state_dict())
    eager_opt.load_state_dict(eager_opt.state_dict())  # the same torch.optim side effects
    for k in range(2, 4):
        backward(net, k, "cpu")
        backward(eager_net, k, "cpu")
        step()
        eager_opt.step()
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 2
    # A group added after tracing is stepped too (another trace).
    extra = torch.nn.Parameter(torch.randn(4, 4))
    eager_extra = torch.nn.Parameter(extra.detach().clone())
    opt.add_param_group({"params": [extra], "beta1": 0.9, "rank": 2})
    eager_opt.add_param_group({"params": [eager_extra], "beta1": 0.9, "rank": 2})
    for k in range(4, 6):
        backward(net, k, "cpu")
        backward(eager_net, k, "cpu")
        extra.grad = torch.full_like(extra, 0.5)
        eager_extra.grad = torch.full_like(extra, 0.5)
        step()
        eager_opt.step()
        assert torch.equal(extra, eager_extra)
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 3


def test_gradients_appearing_and_vanishing_match_eager():
    """Which parameters have a gradient is part of the trace: a change traces again (a
    group none of whose parameters has one included) and matches eager."""
    net, opt = make("cpu")
    eager_net, eager_opt = make("cpu")
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for k in range(4):
        backward(net, k, "cpu")
        backward(eager_net, k, "cpu")
        for n in (net, eager_net):
            if k == 1:
                n.c.weight.grad = n.c.bias.grad = None  # group 2 without any gradient
            if k >= 2:
                n.unused.grad = torch.full_like(n.unused, 0.25)
        step()
        eager_opt.step()
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 3
    assert opt.state[net.unused]["step"] == 2


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=requires_cuda)])
def test_reduce_overhead_mode_matches_eager(device):
    """mode="reduce-overhead" (CUDA graphs): the op reads step counts and lr when it runs,
    so it is marked cudagraph_unsafe and stays out of the captured graphs."""
    eager_net, eager_opt = make(device)
    net, opt = make(device)
    step = torch.compile(opt.step, mode="reduce-overhead", fullgraph=True)
    eager_sched, sched = scheduler(eager_opt), scheduler(opt)
    for k in range(STEPS):
        backward(eager_net, k, device)
        backward(net, k, device)
        eager_opt.step()
        step()
        eager_sched.step()
        opt._opt_called = True
        sched.step()
        assert_same(net, opt, eager_net, eager_opt)


def test_replaced_state_is_used():
    """The graph reads the state tensors, and its op the step counts, from opt.state on
    every call."""
    net, opt = make("cpu")
    eager_net, eager_opt = make("cpu")
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for k in range(4):
        backward(net, k, "cpu")
        backward(eager_net, k, "cpu")
        if k == 2:
            for o, n in ((opt, net), (eager_opt, eager_net)):
                o.state[n.a.weight]["momentum"] = o.state[n.a.weight]["momentum"] * 0.5
                o.state[n.b.weight] = dict(o.state[n.b.weight])  # a new dict, same entries
        step()
        eager_opt.step()
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 1


def test_orthogonal_projection_compiles_bitwise_eager():
    """projection="orthogonal" goes through the same compiled op."""
    eager_net, eager_opt = make("cpu", projection="orthogonal")
    net, opt = make("cpu", projection="orthogonal")
    gaussian_net, gaussian_opt = make("cpu")
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for k in range(STEPS):
        for n in (net, eager_net, gaussian_net):
            backward(n, k, "cpu")
        step()
        eager_opt.step()
        gaussian_opt.step()
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 1
    assert not torch.equal(net.a.weight, gaussian_net.a.weight)


def test_hyper_parameters_change_without_a_new_trace():
    """Hyper-parameters are read when the step runs: changing beta1 (as OneCycleLR's
    cycle_momentum does) or weight_decay needs no new trace, and matches eager."""
    net, opt = make("cpu")
    eager_net, eager_opt = make("cpu")
    backend = CountingInductor()
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for k in range(4):
        for o in (opt, eager_opt):
            o.param_groups[0]["momentum"] = 0.85 + 0.01 * k
            o.param_groups[2]["weight_decay"] = 0.01 * k
        backward(net, k, "cpu")
        backward(eager_net, k, "cpu")
        step()
        eager_opt.step()
        assert_same(net, opt, eager_net, eager_opt)
    assert len(backend.graphs) == 1


def test_bad_lr_raises_under_compile_and_changes_nothing():
    net, opt = make("cpu")
    step = torch.compile(opt.step, fullgraph=True)
    backward(net, 0, "cpu")
    step()
    params = [p.detach().clone() for p in net.parameters()]
    steps = {p: s["step"] for p, s in opt.state.items() if s}
    # The last group's lr: the op checks every group before it steps any.
    opt.param_groups[2]["lr"] = float("nan")
    backward(net, 1, "cpu")
    with pytest.raises(ValueError, match="lr"):
        step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), params))
    assert {p: s["step"] for p, s in opt.state.items() if s} == steps


def test_state_changing_setting_is_refused_under_compile():
    net, opt = make("cpu")
    step = torch.compile(opt.step, fullgraph=True)
    backward(net, 0, "cpu")
    step()
    opt.param_groups[0]["rank"] = 2  # another momentum shape
    backward(net, 1, "cpu")
    with pytest.raises(RuntimeError, match="rank, beta1 > 0, factorize_second_moment"):
        step()


def test_unsupported_uses_raise_clear_errors():
    net, opt = make("cpu")
    step = torch.compile(opt.step, fullgraph=True)
    backward(net, 0, "cpu")
    with pytest.raises(Exception, match="step\\(closure\\) is not supported under torch.compile"):
        step(lambda: None)
    torch._dynamo.reset()
    net, opt = make("cpu")
    accumulator = flora_ext.FloraAccumulator(opt, micro_batches=2)
    step = torch.compile(opt.step, fullgraph=True)
    with pytest.raises(Exception, match="not supported while a FloraAccumulator"):
        step()
    accumulator.remove()


def test_fsdp2_groups_are_refused_under_compile(monkeypatch):
    net, opt = make("cpu")
    monkeypatch.setattr(flora_ext.optimizer._sharded, "has_dtensors",
                        lambda group: group is opt.param_groups[1])
    step = torch.compile(opt.step, fullgraph=True)
    backward(net, 0, "cpu")
    with pytest.raises(RuntimeError, match="not FSDP2 \\(DTensor\\) ones"):
        step()
    assert not any(opt.state.values())


def test_bad_input_is_refused_when_traced():
    """step()'s checks run when torch.compile traces the step (their error reaches the caller
    wrapped by torch.compile, with flora's message): nothing is stepped or made."""
    net, opt = make("cpu")
    step = torch.compile(opt.step, fullgraph=True)
    backward(net, 0, "cpu")
    params = [p.detach().clone() for p in net.parameters()]
    opt.param_groups[1]["clip_threshold"] = -1.0
    with pytest.raises(RuntimeError, match="ValueError: flora: clip_threshold must be"):
        step()
    assert not any(opt.state.values())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), params))
    # What the graph does not read is checked when the op runs: here, by the library.
    opt.param_groups[1]["clip_threshold"] = 1.0
    step()
    params = [p.detach().clone() for p in net.parameters()]
    opt.state[net.a.weight]["step"] = -1
    backward(net, 1, "cpu")
    with pytest.raises(RuntimeError, match="flora: step must be >= 1"):
        step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), params))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """The fake kernels agree with the real ops (torch.library.opcheck)."""
    torch.manual_seed(0)
    p = torch.randn(6, 5, device=device)
    g = torch.randn(6, 5, device=device)
    row, col = torch.zeros(6, device=device), torch.zeros(5, device=device)
    momentum = torch.zeros(6, 2, device=device)
    hyper = dict(lr=1e-2, beta1=0.9, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                 decay_rate=-0.8, weight_decay=0.0, rank=2, kappa=3, scale_parameter=True,
                 relative_step=False, warmup_init=False, factorize_second_moment=True)
    torch.library.opcheck(torch.ops.flora.step_group_.default,
                          ([p], [g], [row, col, momentum], [1], [7]), hyper)
    torch.library.opcheck(torch.ops.flora.step_.default,
                          (p, g, row, col, None, momentum), dict(hyper, step=1, seed=7))
    torch.library.opcheck(torch.ops.flora.fill_projection_.default,
                          (torch.empty(3, 4, device=device), 5, 0.5))
    net, opt = make(device)
    step = torch.compile(opt.step, fullgraph=True)
    backward(net, 0, device)
    step()
    compiled = opt._compiled
    params = [p for plan in compiled.plans for p in plan.group["params"] if p.grad is not None]
    torch.library.opcheck(torch.ops.flora.step_group_compiled_.default,
                          (params, [p.grad for p in params], compiled.states, compiled.handle))
