"""projection="orthogonal" (docs/FLORA.md §5.1): its algebra, the CPU kernels against the
float64 reference (tests/reference.py, ``basis_matrix``), the equality with
benchmarks/stability.py's ProbeFlora (which stores the momentum in the orthonormalised basis
too), state_dict round trips and the refusal of a momentum read in the other basis,
skip_nonfinite, 8-bit state, the refusals, and the CUDA path against the CPU kernels."""
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
from conftest import assert_states_close, rel_err  # noqa: E402
from flora_ext import _quantized  # noqa: E402

RANK, KAPPA = 6, 3
HP = ref.full_hp(lr=0.05, rank=RANK, kappa=KAPPA, beta1=0.9)
# left (n < m), right (n > m), square (right), dense momentum (aspect > 4), 1-D (dense)
COMPRESSED = [(12, 40), (40, 12), (24, 24)]
SHAPES = COMPRESSED + [(12, 60), (37,)]


# ----------------------------------------------------------------------------- the algebra


@pytest.mark.parametrize("left", [True, False])
def test_basis_matrix_is_the_scaled_orthonormalised_p(left):
    """P_o = s R^-T P has orthonormal rows scaled by s, spans P's space (up_o(down_o(X)) =
    s^2 Pi X), and is benchmarks/stability.py's QR-based basis: float64, exact."""
    gen = torch.Generator().manual_seed(3)
    r, long, other = 7, 30, 45
    P = torch.randn((r, long) if left else (long, r), generator=gen, dtype=torch.float64)
    P = P / math.sqrt(r)
    X = torch.randn((long, other) if left else (other, long), generator=gen,
                    dtype=torch.float64)
    P_o = ref.basis_matrix(P, left, "orthogonal")
    assert P_o.shape == P.shape
    s2 = long / r
    A, A_o = (P, P_o) if left else (P.t(), P_o.t())  # r x long
    assert torch.allclose(A_o @ A_o.t(), s2 * torch.eye(r, dtype=torch.float64), atol=1e-10)
    projector = A.t() @ torch.linalg.solve(A @ A.t(), A)  # long x long, onto P's span
    restored = ref.up(P_o, ref.down(P_o, X, left), left)
    expected = s2 * (projector @ X if left else X @ projector)
    assert torch.allclose(restored, expected, rtol=1e-10, atol=1e-10)
    # Gram-Schmidt in order: row k of A_o is a combination of rows 0..k of A
    coeffs = torch.linalg.lstsq(A.t(), A_o.t()).solution  # A_o^T = A^T coeffs
    assert torch.allclose(torch.tril(coeffs, diagonal=-1), torch.zeros_like(coeffs),
                          atol=1e-10)
    assert (torch.diagonal(coeffs) > 0).all()
    assert torch.allclose(P_o, stability.orthogonalised(P, left), rtol=1e-10, atol=1e-12)
    # the gaussian basis is P itself
    assert ref.basis_matrix(P, left) is P


def test_reference_rejects_an_unknown_projection():
    with pytest.raises(ValueError, match="projection must be one of"):
        ref.basis_matrix(torch.ones(2, 3), True, "uniform")


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
    of the orthonormalised, scaled P_o (QR), as flora_ext does (Cholesky): parameters and
    momentum agree state to state up to float32 rounding over 3 resamples."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in PROBE_SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    probe = stability.ProbeFlora(params, lr=0.05, rank=RANK, kappa=KAPPA, beta1=0.9, seed=11,
                                 projection="orthogonal")
    ext = flora_ext.Flora(twins, lr=0.05, rank=RANK, kappa=KAPPA, beta1=0.9, seed=11,
                          projection="orthogonal")
    compressed = 0
    for t in range(1, 11):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        probe.step()
        ext.step()
        for p, q in zip(params, twins):
            assert rel_err(q, p) < 2e-5, (t, tuple(p.shape))
            state, probe_state = ext.state[q], probe.state[p]
            assert rel_err(state["momentum"], probe_state["momentum"]) < 2e-5, (t, p.shape)
            if "seed" in state:
                compressed += 1
                assert state["seed"] == probe_state["seed"]
    assert compressed == 10 * 3  # left, right and square compress; (12, 60) is dense


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


def _stepped_once(projection, shape=(12, 40)):
    p = torch.nn.Parameter(torch.randn(shape) * 0.1)
    opt = flora_ext.Flora([p], lr=0.05, rank=RANK, beta1=0.9, projection=projection)
    p.grad = torch.randn(shape)
    opt.step()
    return p, opt


