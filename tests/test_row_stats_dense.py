"""Row stats for factored tensors with dense momentum (embeddings and heads past the
aspect-ratio limit): the row_stats_dense variant of the CUDA path (torch.ops.flora._set_tuning,
docs/cuda.md §2). The stats pass gathers their row EMA and column sums by rows; the rms pass
still forms D = (1 - beta1) U + beta1 M, sums D^2 and writes M. Checked against the CPU
path, against the tile passes (the variant off), with skip_nonfinite and across a resume."""

import pytest
import torch

import flora_ext
from conftest import (rel_err, requires_cuda, resumed_and_uninterrupted, set_grads,
                      warm_up_and_capture)

pytestmark = requires_cuda

RANK = 256  # every shape below keeps dense momentum at this rank (aspect ratio > 4)


# (shape, dtype, hyper-parameters). Row stats need 16-byte rows of >= 128 vectors (fp32
# m >= 512, 16-bit m >= 1024); narrower rows keep the tile passes with the variant on.
CASES = [
    ((64, 4096), torch.float32, dict()),                       # one row block
    ((1000, 4096), torch.float32, dict(clip_threshold=0.05)),  # many row blocks, clip binds
    # rows past the last full block, m not a multiple of the 128-column tile
    ((2100, 520), torch.float32, dict(weight_decay=0.1)),
    ((33, 8192), torch.float32, dict(scale_parameter=False)),  # shared-memory accumulators
    # no norm cache: the row-stats pass reads p for sum p^2 on every step
    ((2100, 520), torch.float32, dict(reuse_param_norms=False, clip_threshold=0.05)),
    ((4096, 64), torch.float32, dict()),                       # too narrow: tile passes
    ((64, 4096), torch.bfloat16, dict()),
    ((4200, 1024), torch.bfloat16, dict(clip_threshold=0.05)),  # many row blocks
    ((130, 1032), torch.bfloat16, dict()),                     # m not a multiple of 256
    ((33, 8192), torch.bfloat16, dict()),                      # shared-memory accumulators
    ((64, 4096), torch.float16, dict(relative_step=True, lr=None)),
]
PARAM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
STATE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def make_run(shape, dtype, steps=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen).to(dtype)
    grads = [(torch.randn(shape, generator=gen) * (0.1 + t)).to(dtype) for t in range(steps)]
    return p0, grads


def train(shape, dtype, hp, device, steps=6):
    """The summed updates (a wrong clip or step size must show) and the state."""
    p0, grads = make_run(shape, dtype, steps)
    p = torch.nn.Parameter(p0.to(device, copy=True))
    kw = dict(lr=1e-2, beta1=0.9, rank=RANK)
    kw.update(hp)
    opt = flora_ext.Flora([p], **kw)
    for g in grads:
        p.grad = g.to(device)
        opt.step()
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
             for k, v in opt.state[p].items()}
    return p.detach().cpu().double() - p0.double(), state


@pytest.mark.parametrize("shape,dtype,hp", CASES, ids=str)
def test_dense_row_stats_match_cpu(shape, dtype, hp, tuning):
    tuning(row_stats_dense=1)
    (dc, sc), (dp, sp) = train(shape, dtype, hp, "cuda"), train(shape, dtype, hp, "cpu")
    assert sp["momentum"].shape == shape, "the case must keep dense momentum"
    assert dp.abs().max() > 0
    assert rel_err(dc, dp) <= PARAM_TOL[dtype]
    for key in ("row_second_moment", "col_second_moment", "momentum"):
        assert rel_err(sc[key], sp[key]) <= STATE_TOL[dtype], key
    assert sc["step"] == sp["step"]


