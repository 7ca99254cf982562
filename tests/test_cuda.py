"""CUDA kernels against the CPU kernels (the CPU path is checked against tests/reference.py)."""
import copy
import json
import tempfile

import pytest
import torch

import flora_ext
from conftest import assert_states_close, rel_err, requires_cuda, resumed_and_uninterrupted

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
    kw = dict(lr=1e-2, kappa=4, tf32=False)  # exact fp32 GEMMs unless a test asks for TF32
    kw.update(hp)
    opt = flora_ext.Flora([p], **kw)
    for g in grads:
        p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return p.detach(), opt.state[p]


def assert_close_run(a, b, tol):
    (pa, sa), (pb, sb) = a, b
    assert rel_err(pa.cpu(), pb.cpu()) <= tol
    assert_states_close(sa, sb, tol)


@pytest.mark.parametrize("shape,hp", CASES, ids=[f"{s}-{h}" for s, h in CASES])
def test_cuda_step_matches_cpu(shape, hp):
    assert_close_run(run(shape, hp, "cuda"), run(shape, hp, "cpu"), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,hp", [((16, 40), dict(beta1=0.9, rank=4)),
                                      ((37,), dict(beta1=0.9))])
def test_cuda_half_params_match_cpu(shape, hp, dtype):
    # Both sides round the same fp32 result once per step; a rounding tie broken
    # differently moves one element by one ulp, hence the per-dtype tolerance.
    pc, sc = run(shape, hp, "cuda", dtype)
    pp, sp = run(shape, hp, "cpu", dtype)
    assert pc.dtype == dtype and sc.get("momentum", torch.empty(0)).dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(pc.cpu(), pp) <= tol


@pytest.mark.parametrize("shape", [(96, 200), (200, 96)])
def test_cuda_step_with_tf32(shape):
    # TF32 GEMMs (10-bit mantissa) touch only the compressed momentum; tolerance 2e-3.
    hp = dict(beta1=0.9, rank=32, tf32=True)
    assert_close_run(run(shape, hp, "cuda"), run(shape, hp, "cpu"), 2e-3)


def test_cuda_bf16_grads_with_tensor_core_projection():
    # tf32=True with bf16 gradients: the down projection is a bf16 GEMM (P diag(a) rounded
    # to bf16, 8-bit mantissa, fp32 accumulation); against the exact path the momentum
    # moves by ~1e-2 at most and the parameters by less.
    shape, hp = (96, 200), dict(beta1=0.9, rank=32)
    pc, sc = run(shape, dict(hp, tf32=True), "cuda", torch.bfloat16)
    pe, se = run(shape, dict(hp, tf32=False), "cuda", torch.bfloat16)
    assert rel_err(sc["momentum"].cpu(), se["momentum"].cpu()) <= 2e-2
    assert rel_err(pc.float().cpu(), pe.float().cpu()) <= 1e-2


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


def test_resume_cpu_checkpoint_on_cuda():
    gen = torch.Generator().manual_seed(1)
    shapes = [(16, 40), (40, 16), (37,)]
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]

    def make(device, params=None):
        ps = [torch.nn.Parameter(p.clone().to(device)) for p in (params or params0)]
        return ps, flora_ext.Flora(ps, lr=1e-2, beta1=0.9, rank=4, kappa=5, tf32=False)

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


def test_params_on_two_devices_in_one_optimizer():
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


# One group mixing every layout, dtype and alignment the batched kernels branch on.
GROUP_SHAPES = [(64, 64), (16, 40), (40, 16), (33, 130), (7, 13), (257, 3), (5,),
                (9000,), (3, 4, 5), (96, 200), (0, 4), (1, 1)]


def run_group(device, batch_bytes, monkeypatch, steps=6, hp=None):
    monkeypatch.setenv("FLORA_BATCH_BYTES", str(batch_bytes))
    gen = torch.Generator().manual_seed(5)
    params = []
    for k, shape in enumerate(GROUP_SHAPES):
        dtype = torch.bfloat16 if k % 4 == 3 else torch.float32
        p0 = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if k == 1:  # a transposed (non-contiguous) parameter
            p0 = p0.t().contiguous().t()
        if k == 2:  # storage offset by one element: no vector loads
            p0 = torch.randn(p0.numel() + 1, generator=gen).to(device)[1:].view(shape)
        params.append(torch.nn.Parameter(p0))
    kw = dict(lr=1e-2, beta1=0.9, rank=4, kappa=3, tf32=False, weight_decay=0.01)
    kw.update(hp or {})
    opt = flora_ext.Flora(params, **kw)
    grads = [[torch.randn(shape, generator=gen) for shape in GROUP_SHAPES] for _ in range(steps)]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("batch_bytes", [1, 4096, 1 << 30])
