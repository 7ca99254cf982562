"""FloraAccumulator and FloraAccelerator: compressed accumulation, layer-wise steps (docs/FLORA.md,
"Compressed gradient accumulation"), their seeds, state_dict and errors."""
import copy
import io
import math
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import flora_ext
from conftest import DEVICES, rel_err, requires_cuda
from flora_ext.accumulation import (ACCUMULATION_SEED_SALT, down_project, float_buffer,
                                    initial_accumulation_seed, up_project_add_)
from reference import down, ext_projection, projection_matrix, up

FLORA = dict(lr=1e-2, beta1=0.9, rank=4, kappa=2)


def mlp(device="cpu", dtype=torch.float32):
    # weights (40, 12) right-projected, (24, 40) and (6, 24) left-projected, plus biases
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24),
                                torch.nn.Tanh(), torch.nn.Linear(24, 6))
    return model.to(device=device, dtype=dtype)


def batches(count, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=gen).to(device, dtype),
             torch.randn(8, 6, generator=gen).to(device, dtype)) for _ in range(count)]


def loss_of(model, batch, k):
    x, y = batch
    return (model(x) - y).float().pow(2).mean() / k


def naive_steps(model, opt, data, k):
    """torch's plain accumulation: k backward passes, then opt.step()."""
    for c in range(len(data) // k):
        for batch in data[c * k:(c + 1) * k]:
            loss_of(model, batch, k).backward()
        opt.step()
        opt.zero_grad()


def hooked_steps(model, data, k, check_freed=True):
    """The accumulator's loop: backward only; p.grad must be None after every backward."""
    for batch in data:
        loss_of(model, batch, k).backward()
        if check_freed:
            assert all(p.grad is None for p in model.parameters())


def assert_same(a_params, b_params, device):
    for a, b in zip(a_params, b_params):
        if device == "cpu":
            assert torch.equal(a, b)
        else:  # one-parameter and grouped launches might round differently on the GPU
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- the estimator


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(16, 64), (64, 16)], ids=["left", "right"])
def test_up_of_down_is_unbiased_and_converges_at_the_predicted_rate(device, shape):
    # For P with i.i.d. N(0, 1/r) entries, E||up(down(G)) - G||^2 = (n + 1)/r ||G||^2 (n the
    # projected dimension), so the mean of S draws has relative error sqrt((n + 1) / (r S)).
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(shape, generator=gen).to(device)
    rank, n = 4, min(shape)
    seed = initial_accumulation_seed(0, 1)
    total = torch.zeros_like(G)
    errors = {}
    for s in range(1, 513):
        estimate = torch.zeros_like(G)
        up_project_add_(estimate, down_project(G, seed, rank), seed, rank)
        total += estimate
        seed = flora_ext.next_seed(seed)
        if s in (8, 32, 128, 512):
            errors[s] = rel_err(total / s, G)
            predicted = math.sqrt((n + 1) / (rank * s))
            assert 0.75 < errors[s] / predicted < 1.3, (s, errors[s], predicted)
    # 64x the draws: 8x smaller error (1/sqrt(S))
    assert 5.5 < errors[8] / errors[512] < 11.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(8, 40), (40, 8)], ids=["left", "right"])
def test_accumulated_gradient_is_last_plus_up_of_the_compressed_sum(device, shape):
    p = torch.nn.Parameter(torch.randn(shape, device=device))
    opt = flora_ext.Flora([p], **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=3, rank=4)
    captured = []
    opt._step_param = lambda param, grad: captured.append(grad.detach().clone())
    gen = torch.Generator().manual_seed(2)
    X = [torch.randn(shape, generator=gen).to(device) for _ in range(3)]
    cycles = 128
    for _ in range(cycles):
        for x in X:
            (p * x).sum().backward()  # the gradient is exactly x
            assert p.grad is None
    # cycle 0, in float64 from the reference's projection formulas
    seed = initial_accumulation_seed(0, 1)
    P = projection_matrix(ext_projection, seed, *shape, 4)
    left = shape[0] < shape[1]
    X64 = [x.cpu().double() for x in X]
    expected = X64[2] + up(P, down(P, X64[0], left) + down(P, X64[1], left), left)
    assert rel_err(captured[0].cpu(), expected) < 1e-5
    # seeds advance per cycle: the mean converges to the sum at rate sqrt((n + 1)/(r S))
    total = sum(X64)
    compressed = (X64[0] + X64[1]).norm() / total.norm()
    for s in (8, 32, 128):
        mean = torch.stack(captured[:s]).cpu().double().mean(0)
        predicted = math.sqrt((min(shape) + 1) / (4 * s)) * compressed
        assert 0.7 < rel_err(mean, total) / predicted < 1.35
    assert acc.state_dict()["seeds"][0] == _iterate(seed, cycles)


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # round to nearest, 8 significant bits
# The largest distance from a value in [-1, 1] to its nearest code of the signed dynamic map,
# relative to the block's absmax: half the widest gap (docs/FLORA.md §11).
INT8_HALF_GAP = 0.0071


def _buffer_runs(device, shape, seed, buffer_dtype, snapshot, k=4, rank=4):
    """k micro-batches of gradients X_i into one parameter of ``shape``, with float32 and
    ``buffer_dtype`` buffers: {dtype: (snapshot(buffer) after each micro-batch but the last,
    the gradient the step got)}, and the float64 view of them: X, P, left, the exact partial
    sums of down(X_i) and their largest magnitude."""
    gen = torch.Generator().manual_seed(seed)
    X = [torch.randn(shape, generator=gen).to(device) for _ in range(k)]
    runs = {}
    for dtype in (torch.float32, buffer_dtype):
        p = torch.nn.Parameter(torch.zeros(shape, device=device))
        opt = flora_ext.Flora([p], **FLORA)
        acc = flora_ext.FloraAccumulator(opt, micro_batches=k, rank=rank, buffer_dtype=dtype)
        captured, buffers = [], []
        opt._step_param = lambda param, grad: captured.append(grad.detach().clone())
        for x in X:
            (p * x).sum().backward()
            if acc._entries[0].buffer is not None:
                buffers.append(snapshot(acc._entries[0].buffer, p))
        runs[dtype] = buffers, captured[0]
    P = projection_matrix(ext_projection, initial_accumulation_seed(0, 1), *shape, rank)
    left = shape[0] < shape[1]
    X64 = [x.cpu().double() for x in X]
    partial = [sum(down(P, x, left) for x in X64[:j + 1]) for j in range(k - 1)]
    return runs, X64, P, left, partial, max(s.abs().max() for s in partial)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(8, 40), (40, 8)], ids=["left", "right"])
