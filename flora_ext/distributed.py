"""Flora across processes: compressed gradient all-reduce (FloraAccumulator) and a DDP hook.

Flora's projection is linear and every rank draws the same one from a shared seed, so
    all_reduce(down_s(G_rank)) = down_s(sum over ranks of G_rank)
up to the summation order (docs/FLORA.md §10.1, §10.2). Two ways use it:

- ``FloraAccumulator(opt, micro_batches=k, rank=r, model=ddp_model)`` (or ``process_group=``
  with an unwrapped model): every rank compresses each of its micro-batch gradients into C
  (r x m or n x r, float32); at the end of the cycle the C's (and the dense sums of 1-D and
  small parameters) are averaged over the process group in flat buckets whose all-reduces
  are launched from the backward hooks as soon as a bucket is complete, so communication
  overlaps the rest of backward. After backward every rank forms the same
  G~ = up_s(mean over ranks of C) and takes the same deterministic step. Unlike one process,
  the cycle's last micro-batch is compressed too: keeping it dense would need a full-size
  all-reduce, which is what the compression avoids.
- ``ddp.register_comm_hook(FloraCommState(...), flora_comm_hook)``: without accumulation,
  each step's gradients are compressed with a fresh seed, all-reduced compressed and
  projected back up. up_s(down_s(G)) is an unbiased estimate of G (E[P^T P] = I), with no
  error feedback: its error is not carried to the next step, so its effect on training must
  be measured (benchmarks/bench_comm.py --convergence), not assumed.
"""
from __future__ import annotations

import hashlib
import numbers
import threading

import torch
import torch.distributed as dist

from ._ops import next_seed
from .accumulation import _UNSET, down_project, float_buffer, up_project_add_
from .hyperparams import MAX_INT64
from .hyperparams import is_int as _is_int

_MAX_SEED = MAX_INT64  # the ops take seeds as int64
_MASK64 = 2**64 - 1


def _all_reduce(tensor, group):
    """Every collective on gradients goes through here (benchmarks count the bytes)."""
    return dist.all_reduce(tensor, group=group, async_op=True)


def _mix64(x):
    # splitmix64's finaliser: a bijection of 64-bit ints that spreads every input bit.
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def comm_seed(seed: int, iteration: int, bucket_index: int, position: int) -> int:
    """Seed of the projection flora_comm_hook uses for gradient ``position`` of DDP bucket
    ``bucket_index`` at step ``iteration`` (the same on every rank, fresh every step)."""
    x = int(seed) & _MASK64
    for part in (iteration, bucket_index, position):
        x = _mix64((x + 0x9E3779B97F4A7C15 + (int(part) & _MASK64)) & _MASK64)
    return x & _MAX_SEED


def _is_ddp(model):
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _is_fsdp(model):
    if model is None:
        return False
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return False
    if isinstance(model, FullyShardedDataParallel):
        return True
    fsdp2 = getattr(torch.distributed.fsdp, "FSDPModule", None)
    return fsdp2 is not None and isinstance(model, fsdp2)


def _group_device(group):
    """Where this group's collectives take their tensors (NCCL: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _field_hash(value) -> float:
    # 52 bits: exact in the float64 tensor that carries it.
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return float(int.from_bytes(digest, "little") >> 12)


def check_ranks_agree(fields: dict, group, what: str):
    """Raises RuntimeError on every rank when the ranks of ``group`` hold different values of
    a field: one all_gather of one float64 a field (floats are compared as they are, other
    values by a hash), then, only on a mismatch, an all_gather_object to name the values."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    names = list(fields)
    mine = torch.tensor([v if isinstance(v, float) else _field_hash(v)
                         for v in (fields[k] for k in names)], dtype=torch.float64,
                        device=_group_device(group))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    differ = [k for j, k in enumerate(names) if not bool((table[:, j] == table[0, j]).all())]
    if not differ:
        return
    values = [None] * world
    dist.all_gather_object(values, {k: fields[k] for k in differ}, group=group)
    lines = "; ".join(
        f"{k}: " + ", ".join(f"rank {r} has {_short(values[r][k])}" for r in range(world))
        for k in differ)
    raise RuntimeError(
        f"flora: {what}: the {world} processes disagree on {', '.join(differ)} ({lines}). "
        f"Every rank must build the same model and optimizer with the same seed and "
        f"hyper-parameters (and the same micro_batches), otherwise their steps diverge "
        f"silently; fix the launch so that all ranks pass the same settings"
        + (" and start from the same parameters (seed the model's initialisation, or "
           "broadcast it from rank 0)" if "parameter values" in differ else "") + ".")


