"""Flora on several processes (flora_ext.distributed): DDP + Flora, FloraAccumulator across
ranks, flora_comm_hook, and the combinations that must be refused.

Each device runs one spawn of 2 gloo processes (tests/dist_utils.py) that goes through every
scenario below in order and reports each one's outcome; the test functions then check one
scenario each. On CUDA both processes use GPU 0 (gloo copies through the host).
Tolerances: the accumulator against one process and the comm hook against its single-process
simulation agree to rtol 1e-5, atol 1e-6 (float32; both sides add the same terms, the
summation order of the collectives may differ); ranks agree bitwise.
"""
import copy
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import flora_ext
from conftest import DEVICES
from dist_utils import spawn_workers
from flora_ext import distributed as fd
from flora_ext.accumulation import down_project, initial_accumulation_seed, up_project_add_

FLORA = dict(lr=1e-2, beta1=0.9, rank=4, kappa=2)
RANK = 4           # accumulation / comm-hook projection rank
RTOL, ATOL = 1e-5, 1e-6


def mlp(device):
    # weights (40, 12) right-projected, (24, 40) and (6, 24) left-projected, plus biases
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 6)).to(device)


def batch(rank, index, device):
    gen = torch.Generator().manual_seed(1000 * rank + index)
    return torch.randn(8, 12, generator=gen).to(device), torch.randn(8, 6, generator=gen).to(device)


def loss_of(model, data, k=1):
    x, y = data
    return (model(x) - y).pow(2).mean() / k


def gather_cpu(t):
    out = [torch.empty_like(t.cpu()) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.detach().cpu().contiguous())
    return out


def assert_ranks_equal(tensors):
    for t in tensors:
        copies = gather_cpu(t)
        for other in copies[1:]:
            assert torch.equal(copies[0], other), "ranks differ"


def expect_error(kind, words, fn):
    try:
        fn()
    except kind as err:
        for w in words:
            assert w in str(err), f"{w!r} not in: {err}"
        return str(err)
    raise AssertionError(f"expected {kind.__name__} mentioning {words}, nothing raised")


# ------------------------------------------------------------------------ scenarios
def ddp_flora_bitwise(rank, world, device):
    model = DDP(mlp(device))
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    for step in range(3):
        loss_of(model, batch(rank, step, device)).backward()
        opt.step()
        opt.zero_grad()
    assert_ranks_equal(list(model.parameters()))


def _reference_cycles(device, world, cycles, k):
    """One process: every micro-batch of every rank compressed with the cycle's seed, the
    per-rank sums added over ranks as the all-reduce does, divided by the world size, projected
    up and stepped."""
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    params = list(model.parameters())
    seeds = [initial_accumulation_seed(0, i + 1) for i in range(len(params))]
    _reference_cycles.grads = []  # the averaged gradients, by cycle and parameter
    for c in range(cycles):
        per_rank = []
        for r in range(world):
            sums = [None] * len(params)
            for b in range(k):
                grads = torch.autograd.grad(loss_of(model, batch(r, c * k + b, device), k),
                                            params)
                for i, (p, g) in enumerate(zip(params, grads)):
                    if p.dim() == 2:
                        sums[i] = down_project(g, seeds[i], RANK, out=sums[i])
                    else:
                        sums[i] = g if sums[i] is None else sums[i] + g
            per_rank.append([s.float() for s in sums])
        for i, p in enumerate(params):
            total = per_rank[0][i]
            for r in range(1, world):
                total = total + per_rank[r][i]
            total = total / world
            if p.dim() == 2:
                grad = torch.zeros_like(p)
                up_project_add_(grad, total, seeds[i], RANK)
            else:
                grad = total.to(p.dtype)
            _reference_cycles.grads.append(grad.clone())
            opt.step_param(p, grad)
        seeds = [flora_ext.next_seed(s) for s in seeds]
    return params

def _assert_matches_reference(params, device, world, cycles, k):
    """The ranks hold the same parameters, and those of _reference_cycles."""
    assert_ranks_equal(params)
    for p, e in zip(params, _reference_cycles(device, world, cycles, k)):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=RTOL, atol=ATOL)



def _accumulate(rank, device, model, opt, acc, cycles, k, first=0):
    for c in range(first, first + cycles):
        for b in range(k):
            loss_of(model, batch(rank, c * k + b, device), k).backward()
            assert all(p.grad is None for p in model.parameters())
        opt.step()  # checks the cycle; steps nothing
    assert acc.pending_micro_batches == 0