@pytest.mark.parametrize("beta1", [0.9, None])
def test_batched_group_matches_cpu(batch_bytes, beta1, monkeypatch):
    cuda_ps, cuda_opt = run_group("cuda", batch_bytes, monkeypatch, hp=dict(beta1=beta1))
    cpu_ps, cpu_opt = run_group("cpu", batch_bytes, monkeypatch, hp=dict(beta1=beta1))
    for a, b in zip(cuda_ps, cpu_ps):
        tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
        assert rel_err(a.detach().float().cpu(), b.detach().float()) <= tol, tuple(a.shape)
        for key, value in cuda_opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert rel_err(value.cpu(), cpu_opt.state[b][key]) <= 1e-2, (tuple(a.shape), key)


def test_batching_does_not_change_results(monkeypatch):
    one, _ = run_group("cuda", 1 << 30, monkeypatch)
    many, _ = run_group("cuda", 1, monkeypatch)
    for a, b in zip(one, many):
        assert torch.equal(a, b), tuple(a.shape)


def test_compressed_tensors_sharing_a_batch_match_cpu(monkeypatch):
    # Next to a 200000-element tensor, the update buffers of all four compressed
    # tensors fit the batch's share (1/40 of the parameter bytes): one batch, their
    # workspace side by side, a resample (kappa 2) in the run. Batching them
    # (default) and one batch a tensor (FLORA_BATCH_BYTES=1) must agree exactly.
    shapes = [(200000,), (16, 40), (40, 16), (24, 24), (32, 20)]

    def train(device, batch_bytes=None):
        if batch_bytes is None:
            monkeypatch.delenv("FLORA_BATCH_BYTES", raising=False)
        else:
            monkeypatch.setenv("FLORA_BATCH_BYTES", str(batch_bytes))
        gen = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=4, kappa=2, tf32=False)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        assert opt.state[params[1]]["momentum"].shape == (4, 40)
        return params

    shared, alone, cpu = train("cuda"), train("cuda", 1), train("cpu")
    for a, b, c in zip(shared, alone, cpu):
        assert torch.equal(a, b), tuple(a.shape)
        assert rel_err(a.detach().cpu(), c.detach()) <= 1e-5, tuple(a.shape)


def test_fused_batches_do_not_change_results(tuning):
    # fused_share bounds the fp16 buffers of fused tensors in a batch: 1 puts all
    # three in one batch (one down launch), 10**9 gives each a batch of its own (with no
    # floor: fused_min_bytes=0). With min_batched=4 three tensors stay under
    # the batched-GEMM threshold either way: one GEMM a tensor, the same bits.
    shapes = [(256, 520)] * 3
    tuning(min_batched=4, fused_min_bytes=0)

    def train(share):
        tuning(fused_share=share)
        gen = torch.Generator().manual_seed(13)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=32, kappa=3)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        return params

    for a, b in zip(train(1), train(10**9)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("floor,launches", [(None, 1), (0, 3)])
def test_fused_buffers_floor_batches_small_models(floor, launches, tuning):
    # A share of 10**9 would give each of three small fused tensors a batch of its own (an
    # apply launch each); the default floor of the fused buffers (kFusedMinBytes,
    # 64 MiB) keeps them in one, 0 turns it off.
    tuning(fused_share=10**9)
    if floor is not None:
        tuning(fused_min_bytes=floor)
    params = [torch.nn.Parameter(torch.randn(256, 520, device="cuda")) for _ in range(3)]
    opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=32)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    counts = [e.count for e in prof.key_averages() if "fused_apply_kernel" in e.key]
    assert counts == [launches], [(e.key, e.count) for e in prof.key_averages()]


@pytest.mark.parametrize("min_batched", [2, 4])
def test_small_groups_match_cpu(min_batched, tuning):
    # Groups of two and three fused tensors: one batched GEMM a product (the default), or
    # one GEMM a tensor (min_batched=4): both as the CPU path, and a resample (kappa
    # 2) in the run. fused_share=1: one batch (rank 32 pads P's tiled copy to 256
    # ranks, which would give each tensor a batch).
    tuning(min_batched=min_batched, fused_share=1)
    shapes = [(256, 520)] * 3 + [(1040, 512)] * 2

    def updates(device):
        gen = torch.Generator().manual_seed(17)
        p0 = [torch.randn(s, generator=gen) for s in shapes]
        params = [torch.nn.Parameter(p.to(device, copy=True)) for p in p0]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=32, kappa=2)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        return [p.detach().cpu().double() - q.double() for p, q in zip(params, p0)]

    for a, b in zip(updates("cuda"), updates("cpu")):
        assert b.abs().max() > 0
        # fp16 operands of the projections (TF32's mantissa): as test_fused_momentum_matches_cpu
        assert rel_err(a, b) <= 2e-3, tuple(a.shape)


