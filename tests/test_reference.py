"""The CPU kernels of flora_ext against the float64 reference (tests/reference.py).

Every case runs the public optimizer ``flora_ext.Flora`` for 50 steps with fresh random gradients
(of varying scale) and runs ``reference.reference_step`` beside it on the same gradients, then
compares, after every step, the parameter and every state tensor:

    rel_err(a, b) = ||a - b|| / ||b||  <=  1e-5        (fp32 parameters, all state)

Both sides use the same projection matrices (the reference asks flora_ext.projection for them),
so the compressed-momentum cases test the formulas, not the random numbers.

Half-precision parameters: the optimizer computes in fp32 and rounds the new parameter once per
step; the reference computes in float64 and we round its parameter to the same dtype after every
step and feed the rounded value back in, so both trajectories see the same inputs. Two results
that agree to ~1e-7 before rounding round to the same half value except when they straddle a
rounding boundary; then they differ by one ulp in that element (2^-8 = 3.9e-3 relative for bf16,
2^-11 = 4.9e-4 for fp16), and that difference persists. A norm-wise tolerance of 1e-2 (bf16) /
1e-3 (fp16) is about 2.5 / 2 ulps, so it passes even if every element disagreed by one ulp; we
therefore also require that at most 2% of the elements differ at all (a handful of boundary cases
are expected, a systematic error moves far more). The state (second moments, momentum) depends
only on the gradients, which are identical on both sides, so it keeps the 1e-5 tolerance.
"""

import math
import os
import sys
import zlib
from dataclasses import dataclass, field

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

import flora_ext  # noqa: E402

STEPS = 50
KAPPA = 7
TOL = 1e-5
HALF_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
HALF_MAX_DIFFERING_FRACTION = 0.02


def rel_err(a, b):
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return num
    return num / den


@dataclass
class Case:
    id: str
    shape: tuple
    hp: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    expect: str = None  # expected momentum layout: 'none' | 'dense' | 'compressed'
    seed: int = 0
    init_scale: float = 1.0  # of the initial parameter


# Defaults of the cases below: compressed momentum where the shape allows it, kappa = 7.
# lr = 0.1 (relative to RMS(p)) is large on purpose: each step moves p by ~10%, so an error in the
# update shows in ||p - p_ref|| / ||p_ref|| instead of hiding behind the initial parameter.
BASE = dict(lr=1e-1, rank=4, kappa=KAPPA, beta1=0.9)