def _record_step_grads(opt):
    # Flora's step is nearly invariant to the gradient's scale: the averaged gradients
    # themselves are compared, so that a wrong division by the world size cannot hide.
    grads, step = [], opt._step_param
    opt._step_param = lambda p, grad: (grads.append(grad.detach().clone()), step(p, grad))[1]
    return grads


def accumulator_matches_one_process(rank, world, device):
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    grads = _record_step_grads(opt)
    sent, ready_at_launch = [], []
    real = fd._all_reduce

    def recording(t, g):
        sent.append(t.numel())
        ready_at_launch.append(len(acc._reducer.seeds))  # gradients of the cycle arrived
        return real(t, g)

    fd._all_reduce = recording
    try:
        # a tiny bucket cap: several buckets, launched from the hooks
        acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK, model=model,
                                         process_group=None, bucket_cap_mb=0.001)
        _accumulate(rank, device, model, opt, acc, cycles=2, k=2)
    finally:
        fd._all_reduce = real
    params = list(model.parameters())
    _assert_matches_reference(params, device, world, 2, 2)
    # the steps run in bucket order (last parameter first), the reference in parameter order
    n = len(params)
    stepped = [g for c in range(2) for g in reversed(grads[c * n:(c + 1) * n])]
    assert len(grads) == 2 * n
    for g, e in zip(stepped, _reference_cycles.grads):
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)
    # what went over the wire: r x m or n x r per weight, the biases as they are
    per_cycle = sum(torch.Size(fd.buffer_shape(p.shape, RANK, p.dim() == 2)).numel()
                    for p in params)
    assert sum(sent) == 2 * per_cycle, (sent, per_cycle)
    assert len(sent) > 2, "expected several buckets a cycle"
    # launched from the hooks while backward still had gradients to deliver (overlap)
    assert min(ready_at_launch) < len(params), ready_at_launch
    acc.remove()


def _rounded_step_grad_errors(rank, world, device, **acc_kw):
    """One cycle of 2 micro-batches with ``acc_kw`` (a rounding dtype somewhere); the ranks stay
    equal, and each stepped gradient's error against the float32 reference is returned."""
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    grads = _record_step_grads(opt)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK, model=model,
                                     process_group=None, **acc_kw)
    _accumulate(rank, device, model, opt, acc, cycles=1, k=2)
    assert_ranks_equal(list(model.parameters()))
    _reference_cycles(device, world, 1, 2)
    acc.remove()
    return [((g.double() - e.double()).norm() / e.double().norm()).item()
            for g, e in zip(reversed(grads), _reference_cycles.grads)]


def accumulator_bf16_buffers(rank, world, device):
    # comm_dtype=bfloat16: the averaged gradients within bf16 rounding of the float32 ones
    for err in _rounded_step_grad_errors(rank, world, device, comm_dtype=torch.bfloat16):
        assert 0 < err < 1e-2, err  # rounded (not float32), but only to bf16's precision


def accumulator_bf16_compressed_buffers(rank, world, device):
    # buffer_dtype=bfloat16: the buffers rounded to bf16 between micro-batches, all-reduced
    # in float32; the averaged gradients within bf16 rounding of the float32 ones
    for err in _rounded_step_grad_errors(rank, world, device, buffer_dtype=torch.bfloat16):
        assert err < 1e-2, err  # bf16's precision (dense parameters exact)


def accumulator_8bit_compressed_buffers(rank, world, device):
    # buffer_dtype=uint8: the buffers requantized in 8 bits between micro-batches, read back
    # and all-reduced in float32; the averaged gradients within the format's error
    errors = _rounded_step_grad_errors(rank, world, device, buffer_dtype=torch.uint8)
    assert max(errors) > 0 and all(err < 3e-2 for err in errors), errors


def accumulator_with_ddp_model(rank, world, device):
    model = DDP(mlp(device))
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK, model=model)
    assert model.require_backward_grad_sync is False
    _accumulate(rank, device, model, opt, acc, cycles=2, k=2)
    with model.no_sync():  # a loop that still uses no_sync() must keep DDP's reduction off
        pass
    assert model.require_backward_grad_sync is False
    _accumulate(rank, device, model, opt, acc, cycles=1, k=2, first=2)
    _assert_matches_reference(list(model.parameters()), device, world, 3, 2)
    acc.remove()
    assert model.require_backward_grad_sync is True