def test_bf16_buffers_hold_the_compressed_sum_within_bf16_rounding(device, shape):
    # Each micro-batch adds its float32 product to the bf16 buffer in float32 and rounds the
    # sum once, so after j micro-batches each element is off the exact partial sum S_j by at
    # most u (|S_1| + ... + |S_j|), u = 2^-8 (plus float32 GEMM error, 1e-5 relative here);
    # the step's G~ = X_last + up(C) is then off by at most ||P||_2 ||that bound||_F.
    runs, X64, P, left, partial, scale = _buffer_runs(
        device, shape, 3, torch.bfloat16, lambda buffer, p: buffer.clone())
    fp32_buffers, fp32_grad = runs[torch.float32]
    bf16_buffers, bf16_grad = runs[torch.bfloat16]
    bound = torch.zeros_like(partial[0])
    for j, (b32, b16, exact) in enumerate(zip(fp32_buffers, bf16_buffers, partial)):
        assert b32.dtype == torch.float32 and b16.dtype == torch.bfloat16
        assert b16.shape == b32.shape and b16.nbytes * 2 == b32.nbytes
        assert (b32.cpu().double() - exact).abs().max() < 1e-5 * scale
        bound = bound + BF16_UNIT_ROUNDOFF * exact.abs()
        err = (b16.cpu().double() - exact).abs()
        assert (err <= 1.01 * bound + 1e-5 * scale).all(), (j, (err / bound).max())
    assert not torch.equal(fp32_buffers[-1].to(torch.bfloat16).float(), fp32_buffers[-1])
    expected = X64[-1] + up(P, partial[-1], left)
    assert (fp32_grad.cpu().double() - expected).norm() < 1e-5 * expected.norm()
    grad_bound = torch.linalg.matrix_norm(P, ord=2) * (1.01 * bound + 1e-5 * scale).norm()
    assert (bf16_grad.cpu().double() - expected).norm() <= grad_bound


def _8bit_snapshot(buffer, p):
    if isinstance(buffer, torch.Tensor):  # the float32 run
        return buffer.clone()
    assert buffer.codes.dtype == torch.uint8 and buffer.codes.device == p.device
    assert buffer.nbytes < 0.3 * buffer.codes.numel() * 4
    return float_buffer(buffer).clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(8, 200), (200, 8)], ids=["left", "right"])
def test_8bit_buffers_hold_the_compressed_sum_within_the_format_error(device, shape):
    # Each micro-batch reads the 8-bit buffer back, adds its float32 product in float32 and
    # requantizes: after j micro-batches each element is off the exact partial sum by at most
    # h (A_1 + ... + A_j), A_i the largest |value| quantized at step i, h the map's half gap.
    runs, X64, P, left, partial, scale = _buffer_runs(device, shape, 5, torch.uint8,
                                                      _8bit_snapshot)
    fp32_buffers, fp32_grad = runs[torch.float32]
    q8_buffers, q8_grad = runs[torch.uint8]
    bound = 0.0
    for b32, b8, exact in zip(fp32_buffers, q8_buffers, partial):
        assert b8.shape == b32.shape and b8.dtype == torch.float32
        assert (b32.cpu().double() - exact).abs().max() < 1e-5 * scale
        bound += INT8_HALF_GAP * (exact.abs().max() + bound)
        err = (b8.cpu().double() - exact).abs().max()
        assert err <= 1.01 * bound + 1e-5 * scale, (err, bound)
    assert not torch.equal(q8_buffers[-1], fp32_buffers[-1])
    expected = X64[-1] + up(P, partial[-1], left)
    elementwise = (1.01 * bound + 1e-5 * scale) * math.sqrt(partial[-1].numel())
    assert (q8_grad.cpu().double() - expected).norm() <= \
        torch.linalg.matrix_norm(P, ord=2) * elementwise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_dtype,tolerance", [
    # 4 steps of lr 1e-2 (Adafactor updates of RMS <= 1): bf16 buffers change the update
    # direction by about bf16's precision, a small fraction of the distance moved
    (torch.bfloat16, 0.05),
    # 8-bit sums are within about 1% of their blocks' largest values
    (torch.uint8, 0.1)], ids=["bf16", "8bit"])
def test_rounded_buffers_train_the_mlp_close_to_float32_buffers(device, buffer_dtype, tolerance):
    data = batches(12, device)
    runs = {}
    for dtype in (torch.float32, buffer_dtype):
        model = mlp(device)
        opt = flora_ext.Flora(model.parameters(), **FLORA)
        acc = flora_ext.FloraAccumulator(opt, micro_batches=3, rank=4, buffer_dtype=dtype)
        if dtype == torch.float32:
            assert "buffer_dtype" not in repr(acc)
        else:
            assert f"buffer_dtype={dtype}" in repr(acc)
        hooked_steps(model, data, 3)
        assert acc.state_dict()["buffer_dtype"] == str(dtype).replace("torch.", "")
        runs[dtype] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in mlp(device).parameters()])
    moved = (runs[torch.float32] - start).norm()
    assert 0 < (runs[buffer_dtype] - runs[torch.float32]).norm() < tolerance * moved


def _iterate(seed, times):
    for _ in range(times):
        seed = flora_ext.next_seed(seed)
    return seed


# ---------------------------------------------------------------- equal to the plain loop


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,rank", [(1, None), (1, 4), (3, None), (3, 24)],
                         ids=["layerwise", "layerwise-rank", "dense", "rank>=min-dim"])
def test_dense_accumulation_and_layerwise_steps_equal_the_plain_loop(device, dtype, k, rank):
    # rank 24 >= min(n, m) of every weight here: dense accumulation, exactly the naive sum
    data = batches(3 * k, device, dtype)
    model, hooked = mlp(device, dtype), mlp(device, dtype)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    naive_steps(model, opt, data, k)
    hooked_opt = flora_ext.Flora(hooked.parameters(), **FLORA)
    flora_ext.FloraAccumulator(hooked_opt, micro_batches=k, rank=rank)
    hooked_steps(hooked, data, k)
    assert_same(hooked.parameters(), model.parameters(), device)
    for p, q in zip(model.parameters(), hooked.parameters()):
        assert opt.state[p]["step"] == hooked_opt.state[q]["step"] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_compressed_and_dense_parameters(device):
    data = batches(4, device)
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=8)
    before = [p.detach().clone() for p in model.parameters()]
    hooked_steps(model, data[:1], 2)
    # after one micro-batch: compressed buffers for (40, 12) and (24, 40), dense for the rest
    buffers = [tuple(e.buffer.shape) for e in acc._entries]
    assert buffers == [(40, 8), (40,), (8, 40), (24,), (6, 24), (6,)]
    assert all(e.buffer.dtype == torch.float32 for e in acc._entries)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    hooked_steps(model, data[1:], 2)
    assert all(e.buffer is None for e in acc._entries)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