@pytest.mark.parametrize("shape,dtype,hp", CASES, ids=str)
def test_dense_row_stats_and_tile_passes_agree(shape, dtype, hp, tuning):
    # The default is row stats (kRowStatsDense), bit for bit; the tile passes sum in
    # another order, so the two differ in rounding only (a clip threshold that binds makes
    # sum D^2, which the rms pass still makes, matter).
    runs = {}
    for flag in ("default", 0, 1):
        tuning(reset=True)
        if flag != "default":
            tuning(row_stats_dense=flag)
        runs[flag] = train(shape, dtype, hp, "cuda")
    (dd, sd), (d0, s0), (d1, s1) = runs["default"], runs[0], runs[1]
    assert torch.equal(dd, d1), "the default must be row stats"
    for key in ("row_second_moment", "col_second_moment", "momentum"):
        assert torch.equal(sd[key], s1[key]), key
    moments = ("row_second_moment", "col_second_moment")
    if shape[1] * torch.finfo(dtype).bits // 8 < 128 * 16:  # too narrow for row stats
        assert torch.equal(d1, d0) and all(torch.equal(s1[k], s0[k]) for k in moments)
        return
    assert any(not torch.equal(s1[k], s0[k]) for k in moments), \
        "row_stats_dense=1 must take row stats"
    assert rel_err(d1, d0) <= PARAM_TOL[dtype]
    for key in moments + ("momentum",):
        assert rel_err(s1[key], s0[key]) <= STATE_TOL[dtype], key


def test_row_stats_off_overrides_the_dense_variant(tuning):
    # row_stats=0 sends every factored tensor to the tile passes, the dense ones too.
    shape, dtype, hp = CASES[1]
    tuning(row_stats_dense=0)
    expected = train(shape, dtype, hp, "cuda")
    tuning(row_stats=0, row_stats_dense=1)
    got = train(shape, dtype, hp, "cuda")
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1]["momentum"], expected[1]["momentum"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_row_stats_in_a_call_of_every_layout(dtype, tuning):
    # Dense row-stats tasks share the stats pass, its finalize pass and the workspace with
    # fused compressed tensors (row stats, 256 x 1024; tile passes, 96 x 200), dense tile
    # tasks (4096 x 64) and 1-D tensors; kappa=4 puts a resample in the six steps.
    shapes = [(64, 4096), (256, 1024), (2100, 520), (96, 200), (4096, 64), (37,), (1000, 4096)]
    compressed = {1, 3}
    gen = torch.Generator().manual_seed(4)
    p0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(6)]

    def run(device):
        params = [torch.nn.Parameter(p.to(device, copy=True)) for p in p0]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=64, kappa=4, tf32=True,
                              clip_threshold=0.5)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(device)
            opt.step()
        return [(p.detach().cpu().double() - q.double(),
                 opt.state[p]["momentum"].detach().cpu()) for p, q in zip(params, p0)]

    tuning(row_stats_dense=1)
    gpu, cpu = run("cuda"), run("cpu")
    for k, ((dg, mg), (dc, mc)) in enumerate(zip(gpu, cpu)):
        assert dc.abs().max() > 0, shapes[k]
        # TF32 in the fused projections: test_fused_momentum_matches_cpu's tolerances
        tol = (2e-3 if k in compressed else 1e-5) if dtype == torch.float32 else 2e-2
        assert rel_err(dg, dc) <= tol, shapes[k]
        assert rel_err(mg, mc) <= (5 * tol if k in compressed else STATE_TOL[dtype]), shapes[k]
        if k not in compressed:
            assert mc.shape == shapes[k], shapes[k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1000, 4096), (130, 1032)], ids=str)