CASES = [
    # shapes
    Case("1d", (37,), expect="dense"),
    Case("0d", (), expect="dense"),
    Case("square_24x24", (24, 24), expect="compressed"),
    Case("wide_16x40_left", (16, 40), expect="compressed"),
    Case("tall_40x16_right", (40, 16), expect="compressed"),
    Case("aspect_4_exactly_8x32", (8, 32), expect="compressed"),
    Case("aspect_gt4_8x64_dense", (8, 64), expect="dense"),
    Case("aspect_gt4_64x8_dense", (64, 8), expect="dense"),
    Case("no_aspect_limit_8x64_left", (8, 64), dict(max_aspect_ratio=None), expect="compressed"),
    Case("no_aspect_limit_64x8_right", (64, 8), dict(max_aspect_ratio=None), expect="compressed"),
    Case("aspect_limit_2_8x17_dense", (8, 17), dict(max_aspect_ratio=2.0), expect="dense"),
    Case("aspect_limit_2.125_8x17", (8, 17), dict(max_aspect_ratio=2.125), expect="compressed"),
    Case("rank_gt_min_dim_8x24_r12_dense", (8, 24), dict(rank=12), expect="dense"),
    Case("rank_gt_min_dim_8x40_r12_dense", (8, 40), dict(rank=12), expect="dense"),
    Case("rank_eq_min_dim_8x24_r8", (8, 24), dict(rank=8), expect="compressed"),
    Case("3d_4x6x8", (4, 6, 8), expect="dense"),
    Case("4d_2x3x4x5", (2, 3, 4, 5), expect="dense"),
    Case("row_vector_1x30", (1, 30), dict(rank=1), expect="dense"),
    # momentum modes
    Case("no_momentum_beta1_none_16x40", (16, 40), dict(beta1=None), expect="none"),
    Case("no_momentum_beta1_none_40x16", (40, 16), dict(beta1=None), expect="none"),
    Case("no_momentum_beta1_zero_24x24", (24, 24), dict(beta1=0.0), expect="none"),
    Case("no_momentum_1d", (50,), dict(beta1=None), expect="none"),
    Case("dense_momentum_rank_none_16x40", (16, 40), dict(rank=None), expect="dense"),
    Case("dense_momentum_rank_zero_40x16", (40, 16), dict(rank=0), expect="dense"),
    Case("compressed_r1_20x20", (20, 20), dict(rank=1), expect="compressed"),
    Case("compressed_kappa1_16x24", (16, 24), dict(kappa=1), expect="compressed"),
    Case("compressed_beta1_0.5_32x12", (32, 12), dict(beta1=0.5), expect="compressed"),
    # weight decay, parameter scaling, step size
    Case("weight_decay_compressed_16x40", (16, 40), dict(weight_decay=0.1), expect="compressed"),
    Case("weight_decay_dense_1d", (33,), dict(weight_decay=0.1), expect="dense"),
    Case("weight_decay_no_momentum_40x16", (40, 16), dict(weight_decay=0.05, beta1=None), expect="none"),
    Case("no_scale_parameter_16x40", (16, 40), dict(scale_parameter=False, lr=5e-2), expect="compressed"),
    Case("no_scale_parameter_1d", (29,), dict(scale_parameter=False, lr=5e-2), expect="dense"),
    Case("relative_step_24x24", (24, 24), dict(lr=None, relative_step=True), expect="compressed"),
    # warmup steps are tiny (1e-6 t): small parameters (RMS below eps2, so the eps2 floor of the
    # parameter scale is what is used) or no parameter scaling keep them visible
    Case("relative_step_warmup_eps2_floor_16x40", (16, 40), dict(lr=None, relative_step=True, warmup_init=True),
         expect="compressed", init_scale=1e-6),
    Case("relative_step_no_scale_1d", (31,), dict(lr=None, relative_step=True, scale_parameter=False),
         expect="dense", init_scale=1e-2),
    Case("relative_step_warmup_wd_no_scale_40x16", (40, 16),
         dict(lr=None, relative_step=True, warmup_init=True, weight_decay=0.1, beta1=None, scale_parameter=False),
         expect="none", init_scale=1e-4),
    Case("eps2_floor_24x40", (24, 40), dict(weight_decay=0.1), expect="compressed", init_scale=1e-5),
    # second moment
    Case("unfactored_16x40", (16, 40), dict(factorize_second_moment=False), expect="dense"),
    Case("unfactored_no_momentum_40x16", (40, 16), dict(factorize_second_moment=False, beta1=None),
         expect="none"),
    # other arguments
    Case("clip_threshold_0.3_16x40", (16, 40), dict(clip_threshold=0.3), expect="compressed"),
    Case("decay_rate_-0.5_40x16", (40, 16), dict(decay_rate=-0.5), expect="compressed"),
    Case("eps_1e-3_1e-2_1d", (40,), dict(eps=(1e-3, 1e-2)), expect="dense"),
    Case("eps_1e-6_1e-2_24x24", (24, 24), dict(eps=(1e-6, 1e-2)), expect="compressed"),
    Case("base_seed_12345_16x40", (16, 40), expect="compressed", seed=12345),
    # half precision parameters (each step moves the values by many half ulps)
    Case("bf16_compressed_16x40", (16, 40), dict(lr=1e-1), dtype=torch.bfloat16, expect="compressed"),
    Case("bf16_compressed_40x16_wd", (40, 16), dict(lr=1e-1, weight_decay=0.1), dtype=torch.bfloat16,
         expect="compressed"),
    Case("bf16_1d", (64,), dict(lr=1e-1), dtype=torch.bfloat16, expect="dense"),
    Case("bf16_no_momentum_24x24", (24, 24), dict(lr=1e-1, beta1=None), dtype=torch.bfloat16, expect="none"),
    Case("fp16_compressed_24x24", (24, 24), dict(lr=2e-2), dtype=torch.float16, expect="compressed"),
    Case("fp16_dense_8x64", (8, 64), dict(lr=2e-2), dtype=torch.float16, expect="dense"),
    Case("fp16_unfactored_3d", (3, 4, 5), dict(lr=2e-2), dtype=torch.float16, expect="dense"),
]


def case_hp(case):
    hp = dict(BASE)
    hp.update(case.hp)
    return ref.full_hp(**hp)


