"""Trajectories against the authors' package flora-opt 0.0.3 (a required test dependency, see
requirements-test.txt).

1. flora_ext.Flora against flora_opt.Flora, both fp32 on the CPU, wherever no random projection
   is involved (no momentum, or momentum that stays dense): same arguments, same gradients,
   20 steps, parameters and state within 1e-6 relative (||a - b|| / ||b||) after every step.
2. The float64 reference (tests/reference.py) against flora_opt.Flora with compressed momentum,
   giving the reference flora-opt's own projections and seed sequence: this checks that the
   formulas of docs/FLORA.md, which the extension is tested against, are the authors' formulas.

flora-opt imports bitsandbytes at import time but uses it only for quantization=True; when
bitsandbytes is not installed we put a stub in sys.modules whose functions raise.
"""

import importlib
import math
import os
import sys
import zlib
from dataclasses import dataclass, field

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from flora_ext.testing import import_flora_opt  # noqa: E402

STEPS = 20
TOL_EXT = 1e-6
TOL_REF = 1e-5


def _import_flora_opt():
    try:
        return import_flora_opt(), None
    except Exception as e:  # noqa: BLE001 - reported by require_flora_opt
        return None, e


_FLORA_OPT, _FLORA_OPT_ERROR = _import_flora_opt()


def require_flora_opt():
    """flora-opt's torch module; the calling test fails (not skips, not errors) without it."""
    if _FLORA_OPT is None:
        pytest.fail(
            "flora-opt is a required test dependency and could not be imported "
            f"({type(_FLORA_OPT_ERROR).__name__}: {_FLORA_OPT_ERROR}). "
            "Install it with: pip install -r requirements-test.txt",
            pytrace=False,
        )
    return _FLORA_OPT


def rel_err(a, b):
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den else num


# flora-opt state name -> flora_ext state name
STATE_NAMES = {
    "exp_avg_sq_row": "row_second_moment",
    "exp_avg_sq_col": "col_second_moment",
    "exp_avg_sq": "second_moment",
    "exp_avg": "momentum",
}


@dataclass
class Case:
    id: str
    shape: tuple
    hp: dict = field(default_factory=dict)
    expect: str = None
    init_scale: float = 1.0


def make_hp(case, base):
    hp = dict(base)
    hp.update(case.hp)
    return ref.full_hp(**hp)


def grads(shape, gen, steps):
    spread = torch.exp(torch.randn(shape, generator=gen))
    out = []
    for _ in range(steps):
        scale = 10.0 ** (torch.rand((), generator=gen).item() * 4.0 - 3.0)
        out.append(torch.randn(shape, generator=gen) * spread * scale)
    return out


# ------------------------------------------------------------------ 1. flora_ext vs flora-opt

# lr = 0.1 (relative to RMS(p)): large enough that update errors show in the parameter
EXT_BASE = dict(lr=1e-1, kappa=7)
EXT_CASES = [
    # pure Adafactor (beta1=None)
    Case("adafactor_wide_16x40", (16, 40), dict(beta1=None), "none"),
    Case("adafactor_tall_40x16", (40, 16), dict(beta1=None), "none"),
    Case("adafactor_square_24x24_rank_ignored", (24, 24), dict(beta1=None, rank=4), "none"),
    Case("adafactor_1d", (37,), dict(beta1=None), "none"),
    Case("adafactor_3d", (4, 6, 8), dict(beta1=None), "none"),
    Case("adafactor_unfactored_16x40", (16, 40), dict(beta1=None, factorize_second_moment=False), "none"),
    Case("adafactor_unfactored_1d", (30,), dict(beta1=None, factorize_second_moment=False), "none"),
    Case("adafactor_wd_no_scale_40x16", (40, 16), dict(beta1=None, weight_decay=0.1, scale_parameter=False),
         "none"),
    Case("adafactor_relative_step_24x24", (24, 24), dict(beta1=None, lr=None, relative_step=True), "none"),
    Case("adafactor_relative_step_warmup_no_scale_1d", (40,),
         dict(beta1=None, lr=None, relative_step=True, warmup_init=True, scale_parameter=False), "none",
         init_scale=1e-4),
    Case("adafactor_eps2_floor_16x40", (16, 40), dict(beta1=None), "none", init_scale=1e-5),
    Case("adafactor_clip_decay_eps_16x40", (16, 40),
         dict(beta1=None, clip_threshold=0.4, decay_rate=-0.6, eps=(1e-6, 1e-2)), "none"),
    # momentum that stays dense
    Case("dense_1d", (37,), dict(beta1=0.9, rank=4), "dense"),
    Case("dense_aspect_gt4_8x64", (8, 64), dict(beta1=0.9, rank=4), "dense"),
    Case("dense_aspect_gt4_64x8", (64, 8), dict(beta1=0.9, rank=4), "dense"),
    Case("dense_rank_none_16x40", (16, 40), dict(beta1=0.9, rank=None), "dense"),
    Case("dense_rank_gt_min_8x24", (8, 24), dict(beta1=0.9, rank=12), "dense"),
    Case("dense_unfactored_24x24", (24, 24), dict(beta1=0.9, rank=4, factorize_second_moment=False), "dense"),
    Case("dense_wd_relative_step_40x16", (40, 16),
         dict(beta1=0.8, rank=None, weight_decay=0.1, lr=None, relative_step=True), "dense"),
    Case("dense_4d", (2, 3, 4, 5), dict(beta1=0.9, rank=2, weight_decay=0.05), "dense"),
]