def test_a_state_dict_without_projection_loads_as_gaussian_only():
    """Saved before the option existed: its compressed momentum is in the Gaussian basis.
    A Gaussian Flora takes it; an orthogonal one refuses it before changing anything."""
    p, opt = _stepped_once("gaussian")
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["projection"]
    same = flora_ext.Flora([p], lr=0.05, rank=RANK, beta1=0.9)
    same.load_state_dict(copy.deepcopy(saved))
    assert same.param_groups[0]["projection"] == "gaussian"
    same.step()
    other = flora_ext.Flora([p], lr=0.05, rank=RANK, beta1=0.9, projection="orthogonal")
    with pytest.raises(ValueError, match=r"^flora: loaded parameter group 0 has no "
                                         r"'projection' .* Gaussian basis"):
        other.load_state_dict(copy.deepcopy(saved))
    assert not other.state and other.param_groups[0]["projection"] == "orthogonal"
    # without compressed state (a dense-momentum parameter) there is no basis to mismatch
    q, dense = _stepped_once("gaussian", shape=(12, 60))
    saved = dense.state_dict()
    del saved["param_groups"][0]["projection"]
    loader = flora_ext.Flora([q], lr=0.05, rank=RANK, beta1=0.9, projection="orthogonal")
    loader.load_state_dict(saved)
    assert loader.param_groups[0]["projection"] == "orthogonal"


@pytest.mark.parametrize("first,then", [("orthogonal", "gaussian"), ("gaussian", "orthogonal")])
@pytest.mark.parametrize("stepped_by,refused_by", [
    ("step", "step"), ("step", "step_param"), ("step_param", "step"),
    ("step_param", "step_param")])
def test_changing_the_projection_of_a_stepped_group_is_refused(first, then, stepped_by,
                                                               refused_by):
    """The momentum holds coordinates in the basis it was stepped with: a step after
    ``projection`` changed is refused, by step() and step_param() alike, nothing written,
    and setting it back steps on."""
    p = torch.nn.Parameter(torch.randn(12, 40) * 0.1)
    opt = flora_ext.Flora([p], lr=0.05, rank=RANK, beta1=0.9, projection=first)

    def step(how):
        p.grad = torch.randn(p.shape)
        opt.step() if how == "step" else opt.step_param(p)

    step(stepped_by)
    step(stepped_by)
    before = p.detach().clone()
    momentum = opt.state[p]["momentum"].clone()
    opt.param_groups[0]["projection"] = then
    with pytest.raises(ValueError, match=rf"^flora: param group 0 has projection='{then}', "
                                         rf"but its compressed momentum was stepped with "
                                         rf"projection='{first}'"):
        step(refused_by)
    assert torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["momentum"], momentum) and opt.state[p]["step"] == 2
    opt.param_groups[0]["projection"] = first
    step(refused_by)
    assert opt.state[p]["step"] == 3


# --------------------------------------------------------------- skip_nonfinite and 8-bit


def test_skip_nonfinite_moves_the_momentum_with_the_orthogonal_transfer():
    """A NaN gradient on the resampling step 3 (and an inf at 5): the momentum moves to the
    next basis with down_o'(up_o(M_o)) and nothing is added (docs/FLORA.md §4.8)."""
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


CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not flora_ext.cuda_compiled(),
                          reason="needs a CUDA device and a CUDA build of flora_ext")


# ------------------------------------------------------------------ CUDA against the CPU
#
# Tolerances are those of tests/test_cuda.py's CUDA-vs-CPU tests of the same path:
# unfused with exact fp32 GEMMs (tf32=False) 1e-5 on parameters and state
# (test_cuda_step_matches_cpu), 16-bit parameters 1e-2 / 1e-3 (bfloat16 / float16,
# test_cuda_half_params_match_cpu); fused (tf32=True, fp16 projection operands) on the summed
# update 2e-3 / 2e-2 / 5e-3 (float32 / bfloat16 / float16) and 5x that on the momentum
# (test_fused_momentum_matches_cpu). kappa = 3 over 8 steps: resamples at steps 3 and 6.