def make_param(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def make_grad(shape, dtype, gen, spread):
    """A fresh gradient: N(0,1) entries times a fixed per-element spread times a per-step scale."""
    scale = 10.0 ** (torch.rand((), generator=gen).item() * 4.0 - 3.0)  # 1e-3 .. 10
    g = torch.randn(shape, generator=gen, dtype=torch.float32) * spread * scale
    return g.to(dtype)


def expected_state_keys(layout):
    keys = {"step"}
    if layout["factored"]:
        keys |= {"row_second_moment", "col_second_moment"}
    else:
        keys.add("second_moment")
    if layout["momentum"] != "none":
        keys.add("momentum")
    if layout["momentum"] == "compressed":
        keys.add("seed")
    return keys


def compare_state(opt_state, ref_state, where):
    assert set(opt_state.keys()) == set(ref_state.keys()), f"{where}: state keys"
    assert int(opt_state["step"]) == ref_state["step"], f"{where}: step"
    if "seed" in ref_state:
        assert int(opt_state["seed"]) == ref_state["seed"], f"{where}: seed"
    for key, want in ref_state.items():
        if key in ("step", "seed"):
            continue
        got = opt_state[key]
        assert isinstance(got, torch.Tensor), f"{where}: {key} is not a tensor"
        assert got.dtype == torch.float32, f"{where}: {key} dtype {got.dtype}"
        assert tuple(got.shape) == tuple(want.shape), f"{where}: {key} shape {tuple(got.shape)}"
        err = rel_err(got, want)
        assert err <= TOL, f"{where}: {key} rel err {err:.3e} > {TOL:g}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cpu_kernel_matches_reference(case):
    hp = case_hp(case)
    lay = ref.layout_for(case.shape, hp)
    assert lay["momentum"] == case.expect, f"case table: layout is {lay['momentum']}"

    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    p = torch.nn.Parameter((make_param(case.shape, torch.float32, gen) * case.init_scale).to(case.dtype))
    start = p.detach().clone()
    spread = torch.exp(torch.randn(case.shape, generator=gen))  # entries of different sizes
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(hp, case.seed))

    half = case.dtype in HALF_TOL
    ref_p = p.detach().to(torch.float64).clone()
    ref_state = ref.init_state(ref_p, hp, ref.param_seed(case.seed, 1))
    seeds_seen = {ref_state["seed"]} if "seed" in ref_state else set()

    for t in range(1, STEPS + 1):
        g = make_grad(case.shape, case.dtype, gen, spread)
        p.grad = g.clone()
        opt.step()
        assert p.grad is not None and torch.equal(p.grad, g), f"step {t}: the gradient was changed"
        assert p.dtype == case.dtype

        ref_p = ref.reference_step(ref_p, g.to(torch.float64), ref_state, hp)
        if half:
            ref_p = ref_p.to(case.dtype).to(torch.float64)

        where = f"{case.id} step {t}"
        st = opt.state[p]
        assert set(st.keys()) == expected_state_keys(lay), f"{where}: keys {sorted(st.keys())}"
        compare_state(st, ref_state, where)
        if "seed" in ref_state:
            seeds_seen.add(ref_state["seed"])
        err = rel_err(p, ref_p)
        if half:
            assert err <= HALF_TOL[case.dtype], f"{where}: param rel err {err:.3e}"
            differing = (p.detach().to(torch.float64) != ref_p).double().mean().item()
            assert differing <= HALF_MAX_DIFFERING_FRACTION, f"{where}: {differing:.1%} of elements differ"
        else:
            assert err <= TOL, f"{where}: param rel err {err:.3e} > {TOL:g}"

    # the run was not vacuous: the parameter moved, and compressed momentum changed basis
    assert rel_err(p, start) > 1e-2
    if lay["momentum"] == "compressed":
        assert len(seeds_seen) == 1 + STEPS // hp["kappa"]