def _short(value, limit=160):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------- FloraAccumulator
def resolve_process_group(model, process_group):
    """(group or None, DistributedDataParallel or None) of a FloraAccumulator: None when it
    accumulates for this process only. Raises for the combinations that would diverge."""
    if _is_fsdp(model):
        raise ValueError(
            f"flora: FloraAccumulator does not support {type(model).__name__} models (their "
            f"gradients are reduce-scattered every micro-batch); use DistributedDataParallel "
            f"(pass model=ddp_model) or an unwrapped model with process_group=...")
    ddp = model if _is_ddp(model) else None
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is _UNSET:
        if ddp is not None:
            return ddp.process_group, ddp
        if initialized and dist.get_world_size() > 1:
            raise ValueError(
                f"flora: FloraAccumulator in a torch.distributed job of "
                f"{dist.get_world_size()} processes needs to know how the ranks share "
                f"gradients; otherwise each rank steps on its own gradients and the replicas "
                f"diverge. Pass model=ddp_model (a DistributedDataParallel: the accumulator "
                f"switches off its all-reduce and averages the compressed gradients itself), "
                f"or keep the model unwrapped and pass process_group=None for the default "
                f"group (or a group); a single-rank group accumulates locally")
        return None, None
    if not initialized:
        raise ValueError("flora: FloraAccumulator process_group was given but "
                         "torch.distributed is not initialized (call "
                         "torch.distributed.init_process_group first)")
    group = dist.group.WORLD if process_group is None else process_group
    if ddp is not None and process_group is not None and ddp.process_group is not group:
        raise ValueError("flora: FloraAccumulator got model=DistributedDataParallel and a "
                         "different process_group; pass only model=ddp_model (its group is "
                         "used)")
    return group, ddp


class _Item:
    __slots__ = ("entry", "offset", "numel", "shape")

    def __init__(self, entry, offset, numel, shape):
        self.entry, self.offset, self.numel, self.shape = entry, offset, numel, shape


def buffer_shape(shape, rank, compressed):
    """Shape of what a parameter contributes to the all-reduce: C (r x m for n < m, else
    n x r) when compressed, the parameter's shape otherwise."""
    if not compressed:
        return tuple(shape)
    n, m = shape
    return (rank, m) if n < m else (n, rank)


def plan_buckets(sizes, cap_numel):
    """Splits ``sizes`` (numels, in launch order) into consecutive buckets of at most
    ``cap_numel`` elements (a larger tensor gets a bucket of its own): lists of indices."""
    buckets, current, filled = [], [], 0
    for i, numel in enumerate(sizes):
        if current and filled + numel > cap_numel:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += numel
    if current:
        buckets.append(current)
    return buckets


class _Bucket:
    __slots__ = ("items", "numel", "ready", "flat", "work")

    def __init__(self, items):
        self.items = items
        self.numel = sum(item.numel for item in items)
        self.ready = 0
        self.flat = None
        self.work = None