def test_mixed_resample_batches_match_cpu(monkeypatch, tuning):
    # One batch (fused_share=1) of a 1-D tensor and fused tensors of three shapes,
    # left and right, whose shape groups take turns on the side streams. Two tensors miss
    # the second step's gradient, so later steps resample some tensors (kappa 2) while the
    # others of the batch do not. One batch a tensor (share 10**9, no floor: one stream)
    # must give the same bits (min_batched=4: one GEMM a tensor either way), as
    # must the one batch with no side streams or with three (FLORA_SIDE_STREAMS), and
    # both the CPU path's numbers.
    tuning(min_batched=4, fused_min_bytes=0)
    shapes = [(400000,), (256, 520), (256, 520), (1040, 512), (1040, 512), (512, 512)]
    skipped = {2: (2, 4)}  # step: parameters without a gradient

    def updates(device, share, side_streams=2):
        tuning(fused_share=share)
        monkeypatch.setenv("FLORA_SIDE_STREAMS", str(side_streams))
        gen = torch.Generator().manual_seed(19)
        p0 = [torch.randn(s, generator=gen) for s in shapes]
        params = [torch.nn.Parameter(p.to(device, copy=True)) for p in p0]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=32, kappa=2)
        for step in range(1, 7):
            for k, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen).to(device)
                p.grad = None if k in skipped.get(step, ()) else g
            opt.step()
        assert [opt.state[p]["step"] for p in params] == [6, 6, 5, 6, 5, 6]
        assert opt.state[params[1]]["momentum"].shape == (32, 520)
        assert opt.state[params[3]]["momentum"].shape == (1040, 32)
        return [p.detach().cpu().double() - q.double() for p, q in zip(params, p0)]

    shared, alone, cpu = updates("cuda", 1), updates("cuda", 10**9), updates("cpu", 1)
    one_stream, three_sides = updates("cuda", 1, 0), updates("cuda", 1, 3)
    for a, b, c, d, e in zip(shared, alone, cpu, one_stream, three_sides):
        assert torch.equal(a, b), tuple(a.shape)
        assert torch.equal(a, d) and torch.equal(a, e), tuple(a.shape)
        assert c.abs().max() > 0
        assert rel_err(a, c) <= 2e-3, tuple(a.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_match_cpu(dtype):
    # 64 MB of gradient (2048 tiles), with 1-D and small tensors in the same launches.
    shapes = [(4096, 4096 if dtype == torch.float32 else 8192), (4096,), (64, 96)]
    gen = torch.Generator().manual_seed(3)
    p0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3)]

    def train(device):
        params = [torch.nn.Parameter(p.to(device, copy=True)) for p in p0]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=None, weight_decay=0.01)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(device)
            opt.step()
        return params

    for a, b, p in zip(train("cuda"), train("cpu"), p0):
        assert not torch.equal(b, p), "the CPU run must have stepped"
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert rel_err(a.detach().float().cpu(), b.detach().float()) <= tol, tuple(a.shape)


# The two tuning knobs of the environment: a bad value is a clear error before anything
# runs (32 x 1024 would take row stats), and the step changes nothing.
BAD_KNOBS = [("FLORA_BATCH_BYTES", v, f"FLORA_BATCH_BYTES must be an integer >= 1, got '{v}'")
             for v in ("1GiB", "0", "-5")]
BAD_KNOBS += [("FLORA_SIDE_STREAMS", v,
               f"FLORA_SIDE_STREAMS must be an integer from 0 to 4, got '{v}'") for v in ("-1", "5")]


@pytest.mark.parametrize("name,value,match", BAD_KNOBS, ids=str)
def test_bad_tuning_knob_is_a_clear_error(name, value, match, monkeypatch):
    p = torch.nn.Parameter(torch.randn(32, 1024, device="cuda"))
    opt = flora_ext.Flora([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(p, before)


# The variant switches are constants (tuning.h), not environment variables: a variable
# of such a name changes nothing.
@pytest.mark.parametrize("name", ["FLORA_ROW_STATS", "FLORA_STATS_STAGES", "FLORA_FUSED_MOMENTUM",
                                  "FLORA_FUSED_SHARE", "FLORA_MIN_BATCHED",
                                  "FLORA_FUSED_MIN_BYTES"])
def test_former_variant_knobs_are_not_read(name, monkeypatch):
    def train():
        gen = torch.Generator().manual_seed(23)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda())
                  for s in [(32, 1024), (256, 520)]]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=32)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        return params

    expected = train()
    monkeypatch.setenv(name, "0")  # another variant, or out of range, were it read
    for a, b in zip(train(), expected):
        assert torch.equal(a, b)


BAD_TUNING = [("row_stats", 2), ("stats_stages", 1), ("stats_stages", 5), ("fused_momentum", 3),
              ("fused_share", 0), ("fused_min_bytes", -2), ("min_batched", 0),
              ("stats_task_blocks", -3), ("wide_row_regs", -2), ("down_library", 2),
              ("wide_stats_stages", 1), ("wide_stats_stages", 7)]


