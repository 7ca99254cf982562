"""Flora on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 turns every parameter into a DTensor split by rows (``Shard(0)``) over a 1-D device
mesh. Each rank steps its own rows with the formulas of the single-device step (docs/FLORA.md,
"One step"), in float32 with float64 sums as the CPU kernel has them. What spans rows is summed
over the mesh (docs/FLORA.md §10.3), batched per parameter group into a fixed number of
collectives per step and mesh:

  check   (all-reduce, 4 float64): whether every rank passed its input checks, and a
          fingerprint of what it is about to step (parameters, step counts, seeds,
          hyper-parameters): ranks that disagree raise on every rank instead of diverging,
          and nothing is written;
  gather  (all-gather, float32; only with left-projected parameters): the column blocks of
          each r x m momentum, started before phase 1 and waited for after it;
  phase 1 (all-reduce, float64): per parameter sum(p^2) for RMS(p); factored: sum(row) for
          mean(row) and the m column sums of G^2 + eps1;
  phase 2 (float32): per parameter sum(D^2) for the clip; left projection (n < m): the r x m
          partial products P[:, rows] U[rows] of down(U), reduce-scattered so that each rank
          gets the sums of its own columns (an all-reduce when there are none).

Local by rows: the row EMAs, a full second moment, dense momentum, the right projection
(n >= m: G P with P m x r, momentum n x r) and up() of the left one (P[:, rows]^T M, from the
gathered M). Each rank generates the whole projection from the seed (the same op as the
single-device step), so the resampling transfer P' P^T (r x r) needs no communication either.

State is kept as DTensors on the parameter's mesh, placed so that each rank keeps its share
and the placement does not depend on the number of ranks: row EMAs, full second moments,
dense and n x r momentum ``Shard(0)`` like the parameter; r x m momentum ``Shard(1)`` (by
columns); only the column EMAs ``Replicate()``. DCP (``torch.distributed.checkpoint`` with
``get_optimizer_state_dict``/``set_optimizer_state_dict``) saves them and loads them onto any
number of ranks, or into a single-process optimizer.
``Replicate()`` DTensor parameters (1-D mesh) step on the full tensor with no collective but
the check.

projection="orthogonal" uses the orthonormalised basis P_o of docs/FLORA.md §5.1 in place of
P and P' (every rank computes it from the whole P, float64 r x r Gram and Cholesky factor): the
same collectives.

Not supported, with an error that says so: other parameter placements (``Shard(1)``,
``Partial``), meshes of more than one dimension (HSDP, FSDP with tensor parallelism), groups
mixing DTensors and plain tensors, stochastic rounding, and FSDP1's flattened parameters. The
group's ``tf32`` setting does not apply here: the projections are float32 matmuls under torch's
own matmul precision setting (full float32 unless the program allows TF32).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._ops import next_seed, projection

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
else:  # a torch build without torch.distributed has no DTensor parameters to step
    class DTensor:  # noqa: D101 - isinstance() of it is always False
        pass

# torch 2.14 renamed these two (the old names warn); torch 2.11 has only the old ones.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor",
                                                                  None)
_REDUCE_SCATTER = (getattr(dist, "reduce_scatter_single", None)
                   or getattr(dist, "reduce_scatter_tensor", None))

_SUPPORTED = ("DTensor parameters placed (Shard(0),) on a 1-D device mesh, as "
              "torch.distributed.fsdp.fully_shard makes them, or (Replicate(),)")


def has_dtensors(group) -> bool:
    """Whether the group's parameters are DTensors. check_group refuses a mix when the group
    is added and on every step here, so the first parameter tells (a check per step that
    costs nothing for the single-device path)."""
    params = group["params"]
    return bool(params) and isinstance(params[0], DTensor)


def _describe(p):
    return f"a parameter of shape {tuple(p.shape)}"


def _row_sharded(placements) -> bool:
    return type(placements[0]) is Shard and placements[0].dim == 0


def check_param(p):
    """Raises ValueError unless ``p`` is a DTensor this module can step."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1:
        raise ValueError(f"flora: FSDP2 parameters must be sharded over a 1-D device mesh, got a "
                         f"{mesh.ndim}-D mesh of shape {tuple(mesh.shape)} (HSDP or FSDP "
                         f"combined with tensor parallelism) for {_describe(p)}; supported: "
                         f"{_SUPPORTED}")
    placement = placements[0]
    if not (_row_sharded(placements) or isinstance(placement, Replicate)):
        raise ValueError(f"flora: {_describe(p)} is a DTensor placed {placements}; supported: "
                         f"{_SUPPORTED}")
    if _row_sharded(placements) and p.ndim == 0:
        raise ValueError(f"flora: a 0-dim DTensor cannot be placed Shard(0), got {placements}")