ORTHO_CUDA = dict(lr=1e-2, beta1=0.9, kappa=3, projection="orthogonal")
FUSED_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _cuda_run(shape, device, dtype=torch.float32, steps=8, seed=2, nan_at=None, **hp):
    """Flora(projection="orthogonal") for `steps` steps on `device`; `nan_at`: the step
    (1-based) whose gradient gets a NaN. The data of 8 steps is drawn whatever `steps` is.
    Returns (p0, p after each step, optimizer, p)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen).to(dtype)
    grads = [(torch.randn(shape, generator=gen) * (0.1 + t)).to(dtype)
             for t in range(max(steps, 8))][:steps]
    if nan_at is not None and nan_at <= steps:
        grads[nan_at - 1].view(-1)[3] = float("nan")
    p = torch.nn.Parameter(p0.to(device, copy=True))
    opt = flora_ext.Flora([p], **dict(ORTHO_CUDA, **hp))
    history = []
    for g in grads:
        p.grad = g.to(device)
        opt.step()
        history.append(p.detach().cpu().clone())
    return p0, history, opt, p


# left (n < m) and right (n >= m), ranks that keep the unfused passes or run tf32=False;
# rank 176: W's float64 triangle in shared memory near its limit; 256 (left and right):
# past it (r > 239 on an H100), in global memory
UNFUSED_CASES = [((16, 40), 4), ((40, 16), 4), ((96, 200), 32), ((200, 96), 8),
                 ((512, 1024), 176), ((512, 1024), 256), ((1024, 512), 256)]


@CUDA
@pytest.mark.parametrize("shape,rank", UNFUSED_CASES, ids=str)
def test_cuda_unfused_matches_cpu(shape, rank):
    """tf32=False: P_o = W P in float64 from the fp32 P, W from the float64 Gram, then exact
    fp32 cuBLAS GEMMs on P_o."""
    _, hc, oc, pc = _cuda_run(shape, "cuda", rank=rank, tf32=False)
    _, hp, op, pp = _cuda_run(shape, "cpu", rank=rank, tf32=False)
    assert rel_err(hc[-1], hp[-1]) <= 1e-5
    assert_states_close(oc.state[pc], op.state[pp], 1e-5)
    # and it is not the Gaussian projection's result
    _, hg, og, pg = _cuda_run(shape, "cuda", rank=rank, tf32=False, projection="gaussian")
    assert rel_err(og.state[pg]["momentum"].cpu(), op.state[pp]["momentum"]) > 1e-3


@CUDA
@pytest.mark.parametrize("dtype,stochastic_rounding",
                         [(torch.bfloat16, False), (torch.bfloat16, True),
                          (torch.float16, False)], ids=str)
@pytest.mark.parametrize("shape", [(16, 40), (40, 16)], ids=str)
def test_cuda_unfused_half_params_match_cpu(shape, dtype, stochastic_rounding):
    hp = dict(rank=4, tf32=False, stochastic_rounding=stochastic_rounding)
    _, hc, oc, pc = _cuda_run(shape, "cuda", dtype, **hp)
    _, hp_, op, pp = _cuda_run(shape, "cpu", dtype, **hp)
    assert hc[-1].dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(hc[-1], hp_[-1]) <= tol
    assert rel_err(oc.state[pc]["momentum"].cpu(), op.state[pp]["momentum"]) <= 5 * tol


# Shapes that fuse (n % 4 == 0, m % 8 == 0, rank % 8 == 0): left and right, a rank slice
# with partial edges (40), 16-bit parameters.
FUSED_ORTHO_CASES = [
    ((256, 1024), torch.float32, 64),
    ((128, 512), torch.float32, 64),  # r = half of P's long side: the largest that fuses
    # W's packed triangle in shared memory in float64 (r <= 239 on an H100), in float (r <=
    # 339), then in global memory (float64)
    ((512, 1024), torch.float32, 176),
    ((512, 1024), torch.float32, 256),
    ((1024, 512), torch.bfloat16, 256),
    ((768, 1024), torch.float32, 344),
    ((1024, 512), torch.float32, 40),
    ((512, 2048), torch.bfloat16, 64),
    ((1024, 256), torch.float16, 32),
]


@CUDA
@pytest.mark.parametrize("shape,dtype,rank", FUSED_ORTHO_CASES, ids=str)
def test_cuda_fused_matches_cpu(shape, dtype, rank):
    """tf32=True (the default): W from the Gram of the fp16 P, P_o = W P by an fp16 GEMM and
    rounded to fp16 in both layouts; then the Gaussian path's kernels on P_o."""
    p0, hc, oc, pc = _cuda_run(shape, "cuda", dtype, rank=rank)
    _, hp, op, pp = _cuda_run(shape, "cpu", dtype, rank=rank)
    dc, dp = hc[-1].double() - p0.double(), hp[-1].double() - p0.double()
    assert dp.abs().max() > 0
    tol = FUSED_TOL[dtype]
    assert rel_err(dc, dp) <= tol
    assert rel_err(oc.state[pc]["momentum"].cpu(), op.state[pp]["momentum"]) <= 5 * tol
    assert oc.state[pc]["seed"] == op.state[pp]["seed"]