def _one_tuned_step():
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda())
              for s in [(256, 520), (32, 1024)]]
    opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=32)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).cuda()
    opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name,value", BAD_TUNING, ids=str)
def test_bad_test_tuning_is_a_clear_error(name, value, tuning):
    expected = _one_tuned_step()
    with pytest.raises(RuntimeError, match=f"flora: _set_tuning: {name} must be .*got {value}"):
        tuning(**{name: value})
    # A refused value changes no setting: the next step is the default's, bit for bit.
    for got, want in zip(_one_tuned_step(), expected):
        assert torch.equal(got, want)


def test_many_small_tensors_one_call():
    params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda")) for _ in range(300)]
    ref = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    opt = flora_ext.Flora(params, lr=1e-2)
    ref_opt = flora_ext.Flora(ref, lr=1e-2)
    for _ in range(3):
        for p, r in zip(params, ref):
            r.grad = torch.randn(64, 64)
            p.grad = r.grad.cuda()
        opt.step()
        ref_opt.step()
    assert max(rel_err(p.detach().cpu(), r.detach()) for p, r in zip(params, ref)) <= 1e-5


def stochastic_rounding_run(device, lr, stochastic_rounding, n=1 << 16):
    # Every element gets the same fp32 result 1 - lr (D = 1 at step 1, RMS(p) = 1).
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
    opt = flora_ext.Flora([p], lr=lr, beta1=None, stochastic_rounding=stochastic_rounding)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    return p.detach().float()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_stochastic_rounding_is_unbiased(device):
    for lr in (1e-3, 3e-3):
        exact = 1.0 - lr
        nearest = stochastic_rounding_run(device, lr, False)
        stochastic = stochastic_rounding_run(device, lr, True)
        # bf16 spacing below 1.0 is 2^-8: plain rounding is off by up to half of it (and
        # at lr = 1e-3 rounds back to 1.0: the update stalls); stochastic rounding takes
        # the two neighbours with the right odds, so the mean of 65536 draws is within a
        # few standard errors (2^-8 * 0.5 / 256) of the exact value.
        assert set(stochastic.unique().tolist()) <= {1.0, 1.0 - 2.0**-8}
        assert abs(stochastic.mean().item() - exact) <= 4 * 2.0**-8 * 0.5 / 256
        assert abs(nearest.mean().item() - exact) > 10 * abs(stochastic.mean().item() - exact)


def test_stochastic_rounding_same_bits_on_cpu_and_cuda():
    a = stochastic_rounding_run("cpu", 3e-3, True, n=1000)
    b = stochastic_rounding_run("cuda", 3e-3, True, n=1000)
    assert torch.equal(a, b.cpu())