def test_compressed_accumulation_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = flora_ext.Flora(model.parameters(), lr=3e-2, beta1=0.9, rank=8, kappa=10)
    flora_ext.FloraAccumulator(opt, micro_batches=4, rank=4)
    x = torch.randn(256, 16)
    y = x[:, :1] * x[:, 1:2]
    losses = []
    for _ in range(100):
        for chunk in range(4):
            xs, ys = x[chunk::4], y[chunk::4]
            loss = torch.nn.functional.mse_loss(model(xs), ys) / 4
            loss.backward()
        with torch.no_grad():
            losses.append(torch.nn.functional.mse_loss(model(x), y).item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- seeds and state_dict


def test_seeds_are_salted_apart_from_the_momentum_seeds_and_advance_per_cycle():
    model = mlp()
    opt = flora_ext.Flora([{"params": list(model.parameters())[:2]},
                           {"params": list(model.parameters())[2:], "seed": 100}], **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
    group_seeds = [0, 0, 100, 100, 100, 100]
    initial = [next_seed_xor(s + i + 1) for i, s in enumerate(group_seeds)]
    assert list(acc.state_dict()["seeds"].values()) == initial
    momentum = {_iterate(s + i + 1, t) for i, s in enumerate(group_seeds) for t in range(4)}
    assert not momentum & set(initial)
    hooked_steps(model, batches(6), 2)
    assert list(acc.state_dict()["seeds"].values()) == [_iterate(s, 3) for s in initial]


def next_seed_xor(x):
    return flora_ext.next_seed(x) ^ ACCUMULATION_SEED_SALT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_resume_from_state_dicts_is_bitwise(device, buffer_dtype):
    data = batches(8, device)
    ref = mlp(device)
    ref_opt = flora_ext.Flora(ref.parameters(), **FLORA)
    flora_ext.FloraAccumulator(ref_opt, micro_batches=2, rank=4, buffer_dtype=buffer_dtype)
    hooked_steps(ref, data, 2)

    first = mlp(device)
    first_opt = flora_ext.Flora(first.parameters(), **FLORA)
    first_acc = flora_ext.FloraAccumulator(first_opt, micro_batches=2, rank=4,
                                           buffer_dtype=buffer_dtype)
    hooked_steps(first, data[:4], 2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict(),
                "acc": first_acc.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    def resumed(load_acc):
        model = mlp(device)
        model.load_state_dict(saved["model"])
        opt = flora_ext.Flora(model.parameters(), **FLORA)
        opt.load_state_dict(saved["opt"])
        acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4,
                                         buffer_dtype=buffer_dtype)
        if load_acc:
            acc.load_state_dict(saved["acc"])
        hooked_steps(model, data[4:], 2)
        return model

    assert_same(resumed(True).parameters(), ref.parameters(), device)
    # without the accumulator's state the seeds restart: another (equally valid) run
    assert not all(torch.equal(a, b) for a, b in zip(resumed(False).parameters(),
                                                     ref.parameters()))


def test_load_state_dict_rejects_bad_seeds_and_changes_nothing():
    model = mlp()
    acc = flora_ext.FloraAccumulator(flora_ext.Flora(model.parameters(), **FLORA), rank=4)
    good = acc.state_dict()
    with pytest.raises(ValueError, match=r"seeds for parameter positions \[0, 1\]"):
        acc.load_state_dict({"seeds": {0: 1, 1: 2}})
    with pytest.raises(ValueError, match="must be an int in"):
        acc.load_state_dict({"seeds": {**good["seeds"], 3: -1}})
    with pytest.raises(ValueError, match="'seeds' dict"):
        acc.load_state_dict({})
    assert acc.state_dict() == good


# ---------------------------------------------------------------- checkpointing, bf16


class Blocks(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(12, 32)  # outside: checkpoint inputs require grad
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(3))
        self.head = torch.nn.Linear(32, 6)
        self.mode = mode

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h) if self.mode is None else checkpoint(block, h, use_reentrant=self.mode)
        return self.head(h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_steps(device, reentrant):
    data = batches(6, device)
    results = []
    for mode in (None, reentrant):
        model = Blocks(mode).to(device)
        opt = flora_ext.Flora(model.parameters(), **FLORA)
        flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
        hooked_steps(model, data, 2)
        results.append(list(model.parameters()))
        assert all(opt.state[p]["step"] == 3 for p in model.parameters())
    assert_same(results[1], results[0], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16])
def test_bf16_parameters_accumulate_compressed_close_to_fp32(device, buffer_dtype):
    # bf16 buffers on bf16 parameters: the up projection rounds C to bf16 anyway, so the
    # same bound holds (on CUDA this runs the tensor-core down projection's float32 product)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.randn(32, 48).to(device, dtype))
        opt = flora_ext.Flora([p], **FLORA)
        flora_ext.FloraAccumulator(opt, micro_batches=3, rank=8,
                                   buffer_dtype=buffer_dtype if dtype == torch.bfloat16
                                   else torch.float32)
        captured = []
        opt._step_param = lambda param, grad: captured.append(grad.detach().clone())
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            (p * torch.randn(32, 48, generator=gen).to(device, dtype)).sum().backward()
        assert captured[0].dtype == dtype
        grads[dtype] = captured[0].float()
    assert rel_err(grads[torch.bfloat16], grads[torch.float32]) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_model_with_checkpointing_and_compression_trains(device):
    model = Blocks(False).to(device, torch.bfloat16)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
    before = [p.detach().clone() for p in model.parameters()]
    hooked_steps(model, batches(4, device, torch.bfloat16), 2)
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p, b)
        assert opt.state[p]["step"] == 2


# ---------------------------------------------------------------- working with opt.step()


