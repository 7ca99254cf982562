"""The flora ops themselves: projection generator, op schemas, argument checks."""
import math
import struct

import pytest
import torch

import flora_ext
from conftest import DEVICES

# --- Philox4x32-10 and Box-Muller written out from their definitions ---------
_MASK = 0xFFFFFFFF


def _mulhilo(a, b):
    prod = a * b
    return prod >> 32, prod & _MASK


def philox4x32_10(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK, (k1 + 0xBB67AE85) & _MASK
    return c0, c1, c2, c3


def _to_f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def python_projection(seed, rows, cols, rank):
    scale = 1.0 / math.sqrt(rank)
    out = []
    for q in range((rows * cols + 3) // 4):
        w = philox4x32_10((0, 0, q & _MASK, q >> 32), (seed & _MASK, seed >> 32))
        for a, b in ((w[0], w[1]), (w[2], w[3])):
            u1 = a * 2.0**-32 + 2.0**-33
            u2 = b * 2.0**-32 + 2.0**-33
            radius = scale * math.sqrt(-2.0 * math.log(u1))
            out += [_to_f32(radius * math.sin(2 * math.pi * u2)),
                    _to_f32(radius * math.cos(2 * math.pi * u2))]
    return torch.tensor(out[: rows * cols], dtype=torch.float32).view(rows, cols)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 7, 2**63 - 1])
def test_projection_is_philox_box_muller(seed):
    ours = flora_ext.projection(seed, 6, 7, rank=3)
    expected = python_projection(seed, 6, 7, rank=3)
    ulp = torch.finfo(torch.float32).eps * expected.abs()
    assert ((ours - expected).abs() <= ulp).all()


@pytest.mark.parametrize("device", DEVICES)
def test_projection_statistics(device):
    rank, rows, cols = 64, 256, 512
    n = rows * cols
    p = flora_ext.projection(7, rows, cols, rank=rank, device=device).double().cpu()
    sigma2 = 1.0 / rank
    # 5-sigma bounds of the sample mean and variance of n i.i.d. N(0, 1/r) draws
    assert abs(p.mean().item()) < 5 * math.sqrt(sigma2 / n)
    assert abs(p.var().item() / sigma2 - 1) < 5 * math.sqrt(2.0 / n)
    inside = (p.abs() < math.sqrt(sigma2)).double().mean().item()
    assert abs(inside - 0.682689) < 5 * math.sqrt(0.6827 * 0.3173 / n)
    # E[P^T P] = I for the left projection (P is r x n)
    gram = p.T @ p  # 512 x 512 from 256 draws per entry: diag ~ 256/64 = 4
    assert abs(gram.diagonal().mean().item() / (rows / rank) - 1) < 0.05


def test_projections_of_different_seeds_are_uncorrelated():
    n = 128 * 256
    a = flora_ext.projection(1, 128, 256, rank=16).flatten().double()
    for seed in (2, flora_ext.next_seed(1), 2**62):
        b = flora_ext.projection(seed, 128, 256, rank=16).flatten().double()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)
        assert not torch.equal(a, b)


def test_projection_entries_depend_on_seed_and_index_only():
    a = flora_ext.projection(5, 4, 8, rank=2)
    b = flora_ext.projection(5, 2, 16, rank=2)
    assert torch.equal(a.flatten(), b.flatten())
    assert torch.equal(a, flora_ext.projection(5, 4, 8, rank=2))


