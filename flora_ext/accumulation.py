"""Compressed gradient accumulation and layer-wise Flora steps in backward hooks.

docs/FLORA.md, "Compressed gradient accumulation". A FloraAccumulator registers a
post-accumulate-grad hook on each parameter it manages. For every micro-batch the hook takes
the parameter's fresh gradient G out of ``p.grad`` (which is left ``None``) and folds it into a
per-parameter buffer; in the backward pass of the cycle's last micro-batch it forms the
accumulated gradient and runs the Flora step for that parameter right there, layer by layer,
so that at most one full-size gradient is alive at a time.

- compressed (2-D parameter, ``rank < min(n, m)``, more than one micro-batch): the buffer is
  C = sum of down_s(G) over the cycle's micro-batches but the last, in float32 (or bfloat16,
  ``buffer_dtype``: each product is still formed in float32 and added in float32, and the
  sum is rounded to bfloat16 once per micro-batch; or 8-bit, ``torch.uint8``: the sum
  requantized in quantization=True's blockwise format, docs/FLORA.md §11); the last
  micro-batch's gradient is used as is: G~ = G_last + up_s(C) (unbiased, E[up(down(X))] = X).
  P is r x n (left, n < m: down(X) = P X, up(C) = P^T C) or m x r (right: down(X) = X P,
  up(C) = C P^T), drawn by flora_ext.projection, the momentum's Philox generator.
- dense (everything else): the buffer is the plain sum of the gradients, summed exactly as
  autograd sums into ``p.grad``, so the step sees bitwise the naive accumulation's gradient.

The sum is what plain accumulation leaves in ``p.grad``: backpropagate ``loss / micro_batches``
to get the mean over micro-batches, as with ``torch.optim``.
"""
from __future__ import annotations

import sys
import threading
import weakref
from itertools import chain

import torch

from . import _quantized
from ._ops import next_seed, projection
from .hyperparams import MAX_INT64
from .hyperparams import is_int as _is_int

_MAX_SEED = MAX_INT64  # the ops take seeds as int64
_UNSET = object()  # process_group not given
# Accumulation seeds are next_seed(group seed + i) XOR this salt (i: the parameter's 1-based
# number, as for the momentum seeds). The momentum seeds are seed + i and their next_seed
# iterates, never salted, so the two families do not share a seed by construction.
ACCUMULATION_SEED_SALT = 0x2F6B1D3A94C7E5B1

# id(param) -> (weakref to param, weakref to the FloraAccumulator holding its hook).
_HOOKED: dict[int, tuple[weakref.ref, weakref.ref]] = {}



_current_graph_task_id = torch._C._current_graph_task_id