def test_many_parameters_in_one_optimizer():
    """Parameters of equal and of different shapes, two param groups with different settings,
    and a parameter that has no gradient every other step: each one must follow its own
    reference trajectory (catches mix-ups when the kernels group parameters by shape)."""
    gen = torch.Generator().manual_seed(7)
    shapes_a = [(24, 40), (24, 40), (40, 24), (17,), (8, 64)]
    shapes_b = [(24, 40), (16, 16), (5, 3, 2)]
    params_a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes_a]
    params_b = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes_b]
    hp_a = ref.full_hp(lr=1e-2, rank=4, kappa=5, beta1=0.9)
    hp_b = ref.full_hp(lr=3e-2, rank=6, kappa=3, beta1=0.8, weight_decay=0.1, clip_threshold=0.5)
    base_seed = 42
    opt = flora_ext.Flora(
        [{"params": params_a}, {"params": params_b, "lr": hp_b["lr"], "rank": hp_b["rank"],
                                "kappa": hp_b["kappa"], "beta1": hp_b["beta1"],
                                "weight_decay": hp_b["weight_decay"],
                                "clip_threshold": hp_b["clip_threshold"]}],
        **{k: v for k, v in ref.optimizer_kwargs(hp_a, base_seed).items()},
    )
    everything = [(p, hp_a) for p in params_a] + [(p, hp_b) for p in params_b]
    refs = []
    for i, (p, hp) in enumerate(everything, start=1):
        refs.append([p.detach().to(torch.float64).clone(),
                     ref.init_state(p, hp, ref.param_seed(base_seed, i))])
    sometimes = params_a[1]  # no gradient on even steps

    for t in range(1, 21):
        for (p, hp), r in zip(everything, refs):
            if p is sometimes and t % 2 == 0:
                p.grad = None
                continue
            g = torch.randn(p.shape, generator=gen) * 10.0 ** (torch.rand((), generator=gen).item() * 3 - 2)
            p.grad = g
            r[0] = ref.reference_step(r[0], g.to(torch.float64), r[1], hp)
        opt.step()
        for i, ((p, hp), r) in enumerate(zip(everything, refs)):
            where = f"param {i} {tuple(p.shape)} step {t}"
            err = rel_err(p, r[0])
            assert err <= TOL, f"{where}: param rel err {err:.3e}"
            compare_state(opt.state[p], r[1], where)
    assert opt.state[sometimes]["step"] == 10


def test_parameters_get_consecutive_seeds():
    """Parameter number i (1-based, over all groups in order) starts with seed + i; parameters
    without compressed momentum still count."""
    base_seed = 1000
    shapes = [(16, 16), (16,), (12, 20), (8, 64), (20, 12)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = flora_ext.Flora(
        [{"params": params[:2]}, {"params": params[2:]}],
        lr=1e-2, rank=4, kappa=100, beta1=0.9, seed=base_seed,
    )
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    compressed = {0: base_seed + 1, 2: base_seed + 3, 4: base_seed + 5}
    for i, p in enumerate(params):
        if i in compressed:
            assert opt.state[p]["seed"] == compressed[i], f"param {i + 1}"
        else:
            assert "seed" not in opt.state[p], f"param {i + 1} is not compressed"


def test_default_seed_is_zero():
    params = [torch.nn.Parameter(torch.randn(12, 12)) for _ in range(3)]
    opt = flora_ext.Flora(params, lr=1e-2, rank=2, beta1=0.9)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert [opt.state[p]["seed"] for p in params] == [1, 2, 3]


@pytest.mark.parametrize("s", [0, 1, 2, 3, 7, 1001, 12345, 2**31 - 1, 2**32, 2**62 + 12345, 2**63 - 1])
def test_next_seed_matches_extension(s):
    assert flora_ext.next_seed(s) == ref.next_seed(s)


def test_next_seed_known_answer():
    # the first output of splitmix64 from state 0 is 0xE220A8397B1DCDAF; we keep 63 bits
    assert ref.next_seed(0) == 0xE220A8397B1DCDAF & (2**63 - 1)
    chain = [1]
    for _ in range(5):
        chain.append(ref.next_seed(chain[-1]))
    assert len(set(chain)) == 6 and all(0 <= s < 2**63 for s in chain)


def test_projection_shape_scale_and_determinism():
    a = flora_ext.projection(3, 64, 48, 16, device="cpu")
    assert a.dtype == torch.float32 and tuple(a.shape) == (64, 48)
    assert torch.equal(a, flora_ext.projection(3, 64, 48, 16, device="cpu"))
    assert not torch.equal(a, flora_ext.projection(4, 64, 48, 16, device="cpu"))
    z = a.double() * math.sqrt(16)  # should be N(0, 1)
    assert abs(z.mean().item()) < 0.1
    assert abs(z.var().item() - 1.0) < 0.1
