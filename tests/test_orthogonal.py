"""projection="orthogonal" (docs/FLORA.md §5.1): its algebra, the CPU kernels against the
float64 reference (tests/reference.py, ``down_projection``), the equivalence with a step that
stores the momentum in the orthonormalised basis (benchmarks/stability.py's ProbeFlora),
state_dict round trips, skip_nonfinite, 8-bit state, and the refusals."""
import copy
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import reference as ref  # noqa: E402
import stability  # noqa: E402

import flora_ext  # noqa: E402
from flora_ext import _quantized  # noqa: E402

RANK, KAPPA = 6, 3
HP = ref.full_hp(lr=0.05, rank=RANK, kappa=KAPPA, beta1=0.9)
# left (n < m), right (n > m), square (right), dense momentum (aspect > 4), 1-D (dense)
COMPRESSED = [(12, 40), (40, 12), (24, 24)]
SHAPES = COMPRESSED + [(12, 60), (37,)]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- the algebra


@pytest.mark.parametrize("left", [True, False])
def test_down_matrix_is_the_scaled_projector_and_the_orthonormal_basis_in_gaussian_coords(left):
    """up(down_o(X)) = s^2 Pi X, and down_o(X) = s R^-1 M_o where M_o = P_o X (left) are the
    coordinates in the orthonormalised basis P_o = s Q^T (P^T = Q R): float64, exact."""
    gen = torch.Generator().manual_seed(3)
    r, long, other = 7, 30, 45
    P = torch.randn((r, long) if left else (long, r), generator=gen, dtype=torch.float64)
    P = P / math.sqrt(r)
    X = torch.randn((long, other) if left else (other, long), generator=gen,
                    dtype=torch.float64)
    W = ref.down_matrix(P, left, "orthogonal")
    s2 = long / r
    A = P if left else P.t()  # r x long
    projector = A.t() @ torch.linalg.solve(A @ A.t(), A)  # long x long, onto P's span
    restored = ref.up(P, ref.down(W, X, left), left)
    expected = s2 * (projector @ X if left else X @ projector)
    assert torch.allclose(restored, expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(projector @ projector, projector, atol=1e-10)
    # the orthonormalised basis of benchmarks/stability.py, and the coordinate change
    P_o = stability.orthogonalised(P, left)
    Q, R = torch.linalg.qr(A.t())
    R = R * torch.sign(torch.diagonal(R))[:, None]  # positive diagonal
    M_o = ref.down(P_o, X, left)
    if left:
        Z = math.sqrt(s2) * torch.linalg.solve(R, M_o)  # s R^-1 M_o
    else:
        Z = math.sqrt(s2) * torch.linalg.solve(R, M_o.t()).t()  # s M_o R^-T
    assert torch.allclose(ref.down(W, X, left), Z, rtol=1e-9, atol=1e-10)
    assert torch.allclose(ref.up(P, Z, left), ref.up(P_o, M_o, left), rtol=1e-9, atol=1e-10)
    # the gaussian down matrix is P itself
    assert ref.down_matrix(P, left) is P


def test_reference_rejects_an_unknown_projection():
    with pytest.raises(ValueError, match="projection must be one of"):
        ref.down_matrix(torch.ones(2, 3), True, "uniform")


# ----------------------------------------------------------------- CPU kernels vs float64


def _run_pair(shape, steps, seed=11, dtype=torch.float32, grads=None, **extra):
    """flora_ext.Flora(projection="orthogonal") and the float64 reference side by side; yields
    (t, param, ref_param, state, ref_state) after each step."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(dtype))
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(HP, seed), projection="orthogonal",
                          **extra)
    ref_p = p.detach().double().clone()
    ref_state = ref.init_state(ref_p, HP, ref.param_seed(seed, 1))
    for t in range(1, steps + 1):
        g = grads[t - 1] if grads is not None else torch.randn(shape, generator=gen)
        p.grad = g.to(dtype)
        opt.step()
        ref_p = ref.reference_step(ref_p, p.grad.double(), ref_state, HP,
                                   down_projection="orthogonal",
                                   skip_nonfinite=extra.get("skip_nonfinite", False))
        yield t, p, ref_p, opt.state[p], ref_state


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_step_matches_the_float64_reference(shape):
    """13 steps with kappa=3: four resamples (3, 6, 9, 12)."""
    for t, p, ref_p, state, ref_state in _run_pair(shape, 13):
        assert rel_err(p, ref_p) < 2e-5, f"step {t}"
        assert rel_err(state["momentum"], ref_state["momentum"]) < 2e-5, f"step {t}"
        assert state.get("seed") == ref_state.get("seed"), f"step {t}"
        for key in ("row_second_moment", "col_second_moment", "second_moment"):
            if key in ref_state:
                assert rel_err(state[key], ref_state[key]) < 1e-5, (key, t)


def test_cpu_step_matches_the_reference_with_bfloat16_parameters():
    """The kernel computes in float32 and rounds once: the reference is fed the rounded value
    after each step (tests/test_reference.py's convention), so the state must agree."""
    gen = torch.Generator().manual_seed(9)
    shape = (12, 40)
    p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).bfloat16())
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(HP, 2), projection="orthogonal")
    ref_state = ref.init_state(p.detach().double(), HP, ref.param_seed(2, 1))
    for t in range(1, 8):
        p.grad = torch.randn(shape, generator=gen).bfloat16()
        ref_p = ref.reference_step(p.detach().double(), p.grad.double(), ref_state, HP,
                                   down_projection="orthogonal")
        opt.step()
        assert rel_err(opt.state[p]["momentum"], ref_state["momentum"]) < 1e-5, f"step {t}"
        assert rel_err(p, ref_p.bfloat16()) < 1e-2, f"step {t}"
        ref_state["momentum"].copy_(opt.state[p]["momentum"].double())  # same inputs next