@pytest.mark.parametrize("case", EXT_CASES, ids=[c.id for c in EXT_CASES])
def test_extension_matches_flora_opt(case):
    fo = require_flora_opt()
    flora_ext = importlib.import_module("flora_ext")
    hp = make_hp(case, EXT_BASE)
    assert ref.layout_for(case.shape, hp)["momentum"] == case.expect, "case table"

    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    init = torch.randn(case.shape, generator=gen) * case.init_scale
    p_ext = torch.nn.Parameter(init.clone())
    p_fo = torch.nn.Parameter(init.clone())
    opt_ext = flora_ext.Flora([p_ext], **ref.optimizer_kwargs(hp))
    opt_fo = fo.Flora([p_fo], **ref.optimizer_kwargs(hp))

    for t, g in enumerate(grads(case.shape, gen, STEPS), start=1):
        p_ext.grad = g.clone()
        p_fo.grad = g.clone()
        opt_ext.step()
        opt_fo.step()
        where = f"{case.id} step {t}"
        err = rel_err(p_ext, p_fo)
        assert err <= TOL_EXT, f"{where}: param rel err {err:.3e} > {TOL_EXT:g}"
        st_ext, st_fo = opt_ext.state[p_ext], opt_fo.state[p_fo]
        assert int(st_ext["step"]) == st_fo["step"] == t
        fo_tensors = {k: v for k, v in st_fo.items() if k in STATE_NAMES}
        assert {STATE_NAMES[k] for k in fo_tensors} == {k for k in st_ext if k not in ("step", "seed")}, where
        for k, v in fo_tensors.items():
            err = rel_err(st_ext[STATE_NAMES[k]], v)
            assert err <= TOL_EXT, f"{where}: {STATE_NAMES[k]} rel err {err:.3e}"
    assert rel_err(p_ext, init) > 1e-2  # not vacuous


# ------------------------------------------------------------------ 2. reference vs flora-opt


def flora_opt_projection(fo, left):
    """flora-opt's projection for one side, in the (seed, rows, cols, rank) form of reference.py:
    it splits the seed in two and draws the left matrix from the first, the right from the second."""

    def projection(seed, rows, cols, rank):
        lseed, rseed = fo.split_seed(seed)
        raw = fo.stable_randn((rows, cols), seed=lseed if left else rseed, dtype=torch.float32)
        return (raw / math.sqrt(rank)).to(torch.float64)

    return projection


REF_BASE = dict(lr=1e-1, rank=4, kappa=7, beta1=0.9)
REF_CASES = [
    Case("compressed_left_16x40", (16, 40), {}, "compressed"),
    Case("compressed_right_40x16", (40, 16), {}, "compressed"),
    Case("compressed_square_24x24_wd", (24, 24), dict(weight_decay=0.1), "compressed"),
    Case("compressed_kappa1_12x20", (12, 20), dict(kappa=1, rank=3), "compressed"),
    Case("compressed_relative_step_clip_32x12", (32, 12),
         dict(lr=None, relative_step=True, clip_threshold=0.5, beta1=0.7), "compressed"),
    Case("compressed_no_scale_8x32", (8, 32), dict(scale_parameter=False, lr=5e-2, rank=8), "compressed"),
    Case("dense_1d", (37,), {}, "dense"),
    Case("adafactor_16x40", (16, 40), dict(beta1=None), "none"),
    Case("unfactored_3d", (3, 4, 5), {}, "dense"),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[c.id for c in REF_CASES])
def test_reference_matches_flora_opt(case):
    fo = require_flora_opt()
    hp = make_hp(case, REF_BASE)
    lay = ref.layout_for(case.shape, hp)
    assert lay["momentum"] == case.expect, "case table"
    base_seed = 3

    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    init = torch.randn(case.shape, generator=gen) * case.init_scale
    p_fo = torch.nn.Parameter(init.clone())
    opt_fo = fo.Flora([p_fo], **ref.optimizer_kwargs(hp, base_seed))
    p_ref = init.to(torch.float64)
    st_ref = ref.init_state(p_ref, hp, ref.param_seed(base_seed, 1))
    projection = flora_opt_projection(fo, lay["left"])

    for t, g in enumerate(grads(case.shape, gen, STEPS), start=1):
        p_fo.grad = g.clone()
        opt_fo.step()
        p_ref = ref.reference_step(p_ref, g.to(torch.float64), st_ref, hp,
                                   projection=projection, next_seed_fn=fo.next_seed)
        where = f"{case.id} step {t}"
        err = rel_err(p_fo, p_ref)
        assert err <= TOL_REF, f"{where}: param rel err {err:.3e} > {TOL_REF:g}"
        st_fo = opt_fo.state[p_fo]
        assert st_fo["step"] == st_ref["step"] == t
        if "seed" in st_ref:
            assert st_fo["seed"] == st_ref["seed"], where
        for k, v in st_fo.items():
            if k in STATE_NAMES:
                err = rel_err(v, st_ref[STATE_NAMES[k]])
                assert err <= TOL_REF, f"{where}: {k} rel err {err:.3e}"
    assert rel_err(p_fo, init) > 1e-2  # not vacuous