def accelerator_across_processes(rank, world, device):
    """FloraAccelerator under a 2-process launch (accelerate's MULTI_CPU; on the GPU machine
    both processes would need their own GPU, so this scenario runs on the CPU only)."""
    if device != "cpu":
        return
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return  # optional dependency; test_accelerator_across_processes skips then
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    try:
        accelerator = flora_ext.FloraAccelerator(cpu=True, accumulation_compression_rank=RANK,
                                                 gradient_accumulation_steps=2)
        assert accelerator.distributed_type == DistributedType.MULTI_CPU
        model = mlp(device)
        model, opt = accelerator.prepare(model, flora_ext.Flora(model.parameters(), **FLORA))
        assert isinstance(model, DDP) and model.require_backward_grad_sync is False
        for c in range(2):
            for b in range(2):
                with accelerator.accumulate(model):
                    accelerator.backward(loss_of(model, batch(rank, c * 2 + b, device)))
                    assert all(p.grad is None for p in model.parameters())
                    opt.step()
                    opt.zero_grad()
        _assert_matches_reference(list(model.parameters()), device, world, 2, 2)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _recording_hook(record):
    def hook(state, bucket):
        record.append((state.iter, bucket.index(), [id(p) for p in bucket.parameters()]))
        return fd.flora_comm_hook(state, bucket)
    return hook


def _simulate_hook(local_model, ddp_params, rank, world, device, step, record, seed):
    """The hook's average, in one process: every rank's gradient compressed with the seed of
    its bucket position, summed over ranks, divided by the world size, projected up."""
    params = list(local_model.parameters())
    grads = torch.autograd.grad(loss_of(local_model, batch(rank, step, device)), params)
    all_grads = [gather_cpu(g) for g in grads]        # [param][rank]
    by_id = {id(p): i for i, p in enumerate(ddp_params)}
    expected = [None] * len(params)
    for it, index, ids in record:
        for j, pid in enumerate(ids):
            i = by_id[pid]
            if params[i].dim() < 2:
                expected[i] = sum(g.to(device) for g in all_grads[i]) / world
                continue
            s = fd.comm_seed(seed, it, index, j)
            total = None
            for g in all_grads[i]:
                total = down_project(g.to(device), s, RANK, out=total)
            out = torch.zeros_like(params[i])
            up_project_add_(out, total / world, s, RANK)
            expected[i] = out
    return expected


def comm_hook(rank, world, device):
    seed = 7
    model = DDP(mlp(device))
    state = fd.FloraCommState(rank=RANK, seed=seed, min_compression_numel=0)
    record = []
    model.register_comm_hook(state, _recording_hook(record))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ddp_params = list(model.parameters())
    for step in range(3):  # DDP rebuilds its buckets after the first step
        local = copy.deepcopy(model.module)
        record.clear()
        loss_of(model, batch(rank, step, device)).backward()
        assert state.iter == step + 1
        expected = _simulate_hook(local, ddp_params, rank, world, device, step, record, seed)
        for p, e in zip(ddp_params, expected):
            torch.testing.assert_close(p.grad, e, rtol=RTOL, atol=ATOL)
        assert_ranks_equal([p.grad for p in ddp_params])
        opt.step()
        opt.zero_grad()
    assert_ranks_equal(ddp_params)
    # resume: a new job loads the state and continues the seed sequence at step 3
    saved = state.state_dict()
    resumed_model = DDP(copy.deepcopy(model.module))
    resumed = fd.FloraCommState(rank=RANK, seed=0, min_compression_numel=0)
    resumed.load_state_dict(saved)
    assert (resumed.iter, resumed.seed) == (3, seed)
    record.clear()
    resumed_model.register_comm_hook(resumed, _recording_hook(record))
    local = copy.deepcopy(resumed_model.module)
    loss_of(resumed_model, batch(rank, 3, device)).backward()
    assert [it for it, _, _ in record] == [3] * len(record)
    expected = _simulate_hook(local, list(resumed_model.parameters()), rank, world, device, 3,
                              record, seed)
    for p, e in zip(resumed_model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=RTOL, atol=ATOL)


def refuse_accumulator_without_group(rank, world, device):
    model = mlp(device)
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    expect_error(ValueError, ["2 processes", "model=ddp_model", "process_group"],
                 lambda: flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK))
    # nothing was hooked: the optimizer still steps
    loss_of(model, batch(rank, 0, device)).backward()
    opt.step()


