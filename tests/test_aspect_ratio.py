"""max_aspect_ratio: which factored parameters get compressed momentum (docs/FLORA.md §3).

4.0 (the default) is flora-opt's rule, max(n, m) <= 4 min(n, m); None lifts the limit, so
token embeddings and output heads get compressed momentum too. One rule for the reference,
the CPU and CUDA kernels (csrc/common/rules.h), the C++ flora::Flora and FSDP2."""
import copy

import pytest
import torch

import flora_ext
import reference as ref
from conftest import DEVICES, rel_err, requires_cuda

HP = dict(lr=1e-2, beta1=0.9, rank=16, kappa=3)


def momentum_kind(shape, **hp):
    return flora_ext.param_layout(shape, hp.get("rank", 16), 0.9, True,
                                  hp.get("max_aspect_ratio", 4.0))["momentum"]


@pytest.mark.parametrize("shape,ratio,expect", [
    ((16, 64), 4.0, "compressed"),        # exactly 4: inside
    ((16, 65), 4.0, "dense"),             # just over
    ((65, 16), 4.0, "dense"),
    ((16, 65), 4.0625, "compressed"),     # 65 / 16 exactly
    ((16, 66), 4.0625, "dense"),
    ((16, 17), 1.0, "dense"),
    ((16, 16), 1.0, "compressed"),
    ((1000, 64), None, "compressed"),
    ((64, 32000), None, "compressed"),
    ((8, 1000), None, "dense"),           # rank 16 > min(n, m): dense whatever the limit
])
def test_the_rule_at_its_boundary_matches_the_reference(shape, ratio, expect):
    assert momentum_kind(shape, max_aspect_ratio=ratio) == expect
    assert ref.layout(shape, 16, 0.9, True, ratio)["momentum"] == expect
    args = (list(shape), 16, 0.9, True, float(ratio or 0.0))
    assert torch.ops.flora.param_layout(*args)[1] == expect


def test_default_is_flora_opts_rule():
    assert flora_ext.Flora([torch.nn.Parameter(torch.zeros(2))], lr=1.0).defaults[
        "max_aspect_ratio"] == 4.0
    assert momentum_kind((16, 65)) == "dense"
    assert flora_ext.param_layout((16, 65), 16, 0.9, True)["momentum"] == "dense"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1000, 64), (64, 1000)], ids=["right", "left"])
def test_no_limit_compresses_a_1000x64_parameter_like_the_reference(device, shape):
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(7)]
    hp = ref.full_hp(**HP, max_aspect_ratio=None)
    p = torch.nn.Parameter(p0.clone().to(device))
    opt = flora_ext.Flora([p], **ref.optimizer_kwargs(hp))
    ref_p = p0.double()
    ref_state = ref.init_state(ref_p, hp, ref.param_seed(0, 1))
    for g in grads:
        p.grad = g.to(device)
        opt.step()
        ref_p = ref.reference_step(ref_p, g.double(), ref_state, hp)
    state = opt.state[p]
    n, m = shape
    assert tuple(state["momentum"].shape) == ((16, m) if n < m else (n, 16))
    assert "seed" in state and state["seed"] == ref_state["seed"]
    # on CUDA the projections run on TF32 tensor cores (tf32=True, the default; 2e-3 as in
    # tests/test_cuda.py)
    tol = 1e-5 if device == "cpu" else 2e-3
    assert rel_err(p.detach().cpu(), ref_p) < tol
    assert rel_err(state["momentum"].cpu(), ref_state["momentum"]) < tol
    # the default keeps it dense: r x m instead of n x m floats of momentum
    dense = flora_ext.Flora([torch.nn.Parameter(p0.clone())], **HP)
    q = dense.param_groups[0]["params"][0]
    q.grad = grads[0]
    dense.step()
    assert tuple(dense.state[q]["momentum"].shape) == shape


def test_per_group_limits():
    wide = [torch.nn.Parameter(torch.randn(20, 200)) for _ in range(2)]
    opt = flora_ext.Flora([{"params": [wide[0]], "max_aspect_ratio": None},
                           {"params": [wide[1]]}], **HP)
    for p in wide:
        p.grad = torch.randn(20, 200)
    opt.step()
    assert tuple(opt.state[wide[0]]["momentum"].shape) == (16, 200)
    assert "seed" in opt.state[wide[0]]
    assert tuple(opt.state[wide[1]]["momentum"].shape) == (20, 200)
    assert "seed" not in opt.state[wide[1]]