def test_optimizer_step_at_cycle_end_checks_and_steps_only_unmanaged_params():
    model = mlp()
    params = list(model.parameters())
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4, params=params[:4])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for batch in batches(2):
        loss_of(model, batch, 2).backward()
    assert all(p.grad is None for p in params[:4])
    assert all(p.grad is not None for p in params[4:])  # not managed: plain accumulation
    managed = [p.detach().clone() for p in params[:4]]
    unmanaged = [p.detach().clone() for p in params[4:]]
    opt.step()
    sched.step()
    assert all(torch.equal(p, b) for p, b in zip(params[:4], managed))
    assert all(not torch.equal(p, b) for p, b in zip(params[4:], unmanaged))
    assert all(opt.state[p]["step"] == 1 for p in params)
    assert opt.param_groups[0]["lr"] == FLORA["lr"] / 2
    assert acc.params == params[:4]


def test_remove_and_context_manager_give_the_stepping_back():
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    with flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4) as acc:
        hooked_steps(model, batches(2), 2)
    assert not acc.active
    loss_of(model, batches(1)[0], 1).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())
    flora_ext.FloraAccumulator(opt)  # a new one may hook the parameters again


def test_micro_batches_can_change_between_steps():
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
    data = batches(5)
    hooked_steps(model, data[:2], 2)
    acc.micro_batches = 3
    hooked_steps(model, data[2:], 3)
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(micro_batches=0), ValueError, "micro_batches must be an int >= 1"),
    (dict(micro_batches=-2), ValueError, "micro_batches must be an int >= 1"),
    (dict(micro_batches=2.0), ValueError, "micro_batches must be an int >= 1"),
    (dict(micro_batches=True), ValueError, "micro_batches must be an int >= 1"),
    (dict(rank=0), ValueError, "accumulation rank must be"),
    (dict(rank=-1), ValueError, "accumulation rank must be"),
    (dict(rank=2.5), ValueError, "accumulation rank must be"),
    (dict(buffer_dtype=torch.float16), ValueError,
     r"buffer_dtype must be torch.float32, torch.bfloat16 or torch.uint8 \(8-bit blockwise\), "
     "got torch.float16"),
    (dict(buffer_dtype=torch.float64), ValueError, "buffer_dtype must be torch.float32,"),
    (dict(buffer_dtype="bfloat16"), TypeError, "buffer_dtype must be a torch.dtype"),
    (dict(buffer_dtype=None), TypeError, "buffer_dtype must be a torch.dtype"),
])
def test_bad_arguments_are_rejected(kwargs, exc, match):
    opt = flora_ext.Flora(mlp().parameters(), **FLORA)
    with pytest.raises(exc, match=match):
        flora_ext.FloraAccumulator(opt, **kwargs)
    flora_ext.FloraAccumulator(opt)  # nothing was hooked by the failed call


def test_bad_optimizer_and_params_are_rejected():
    model, other = mlp(), mlp()
    with pytest.raises(TypeError, match="needs a flora_ext.Flora optimizer, got AdamW"):
        flora_ext.FloraAccumulator(torch.optim.AdamW(model.parameters()))
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    with pytest.raises(ValueError, match=r"must belong to the optimizer; parameter '0.weight'"):
        flora_ext.FloraAccumulator(opt, params=[other[0].weight], model=other)
    with pytest.raises(ValueError, match="listed twice"):
        flora_ext.FloraAccumulator(opt, params=[model[0].weight, model[0].weight])
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"parameter '0.bias' .* does not require grad"):
        flora_ext.FloraAccumulator(opt, params=[model[0].bias], model=model)
    acc = flora_ext.FloraAccumulator(opt)  # frozen parameters are left out by default
    assert all(p is not model[0].bias for p in acc.params) and len(acc.params) == 5


def test_hooks_cannot_be_registered_twice():
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    first = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
    with pytest.raises(RuntimeError, match="already has a FloraAccumulator"):
        flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4)
    second_opt = flora_ext.Flora(model[2].parameters(), **FLORA)
    with pytest.raises(RuntimeError, match=r"parameter '2.weight' .* already has the backward "
                                           r"hook of another FloraAccumulator"):
        flora_ext.FloraAccumulator(second_opt, model=model)
    hooked_steps(model, batches(2), 2)  # the failed constructors hooked nothing
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    first.remove()
    flora_ext.FloraAccumulator(second_opt, model=model)


class WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = torch.nn.Linear(12, 6)
        self.unused = torch.nn.Linear(12, 6)
        self.skip_unused_bias = False

    def forward(self, x):
        if self.skip_unused_bias:
            return self.used(x) + x[:, :6] @ self.unused.weight[:, :6].t()
        return self.used(x) + 0 * self.unused(x) if self.training else self.used(x)


def test_parameter_without_grad_is_named_at_the_next_backward_and_at_step():
    model = WithUnused().eval()  # eval: the 'unused' layer gets no gradient
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=1, model=model)
    data = batches(3)
    loss_of(model, data[0], 1).backward()
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\): parameter 'unused.weight' "
                                           r"\(shape \(6, 12\)\) \(and 1 more\) received no "
                                           r"gradient"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"parameter 'unused.weight' .* received no gradient "
                                           r"in a backward pass"):
        loss_of(model, data[1], 1).backward()
    acc.reset()
    model.train()
    loss_of(model, data[2], 1).backward()
    opt.step()


def test_parameter_missing_the_last_micro_batch_is_named():
    model = WithUnused().train()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4, model=model)
    data = batches(2)
    loss_of(model, data[0], 2).backward()
    model.skip_unused_bias = True  # unused.bias gets no gradient in the last micro-batch
    loss_of(model, data[1], 2).backward()
    with pytest.raises(RuntimeError, match=r"parameter 'unused.bias' .* received no gradient"):
        opt.step()
    assert opt.state[model.unused.weight]["step"] == 1
    assert not opt.state[model.unused.bias]  # never stepped


def test_changing_micro_batches_mid_cycle_is_an_error():
    model = mlp()
    acc = flora_ext.FloraAccumulator(flora_ext.Flora(model.parameters(), **FLORA),
                                     micro_batches=4, rank=4)
    hooked_steps(model, batches(1), 4)
    with pytest.raises(RuntimeError, match=r"cannot change micro_batches from 4 to 2 in the "
                                           r"middle of an accumulation cycle \(after 1 of 4"):
        acc.micro_batches = 2
    with pytest.raises(ValueError, match="micro_batches must be"):
        acc.micro_batches = 0
    assert acc.micro_batches == 4 and acc.pending_micro_batches == 1
    acc.reset()
    acc.micro_batches = 2
    assert acc.pending_micro_batches == 0