def test_next_seed_stays_in_int63_and_moves():
    seen = set()
    s = 0
    for _ in range(1000):
        s = flora_ext.next_seed(s)
        assert 0 <= s < 2**63
        seen.add(s)
    assert len(seen) == 1000
    assert flora_ext.next_seed(2**63 - 1) < 2**63


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (256, 1000), (37, 4)])
def test_half_projection_is_the_float32_one_rounded(device, dtype, shape):
    # Written in 16 bits directly, as FloraAccumulator's GEMMs read it: the same bits as the
    # float32 matrix's .to(dtype) (round to nearest even), numel of any residue mod 4 included.
    full = flora_ext.projection(11, *shape, rank=8, device=device)
    half = flora_ext.projection(11, *shape, rank=8, device=device, dtype=dtype)
    assert half.dtype == dtype and half.shape == shape
    assert torch.equal(half, full.to(dtype))
    assert not torch.equal(half.float(), full)  # rounded: not a float32 matrix in disguise


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-1), "seed"), (dict(rank=0), "rank"), (dict(rows=-1), "shape"),
    (dict(dtype=torch.float64), "dtype")])
def test_projection_bad_arguments(kwargs, match):
    args = dict(seed=1, rows=3, cols=4, rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        flora_ext.projection(**args)


def test_fill_projection_rejects_non_float32():
    with pytest.raises(RuntimeError, match="flora: out must be float32, bfloat16 or float16"):
        torch.ops.flora.fill_projection_(torch.empty(3, 3, dtype=torch.float64), 1, 1.0)


# --- step_ ------------------------------------------------------------------
STEP_KWARGS = dict(step=1, seed=3, lr=1e-2, beta1=0.9, eps1=1e-30, eps2=1e-3,
                   clip_threshold=1.0, decay_rate=-0.8, weight_decay=0.0, rank=4, kappa=1,
                   scale_parameter=True, relative_step=False, warmup_init=False,
                   factorize_second_moment=True)


def step_args(layout, device="cpu", dtype=torch.float32):
    """(args, kwargs) of a valid step_ call: compressed, dense or no momentum."""
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(STEP_KWARGS)
    if layout == "compressed":
        p = torch.randn(16, 40, generator=gen)
        state = [torch.rand(16) + 0.1, torch.rand(40) + 0.1, None, torch.randn(4, 40)]
    elif layout == "factored-none":
        p = torch.randn(16, 40, generator=gen)
        state = [torch.rand(16) + 0.1, torch.rand(40) + 0.1, None, None]
        kwargs["beta1"] = 0.0
    else:  # full second moment, dense momentum
        p = torch.randn(5, 3, 2, generator=gen)
        state = [None, None, torch.rand(5, 3, 2) + 0.1, torch.randn(5, 3, 2)]
    g = torch.randn(p.shape, generator=gen)
    to = dict(device=device)
    state = [s.to(**to) if s is not None else None for s in state]
    return [p.to(dtype=dtype, **to), g.to(dtype=dtype, **to), *state], kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["compressed", "factored-none", "full-dense"])