@pytest.mark.parametrize("bad,error", [
    (0.5, ValueError), (0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
    (float("nan"), ValueError), ("4", ValueError), (True, ValueError)])
def test_bad_values_are_refused_naming_the_argument(bad, error):
    p = torch.nn.Parameter(torch.randn(16, 80))
    with pytest.raises(error, match=r"^flora: max_aspect_ratio must be None \(no limit\) or a "
                                    r"finite float >= 1, got"):
        flora_ext.Flora([p], max_aspect_ratio=bad, **HP)
    with pytest.raises(error, match=r"^flora: max_aspect_ratio must be"):
        flora_ext.Flora([{"params": [p], "max_aspect_ratio": bad}], **HP)
    with pytest.raises(RuntimeError, match="flora: max_aspect_ratio must be 0"):
        torch.ops.flora.param_layout([16, 80], 16, 0.9, True, 0.5)


def test_a_state_that_no_longer_fits_the_rule_is_a_clear_error():
    p = torch.nn.Parameter(torch.randn(16, 80))
    opt = flora_ext.Flora([p], **HP)  # 80 > 4 * 16: dense momentum
    p.grad = torch.randn(16, 80)
    opt.step()
    before = p.detach().clone(), copy.deepcopy(opt.state[p])
    opt.param_groups[0]["max_aspect_ratio"] = None  # now it would be compressed
    with pytest.raises(ValueError, match=r"max_aspect_ratio=None"):
        opt.step()
    assert torch.equal(p.detach(), before[0])
    assert torch.equal(opt.state[p]["momentum"], before[1]["momentum"])
    # a checkpoint keeps its group's limit, as it keeps its rank
    opt.param_groups[0]["max_aspect_ratio"] = 4.0
    saved = opt.state_dict()
    other = flora_ext.Flora([torch.nn.Parameter(p.detach().clone())], max_aspect_ratio=None,
                            **HP)
    other.load_state_dict(saved)
    assert other.param_groups[0]["max_aspect_ratio"] == 4.0
    # one saved without the key (before it existed: the rule of 4) into an optimizer without
    # the limit: the dense momentum does not fit, and the error says why
    del saved["param_groups"][0]["max_aspect_ratio"]
    with pytest.raises(ValueError, match=r"max_aspect_ratio=None"):
        other.load_state_dict(saved)
    assert other.param_groups[0]["max_aspect_ratio"] == 4.0  # unchanged by the failed load


@requires_cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["exact", "tf32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu_without_the_limit(dtype, tf32):
    # tf32=True takes the fused tensor-core passes (what the 7B benchmark runs), False the
    # exact ones; tolerances as tests/test_cuda.py's for the same paths
    gen = torch.Generator().manual_seed(6)
    shapes = [(1000, 64), (64, 1000), (32, 300), (48, 48)]
    params = {d: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(k))
                                     .to(d, dtype)) for k, s in enumerate(shapes)]
              for d in ("cpu", "cuda")}
    opts = {d: flora_ext.Flora(ps, max_aspect_ratio=None, tf32=tf32, **HP)
            for d, ps in params.items()}
    for _ in range(7):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        for d in params:
            for p, g in zip(params[d], grads):
                p.grad = g.to(d)
            opts[d].step()
    if dtype == torch.float32:
        tol_param = tol_momentum = 2e-3 if tf32 else 1e-4
    else:  # bf16 writes (one ulp where a tie breaks otherwise); bf16 tensor-core GEMMs
        tol_param, tol_momentum = 1e-2, (2e-2 if tf32 else 1e-2)
    for a, b in zip(params["cpu"], params["cuda"]):
        assert "seed" in opts["cuda"].state[b]
        assert rel_err(b.detach().cpu().float(), a.detach().float()) < tol_param
        assert rel_err(opts["cuda"].state[b]["momentum"].cpu(),
                       opts["cpu"].state[a]["momentum"]) < tol_momentum