def test_group_of_every_layout_in_one_call():
    """One step_group_ call over left, right, square, dense and 1-D parameters."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    opt = flora_ext.Flora(params, **ref.optimizer_kwargs(HP, 4), projection="orthogonal")
    refs = [p.detach().double().clone() for p in params]
    states = [ref.init_state(r, HP, ref.param_seed(4, i + 1)) for i, r in enumerate(refs)]
    for t in range(1, 8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for i, p in enumerate(params):
            refs[i] = ref.reference_step(refs[i], p.grad.double(), states[i], HP,
                                         down_projection="orthogonal")
            assert rel_err(p, refs[i]) < 2e-5, (t, tuple(p.shape))


def _trajectory(shape, projection, steps=7, **extra):
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(HP, 11), projection=projection, **extra)
    out = []
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
        out.append((p.detach().clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                         for k, v in opt.state[p].items()}))
    return out


@pytest.mark.parametrize("shape", [(12, 60), (37,)])
def test_dense_momentum_is_untouched(shape):
    """No projection, so nothing changes: bitwise the Gaussian option's steps."""
    for (p_o, s_o), (p_g, s_g) in zip(_trajectory(shape, "orthogonal"),
                                      _trajectory(shape, "gaussian")):
        assert torch.equal(p_o, p_g)
        assert s_o.keys() == s_g.keys()
        for key in s_o:
            assert torch.equal(torch.as_tensor(s_o[key]), torch.as_tensor(s_g[key])), key


@pytest.mark.parametrize("shape", COMPRESSED)
def test_orthogonal_differs_from_gaussian(shape):
    """Step 1's direction has no momentum yet, so the parameters agree after it; its
    compressed momentum already differs, and the parameters from step 2 on."""
    ortho, gauss = _trajectory(shape, "orthogonal"), _trajectory(shape, "gaussian")
    assert torch.equal(ortho[0][0], gauss[0][0])
    assert rel_err(ortho[0][1]["momentum"], gauss[0][1]["momentum"]) > 0.05
    for t in range(1, len(ortho)):
        assert rel_err(ortho[t][0], gauss[t][0]) > 1e-4, f"step {t + 1}"
        assert ortho[t][1]["seed"] == gauss[t][1]["seed"]


def test_default_is_gaussian():
    p = torch.nn.Parameter(torch.zeros(3))
    assert flora_ext.Flora([p], lr=1e-3).defaults["projection"] == "gaussian"


# ---------------------------------------------------------------- ProbeFlora equivalence

PROBE_SHAPES = [(12, 40), (40, 12), (24, 24), (12, 60)]