def test_optimizer_step_mid_cycle_or_twice_is_an_error():
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4, model=model)
    data = batches(2)
    hooked_steps(model, data[:1], 2)
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) called after 1 of 2 "
                                           r"micro-batches"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"state_dict\(\) called after 1 of 2"):
        acc.state_dict()
    with pytest.raises(RuntimeError, match=r"remove\(\) called after 1 of 2"):
        acc.remove()
    hooked_steps(model, data[1:], 2)
    opt.step()  # at the cycle's end: a check, no step
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"would step parameter '0.weight' .* twice"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"step_param\(\) would step parameter '0.weight'"):
        opt.step_param(model[0].weight)
    assert torch.equal(model[0].weight, before)


def test_error_in_a_with_block_is_not_masked():
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    with pytest.raises(KeyError, match="boom"):
        with flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4) as acc:
            hooked_steps(model, batches(1), 2)
            raise KeyError("boom")
    assert not acc.active


def test_step_param_is_one_step_of_one_parameter():
    a, b = mlp(), mlp()
    opt_a = flora_ext.Flora(a.parameters(), **FLORA)
    opt_b = flora_ext.Flora(b.parameters(), **FLORA)
    for model in (a, b):
        loss_of(model, batches(1)[0], 1).backward()
    opt_a.step()
    for p in b.parameters():
        opt_b.step_param(p)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt_b.step_param(torch.nn.Parameter(torch.randn(3)), torch.randn(3))
    b[0].bias.grad = None
    with pytest.raises(ValueError, match="needs a gradient"):
        opt_b.step_param(b[0].bias)


def test_repeated_step_param_equals_step_and_rechecks_what_changed():
    # step_param() keeps each parameter's checked plan between calls (as step() keeps a
    # group's): five steps through it, across resamples (kappa=2), equal step()'s bitwise,
    # and a gradient, parameter or state that changed since is checked again.
    a, b = mlp(), mlp()
    opt_a = flora_ext.Flora(a.parameters(), **FLORA)
    opt_b = flora_ext.Flora(b.parameters(), **FLORA)
    for t, batch in enumerate(batches(5)):
        for model in (a, b):
            model.zero_grad()
            loss_of(model, batch, 1).backward()
        opt_a.step()
        for p in b.parameters():
            opt_b.step_param(p)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), t
        assert all(opt_a.state[p]["step"] == opt_b.state[q]["step"] == t + 1
                   and opt_a.state[p].get("seed") == opt_b.state[q].get("seed")
                   for p, q in zip(a.parameters(), b.parameters()))
    p = b[0].weight
    value = p.detach().clone()
    with pytest.raises(ValueError, match="grad"):
        opt_b.step_param(p, torch.randn(3, 3))
    with pytest.raises((TypeError, ValueError), match="dtype"):
        opt_b.step_param(p, p.grad.double())
    state = opt_b.state[p]
    momentum = state["momentum"]
    state["momentum"] = torch.zeros(1)
    with pytest.raises(ValueError, match="momentum"):
        opt_b.step_param(p)
    assert torch.equal(p, value)
    state["momentum"] = momentum
    opt_b.step_param(p)
    assert state["step"] == 6 and not torch.equal(p, value)


def _eps_list_changed_in_place(opt, p):
    group = opt.param_groups[0]
    group["eps"] = [1e-30, 1e-3]
    opt.step_param(p)  # validated with the list; it may still change in place
    group["eps"][1] = -1.0


@pytest.mark.parametrize("change", [
    lambda opt, p: opt.param_groups[0].update(clip_threshold=-1.0),
    lambda opt, p: opt.param_groups[0].update(lr=float("nan")),
    _eps_list_changed_in_place,
], ids=["clip_threshold", "lr", "eps list changed in place"])
def test_step_param_validates_a_hyper_parameter_changed_between_calls(change):
    # step_param() checks a group's hyper-parameters again only when one of them is another
    # object than at its last call: each kind of change must still be refused before a write.
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    loss_of(model, batches(1)[0], 1).backward()
    p = model[0].weight
    opt.step_param(p)
    change(opt, p)
    value, step = p.detach().clone(), opt.state[p]["step"]
    with pytest.raises(ValueError, match="clip_threshold|lr|eps"):
        opt.step_param(p)
    assert torch.equal(p, value) and opt.state[p]["step"] == step


# ---------------------------------------------------------------- CUDA: 16-bit GEMMs, memory


