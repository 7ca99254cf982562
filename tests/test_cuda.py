"""CUDA kernels against the CPU kernels (the CPU path is checked against tests/reference.py)."""
import copy

import pytest
import torch

import flora_ext
from conftest import rel_err, requires_cuda

pytestmark = requires_cuda

# (shape, hyper-parameters): every layout the CUDA kernels branch on.
CASES = [
    ((24, 24), dict(beta1=0.9, rank=4)),                 # compressed, right (n >= m)
    ((16, 40), dict(beta1=0.9, rank=4)),                 # compressed, left (n < m)
    ((40, 16), dict(beta1=0.9, rank=4, weight_decay=0.1)),
    ((96, 200), dict(beta1=0.8, rank=32)),
    ((8, 64), dict(beta1=0.9, rank=4)),                  # aspect ratio > 4: dense momentum
    ((30, 20), dict(beta1=None)),                        # factored, no momentum
    ((30, 20), dict(beta1=0.9, factorize_second_moment=False)),
    ((37,), dict(beta1=0.9)),                            # 1-D, dense momentum
    ((37,), dict(beta1=None, scale_parameter=False)),
    ((3, 4, 5), dict(beta1=0.9)),                        # N-D: full second moment
    ((3000, 7), dict(beta1=None)),                       # many rows: several column chunks
    ((70000,), dict(beta1=0.9)),                         # several pass blocks
    ((16, 40), dict(beta1=0.9, rank=4, relative_step=True, lr=None, warmup_init=True)),
]


def run(shape, hp, device, dtype=torch.float32, steps=15, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) * (0.1 + t % 3) for t in range(steps)]
    p = torch.nn.Parameter(p0.to(device=device, dtype=dtype))
    kw = dict(lr=1e-2, kappa=4)
    kw.update(hp)
    opt = flora_ext.Flora([p], **kw)
    for g in grads:
        p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return p.detach(), opt.state[p]


def assert_close_run(a, b, tol):
    (pa, sa), (pb, sb) = a, b
    assert rel_err(pa.cpu(), pb.cpu()) <= tol
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert rel_err(value.cpu(), sb[key].cpu()) <= tol, key
        else:
            assert value == sb[key], key


@pytest.fixture
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("shape,hp", CASES, ids=[f"{s}-{h}" for s, h in CASES])
def test_cuda_step_matches_cpu(shape, hp, exact_fp32):
    assert_close_run(run(shape, hp, "cuda"), run(shape, hp, "cpu"), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,hp", [((16, 40), dict(beta1=0.9, rank=4)),
                                      ((37,), dict(beta1=0.9))])
def test_cuda_half_params_match_cpu(shape, hp, dtype, exact_fp32):
    # Both sides round the same fp32 result once per step; a rounding tie broken
    # differently moves one element by one ulp, hence the per-dtype tolerance.
    pc, sc = run(shape, hp, "cuda", dtype)
    pp, sp = run(shape, hp, "cpu", dtype)
    assert pc.dtype == dtype and sc.get("momentum", torch.empty(0)).dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(pc.cpu(), pp) <= tol


def test_cuda_step_with_tf32(exact_fp32):
    # TF32 GEMMs (10-bit mantissa) touch only the compressed momentum; tolerance 2e-3.
    torch.backends.cuda.matmul.allow_tf32 = True
    shape, hp = (96, 200), dict(beta1=0.9, rank=32)
    assert_close_run(run(shape, hp, "cuda"), run(shape, hp, "cpu"), 2e-3)


@pytest.mark.parametrize("shape,hp", CASES[:4] + CASES[8:10], ids=str)
def test_cuda_step_is_deterministic(shape, hp):
    a, b = run(shape, hp, "cuda"), run(shape, hp, "cuda")
    assert torch.equal(a[0], b[0])
    for key, value in a[1].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[1][key]), key


@pytest.mark.parametrize("shape", [(256, 64), (7, 13), (1, 1), (3, 1000)])
def test_projection_same_on_cpu_and_cuda(shape):
    for seed in (0, 12345, 2**40 + 7, 2**63 - 1):
        cpu = flora_ext.projection(seed, *shape, rank=8)
        gpu = flora_ext.projection(seed, *shape, rank=8, device="cuda").cpu()
        # double Box-Muller on both sides, rounded once: at most a couple of ulp apart
        ulp = torch.finfo(torch.float32).eps * cpu.abs().clamp_min(1e-30)
        assert ((cpu - gpu).abs() <= 2 * ulp).all(), seed


def test_resume_cpu_checkpoint_on_cuda(exact_fp32):
    gen = torch.Generator().manual_seed(1)
    shapes = [(16, 40), (40, 16), (37,)]
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]

    def make(device, params=None):
        ps = [torch.nn.Parameter(p.clone().to(device)) for p in (params or params0)]
        return ps, flora_ext.Flora(ps, lr=1e-2, beta1=0.9, rank=4, kappa=5)

    def steps(ps, opt, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.to(p.device)
            opt.step()

    ref_ps, ref_opt = make("cpu")
    steps(ref_ps, ref_opt, grads)
    cpu_ps, cpu_opt = make("cpu")
    steps(cpu_ps, cpu_opt, grads[:7])
    gpu_ps, gpu_opt = make("cuda", [p.detach() for p in cpu_ps])
    gpu_opt.load_state_dict(copy.deepcopy(cpu_opt.state_dict()))
    assert all(t.device.type == "cuda" for s in gpu_opt.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))
    steps(gpu_ps, gpu_opt, grads[7:])
    for a, b in zip(gpu_ps, ref_ps):
        assert rel_err(a.detach().cpu(), b.detach()) <= 1e-5


def test_params_on_two_devices_in_one_optimizer(exact_fp32):
    a = torch.nn.Parameter(torch.randn(16, 40))
    b = torch.nn.Parameter(torch.randn(16, 40, device="cuda"))
    with torch.no_grad():
        b.copy_(a)
    opt = flora_ext.Flora([a, b], lr=1e-2, beta1=0.9, rank=4, kappa=3, seed=0)
    for t in range(5):
        g = torch.randn(16, 40)
        a.grad, b.grad = g, g.cuda()
        opt.step()
    assert opt.state[b]["momentum"].device.type == "cuda"
    # different seeds (seed + 1, seed + 2): different projections, different momentum
    assert opt.state[a]["seed"] != opt.state[b]["seed"]
    assert rel_err(b.detach().cpu(), a.detach()) < 0.1


def test_cuda_opcheck():
    p = torch.randn(16, 40, device="cuda")
    g = torch.randn_like(p)
    state = [torch.zeros(16, device="cuda"), torch.zeros(40, device="cuda"), None,
             torch.zeros(4, 40, device="cuda")]
    kwargs = dict(step=1, seed=3, lr=1e-2, beta1=0.9, eps1=1e-30, eps2=1e-3,
                  clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, rank=4, kappa=1,
                  scale_parameter=True, relative_step=False, warmup_init=False,
                  factorize_second_moment=True)
    torch.library.opcheck(torch.ops.flora.step_.default, (p, g, *state), kwargs)
    out = torch.empty(8, 5, device="cuda")
    torch.library.opcheck(torch.ops.flora.fill_projection_.default, (out, 7, 0.5))


def test_cuda_step_rejects_grad_on_another_device():
    from test_ops import step_args
    args, kwargs = step_args("compressed", device="cuda")
    before = args[0].clone()
    args[1] = args[1].cpu()
    with pytest.raises(RuntimeError, match="flora: grad must be on cuda"):
        torch.ops.flora.step_(*args, **kwargs)
    assert torch.equal(args[0], before)