@CUDA
@pytest.mark.parametrize("shape,dtype,rank", [FUSED_ORTHO_CASES[0], FUSED_ORTHO_CASES[3]],
                         ids=str)
def test_cuda_fused_and_unfused_agree(shape, dtype, rank, tuning):
    """fused_momentum=0 takes the unfused passes (both TF32): the two must differ, a little,
    which also shows that the fused case above ran the fused passes."""
    runs = {}
    for flag in (0, 1):
        tuning(fused_momentum=flag)
        p0, h, o, p = _cuda_run(shape, "cuda", dtype, rank=rank)
        runs[flag] = (h[-1].double() - p0.double(), o.state[p]["momentum"].cpu())
    (d0, m0), (d1, m1) = runs[0], runs[1]
    assert not torch.equal(d0, d1)
    assert rel_err(d1, d0) <= 2e-3
    assert rel_err(m1, m0) <= 1e-2


@CUDA
@pytest.mark.parametrize("shape,rank", [((32, 64), 32), ((64, 32), 32), ((64, 256), 48)],
                         ids=str)
def test_cuda_near_square_projections_match_cpu(shape, rank):
    """r at or near P's long side (the shorter side; P square for the first two): Gram
    condition numbers up to ~1e6. Such tasks do not fuse (r > long / 2), tf32=True
    notwithstanding; the unfused path forms the Gram, W and P_o = W P in float64 and keeps
    its GEMMs exact, so it matches the CPU path (float64 Gram, Cholesky factor and solve) to
    about float32's rounding of P_o times the steps' amplification: 1e-3 on the momentum
    and the update."""
    p0, hc, oc, pc = _cuda_run(shape, "cuda", rank=rank)
    _, hp, op, pp = _cuda_run(shape, "cpu", rank=rank)
    mc, mp = oc.state[pc]["momentum"].cpu(), op.state[pp]["momentum"]
    assert torch.isfinite(mc).all()
    assert rel_err(mc, mp) <= 1e-3
    assert rel_err(hc[-1].double() - p0.double(), hp[-1].double() - p0.double()) <= 1e-3


def _group_run(device, projections, groups=None, shape=(256, 520), steps=4, seed=17):
    """Param groups of two tensors of `shape` each, one a projection (the same shape in
    every group: one fused shape group each); the optimizer takes the first `groups` of
    them (all by default), the data is drawn for all. Returns the updates of those."""
    groups = len(projections) if groups is None else groups
    gen = torch.Generator().manual_seed(seed)
    p0 = [[torch.randn(shape, generator=gen) for _ in range(2)] for _ in projections]
    params = [[torch.nn.Parameter(p.to(device, copy=True)) for p in ps] for ps in p0]
    opt = flora_ext.Flora([dict(params=ps, projection=proj)
                           for ps, proj in zip(params[:groups], projections)],
                          lr=1e-2, beta1=0.9, rank=32, kappa=2)
    for _ in range(steps):
        for ps in params:
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
        opt.step()
    return [[p.detach().cpu().double() - q.double() for p, q in zip(ps, qs)]
            for ps, qs in zip(params[:groups], p0)]


@CUDA
@pytest.mark.parametrize("min_batched", [2, 4])
def test_cuda_gaussian_and_orthogonal_groups_in_one_step(min_batched, tuning):
    """Two param groups of the same shape, one Gaussian, one orthogonal, in one step, each
    a fused shape group of two tensors (min_batched 2: batched cuBLAS; 4: one GEMM a
    tensor): both as the CPU path; the Gaussian group's bits as without the other group."""
    tuning(min_batched=min_batched)
    projections = ["gaussian", "orthogonal"]
    mixed = _group_run("cuda", projections)
    cpu = _group_run("cpu", projections)
    for a_group, b_group in zip(mixed, cpu):
        for a, b in zip(a_group, b_group):
            assert b.abs().max() > 0
            assert rel_err(a, b) <= FUSED_TOL[torch.float32]
    gaussian_alone = _group_run("cuda", projections, groups=1)
    for a, b in zip(mixed[0], gaussian_alone[0]):
        assert torch.equal(a, b)
    # the same data through the Gaussian projection: the orthogonal group's result differs
    all_gaussian = _group_run("cuda", ["gaussian", "gaussian"])
    assert rel_err(mixed[1][0], all_gaussian[1][0]) > 1e-3