def refuse_partial_params(rank, world, device):
    # parameters left out would be stepped on each rank's own gradient
    model = DDP(mlp(device))
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    first = next(model.parameters())
    expect_error(ValueError, ["every trainable parameter", "diverge"],
                 lambda: flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK,
                                                    params=[first], model=model))
    assert model.require_backward_grad_sync is True  # nothing was changed
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK, model=model)
    acc.remove()


def refuse_hidden_ddp(rank, world, device):
    # The accumulator got the unwrapped module and a group, but DDP reduces it too.
    module = mlp(device)
    model = DDP(module)
    opt = flora_ext.Flora(module.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, rank=RANK, model=module, process_group=None)
    loss_of(model, batch(rank, 0, device)).backward()
    expect_error(RuntimeError, ["DistributedDataParallel", "model=ddp_model"],
                 lambda: loss_of(model, batch(rank, 1, device)).backward())
    acc.reset()
    acc.remove()


def refuse_ddp_sync_turned_back_on(rank, world, device):
    model = DDP(mlp(device))
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK, model=model)
    model.require_backward_grad_sync = True
    expect_error(RuntimeError, ["require_backward_grad_sync"],
                 lambda: loss_of(model, batch(rank, 0, device)).backward())
    model.require_backward_grad_sync = False
    acc.reset()
    acc.remove()


def _mismatch(rank, device, words, seed=0, micro_batches=2, init_seed=0, acc_rank=RANK):
    torch.manual_seed(init_seed)
    model = mlp(device) if init_seed == 0 else torch.nn.Sequential(
        torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24), torch.nn.Tanh(),
        torch.nn.Linear(24, 6)).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    opt = flora_ext.Flora(model.parameters(), **{**FLORA, "seed": seed})
    acc = flora_ext.FloraAccumulator(opt, micro_batches=micro_batches, rank=acc_rank,
                                     model=model, process_group=None)
    expect_error(RuntimeError, ["disagree", *words],
                 lambda: loss_of(model, batch(rank, 0, device)).backward())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    acc.reset()
    acc.remove()


def refuse_disagreeing_seeds(rank, world, device):
    _mismatch(rank, device, ["seeds", "rank 0 has", "rank 1 has"], seed=rank)


def refuse_disagreeing_micro_batches(rank, world, device):
    _mismatch(rank, device, ["micro_batches", "rank 1 has 3"], micro_batches=2 + rank)


def refuse_disagreeing_initial_parameters(rank, world, device):
    _mismatch(rank, device, ["parameter values", "broadcast"], init_seed=rank)


def refuse_disagreeing_comm_hook_seeds(rank, world, device):
    model = DDP(mlp(device))
    model.register_comm_hook(fd.FloraCommState(rank=RANK, seed=rank, min_compression_numel=0),
                             fd.flora_comm_hook)
    expect_error(RuntimeError, ["flora_comm_hook", "disagree", "seed"],
                 lambda: loss_of(model, batch(rank, 0, device)).backward())


def refuse_fsdp1(rank, world, device):
    if device != "cuda":
        return  # FSDP1 needs an accelerator; test_fsdp1_marked_tensors_are_refused covers CPU
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for use_orig_params in (False, True):
        model = FSDP(mlp(device), use_orig_params=use_orig_params,
                     device_id=torch.device(device, 0))
        expect_error(TypeError, ["FSDP1", "fully_shard"],
                     lambda: flora_ext.Flora(model.parameters(), **FLORA))
        opt = flora_ext.Flora([torch.nn.Parameter(torch.zeros(3, 3, device=device))], **FLORA)
        expect_error(TypeError, ["fully_shard"],
                     lambda: opt.add_param_group({"params": list(model.parameters())}))
        assert len(opt.param_groups) == 1


SCENARIOS = [ddp_flora_bitwise, accumulator_matches_one_process, accumulator_bf16_buffers,
             accumulator_bf16_compressed_buffers, accumulator_8bit_compressed_buffers,
             accumulator_with_ddp_model, accelerator_across_processes, comm_hook,
             refuse_accumulator_without_group, refuse_partial_params, refuse_hidden_ddp,
             refuse_ddp_sync_turned_back_on, refuse_disagreeing_seeds,
             refuse_disagreeing_micro_batches, refuse_disagreeing_initial_parameters,
             refuse_disagreeing_comm_hook_seeds, refuse_fsdp1]


def run_scenarios(rank, world, device):
    if device == "cuda":
        torch.cuda.set_device(0)
    outcome = {}
    for scenario in SCENARIOS:
        start = time.perf_counter()
        try:
            scenario(rank, world, device)
            error = None
        except Exception:  # noqa: BLE001 - reported per scenario
            error = traceback.format_exc()
        outcome[scenario.__name__] = (error, time.perf_counter() - start)
        dist.barrier()
    return outcome