def test_dense_row_stats_skip_a_nonfinite_gradient(shape, dtype, tuning):
    # skip_nonfinite: on the step whose gradient holds a NaN, the row-stats pass leaves the
    # row EMA, finalize the column EMA, rms the momentum and apply the parameter; the
    # other parameter of the call steps; CUDA matches the CPU at every step.
    other = (12, 20)
    gen = torch.Generator().manual_seed(0)
    p0 = [torch.randn(s, generator=gen).to(dtype) for s in (shape, other)]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in p0] for _ in range(4)]
    grads[1][0].view(-1)[7] = float("nan")

    def run(device):
        params = [torch.nn.Parameter(p.to(device, copy=True)) for p in p0]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=RANK, skip_nonfinite=True)
        history = []
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(device)
            opt.step()
            history.append([(p.detach().cpu().clone(),
                             {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                              for k, v in opt.state[p].items()}) for p in params])
        return opt, history

    tuning(row_stats_dense=1)
    opt, gpu = run("cuda")
    _, cpu = run("cpu")
    assert opt.nonfinite_skips.item() == 1
    (p_before, s_before), (p_after, s_after) = gpu[0][0], gpu[1][0]
    assert torch.equal(p_after, p_before), "the skipped parameter changed"
    assert s_after["step"] == s_before["step"] + 1
    for key in ("row_second_moment", "col_second_moment", "momentum"):
        assert torch.equal(s_after[key], s_before[key]), key
    assert not torch.equal(gpu[1][1][0], gpu[0][1][0]), "the other parameter must step"
    for k, (a, b) in enumerate(zip(gpu, cpu)):
        for (pa, sa), (pb, sb) in zip(a, b):
            assert torch.isfinite(pa.float()).all(), f"step {k + 1}"
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert rel_err(pa.float(), pb.float()) <= tol, f"step {k + 1}"
            for key, value in sa.items():
                if isinstance(value, torch.Tensor):
                    assert rel_err(value, sb[key]) <= 1e-4, (f"step {k + 1}", key)


def test_dense_row_stats_in_a_replayed_graph(tuning):
    # capturable=True: a CUDA graph of the step, replayed, is bitwise the eager steps.
    tuning(row_stats_dense=1)
    shapes = [(64, 4096), (2100, 520)]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(5)]

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        return params, flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=RANK,
                                       capturable=True, clip_threshold=0.05)

    eager, eager_opt = make()
    replayed, replayed_opt = make()
    set_grads(eager, grads[0])
    eager_opt.step()
    graph = warm_up_and_capture(replayed, replayed_opt, grads[0])
    for gs in grads[1:]:
        set_grads(eager, gs)
        set_grads(replayed, gs)
        eager_opt.step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, replayed):
        assert torch.equal(a, b)
        for key in ("row_second_moment", "col_second_moment", "momentum"):
            assert torch.equal(eager_opt.state[a][key], replayed_opt.state[b][key]), key
    assert int(replayed_opt.state[replayed[0]]["step"]) == len(grads)


def resume_matches(shape, dtype, hp):
    """Whether three steps, a state_dict round trip into a new optimizer and three more
    give the same bits as six uninterrupted steps (the first step after the resume sums
    p^2 from p, the uninterrupted one takes the norm cache of the last apply pass)."""
    p0, grads = make_run(shape, dtype)
    resumed, opt2, ref, ref_opt = resumed_and_uninterrupted(p0, grads, lr=1e-2, **hp)
    return torch.equal(resumed, ref) and all(
        torch.equal(opt2.state[resumed][k], ref_opt.state[ref][k])
        for k in ("row_second_moment", "col_second_moment"))


@pytest.mark.parametrize("shape,dtype", [((1000, 4096), torch.float32),
                                         ((2100, 520), torch.float32),
                                         ((64, 4096), torch.bfloat16),
                                         ((33, 8192), torch.bfloat16)], ids=str)
def test_dense_row_stats_resume_is_bitwise(shape, dtype, tuning):
    tuning(row_stats_dense=1)
    assert resume_matches(shape, dtype, dict(beta1=0.9, rank=RANK))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_wide_16bit_rows_resume_is_bitwise(dtype):
    # 8192 16-bit columns: past the register accumulators, the column sums are added a
    # stage at a time. A stage holds the same rows (two of G) whether or not the norm
    # cache is valid, so the first step after a resume sums as every other step does.
    assert resume_matches((33, 8192), dtype, dict(beta1=None))


def test_bad_row_stats_dense_is_a_clear_error(tuning):
    with pytest.raises(RuntimeError, match="flora: _set_tuning: row_stats_dense must be .*got 2"):
        tuning(row_stats_dense=2)
    # Every value is checked before any is set: a refused call changes nothing.
    with pytest.raises(RuntimeError, match="min_batched"):
        tuning(row_stats_dense=1, min_batched=0)
    shape, dtype, hp = CASES[1]
    got = train(shape, dtype, hp, "cuda")
    tuning(reset=True)
    expected = train(shape, dtype, hp, "cuda")
    assert torch.equal(got[0], expected[0])
