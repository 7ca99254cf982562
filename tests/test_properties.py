"""Property tests (hypothesis) over shapes, ranks, dtypes and options.

- CPU against the float64 reference (tests/reference.py), as tests/test_reference.py does for
  its fixed cases: float32 parameters follow the reference's trajectory within 1e-5 (relative,
  norm-wise) for a few steps, state included. Half-precision parameters are compared one step
  at a time: the reference steps from the optimizer's own (rounded) parameter, and the result
  must round to within one ulp of it in every element (the fp32 result and the float64 one
  may straddle a rounding boundary; anything systematic moves far more).
- CUDA against CPU (skipped without CUDA): several parameters in one optimizer (the CUDA
  kernels batch parameters of one group), with the tolerances of tests/test_cuda.py.

Examples are drawn at random within bounds that keep this file at well under a minute on the
CPU; a failure prints the smallest example hypothesis found.
"""
import math
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from conftest import HAS_CUDA, rel_err  # noqa: E402

import flora_ext  # noqa: E402

TOL = 1e-5
CPU_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow])

shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 48)),
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
)


@st.composite
def hyper_parameters(draw):
    relative_step = draw(st.booleans())
    return ref.full_hp(
        lr=None if relative_step else draw(st.sampled_from([1e-2, 3e-2, 1e-1])),
        rank=draw(st.one_of(st.none(), st.integers(0, 12))),
        kappa=draw(st.integers(1, 4)),
        eps=draw(st.sampled_from([(1e-30, 1e-3), (1e-6, 1e-2)])),
        clip_threshold=draw(st.sampled_from([1.0, 0.3, 10.0])),
        decay_rate=draw(st.sampled_from([-0.8, -0.5])),
        beta1=draw(st.sampled_from([None, 0.0, 0.5, 0.9])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        scale_parameter=draw(st.booleans()),
        relative_step=relative_step,
        warmup_init=relative_step and draw(st.booleans()),
        factorize_second_moment=draw(st.booleans()),
    )


def gradient(shape, gen, zero_rows):
    """N(0, 1) times a per-step scale in [1e-3, 10]; with ``zero_rows`` half the rows of a
    matrix (and half the elements otherwise) are exactly zero."""
    scale = 10.0 ** (torch.rand((), generator=gen).item() * 4.0 - 3.0)
    g = torch.randn(shape, generator=gen) * scale
    if zero_rows and g.dim() >= 1:
        keep = torch.rand(shape[:1], generator=gen) < 0.5
        g = g * keep.reshape(-1, *([1] * (g.dim() - 1)))
    return g


def ulp(x):
    """The spacing of ``x``'s dtype at each element of ``x`` (the larger of the two sides)."""
    up = torch.nextafter(x, torch.full_like(x, math.inf)) - x
    down = x - torch.nextafter(x, torch.full_like(x, -math.inf))
    return torch.maximum(up.double(), down.double())


def compare_state(state, ref_state, where):
    assert set(state) == set(ref_state), where
    assert state["step"] == ref_state["step"], where
    assert state.get("seed") == ref_state.get("seed"), where
    for key, want in ref_state.items():
        if isinstance(want, torch.Tensor):
            got = state[key]
            assert got.dtype == torch.float32 and tuple(got.shape) == tuple(want.shape), where
            err = rel_err(got, want)
            assert err <= TOL, f"{where}: {key} rel err {err:.3e}"


@CPU_SETTINGS
@given(shape=shapes, hp=hyper_parameters(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       steps=st.integers(1, 6), base_seed=st.integers(0, 2**40), data_seed=st.integers(0, 2**31),
       zero_rows=st.booleans())
def test_cpu_matches_the_float64_reference(shape, hp, dtype, steps, base_seed, data_seed,
                                           zero_rows):
    gen = torch.Generator().manual_seed(data_seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(hp, base_seed))
    ref_p = p.detach().double().clone()
    ref_state = ref.init_state(ref_p, hp, ref.param_seed(base_seed, 1))
    half = dtype != torch.float32
    for t in range(1, steps + 1):
        g = gradient(shape, gen, zero_rows).to(dtype)
        if half:  # one step from the optimizer's own parameter
            ref_p = p.detach().double().clone()
        p.grad = g
        opt.step()
        ref_p = ref.reference_step(ref_p, g.double(), ref_state, hp)
        where = f"step {t}"
        compare_state(opt.state[p], ref_state, where)
        assert p.dtype == dtype and torch.isfinite(p).all(), where
        if half:
            rounded = ref_p.to(dtype)
            off = (p.detach().double() - rounded.double()).abs()
            assert (off <= ulp(rounded)).all(), f"{where}: more than one ulp off"
        else:
            err = rel_err(p, ref_p)
            assert err <= TOL, f"{where}: param rel err {err:.3e}"


@CPU_SETTINGS
@given(group_shapes=st.lists(st.lists(shapes, min_size=1, max_size=4), min_size=1, max_size=3),
       hps=st.lists(hyper_parameters(), min_size=3, max_size=3), steps=st.integers(1, 4),
       base_seed=st.integers(0, 2**40), data_seed=st.integers(0, 2**31))
def test_cpu_groups_of_parameters_each_follow_the_reference(group_shapes, hps, steps,
                                                            base_seed, data_seed):
    """Several parameters and groups in one optimizer: each parameter follows its own
    reference trajectory with its own group's settings and seed (numbered over all groups)."""
    gen = torch.Generator().manual_seed(data_seed)
    groups, everything = [], []
    for shapes_of_group, hp in zip(group_shapes, hps):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes_of_group]
        overrides = {k: v for k, v in hp.items()}
        groups.append({"params": params, **overrides})
        everything += [(p, hp) for p in params]
    opt = flora_ext.Flora(groups, seed=base_seed, **{k: v for k, v in hps[0].items()})
    refs = [[p.detach().double().clone(), ref.init_state(p, hp, ref.param_seed(base_seed, i))]
            for i, (p, hp) in enumerate(everything, 1)]
    for t in range(1, steps + 1):
        for (p, hp), r in zip(everything, refs):
            g = gradient(tuple(p.shape), gen, False)
            p.grad = g
            r[0] = ref.reference_step(r[0], g.double(), r[1], hp)
        opt.step()
        for k, ((p, hp), r) in enumerate(zip(everything, refs)):
            where = f"parameter {k} {tuple(p.shape)} step {t}"
            compare_state(opt.state[p], r[1], where)
            assert rel_err(p, r[0]) <= TOL, where


# ------------------------------------------------------------------ CUDA against CPU

cuda_shapes = st.one_of(
    st.tuples(st.integers(1, 70000)),
    st.tuples(st.integers(1, 600), st.integers(1, 600)),
    st.tuples(st.integers(1, 3000), st.integers(1, 16)),
    st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 10)),
)