def _extra_peak(fn):
    """Bytes allocated at the peak of fn() beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


def _cuda_projection(seed, shape, rank, dtype):
    """The P that the accumulator uses for a CUDA gradient of ``shape`` and ``dtype``."""
    left = shape[0] < shape[1]
    P = flora_ext.projection(seed, *((rank, shape[0]) if left else (shape[1], rank)), rank,
                             device="cuda")
    return (P if dtype == torch.float32 else P.to(dtype)).double().cpu(), left


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512)], ids=["left", "right"])
def test_cuda_16bit_down_projection_is_float32_accurate_without_full_size_temporaries(dtype,
                                                                                      shape):
    # On CUDA a bf16/fp16 gradient is projected as it is, with P rounded to its dtype: a
    # tensor-core GEMM with float32 accumulation, added into the float32 C. Given those
    # operands the result is float32-accurate (the r x m product is not rounded to 16 bits).
    from flora_ext import accumulation

    rank, seed = 64, initial_accumulation_seed(0, 1)
    gen = torch.Generator().manual_seed(0)
    G = [torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(2)]
    P, left = _cuda_projection(seed, shape, rank, dtype)
    expected = sum(down(P, g.cpu().double(), left) for g in G)
    # warm-up of both code paths (a first C, then adding into one): cuBLAS workspaces, probe
    down_project(G[1], seed, rank, out=down_project(G[0], seed, rank))
    C = down_project(G[0], seed, rank)
    C, extra = _extra_peak(lambda: down_project(G[1], seed, rank, out=C))
    assert C.dtype == torch.float32 and C.shape == expected.shape
    # a torch without out_dtype GEMMs rounds each projected micro-batch to 16 bits once
    exact = accumulation._fp32_out_mode(C.device) != "none"
    assert rel_err(C.cpu(), expected) < (1e-5 if exact else 5e-3)
    assert extra < G[1].numel() * 2  # a float32 copy of G would be numel * 4


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512)], ids=["left", "right"])
def test_cuda_up_projection_adds_in_place_without_full_size_temporaries(dtype, shape):
    rank, seed = 64, initial_accumulation_seed(0, 1)
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(shape, generator=gen).to("cuda", dtype)
    C = down_project(torch.randn(shape, generator=gen).to("cuda", dtype), seed, rank)
    P, left = _cuda_projection(seed, shape, rank, dtype)
    expected = G.cpu().double() + up(P, C.cpu().double(), left)
    up_project_add_(G.clone(), C, seed, rank)  # warm-up
    target = G.clone()
    _, extra = _extra_peak(lambda: up_project_add_(target, C, seed, rank))
    tol = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(target.cpu(), expected) < tol
    # bf16, float32: in place (P and the r x m C in the GEMM's dtype on the side); fp16:
    # float32 row blocks of an eighth of the target. A full float32 product: numel * 4.
    assert extra < G.numel() * (1.25 if dtype == torch.float16 else 1.0)


@requires_cuda
@pytest.mark.parametrize("momentum", [False, True], ids=["no-momentum", "compressed-momentum"])
def test_cuda_bf16_last_micro_batch_takes_at_most_one_full_float32_buffer(momentum):
    # Peak of the cycle's last backward beyond what is allocated before it (parameter, state,
    # C): the bf16 gradient, G~ formed in it, and at most one n x m float32 buffer (the
    # compressed momentum's update) in the step.
    n, m = 2048, 1024
    p = torch.nn.Parameter(torch.randn(n, m, device="cuda").mul_(0.02).bfloat16())
    opt = flora_ext.Flora([p], lr=1e-3, **(dict(beta1=0.9, rank=64) if momentum else {}))
    flora_ext.FloraAccumulator(opt, micro_batches=2, rank=64)
    gen = torch.Generator().manual_seed(2)
    X = [torch.randn(n, m, generator=gen).to("cuda", torch.bfloat16) for _ in range(2)]

    def backward(x):
        (p * x).sum().backward()  # the gradient is exactly x, in a fresh n x m buffer

    for x in X:  # one cycle to create the state and warm up
        backward(x)
    backward(X[0])
    _, extra = _extra_peak(lambda: backward(X[1]))
    assert p.grad is None and opt.state[p]["step"] == 2
    full_bf16, full_fp32 = n * m * 2, n * m * 4
    assert extra < full_bf16 + (full_fp32 if momentum else 0) + full_fp32 // 2


# ---------------------------------------------------------------- FloraAccelerator


def test_core_package_does_not_import_accelerate():
    code = ("import sys, flora_ext; assert 'accelerate' not in sys.modules; "
            "assert 'FloraAccumulator' in flora_ext.__all__")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def accelerate_state():
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_accelerator(**kwargs):
    return flora_ext.FloraAccelerator(**{"cpu": not torch.cuda.is_available(), **kwargs})


@pytest.mark.parametrize("rank,steps,buffer_dtype", [
    (4, 2, torch.float32), (4, 2, torch.bfloat16), (4, 2, torch.uint8), (None, 2, torch.float32),
    (4, 1, torch.float32), (4, 2, "grouped"), (4, 2, "overlapped")],
    ids=["compressed", "compressed_bf16_buffers", "compressed_8bit_buffers", "dense", "layerwise",
         "compressed_grouped_steps", "compressed_overlapped_steps"])
def test_flora_accelerator_equals_the_accumulator_loop(accelerate_state, rank, steps,
                                                       buffer_dtype):
    # "grouped": float32 buffers, the hooks' steps gathered (bitwise the same steps)
    # "overlapped": float32 buffers, the hooks' steps on a second CUDA stream
    group_bytes = 1 << 30 if buffer_dtype == "grouped" else 0
    overlap = buffer_dtype == "overlapped"
    buffer_dtype = torch.float32 if isinstance(buffer_dtype, str) else buffer_dtype
    accelerator = make_accelerator(accumulation_compression_rank=rank,
                                   gradient_accumulation_steps=steps,
                                   accumulation_buffer_dtype=buffer_dtype,
                                   step_group_bytes=group_bytes, overlap_steps=overlap)
    device = accelerator.device
    data = batches(6, device)
    ref = mlp(device)
    ref_opt = flora_ext.Flora(ref.parameters(), **FLORA)
    flora_ext.FloraAccumulator(ref_opt, micro_batches=steps, rank=rank if steps > 1 else None,
                               buffer_dtype=buffer_dtype)
    hooked_steps(ref, data, steps)

    model = mlp(device)
    model, opt = accelerator.prepare(model, flora_ext.Flora(model.parameters(), **FLORA))
    assert accelerator.accumulation_compression == (rank is not None and steps > 1)
    assert accelerator.flora_accumulators[0]._group_bytes == group_bytes
    assert accelerator.flora_accumulators[0]._overlap == overlap
    for batch in data:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch, 1))
            assert all(p.grad is None for p in model.parameters())
            opt.step()
            opt.zero_grad()
    assert_same(model.parameters(), ref.parameters(), str(device.type))


def test_flora_accelerator_steps_on_a_short_last_window(accelerate_state):
    accelerator = make_accelerator(accumulation_compression_rank=4, gradient_accumulation_steps=2)
    data = batches(5, accelerator.device)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    model = mlp(accelerator.device)
    inner = flora_ext.Flora(model.parameters(), **FLORA)
    model, opt, loader = accelerator.prepare(model, inner, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch, 1))
            opt.step()
    assert all(inner.state[p]["step"] == 3 for p in model.parameters())  # 2 + 2 + 1
    assert accelerator.flora_accumulators[0].state_dict()["seeds"]


def test_flora_accelerator_saves_the_seeds(accelerate_state, tmp_path):
    accelerator = make_accelerator(accumulation_compression_rank=4, gradient_accumulation_steps=2)
    model = mlp(accelerator.device)
    model, opt = accelerator.prepare(model, flora_ext.Flora(model.parameters(), **FLORA))
    acc = accelerator.flora_accumulators[0]
    for batch in batches(2, accelerator.device):
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch, 1))
    saved = copy.deepcopy(acc.state_dict())
    accelerator.save_state(str(tmp_path))
    acc.load_state_dict({"seeds": {k: 1 for k in saved["seeds"]}})
    accelerator.load_state(str(tmp_path))
    assert acc.state_dict() == saved


@pytest.mark.parametrize("kwargs,make_opt,exc,match", [
    (dict(accumulation_compression_rank=0), None, ValueError,
     "accumulation_compression_rank must be"),
    (dict(accumulation_buffer_dtype=torch.float16), None, ValueError,
     "accumulation_buffer_dtype must be torch.float32, torch.bfloat16 or torch.uint8"),
    (dict(step_group_bytes=-1), None, ValueError, "step_group_bytes must be an int >= 0"),
    (dict(), lambda ps: torch.optim.AdamW(ps), TypeError,
     "prepares flora_ext.Flora optimizers, got AdamW"),
])
def test_flora_accelerator_errors(accelerate_state, kwargs, make_opt, exc, match):
    with pytest.raises(exc, match=match):
        accelerator = make_accelerator(**kwargs)
        model = mlp(accelerator.device)
        accelerator.prepare(model, make_opt(model.parameters()))


def test_flora_accelerator_rejects_fp16_grad_scaling(accelerate_state):
    accelerator = make_accelerator(mixed_precision="fp16")
    if accelerator.scaler is None:
        pytest.skip("accelerate made no GradScaler for fp16 on this device")
    model = mlp(accelerator.device)
    with pytest.raises(ValueError, match="cannot use fp16 mixed precision"):
        accelerator.prepare(model, flora_ext.Flora(model.parameters(), **FLORA))


# ---------------------------------------------------------------- step_group_bytes
def _grouped_run(device, group_bytes, quantization=False, observer=None):
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), quantization=quantization, **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4,
                                     step_group_bytes=group_bytes)
    acc.grad_observer = observer
    hooked_steps(model, batches(8, device), 2)
    return model, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", [False, True])
@pytest.mark.parametrize("group_bytes", [1, 2000, 1 << 30])
def test_step_group_bytes_steps_as_one_call_a_parameter(device, quantization, group_bytes):
    # Each tensor's step is independent of the others in its call, so gathering changes
    # the calls (fewer, larger), not the values: bitwise the one-parameter calls.
    ref, _ = _grouped_run(device, 0, quantization)
    out, opt = _grouped_run(device, group_bytes, quantization)
    for a, b in zip(ref.parameters(), out.parameters()):
        assert torch.equal(a, b)
    sizes = sorted(len(key) for key in opt._param_plans)
    assert sum(sizes) == len(list(out.parameters()))
    if group_bytes == 1:
        assert sizes == [1] * 6  # every gradient fills the group alone
    elif group_bytes == 1 << 30:
        assert sizes == [6]  # one call at the end of the backward pass
    else:
        assert 1 < len(sizes) < 6


def test_step_group_bytes_steps_before_backward_returns():
    # Below the threshold nothing steps in the hooks; the end of the backward pass steps
    # the gathered parameters, so backward() returns with every parameter stepped.
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=1, rank=4, step_group_bytes=1 << 30)
    seen = []
    acc.grad_observer = lambda p, g: seen.append(p)
    loss_of(model, batches(1)[0], 1).backward()
    assert len(seen) == 6 and not acc._pending
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_step_group_bytes_error_leaves_nothing_pending():
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=1, rank=4, step_group_bytes=1 << 30)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = -1.0  # refused by the step's checks
    with pytest.raises(ValueError, match="lr"):
        loss_of(model, batches(1)[0], 1).backward()
    assert not acc._pending and acc._pending_bytes == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("bad", [-1, 1.5, "64MB", None])
def test_step_group_bytes_refuses_bad_values(bad):
    opt = flora_ext.Flora(mlp().parameters(), **FLORA)
    with pytest.raises(ValueError, match="step_group_bytes must be an int >= 0"):
        flora_ext.FloraAccumulator(opt, micro_batches=2, step_group_bytes=bad)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_step_group_bytes_under_activation_checkpointing(use_reentrant):
    # A reentrant checkpoint runs a nested backward whose hooks come inside the outer pass:
    # whatever is gathered there is stepped by the end of the outer backward() all the same.
    def run(group_bytes):
        model = mlp()
        opt = flora_ext.Flora(model.parameters(), **FLORA)
        acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4,
                                         step_group_bytes=group_bytes)
        for x, y in batches(6):
            x = x.requires_grad_(True)
            h = checkpoint(lambda t: model[3](model[2](model[1](model[0](t)))), x,
                           use_reentrant=use_reentrant)
            (model[4](h) - y).pow(2).mean().backward()
            assert all(p.grad is None for p in model.parameters()) and not acc._pending
        return model

    ref = run(0)
    for group_bytes in (500, 1 << 30):
        for a, b in zip(ref.parameters(), run(group_bytes).parameters()):
            assert torch.equal(a, b)


def test_regrouped_steps_keep_one_plan_a_parameter():
    # Calls that regroup the same parameters (another step_group_bytes, another gradient
    # size) replace the kept plans that held them instead of adding to them.
    model = mlp()
    params = list(model.parameters())
    opt = flora_ext.Flora(params, **FLORA)
    group = opt.param_groups[0]
    for p in params:
        p.grad = torch.randn_like(p)
    for split in (1, 2, 3, 4, 5, 2, 1):
        opt._step_params(group, params[:split], [p.grad for p in params[:split]])
        opt._step_params(group, params[split:], [p.grad for p in params[split:]])
        assert len(opt._param_plans) == 2
    for p in params:
        opt._step_param(p, p.grad)
    assert len(opt._param_plans) == len(params)


@pytest.mark.parametrize("option", ["step_group_bytes=1 << 20", "overlap_steps=True"])
def test_single_process_options_refused_with_a_process_group(option):
    # Across processes the reducer steps after backward; gathering the hooks' steps or
    # running them on a second stream does not apply there.
    name = option.split("=")[0]
    code = (
        "import os, torch, torch.distributed as dist, flora_ext\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='0')\n"
        "store = dist.HashStore()\n"
        "dist.init_process_group('gloo', store=store, rank=0, world_size=1)\n"
        "opt = flora_ext.Flora(torch.nn.Linear(4, 4).parameters(), lr=1e-2)\n"
        "try:\n"
        "    flora_ext.FloraAccumulator(opt, micro_batches=2, rank=2, process_group=None,\n"
        f"                               {option})\n"
        "except ValueError as err:\n"
        f"    assert '{name} applies to a single process' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('not refused')\n"
        "flora_ext.FloraAccumulator(opt, micro_batches=2, rank=2, process_group=None)\n"
        "dist.destroy_process_group()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- overlap_steps
def _overlap_run(device, overlap, group_bytes=0, quantization=False, use_reentrant=None):
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), quantization=quantization, **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=4, step_group_bytes=group_bytes,
                                     overlap_steps=overlap)
    for x, y in batches(6, device):
        if use_reentrant is None:
            loss_of(model, (x, y), 2).backward()
        else:
            x = x.requires_grad_(True)
            h = checkpoint(lambda t: model[3](model[2](model[1](model[0](t)))), x,
                           use_reentrant=use_reentrant)
            ((model[4](h) - y).pow(2).mean() / 2).backward()
        # Read on the current stream right after backward(): the steps must be done.
        snapshot = [p.detach().clone() for p in model.parameters()]
        assert not acc._joins
    opt.step()
    return snapshot, model, opt, acc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_bytes", [0, 2000])
@pytest.mark.parametrize("quantization", [False, True])
def test_overlap_steps_is_bitwise_the_current_stream(device, group_bytes, quantization):
    ref, _, _, _ = _overlap_run(device, False, group_bytes, quantization)
    out, model, opt, acc = _overlap_run(device, True, group_bytes, quantization)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    for a, b in zip(ref, model.parameters()):
        assert torch.equal(a, b)
    assert bool(acc._side_streams) == (device == "cuda")


@requires_cuda
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_overlap_steps_under_activation_checkpointing(use_reentrant):
    ref, _, _, _ = _overlap_run("cuda", False, use_reentrant=use_reentrant)
    out, _, _, _ = _overlap_run("cuda", True, use_reentrant=use_reentrant)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_overlap_steps_waits_for_the_gradient_and_joins_before_the_next_forward(micro_batches):
    # A slow kernel on the current stream before each backward: without the waits, the side
    # stream would compress or step an unfinished gradient, or the clone after backward()
    # would read a parameter before its step wrote it.
    def run(overlap):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Tanh(),
                                    torch.nn.Linear(1024, 1024)).cuda()
        opt = flora_ext.Flora(model.parameters(), lr=1e-2, beta1=0.9, rank=16)
        flora_ext.FloraAccumulator(opt, micro_batches=micro_batches, rank=16,
                                   overlap_steps=overlap)
        x = torch.randn(4096, 1024, device="cuda")
        out = []
        for _ in range(3 * micro_batches):
            torch.cuda._sleep(5_000_000)  # delays everything after it on the current stream
            model(x).square().mean().backward()
            out.append([p.detach().clone() for p in model.parameters()])
        return out

    for a, b in zip(run(False), run(True)):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)


@requires_cuda
def test_overlap_steps_error_joins_the_side_stream():
    model = mlp("cuda")
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=1, rank=4, overlap_steps=True)
    loss_of(model, batches(1, "cuda")[0], 1).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = -1.0  # refused by the step's checks
    with pytest.raises(ValueError, match="lr"):
        loss_of(model, batches(1, "cuda")[0], 1).backward()
    acc.reset()
    assert not acc._joins
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _FakeStream:
    """Records what overlap_steps asks of CUDA streams (the protocol, on the CPU)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def _logged_overlap(monkeypatch, micro_batches, group_bytes, fail_at=None):
    import contextlib

    log = []
    main = _FakeStream("main", log)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream.name}")
        try:
            yield
        finally:
            log.append(f"off {stream.name}")

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, stream: log.append(f"record {stream.name}"))
    model = mlp()
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=micro_batches, rank=4,
                                     step_group_bytes=group_bytes, overlap_steps=True)
    monkeypatch.setattr(acc, "_overlaps", lambda device: True)
    step_params = opt._step_params
    calls = []

    def logged_step(group, params, grads):
        log.append(f"step {len(params)}")
        calls.append(len(params))
        if len(calls) == fail_at:
            raise RuntimeError("injected")
        return step_params(group, params, grads)

    monkeypatch.setattr(opt, "_step_params", logged_step)
    passes = []
    for batch in batches(2 * micro_batches):
        del log[:]
        try:
            loss_of(model, batch, micro_batches).backward()
        except RuntimeError:
            passes.append(("raised", list(log)))
            acc.reset()
            passes[-1][1].extend(log[len(passes[-1][1]):])
            continue
        passes.append(("ok", list(log)))
    return passes