def test_exact_projections_ignore_torch_tf32_flag():
    # torch's allow_tf32 puts the shared cuBLAS handle in TF32 math mode; tf32=False must
    # stay exact fp32 regardless (a training script may well have turned the flag on).
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        shape, hp = (96, 200), dict(beta1=0.9, rank=32)
        assert_close_run(run(shape, hp, "cuda"), run(shape, hp, "cpu"), 1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# Factored tensors without momentum whose rows fit the row-stats stage (16-byte
# aligned rows of >= 128 vectors): one stats pass computes the row EMA and sum D^2.
# Shapes: a stage of several rows, one row a stage (5504 fp32 with p: 44 KB), the
# largest row a block holds (8192 fp32), rows past the last full block, a row width
# that is not a multiple of the vector (tile passes), 16-bit rows.
ROW_CASES = [
    ((64, 512), torch.float32, dict(scale_parameter=False)),
    ((100, 2048), torch.float32, dict(weight_decay=0.1)),
    ((130, 5504), torch.float32, dict(clip_threshold=0.05)),
    ((3, 8192), torch.float32, dict()),     # too wide for register accumulators
    ((33, 8192), torch.bfloat16, dict()),   # the same in 16 bits
    ((70, 1030), torch.float32, dict()),
    ((65, 2048), torch.bfloat16, dict(clip_threshold=0.05)),
    ((40, 4096), torch.float16, dict(relative_step=True, lr=None)),
]


def runs_with_tuning(tuning, knob, run, values=(0, 1)):
    """run() once for each value of the tuning variable ``knob``, in order: a variant and
    the path it replaces, to compare."""
    results = []
    for value in values:
        tuning(**{knob: value})
        results.append(run())
    return results


def run_updates(shape, dtype, hp, device, steps=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen).to(dtype)
    grads = [(torch.randn(shape, generator=gen) * (0.1 + t)).to(dtype) for t in range(steps)]
    p = torch.nn.Parameter(p0.to(device, copy=True))
    kw = dict(lr=1e-2, beta1=None)
    kw.update(hp)
    opt = flora_ext.Flora([p], **kw)
    for g in grads:
        p.grad = g.to(device)
        opt.step()
    # The summed updates, not p itself: a wrong clip or step size must show.
    return (p.detach().cpu().double() - p0.double()), opt.state[p]


@pytest.mark.parametrize("shape,dtype,hp", ROW_CASES, ids=str)
def test_row_stats_match_cpu(shape, dtype, hp):
    (dc, sc), (dp, sp) = run_updates(shape, dtype, hp, "cuda"), run_updates(shape, dtype, hp, "cpu")
    assert dp.abs().max() > 0
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(dc, dp) <= tol
    for key in ("row_second_moment", "col_second_moment"):
        assert rel_err(sc[key].cpu(), sp[key]) <= 1e-5, key


def test_row_stats_and_tile_passes_agree(tuning):
    # row_stats=0 routes the same tensors through the stats + rms tile passes.
    # The sums run in another order, so the two differ in rounding only; a clip
    # threshold that binds makes sum D^2 matter.
    (d0, s0), (d1, s1) = runs_with_tuning(
        tuning, "row_stats",
        lambda: run_updates((130, 5504), torch.float32, dict(clip_threshold=0.05), "cuda"))
    assert not torch.equal(d0, d1), "row_stats=0 must take the tile passes"
    assert rel_err(d1, d0) <= 1e-5
    assert rel_err(s1["row_second_moment"], s0["row_second_moment"]) <= 1e-6


@pytest.mark.parametrize("shape,dtype", [((4096, 1024), torch.bfloat16),
                                         ((2048, 2048), torch.float32)], ids=str)
def test_row_stats_blocks_of_a_tensor_alone_match_the_floor_and_cpu(shape, dtype, tuning):
    # A tensor alone in its launch: 256 blocks of 16 rows (default) or the column-bytes
    # floor's few dozen (stats_task_blocks=0). Other sums of the same rows: rounding only.
    (d0, s0), (d1, s1) = runs_with_tuning(
        tuning, "stats_task_blocks",
        lambda: run_updates(shape, dtype, dict(clip_threshold=0.05), "cuda"), values=(0, 256))
    assert not torch.equal(s0["col_second_moment"], s1["col_second_moment"]), \
        "stats_task_blocks must change the blocks' rows"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(d1, d0) <= tol
    assert rel_err(s1["col_second_moment"], s0["col_second_moment"]) <= 1e-6
    dp, _ = run_updates(shape, dtype, dict(clip_threshold=0.05), "cpu")
    assert rel_err(d1, dp) <= (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("shape,dtype", [((130, 5504), torch.float32),
                                         ((65, 2048), torch.bfloat16),
                                         ((3, 8192), torch.float32)], ids=str)
def test_row_stats_ring_depth_changes_nothing(shape, dtype, tuning):
    # The ring only overlaps loads with sums: every column is summed in row order.
    runs = runs_with_tuning(
        tuning, "stats_stages",
        lambda: run_updates(shape, dtype, dict(clip_threshold=0.05), "cuda"), values=(2, 3, 4))
    for d, s in runs[1:]:
        assert torch.equal(d, runs[0][0])
        assert torch.equal(s["col_second_moment"], runs[0][1]["col_second_moment"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_take_a_stats_launch_apart_and_change_nothing(dtype):
    # Rows past 6144 columns are too wide for the stats kernel's register accumulators:
    # their column sums live in the registers of a launch of their own (up to 12288
    # columns) or in its shared memory (past that), footprints that would hold every
    # block of a shared launch to one an SM. Stepped together (two launches) or each alone
    # (one), every tensor ends the same to the bit.
    shapes = [(64, 512), (33, 8192), (65, 2048), (9, 12800)]

    def train(together):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype))
                  for s in shapes]
        opts = ([flora_ext.Flora(params, lr=1e-2, beta1=None)] if together else
                [flora_ext.Flora([p], lr=1e-2, beta1=None) for p in params])
        launches = []
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for opt in opts:
                    opt.step()
                torch.cuda.synchronize()
            launches.append(sum(e.count for e in prof.key_averages()
                                if "stats_kernel" in e.key or "stats_wide_kernel" in e.key))
        return params, opts, launches

    (together, opts, launches), (alone, _, _) = train(True), train(False)
    assert launches == [2, 2, 2]
    for a, b in zip(together, alone):
        assert torch.equal(a, b), tuple(a.shape)
    assert opts[0].state[together[1]]["row_second_moment"].abs().max() > 0


def _kernel_args(step, name):
    """The launch arguments (grid, block, shared memory, ...) of the CUDA kernels whose name
    holds `name` during step(), from torch.profiler's trace."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    return [e["args"] for e in events
            if e.get("cat") == "kernel" and name in e.get("name", "")]


# Rows past the stats pass's register accumulators (6144 columns) and one narrow tensor:
# 7000 bf16 columns put two rows in a stage (the partial of a stage is a sum of two); 11008
# one.
WIDE_ROW_SHAPES = [(40, 7000), (37, 11008), (64, 1024)]


def _train_wide_rows(dtype, seed):
    """Three steps of Flora without momentum on WIDE_ROW_SHAPES; the parameters, the
    optimizer, and the shared memory of each step's wide rows' stats launch."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype))
              for s in WIDE_ROW_SHAPES]
    opt = flora_ext.Flora(params, lr=1e-2, beta1=None)
    smem = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
        smem += [a["shared memory"] for a in _kernel_args(opt.step, "stats_wide_kernel")]
    return params, opt, smem


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_column_sums_in_registers_equal_shared_memory(dtype, tuning):
    # wide_row_regs=0 keeps every wide row's column sums in shared memory: the register
    # accumulators add the same per-stage partials in the same order.
    def train(regs):
        tuning(wide_row_regs=regs)
        return _train_wide_rows(dtype, seed=3)

    (regs, opt, regs_smem), (shared, _, shared_smem) = train(1), train(0)
    for a, b in zip(regs, shared):
        assert torch.equal(a, b), tuple(a.shape)
    assert opt.state[regs[1]]["col_second_moment"].abs().max() > 0
    # The variant is live: with the column sums in shared memory the wide rows' launch asks
    # for more of it (fp32 on an H100: 180880 bytes against 136848).
    assert len(regs_smem) == len(shared_smem) == 3
    assert all(b > a for a, b in zip(regs_smem, shared_smem)), (regs_smem, shared_smem)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_ring_depth_keeps_the_bits(dtype, tuning):
    # wide_stats_stages sets the ring of the wide rows' launch only; a stage holds the same
    # rows whatever the depth, so the sums and every update keep their bits. The launch's
    # shared memory shows the depth taken (a stage's bytes times the stages, as far as the
    # SM's shared memory allows: fp32 rows of 11008 columns are 43 KiB a stage).
    def train(stages):
        tuning(wide_stats_stages=stages)
        params, opt, wide = _train_wide_rows(dtype, seed=4)
        narrow = [a["shared memory"] for a in _kernel_args(opt.step, "stats_kernel")]
        return [p.detach().clone() for p in params], wide, narrow

    base, base_wide, base_narrow = train(0)
    for stages in (4, 6):
        params, wide, narrow = train(stages)
        for a, b in zip(params, base):
            assert torch.equal(a, b), (stages, tuple(a.shape))
        assert len(wide) == len(base_wide) == 3
        assert all(w > b for w, b in zip(wide, base_wide)), (stages, wide, base_wide)
        assert narrow == base_narrow  # the other rows' ring stays


