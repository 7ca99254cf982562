"""quantization=True (docs/FLORA.md §11): the 8-bit format against a float64 model written
from its description, the step against the float64 reference with the same quantization,
state_dict round trips, and CPU against CUDA (those skip without a GPU)."""
import copy
import io
import math

import pytest
import torch

import flora_ext
from flora_ext import _quantized
from tests.conftest import DEVICES, rel_err, requires_cuda
from tests.reference import full_hp, init_state, layout_for, reference_step

BLOCK = 256
SIGNED_HALF_GAP = 0.9 / 64 / 2  # widest bin of the signed map: 64 bins in [0.1, 1]
UNSIGNED_HALF_GAP = 0.9 / 128 / 2


# ------------------------------------------------------------------ float64 model of the format


def model_map(signed):
    """The dynamic map from its description: decade i = 0..6 (scale 10^(i-6)), [0.1, 1] cut
    into 2^i bins (2^(i+1) unsigned), the bins' midpoints; mirrored when signed; 0 and 1."""
    codes = [0.0, 1.0]
    for i in range(7):
        bins = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        codes += mids.tolist()
        if signed:
            codes += (-mids).tolist()
    return torch.tensor(sorted(codes), dtype=torch.float64)


def model_quantize(x, signed):
    """float64 codes (index of the nearest map entry to x / absmax, ties low) and absmax."""
    x = x.double().reshape(-1)
    values = model_map(signed)
    pad = (-x.numel()) % BLOCK
    blocks = torch.cat([x, x.new_zeros(pad)]).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.where(absmax[:, None] > 0, blocks / absmax[:, None].clamp_min(1e-300), 0.0)
    dist = (scaled[..., None] - values).abs()
    codes = dist.argmin(dim=-1).reshape(-1)[: x.numel()]  # argmin: the first (lower) on ties
    return codes, absmax


def model_dequantize(codes, absmax, signed):
    """value * absmax; the map's entries are stored as float32 (the product of two float32
    numbers is exact in float64, so .float() of it rounds as a float32 multiplication)."""
    values = model_map(signed).float().double()
    block = torch.arange(codes.numel()) // BLOCK
    return values[codes.long().reshape(-1)] * absmax[block]


