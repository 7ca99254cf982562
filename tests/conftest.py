import pytest
import torch

import flora_ext

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU: run pytest on the GPU machine for these")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def pytest_sessionstart(session):
    # A GPU with a CPU-only build would silently test nothing of the CUDA kernels.
    if HAS_CUDA and not flora_ext.cuda_compiled():
        raise pytest.UsageError("a GPU is present but flora_ext was built without CUDA kernels")


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def tuning():
    """torch.ops.flora._set_tuning for one test: the variants of the CUDA path that the
    fixed tuning leaves out (row stats, ring depth, fused momentum, batch shares),
    restored to the constants afterwards."""
    set_tuning = torch.ops.flora._set_tuning
    set_tuning(reset=True)
    yield set_tuning
    set_tuning(reset=True)


def warm_up_and_capture(params, opt, first_grads):
    """What torch.cuda.graph's examples do: an eager step on a side stream, then capture
    opt.step() into the returned graph."""
    set_grads(params, first_grads)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # (a host sync inside would fail the capture)
        opt.step()
    return graph


def set_grads(params, grads):
    """Gives each parameter its gradient, in place where it already has one (a captured
    graph reads the same .grad tensors)."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def assert_states_close(sa, sb, tol):
    """Two optimizer states of one parameter: the same keys, tensors within ``tol``
    (rel_err), everything else equal."""
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert rel_err(value.cpu(), sb[key].cpu()) <= tol, key
        else:
            assert value == sb[key], key


def resumed_and_uninterrupted(p0, grads, split=3, **kw):
    """CUDA runs of flora_ext.Flora(**kw) over ``grads`` from ``p0``: one uninterrupted, one
    stepped ``split`` times, saved with state_dict, loaded into a new optimizer and stepped
    on. Returns (resumed param, its optimizer, uninterrupted param, its optimizer)."""
    import copy

    def steps(p, opt, gs):
        for g in gs:
            p.grad = g.cuda()
            opt.step()

    ref = torch.nn.Parameter(p0.cuda())
    ref_opt = flora_ext.Flora([ref], **kw)
    steps(ref, ref_opt, grads)
    p = torch.nn.Parameter(p0.cuda())
    opt = flora_ext.Flora([p], **kw)
    steps(p, opt, grads[:split])
    resumed = torch.nn.Parameter(p.detach().clone())
    resumed_opt = flora_ext.Flora([resumed], **kw)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    steps(resumed, resumed_opt, grads[split:])
    return resumed, resumed_opt, ref, ref_opt