def _nested_backward():
    """Whether this runs inside a custom autograd Function's backward, as a reentrant
    backward (reentrant torch.utils.checkpoint) does: a Python frame of its apply."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _BACKWARD_APPLY:
            return True
        frame = frame.f_back
    return False


_BACKWARD_APPLY = torch.autograd.function.BackwardCFunction.apply.__code__


def initial_accumulation_seed(group_seed: int, number: int) -> int:
    """Accumulation seed of parameter ``number`` (1-based, all groups in order) in its first
    cycle; cycle c uses next_seed applied c times to it."""
    return next_seed(int(group_seed) + int(number)) ^ ACCUMULATION_SEED_SALT


def _gemm_dtype(dtype):
    # bf16 GEMMs keep the full-size temporaries at 2 bytes an element (the accumulated C stays
    # float32); fp16 goes through float32, where the projected sums cannot overflow.
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _projection(shape, seed, rank, device, dtype):
    n, m = shape
    left = n < m
    P = projection(seed, rank, n, rank, device=device, dtype=dtype) if left else \
        projection(seed, m, rank, rank, device=device, dtype=dtype)
    return P, left


# How this torch multiplies half-precision (bf16/fp16) CUDA matrices into a float32 result
# (torch.mm/addmm's out_dtype): "addmm" (C += A B in place, the fp32 C read and written by the
# GEMM itself), "mm" (a float32 product, then added), or "none" (older torch: a product in the
# inputs' dtype, then added). Probed once per process on a tiny product, see _fp32_out_mode.
_FP32_OUT_MODE = None


def _fp32_out_mode(device):
    global _FP32_OUT_MODE
    if _FP32_OUT_MODE is not None:
        return _FP32_OUT_MODE
    # Small integers: every product and sum below is exact in float32 and in bf16/fp16 inputs,
    # so an implementation that works gives exactly `expected`.
    a = torch.arange(-3, 3, dtype=torch.float32, device=device).reshape(2, 3)
    b = torch.arange(-5, 7, dtype=torch.float32, device=device).reshape(3, 4)
    c = torch.full((2, 4), 0.5, dtype=torch.float32, device=device)
    expected = c + a @ b
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    mode = "none"
    try:
        out = c.clone()
        torch.addmm(out, a16, b16, out_dtype=torch.float32, out=out)
        if out.dtype == torch.float32 and torch.equal(out, expected):
            mode = "addmm"
    except Exception:  # noqa: BLE001 - no out_dtype, or self must be 16-bit: try the next
        pass
    if mode == "none":
        try:
            out = torch.mm(a16, b16, out_dtype=torch.float32)
            if out.dtype == torch.float32 and torch.equal(out + c, expected):
                mode = "mm"
        except Exception:  # noqa: BLE001 - a torch without out_dtype
            pass
    _FP32_OUT_MODE = mode
    return mode


def _down_project_cuda_half(grad, seed, rank, out):
    """down_seed(grad) of a bf16/fp16 CUDA gradient: one tensor-core GEMM of the gradient as it
    is with the projection rounded to its dtype, accumulated in float32 and written (added) in
    float32 (C += P G or G P) without a full-size temporary."""
    P, left = _projection(grad.shape, seed, rank, grad.device, grad.dtype)
    a, b = (P, grad) if left else (grad, P)
    mode = _fp32_out_mode(grad.device)
    if mode == "addmm" and out is not None:
        return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    if mode != "none":
        product = torch.mm(a, b, out_dtype=torch.float32)
    else:  # older torch: the r x m (n x r) product rounds to the inputs' dtype once
        product = torch.mm(a, b).float()
    return product if out is None else out.add_(product)


def _cuda_half(t):
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def down_project(grad: torch.Tensor, seed: int, rank: int, out: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
    """``out + down_seed(grad)`` as an r x m (n < m) or n x r matrix of ``dtype`` (float32,
    or bfloat16), or a Blockwise8 of it for ``torch.uint8``; in place into ``out`` (of that
    kind) when given.

    torch.uint8: the float32 product is added to ``out`` read back in float32 and the sum
    requantized into ``out`` (two float32 temporaries of the compressed size).

    bfloat16: the product is formed in float32 as below, added to ``out`` in float32 and
    the sum rounded to bfloat16 once (``out.add_(float32 product)``); a float32 temporary of
    the compressed size (r x m or n x r) exists meanwhile.

    bf16/fp16 gradients on CUDA: one tensor-core GEMM with the projection rounded to the
    gradient's dtype, float32 accumulation and a float32 result added into ``out`` (no
    full-size temporary). Elsewhere (the CPU, float32 gradients): bf16 GEMMs for bf16, float32
    GEMMs otherwise (TF32 on CUDA when torch allows it)."""
    if dtype == torch.uint8:
        product = down_project(grad, seed, rank)
        if out is None:
            return Blockwise8(product)
        out.store(out.dequantize().add_(product))
        return out
    if dtype != torch.float32:
        product = down_project(grad, seed, rank)
        return product.to(dtype) if out is None else out.add_(product)
    if _cuda_half(grad):
        return _down_project_cuda_half(grad, seed, rank, out)
    dtype = _gemm_dtype(grad.dtype)
    P, left = _projection(grad.shape, seed, rank, grad.device, dtype)
    G = grad.to(dtype)
    if dtype == torch.float32 and out is not None:
        return out.addmm_(P, G) if left else out.addmm_(G, P)
    product = torch.mm(P, G) if left else torch.mm(G, P)
    if out is None:
        return product.float()
    return out.add_(product)


def up_project_add_(target: torch.Tensor, compressed: torch.Tensor, seed: int, rank: int):
    """``target += up_seed(compressed)`` in place, ``target`` n x m of any float dtype.

    The projection is the one down_project used for a gradient of ``target``'s dtype and
    device (on CUDA, rounded to bf16/fp16 for such targets), so that E[up(down(X))] = X holds
    for the matrix actually used. bf16 and float32 targets: one GEMM (bf16 tensor cores with
    float32 accumulation for bf16) that adds into ``target`` in place, no full-size
    temporary. fp16 targets: float32 GEMMs (the projected sum could overflow fp16), on CUDA in
    row blocks so that the float32 temporary is an eighth of ``target`` at most."""
    dtype = _gemm_dtype(target.dtype)
    P, left = _projection(target.shape, seed, rank, target.device, dtype)
    C = compressed.to(dtype)
    if dtype == target.dtype:
        return target.addmm_(P.t(), C) if left else target.addmm_(C, P.t())
    if not _cuda_half(target):
        return target.add_(torch.mm(P.t(), C) if left else torch.mm(C, P.t()))
    P = P.to(target.dtype).to(dtype)  # the fp16-rounded P of the down projections
    rows = target.shape[0]
    block = max(1, -(-rows // 8))
    for start in range(0, rows, block):
        part = slice(start, start + block)
        target[part].add_(torch.mm(P[:, part].t(), C) if left else torch.mm(C[part], P.t()))
    return target


class Blockwise8:
    """A compressed buffer kept in 8 bits (buffer_dtype=torch.uint8): uint8 codes and a
    float32 absmax per 256 elements, quantization=True's format with the signed map
    (docs/FLORA.md §11). Read back and stored whole, in float32."""
    __slots__ = ("codes", "absmax")

    def __init__(self, values):
        self.codes, self.absmax = _quantized.quantize("momentum", values.contiguous())

    def dequantize(self):
        return _quantized.dequantize("momentum", self.codes, self.absmax)

    def store(self, values):
        _quantized.requantize_("momentum", values.contiguous(), self.codes, self.absmax)

    @property
    def nbytes(self):
        return self.codes.nbytes + self.absmax.nbytes


def float_buffer(buffer):
    """A compressed buffer as a float tensor (8-bit ones read back in float32)."""
    return buffer.dequantize() if isinstance(buffer, Blockwise8) else buffer


# The dtypes the compressed buffers can have, by the names state_dicts record them under
# (uint8: 8-bit blockwise, Blockwise8).
BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def buffer_dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_buffer_dtype(dtype, name):
    """Raises unless ``dtype`` is a dtype the compressed buffers can have."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"flora: {name} must be a torch.dtype (torch.float32, "
                        f"torch.bfloat16 or torch.uint8), got {type(dtype).__name__} {dtype!r}")
    if dtype not in BUFFER_DTYPES.values():
        raise ValueError(f"flora: {name} must be torch.float32, torch.bfloat16 or torch.uint8 "
                         f"(8-bit blockwise), got {dtype!r}")