@CUDA
@pytest.mark.parametrize("tf32", [True, False], ids=["fused", "unfused"])
def test_cuda_skip_nonfinite_on_a_resample_step(tf32):
    """A NaN gradient on a resample step (3): the parameter and its second moment stay,
    the momentum moves to the next basis P_o' (nothing added), as on the CPU."""
    shape, rank = (256, 520), 32
    hp = dict(rank=rank, tf32=tf32, skip_nonfinite=True)
    _, hc, oc, pc = _cuda_run(shape, "cuda", nan_at=3, steps=5, **hp)
    _, hp_, op, pp = _cuda_run(shape, "cpu", nan_at=3, steps=5, **hp)
    assert torch.equal(hc[2], hc[1])  # step 3 skipped
    assert not torch.equal(hc[3], hc[2])
    assert oc.nonfinite_skips.item() == op.nonfinite_skips.item() == 1
    tol = 2e-3 if tf32 else 1e-5
    assert rel_err(hc[-1], hp_[-1]) <= tol
    assert rel_err(oc.state[pc]["momentum"].cpu(), op.state[pp]["momentum"]) <= 5 * tol
    assert oc.state[pc]["seed"] == op.state[pp]["seed"]

    # Stopped right after the skip: the momentum moved (not kept), the rest unchanged.
    _, h2, o2, p2 = _cuda_run(shape, "cuda", nan_at=3, steps=3, **hp)
    _, _, o1, p1 = _cuda_run(shape, "cuda", nan_at=3, steps=2, **hp)
    _, _, oq, pq = _cuda_run(shape, "cpu", nan_at=3, steps=3, **hp)
    s2, s1 = o2.state[p2], o1.state[p1]
    assert torch.equal(p2.detach(), p1.detach())
    for key in ("row_second_moment", "col_second_moment"):
        assert torch.equal(s2[key], s1[key]), key
    assert not torch.equal(s2["momentum"], s1["momentum"])
    assert rel_err(s2["momentum"].cpu(), oq.state[pq]["momentum"]) <= 5 * tol


def _resume_across(first, second):
    """Steps 1-7 on `first`, a checkpoint, steps 8-12 on `second`; against 12 steps on
    the CPU (tf32=False, exact fp32 GEMMs)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(16, 40), (40, 16), (37,)]
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]

    def make(device, params):
        ps = [torch.nn.Parameter(p.detach().clone().to(device)) for p in params]
        return ps, flora_ext.Flora(ps, lr=1e-2, beta1=0.9, rank=4, kappa=5, tf32=False,
                                   projection="orthogonal")

    def steps(ps, opt, gs):
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.to(p.device)
            opt.step()

    ref_ps, ref_opt = make("cpu", params0)
    steps(ref_ps, ref_opt, grads)
    a_ps, a_opt = make(first, params0)
    steps(a_ps, a_opt, grads[:7])
    b_ps, b_opt = make(second, [p.cpu() for p in a_ps])
    b_opt.load_state_dict(copy.deepcopy(a_opt.state_dict()))
    assert all(t.device.type == second for s in b_opt.state.values()
               for t in s.values() if isinstance(t, torch.Tensor))
    assert b_opt.param_groups[0]["projection"] == "orthogonal"
    steps(b_ps, b_opt, grads[7:])
    for a, b in zip(b_ps, ref_ps):
        assert rel_err(a.detach().cpu(), b.detach()) <= 1e-5


@CUDA
def test_cpu_checkpoint_resumes_on_cuda():
    _resume_across("cpu", "cuda")


@CUDA
def test_cuda_checkpoint_resumes_on_cpu():
    _resume_across("cuda", "cpu")


@CUDA
def test_cuda_quantized_state_matches_cpu():
    """quantization=True runs the same op on dequantized state: as tests/test_quantization.py's
    CUDA-vs-CPU step (tf32=False), parameters within 3e-5."""
    shapes = [(16, 40), (40, 16)]

    def train(device):
        gen = torch.Generator().manual_seed(8)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        opt = flora_ext.Flora(ps, **dict(ORTHO_CUDA, rank=4), tf32=False, quantization=True)
        for t in range(6):
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=gen) * (0.1 + t)).to(device)
            opt.step()
        return [p.detach().cpu() for p in ps]

    for a, b in zip(train("cuda"), train("cpu")):
        assert rel_err(a, b) < 3e-5