# sum(p^2) kept from the last CUDA step (reuse_param_norms): the same results as reading
# p, on every layout, and a write to p between steps (version counter, or p.data swapped)
# is seen.
NORM_SHAPES = [(64, 2048), (30, 20), (37,), (3, 4, 5), (96, 200), (200, 96)]


def train_norms(reuse, dtype=torch.float32, between=None, steps=5, **hp):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype))
              for s in NORM_SHAPES]
    grads = [[torch.randn(s, generator=gen).to("cuda", dtype) for s in NORM_SHAPES]
             for _ in range(steps)]
    kw = dict(lr=1e-2, beta1=0.9, rank=8, weight_decay=0.1, reuse_param_norms=reuse)
    kw.update(hp)
    opt = flora_ext.Flora(params, **kw)
    for t, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        if between is not None:
            between(t, params, opt)
    return [p.detach().float().cpu() for p in params]


@pytest.mark.parametrize("hp", [dict(), dict(beta1=None), dict(dtype=torch.bfloat16),
                                dict(dtype=torch.bfloat16, stochastic_rounding=True)], ids=str)
def test_reused_param_norms_match_reading_p(hp):
    # The two sums of p^2 differ in order only; in bf16 that can move a rounding by one
    # ulp (2^-8) of one element, ~7e-4 of the norm of the smallest tensor (37 elements).
    tol = 2e-3 if "dtype" in hp else 1e-6
    for a, b in zip(train_norms(True, **hp), train_norms(False, **hp)):
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("write", ["in_place", "data_swap", "load_state_dict"])
def test_param_written_between_steps_is_seen(write):
    def between(t, params, opt):
        if t != 1:
            return
        with torch.no_grad():
            if write == "in_place":
                for p in params:
                    p.mul_(3.0)
            elif write == "data_swap":
                for p in params:
                    p.data = p.data * 3.0
            else:
                opt.load_state_dict(opt.state_dict())
                for p in params:
                    p.copy_(p * 3.0)

    reused, read = train_norms(True, between=between), train_norms(False, between=between)
    for a, b in zip(reused, read):
        assert rel_err(a, b) <= 1e-6