def test_opcheck_step(layout, device):
    args, kwargs = step_args(layout, device)
    torch.library.opcheck(torch.ops.flora.step_.default, args, kwargs)
    kwargs["step"] = 2
    kwargs["kappa"] = 2  # with a basis transfer
    torch.library.opcheck(torch.ops.flora.step_.default, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fill_projection(device):
    torch.library.opcheck(torch.ops.flora.fill_projection_.default,
                          (torch.empty(9, 5, device=device), 11, 0.25))


def _bad(args_fn=None, **kw):
    return (args_fn, kw)


BAD_STEP_CALLS = {
    "sparse grad": (lambda a: a.__setitem__(1, a[1].to_sparse()), {}, "sparse"),
    "complex grad": (lambda a: a.__setitem__(1, torch.complex(a[1], a[1])), {}, "complex"),
    "grad shape": (lambda a: a.__setitem__(1, a[1][:, :-1].contiguous()), {}, "grad must have shape"),
    "grad dtype": (lambda a: a.__setitem__(1, a[1].double()), {}, "grad must have dtype"),
    "param dtype": (lambda a: [a.__setitem__(0, a[0].double()), a.__setitem__(1, a[1].double())],
                    {}, "param must be float32"),
    "lr": (None, dict(lr=-1.0), "lr must be"),
    "lr nan": (None, dict(lr=float("nan")), "lr must be"),
    "rank": (None, dict(rank=-1), "rank must be"),
    "kappa": (None, dict(kappa=0), "kappa must be"),
    "beta1": (None, dict(beta1=1.0), "beta1 must be"),
    "eps1": (None, dict(eps1=-1.0), "eps1 must be"),
    "eps1 zero": (None, dict(eps1=0.0), r"eps1 must be finite and >= 2\^-126"),
    "eps1 subnormal": (None, dict(eps1=2.0**-127), r"eps1 must be finite and >= 2\^-126"),
    "eps2": (None, dict(eps2=float("inf")), "eps2 must be"),
    "clip": (None, dict(clip_threshold=0.0), "clip_threshold must be"),
    "decay_rate": (None, dict(decay_rate=0.5), "decay_rate must be"),
    "weight_decay": (None, dict(weight_decay=-1.0), "weight_decay must be"),
    "step": (None, dict(step=0), "step must be"),
    "seed": (None, dict(seed=-5), "seed must be"),
    "warmup_init": (None, dict(warmup_init=True), "warmup_init requires"),
    "row shape": (lambda a: a.__setitem__(2, torch.zeros(17)), {}, "row_second_moment must have shape"),
    "row dtype": (lambda a: a.__setitem__(2, a[2].double()), {}, "row_second_moment must be float32"),
    "col missing": (lambda a: a.__setitem__(3, None), {}, "col_second_moment must be given"),
    "second moment extra": (lambda a: a.__setitem__(4, torch.zeros(16, 40)), {}, "second_moment must be None"),
    "momentum missing": (lambda a: a.__setitem__(5, None), {}, "momentum must be given"),
    "momentum shape": (lambda a: a.__setitem__(5, torch.zeros(8, 40)), {}, "momentum must have shape"),
    "momentum for rank change": (None, dict(rank=2), "momentum must have shape"),
    "momentum non-contiguous": (lambda a: a.__setitem__(5, torch.zeros(40, 4).t()), {}, "contiguous"),
}


@pytest.mark.parametrize("name", list(BAD_STEP_CALLS))
def test_step_rejects_bad_input_and_changes_nothing(name):
    mutate, kw, match = BAD_STEP_CALLS[name]
    args, kwargs = step_args("compressed")
    if mutate:
        mutate(args)
    kwargs.update(kw)
    before = [a.clone() if isinstance(a, torch.Tensor) and a.layout == torch.strided else a
              for a in args]
    with pytest.raises(RuntimeError, match="flora: " + ".*" + match.split()[0]):
        torch.ops.flora.step_(*args, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.step_(*args, **kwargs)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor) and a.layout == torch.strided:
            assert torch.equal(a, b)


def test_step_of_empty_parameter_is_a_no_op():
    p = torch.empty(0, 5)
    torch.ops.flora.step_(p, torch.empty(0, 5), torch.zeros(0), torch.zeros(5), None, None,
                          **{**STEP_KWARGS, "beta1": 0.0})
    assert p.shape == (0, 5)


# --- step_group_ --------------------------------------------------------------
GROUP_KWARGS = {k: v for k, v in STEP_KWARGS.items() if k not in ("step", "seed")}


def group_args(device="cpu"):
    """A step_group_ call over three layouts (beta1 0.9, rank 4), and the per-parameter
    step_ arguments (param, grad, row, col, second moment, momentum) it stands for."""
    per_param = [step_args(layout, device)[0] for layout in ("compressed", "full-dense")]
    p = torch.randn(8, 64, device=device)  # aspect ratio 8: dense momentum
    per_param.append([p, torch.randn_like(p), torch.rand(8, device=device) + 0.1,
                      torch.rand(64, device=device) + 0.1, None, torch.randn_like(p)])
    states = [t for args in per_param for t in args[2:] if t is not None]
    group = [[a[0] for a in per_param], [a[1] for a in per_param], states, [1, 5, 3], [3, 0, 0]]
    return group, per_param, dict(GROUP_KWARGS, kappa=5)


@pytest.mark.parametrize("device", DEVICES)
def test_step_group_equals_one_step_per_parameter(device):
    group, per_param, kwargs = group_args(device)
    single = [[t.clone() if isinstance(t, torch.Tensor) else t for t in args] for args in per_param]
    torch.ops.flora.step_group_(*group, **kwargs)
    for k, args in enumerate(single):
        torch.ops.flora.step_(*args, step=group[3][k], seed=group[4][k], **kwargs)
        for grouped, alone in zip(per_param[k], args):
            assert (grouped is None and alone is None) or torch.equal(grouped, alone)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_step_group(device):
    group, _, kwargs = group_args(device)
    torch.library.opcheck(torch.ops.flora.step_group_.default, group, kwargs)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a[1].pop(), "grads must have one entry per parameter"),
    (lambda a: a[3].pop(), "steps must have one entry per parameter"),
    (lambda a: a[2].pop(), "parameter 2 needs its momentum"),
    (lambda a: a[2].append(torch.zeros(3)), "states holds 9 tensors, the parameters. layouts need 8"),
    (lambda a: a[2].__setitem__(6, torch.zeros(8, 63)), "in parameter 2 of the group"),
    (lambda a: a[1].__setitem__(1, a[1][1].to_sparse()), "sparse"),
])
def test_step_group_rejects_bad_input_and_changes_nothing(mutate, match):
    group, _, kwargs = group_args()
    mutate(group)
    before = [t.clone() for t in group[0]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.step_group_(*group, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(group[0], before))


@pytest.mark.parametrize("eps1", [0.0, 2.0**-127, 1e-45, float("nan")])
def test_step_group_rejects_eps1_below_float32_smallest_normal(eps1):
    """The op refuses what Flora and flora::Flora refuse: an eps1 that float32 loses would
    turn a zero gradient row into 0 / 0."""
    group, _, kwargs = group_args()
    before = [t.clone() for t in group[0]]
    with pytest.raises(RuntimeError, match=r"flora: eps1 must be finite and >= 2\^-126 "
                                           r"\(float32's smallest normal"):
        torch.ops.flora.step_group_(*group, **dict(kwargs, eps1=eps1))
    assert all(torch.equal(a, b) for a, b in zip(group[0], before))


def test_step_accepts_the_smallest_eps1_and_stays_finite_on_a_zero_gradient():
    from flora_ext.hyperparams import MIN_EPS1
    args, kwargs = step_args("factored-none")
    args[1].zero_()
    args[2].zero_()
    args[3].zero_()
    kwargs.update(eps1=MIN_EPS1, weight_decay=0.0)
    torch.ops.flora.step_(*args, **kwargs)
    assert torch.isfinite(args[0]).all() and torch.isfinite(args[2]).all()


@pytest.mark.parametrize("norms,known,match", [
    (lambda: torch.zeros(3), [], "param_norms must be a contiguous float64 vector with one "
                                 "entry per parameter \\(3\\), got Float"),
    (lambda: torch.zeros(2, dtype=torch.float64), [], "one entry per parameter \\(3\\)"),
    (lambda: torch.zeros(6, dtype=torch.float64)[::2], [], "contiguous float64"),
    (lambda: torch.zeros(3, dtype=torch.float64), [1, 0], "norms_known must be empty or have "
                                                          "one entry per parameter \\(3\\), got 2"),
    (lambda: torch.zeros(3, dtype=torch.float64), [1, 2, 0], "entries must be 0 or 1, got 2"),
    (lambda: None, [1, 1, 1], "norms_known needs param_norms"),
])
def test_step_group_rejects_bad_param_norms(norms, known, match):
    group, _, kwargs = group_args()
    before = [t.clone() for t in group[0]]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.step_group_(*group, param_norms=norms(), norms_known=known, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(group[0], before))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_step_group_with_param_norms(device):
    group, _, kwargs = group_args(device)
    norms = torch.zeros(3, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.flora.step_group_.default, group,
                          dict(kwargs, param_norms=norms, norms_known=[0, 0, 0]))