def test_equals_a_flora_that_stores_the_orthonormal_basis_momentum():
    """benchmarks/stability.py's ProbeFlora(projection="orthogonal") keeps M_o in the basis
    of the orthonormalised, scaled P_o; flora_ext keeps Z in the Gaussian basis. The
    parameters agree up to float32 rounding over 3 resamples, and up(Z) = up_o(M_o)."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in PROBE_SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    probe = stability.ProbeFlora(params, lr=0.05, rank=RANK, kappa=KAPPA, beta1=0.9, seed=11,
                                 projection="orthogonal")
    ext = flora_ext.Flora(twins, lr=0.05, rank=RANK, kappa=KAPPA, beta1=0.9, seed=11,
                          projection="orthogonal")
    for t in range(1, 11):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        probe.step()
        ext.step()
        for p, q in zip(params, twins):
            assert rel_err(q, p) < 2e-5, (t, tuple(p.shape))
            state, probe_state = ext.state[q], probe.state[p]
            if "seed" not in state:
                continue
            assert state["seed"] == probe_state["seed"]
            n, m = p.shape
            left = n < m
            P = ref.projection_matrix(ref.ext_projection, state["seed"], n, m, RANK)
            P_o = stability.orthogonalised(P, left)
            assert rel_err(ref.up(P, state["momentum"].double(), left),
                           ref.up(P_o, probe_state["momentum"].double(), left)) < 2e-5, t


# ----------------------------------------------------------------------- state and resume


def test_state_dict_round_trip_resumes_bitwise():
    gen = torch.Generator().manual_seed(2)
    shapes = SHAPES
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(11)]
    init = [torch.randn(s, generator=gen) * 0.1 for s in shapes]

    def make():
        params = [torch.nn.Parameter(x.clone()) for x in init]
        return params, flora_ext.Flora(params, **ref.optimizer_kwargs(HP, 3),
                                       projection="orthogonal")

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    params, opt = make()
    run(params, opt, grads)
    resumed_params, resumed = make()
    run(resumed_params, resumed, grads[:5])
    saved = copy.deepcopy(resumed.state_dict())
    assert all(g["projection"] == "orthogonal" for g in saved["param_groups"])
    params2, opt2 = make()
    for p, q in zip(params2, resumed_params):
        p.data.copy_(q.detach())
    opt2.load_state_dict(saved)
    run(params2, opt2, grads[5:])
    for p, q in zip(params, params2):
        assert torch.equal(p.detach(), q.detach())
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state[q][key])), key


def test_a_state_dict_without_projection_loads_with_the_constructors():
    """Saved before the option existed: the group takes this optimizer's projection."""
    p = torch.nn.Parameter(torch.randn(12, 40) * 0.1)
    opt = flora_ext.Flora([p], lr=0.05, rank=RANK, beta1=0.9)
    p.grad = torch.randn(12, 40)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["projection"]
    other = flora_ext.Flora([p], lr=0.05, rank=RANK, beta1=0.9, projection="orthogonal")
    other.load_state_dict(saved)
    assert other.param_groups[0]["projection"] == "orthogonal"
    other.step()


# --------------------------------------------------------------- skip_nonfinite and 8-bit


def test_skip_nonfinite_moves_the_momentum_with_the_orthogonal_transfer():
    """A NaN gradient on the resampling step 3 (and an inf at 5): the momentum moves to the
    next basis with down_o(up(Z)) and nothing is added (docs/FLORA.md §4.8)."""
    gen = torch.Generator().manual_seed(4)
    for shape in COMPRESSED:
        grads = [torch.randn(shape, generator=gen) for _ in range(7)]
        grads[2][0, 1] = float("nan")
        grads[4][1, 0] = float("inf")
        for t, p, ref_p, state, ref_state in _run_pair(shape, 7, grads=grads,
                                                       skip_nonfinite=True):
            assert rel_err(p, ref_p) < 2e-5, (shape, t)
            assert rel_err(state["momentum"], ref_state["momentum"]) < 2e-5, (shape, t)


def test_quantized_momentum_follows_the_orthogonal_projection():
    """quantization=True runs the same op on dequantized state: after one step its 8-bit
    momentum is (1 - beta1) down_o(U) up to the blockwise rounding, far from down(U)."""
    shape = (12, 40)
    states = {}
    for projection in ("orthogonal", "gaussian"):
        for quantization in (False, True):
            gen = torch.Generator().manual_seed(6)
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
            opt = flora_ext.Flora([p], **ref.optimizer_kwargs(HP, 1), quantization=quantization,
                                  projection=projection)
            p.grad = torch.randn(shape, generator=gen)
            opt.step()
            state = opt.state[p]
            momentum = state["momentum"]
            if quantization:
                momentum = _quantized.dequantize("momentum", momentum, state["momentum_absmax"])
            states[projection, quantization] = momentum
    assert rel_err(states["orthogonal", True], states["orthogonal", False]) < 0.02
    assert rel_err(states["orthogonal", True], states["gaussian", False]) > 0.1