def check_group(group):
    """Raises for a group this module cannot step (called when the group is added)."""
    params = group["params"]
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise TypeError("flora: got parameters flattened by FSDP1 (FullyShardedDataParallel), "
                        "on which Flora could neither factor the second moment nor project the "
                        "momentum; shard the model with FSDP2 "
                        "(torch.distributed.fsdp.fully_shard) instead, which Flora supports")
    dtensors = [isinstance(p, DTensor) for p in params]
    if not any(dtensors):
        return
    if not all(dtensors):
        plain = params[dtensors.index(False)]
        raise TypeError(f"flora: a parameter group mixes DTensor (FSDP2) parameters with plain "
                        f"tensors ({_describe(plain)} is plain); apply fully_shard to the root "
                        f"module as well so that every parameter is a DTensor, or put the plain "
                        f"ones in a group of their own")
    for p in params:
        check_param(p)
    if group["stochastic_rounding"] and any(p.dtype == torch.bfloat16 for p in params):
        raise ValueError("flora: stochastic_rounding=True is not supported for FSDP2 (DTensor) "
                         "parameters; use stochastic_rounding=False (round to nearest)")


def state_placements(p, layout):
    """name -> placements of the state tensors of DTensor parameter ``p``."""
    if not _row_sharded(tuple(p.placements)):
        return {name: (Replicate(),) for name in ("row_second_moment", "col_second_moment",
                                                  "second_moment", "momentum")}
    rows = (Shard(0),)
    # r x m momentum of the left projection: by columns (each rank's columns are updated from
    # its slice of the summed r x m partial products)
    momentum = (Shard(1),) if layout["momentum"] == "compressed" and layout["left"] else rows
    return {"row_second_moment": rows, "second_moment": rows, "col_second_moment": (Replicate(),),
            "momentum": momentum}


def _shard_dim(placements):
    """The dimension a 1-D mesh splits, or None for Replicate()."""
    return placements[0].dim if type(placements[0]) is Shard else None


def _local_range(shape, mesh, placements):
    """(dimension, first global index, length) of this rank's piece of a tensor of ``shape``
    along the split dimension; None when ``placements`` replicate it."""
    dim = _shard_dim(placements)
    if dim is None:
        return None
    local_shape, offset = compute_local_shape_and_global_offset(torch.Size(shape), mesh,
                                                                placements)
    return dim, offset[dim], local_shape[dim]


def _local_shape(shape, mesh, placements):
    piece = _local_range(shape, mesh, placements)
    if piece is None:
        return tuple(shape)
    dim, _, length = piece
    return tuple(length if d == dim else size for d, size in enumerate(shape))


def _local_rows(shape, mesh, placements):
    """(first global row, number of rows) that this rank holds of a tensor of ``shape``."""
    if not _row_sharded(placements):
        return 0, shape[0] if len(shape) else 1
    _, start, rows = _local_range(shape, mesh, placements)
    return start, rows


