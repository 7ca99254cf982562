"""A CUDA out-of-memory in the middle of a step (skipped without CUDA).

A step allocates its temporaries (workspace, projections, fp32 copies of half tensors,
the pinned tables, the cuBLAS workspace of each stream it runs GEMMs on) before its first
kernel writes params or state; params, gradients and state already exist. (Kernel code,
which the driver loads at a kernel's first launch, is outside torch's allocator and this
test.) Each trial rebuilds the same optimizer (state loaded from one saved step), empties
torch's cache and drops torch's cuBLAS workspaces, and caps the caching allocator
(torch.cuda.set_per_process_memory_fraction) at what is reserved now plus ``extra`` bytes,
for a sweep of ``extra`` from nothing to more than the step needs. Wherever in the step
the allocation fails, the step must raise torch.OutOfMemoryError and leave params and state
bitwise as they were (compared on the CPU, which needs no GPU memory); a trial whose step
fits must match the uncapped step.
At least one trial must run out of memory, or the sweep forced nothing.

One param group: a failure in the op of a later group after an earlier group's op has
written is not undone (step() checks everything first, so only a runtime fault such as this
one can get there).
"""
import gc

import pytest
import torch

import flora_ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: run pytest on the GPU machine")

MB = 1 << 20
# Compressed momentum on a large and a small matrix, dense momentum, a 1-D and an N-D
# parameter: every kind of state and of temporary in one call.
SHAPES = [(4096, 2048), (256, 384), (1024, 64), (50000,), (8, 16, 32)]
EXTRA_MB = [0, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192]


def make_inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(2)]
    return params, grads


def build(params, grads, hp, saved=None):
    ps = [torch.nn.Parameter(p.cuda()) for p in params]
    opt = flora_ext.Flora(ps, **hp)
    if saved is not None:
        opt.load_state_dict(saved)
    for p, g in zip(ps, grads):
        p.grad = g.cuda()
    return ps, opt


def on_cpu(ps, opt):
    return ([p.detach().to("cpu", copy=True) for p in ps],
            [{k: (v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
              for k, v in opt.state.get(p, {}).items()} for p in ps])


def assert_same(a, b, what):
    (pa, sa), (pb, sb) = a, b
    for k, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), \
            f"{what}: parameter {k} {tuple(x.shape)}"
    for k, (x, y) in enumerate(zip(sa, sb)):
        assert x.keys() == y.keys(), f"{what}: state keys of parameter {k}"
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), f"{what}: state {key} of parameter {k}"
            else:
                assert x[key] == y[key], f"{what}: state {key} of parameter {k}"


def free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def capped_step(ps, opt, extra_bytes):
    """opt.step() with the allocator capped at what is reserved now plus extra_bytes;
    True when it ran out of memory. The cuBLAS workspaces torch keeps for each stream
    are dropped first, so that the step allocates them under the cap, as the first step
    of a process does; so is the W cache of projection="orthogonal"."""
    free()
    torch._C._cuda_clearCublasWorkspaces()
    # projection="orthogonal": every W is a miss, allocated under the cap
    torch.ops.flora._clear_orthogonal_cache()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    limit = torch.cuda.memory_reserved() + int(extra_bytes)
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
    try:
        opt.step()
        torch.cuda.synchronize()
        return False
    except torch.OutOfMemoryError:
        return True
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("dtype,hp", [
    (torch.float32, dict(tf32=True)),     # fused compressed momentum
    (torch.float32, dict(tf32=False)),    # exact GEMMs, unfused
    (torch.bfloat16, dict(tf32=True)),
    # projection="orthogonal": W, Gram', W P and W's scratch are planned too
    (torch.float32, dict(tf32=True, projection="orthogonal")),
    (torch.float32, dict(tf32=False, projection="orthogonal")),
], ids=["fp32-tf32", "fp32-exact", "bf16-tf32", "fp32-tf32-orthogonal",
        "fp32-exact-orthogonal"])
@pytest.mark.parametrize("first_step", [False, True], ids=["with-state", "first-step"])
def test_out_of_memory_mid_step_changes_nothing(dtype, hp, first_step):
    hp = dict(lr=1e-2, beta1=0.9, rank=64, kappa=2, **hp)
    params, grads = make_inputs(dtype)
    saved = None
    if not first_step:  # state from one step; the capped step is the second (a resample)
        ps, opt = build(params, grads[0], hp)
        opt.step()
        params = [p.detach().cpu() for p in ps]
        saved = opt.state_dict()
        saved = {"state": {k: {key: (v.cpu() if isinstance(v, torch.Tensor) else v)
                               for key, v in s.items()} for k, s in saved["state"].items()},
                 "param_groups": saved["param_groups"]}
        del ps, opt
    ps, opt = build(params, grads[1], hp, saved)
    opt.step()
    expected = on_cpu(ps, opt)
    del ps, opt
    outcomes = []
    for extra in EXTRA_MB:
        ps, opt = build(params, grads[1], hp, saved)
        before = on_cpu(ps, opt)
        ran_out = capped_step(ps, opt, extra * MB)
        outcomes.append((extra, ran_out))
        if ran_out:
            assert_same(on_cpu(ps, opt), before, f"out of memory with {extra} MB to spare")
        else:
            assert_same(on_cpu(ps, opt), expected, f"step with {extra} MB to spare")
        del ps, opt
    free()
    assert any(ran_out for _, ran_out in outcomes), \
        f"no trial ran out of memory: {outcomes}; the sweep forced nothing"
    assert not outcomes[-1][1], f"the step did not fit even with {EXTRA_MB[-1]} MB to spare"