# Fused compressed momentum (tf32=True): the apply pass is the up GEMM on the tensor
# cores (fp16 operands), and sum D^2 comes from sum U^2 and the momentum terms (Gram
# identity). Shapes: left and right, tiles and rank slices with partial edges
# (300 x 1000, r = 40), row stats (wide rows) and tile passes (narrow rows), kappa = 4
# so two resample steps run.
FUSED_CASES = [
    ((256, 1024), torch.float32, dict(rank=64)),
    ((1024, 512), torch.float32, dict(rank=40, weight_decay=0.1)),
    ((300, 1000), torch.float32, dict(rank=32, clip_threshold=0.3)),
    ((200, 96), torch.float32, dict(rank=8, clip_threshold=0.3)),     # tile passes
    ((512, 2048), torch.bfloat16, dict(rank=64, clip_threshold=0.3)),
    ((1024, 256), torch.float16, dict(rank=32)),
    # rank 256 (every warpgroup of the sm_90a down GEMM busy) on a left tensor whose n
    # (300) is not a multiple of 8 (P's rows padded), and two rank blocks (264) right
    ((300, 1000), torch.bfloat16, dict(rank=256)),
    ((1000, 520), torch.float32, dict(rank=264)),
]


def run_momentum(shape, dtype, hp, device):
    """run_updates with compressed momentum (TF32 on) over 10 steps, kappa = 4."""
    return run_updates(shape, dtype, dict(beta1=0.9, kappa=4, tf32=True, **hp), device,
                       steps=10, seed=2)


@pytest.mark.parametrize("shape,dtype,hp", FUSED_CASES, ids=str)
def test_fused_momentum_matches_cpu(shape, dtype, hp):
    # TF32 (10-bit mantissa) in the projections: 2e-3, as test_cuda_step_with_tf32;
    # 16-bit parameters are rounded once a step on both sides.
    (dc, sc), (dp, sp) = run_momentum(shape, dtype, hp, "cuda"), run_momentum(shape, dtype, hp, "cpu")
    assert dp.abs().max() > 0
    tol = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert rel_err(dc, dp) <= tol
    assert rel_err(sc["momentum"].cpu(), sp["momentum"]) <= 5 * tol
    assert sc["seed"] == sp["seed"] and sc["step"] == sp["step"]


@pytest.mark.parametrize("shape,dtype,hp", [FUSED_CASES[0], FUSED_CASES[2], FUSED_CASES[4]],
                         ids=str)
def test_fused_and_unfused_momentum_agree(shape, dtype, hp, tuning):
    # fused_momentum=0 takes the update buffer and the rms pass: the same math,
    # other roundings (both TF32), so the two must differ, a little.
    (d0, s0), (d1, s1) = runs_with_tuning(
        tuning, "fused_momentum", lambda: run_momentum(shape, dtype, hp, "cuda"))
    assert not torch.equal(d0, d1), "fused_momentum=0 must take the unfused passes"
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    assert rel_err(d1, d0) <= tol
    assert rel_err(s1["momentum"], s0["momentum"]) <= 5 * tol


@pytest.mark.parametrize("shape,dtype,hp", [FUSED_CASES[4], FUSED_CASES[5], FUSED_CASES[6],
                                            ((1024, 512), torch.bfloat16, dict(rank=40)),
                                            ((512, 2048), torch.bfloat16,
                                             dict(rank=64, quantization=True)),
                                            ((512, 2048), torch.bfloat16,
                                             dict(rank=64, projection="orthogonal"))], ids=str)
def test_library_down_gemm_agrees_with_fused_kernel(shape, dtype, hp, tuning):
    # down_library=1: 16-bit tasks take the down GEMM in cuBLAS (P scaled and rounded to the
    # gradient's dtype, G as it is) and down_epilogue_kernel; 0 (default) forms U in fp16
    # inside fused_down_kernel. Other roundings of the same products: close, not equal.
    (d0, s0), (d1, s1) = runs_with_tuning(
        tuning, "down_library", lambda: run_momentum(shape, dtype, hp, "cuda"))
    assert not torch.equal(s0["momentum"], s1["momentum"]), "down_library=1 must take cuBLAS"
    # 8-bit momentum: where the two Ms differ by a rounding a code may flip (H100: 0.042)
    assert rel_err(d1, d0) <= (6e-2 if hp.get("quantization") else 2e-2)
    if not hp.get("quantization"):  # else 8-bit codes: the updates above carry them
        assert rel_err(s1["momentum"], s0["momentum"]) <= 5e-2