@pytest.mark.parametrize("micro_batches,group_bytes", [(1, 0), (2, 0), (2, 2000)])
def test_overlap_steps_protocol(monkeypatch, micro_batches, group_bytes):
    # Every piece of hook work runs on the side stream right after the side stream waited
    # for the current one; its gradients are recorded on the side stream after it; and each
    # backward pass ends with the current stream waiting for the side stream, once.
    for status, log in _logged_overlap(monkeypatch, micro_batches, group_bytes):
        assert status == "ok"
        assert log[-1] == "main waits side" and log.count("main waits side") == 1, log
        pieces = [k for k, e in enumerate(log) if e == "on side"]
        assert pieces, log
        for k in pieces:
            assert log[k - 1] == "side waits main", log
            end = log.index("off side", k)
            assert "on side" not in log[k + 1:end]
            assert log[end + 1] == "record side", log
        # the steps (if this pass steps) happen inside the side stream's pieces
        for k, e in enumerate(log):
            if e.startswith("step"):
                assert max(j for j in pieces if j < k) > max(
                    (j for j, f in enumerate(log[:k]) if f == "off side"), default=-1)


def test_overlap_steps_protocol_when_a_step_raises(monkeypatch):
    passes = _logged_overlap(monkeypatch, 1, 0, fail_at=1)
    status, log = passes[0]
    assert status == "raised"
    # the failing piece makes the current stream wait at once, and reset() waits for what
    # the pass had put on the side stream
    k = log.index("step 1")
    assert log[k + 1:] == ["off side", "main waits side", "main waits side"], log
    assert passes[1][0] == "ok"


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_overlap_steps_refuses_non_bools(bad):
    opt = flora_ext.Flora(mlp().parameters(), **FLORA)
    with pytest.raises(TypeError, match="overlap_steps must be a bool"):
        flora_ext.FloraAccumulator(opt, micro_batches=2, overlap_steps=bad)
