"""The W cache of projection="orthogonal" on CUDA (docs/cuda.md §4; skipped without CUDA).

W = s R^-T (the basis P_o = W P) depends only on the seed, the rank, P's long side and
side, and the path that computes it, so a process keeps each tensor's W until that tensor
changes basis. A hit must give the very bits a miss computes: runs that clear the cache
before every step equal runs that never do, bit for bit, across resamples, on the fused
(tf32=True) and exact (tf32=False) paths, in float32 and bfloat16, with two optimizers of
different seeds in one process; and the cache holds one W a compressed tensor however many
resamples pass (a resample step takes the next basis' W and drops the current one's).
"""
import copy

import pytest
import torch

import flora_ext

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not flora_ext.cuda_compiled(),
    reason="needs a CUDA device and a CUDA build of flora_ext")

# Left (n < m) and right (n >= m) projections; two tensors of one shape (a batched fused
# group); three shapes (fused groups on the side streams). Every one compressed at rank 32.
SHAPES = [(256, 520), (256, 520), (520, 256), (96, 200)]
HP = dict(lr=1e-2, beta1=0.9, rank=32, kappa=3, projection="orthogonal")
STEPS = 8  # resamples at steps 3 and 6
PATHS = [dict(tf32=True), dict(tf32=False)]


def clear():
    return torch.ops.flora._clear_orthogonal_cache()


def entries():
    return torch.ops.flora._orthogonal_cache_entries()


def data(dtype, seed, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[(torch.randn(s, generator=gen) * (0.5 + t)).to(dtype) for s in SHAPES]
             for t in range(steps)]
    return params, grads


def make(params, **hp):
    ps = [torch.nn.Parameter(p.to("cuda", copy=True)) for p in params]
    return ps, flora_ext.Flora(ps, **dict(HP, **hp))


def step(ps, opt, grads):
    for p, g in zip(ps, grads):
        p.grad = g.to("cuda")
    opt.step()


def snapshot(ps, opt):
    """Params and state on the CPU, as raw bytes (NaN-safe bitwise comparison)."""
    out = [p.detach().cpu().contiguous().view(-1).view(torch.uint8) for p in ps]
    for p in ps:
        for key, value in sorted(opt.state[p].items()):
            if isinstance(value, torch.Tensor):
                out.append(value.cpu().contiguous().view(-1).view(torch.uint8))
            else:
                out.append(torch.tensor([hash((key, value))]))
    return out


def assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: item {k} differs"


def two_optimizers(dtype, path, clear_every_step):
    """Two optimizers (seeds 0 and 1000) stepping in turn; clear_every_step empties the
    cache before each step, so that every W is computed. Returns both snapshots."""
    clear()
    runs = []
    params, grads = data(dtype, seed=1)  # the same data, two projection seeds
    for seed in (0, 1000):
        ps, opt = make(params, seed=seed, **path)
        runs.append((ps, opt, grads))
    for t in range(STEPS):
        for ps, opt, grads in runs:
            if clear_every_step:
                clear()
            step(ps, opt, grads[t])
        if not clear_every_step:
            # every compressed tensor of both optimizers: its current W, no other
            assert entries() == 2 * len(SHAPES), f"after step {t + 1}"
    return [snapshot(ps, opt) for ps, opt, _ in runs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS, ids=["fused", "exact"])
def test_hits_give_the_bits_of_misses(dtype, path):
    cached = two_optimizers(dtype, path, clear_every_step=False)
    fresh = two_optimizers(dtype, path, clear_every_step=True)
    for k, (a, b) in enumerate(zip(cached, fresh)):
        assert_bitwise(a, b, f"optimizer {k}")
    # the same data through two seeds' bases: different parameters
    assert not torch.equal(cached[0][0], cached[1][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", PATHS, ids=["fused", "exact"])
def test_resumed_run_equals_an_uninterrupted_one(dtype, path):
    """Steps 1-4, a state_dict, a fresh optimizer on fresh tensors for steps 5-8 (finding
    the first one's W in the cache): bitwise the uninterrupted run."""
    params, grads = data(dtype, seed=5)
    clear()
    ps, opt = make(params, **path)
    for t in range(STEPS):
        step(ps, opt, grads[t])
    uninterrupted = snapshot(ps, opt)
    del ps, opt

    clear()
    a_ps, a_opt = make(params, **path)
    for t in range(4):
        step(a_ps, a_opt, grads[t])
    saved = copy.deepcopy(a_opt.state_dict())
    b_ps, b_opt = make([p.detach() for p in a_ps], **path)
    b_opt.load_state_dict(saved)
    for t in range(4, STEPS):
        step(b_ps, b_opt, grads[t])
    assert_bitwise(snapshot(b_ps, b_opt), uninterrupted, "resumed")


@pytest.mark.parametrize("kappa", [1, 2])
@pytest.mark.parametrize("path", PATHS, ids=["fused", "exact"])
def test_cache_holds_one_w_a_tensor_over_many_resamples(kappa, path):
    params, grads = data(torch.float32, seed=9, steps=1)
    clear()
    ps, opt = make(params, kappa=kappa, **path)
    for t in range(20):
        step(ps, opt, grads[0])
        assert entries() == len(SHAPES), f"after step {t + 1}"
    assert clear() == len(SHAPES)
    assert entries() == 0


def test_gaussian_projection_caches_nothing():
    params, grads = data(torch.float32, seed=3, steps=2)
    clear()
    ps, opt = make(params, projection="gaussian")
    for g in grads:
        step(ps, opt, g)
    assert entries() == 0


@pytest.mark.parametrize("path", PATHS, ids=["fused", "exact"])
def test_hit_on_another_stream(path):
    """Steps alternate between the default stream and a side stream: each hit waits for
    the W that the other stream's call wrote; bitwise a run that computes every W."""
    params, grads = data(torch.float32, seed=11)
    side = torch.cuda.Stream()
    runs = []
    for clear_every_step in (False, True):
        clear()
        ps, opt = make(params, **path)
        for t in range(STEPS):
            if clear_every_step:
                clear()
            stream = side if t % 2 else torch.cuda.current_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step(ps, opt, grads[t])
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        runs.append(snapshot(ps, opt))
    assert_bitwise(runs[0], runs[1], "side stream")