def test_library_down_gemm_in_chunks_agrees_with_fused_kernel(tuning):
    # Several tensors of one shape in one call, on each side of the projection. A group's
    # limit (here a quarter of kFusedMinBytes, 16 MiB) holds the scaled P^T and fp32 result
    # of four of them (1024 x 3072, rank 256: 3.7 MB each), so on steps without resampling
    # the library down GEMM takes a group of 7 in chunks of 4 and 3 through the same places.
    # A chunk that reused a place too early, or a task that read another's result, would
    # not agree with fused_down_kernel.
    gen = torch.Generator(device="cuda").manual_seed(5)
    shapes = [(1024, 3072)] * 7 + [(3072, 1024)] * 5

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    p0 = [randn(s) for s in shapes]
    grads = [[randn(s, 0.1 + t) for s in shapes] for t in range(6)]

    def run():
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = flora_ext.Flora(params, lr=1e-2, beta1=0.9, rank=256, kappa=4, tf32=True)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
        return [(p.detach().double() - q.double(), opt.state[p]["momentum"].clone())
                for p, q in zip(params, p0)]

    runs = runs_with_tuning(tuning, "down_library", run)
    for k, ((d0, m0), (d1, m1)) in enumerate(zip(runs[0], runs[1])):
        assert d0.abs().max() > 0
        assert rel_err(d1, d0) <= 2e-2, k
        assert rel_err(m1, m0) <= 5e-2, k
        assert not torch.equal(m0, m1), f"tensor {k}: down_library=1 must take cuBLAS"


def test_fused_momentum_is_deterministic():
    shape, dtype, hp = FUSED_CASES[2]
    (da, sa), (db, sb) = (run_momentum(shape, dtype, hp, "cuda") for _ in range(2))
    assert torch.equal(da, db) and torch.equal(sa["momentum"], sb["momentum"])


@pytest.mark.parametrize("shape,rank", [((96, 200), 6), ((202, 96), 8), ((96, 204), 8)],
                         ids=str)
def test_unfusable_momentum_falls_back(shape, rank):
    # A rank or m not a multiple of 8, or n not one of 4, keeps the unfused passes.
    hp = dict(rank=rank)
    (dc, sc), (dp, sp) = (run_momentum(shape, torch.float32, hp, d) for d in ("cuda", "cpu"))
    assert rel_err(dc, dp) <= 2e-3
    assert rel_err(sc["momentum"].cpu(), sp["momentum"]) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,hp", [((256, 1024), dict(beta1=0.9, rank=64)),
                                      ((200, 96), dict(beta1=0.9, rank=8)),
                                      ((64, 1024), dict(beta1=None)),
                                      # rows of 9600 bytes: three a stage of G, one of G and p
                                      ((200, 2400), dict(beta1=None))], ids=str)
def test_resume_is_bitwise_on_cuda(shape, hp, dtype):
    # The first step after a resume sums p^2 from p; an uninterrupted run takes it from
    # the norm cache that the last apply pass filled. Both must be the same bits (the
    # fused apply writes fp32 and 16-bit tiles in different orders).
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(shape, generator=gen).to(dtype)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(6)]
    resumed, _, ref, _ = resumed_and_uninterrupted(p0, grads, lr=1e-2, kappa=4, **hp)
    assert torch.equal(resumed, ref)


def test_fused_down_gemm_saturates_a_huge_u():
    # One small gradient in a row and a column of zeros, amid gradients of 1, gives
    # U ~2.5e5 there: past fp16, in which the down GEMM reads U. It saturates at 65504
    # (an inf would make the momentum inf), and p, which takes U from the fp32
    # gradient, matches the CPU.
    n = m = 256
    g = torch.ones(n, m)
    g[0, :] = 0
    g[:, 0] = 0
    g[0, 0] = 1e-3
    p0 = torch.randn(n, m, generator=torch.Generator().manual_seed(3))

    def run(device):
        p = torch.nn.Parameter(p0.to(device, copy=True))
        opt = flora_ext.Flora([p], lr=1e-2, beta1=0.9, rank=64, tf32=True)
        p.grad = g.to(device)
        opt.step()  # one step: M was 0, so D = (1 - beta1) U does not involve it
        return p.detach().cpu().double() - p0.double(), opt.state[p]["momentum"].cpu()

    (dc, mc), (dp, mp) = run("cuda"), run("cpu")
    assert torch.isfinite(mc).all() and torch.isfinite(dc).all()
    assert rel_err(dc, dp) <= 2e-3


def test_host_phases_show_in_the_profiler():
    # benchmarks/probes/host_trace.py reads the op's host time by these scopes (RecordFunction).
    p = torch.nn.Parameter(torch.randn(96, 200, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = flora_ext.Flora([p], lr=1e-3, rank=8, beta1=0.9)
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.key for e in prof.key_averages()}
    assert {"flora::check_inputs", "flora::plan", "flora::launch"} <= names, sorted(names)