_OUTCOMES = {}


def outcome(device, name):
    if device not in _OUTCOMES:
        start = time.perf_counter()
        results = spawn_workers(run_scenarios, nprocs=2, args=(device,), timeout_s=240)
        _OUTCOMES[device] = (results, time.perf_counter() - start)
        print(f"\n2-process spawn on {device}: {_OUTCOMES[device][1]:.1f} s; per scenario "
              + ", ".join(f"{k} {v[1]:.2f} s" for k, v in results[0].items()))
    results, _ = _OUTCOMES[device]
    errors = [f"rank {r}:\n{res[name][0]}" for r, res in enumerate(results) if res[name][0]]
    assert not errors, "\n".join(errors)


def _has_accelerate():
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


# Scenarios that only run on one device, and why (their bodies return at once elsewhere).
SKIPS = {
    "refuse_fsdp1": lambda device: device == "cpu" and "FSDP1 needs an accelerator (torch's "
    "marks are checked on the CPU by test_fsdp1_marked_tensors_are_refused)",
    "accelerator_across_processes": lambda device: (
        device == "cuda" and "accelerate would put rank 1 on cuda:1; the CPU run covers it")
    or (not _has_accelerate() and "needs accelerate"),
}


def _scenario_test(name):
    @pytest.mark.parametrize("device", DEVICES)
    def test(device):
        reason = SKIPS.get(name, lambda d: None)(device)
        if reason:
            pytest.skip(reason)
        outcome(device, name)
    test.__name__ = f"test_{name}"
    test.__doc__ = globals()[name].__doc__
    return test


for _scenario in SCENARIOS:
    globals()[f"test_{_scenario.__name__}"] = _scenario_test(_scenario.__name__)


# ------------------------------------------------------------------------ one process
def test_comm_seed_is_fresh_per_step_bucket_and_position():
    seeds = {fd.comm_seed(7, it, b, j) for it in range(4) for b in range(3) for j in range(5)}
    assert len(seeds) == 60 and all(0 <= s < 2**63 for s in seeds)
    assert fd.comm_seed(7, 1, 0, 0) != fd.comm_seed(8, 1, 0, 0)


def test_comm_state_arguments_and_state_dict():
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        fd.FloraCommState(rank=0)
    with pytest.raises(ValueError, match="seed"):
        fd.FloraCommState(seed=-1)
    with pytest.raises(ValueError, match="min_compression_numel"):
        fd.FloraCommState(min_compression_numel=1.5)
    state = fd.FloraCommState(rank=8, seed=3)
    state.iter = 5
    other = fd.FloraCommState()
    other.load_state_dict(state.state_dict())
    assert (other.rank, other.seed, other.iter) == (8, 3, 5)
    with pytest.raises(ValueError, match="iter"):
        other.load_state_dict({**state.state_dict(), "iter": -1})


def test_plan_buckets_keeps_order_and_cap():
    assert fd.plan_buckets([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert fd.buffer_shape((8, 40), 4, True) == (4, 40)
    assert fd.buffer_shape((40, 8), 4, True) == (40, 4)
    assert fd.buffer_shape((40,), 4, False) == (40,)


def test_accumulator_process_group_needs_initialized_torch_distributed():
    model = mlp("cpu")
    opt = flora_ext.Flora(model.parameters(), **FLORA)
    with pytest.raises(ValueError, match="not initialized"):
        flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK, process_group=None)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=2, rank=RANK)  # one process: local
    acc.remove()


def test_fsdp1_marked_tensors_are_refused():
    # torch's own markings (what FSDP1 applies to its flat parameters, and, with
    # use_orig_params=True, to the original parameters it flattened)
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.zeros(12), requires_grad=True)
    orig = torch.nn.Parameter(torch.zeros(4, 3))
    _set_fsdp_flattened(orig)
    for p in (flat, orig):
        with pytest.raises(TypeError, match=r"FSDP2 \(torch.distributed.fsdp.fully_shard\)"):
            flora_ext.Flora([p], lr=1e-2)
    opt = flora_ext.Flora([torch.nn.Parameter(torch.zeros(3, 3))], lr=1e-2)
    with pytest.raises(TypeError, match="FSDP1"):
        opt.add_param_group({"params": [flat]})
    assert len(opt.param_groups) == 1