def _chunk(size, parts, index):
    """(start, length) of piece ``index`` when ``size`` is split in ``parts`` as torch's
    Shard splits a dimension (torch.chunk: pieces of ceil(size / parts), the last ones shorter
    or empty)."""
    width = -(-size // parts)
    start = min(index * width, size)
    return start, min(start + width, size) - start


def _contiguous_stride(shape):
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _as_dtensor(local, mesh, placements, shape):
    return DTensor.from_local(local, mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _local_of(t, mesh, placements, shape, device):
    """The float32 local piece of a state tensor ``t`` (DTensor, or the full tensor)."""
    if isinstance(t, DTensor):
        if t.device_mesh != mesh:
            raise ValueError(f"flora: loaded state DTensor lives on mesh {t.device_mesh}, its "
                             f"parameter on {mesh}")
        if tuple(t.placements) != tuple(placements):
            t = t.redistribute(mesh, placements)
        return t.to_local().to(device=device, dtype=torch.float32, copy=True)
    full = t.to(device=device, dtype=torch.float32)
    piece = _local_range(shape, mesh, placements)
    if piece is not None:
        dim, start, length = piece
        full = full.narrow(dim, start, length)
    return full.to(device=device, dtype=torch.float32, copy=True).contiguous()


def init_state(optimizer, p, group, state):
    """Fresh state for DTensor ``p``: zeros of this rank's piece, as DTensors."""
    from .optimizer import _expected_state_shapes, _layout

    shapes, compressed = _expected_state_shapes(p, group)
    placements = state_placements(p, _layout(p, group))
    state["step"] = 0
    for name, shape in shapes.items():
        local_shape = _local_shape(shape, p.device_mesh, placements[name])
        local = torch.zeros(local_shape, dtype=torch.float32, device=p.to_local().device)
        state[name] = _as_dtensor(local, p.device_mesh, placements[name], shape)
    if compressed:
        state["seed"] = group["seed"] + optimizer._param_number(p)


def load_state(p, group, state):
    """``state`` (checked against ``p``'s global shape) with its tensors made float32
    DTensors placed as init_state places them; a full tensor is cut to this rank's piece."""
    from .optimizer import _expected_state_shapes, _layout

    shapes, _ = _expected_state_shapes(p, group)
    placements = state_placements(p, _layout(p, group))
    device = p.to_local().device
    loaded = dict(state)
    for name, shape in shapes.items():
        local = _local_of(state[name], p.device_mesh, placements[name], shape, device)
        loaded[name] = _as_dtensor(local, p.device_mesh, placements[name], shape)
    return loaded


def _check_state_placement(p, name, t, placements, shape):
    if (not isinstance(t, DTensor) or t.device_mesh != p.device_mesh
            or tuple(t.placements) != tuple(placements)):
        got = (f"a DTensor placed {tuple(t.placements)} on {t.device_mesh}"
               if isinstance(t, DTensor) else f"a {type(t).__name__}")
        raise ValueError(f"flora: state {name} of FSDP2 {_describe(p)} must be a DTensor placed "
                         f"{placements} on the parameter's mesh, got {got}; load state with "
                         f"optimizer.load_state_dict or set_optimizer_state_dict, which place it")
    local = t.to_local()
    expected = _local_shape(shape, p.device_mesh, placements)
    if tuple(local.shape) != tuple(expected) or local.device != p.to_local().device:
        raise ValueError(f"flora: state {name} of FSDP2 {_describe(p)} holds a local piece of "
                         f"shape {tuple(local.shape)} on {local.device}, expected {expected} on "
                         f"{p.to_local().device}")


def _check_inputs(optimizer, group, params, grads):
    from .optimizer import _expected_state_shapes, _layout

    for p, grad in zip(params, grads):
        check_param(p)
        if not isinstance(grad, DTensor) or grad.device_mesh != p.device_mesh or (
                tuple(grad.placements) != tuple(p.placements)):
            got = (f"placed {tuple(grad.placements)}" if isinstance(grad, DTensor)
                   else "a plain tensor")
            raise ValueError(f"flora: the gradient of FSDP2 {_describe(p)} must be a DTensor "
                             f"placed like its parameter ({tuple(p.placements)}), got {got}")
        optimizer._check_grad(p, grad)
        if grad.to_local().shape != p.to_local().shape:
            raise ValueError(f"flora: the gradient of FSDP2 {_describe(p)} has a local piece of "
                             f"shape {tuple(grad.to_local().shape)}, its parameter "
                             f"{tuple(p.to_local().shape)}")
        state = optimizer.state[p]
        if state:
            optimizer._check_state(p, group, state)
            shapes, _ = _expected_state_shapes(p, group)
            placements = state_placements(p, _layout(p, group))
            for name, shape in shapes.items():
                _check_state_placement(p, name, state[name], placements[name], shape)


class _Sums:
    """Partial sums of one phase, summed over each mesh's ranks with one collective.

    ``add`` takes a tensor whose sum every rank needs: an all-reduce of the concatenated
    tensors. ``add_columns`` takes an r x m partial product of which each rank keeps only its
    columns (the Shard(1) split of the momentum): when a mesh has any, its collective is one
    reduce-scatter whose rank-j chunk holds rank j's columns of every such partial, followed by
    a copy of the ``add`` tensors in every chunk (so every rank still gets their whole sum).
    A tensor of an unsharded item (``mesh`` None) stays as it is."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.values = []
        self.by_mesh = {}  # id(process group) -> (mesh, whole-sum indices, column indices)

    def _slot(self, x, mesh, kind):
        k = len(self.values)
        self.values.append(x.to(self.dtype))
        if mesh is not None:
            self.by_mesh.setdefault(id(mesh.get_group()), (mesh, [], []))[kind].append(k)
        return k

    def add(self, x, mesh):
        """Adds this rank's part ``x`` of a sum every rank needs whole; ``mesh`` None: ``x``
        is the whole sum already."""
        return self._slot(x, mesh, 1)

    def add_columns(self, x, mesh):
        """Adds this rank's part ``x`` (r x m) of a sum of which this rank keeps its columns;
        ``mesh`` None: ``x`` is the whole sum, all of whose columns are this rank's."""
        return self._slot(x, mesh, 2)

    def reduce(self):
        for mesh, whole, columns in self.by_mesh.values():
            if columns:
                self._reduce_scatter(mesh, whole, columns)
            else:
                self._all_reduce(mesh, whole)

    def _all_reduce(self, mesh, index):
        flat = torch.cat([self.values[k].reshape(-1) for k in index])
        on_mesh = _on_mesh(flat, mesh)
        dist.all_reduce(on_mesh, group=mesh.get_group())
        self._unpack(on_mesh.to(flat.device), index)

    def _reduce_scatter(self, mesh, whole, columns):
        size, me = mesh.size(), mesh.get_local_rank()
        blocks = []  # per partial: size x (r * width), chunk j = rank j's columns, padded
        for k in columns:
            x = self.values[k]
            r, m = x.shape
            width = -(-m // size)
            padded = x.new_zeros(r, size * width)
            padded[:, :m] = x
            blocks.append(padded.view(r, size, width).transpose(0, 1).reshape(size, -1))
        if whole:
            same = torch.cat([self.values[k].reshape(-1) for k in whole])
            blocks.append(same.expand(size, -1))
        send = _for_gather_or_scatter(torch.cat(blocks, dim=1).reshape(-1), mesh)
        mine = send.new_empty(send.numel() // size)
        _REDUCE_SCATTER(mine, send, group=mesh.get_group())
        mine = mine.to(self.values[columns[0]].device)
        offset = 0
        for k in columns:
            r, m = self.values[k].shape
            width = -(-m // size)
            _, length = _chunk(m, size, me)
            self.values[k] = mine[offset:offset + r * width].view(r, width)[:, :length]
            offset += r * width
        self._unpack(mine[offset:], whole)

    def _unpack(self, flat, index):
        offset = 0
        for k in index:
            size = self.values[k].numel()
            self.values[k] = flat[offset:offset + size].view(self.values[k].shape)
            offset += size

    def __getitem__(self, k):
        return self.values[k]


def _on_mesh(t, mesh):
    """``t`` on the device the mesh's process group communicates on: parameters offloaded to
    the CPU (FSDP2's CPUOffloadPolicy) on a CUDA mesh are summed on the GPU."""
    return t.to(mesh.device_type)


def _for_gather_or_scatter(t, mesh):
    """``t`` where the mesh's all-gather and reduce-scatter run: on the CPU for gloo, whose
    support of these two on CUDA tensors varies between torch versions (its all-reduce on
    them is long-standing), else as _on_mesh."""
    if dist.get_backend(mesh.get_group()) == "gloo":
        return t.cpu()
    return _on_mesh(t, mesh)


def _fingerprint(group, params, states):
    """A 24-bit number that differs between ranks about to step different things."""
    from .optimizer import _HYPER

    hyper = tuple(tuple(v) if isinstance(v, list) else v for v in _HYPER(group))
    position = {id(p): k for k, p in enumerate(group["params"])}
    items = tuple((position[id(p)], tuple(p.shape), str(p.dtype), s.get("step", 0),
                   s.get("seed", -1)) for p, s in zip(params, states))
    text = repr((float(group["lr"] or 0.0), hyper, items))
    value = 0
    for byte in text.encode():  # not hash(): str hashes differ between processes
        value = (value * 131 + byte) % 16777213
    return value


def _agree(group, params, states, failure):
    """The check phase: raises on every rank unless every rank passed its checks and is
    about to step the same parameters with the same state counters and hyper-parameters."""
    meshes = {}
    for p in group["params"]:
        mesh = p.device_mesh
        if mesh.size() > 1:
            meshes.setdefault(id(mesh.get_group()), mesh)
    mine = _fingerprint(group, params, states) if failure is None else 0
    sums = []
    for mesh in meshes.values():
        buf = torch.tensor([float(failure is None), 1.0, mine, float(mine) ** 2],
                           dtype=torch.float64, device=mesh.device_type)
        dist.all_reduce(buf, group=mesh.get_group())
        sums.append((mesh.size(), buf.tolist()))
    if failure is not None:
        raise failure
    for size, (passed, count, total, squares) in sums:
        if passed != count:
            raise RuntimeError(f"flora: {int(count - passed)} of {size} ranks failed the checks "
                               f"of this optimizer step (see their errors); nothing was stepped")
        # sum (f_r - f)^2 = 0 over the ranks: every rank has this rank's fingerprint
        if squares - 2 * mine * total + size * float(mine) ** 2 != 0:
            raise RuntimeError(
                "flora: the ranks of an FSDP2 mesh disagree on what this step updates (the "
                "parameters with a gradient, their step counts or projection seeds, or the "
                "hyper-parameters); every rank must step the same parameters with the same "
                "optimizer settings; nothing was stepped")


class _MomentumGather:
    """The whole r x m momentum of each row-sharded parameter with the left projection, whose
    ranks keep Shard(1) column blocks of it: up(M) = P[:, rows]^T M needs every column. One
    all-gather per mesh of the concatenated blocks (each padded to the widest rank's), started
    before phase 1 so that it runs while the ranks compute their phase-1 sums."""

    def __init__(self, items):
        by_mesh = {}
        for it in items:
            if it.mesh is not None and it.layout["momentum"] == "compressed" and (
                    it.layout["left"]):
                by_mesh.setdefault(id(it.mesh.get_group()), (it.mesh, []))[1].append(it)
        self.pending = []
        for mesh, group_items in by_mesh.values():
            size, me = mesh.size(), mesh.get_local_rank()
            pieces = []
            for it in group_items:
                local = it.state["momentum"].to_local()
                start, length = _chunk(it.m, size, me)
                if local.shape[1] != length:  # torch split the columns otherwise
                    raise RuntimeError(f"flora: this rank's momentum columns of FSDP2 "
                                       f"{_describe(it.p)} number {local.shape[1]}, expected "
                                       f"{length} (torch.chunk of {it.m} in {size})")
                padded = local.new_zeros(local.shape[0], -(-it.m // size))
                padded[:, :length] = local
                pieces.append(padded.reshape(-1))
            send = _for_gather_or_scatter(torch.cat(pieces), mesh)
            received = send.new_empty(size * send.numel())
            work = _ALL_GATHER(received, send, group=mesh.get_group(), async_op=True)
            # send is kept until the wait: the collective reads it in the meantime
            self.pending.append((work, send, received, group_items, size, pieces[0].device))

    def wait(self):
        """Sets ``whole_momentum`` of the items gathered."""
        for work, _, received, group_items, size, device in self.pending:
            work.wait()
            received = received.to(device).view(size, -1)
            offset = 0
            for it in group_items:
                r, width = it.layout["rank"], -(-it.m // size)
                block = received[:, offset:offset + r * width].view(size, r, width)
                it.whole_momentum = block.transpose(0, 1).reshape(r, size * width)[:, :it.m]
                offset += r * width
        self.pending = []


class _Item:
    """One parameter's local piece and the values of this step, until it is written."""
    __slots__ = ("p", "state", "layout", "mesh", "start", "rows", "n", "m", "numel", "p32",
                 "g", "t", "seed", "new", "slot_psq", "slot_rowsum", "slot_col", "slot_dsq",
                 "slot_down", "D", "base", "lr_t", "whole_momentum")


def prepare(optimizer, group, params, grads):
    """Checks a step of DTensor ``params`` (agreeing with the other ranks) and returns the
    function that runs it; raises, with nothing written, when a rank's check fails."""
    failure = None
    try:
        check_group(group)  # settings may have changed since the group was added
        _check_inputs(optimizer, group, params, grads)
    except (TypeError, ValueError) as err:
        failure = err
    states = [optimizer.state[p] for p in params]
    _agree(group, params, states, failure)
    return lambda: _run(optimizer, group, params, grads)


def step(optimizer, group, params, grads):
    prepare(optimizer, group, params, grads)()


@torch.no_grad()
def _run(optimizer, group, params, grads):
    from .optimizer import _layout

    eps1, eps2 = group["eps"]
    beta1 = float(group["beta1"] or 0.0)
    decay_rate = float(group["decay_rate"])
    for p in params:
        if not optimizer.state[p]:
            init_state(optimizer, p, group, optimizer.state[p])
    first, second = _Sums(torch.float64), _Sums(torch.float32)
    items = []
    for p, grad in zip(params, grads):
        it = _Item()
        items.append(it)
        it.p, it.state, it.layout, it.mesh = p, optimizer.state[p], _layout(p, group), None
        mesh, placements = p.device_mesh, tuple(p.placements)
        if _row_sharded(placements) and mesh.size() > 1:
            it.mesh = mesh  # its rows are spread over the mesh: partial sums to add up
        it.start, it.rows = _local_rows(tuple(p.shape), mesh, placements)
        it.numel = p.numel()
        it.p32 = p.to_local().float()
        it.g = grad.to_local().float()
        it.t = it.state["step"] + 1
        it.seed = it.state.get("seed")
        it.new = {}
        it.slot_down = None
        it.whole_momentum = None
        if it.layout["factored"]:
            it.n, it.m = p.shape
    gather = _MomentumGather(items)  # runs while the phase-1 sums are computed
    for it in items:
        beta2 = 1.0 - float(it.t) ** decay_rate
        it.slot_psq = first.add(it.p32.double().square().sum(), it.mesh)
        gd = it.g.double()
        if it.layout["factored"]:
            v = gd * gd + eps1
            row = it.state["row_second_moment"].to_local()
            it.new["row_second_moment"] = (beta2 * row.double()
                                           + (1.0 - beta2) * (v.sum(1) / it.m)).float()
            it.slot_rowsum = first.add(it.new["row_second_moment"].double().sum(), it.mesh)
            it.slot_col = first.add(v.sum(0), it.mesh)
        else:
            s = it.state["second_moment"].to_local()
            it.new["second_moment"] = (beta2 * s.double()
                                       + (1.0 - beta2) * (gd * gd + eps1)).float()
    first.reduce()
    gather.wait()
    # The scalars that steer the step, read in one transfer (one device sync, not one each).
    param_sq = _scalars(first, [it.slot_psq for it in items])
    for it, p_sq in zip(items, param_sq):
        gd = it.g.double()
        beta2 = 1.0 - float(it.t) ** decay_rate
        if it.layout["factored"]:
            col = it.state["col_second_moment"].to_local()
            it.new["col_second_moment"] = (beta2 * col.double()
                                           + (1.0 - beta2) * (first[it.slot_col] / it.n)).float()
            row_mean = first[it.slot_rowsum] / it.n
            a = 1.0 / torch.sqrt(it.new["row_second_moment"].double() / row_mean)
            u = (gd * a[:, None] / torch.sqrt(it.new["col_second_moment"].double())[None, :])
            u = u.float()
        else:
            u = (gd / torch.sqrt(it.new["second_moment"].double())).float()
        kind = it.layout["momentum"]
        it.base = None
        if kind == "none":
            it.D = u
        elif kind == "dense":
            m = it.state["momentum"].to_local()
            it.D = it.new["momentum"] = m * beta1 + u * (1.0 - beta1)
        else:
            _compressed(it, u, group, beta1, second)
        it.slot_dsq = second.add(it.D.double().square().sum(), it.mesh)
        # lr_t as the kernel has it: double math on the summed sum(p^2)
        base_lr = _base_lr(group, it.t)
        if group["scale_parameter"]:
            rms = math.sqrt(p_sq / it.numel) if it.numel else 0.0
            base_lr *= _max_nan(float(eps2), rms)
        it.lr_t = base_lr
    second.reduce()
    clip_threshold = float(group["clip_threshold"])
    weight_decay = float(group["weight_decay"])
    for it, d_sq in zip(items, _scalars(second, [it.slot_dsq for it in items])):
        if it.slot_down is not None:
            it.new["momentum"] = it.base * beta1 + second[it.slot_down] * (1.0 - beta1)
        clip = _max_nan(1.0, math.sqrt(d_sq / it.numel) / clip_threshold) if it.numel else 1.0
        decay = _f32(weight_decay * it.lr_t)
        x = it.p32
        if decay != 0.0:
            x = x - decay * x
        it.new["param"] = x - _f32(it.lr_t) * (it.D * _f32(1.0 / clip))
    # Everything computed: write parameters and state.
    kappa = group["kappa"]
    for it in items:
        if it.numel:  # the kernels leave an empty parameter's state as it is, too
            it.p.to_local().copy_(it.new.pop("param"))
            for name, value in it.new.items():
                it.state[name].to_local().copy_(value)
        it.state["step"] = it.t
        if it.seed is not None and it.t % kappa == 0:
            it.state["seed"] = next_seed(it.seed)


def _compressed(it, u, group, beta1, second):
    """Compressed momentum (docs/FLORA.md step 4) of one item: sets D, and the new momentum, or
    its r x m partial down(U) for phase 2 (left projection of a row-sharded parameter, whose
    rank keeps the columns of M that the phase-2 reduce-scatter gives it)."""
    r = it.layout["rank"]
    n, m = it.n, it.m
    device = it.g.device
    left = it.layout["left"]
    shape = (r, n) if left else (m, r)
    orthogonal = group["projection"] == "orthogonal"  # P_o for P (docs/FLORA.md §5.1)

    def basis(seed):
        P = projection(seed, *shape, r, device=device)
        return orthogonal_basis(P, left) if orthogonal else P

    p_now = basis(it.seed)
    resample = it.t % group["kappa"] == 0
    p_down = basis(next_seed(it.seed)) if resample else p_now
    momentum = it.state["momentum"].to_local()  # left and row-sharded: this rank's columns
    if left:
        rows = slice(it.start, it.start + it.rows)
        whole = momentum if it.whole_momentum is None else it.whole_momentum
        up = p_now[:, rows].t().mm(whole)
        # the basis change acts on each column alone: this rank's columns of P' P^T M
        it.base = p_down.mm(p_now.t()).mm(momentum) if resample else momentum
        down_u = p_down[:, rows].mm(u)
        it.D = u * (1.0 - beta1) + up * beta1
        it.slot_down = second.add_columns(down_u, it.mesh)
    else:
        up = momentum.mm(p_now.t())
        base = momentum.mm(p_now.t().mm(p_down)) if resample else momentum
        it.D = u * (1.0 - beta1) + up * beta1
        it.new["momentum"] = base * beta1 + u.mm(p_down) * (1.0 - beta1)


def orthogonal_basis(P, left):
    """projection="orthogonal"'s basis for the Gaussian ``P`` (docs/FLORA.md §5.1): P_o =
    s R^-T P on the left (r x n), P R^-1 s on the right (m x r), R the upper Cholesky factor
    of the r x r Gram, s^2 = long / r; as the CPU kernel's orthogonal_basis computes it
    (float64 Gram, Cholesky factor and triangular solve, rounded to float32)."""
    a = (P if left else P.t()).double()  # r x long
    rank, length = a.shape
    lower = torch.linalg.cholesky(a @ a.t())  # R^T
    w = torch.linalg.solve_triangular(lower, a, upper=False)
    w = w.mul_(math.sqrt(length / rank)).float()
    return w if left else w.t().contiguous()


def _scalars(sums, slots):
    """The 0-dim tensors ``sums[k]`` as Python floats."""
    if not slots:
        return []
    return torch.stack([sums[k].double() for k in slots]).tolist()


def _base_lr(group, t):
    if not group["relative_step"]:
        return float(group["lr"])
    cap = 1e-6 * t if group["warmup_init"] else 1e-2
    return min(cap, 1.0 / math.sqrt(t))


def _f32(x):
    """``x`` rounded to float32, as the kernel's float scalars are."""
    return torch.tensor(x, dtype=torch.float32).item()


def _max_nan(a, b):
    """max(a, b), NaN when either is NaN, as the kernels' (docs/FLORA.md §4.7)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)