def op_quantize(x, signed):
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty((x.numel() + BLOCK - 1) // BLOCK, device=x.device)
    torch.ops.flora.quantize_blockwise_(x, codes, absmax, signed)
    return codes, absmax


def op_dequantize(codes, absmax, signed):
    out = torch.empty(codes.shape, device=codes.device)
    torch.ops.flora.dequantize_blockwise_(codes, absmax, out, signed)
    return out


def sample(numel, gen, signed):
    """Values over many decades, as optimizer states are, with an outlier per 1000."""
    x = torch.randn(numel, generator=gen, dtype=torch.float64)
    x = x * torch.exp(3 * torch.randn(numel, generator=gen, dtype=torch.float64))
    x[torch.rand(numel, generator=gen) < 1e-3] *= 100
    return (x if signed else x.abs()).float()


@pytest.mark.parametrize("signed", [True, False])
def test_map_is_the_published_construction(signed):
    op = torch.ops.flora.dynamic_map(signed)
    assert op.dtype == torch.float32 and op.shape == (256,)
    assert torch.equal(op, model_map(signed).float())
    assert op.unique().numel() == 256 and op[-1] == 1.0 and (op == 0).sum() == 1
    assert (op.min() < 0) == signed


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 70001])
def test_quantize_matches_the_float64_model(signed, numel):
    gen = torch.Generator().manual_seed(numel)
    x = sample(numel, gen, signed)
    codes, absmax = op_quantize(x, signed)
    want_codes, want_absmax = model_quantize(x, signed)
    assert torch.equal(absmax.double(), want_absmax)  # a max is exact
    # float32 division against the float64 model: only a value within rounding of the
    # midpoint of two codes may pick the other one.
    values = model_map(signed)
    scaled = x.double() / want_absmax[torch.arange(numel) // BLOCK]
    differ = codes.long() != want_codes
    gap = (scaled[differ] - (values[codes.long()[differ]] + values[want_codes[differ]]) / 2).abs()
    assert (gap <= 1e-6).all(), gap.max()
    assert differ.sum() <= max(1, numel // 10000)
    back = op_dequantize(codes, absmax, signed)
    assert torch.equal(back.double(), model_dequantize(codes, absmax.double(), signed).float().double())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_codes_at_the_decision_points(device, signed):
    """Each decision point between neighbouring codes (their midpoint, rounded to float32)
    and the float32 numbers either side of it, in blocks whose absmax is 1 (the division
    rounds nothing): the code is the number of points below the value, so a value on a
    point takes the lower code. CUDA keeps the points padded in shared memory; a wrong
    index there would move codes here."""
    values = model_map(signed)
    points = ((values[:-1] + values[1:]) / 2).float()
    x = torch.stack([torch.nextafter(points, torch.tensor(-2.0)), points,
                     torch.nextafter(points, torch.tensor(2.0))], dim=1).reshape(-1)
    x = x[x.abs() <= 1]
    rows = x.split(BLOCK - 1)  # and a 1.0 in every block: each block's absmax is 1
    x = torch.cat([torch.cat([r, torch.ones(1)]) for r in rows])
    codes, absmax = op_quantize(x.to(device), signed)
    assert torch.equal(absmax.cpu(), torch.ones_like(absmax.cpu()))
    want = (x[:, None] > points[None, :]).sum(dim=1)
    assert torch.equal(codes.cpu().long(), want)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_within_half_a_bin_of_each_blocks_absmax(signed):
    gen = torch.Generator().manual_seed(1)
    x = sample(64 * BLOCK + 17, gen, signed)
    back = op_dequantize(*op_quantize(x, signed), signed)
    absmax = model_quantize(x, signed)[1].float()
    bound = (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP) * absmax
    err = (back - x).abs()
    block = torch.arange(x.numel()) // BLOCK
    assert (err <= bound[block] + 1e-6 * absmax[block]).all()  # (+ float32 rounding of the map)
    # the stated bound is tight: some element comes close to it
    assert (err / bound[block]).max() > 0.9
    # a block's largest element comes back exact (code 1), or within 0.71% when it is
    # negative (the signed map has no -1: its most negative code is -(1 - 0.9/128))
    largest = back.view(-1)[:64 * BLOCK].view(64, BLOCK).abs().amax(1)
    assert (largest >= absmax[:64] * (1 - 0.9 / 128) * (1 - 1e-6)).all()


def test_an_outlier_costs_only_its_own_block():
    x = torch.randn(4 * BLOCK)
    x[BLOCK + 3] = 1e4
    err = (op_dequantize(*op_quantize(x, True), True) - x).abs()
    assert err[BLOCK:2 * BLOCK].max() > 1e-2  # its block lost the small values' precision
    others = torch.cat([err[:BLOCK], err[2 * BLOCK:]])
    assert others.max() <= SIGNED_HALF_GAP * x.abs().max() * 1e-3 * 10 + 0.03


def test_zero_and_non_finite_blocks():
    x = torch.zeros(3 * BLOCK)
    x[2 * BLOCK + 5] = float("nan")
    codes, absmax = op_quantize(x, True)
    back = op_dequantize(codes, absmax, True)
    assert torch.equal(back[:2 * BLOCK], x[:2 * BLOCK])
    assert back[2 * BLOCK:].isnan().all()  # a NaN is not hidden: its block reads back NaN
    assert int(codes[0]) == _quantized.zero_code(True)


@pytest.mark.parametrize("device", DEVICES)
def test_write_back_keeps_the_blocks_a_step_left_as_they_read_back(device):
    # Block 0's largest magnitude is negative: the signed map has no -1, so it reads back
    # 0.7% small, and quantizing that read-back again would shrink it once more.
    x = torch.randn(3 * BLOCK - 40, generator=torch.Generator().manual_seed(3)).to(device)
    x[7] = -10.0
    codes, absmax = op_quantize(x, True)
    back = op_dequantize(codes, absmax, True)
    assert not torch.equal(op_quantize(back, True)[1][:1], absmax[:1])  # the premise
    stepped = back.clone()
    stepped[2 * BLOCK + 1] += 1.0  # the step changed block 2 only
    kept_codes, kept_absmax = codes.clone(), absmax.clone()
    torch.ops.flora.requantize_blockwise_(stepped, kept_codes, kept_absmax, True)
    fresh_codes, fresh_absmax = op_quantize(stepped, True)
    assert torch.equal(kept_codes[:2 * BLOCK], codes[:2 * BLOCK])
    assert torch.equal(kept_absmax[:2], absmax[:2])
    assert torch.equal(kept_codes[2 * BLOCK:], fresh_codes[2 * BLOCK:])
    assert torch.equal(kept_absmax[2:], fresh_absmax[2:])


@pytest.mark.parametrize("change,match", [
    (lambda v, c, a: (v, c.to(torch.int8), a), "codes must be uint8"),
    (lambda v, c, a: (v.double(), c, a), "values must be float32"),
    (lambda v, c, a: (v, c, a[:-1]), "absmax must be a vector of 4 entries"),
    (lambda v, c, a: (v, c[:-1], a), "codes must have the shape of values"),
    (lambda v, c, a: (v[::2], c[::2], a[:2]), "must be contiguous"),
])
def test_format_ops_refuse_bad_arguments(change, match):
    v, c, a = torch.randn(1000), torch.zeros(1000, dtype=torch.uint8), torch.zeros(4)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.quantize_blockwise_(*change(v, c, a), True)


# ------------------------------------------------------------------ the step


HP = dict(lr=1e-2, beta1=0.9, rank=4, kappa=3)
SHAPES = ((16, 40), (40, 16), (37,), (8, 100), (6, 5, 4), (300, 3))


def params_for(shapes=SHAPES, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def grads_for(ps, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.device) for p in ps] for _ in range(steps)]


def run(opt, ps, grads):
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()


def float_state(state):
    """``state`` with its 8-bit tensors read back as float32 (CPU)."""
    out = {}
    for key, v in state.items():
        if key in _quantized.STATE_KEYS:
            continue
        if key in _quantized.SIGNED and v.dtype == torch.uint8:
            v = _quantized.dequantize(key, v, state[_quantized.ABSMAX[key]])
        out[key] = v.cpu().clone() if isinstance(v, torch.Tensor) else v
    return out


def test_state_is_8_bit_where_documented():
    ps = params_for()
    opt = flora_ext.Flora(ps, **HP, quantization=True)
    run(opt, ps, grads_for(ps, 1))
    for p in ps:
        state, lay = opt.state[p], layout_for(p.shape, full_hp(**{k: HP[k] for k in ("lr", "beta1", "rank", "kappa")}))
        for name in ("momentum", "second_moment"):
            if name in state:
                assert state[name].dtype == torch.uint8 and state[name].shape == (
                    p.shape if name == "second_moment" else lay["momentum_shape"])
                assert state[_quantized.ABSMAX[name]].shape == (math.ceil(state[name].numel() / 256),)
        if lay["factored"]:
            assert state["row_second_moment"].dtype == torch.float32


def test_step_matches_the_float64_reference_with_the_same_quantization():
    """Every step starts the reference from the extension's state (read back from 8 bits),
    steps it in float64 and quantizes with the float64 model: parameters and read-back
    states agree, the codes but where float32 and float64 round differently at a midpoint."""
    hp = full_hp(**HP)
    ps = params_for()
    opt = flora_ext.Flora(ps, **HP, quantization=True)
    differing = total = 0
    for t, gs in enumerate(grads_for(ps, 7)):
        before = {p: (p.detach().double().clone(), float_state(opt.state[p]) if opt.state[p]
                      else None) for p in ps}
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        for k, (p, g) in enumerate(zip(ps, gs)):
            p0, state = before[p]
            if state is None:
                state = init_state(p, hp, seed=k + 1)
            state = {key: v.double() if isinstance(v, torch.Tensor) else v for key, v in state.items()}
            want = reference_step(p0, g, state, hp)
            # the update itself, not only the parameter (float32 step: ~3e-5 here)
            assert rel_err(p.detach().double() - p0, want - p0) < 2e-4, (t, k)
            assert opt.state[p]["step"] == state["step"] and opt.state[p].get("seed") == state.get("seed")
            for name, signed in _quantized.SIGNED.items():
                if name not in state:
                    continue
                codes, absmax = model_quantize(state[name], signed)
                got = opt.state[p][name].reshape(-1).long()
                assert torch.allclose(opt.state[p][_quantized.ABSMAX[name]].double(), absmax,
                                      rtol=1e-4, atol=0)
                near = model_dequantize(codes, absmax, signed)
                back = model_dequantize(got, absmax, signed)
                gap = (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP) * 2
                block = torch.arange(got.numel()) // BLOCK
                assert ((back - near).abs() <= gap * absmax[block] + 1e-30).all()
                differing += int((got != codes).sum())
                total += got.numel()
    assert differing <= total * 0.01, (differing, total)


def test_quantized_and_float_training_stay_close():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    twin = copy.deepcopy(model)
    starts = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(256, 32)
    y = torch.tanh(x @ torch.randn(32, 8) / 4)  # learnable
    opts = [flora_ext.Flora(m.parameters(), lr=3e-2, beta1=0.9, rank=8, quantization=q)
            for m, q in ((model, False), (twin, True))]
    losses = []
    for m, opt in zip((model, twin), opts):
        run_losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            run_losses.append(loss.item())
        losses.append(run_losses)
    assert losses[1][-1] < 0.7 * losses[1][0], losses  # it trains
    assert abs(losses[1][-1] - losses[0][-1]) <= 0.01 * losses[0][-1], losses  # 0.06% here
    for a, b, start in zip(model.parameters(), twin.parameters(), starts):
        # what 8 bits change, against how far training moved the parameter
        assert rel_err(b.detach() - start, a.detach() - start) < 0.05  # 0.011-0.024 here


@pytest.mark.parametrize("device", DEVICES)
def test_a_skipped_step_leaves_8_bit_state_bitwise(device):
    # skip_nonfinite: a parameter whose gradient holds a NaN keeps its parameter and state;
    # its 8-bit state is not rounded again either (docs/FLORA.md §4.8, §11).
    ps = params_for(device=device)
    opt = flora_ext.Flora(ps, **HP, quantization=True, skip_nonfinite=True)
    run(opt, ps, grads_for(ps, 3))
    before = [copy.deepcopy(opt.state[p]) for p in ps]
    values = [p.detach().clone() for p in ps]
    for p, g in zip(ps, grads_for(ps, 1, seed=5)[0]):
        g.view(-1)[g.numel() // 2] = float("nan")
        p.grad = g
    opt.step()
    for p, v, state in zip(ps, values, before):
        assert torch.equal(p.detach(), v)
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and key != "step":
                assert torch.equal(t, opt.state[p][key]), (tuple(p.shape), key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_bitwise_resume(device, dtype):
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in params_for(device=device)]
    grads = [[g.to(dtype) for g in gs] for gs in grads_for(ps, 6)]
    opt = flora_ext.Flora(ps, **HP, quantization=True)
    run(opt, ps, grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = flora_ext.Flora(qs, **HP, quantization=True)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for p, q in zip(ps, qs):
        for key, v in opt.state[p].items():
            got = resumed.state[q][key]
            if isinstance(v, torch.Tensor):
                assert got.dtype == v.dtype and got.device == v.device and torch.equal(got, v)
                assert got.data_ptr() != v.data_ptr()
    run(opt, ps, grads[3:])
    run(resumed, qs, grads[3:])
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for key, v in opt.state[p].items():
            assert torch.equal(v, resumed.state[q][key]) if isinstance(v, torch.Tensor) else v == resumed.state[q][key]


def test_float_state_is_quantized_on_load():
    ps = params_for()
    grads = grads_for(ps, 2)
    opt = flora_ext.Flora(ps, **HP)
    run(opt, ps, grads)
    sd = opt.state_dict()
    qopt = flora_ext.Flora(ps, **HP, quantization=True)
    qopt.load_state_dict(sd)
    for p in ps:
        for name in _quantized.SIGNED:
            if name in opt.state[p]:
                codes, absmax = _quantized.quantize(name, opt.state[p][name])
                assert torch.equal(qopt.state[p][name], codes)
                assert torch.equal(qopt.state[p][_quantized.ABSMAX[name]], absmax)
        assert torch.equal(qopt.state[p]["row_second_moment" if p.dim() == 2 else "step"],
                           opt.state[p]["row_second_moment" if p.dim() == 2 else "step"]) \
            if p.dim() == 2 else qopt.state[p]["step"] == opt.state[p]["step"]
    run(qopt, ps, grads_for(ps, 1, seed=5))  # and it steps


def test_state_bytes_per_parameter():
    """rank=256, beta1=0.9 on a 4096 x 4096 weight: 0.066 bytes/parameter in 8 bits (0.252 in
    float32), as docs/FLORA.md §11 states; tests at a quarter of the width (rank 64)."""
    p = torch.nn.Parameter(torch.zeros(1024, 1024))
    sizes = {}
    for q in (False, True):
        opt = flora_ext.Flora([p], lr=1e-3, beta1=0.9, rank=64, quantization=q)
        p.grad = torch.randn_like(p)
        opt.step()
        sizes[q] = flora_ext.optimizer.state_bytes(opt)
    assert sizes[False] == 4 * (1024 + 1024 + 1024 * 64)
    assert sizes[True] == 4 * (1024 + 1024) + 1024 * 64 + 4 * (1024 * 64 // 256)


def test_torch_compile_is_refused_clearly():
    ps = params_for(shapes=((8, 8),))
    opt = flora_ext.Flora(ps, lr=1e-2, quantization=True)
    ps[0].grad = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="does not support quantization=True"):
        opt._compiled_step(None)


def test_accumulator_steps_quantized_state():
    ps = params_for(shapes=((16, 40), (37,)))
    opt = flora_ext.Flora(ps, **HP, quantization=True)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2)
    for _ in range(2):
        for _ in range(2):
            loss = sum((p * torch.randn_like(p)).sum() for p in ps)
            loss.backward()
        opt.step()
    for p in ps:
        assert opt.state[p]["step"] == 2 and opt.state[p]["momentum"].dtype == torch.uint8
    acc.remove()


# ------------------------------------------------------------------ CUDA against CPU


@requires_cuda
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_format_is_bitwise_the_cpus(signed):
    gen = torch.Generator().manual_seed(3)
    x = sample(300 * BLOCK + 77, gen, signed)
    codes, absmax = op_quantize(x, signed)
    cuda_codes, cuda_absmax = op_quantize(x.cuda(), signed)
    assert torch.equal(cuda_codes.cpu(), codes) and torch.equal(cuda_absmax.cpu(), absmax)
    assert torch.equal(op_dequantize(cuda_codes, cuda_absmax, signed).cpu(),
                       op_dequantize(codes, absmax, signed))


@requires_cuda
@pytest.mark.parametrize("offset", [1, 3])
def test_cuda_format_of_unaligned_views_is_bitwise_the_cpus(offset):
    """Views that start off a vector boundary take the CUDA kernels' element-wise path;
    requantize_blockwise_ keeps unchanged blocks there too."""
    gen = torch.Generator().manual_seed(offset)
    numel = 40 * BLOCK + 13
    x = sample(numel, gen, True)
    x[5 * BLOCK:6 * BLOCK] = 0.0
    x[9 * BLOCK + 2] = float("nan")
    results = {}
    for device in ("cpu", "cuda"):
        values = torch.empty(numel + offset, device=device)[offset:]
        values.copy_(x)
        codes = torch.empty(numel + offset, dtype=torch.uint8, device=device)[offset:]
        absmax = torch.empty((numel + BLOCK - 1) // BLOCK, device=device)
        torch.ops.flora.quantize_blockwise_(values, codes, absmax, True)
        back = torch.empty(numel + offset, device=device)[offset:]
        torch.ops.flora.dequantize_blockwise_(codes, absmax, back, True)
        back[3 * BLOCK + 1] += 1.0  # block 3 changes; the rest must keep codes and absmax
        torch.ops.flora.requantize_blockwise_(back, codes, absmax, True)
        results[device] = (codes.cpu(), absmax.cpu(), back.cpu())
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        assert torch.equal(cpu, gpu) if cpu.dtype == torch.uint8 else \
            torch.equal(cpu.nan_to_num(7.0), gpu.nan_to_num(7.0))


@requires_cuda
def test_cuda_step_matches_cpu_step():
    """tf32=False; the float32 steps differ by rounding, and a value near a code midpoint
    may then take the neighbouring code (a difference the next steps carry, decaying by
    beta1): nearly all codes agree (>= 95%), the rest within a few code gaps of their block's
    absmax; parameters within 3e-5."""
    cpu_ps, cuda_ps = params_for(), params_for(device="cuda")
    grads = grads_for(cpu_ps, 5)
    cpu = flora_ext.Flora(cpu_ps, **HP, quantization=True, tf32=False)
    gpu = flora_ext.Flora(cuda_ps, **HP, quantization=True, tf32=False)
    run(cpu, cpu_ps, grads)
    run(gpu, cuda_ps, [[g.cuda() for g in gs] for gs in grads])
    for p, q in zip(cpu_ps, cuda_ps):
        assert rel_err(q.detach().cpu(), p.detach()) < 3e-5  # CPU, 1e-4 gradient noise: 8e-6
        a, b = float_state(cpu.state[p]), float_state(gpu.state[q])
        for name, signed in _quantized.SIGNED.items():
            if name in a:
                absmax = cpu.state[p][_quantized.ABSMAX[name]]
                block = torch.arange(a[name].numel()) // BLOCK
                gap = 2 * (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP)
                diff = (a[name] - b[name]).abs().reshape(-1)
                assert (diff <= 3 * gap * absmax[block] * 1.01 + 1e-30).all()
                codes = (cpu.state[p][name] != gpu.state[q][name].cpu()).double().mean()
                assert codes <= 0.05, (name, codes.item())  # 0-1.9% at 1e-4 gradient noise on the CPU


# ------------------------------------------------------------------ 8-bit state inside the op

# Parameters whose 8-bit state step_group_ reads and writes as codes: 1-D (unfactored second
# moment and dense momentum), and 2-D past the aspect-ratio limit (dense momentum) in widths
# that are and are not multiples of the 256-element block, so blocks straddle rows.
OP_SHAPES = ((300,), (1000,), (64, 600), (40, 1024), (8, 2000), (3, 5))
OP_HP = dict(lr=1e-2, beta1=0.9, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8,
             weight_decay=0.01, rank=4, kappa=3, scale_parameter=True, relative_step=False,
             warmup_init=False, factorize_second_moment=True, tf32=True,
             stochastic_rounding=False, skip_nonfinite=False, projection="gaussian",
             max_aspect_ratio=4.0)


def op_states(ps, hp):
    """Fresh float32 states of ``ps`` in step_group_'s order, as dicts."""
    states = []
    for p in ps:
        layout = flora_ext._ops.param_layout(p.shape, hp["rank"], hp["beta1"],
                                            hp["factorize_second_moment"],
                                            hp["max_aspect_ratio"])
        st = {}
        if layout["factored"]:
            st["row_second_moment"] = torch.zeros(p.shape[0], device=p.device)
            st["col_second_moment"] = torch.zeros(p.shape[1], device=p.device)
        else:
            st["second_moment"] = torch.zeros(p.shape, device=p.device)
        if layout["momentum"] != "none":
            st["momentum"] = torch.zeros(layout["momentum_shape"], device=p.device)
        states.append(st)
    return states


def op_step(ps, grads, states, step, hp, in_op, skips=None):
    """One step_group_ call on 8-bit ``states`` (codes and absmax): as codes when ``in_op``,
    else read into float32, stepped, and written back with requantize_blockwise_."""
    flat, pending = [], []
    for st in states:
        for name in ("row_second_moment", "col_second_moment", "second_moment", "momentum"):
            if name not in st:
                continue
            if name not in _quantized.SIGNED:
                flat.append(st[name])
            elif in_op:
                flat += (st[name], st[name + "_absmax"])
            else:
                values = _quantized.dequantize(name, st[name], st[name + "_absmax"])
                pending.append((name, values, st))
                flat.append(values)
    torch.ops.flora.step_group_(ps, grads, flat, [step] * len(ps), [7] * len(ps),
                                nonfinite_skips=skips, **hp)
    for name, values, st in pending:
        _quantized.write_back_(name, values, st[name], st[name + "_absmax"])


def quantized_states(ps, hp):
    states = op_states(ps, hp)
    for st in states:
        for name in list(st):
            if name in _quantized.SIGNED:
                st[name], st[name + "_absmax"] = _quantized.quantize(name, st[name])
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factorize", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_op_steps_8_bit_state_bitwise_as_read_back_float_state(device, factorize, dtype):
    """step_group_ given codes and absmax writes bitwise what the float32 step on the
    read-back state, written back with requantize_blockwise_, writes (CUDA: the stats or
    rms pass gathers each block's absmax, the apply pass writes the codes)."""
    hp = dict(OP_HP, factorize_second_moment=factorize)
    gen = torch.Generator().manual_seed(11)
    ps = [torch.randn(s, generator=gen).to(device, dtype) for s in OP_SHAPES]
    qs = [p.clone() for p in ps]
    a, b = quantized_states(ps, hp), quantized_states(qs, hp)
    for step in range(1, 5):
        grads = [torch.randn(p.shape, generator=gen).to(device, dtype) for p in ps]
        if step == 3:  # an exact zero gradient: the second moment of those rows decays only
            grads[2][:5] = 0
        op_step(ps, grads, a, step, hp, in_op=True)
        op_step(qs, grads, b, step, hp, in_op=False)
        for p, q, sa, sb in zip(ps, qs, a, b):
            assert torch.equal(p, q), (tuple(p.shape), step)
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (tuple(p.shape), key, step)


# Compressed momentum (rank 8 or 16: on CUDA the fused path's shapes, rank 4 the unfused
# one): left and right, momentum rows that are and are not whole 256-element blocks.
COMPRESSED_SHAPES = ((64, 200), (200, 64), (160, 512), (96, 96), (48, 128))


@pytest.mark.parametrize("projection", ["gaussian", "orthogonal"])
@pytest.mark.parametrize("rank", [4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_op_steps_8_bit_compressed_momentum_bitwise_as_read_back_float_state(device, dtype,
                                                                             rank, projection):
    """Compressed momentum given to step_group_ as codes (CUDA: the down GEMM's epilogue
    reads them, the new M is formed in the task's float32 stage and written back) steps
    bitwise as the float32 step on the read-back momentum, written back with
    requantize_blockwise_; through resample steps (kappa 3) and a skipped parameter."""
    hp = dict(OP_HP, rank=rank, skip_nonfinite=True, projection=projection)
    gen = torch.Generator().manual_seed(13)
    ps = [torch.randn(s, generator=gen).to(device, dtype) for s in COMPRESSED_SHAPES]
    qs = [p.clone() for p in ps]
    a, b = quantized_states(ps, hp), quantized_states(qs, hp)
    for p, st in zip(ps, a):
        layout = flora_ext._ops.param_layout(p.shape, rank, hp["beta1"], True,
                                            hp["max_aspect_ratio"])
        assert layout["momentum"] == "compressed" and st["momentum"].dtype == torch.uint8
    skips_a = torch.zeros(1, dtype=torch.int64, device=device)
    skips_b = torch.zeros(1, dtype=torch.int64, device=device)
    for step in range(1, 8):
        grads = [torch.randn(p.shape, generator=gen).to(device, dtype) for p in ps]
        if step == 5:  # a skipped parameter: its codes stay as they are
            grads[1][3, 4] = float("nan")
            before = {k: v.clone() for k, v in a[1].items()}
        op_step(ps, grads, a, step, hp, in_op=True, skips=skips_a)
        op_step(qs, grads, b, step, hp, in_op=False, skips=skips_b)
        for p, q, sa, sb in zip(ps, qs, a, b):
            assert torch.equal(p, q), (tuple(p.shape), step)
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (tuple(p.shape), key, step)
        if step == 5:
            for key, v in before.items():
                assert torch.equal(a[1][key], v), key
    assert int(skips_a.item()) == 1
    # the momentum moved: codes and absmax are not the fresh ones
    assert all(st["momentum_absmax"].abs().sum() > 0 for st in a)


@pytest.mark.parametrize("device", DEVICES)
def test_op_steps_8_bit_and_float_compressed_momentum_in_one_call(device):
    """A direct step_group_ call may mix 8-bit and float32 compressed momentum in tensors of
    one shape (CUDA: one fused shape group): it steps bitwise as the same call on float32
    state with the 8-bit ones read back and written back, through a resample step."""
    hp = dict(OP_HP, rank=8)
    gen = torch.Generator().manual_seed(14)
    shapes = ((64, 256), (64, 256), (256, 64), (256, 64))
    ps = [torch.randn(s, generator=gen).to(device) for s in shapes]
    qs = [p.clone() for p in ps]
    mixed = op_states(ps, hp)
    for k in (0, 3):
        st = mixed[k]
        st["momentum"], st["momentum_absmax"] = _quantized.quantize("momentum", st["momentum"])
    floats = [{key: v.clone() for key, v in st.items()} for st in mixed]
    keys = ("row_second_moment", "col_second_moment", "momentum", "momentum_absmax")
    for step in range(1, 5):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in ps]
        flat = [st[key] for st in mixed for key in keys if key in st]
        torch.ops.flora.step_group_(ps, grads, flat, [step] * 4, [7] * 4, **hp)
        flat, pending = [], []
        for st in floats:
            flat += [st["row_second_moment"], st["col_second_moment"]]
            if "momentum_absmax" in st:
                values = _quantized.dequantize("momentum", st["momentum"], st["momentum_absmax"])
                pending.append((values, st))
                flat.append(values)
            else:
                flat.append(st["momentum"])
        torch.ops.flora.step_group_(qs, grads, flat, [step] * 4, [7] * 4, **hp)
        for values, st in pending:
            _quantized.write_back_("momentum", values, st["momentum"], st["momentum_absmax"])
        for k in range(4):
            assert torch.equal(ps[k], qs[k]), (k, step)
            for key in mixed[k]:
                assert torch.equal(mixed[k][key], floats[k][key]), (k, key, step)
    assert mixed[0]["momentum"].dtype == torch.uint8 and mixed[1]["momentum"].dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_optimizer_steps_codes_in_the_op_bitwise_as_through_the_scratch(monkeypatch, dtype,
                                                                             rank):
    """Flora(quantization=True) on CUDA with the 8-bit state handed to the op as codes
    (CUDA_STEPS_CODES) steps bitwise as through the float32 scratch; rank 8 takes the fused
    path for the compressed momentum of (16, 40), (64, 256) and (256, 64)."""
    shapes = ((64, 1000), (3000,), (16, 40), (40, 1024), (7, 5, 3), (64, 256), (256, 64))
    runs = []
    for codes in (False, True):
        monkeypatch.setattr(_quantized, "CUDA_STEPS_CODES", codes)
        ps = [torch.nn.Parameter(p.to(dtype)) for p in params_for(shapes, device="cuda")]
        opt = flora_ext.Flora(ps, **dict(HP, rank=rank), quantization=True,
                              skip_nonfinite=True)
        grads = [[g.to(dtype) for g in gs] for gs in grads_for(ps, 4)]
        grads[2][1][5] = float("nan")  # a skipped step of the 3000-element parameter
        run(opt, ps, grads)
        runs.append((ps, opt))
    (ps, a), (qs, b) = runs
    for p, q in zip(ps, qs):
        assert torch.equal(p, q), tuple(p.shape)
        for key, v in a.state[p].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b.state[q][key]), (tuple(p.shape), key)


@pytest.mark.parametrize("device", DEVICES)
def test_op_leaves_8_bit_state_of_a_skipped_parameter_bitwise(device):
    hp = dict(OP_HP, skip_nonfinite=True)
    gen = torch.Generator().manual_seed(12)
    ps = [torch.randn(s, generator=gen).to(device) for s in OP_SHAPES]
    states = quantized_states(ps, hp)
    skips = torch.zeros((), dtype=torch.int64, device=device).reshape(1)
    for step in (1, 2):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in ps]
        op_step(ps, grads, states, step, hp, in_op=True, skips=skips)
    before = [{k: v.clone() for k, v in st.items()} for st in states]
    values = [p.clone() for p in ps]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in ps]
    grads[0][3] = float("nan")
    grads[2][1, 7] = float("inf")
    op_step(ps, grads, states, 3, hp, in_op=True, skips=skips)
    assert int(skips.item()) == 2
    for k, (p, v, st, old) in enumerate(zip(ps, values, states, before)):
        stepped = k not in (0, 2)
        assert torch.equal(p, v) != stepped, k
        for key in old:
            if not stepped:
                assert torch.equal(st[key], old[key]), (k, key)


@pytest.mark.parametrize("change,match", [
    ("no_absmax", "needs its momentum_absmax"),
    ("short_absmax", "momentum_absmax must be a contiguous float32 vector of {blocks} entries"),
    ("int_absmax", "momentum_absmax must be a contiguous float32 vector"),
    ("codes_shape", "momentum must have shape"),
])
@pytest.mark.parametrize("shape", [(3, 300), (16, 40)], ids=["dense", "compressed"])
def test_op_refuses_8_bit_state_it_cannot_take(change, match, shape):
    # rank 4: (3, 300) has dense momentum (aspect ratio 100), (16, 40) compressed 4 x 40
    p = torch.randn(shape)
    hp = dict(OP_HP)
    st = quantized_states([p], hp)[0]
    flat = [st["row_second_moment"], st["col_second_moment"], st["momentum"],
            st["momentum_absmax"]]
    match = match.format(blocks=flat[3].numel())
    if change == "no_absmax":
        flat = flat[:3]
    elif change == "short_absmax":
        flat[3] = flat[3][:-1]
    elif change == "int_absmax":
        flat[3] = flat[3].int()
    elif change == "codes_shape":
        flat[2] = flat[2].reshape(tuple(reversed(flat[2].shape)))
    before = p.clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.step_group_([p], [torch.randn_like(p)], flat, [1], [7], **hp)
    assert torch.equal(p, before)


def test_capturable_op_refuses_8_bit_state():
    p = torch.randn(300)
    st = quantized_states([p], OP_HP)[0]
    hp = {k: v for k, v in OP_HP.items() if k not in ("skip_nonfinite", "projection")}
    with pytest.raises(RuntimeError, match="step_group_capturable_ takes float32 state"):
        torch.ops.flora.step_group_capturable_(
            [p], [torch.randn_like(p)],
            [st["second_moment"], st["second_moment_absmax"], st["momentum"],
             st["momentum_absmax"]],
            [torch.zeros((), dtype=torch.int64)], [], torch.empty(0), **hp)


def test_a_fault_in_the_op_leaves_state_unchanged(monkeypatch):
    """A run-time fault (out of memory) in the op changes nothing: every 8-bit state,
    compressed momentum included, is stepped inside the one op call of the group."""
    ps = params_for()
    opt = flora_ext.Flora(ps, **HP, quantization=True)
    grads = grads_for(ps, 2)
    run(opt, ps, grads[:1])
    real, calls = torch.ops.flora.step_group_, []

    def failing(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("simulated: out of memory in the op")

    for p, g in zip(ps, grads[1]):
        p.grad = g.clone()
    before = [(p.detach().clone(), copy.deepcopy(opt.state[p])) for p in ps]
    monkeypatch.setattr(torch.ops.flora, "step_group_", failing)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert len(calls) == 1
    for p, (p0, state) in zip(ps, before):
        assert torch.equal(p, p0)
        for key, v in state.items():
            assert torch.equal(opt.state[p][key], v) if isinstance(v, torch.Tensor) else opt.state[p][key] == v
    monkeypatch.setattr(torch.ops.flora, "step_group_", real)
    opt.step()  # and the step then goes through
    assert any(not torch.equal(p, p0) for p, (p0, _) in zip(ps, before))


def test_fsdp2_groups_are_refused(monkeypatch):
    monkeypatch.setattr(flora_ext.optimizer._sharded, "has_dtensors", lambda group: True)
    with pytest.raises(TypeError, match="quantization=True supports plain tensor parameters"):
        flora_ext.Flora(params_for(shapes=((8, 8),)), lr=1e-2, quantization=True)
    flora_ext.Flora(params_for(shapes=((8, 8),)), lr=1e-2)  # the check is quantization's


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_quantization_and_their_8_bit_state(how):
    import pickle
    ps = params_for(shapes=((16, 40), (37,)))
    opt = flora_ext.Flora(ps, **HP, quantization=True)
    run(opt, ps, grads_for(ps, 1))
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert copied.quantization is True
    assert all(state["momentum"].dtype == torch.uint8 for state in copied.state.values())