def run_steps(shapes_, hp, dtype, device, steps, data_seed, stochastic_rounding, tf32):
    gen = torch.Generator().manual_seed(data_seed)
    initial = [torch.randn(s, generator=gen).to(dtype) for s in shapes_]
    params = [torch.nn.Parameter(p0.to(device, copy=True)) for p0 in initial]
    grads = [[gradient(s, gen, False) for s in shapes_] for _ in range(steps)]
    opt = flora_ext.Flora(params, tf32=tf32, stochastic_rounding=stochastic_rounding,
                          **ref.optimizer_kwargs(hp, 5))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return [(p0.float(), p.detach().float().cpu(),
             {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()})
            for p0, p in zip(initial, params)]


def assert_update_close(pc, pp, p0, tol, steps, dtype, where):
    """The summed updates p - p0 agree within ``tol`` (relative), beyond the rounding of p
    itself (up to one ulp of p an element a step, which is all a tiny update may show)."""
    du_cuda, du_cpu = pc.double() - p0.double(), pp.double() - p0.double()
    floor = steps * torch.finfo(dtype).eps * pp.double().norm().item()
    off = (du_cuda - du_cpu).norm().item()
    assert off <= tol * du_cpu.norm().item() + floor, \
        f"{where}: update off by {off:.3e}, update {du_cpu.norm().item():.3e}, floor {floor:.3e}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run pytest on the GPU machine")
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shapes_=st.lists(cuda_shapes, min_size=1, max_size=4), hp=hyper_parameters(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       steps=st.integers(1, 5), data_seed=st.integers(0, 2**31), tf32=st.booleans(),
       stochastic_rounding=st.booleans())
def test_cuda_matches_cpu(shapes_, hp, dtype, steps, data_seed, tf32, stochastic_rounding):
    assume(not (stochastic_rounding and dtype == torch.float16))
    if hp["rank"]:
        hp["rank"] = min(hp["rank"] * 8, 64)  # ranks the CUDA GEMM paths care about
    cuda = run_steps(shapes_, hp, dtype, "cuda", steps, data_seed, stochastic_rounding, tf32)
    cpu = run_steps(shapes_, hp, dtype, "cpu", steps, data_seed, stochastic_rounding, tf32)
    # Tolerances of tests/test_cuda.py. TF32 (tf32=True; the CPU ignores it) touches only
    # the compressed momentum: its projections on the tensor cores (bf16 ones for bf16
    # gradients), 5x the update's tolerance; the second moments depend on the gradients
    # alone and agree to 1e-5 on every path.
    update_tol = {torch.float32: 2e-3 if tf32 else 1e-5, torch.bfloat16: 2e-2,
                  torch.float16: 5e-3}[dtype]
    momentum_tol = 5 * update_tol if tf32 else 1e-5
    for k, ((p0, pc, sc), (_, pp, sp)) in enumerate(zip(cuda, cpu)):
        where = f"parameter {k} {tuple(pp.shape)}"
        assert torch.isfinite(pc).all(), where
        assert_update_close(pc, pp, p0, update_tol, steps, dtype, where)
        assert sc.keys() == sp.keys(), where
        for key, value in sp.items():
            if isinstance(value, torch.Tensor):
                tol = momentum_tol if key == "momentum" else 1e-5
                assert rel_err(sc[key], value) <= tol, f"{where}: {key}"
            else:
                assert sc[key] == value, f"{where}: {key}"