def _accumulated_run(projection, micro_batches, cycles, hooks=True):
    """Two linear layers (16 x 40: left, 40 x 16: right) trained ``cycles`` optimizer steps
    of ``micro_batches`` backward passes, through a FloraAccumulator (``hooks``) or plain
    backward + step()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 40, bias=False),
                                torch.nn.Linear(40, 16, bias=False))
    opt = flora_ext.Flora(model.parameters(), lr=0.05, rank=4, kappa=2, beta1=0.9,
                          projection=projection)
    if hooks:
        flora_ext.FloraAccumulator(opt, micro_batches=micro_batches, rank=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(cycles):
        for _ in range(micro_batches):
            x = torch.randn(8, 16, generator=gen)
            (model(x).square().mean() / micro_batches).backward()
        opt.step()
        if not hooks:
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def test_accumulator_steps_with_the_orthogonal_projection():
    """micro_batches=1 (steps in the backward hooks): bitwise backward + step()."""
    hooked, _ = _accumulated_run("orthogonal", 1, 5)
    plain, _ = _accumulated_run("orthogonal", 1, 5, hooks=False)
    gaussian, _ = _accumulated_run("gaussian", 1, 5)
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain))
    assert all(rel_err(a, b) > 1e-4 for a, b in zip(hooked, gaussian))


def test_accumulation_projections_stay_gaussian():
    """The compressed accumulation of 3 micro-batches does not depend on ``projection``: the
    first step (no momentum in its direction yet) gives the same parameters either way."""
    ortho, opt_o = _accumulated_run("orthogonal", 3, 1)
    gauss, opt_g = _accumulated_run("gaussian", 3, 1)
    assert all(torch.equal(a, b) for a, b in zip(ortho, gauss))
    for p, q in zip(opt_o.param_groups[0]["params"], opt_g.param_groups[0]["params"]):
        assert rel_err(opt_o.state[p]["momentum"], opt_g.state[q]["momentum"]) > 0.05


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("value", ["uniform", "Orthogonal", None, 1, True])
def test_bad_values_name_the_argument(value):
    p = torch.nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"^flora: projection must be 'gaussian' or "
                                         r"'orthogonal', got "):
        flora_ext.Flora([p], lr=1e-3, projection=value)


def test_the_op_refuses_an_unknown_projection_before_writing():
    param = torch.ones(4, 6)
    momentum = torch.zeros(2, 6)
    with pytest.raises(RuntimeError, match="flora: projection must be 'gaussian' or "
                                           "'orthogonal', got 'qr'"):
        torch.ops.flora.step_group_(
            [param], [torch.ones(4, 6)], [torch.zeros(4), torch.zeros(6), momentum], [1], [1],
            lr=0.1, beta1=0.9, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8,
            weight_decay=0.0, rank=2, kappa=3, scale_parameter=True, relative_step=False,
            warmup_init=False, factorize_second_moment=True, projection="qr")
    assert torch.equal(param, torch.ones(4, 6)) and not momentum.any()


def test_capturable_is_refused():
    p = torch.nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"^flora: projection='orthogonal' is not supported "
                                         r"with capturable=True"):
        flora_ext.Flora([p], lr=1e-3, projection="orthogonal", capturable=True)
    opt = flora_ext.Flora([p], lr=1e-3, capturable=True)
    opt.param_groups[0]["projection"] = "orthogonal"
    p.grad = torch.ones(4, 6)
    with pytest.raises(ValueError, match="not supported with capturable=True"):
        opt.step()
    assert not p.detach().any()


def test_a_parameter_off_the_cpu_is_refused_when_added():
    """Checked without a GPU on a meta parameter: the same check refuses CUDA ones."""
    p = torch.nn.Parameter(torch.empty(4, 6, device="meta"))
    with pytest.raises(ValueError, match=r"^flora: projection='orthogonal' is supported on "
                                         r"CPU parameters only for now, got a parameter on meta"):
        flora_ext.Flora([p], lr=1e-3, projection="orthogonal")


CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not flora_ext.cuda_compiled(),
                          reason="needs a CUDA device and a CUDA build of flora_ext")


@CUDA
def test_cuda_parameters_are_refused_by_the_optimizer_and_the_op():
    p = torch.nn.Parameter(torch.ones(12, 40, device="cuda"))
    with pytest.raises(ValueError, match="flora: projection='orthogonal' is supported on CPU "
                                         "parameters only for now, got a parameter on cuda"):
        flora_ext.Flora([p], lr=1e-3, rank=RANK, beta1=0.9, projection="orthogonal")
    opt = flora_ext.Flora([p], lr=1e-3, rank=RANK, beta1=0.9)
    opt.param_groups[0]["projection"] = "orthogonal"  # changed after construction
    p.grad = torch.ones(12, 40, device="cuda")
    with pytest.raises(ValueError, match="supported on CPU parameters only"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(12, 40, device="cuda")) and not opt.state[p]
    momentum = torch.zeros(RANK, 40, device="cuda")
    rows, cols = torch.zeros(12, device="cuda"), torch.zeros(40, device="cuda")
    with pytest.raises(RuntimeError, match="flora: projection='orthogonal' is supported on "
                                           "CPU parameters only for now"):
        torch.ops.flora.step_(p.detach(), p.grad, rows, cols, None, momentum, step=1, seed=1,
                              lr=0.1, beta1=0.9, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                              decay_rate=-0.8, weight_decay=0.0, rank=RANK, kappa=3,
                              scale_parameter=True, relative_step=False, warmup_init=False,
                              factorize_second_moment=True, projection="orthogonal")
    assert torch.equal(p.detach(), torch.ones(12, 40, device="cuda"))
    assert not momentum.any() and not rows.any()