def check_step_group_bytes(value):
    """Raises unless ``value`` is a valid step_group_bytes (an int >= 0)."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"flora: step_group_bytes must be an int >= 0 (0: each parameter "
                         f"stepped alone in its hook), got {value!r}")


def check_overlap_steps(value):
    """Raises unless ``value`` is a valid overlap_steps (a bool)."""
    if not isinstance(value, bool):
        raise TypeError(f"flora: overlap_steps must be a bool, got {value!r}")


class _Managed:
    """Bookkeeping of one hooked parameter."""

    __slots__ = ("param", "index", "number", "name", "seed", "buffer", "compressed", "count",
                 "ordinal", "handle")

    def __init__(self, param, index, name, seed):
        self.param = param
        self.index = index          # 0-based position in the optimizer: the state_dict key
        self.name = name
        self.seed = seed            # accumulation seed of the current cycle
        self.buffer = None          # C (compressed) or the running sum (dense)
        self.compressed = False     # decided at each cycle's first micro-batch
        self.count = 0              # micro-batches received in the current cycle
        self.ordinal = 0            # micro-batches received since creation or reset()
        self.handle = None


class FloraAccumulator:
    """Gradient accumulation (optionally compressed) with Flora steps inside backward.

    ``FloraAccumulator(opt, micro_batches=4, rank=256)`` hooks every parameter of the Flora
    optimizer ``opt`` that requires grad. The training loop then only runs backward::

        acc = flora_ext.FloraAccumulator(opt, micro_batches=4, rank=256)
        for batch in batches:                       # one optimizer step per 4 batches
            (loss_fn(model, batch) / 4).backward()  # the 4th backward steps every parameter

    The accumulator counts backward passes: micro-batch ``micro_batches`` of each cycle steps
    the parameters in their hooks (p.grad stays None throughout). ``opt.step()`` may still be
    called once per cycle (e.g. for LR schedulers): for the hooked parameters it only checks
    that the cycle is complete, and it steps any parameter the accumulator does not manage.
    ``micro_batches=1`` (the default) is layer-wise stepping without accumulation.

    Arguments:
        optimizer: a flora_ext.Flora; the steps use its groups' hyper-parameters and state.
        micro_batches: backward passes per optimizer step (int >= 1).
        rank: rank of the accumulation projection, or None for dense accumulation. A 2-D
            parameter with ``rank < min(n, m)`` is accumulated compressed when
            micro_batches > 1; others are summed densely.
        params: the parameters to hook (default: all of ``optimizer``'s that require grad).
        model: optional: names parameters in error messages; a DistributedDataParallel
            model makes the accumulation span its process group (see below).
        process_group: accumulate across the processes of this group (None: the default
            group) with an unwrapped model. Not given: the group of ``model`` when it is a
            DistributedDataParallel, else this process only (refused in a job of several
            processes, where the replicas would diverge).
        bucket_cap_mb, comm_dtype: across processes, the size of the flat all-reduce
            buckets (default 25 MiB) and their dtype (float32, or bfloat16 to halve bytes).
        buffer_dtype: dtype of the compressed buffers C kept between micro-batches:
            torch.float32 (default), torch.bfloat16 (half the bytes; each micro-batch's
            product is still formed and added in float32, then the sum rounded to bfloat16
            once) or torch.uint8 (a quarter: the float32 sum requantized each micro-batch in
            quantization=True's 8-bit blockwise format, docs/FLORA.md §11). Dense buffers are
            the gradients themselves, in the parameter's dtype.
        step_group_bytes: 0 (default): each hook of the last micro-batch steps its
            parameter alone. N > 0: the hooks gather parameters with their gradients and
            step them in one call once the gradients hold N bytes, and the rest when the
            backward pass ends: fewer, larger step calls, for up to N bytes of gradients
            held meanwhile. The results are the same (bitwise without stochastic_rounding,
            whose streams are keyed by a parameter's place in its call). One process only.
        overlap_steps: CUDA parameters only. False (default): the hooks' work (each
            micro-batch's compression or sum, the last one's step) runs on the current
            stream, between the backward kernels. True: on a second stream, which waits for
            the backward's work up to the hook and which the current stream waits for when
            the backward pass ends, so that it runs beside the backward of the layers before.
            The same kernels on the same inputs: bitwise the results of False. One process
            only.

    Across processes (flora_ext.distributed): each rank compresses every micro-batch of a
    cycle, the last one too (one process keeps the last one dense; across processes that
    would take a full-size all-reduce). When its cycle ends, the compressed buffers (and the
    dense sums of the other parameters) are averaged over the group in buckets launched from
    the hooks, and every rank steps the same averaged G~ = up_s(mean C) after backward. With
    a DDP model the accumulator switches DDP's own all-reduce off
    (``require_backward_grad_sync = False``) so that nothing is reduced twice. The ranks'
    seeds, hyper-parameters, micro_batches and initial parameters are compared in the first
    cycle (one small all_gather); a difference raises on every rank.

    Every hooked parameter must receive a gradient in every backward pass; one that did not
    is reported (RuntimeError naming it) at the next backward pass, at ``opt.step()`` and at
    ``state_dict()``. The accumulation seeds live in this object's ``state_dict()``, not in
    the optimizer's: save both. ``remove()`` (or leaving a ``with`` block) takes the hooks off.
    """

    def __init__(self, optimizer, micro_batches: int = 1, rank: int | None = None, *,
                 params=None, model=None, process_group=_UNSET, bucket_cap_mb=25,
                 comm_dtype=torch.float32, buffer_dtype=torch.float32, step_group_bytes=0,
                 overlap_steps=False, _sync=None):
        from . import distributed  # a cycle at import time otherwise
        from .optimizer import Flora

        if not isinstance(optimizer, Flora):
            raise TypeError(f"flora: FloraAccumulator needs a flora_ext.Flora optimizer, got "
                            f"{type(optimizer).__name__}")
        if _sync is None and (not _is_int(micro_batches) or micro_batches < 1):
            raise ValueError(f"flora: micro_batches must be an int >= 1, got {micro_batches!r}")
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise ValueError(f"flora: accumulation rank must be None (dense accumulation) or "
                             f"an int >= 1, got {rank!r}")
        check_buffer_dtype(buffer_dtype, "buffer_dtype")
        check_step_group_bytes(step_group_bytes)
        check_overlap_steps(overlap_steps)
        self.optimizer = optimizer
        # > 0: the last micro-batch's hooks gather (parameter, gradient) pairs and step them in
        # one call once their gradients hold this many bytes, and at the end of the backward
        # pass: fewer step_group_ calls, at the cost of holding those gradients meanwhile.
        self._group_bytes = int(step_group_bytes)
        self._pending = []
        self._pending_bytes = 0
        # overlap_steps: device index -> the side stream the steps run on; (main, side)
        # pairs the current backward pass must join when it ends.
        self._overlap = overlap_steps
        self._side_streams = {}
        self._joins = set()
        self._join_task = None
        self.buffer_dtype = buffer_dtype
        # None, or a callable (param, grad) that the hook calls with the gradient it is about
        # to step the parameter with (the cycle's sum, or its unbiased estimate when
        # compressed; across processes their mean over the ranks), e.g. to log the gradient
        # norm that no p.grad holds afterwards.
        self.grad_observer = None
        self._micro_batches = None if _sync is not None else int(micro_batches)
        self.rank = None if rank is None else int(rank)
        self._sync = _sync
        self._lock = threading.Lock()
        self._names = {}
        if model is not None:
            self._names = {id(p): name for name, p in model.named_parameters()}
        self.active = False
        self._reducer = None
        comm_group, ddp = distributed.resolve_process_group(model, process_group)
        for name, value in (("step_group_bytes", self._group_bytes),
                            ("overlap_steps", overlap_steps)):
            if comm_group is not None and value:
                raise ValueError(f"flora: {name} applies to a single process; with a process "
                                 f"group the reducer steps the parameters after backward")

        owned = getattr(optimizer, "_accumulator", None)
        if owned is not None and owned() is not None and owned().active:
            raise RuntimeError("flora: this optimizer already has a FloraAccumulator hooked to "
                               "its parameters; call remove() on that one first")
        positions = {}
        for index, (p, group) in enumerate(
                (p, g) for g in optimizer.param_groups for p in g["params"]):
            positions[id(p)] = (index, p, group)
        if params is None:
            chosen = [p for _, p, _ in positions.values() if p.requires_grad]
        else:
            chosen = list(params)
        entries, seen = [], set()
        for p in chosen:
            where = positions.get(id(p))
            if where is None or where[1] is not p:
                raise ValueError(f"flora: FloraAccumulator params must belong to the optimizer; "
                                 f"{self._name(p)} does not")
            index, _, group = where
            if id(p) in seen:
                raise ValueError(f"flora: {self._name(p, index)} is listed twice in params")
            seen.add(id(p))
            if not p.requires_grad:
                raise ValueError(f"flora: {self._name(p, index)} does not require grad, so it "
                                 f"never receives a gradient to accumulate")
            hooked = _HOOKED.get(id(p))
            if hooked is not None and hooked[0]() is p and hooked[1]() is not None \
                    and hooked[1]().active:
                raise RuntimeError(f"flora: {self._name(p, index)} already has the backward "
                                   f"hook of another FloraAccumulator; a parameter can be "
                                   f"stepped by one accumulator only (call remove() on the "
                                   f"other first)")
            entries.append(_Managed(p, index, self._name(p, index),
                                    initial_accumulation_seed(group["seed"], index + 1)))
        # All checks passed: hook.
        self._entries = entries
        self._by_id = {id(e.param): e for e in entries}
        self._ordinal_counts = {0: len(entries)} if entries else {}
        self._task_seen = None  # the autograd graph task of the last hook
        self._pass = None       # ("top" or "nested", graph task id) of the open backward pass
        for e in entries:
            e.handle = e.param.register_post_accumulate_grad_hook(self._hook_for(e))
            _HOOKED[id(e.param)] = (weakref.ref(e.param), weakref.ref(self))
        optimizer._accumulator = weakref.ref(self)
        self.active = True
        if comm_group is not None:
            try:
                self._reducer = distributed.CycleReducer(self, comm_group, ddp, bucket_cap_mb,
                                                         comm_dtype)
            except Exception:
                self.remove()
                raise

    # ------------------------------------------------------------------ configuration
    @property
    def micro_batches(self) -> int | None:
        """Backward passes per optimizer step (None when an external signal decides)."""
        return self._micro_batches

    @micro_batches.setter
    def micro_batches(self, value):
        if self._sync is not None:
            raise RuntimeError("flora: this accumulator's cycles end on an external signal "
                               "(FloraAccelerator's sync_gradients); micro_batches is not used")
        if not _is_int(value) or value < 1:
            raise ValueError(f"flora: micro_batches must be an int >= 1, got {value!r}")
        with self._lock:
            pending = max((e.count for e in self._entries), default=0)
            if pending:
                raise RuntimeError(
                    f"flora: cannot change micro_batches from {self._micro_batches} to {value} "
                    f"in the middle of an accumulation cycle (after {pending} of "
                    f"{self._micro_batches} micro-batches); change it between optimizer steps, "
                    f"or call reset() to drop the pending micro-batches")
            self._micro_batches = int(value)

    @property
    def params(self) -> list:
        """The parameters this accumulator steps."""
        return [e.param for e in self._entries]

    def manages(self, p) -> bool:
        """Whether ``p`` is stepped by this accumulator's hooks."""
        e = self._by_id.get(id(p)) if self.active else None
        return e is not None and e.param is p

    def describe(self, p) -> str:
        """How error messages name ``p``."""
        e = self._by_id.get(id(p))
        return e.name if e is not None and e.param is p else self._name(p)

    def _name(self, p, index=None):
        name = self._names.get(id(p))
        if name is not None:
            return f"parameter '{name}' (shape {tuple(p.shape)})"
        where = f" {index}" if index is not None else ""
        return f"optimizer parameter{where} (shape {tuple(p.shape)})"

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches received in the current cycle (0 between optimizer steps)."""
        return max((e.count for e in self._entries), default=0)

    # ------------------------------------------------------------------ the hook
    def _hook_for(self, entry):
        def hook(param):
            self._on_grad(entry)
        return hook

    def _compresses(self, p):
        # Across processes every cycle is compressed: that is what cuts the all-reduce.
        several = (self._sync is not None or self._micro_batches > 1
                   or self._reducer is not None)
        return (self.rank is not None and several and p.dim() == 2
                and self.rank < min(p.shape))

    def _names_at(self, ordinal):
        """'name (and N more)' for the parameters that have seen `ordinal` micro-batches."""
        behind = [e for e in self._entries if e.ordinal == ordinal]
        more = f" (and {len(behind) - 1} more)" if len(behind) > 1 else ""
        return f"{behind[0].name}{more}"

    def _advance_ordinal(self, entry):
        """Counts entry's micro-batch; raises first when another parameter fell behind."""
        new = entry.ordinal + 1
        lowest = min(self._ordinal_counts)
        if new - lowest > 1:
            raise RuntimeError(
                f"flora: FloraAccumulator: {self._names_at(lowest)} received no gradient in a "
                f"backward pass (it has {lowest} micro-batches since the accumulator was "
                f"created or reset, while {entry.name} is receiving its micro-batch {new}). "
                f"Every parameter the accumulator steps must get a gradient in every backward "
                f"pass: freeze unused parameters (requires_grad_(False)) or leave them out "
                f"(params=...). A parameter used both inside and outside a reentrant "
                f"torch.utils.checkpoint segment gets two gradients per backward: use "
                f"use_reentrant=False. Call reset() to start a fresh cycle.")
        counts = self._ordinal_counts
        counts[entry.ordinal] -= 1
        if not counts[entry.ordinal]:
            del counts[entry.ordinal]
        counts[new] = counts.get(new, 0) + 1
        entry.ordinal = new

    @torch.no_grad()
    def _on_grad(self, entry):
        p = entry.param
        grad = p.grad
        if grad is None or not self.active:
            return
        # Before anything is kept: a gradient the step would refuse (sparse, wrong dtype...)
        # fails here with the step's message, at the first micro-batch, on every path.
        self.optimizer._check_grad(p, grad)
        with self._lock:
            task = _current_graph_task_id()
            if task != self._task_seen:
                self._begin_graph_task(task)
                self._task_seen = task
            self._advance_ordinal(entry)
            if entry.count == 0:
                entry.compressed = self._compresses(p)
            entry.count += 1
            last = self._sync() if self._sync is not None else \
                entry.count >= self._micro_batches
        p.grad = None
        if self._reducer is not None:
            self._reducer.add(entry, grad, last)
            return
        if not last:
            self._run_hook_work(p.device, [grad], lambda: self._accumulate(entry, grad))
            return
        held = [entry.buffer]  # a list, so that the buffer is freed before the step
        entry.buffer = None
        seed = entry.seed
        entry.count = 0
        entry.seed = next_seed(seed)
        self._run_hook_work(p.device, [grad],
                            lambda: self._form_and_step(p, grad, held, seed, entry.compressed))
        if not self._group_bytes:
            return
        with self._lock:
            if not self._pending:  # step what is gathered when this backward pass ends
                torch.autograd.Variable._execution_engine.queue_callback(self._step_pending)
            self._pending.append((p, grad))
            self._pending_bytes += grad.numel() * grad.element_size()
            full = self._pending_bytes >= self._group_bytes
        if full:
            self._step_pending()

    def _accumulate(self, entry, grad):
        """A micro-batch before the cycle's last: G folded into the parameter's buffer."""
        if entry.compressed:
            entry.buffer = down_project(grad, entry.seed, self.rank, out=entry.buffer,
                                        dtype=self.buffer_dtype)
        elif entry.buffer is None:
            entry.buffer = grad  # autograd handed p.grad over: ours to keep and add into
        else:
            entry.buffer.add_(grad)  # exactly autograd's p.grad += G

    def _form_and_step(self, p, grad, held, seed, compressed):
        """The cycle's last micro-batch: its gradient plus the cycle's buffer, formed in the
        gradient's own memory (no full-size temporary for bf16 and float32 gradients, see
        up_project_add_), then the step (unless step_group_bytes gathers it), which is then
        the only thing here that takes a full-size float32 buffer (the compressed
        momentum's update, on CUDA)."""
        buffer = held.pop()
        if buffer is not None:
            if compressed:
                up_project_add_(grad, float_buffer(buffer), seed, self.rank)
            else:
                grad.add_(buffer)  # a + b == b + a: bitwise the naive accumulation's sum
            del buffer  # the last reference: freed before the step
        if self.grad_observer is not None:
            self.grad_observer(p, grad)
        if not self._group_bytes:
            self.optimizer._step_param(p, grad)

    def _step_pending(self):
        """Steps the gathered parameters, one call per parameter group."""
        with self._lock:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
        groups = {}
        for p, grad in pending:
            group = self.optimizer._group_of(p)
            _, params, grads = groups.setdefault(id(group), (group, [], []))
            params.append(p)
            grads.append(grad)
        for group, params, grads in groups.values():
            self._run_hook_work(params[0].device, grads,
                                lambda: self.optimizer._step_params(group, params, grads))

    def _run_hook_work(self, device, grads, work):
        """Runs ``work`` (the hook's work on parameters of ``device`` with ``grads``: an
        accumulation, a step) on the current stream, or with overlap_steps on the side
        stream."""
        if not self._overlaps(device):
            work()
            return
        side = self._side_streams.get(device.index)
        if side is None:
            side = self._side_streams[device.index] = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        task = _current_graph_task_id()
        with self._lock:
            stale = set()
            if task != self._join_task:  # the end of this pass makes its streams wait
                stale, self._joins, self._join_task = self._joins, set(), task
                torch.autograd.Variable._execution_engine.queue_callback(self._join_streams)
            self._joins.add((main, side))
        for waiting, stepping in stale:  # a pass that ended without its callback (an error)
            waiting.wait_stream(stepping)
        side.wait_stream(main)  # the gradient is formed and the backward done with p
        try:
            with torch.cuda.stream(side):
                work()
        except BaseException:
            main.wait_stream(side)  # what the side stream already holds comes first
            raise
        for grad in grads:  # freed on the current stream: not reused before the step ran
            grad.record_stream(side)

    def _overlaps(self, device):
        return self._overlap and device.type == "cuda"

    def _join_streams(self):
        """The current streams the steps ran from wait for the side streams."""
        with self._lock:
            joins, self._joins, self._join_task = self._joins, set(), None
        for waiting, stepping in joins:
            waiting.wait_stream(stepping)

    # ------------------------------------------------------------------ backward passes
    # The ordinal check above only sees a parameter that fell two micro-batches behind. One
    # that got no gradient in a backward pass and whose hook fires early in the next one
    # (nearer the output) would catch up at once, and from then on the parameters would step
    # on alternate backward passes. So the first hook of every top-level backward pass (a new
    # autograd graph task) checks that all parameters have seen the same number of
    # micro-batches, before that pass changes anything. A reentrant backward nested inside a
    # custom autograd Function's backward (reentrant torch.utils.checkpoint) is part of the
    # enclosing pass, also when its hooks come first: a pass stays open until its graph task
    # ends (an autograd final callback closes it).
    def _begin_graph_task(self, task):
        """Called with the lock held at the first hook of every autograd graph task."""
        if _nested_backward():
            if self._pass is None:
                self._pass = ("nested", task)  # the enclosing task's hooks may come later
            return
        opened = self._pass
        if opened == ("top", task):
            return  # back from a nested backward: the pass continues
        encloses = opened is not None and opened[0] == "nested" and task < opened[1]
        if not encloses:
            self._check_pass_consistent("start of a backward pass")
        self._pass = ("top", task)
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    def _end_pass(self):
        with self._lock:
            self._pass = None

    def _check_pass_consistent(self, where):
        if not self._ordinal_counts:
            return
        lowest, highest = min(self._ordinal_counts), max(self._ordinal_counts)
        if lowest == highest:
            return
        ahead = [e for e in self._entries if e.ordinal == highest]
        raise RuntimeError(
            f"flora: FloraAccumulator ({where}): {self._names_at(lowest)} received no gradient "
            f"in a backward pass: it has {lowest} micro-batches since the accumulator was "
            f"created or reset, {ahead[0].name} has {highest}, so the two would no longer step "
            f"on the same backward passes. Every parameter the accumulator steps must get a "
            f"gradient in every backward pass: freeze unused parameters (requires_grad_(False)) "
            f"or leave them out (params=...). Parameters already stepped stay stepped; call "
            f"reset() to drop the pending micro-batches and start a fresh cycle.")

    # ------------------------------------------------------------------ cycle checks
    def _check_cycle_complete(self, where):
        self._join_streams()  # overlap_steps: nothing reads a state a step may still write
        with self._lock:
            if not self._entries:
                return
            lowest, highest = min(self._ordinal_counts), max(self._ordinal_counts)
            if lowest != highest:
                raise RuntimeError(
                    f"flora: {where}: {self._names_at(lowest)} received no gradient in some "
                    f"backward pass ({lowest} micro-batches since the accumulator was created "
                    f"or reset, other parameters {highest}), so it was not stepped with the "
                    f"rest. Every parameter FloraAccumulator steps must get a gradient in "
                    f"every backward pass: freeze unused parameters (requires_grad_(False)) or "
                    f"leave them out (params=...); call reset() to start a fresh cycle.")
            pending = self._entries[0].count
            if pending:
                total = (f"{self._micro_batches}" if self._sync is None
                         else "the (not yet signalled)")
                raise RuntimeError(
                    f"flora: {where} called after {pending} of {total} micro-batches of an "
                    f"accumulation cycle: FloraAccumulator steps the parameters in the backward "
                    f"pass of the cycle's last micro-batch, so this call would not step them "
                    f"now. Call it once per micro_batches backward passes (or set "
                    f"micro_batches to what the loop runs), or reset() to drop the pending "
                    f"micro-batches.")

    def reset(self):
        """Drops the micro-batches of the current cycle (parameters already stepped stay
        stepped) and starts a fresh cycle, e.g. after an error in backward."""
        self._join_streams()  # steps of a failed backward pass come before what follows
        with self._lock:
            for e in self._entries:
                e.buffer = None
                e.count = 0
                e.ordinal = 0
            self._ordinal_counts = {0: len(self._entries)} if self._entries else {}
            self._task_seen = None
            self._pass = None
        if self._reducer is not None:
            self._reducer.reset()

    def remove(self):
        """Takes the hooks off; the optimizer's step() steps all parameters again."""
        if not self.active:
            return
        self._check_cycle_complete("FloraAccumulator.remove()")
        for e in self._entries:
            e.handle.remove()
            hooked = _HOOKED.get(id(e.param))
            if hooked is not None and hooked[1]() is self:
                del _HOOKED[id(e.param)]
        owned = getattr(self.optimizer, "_accumulator", None)
        if owned is not None and owned() is self:
            self.optimizer._accumulator = None
        if self._reducer is not None:
            self._reducer.close()
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.reset()  # an error mid-cycle must not be masked by remove()'s check
        self.remove()
        return False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The accumulation seeds (by parameter position in the optimizer), with the
        configuration for reference. Only between optimizer steps: the buffers of a cycle in
        progress are not saved."""
        self._check_cycle_complete("FloraAccumulator.state_dict()")
        return {"micro_batches": self._micro_batches, "rank": self.rank,
                "buffer_dtype": buffer_dtype_name(self.buffer_dtype),
                "seeds": {e.index: e.seed for e in self._entries}}

    def load_state_dict(self, state_dict: dict):
        """Restores the accumulation seeds. micro_batches, rank and buffer_dtype stay as
        constructed."""
        self._check_cycle_complete("FloraAccumulator.load_state_dict()")
        seeds = state_dict.get("seeds") if isinstance(state_dict, dict) else None
        if not isinstance(seeds, dict):
            raise ValueError("flora: FloraAccumulator state_dict must have a 'seeds' dict")
        seeds = {int(k): v for k, v in seeds.items()}
        expected = {e.index for e in self._entries}
        if set(seeds) != expected:
            raise ValueError(f"flora: loaded FloraAccumulator state has seeds for parameter "
                             f"positions {sorted(seeds)}, this accumulator manages "
                             f"{sorted(expected)}")
        for index, seed in seeds.items():
            if not _is_int(seed) or not 0 <= seed <= _MAX_SEED:
                raise ValueError(f"flora: loaded accumulation seed of parameter {index} must "
                                 f"be an int in [0, 2**63), got {seed!r}")
        for e in self._entries:
            e.seed = int(seeds[e.index])

    def __repr__(self):
        k = "sync signal" if self._sync is not None else self._micro_batches
        world = "" if self._reducer is None else f", world_size={self._reducer.world}"
        buffers = "" if self.buffer_dtype == torch.float32 else \
            f", buffer_dtype={self.buffer_dtype}"
        return (f"FloraAccumulator(micro_batches={k}, rank={self.rank}{buffers}, "
                f"params={len(self._entries)}, active={self.active}{world})")


__all__ = ["FloraAccumulator", "down_project", "up_project_add_", "initial_accumulation_seed",
           "ACCUMULATION_SEED_SALT"]