class CycleReducer:
    """The cross-process part of a FloraAccumulator (built by it when it has a group)."""

    def __init__(self, accumulator, group, ddp, bucket_cap_mb, comm_dtype):
        if not (isinstance(bucket_cap_mb, numbers.Real) and not isinstance(bucket_cap_mb, bool)
                and bucket_cap_mb > 0):
            raise ValueError(f"flora: bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        if comm_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"flora: comm_dtype must be torch.float32 or torch.bfloat16, got "
                             f"{comm_dtype!r}")
        for e in accumulator._entries:
            if type(e.param).__name__ == "DTensor" or type(e.param.data).__name__ == "DTensor":
                raise ValueError(f"flora: FloraAccumulator across processes needs replicated "
                                 f"(DDP-style) parameters; {e.name} is a DTensor (sharded "
                                 f"by fully_shard?)")
        managed = {id(e.param) for e in accumulator._entries}
        others = [p for g in accumulator.optimizer.param_groups for p in g["params"]]
        if ddp is not None:
            others += list(ddp.parameters())
        for p in others:
            if p.requires_grad and id(p) not in managed:
                raise ValueError(
                    f"flora: FloraAccumulator across processes must step every trainable "
                    f"parameter of its optimizer{' and DDP model' if ddp is not None else ''}: "
                    f"{accumulator._name(p)} is not among its params, so it would be stepped "
                    f"with this rank's own gradient (DDP's all-reduce is off) and the replicas "
                    f"would diverge; leave params=... out, or freeze it (requires_grad_(False))")
        self.accumulator = accumulator
        self.group = group
        self.world = dist.get_world_size(group)
        self.ddp = ddp
        self.cap_numel = max(1, int(bucket_cap_mb * 2**20) // comm_dtype.itemsize)
        self.comm_dtype = comm_dtype
        self.lock = threading.Lock()
        self.verified = None      # the settings the ranks were last found to agree on
        self.layout = None        # (key, buckets, bucket of each entry)
        self.open = False         # a cycle has begun on this rank
        self.queued = False       # the end-of-backward callback is queued
        self.next_launch = 0
        self.seeds = {}           # id(entry) -> the accumulation seed of the closing cycle
        self.pre_handles = []
        if ddp is not None:
            # DDP must not all-reduce what the accumulator reduces compressed: switched off
            # for good (its no_sync() saves and restores this flag, so it stays off).
            ddp.require_backward_grad_sync = False
        for e in accumulator._entries:
            self.pre_handles.append(e.param.register_hook(self._pre_hook_for(e)))

    # -------------------------------------------------------------- checks
    def _pre_hook_for(self, entry):
        def check(grad):
            if entry.param.grad is not None and self.accumulator.active:
                raise RuntimeError(
                    f"flora: {entry.name} already has a .grad when its new gradient arrives, "
                    f"though FloraAccumulator took the last one: something else writes the "
                    f"gradients, most likely DistributedDataParallel all-reducing them as "
                    f"well. Pass the DDP model as FloraAccumulator(..., model=ddp_model) (it "
                    f"then switches DDP's all-reduce off) and keep its "
                    f"require_backward_grad_sync False, or use the unwrapped model with "
                    f"process_group=...")
        return check

    def _settings(self, with_lr):
        acc = self.accumulator
        opt = acc.optimizer
        groups = [{k: v for k, v in g.items() if k != "params" and (with_lr or k != "lr")}
                  for g in opt.param_groups]
        fields = {
            "micro_batches": "accelerate sync" if acc._sync is not None else acc._micro_batches,
            "accumulation rank": acc.rank,
            "comm_dtype": str(self.comm_dtype),
            "buffer_dtype": str(acc.buffer_dtype),
            "bucket_cap_mb": self.cap_numel,
            "parameters (position, shape, dtype)": [
                (e.index, tuple(e.param.shape), str(e.param.dtype)) for e in acc._entries],
            "accumulation seeds": [e.seed for e in acc._entries],
            "optimizer seeds and hyper-parameters": groups,
        }
        return fields

    def _verify(self):
        if self.world == 1:
            return
        fields = self._settings(with_lr=True)
        key = repr(self._settings(with_lr=False))
        if self.verified is None:
            # Once: the replicas must start equal (a float64 sum of every parameter).
            total = torch.zeros((), dtype=torch.float64, device=_group_device(self.group))
            for k, e in enumerate(self.accumulator._entries):
                total += (k + 1) * e.param.detach().double().sum().to(total.device)
            fields["parameter values"] = float(total)
        elif key == self.verified:
            return
        check_ranks_agree(fields, self.group, "FloraAccumulator across processes")
        self.verified = key

    def _build_layout(self):
        acc = self.accumulator
        # Across processes every cycle compresses the same parameters (_compresses does not
        # depend on micro_batches there): decided here for all, before their hooks run.
        for e in acc._entries:
            e.compressed = acc._compresses(e.param)
        key = (acc.rank, tuple(e.compressed for e in acc._entries))
        if self.layout is not None and self.layout[0] == key:
            return
        devices = {e.param.device for e in acc._entries}
        if len(devices) > 1:
            raise ValueError(f"flora: FloraAccumulator across processes needs all its "
                             f"parameters on one device, got {sorted(map(str, devices))}")
        # Reverse order: the last layers' gradients arrive first in backward.
        order = list(reversed(acc._entries))
        shapes = [buffer_shape(e.param.shape, acc.rank, e.compressed) for e in order]
        numels = [int(torch.Size(s).numel()) for s in shapes]
        buckets, where = [], {}
        for indices in plan_buckets(numels, self.cap_numel):
            items, offset = [], 0
            for i in indices:
                items.append(_Item(order[i], offset, numels[i], shapes[i]))
                offset += numels[i]
            bucket = _Bucket(items)
            for item in items:
                where[id(item.entry)] = len(buckets)
            buckets.append(bucket)
        self.layout = (key, buckets, where)

    def _start_cycle(self):
        if self.ddp is not None and self.ddp.require_backward_grad_sync:
            raise RuntimeError(
                "flora: the DistributedDataParallel model of this FloraAccumulator has "
                "require_backward_grad_sync=True again, so DDP would all-reduce the same "
                "gradients as well; leave it False (the accumulator set it) or run the "
                "forward under ddp.no_sync()")
        self._verify()
        self._build_layout()
        self.open = True

    # -------------------------------------------------------------- the hook's part
    def add(self, entry, grad, last):
        """Folds one micro-batch's gradient of ``entry`` into its buffer; on the cycle's
        last micro-batch marks it ready and launches the buckets that are complete."""
        acc = self.accumulator
        with self.lock:
            if not self.open:
                self._start_cycle()
        if entry.compressed:
            entry.buffer = down_project(grad, entry.seed, acc.rank, out=entry.buffer,
                                        dtype=acc.buffer_dtype)
        elif entry.buffer is None:
            entry.buffer = grad
        else:
            entry.buffer.add_(grad)
        del grad
        if not last:
            return
        with self.lock:
            self.seeds[id(entry)] = entry.seed
            entry.count = 0
            entry.seed = next_seed(entry.seed)
            _, buckets, where = self.layout
            buckets[where[id(entry)]].ready += 1
            self._launch_ready(buckets)
            if not self.queued:
                self.queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _launch_ready(self, buckets):
        # In bucket order only, so that every rank issues the same collectives in the same
        # order whatever order its hooks ran in.
        while self.next_launch < len(buckets):
            bucket = buckets[self.next_launch]
            if bucket.ready < len(bucket.items):
                return
            self._launch(bucket)
            self.next_launch += 1

    def _launch(self, bucket):
        first = bucket.items[0].entry.param
        flat = torch.empty(bucket.numel, dtype=self.comm_dtype, device=first.device)
        for item in bucket.items:
            flat[item.offset:item.offset + item.numel].copy_(
                float_buffer(item.entry.buffer).reshape(-1))
            item.entry.buffer = None
        bucket.flat = flat
        bucket.work = _all_reduce(flat, self.group)

    # -------------------------------------------------------------- end of backward
    @torch.no_grad()
    def _finish(self):
        acc = self.accumulator
        _, buckets, _ = self.layout
        try:
            for k in range(self.next_launch, len(buckets)):
                bucket = buckets[k]
                if bucket.ready < len(bucket.items):
                    missing = [item.entry.name for item in bucket.items
                               if id(item.entry) not in self.seeds]
                    raise RuntimeError(
                        f"flora: FloraAccumulator: {missing[0]}"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                        f"received no gradient in the cycle's last backward pass, so the "
                        f"ranks cannot average it (the other ranks wait for it). Every "
                        f"parameter the accumulator steps must get a gradient in every "
                        f"backward pass: freeze unused parameters or leave them out "
                        f"(params=...)")
                self._launch(bucket)
                self.next_launch += 1
            for bucket in buckets:
                bucket.work.wait()
                flat = bucket.flat.float() if bucket.flat.dtype != torch.float32 else bucket.flat
                flat.div_(self.world)
                bucket.flat = bucket.work = None
                for item in bucket.items:
                    e = item.entry
                    p = e.param
                    mean = flat[item.offset:item.offset + item.numel].view(item.shape)
                    if e.compressed:
                        grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
                        up_project_add_(grad, mean, self.seeds[id(e)], acc.rank)
                    else:
                        grad = mean.to(p.dtype, copy=True)
                    if acc.grad_observer is not None:
                        acc.grad_observer(p, grad)
                    acc.optimizer._step_param(p, grad)
                    del grad
            if self.ddp is not None:
                # DDP broadcasts its buffers only in a forward after a synchronised backward.
                self.ddp.require_forward_param_sync = True
        finally:
            self.reset()

    def reset(self):
        with self.lock:
            self.open = False
            self.queued = False
            self.next_launch = 0
            self.seeds = {}
            if self.layout is not None:
                for bucket in self.layout[1]:
                    bucket.ready = 0
                    bucket.flat = bucket.work = None

    def close(self):
        for handle in self.pre_handles:
            handle.remove()
        self.pre_handles = []
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = True


# ---------------------------------------------------------------------- DDP comm hook
class FloraCommState:
    """State of :func:`flora_comm_hook`: ``ddp.register_comm_hook(state, flora_comm_hook)``.

    Arguments:
        process_group: the group to average over (None: the default group).
        rank: rank r of the projection; a gradient of n x m (more dims: n x the rest) with
            r < min(n, m) and at least ``min_compression_numel`` elements is sent as r x m
            (n < m) or n x r, float32.
        seed: the first step's seeds derive from it (comm_seed); the same on every rank.
        min_compression_numel: smaller gradients (and 1-D ones) are all-reduced as they are.
        comm_dtype: torch.float32 (default) or torch.bfloat16 for the flat buffer.

    Every step draws fresh projections (seed, step, bucket index, position: comm_seed), so
    the averaged gradient up_s(mean down_s(G_rank)) is an unbiased estimate of the mean
    gradient (E[up(down(X))] = X) whose error is not carried over: there is no error-feedback
    buffer (PowerSGD keeps a full-size one per tensor), and no memory beyond the bucket.

    ``state_dict()`` / ``load_state_dict()`` carry the step count so that a resumed job
    continues the seed sequence (it never reuses a step's seeds; DDP may order a fresh job's
    first buckets differently, so its projections are new ones, not the interrupted job's).
    """

    def __init__(self, process_group=None, rank: int = 256, seed: int = 0,
                 min_compression_numel: int = 16384, comm_dtype=torch.float32):
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"flora: FloraCommState rank must be an int >= 1, got {rank!r}")
        if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"flora: FloraCommState seed must be an int in [0, 2**63), "
                             f"got {seed!r}")
        if not _is_int(min_compression_numel) or min_compression_numel < 0:
            raise ValueError(f"flora: FloraCommState min_compression_numel must be an int "
                             f">= 0, got {min_compression_numel!r}")
        if comm_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"flora: FloraCommState comm_dtype must be torch.float32 or "
                             f"torch.bfloat16, got {comm_dtype!r}")
        self.process_group = process_group
        self.rank = int(rank)
        self.seed = int(seed)
        self.min_compression_numel = int(min_compression_numel)
        self.comm_dtype = comm_dtype
        self.iter = 0
        self._verified = False

    def compresses(self, grad) -> bool:
        """Whether the hook sends ``grad`` compressed."""
        if grad.dim() < 2 or grad.numel() < self.min_compression_numel:
            return False
        rows = grad.shape[0]
        return self.rank < min(rows, grad.numel() // rows)

    def sent_numel(self, shape) -> int:
        """Elements of the flat buffer a gradient of ``shape`` takes."""
        numel = int(torch.Size(shape).numel())
        if len(shape) < 2 or numel < self.min_compression_numel:
            return numel
        n, m = shape[0], numel // shape[0]
        return self.rank * max(n, m) if self.rank < min(n, m) else numel

    def state_dict(self) -> dict:
        return {"rank": self.rank, "seed": self.seed, "iter": self.iter,
                "min_compression_numel": self.min_compression_numel,
                "comm_dtype": str(self.comm_dtype).replace("torch.", "")}

    def load_state_dict(self, state_dict: dict):
        if not isinstance(state_dict, dict) or not {"rank", "seed", "iter"} <= set(state_dict):
            raise ValueError("flora: FloraCommState state_dict must have 'rank', 'seed' and "
                             "'iter'")
        it = state_dict["iter"]
        if not _is_int(it) or it < 0:
            raise ValueError(f"flora: FloraCommState iter must be an int >= 0, got {it!r}")
        other = FloraCommState(
            self.process_group, state_dict["rank"], state_dict["seed"],
            state_dict.get("min_compression_numel", self.min_compression_numel),
            getattr(torch, state_dict.get("comm_dtype", "float32"), None))
        self.rank, self.seed = other.rank, other.seed
        self.min_compression_numel, self.comm_dtype = other.min_compression_numel, \
            other.comm_dtype
        self.iter = int(it)
        self._verified = False

    def __getstate__(self):
        state = dict(self.__dict__)
        state["process_group"] = None  # not picklable; re-set after unpickling
        return state

    def __repr__(self):
        return (f"FloraCommState(rank={self.rank}, seed={self.seed}, iter={self.iter}, "
                f"min_compression_numel={self.min_compression_numel})")


def flora_comm_hook(state: FloraCommState, bucket):
    """DDP communication hook: the bucket's gradients averaged over the process group, those
    of 2+ dims compressed by a seeded random projection (FloraCommState), in one flat
    all-reduce. Returns a future of the bucket's buffer."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if not state._verified:
        check_ranks_agree({"rank": state.rank, "seed": state.seed, "iter": state.iter,
                           "min_compression_numel": state.min_compression_numel,
                           "comm_dtype": str(state.comm_dtype)},
                          group, "flora_comm_hook")
        state._verified = True
    grads = bucket.gradients()
    index = bucket.index()
    pieces, plan, offset = [], [], 0
    for j, grad in enumerate(grads):
        if state.compresses(grad):
            seed = comm_seed(state.seed, state.iter, index, j)
            matrix = grad.view(grad.shape[0], -1)
            piece = down_project(matrix, seed, state.rank)
            plan.append((j, offset, piece.shape, seed))
        else:
            piece = grad
            plan.append((j, offset, None, None))
        pieces.append(piece.reshape(-1).to(state.comm_dtype))
        offset += piece.numel()
    flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    del pieces
    if bucket.is_last():
        state.iter += 1
    future = _all_reduce(flat, group).get_future()

    def decompress(fut):
        mean = fut.value()[0]
        mean = mean.float() if mean.dtype != torch.float32 else mean
        mean.div_(world)
        with torch.no_grad():
            for j, start, shape, seed in plan:
                grad = grads[j]
                if shape is None:
                    grad.copy_(mean[start:start + grad.numel()].view_as(grad))
                else:
                    numel = shape[0] * shape[1]
                    matrix = grad.view(grad.shape[0], -1)
                    matrix.zero_()
                    up_project_add_(matrix, mean[start:start + numel].view(shape), seed,
                                    state.rank)
        return bucket.buffer()

    return future.then(decompress)


__all__ = ["FloraCommState", "flora_comm_hook", "comm_seed", "check_ranks_agree",
           "buffer_shape", "plan_buckets"]
