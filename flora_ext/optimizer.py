"""flora_ext.Flora: torch.optim front end of the flora ops (docs/FLORA.md)."""
from __future__ import annotations

import math
import sys
import weakref
from collections import defaultdict
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter

import torch

from . import _dcp, _quantized, _sharded
from ._ops import (cuda_compiled, next_seed, param_layout, register_compiled_plan,
                   step_group_compiled_)
from ._param_groups import as_param_group
from .hyperparams import BY_NAME as _BY_NAME
from .hyperparams import MAX_INT64
from .hyperparams import DEFAULTS as _DEFAULT
from .hyperparams import GROUP_HYPER_PARAMETERS as _GROUP_HYPER_PARAMETERS
from .hyperparams import is_int as _is_int
from .hyperparams import validate_defaults as _validate_defaults
from .hyperparams import validate_group as _validate_group

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_SEED = MAX_INT64  # the ops take seeds as int64
_STATE_TENSORS = ("row_second_moment", "col_second_moment", "second_moment", "momentum")
_MAX_FLOAT = sys.float_info.max
_GRAD = attrgetter("grad")
# What a gradient must share with its parameter (whose layout is always strided).
_META = attrgetter("layout", "dtype", "shape", "device")
_STRIDE = torch.Tensor.stride
# Flora's own state_dict groups hold these; a group without all of them is another optimizer's.
_FLORA_GROUP_KEYS = ("kappa", "clip_threshold", "decay_rate")
_FLORA_STATE_KEYS = frozenset(("step", "seed", *_STATE_TENSORS, *_quantized.STATE_KEYS))


def _self_overlapping(t):
    """Whether some elements of ``t`` share memory (an expanded tensor); 2 is 'too hard to
    tell', which the kernels handle (they write such a tensor through a contiguous copy)."""
    return torch._debug_has_internal_overlap(t) == 1
# The hyper-parameters but lr, and those of them that decide which state a parameter has.
_HYPER_KEYS = ("rank", "kappa", "eps", "clip_threshold", "decay_rate", "beta1",
               "weight_decay", "scale_parameter", "relative_step", "warmup_init",
               "factorize_second_moment", "seed", "tf32", "stochastic_rounding",
               "skip_nonfinite", "projection", "max_aspect_ratio", "capturable")
_HYPER = itemgetter(*_HYPER_KEYS)
_LAYOUT = itemgetter("rank", "beta1", "factorize_second_moment", "max_aspect_ratio")


def _check_param(p, group):
    """Raises TypeError/ValueError when the op would refuse ``p`` itself: checked at
    add_param_group and again before a step, since ``p.data = x`` can change any of it."""
    if p.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"flora: parameters must be float32, float16 or bfloat16, "
                        f"got a parameter of dtype {p.dtype} (shape {tuple(p.shape)})")
    if p.layout != torch.strided:
        raise TypeError(f"flora: parameters must be dense tensors, got {p.layout}")
    if _self_overlapping(p):
        raise ValueError(f"flora: a parameter must not have elements that share memory, got "
                         f"one of shape {tuple(p.shape)} with strides {p.stride()} (an "
                         f"expanded tensor?); give it its own memory, e.g. "
                         f"nn.Parameter(t.contiguous())")
    if group["stochastic_rounding"] and p.dtype == torch.float16:
        raise ValueError("flora: stochastic_rounding supports bfloat16 (and float32, "
                         "where it does nothing) parameters, got a float16 parameter "
                         f"of shape {tuple(p.shape)}")


def _lr_ok(group):
    """Whether lr passes _validate_group, for a group whose other settings do: a quick
    check for the one setting that LR schedulers change on every step."""
    lr = group["lr"]
    if group["relative_step"]:
        return lr is None
    return type(lr) is float and 0.0 <= lr <= _MAX_FLOAT  # NaN and inf fail


def _hyper_key(group):
    """What a later step compares with _hyper_unchanged: the group's hyper-parameters but lr,
    or () when eps is a list, which can change in place (then nothing matches: checked every
    step)."""
    return () if isinstance(group["eps"], list) else _HYPER(group)


def _hyper_unchanged(group, key):
    """Whether ``group`` still has the checked hyper-parameters ``key`` (_hyper_key) and an lr
    that passes validation, so that it need not be validated again."""
    return _same(_HYPER(group), key) and _lr_ok(group)


def _clear_fresh(fresh):
    """Empties the states a failed step made and did not step, so that the parameters keep
    no state they never had (a fresh capturable state: not capturing)."""
    for state in fresh:
        if state.get("step") == 0:
            state.clear()


def _same(xs, ys):
    """Whether two sequences hold the very same objects: no __eq__ (tensors compare
    elementwise), and a replaced object never passes for an equal one."""
    return len(xs) == len(ys) and all(map(is_, xs, ys))


class _Plan:
    """One group's checked step(), reused by the next step() of the group while nothing it
    was checked against can have changed: the same hyper-parameters (lr aside: _lr_ok), the
    same parameters with the same metadata, and state dicts holding the same keys and the
    very objects (tensors, step and seed ints) that this plan's last step left there. The
    checks compare identities, so any replacement, load_state_dict included, is re-checked.
    """
    __slots__ = ("group", "hyper", "layout", "params", "meta", "states", "keys", "values",
                 "strides", "state_meta",
                 "steps", "seeds", "batches", "norms", "written")


# What tells that a parameter is as a step left it: its version counter (every in-place
# write through p or a view of it advances it) and its memory (``p.data = x`` does not).
_VERSION = attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _written(params):
    return list(map(_VERSION, params)), list(map(_DATA_PTR, params))


def _state_signature(plan):
    """The data pointers and strides of a plan's state tensors: t.data = x changes one of
    them unless x is a view of t's own memory with t's strides (another dtype or a shorter
    slice: not re-checked; the first group's op still checks it)."""
    return ([(_DATA_PTR(t), _STRIDE(t))
             for _, flat_states, _ in plan.batches for t in flat_states]
            + [(_DATA_PTR(state[key]), _STRIDE(state[key]))  # quantization=True
               for state in plan.states for key in _quantized.STATE_KEYS if key in state])


def _pick(xs, index):
    return xs if index is None else [xs[i] for i in index]


def _layout(p, group):
    return param_layout(p.shape, group["rank"], group["beta1"], group["factorize_second_moment"],
                        group["max_aspect_ratio"])


def _expected_state_shapes(p, group):
    """The tensors (name -> shape) a parameter's state holds, and whether it has a seed."""
    layout = _layout(p, group)
    shapes = {}
    if layout["factored"]:
        shapes["row_second_moment"] = (p.shape[0],)
        shapes["col_second_moment"] = (p.shape[1],)
    else:
        shapes["second_moment"] = tuple(p.shape)
    if layout["momentum"] != "none":
        shapes["momentum"] = tuple(layout["momentum_shape"])
    return shapes, layout["momentum"] == "compressed"


def _refuse_fsdp1_param(p):
    """FSDP1 (FullyShardedDataParallel) hands the optimizer 1-D flat parameters (or, with
    use_orig_params=True, 1-D views of them), where Flora can neither factor the second
    moment nor project the momentum: it would silently run as unfactored Adafactor with
    AdamW's memory. torch marks such tensors _is_flat_param / _fsdp_flattened."""
    if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
        raise TypeError(
            f"flora: got a parameter (shape {tuple(p.shape)}) flattened by FSDP1 "
            f"(FullyShardedDataParallel); Flora needs each weight matrix with its own shape "
            f"to factor and project it. Shard the model with FSDP2 "
            f"(torch.distributed.fsdp.fully_shard) instead, or use DistributedDataParallel")


def _refuse_sharded_skip(group):
    """FSDP2 groups step in flora_ext._sharded, where each rank holds a shard of a
    gradient: a skip would need every rank's verdict (one more all-reduce), not built."""
    if group["skip_nonfinite"]:
        raise ValueError("flora: skip_nonfinite=True is not supported for FSDP2 (DTensor) "
                         "parameters; use skip_nonfinite=False for them")


# capturable=True keeps each parameter's step count and seed in 0-d int64 tensors on its
# device, which the op advances; the state_dict converts them as load_state_dict needs.
_COUNTERS = ("step", "seed")
# Workspaces kept per capturable group (one a device and set of stepped parameters): a
# captured CUDA graph reads the tables in the one its capture used. At most this many sets
# of several parameters a group (the parameters with a gradient can change between steps).
_MAX_WORKSPACES = 8
_WARM_UP = ("flora: capturable=True: a CUDA graph can capture opt.step() once every parameter "
            "has stepped eagerly with capturable=True (a warm-up step on a side stream, as "
            "torch.cuda.graph's examples do); this one has no device step count yet")


def _counters_to_tensors(state, device):
    for key in _COUNTERS:
        value = state.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            state[key] = torch.full((), value, dtype=torch.int64, device=device)


def _counters_to_ints(state):
    for key in _COUNTERS:
        value = state.get(key)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_floating_point() and key == "seed":
                raise ValueError(f"flora: state {key} must be an int or a one-element int64 "
                                 f"tensor, got a {value.dtype} tensor of shape "
                                 f"{tuple(value.shape)}")
            state[key] = int(value.item())


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _CapturableRun:
    """A capturable group's parameters to step (no plan: the op keeps one per workspace)."""
    __slots__ = ("group", "params")

    def __init__(self, group, params):
        self.group, self.params = group, list(params)


def _op_hyper_parameters(group):
    """The keyword arguments of step_group_ for a checked ``group``."""
    eps1, eps2 = group["eps"]
    lr = group["lr"]  # a Tensor (capturable) goes to the op as lr_tensor
    return dict(
        lr=0.0 if lr is None or isinstance(lr, torch.Tensor) else float(lr),
        beta1=float(group["beta1"] or 0.0),
        eps1=float(eps1), eps2=float(eps2), clip_threshold=float(group["clip_threshold"]),
        decay_rate=float(group["decay_rate"]), weight_decay=float(group["weight_decay"]),
        rank=int(group["rank"] or 0), kappa=int(group["kappa"]),
        scale_parameter=group["scale_parameter"], relative_step=group["relative_step"],
        warmup_init=group["warmup_init"],
        factorize_second_moment=group["factorize_second_moment"], tf32=group["tf32"],
        stochastic_rounding=group["stochastic_rounding"],
        skip_nonfinite=group["skip_nonfinite"], projection=group["projection"],
        max_aspect_ratio=float(group["max_aspect_ratio"] or 0.0))


class Flora(torch.optim.Optimizer):
    """Adafactor whose first moment is kept compressed by a resampled random projection.

    Constructor and defaults follow flora-opt's ``Flora``, so replacing
    ``flora_opt.Flora(...)`` by ``flora_ext.Flora(...)`` is the whole migration.
    See README.md for the arguments and docs/FLORA.md for the math.
    """

    def __init__(self, params, lr=_DEFAULT["lr"], rank=_DEFAULT["rank"], kappa=_DEFAULT["kappa"],
                 eps=_DEFAULT["eps"], clip_threshold=_DEFAULT["clip_threshold"],
                 decay_rate=_DEFAULT["decay_rate"], beta1=_DEFAULT["beta1"],
                 weight_decay=_DEFAULT["weight_decay"], scale_parameter=_DEFAULT["scale_parameter"],
                 relative_step=_DEFAULT["relative_step"], warmup_init=_DEFAULT["warmup_init"],
                 factorize_second_moment=_DEFAULT["factorize_second_moment"],
                 seed=_DEFAULT["seed"], quantization=_DEFAULT["quantization"], *,
                 tf32=_DEFAULT["tf32"], stochastic_rounding=_DEFAULT["stochastic_rounding"],
                 skip_nonfinite=_DEFAULT["skip_nonfinite"],
                 projection=_DEFAULT["projection"],
                 max_aspect_ratio=_DEFAULT["max_aspect_ratio"],
                 capturable=_DEFAULT["capturable"],
                 reuse_param_norms=_DEFAULT["reuse_param_norms"]):
        # The arguments and their defaults: flora_ext/hyperparams.py.
        _BY_NAME["quantization"].validate(quantization)
        # 8-bit momentum and unfactored second moments (flora_ext/_quantized.py); set
        # before super().__init__, whose add_param_group reads it.
        self.quantization = quantization
        arguments = locals()
        defaults = {hp.name: arguments[hp.name] for hp in _GROUP_HYPER_PARAMETERS}
        if isinstance(eps, list):
            defaults["eps"] = tuple(eps)
        # lr may be left to the param groups: each is checked with these merged into it.
        _validate_defaults(defaults)
        if not isinstance(reuse_param_norms, bool):
            raise TypeError(f"flora: reuse_param_norms must be a bool, got {reuse_param_norms!r}")
        # CUDA steps keep sum(p^2) of the parameters they write and use it for the next
        # step's RMS(p) unless p was written since (version counter, data pointer); off:
        # RMS(p) is read from p every step (for code that writes p.data between steps).
        self.reuse_param_norms = reuse_param_norms
        # skip_nonfinite's counters of skipped parameter-steps: device -> int64 tensor of
        # one element there, incremented by the kernels (nonfinite_skips).
        self._nonfinite_skips = {}
        # ParamGroup: "momentum" is beta1's second name, for OneCycleLR/CyclicLR.
        super().__init__(params, as_param_group(defaults))
        # id(group) -> the _Plan of its last successful step(); a plan holds its group, so
        # the id cannot be reused by another group while the plan is kept.
        self._plans = {}
        # id(group) -> (group, its _HYPER) as step_param() last validated them (() when eps
        # is a list, which can change in place: validated every call).
        self._param_hyper = {}
        # (ids of the parameters) -> the _Plan of the last successful _step_params call on
        # them (it holds them); id(p) -> the key of the plan that holds p, so that a parameter
        # is in one kept plan at most (FloraAccumulator's gathered calls may regroup).
        self._param_plans = {}
        self._param_plan_key = {}
        # id(group) -> (group, the projection its last step() or step_param() stepped with):
        # compressed momentum is in that basis (_refuse_basis_change).
        self._stepped_projection = {}
        # The torch.compile'd step's _CompiledStep (_prepare_compiled), or None.
        self._compiled = None
        self._prepare_compiled_once = _compile_preparer(self)
        # capturable groups: id(group) -> (group, {(device, parameter ids): workspace})
        self._workspaces = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("reuse_param_norms", True)
        self.__dict__.setdefault("_nonfinite_skips", {})
        self.__dict__.setdefault("quantization", False)
        self.defaults = as_param_group(self.defaults)
        self.param_groups = [as_param_group(g) for g in self.param_groups]
        self._plans = {}
        self._param_hyper = {}
        self._param_plans = {}
        self._param_plan_key = {}
        self._stepped_projection = {}
        self._compiled = None
        self._prepare_compiled_once = _compile_preparer(self)  # a copy is another optimizer
        self._workspaces = {}
        self._group_count = len(self.param_groups)

    def add_param_group(self, param_group):
        if isinstance(param_group, dict):
            param_group = as_param_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group, index=len(self.param_groups) - 1)
            for p in group["params"]:
                _refuse_fsdp1_param(p)
                _check_param(p, group)
            _sharded.check_group(group)  # FSDP2 (DTensor) parameters: what _sharded steps
            if _sharded.has_dtensors(group):
                _refuse_sharded_skip(group)
            if self.quantization and _sharded.has_dtensors(group):
                raise TypeError("flora: quantization=True supports plain tensor parameters, "
                                "not FSDP2 (DTensor) ones; use quantization=False with FSDP2")
            if self.quantization and group["capturable"]:
                raise ValueError("flora: capturable=True is not supported with "
                                 "quantization=True (the 8-bit step runs in chunks planned "
                                 "on the host); pass one of them as False")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._group_count = len(self.param_groups)  # what the compiled step checks

    @property
    def nonfinite_skips(self):
        """How many parameter-steps skip_nonfinite=True skipped (a parameter whose gradient
        held a NaN or inf): an int64 0-d tensor, on the parameters' device, counted there by
        the kernels without a host sync; ``.item()`` syncs, when you choose to read it. With
        parameters on several devices, the sum on the first one's device. A copy, made when
        read; not part of state_dict (it counts events of this optimizer object)."""
        counters = list(self._nonfinite_skips.values())
        if not counters:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            device = first.device if first is not None else "cpu"
            return torch.zeros((), dtype=torch.int64, device=device)
        total = counters[0].clone().view(())
        for counter in counters[1:]:
            total += counter.to(total.device).view(())
        return total

    def _skip_counter(self, group, device):
        """The counter the op increments for ``group``'s parameters on ``device``, or None
        without skip_nonfinite."""
        if not group["skip_nonfinite"]:
            return None
        counter = self._nonfinite_skips.get(device)
        if counter is None:
            counter = self._nonfinite_skips[device] = torch.zeros(
                1, dtype=torch.int64, device=device)
        return counter

    def _param_number(self, param):
        """1-based position of ``param`` over all groups: its seed offset (docs/FLORA.md)."""
        for number, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups), 1):
            if p is param:
                return number
        raise KeyError("flora: parameter not in this optimizer")

    def _check_grad(self, p, grad=None):
        grad = p.grad if grad is None else grad
        if grad.is_sparse or grad.layout != torch.strided:
            raise TypeError(f"flora: sparse gradients are not supported (parameter of shape "
                            f"{tuple(p.shape)} has a {grad.layout} gradient)")
        if grad.is_complex():
            raise TypeError(f"flora: complex gradients are not supported, got {grad.dtype}")
        if grad.dtype != p.dtype:
            raise TypeError(f"flora: grad dtype {grad.dtype} differs from its parameter's "
                            f"{p.dtype}")
        if grad.shape != p.shape:
            raise ValueError(f"flora: grad shape {tuple(grad.shape)} differs from its "
                             f"parameter's {tuple(p.shape)}")
        if grad.device != p.device:
            raise ValueError(f"flora: grad is on {grad.device} but its parameter is on "
                             f"{p.device}")

    def _init_state(self, p, group, state):
        shapes, compressed = _expected_state_shapes(p, group)
        state["step"] = 0
        for name, shape in shapes.items():
            if self.quantization and name in _quantized.SIGNED:
                state[name], state[_quantized.ABSMAX[name]] = _quantized.zeros(
                    name, shape, p.device)
            else:
                state[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        if compressed:
            state["seed"] = group["seed"] + self._param_number(p)
        if group["capturable"]:
            _counters_to_tensors(state, p.device)

    def _owning_accumulator(self):
        """The live FloraAccumulator that steps some of these parameters in backward hooks."""
        ref = getattr(self, "_accumulator", None)
        accumulator = ref() if ref is not None else None
        return accumulator if accumulator is not None and accumulator.active else None

    def _group_of(self, param):
        """The parameter group holding ``param`` (a cached lookup, rebuilt when groups change)."""
        signature = tuple((id(g), len(g["params"])) for g in self.param_groups)
        lookup = getattr(self, "_group_lookup", None)
        if lookup is None or lookup[0] != signature:
            lookup = (signature, {id(p): (p, g) for g in self.param_groups for p in g["params"]})
            self._group_lookup = lookup
            self._param_plans = {}  # the groups changed: a kept plan may hold a removed parameter
            self._param_plan_key = {}
        hit = lookup[1].get(id(param))
        if hit is None or hit[0] is not param:
            raise ValueError(f"flora: parameter of shape {tuple(param.shape)} is not in this "
                             f"optimizer")
        return hit[1]

    @torch.no_grad()
    def step(self, closure=None):
        """One Flora step for every parameter with a gradient; returns closure's loss.

        Parameters managed by a FloraAccumulator are stepped in its backward hooks, not
        here: for them this call only checks that the accumulation cycle is complete (see
        flora_ext.accumulation) and raises when it is not or when it would step them twice.

        ``torch.compile(opt.step, fullgraph=True)`` traces one graph and keeps it while the
        step count, seeds and hyper-parameters change (LR schedulers included); it traces
        again when the parameters, which of them have a gradient, the groups or the state
        tensors (load_state_dict) change. Results are those of the eager step, and the two
        can be mixed. Not under torch.compile: a closure, a FloraAccumulator, FSDP2.
        """
        if torch.compiler.is_compiling():
            return self._compiled_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif _dcp.init_state_if_checkpoint_step(self):  # zero grads, lr 0, no state yet
            return None
        accumulator = self._owning_accumulator()
        if accumulator is not None:
            accumulator._check_cycle_complete("optimizer.step()")
        # Check everything first, so that a bad input changes nothing. What the last step
        # checked and nothing has changed since (_Plan) is not checked again.
        checked = []
        sharded = []  # FSDP2 (DTensor) groups: stepped on each rank's shard by _sharded
        for index, group in enumerate(self.param_groups):
            if group["capturable"]:
                _validate_group(group, index)
                if _sharded.has_dtensors(group):
                    raise RuntimeError(
                        "flora: capturable=True is not supported for FSDP2 (DTensor) "
                        "parameters; pass capturable=False")
                params, grads = self._stepped(group, accumulator)
                self._check_inputs(group, params, grads)
                checked.append((group, params, grads, None, False))
                continue
            if _sharded.has_dtensors(group):
                _validate_group(group, index)
                _refuse_sharded_skip(group)
                sharded.append(_sharded.prepare(self, group, *self._stepped(group, accumulator)))
                continue
            plan = self._plans.get(id(group))
            if plan is None or not _hyper_unchanged(group, plan.hyper):
                self._check_changed_group(group, index)
            params, grads = self._stepped(group, accumulator)
            # The first op call checks every tensor itself before it writes anything, so
            # the first group's reused plan (one call: one device) leaves the per-tensor
            # comparisons to it; a later group's call would come after a write.
            # (With quantization=True the op sees a chunk at a time: Python checks all.)
            trusted = (not checked and plan is not None and len(plan.batches) == 1
                       and not self.quantization)
            if not self._reusable(plan, group, params, grads, compare_meta=not trusted):
                plan, trusted = None, False
                self._check_inputs(group, params, grads)
            checked.append((group, params, grads, plan, trusted))
        fresh = []  # states this call initialises: emptied again unless they were stepped
        try:
            work = [(self._capturable_run(group, params, fresh) if group["capturable"]
                     else plan or self._new_plan(group, params, fresh=fresh), grads, trusted)
                    for group, params, grads, plan, trusted in checked]
            for group, params, _, _, _ in checked:  # made before the first write, as state
                for device in {p.device for p in params}:
                    self._skip_counter(group, device)
            stepped = 0
            for plan, grads, trusted in work:
                # Kept only once the step succeeded: a failed op may have stepped a part.
                self._plans.pop(id(plan.group), None)
                try:
                    if type(plan) is _CapturableRun:
                        self._run_capturable(plan, grads)
                        stepped += 1
                        continue
                    self._run_plan(plan, grads)
                    self._stepped_projection[id(plan.group)] = (plan.group,
                                                                plan.group["projection"])
                except RuntimeError as err:
                    if trusted:  # the op refused its inputs: the error Python would have raised
                        self._check_inputs(plan.group, plan.params, grads, suppress_context=True)
                    if stepped and hasattr(err, "add_note"):
                        # Only a fault at run time (out of memory...) gets here: the checks
                        # ran for every group first. What ran is not undone.
                        err.add_note(f"flora: this step() had already stepped the first "
                                     f"{stepped} of its {len(work)} parameter groups")
                    raise
                self._plans[id(plan.group)] = plan
                stepped += 1
            for run in sharded:
                run()
        except BaseException:  # e.g. out of memory while making state or inside an op
            _clear_fresh(fresh)
            raise
        if len(self._plans) > len(self.param_groups):  # groups were removed
            self._plans = {id(plan.group): plan for plan, _, _ in work
                           if type(plan) is not _CapturableRun}
        if len(self._workspaces) > len(self.param_groups):
            live = set(map(id, self.param_groups))
            self._workspaces = {k: v for k, v in self._workspaces.items() if k in live}
        return loss

    def _compiled_step(self, closure):
        """step() as torch.compile traces it: a graph of one step_group_compiled_ call.

        What step() checks is checked when the step is traced (_prepare_compiled), and again
        by the op where it can change without torch.compile noticing (hyper-parameters). The
        graph reads the parameters, their gradients (whether each is None) and the state
        tensors (from self.state, on every call), and torch.compile traces again when their
        metadata changes. The step counts,
        seeds and hyper-parameters (lr from an LR scheduler...) are Python values that the op
        reads when it runs, not the graph, so none of them causes another trace.
        """
        if closure is not None:
            raise RuntimeError(
                "flora: step(closure) is not supported under torch.compile; call the closure "
                "(forward and backward) before the compiled opt.step()")
        if self.quantization:
            raise RuntimeError(
                "flora: torch.compile of opt.step() does not support quantization=True (its "
                "step dequantizes and requantizes the 8-bit states around the op); step "
                "eagerly, or compile a Flora with quantization=False")
        self._prepare_compiled_once()
        compiled = self._compiled
        # The traced code reads no param group: torch.compile's handling of self.param_groups
        # (OptimizerVariable) does not take Flora's dict-subclass groups, and torch 2.11's
        # Dynamo guards on every value of a group it reads (lr included: a recompile per
        # scheduler step). An int that add_param_group keeps makes an added group trace again.
        if self._group_count != len(compiled.plans):
            raise RuntimeError("flora: the parameter groups changed while opt.step() was traced")
        params = []
        for plan in compiled.plans:
            params += [p for p in plan.group_params if p.grad is not None]
        state = self.state
        states = [state[p][name] for p in params for name in _STATE_TENSORS if name in state[p]]
        if params:
            step_group_compiled_(params, [p.grad for p in params], states, compiled.handle)
        return None

    def _prepare_compiled(self):
        accumulator = self._owning_accumulator()
        if accumulator is not None:
            raise RuntimeError(
                "flora: torch.compile of opt.step() is not supported while a FloraAccumulator "
                "steps this optimizer's parameters in backward hooks; step eagerly, or "
                "compile opt.step() of a Flora without an accumulator")
        if any(map(_sharded.has_dtensors, self.param_groups)):
            raise RuntimeError(
                "flora: torch.compile of opt.step() supports plain tensor parameters, not "
                "FSDP2 (DTensor) ones; step an FSDP2 model's optimizer eagerly")
        _refuse_compile_capturable(self.param_groups)
        work = []
        for group in self.param_groups:  # every check before any state is made
            _validate_group(group)
            params, grads = self._stepped(group, None)
            self._check_inputs(group, params, grads)
            if len({p.device for p in params}) > 1:
                raise RuntimeError(
                    "flora: torch.compile of opt.step() needs the stepped parameters of a "
                    "group on one device; put each group's parameters on one device")
            work.append((group, params))
        plans = []
        for group, params in work:
            for p in params:
                if not self.state[p]:
                    self._init_state(p, group, self.state[p])
            device = params[0].device if params else None
            keep = (self.reuse_param_norms and group["scale_parameter"]
                    and device is not None and device.type == "cuda")
            norms = torch.zeros(len(params), dtype=torch.float64, device=device) if keep else None
            plans.append(_CompiledPlan(group, list(params), self.state, norms,
                                       self._skip_counter))
        self._compiled = _CompiledStep(plans)
        self._plans = {}

    def _stepped(self, group, accumulator):
        """The parameters of ``group`` that step() steps (those with a gradient, but the
        accumulator's), and their gradients."""
        params = group["params"]
        grads = list(map(_GRAD, params))
        if accumulator is None and not any(map(is_, grads, repeat(None))):
            return params, grads
        kept = []
        for p, grad in zip(params, grads):
            if accumulator is not None and accumulator.manages(p):
                if grad is not None:
                    raise RuntimeError(
                        f"flora: optimizer.step() would step {accumulator.describe(p)} "
                        f"twice: FloraAccumulator already steps it in its backward hook, "
                        f"yet it has a .grad (set outside backward?). Set p.grad = None, "
                        f"or call accumulator.remove() to step it with optimizer.step()")
            elif grad is not None:
                kept.append((p, grad))
        return [p for p, _ in kept], [grad for _, grad in kept]

    def _check_inputs(self, group, params, grads, suppress_context=False):
        """Raises TypeError/ValueError for the first gradient or state that does not fit."""
        try:
            for p, grad in zip(params, grads):
                _check_param(p, group)
                self._check_grad(p, grad)
                state = self.state.get(p)  # no empty entry for a parameter never stepped
                if state:
                    self._match_counters(p, group, state)
                    self._check_state(p, group, state)
        except (TypeError, ValueError) as err:
            if suppress_context:
                raise err from None
            raise

    def _reusable(self, plan, group, params, grads, compare_meta=True):
        """Whether ``plan`` still holds for these parameters and gradients: everything
        _check_grad and _check_state would look at is as it was at the plan's last step
        (the parameters' and gradients' metadata only with ``compare_meta``)."""
        if (plan is None or not _same(_LAYOUT(group), plan.layout)
                or not _same(params, plan.params)):
            return False
        if compare_meta:
            meta = list(map(_META, params))
            if meta != plan.meta or list(map(_META, grads)) != meta:
                return False  # (plan.meta is as the plan was made: stale only conservatively)
            # p.data = x and t.data = x change what the op checks under the same objects:
            # strides (self-overlap) of the parameters, everything of the state tensors.
            if (list(map(_STRIDE, params)) != plan.strides
                    or _state_signature(plan) != plan.state_meta):
                return False
        states = list(map(self.state.__getitem__, params))
        return (_same(states, plan.states) and list(chain.from_iterable(states)) == plan.keys
                and _same(list(chain.from_iterable(map(dict.values, states))), plan.values))

    @torch.no_grad()
    def step_param(self, p, grad=None):
        """One Flora step for the single parameter ``p`` with ``grad`` (default ``p.grad``).

        The same kernels as step() (a one-parameter step_group_ call), for layer-wise
        stepping: ``p``'s state and hyper-parameters are those of its group. Raises for a
        parameter a FloraAccumulator owns (it steps that one itself).
        """
        accumulator = self._owning_accumulator()
        if accumulator is not None and accumulator.manages(p):
            raise RuntimeError(f"flora: step_param() would step {accumulator.describe(p)} "
                               f"twice: FloraAccumulator steps it in its backward hook")
        self._step_param(p, grad)

    @torch.no_grad()
    def _step_param(self, p, grad=None):
        grad = p.grad if grad is None else grad
        if grad is None:
            raise ValueError(f"flora: step_param() needs a gradient: the parameter of shape "
                             f"{tuple(p.shape)} has p.grad None and no grad was given")
        self._step_params(self._group_of(p), [p], [grad])

    def _step_params(self, group, params, grads):
        """One step_group_ call for ``params`` (all of ``group``) with ``grads``: a
        parameter a call from step_param(), a few from FloraAccumulator(step_group_bytes=...)."""
        # A FloraAccumulator calls this from its hooks: the group's hyper-parameters are
        # validated again only when one of them is another object than last time (as step()).
        checked = self._param_hyper.get(id(group))
        same_hyper = (checked is not None and checked[0] is group
                      and _hyper_unchanged(group, checked[1]))
        if not same_hyper:
            self._check_changed_group(group, next(k for k, g in enumerate(self.param_groups)
                                             if g is group))
            self._param_hyper[id(group)] = (group, _hyper_key(group))
        if _sharded.has_dtensors(group):
            _refuse_sharded_skip(group)
            return _sharded.step(self, group, list(params), list(grads))
        # The parameters' plan from their last call, when nothing it was checked against has
        # changed (as step()'s plans: the same objects, metadata and state).
        key = tuple(id(p) for p in params)
        plan = self._param_plans.pop(key, None)
        if not (same_hyper and plan is not None and plan.group is group
                and self._reusable(plan, group, params, grads)):
            plan = None
            self._check_inputs(group, params, grads)
        fresh = []
        try:
            if group["capturable"]:
                self._run_capturable(self._capturable_run(group, params, fresh), grads)
            else:
                plan = plan or self._new_plan(group, params, norms=False, fresh=fresh)
                self._run_plan(plan, grads)
                self._keep_param_plan(key, plan)  # kept only once the step succeeded
                self._stepped_projection[id(group)] = (group, group["projection"])
        except BaseException:
            _clear_fresh(fresh)
            raise

    def _keep_param_plan(self, key, plan):
        """Keeps ``plan`` for the parameters of ``key``, dropping any other kept plan that
        holds one of them: as many kept plans as parameters at most."""
        for pid in key:
            old = self._param_plan_key.get(pid)
            if old is not None and old != key:
                self._param_plans.pop(old, None)
            self._param_plan_key[pid] = key
        self._param_plans[key] = plan

    def _match_counters(self, p, group, state):
        """Puts the step count and seed of ``state`` where ``group`` steps them: device
        tensors when capturable (not while capturing: a CUDA graph needs them beforehand),
        else ints (a .item() read each)."""
        if not group["capturable"]:
            if any(isinstance(state.get(key), torch.Tensor) for key in _COUNTERS):
                _counters_to_ints(state)
        elif any(not isinstance(state.get(key), torch.Tensor) for key in _COUNTERS
                 if key in state):
            if _capturing():
                raise RuntimeError(_WARM_UP)
            _counters_to_tensors(state, p.device)

    def _check_changed_group(self, group, index):
        """The checks of a group whose hyper-parameters changed since they were last checked:
        validate_group and a projection changed under compressed momentum."""
        _validate_group(group, index)
        self._refuse_basis_change(group, index)

    def _refuse_basis_change(self, group, index):
        """Compressed momentum holds coordinates in the basis of the projection it was
        stepped with (docs/FLORA.md §5.1): a group whose ``projection`` changed since its
        last step() or step_param() would read it in the other basis."""
        last = self._stepped_projection.get(id(group))
        if last is None or last[0] is not group or group["projection"] == last[1]:
            return
        stepped_with = last[1]
        if any("seed" in self.state.get(p, {}) for p in group["params"]):
            raise ValueError(
                f"flora: param group {index} has projection={group['projection']!r}, but its "
                f"compressed momentum was stepped with projection={stepped_with!r} and holds "
                f"coordinates in that basis; set projection back to {stepped_with!r}, or start "
                f"the momentum afresh (a new optimizer)")

    def _capturable_run(self, group, params, fresh):
        for p in params:
            state = self.state[p]
            if not state:
                if _capturing():
                    raise RuntimeError(_WARM_UP)
                fresh.append(state)
                self._init_state(p, group, state)
        return _CapturableRun(group, params)

    def _run_capturable(self, run, grads):
        """One step_group_capturable_ call a device: the step counts and seeds are the
        state's device tensors, which the op advances without reading them on the host."""
        group = run.group
        hyper_parameters = _op_hyper_parameters(group)
        del hyper_parameters["skip_nonfinite"]  # refused with capturable=True (hyperparams)
        del hyper_parameters["projection"]  # likewise but the Gaussian
        if isinstance(group["lr"], torch.Tensor):
            hyper_parameters["lr_tensor"] = group["lr"]
        kept = self._workspaces.get(id(group))
        if kept is None or kept[0] is not group:
            kept = self._workspaces[id(group)] = (group, {})
        workspaces = kept[1]
        by_device = {}
        for k, p in enumerate(run.params):
            by_device.setdefault(p.device, []).append(k)
        for device, index in by_device.items():
            params = [run.params[k] for k in index]
            states = [self.state[p] for p in params]
            key = (device, tuple(map(id, params)))
            workspace = workspaces.get(key)
            if workspace is None:
                # One a parameter for step_param (FloraAccumulator's hooks), kept; at most
                # _MAX_WORKSPACES sets of several (step()'s), the oldest dropped first.
                sets = [k for k in workspaces if len(k[1]) > 1]
                if len(params) > 1 and len(sets) >= _MAX_WORKSPACES:
                    workspaces.pop(sets[0])
                workspace = workspaces[key] = torch.empty(0, dtype=torch.float32,
                                                          device=device)
                if device.type == "cuda" and cuda_compiled():  # the op keeps its plan till then
                    weakref.finalize(workspace, torch.ops.flora.forget_capturable,
                                     workspace.untyped_storage()._cdata)
            torch.ops.flora.step_group_capturable_(
                params, [grads[k] for k in index],
                [state[name] for state in states for name in _STATE_TENSORS if name in state],
                [state["step"] for state in states],
                [state["seed"] for state in states if "seed" in state], workspace,
                **hyper_parameters)

    def _new_plan(self, group, params, norms=True, fresh=None):
        """The plan of stepping ``params`` of ``group``, checked; initialises missing state
        (and lists those states in ``fresh``). With ``norms`` (and reuse_param_norms,
        scale_parameter, CUDA) each op call gets a vector for the kernels to keep sum(p^2)
        in between steps."""
        for p in params:
            state = self.state[p]
            if not state:
                if fresh is not None:
                    fresh.append(state)
                self._init_state(p, group, state)
        plan = _Plan()
        plan.group, plan.layout, plan.params = group, _LAYOUT(group), list(params)
        plan.meta = list(map(_META, params))
        plan.states = states = [self.state[p] for p in params]
        plan.keys = list(chain.from_iterable(states))
        plan.steps = [state["step"] for state in states]
        plan.seeds = [state.get("seed", 0) for state in states]
        # One op call per device: the kernels are launched from C++. Each call takes its
        # parameters' state tensors in one flat list (ops.h: step_group_).
        by_device = {}
        for k, p in enumerate(params):
            by_device.setdefault(p.device, []).append(k)
        plan.batches = [(None if len(by_device) == 1 else index,
                         [states[k][name] for k in index for name in _STATE_TENSORS
                          if name in states[k]],
                         [k for k in index if "seed" in states[k]])
                        for index in by_device.values()]
        keep = norms and self.reuse_param_norms and group["scale_parameter"]
        plan.norms = [torch.zeros(len(index), dtype=torch.float64, device=device)
                      if keep and device.type == "cuda" else None
                      for device, index in by_device.items()]
        plan.written = [None] * len(plan.batches)  # nothing is known before the first call
        return plan

    def _run_plan(self, plan, grads):
        """The op calls of a checked plan, then the step counts and seeds they advance."""
        group, states, seeds = plan.group, plan.states, plan.seeds
        kappa = group["kappa"]
        hyper_parameters = _op_hyper_parameters(group)
        steps = [step + 1 for step in plan.steps]
        for b, (index, flat_states, compressed) in enumerate(plan.batches):
            params = _pick(plan.params, index)
            skips = self._skip_counter(group, params[0].device)
            norms = plan.norms[b]
            if norms is not None:
                # Known: p is what the last call wrote (and left the sum of in norms).
                last, now = plan.written[b], _written(params)
                if last is None:
                    known = []
                elif last == now:
                    known = [1] * len(params)
                else:
                    known = [int(v0 == v1 and d0 == d1)
                             for v0, v1, d0, d1 in zip(last[0], now[0], last[1], now[1])]
                plan.written[b] = None  # until this call has succeeded
                self._step_group(params, _pick(grads, index), flat_states,
                                 _pick(steps, index), _pick(seeds, index), hyper_parameters,
                                 _pick(states, index), norms, known, skips)
                # The op writes p in place without bumping its version: as read before.
                plan.written[b] = now
            else:
                self._step_group(params, _pick(grads, index), flat_states,
                                 _pick(steps, index), _pick(seeds, index), hyper_parameters,
                                 _pick(states, index), skips=skips)
            for k in range(len(steps)) if index is None else index:
                states[k]["step"] = steps[k]
            for k in compressed:
                if steps[k] % kappa == 0:
                    seeds[k] = states[k]["seed"] = next_seed(seeds[k])
        plan.steps = steps
        plan.hyper = _hyper_key(group)
        plan.values = list(chain.from_iterable(map(dict.values, states)))
        plan.strides = list(map(_STRIDE, plan.params))
        plan.state_meta = _state_signature(plan)

    def _step_group(self, params, grads, flat_states, steps, seeds, hyper_parameters,
                    states, norms=None, known=(), skips=None):
        """One step_group_ call, or with quantization=True the calls over 8-bit states."""
        if self.quantization:
            _quantized.step_group(params, grads, states, _STATE_TENSORS, steps, seeds,
                                  hyper_parameters, norms, known, skips=skips)
        else:  # (param_norms=None, norms_known=[]: the op's defaults, no norm cache)
            torch.ops.flora.step_group_(params, grads, flat_states, steps, seeds,
                                        param_norms=norms, norms_known=list(known),
                                        nonfinite_skips=skips, **hyper_parameters)

    def _check_state(self, p, group, state, where="state", counters_as_ints=False):
        """Raises ValueError when ``state`` does not fit ``p`` under ``group``."""
        shapes, compressed = _expected_state_shapes(p, group)
        expected_keys = {"step", *shapes, *(("seed",) if compressed else ())}
        quantized = {}  # name -> shape of its absmax
        if self.quantization:
            quantized = {_quantized.ABSMAX[name]: (_quantized.blocks(math.prod(shape)),)
                         for name, shape in shapes.items() if name in _quantized.SIGNED}
            expected_keys |= set(quantized)
        elif any(key in state for key in _quantized.STATE_KEYS):
            raise ValueError(
                f"flora: {where} of a parameter of shape {tuple(p.shape)} is 8-bit state "
                f"(keys {sorted(state)}), made with quantization=True; this optimizer has "
                f"quantization=False: construct Flora(..., quantization=True) to use it")
        if set(state) != expected_keys:
            raise ValueError(
                f"flora: {where} of a parameter of shape {tuple(p.shape)} has keys "
                f"{sorted(state)}, expected {sorted(expected_keys)} (rank={group['rank']}, "
                f"beta1={group['beta1']}, factorize_second_moment="
                f"{group['factorize_second_moment']}, max_aspect_ratio="
                f"{group['max_aspect_ratio']})")
        if group["capturable"] and not counters_as_ints:
            # The values are checked where they come from (load_state_dict, _init_state):
            # reading them here would wait for the device.
            for key in ("step", "seed") if compressed else ("step",):
                t = state[key]
                if (not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 0
                        or t.device != p.device):
                    got = (f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
                           if isinstance(t, torch.Tensor) else repr(t))
                    raise ValueError(f"flora: {where} {key} of a capturable=True group must be "
                                     f"a 0-d int64 tensor on {p.device}, got {got}")
        else:
            if not _is_int(state["step"]) or state["step"] < 0:
                raise ValueError(f"flora: {where} step must be an int >= 0, "
                                 f"got {state['step']!r}")
            if compressed and (not _is_int(state["seed"])
                               or not 0 <= state["seed"] <= _MAX_SEED):
                raise ValueError(f"flora: {where} seed must be an int in [0, 2**63), "
                                 f"got {state['seed']!r}")
        for name, shape in (*shapes.items(), *quantized.items()):
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"flora: {where} {name} of a parameter of shape "
                                 f"{tuple(p.shape)} must have shape {shape}, got {got}")
            if self.quantization and name in _quantized.SIGNED:
                if t.dtype != torch.uint8:
                    raise ValueError(f"flora: {where} {name} must be uint8 (8-bit codes, "
                                     f"quantization=True), got {t.dtype}")
            elif t.dtype != torch.float32:
                raise ValueError(f"flora: {where} {name} must be float32, got {t.dtype}")
            if t.device != p.device:
                raise ValueError(f"flora: {where} {name} must be on {p.device} like its "
                                 f"parameter, got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"flora: {where} {name} must be contiguous, got strides "
                                 f"{t.stride()}")
            if t is p:
                raise ValueError(f"flora: {where} {name} must not be the parameter itself")

    def load_state_dict(self, state_dict):
        """Loads a state_dict after checking that it fits these parameters.

        State tensors stay float32 (torch.optim's default would cast them to the
        parameter dtype), contiguous, on each parameter's device; nothing changes when
        the check fails. Hooks registered with register_load_state_dict_pre_hook and
        register_load_state_dict_post_hook run as for torch.optim's optimizers.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"flora: state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()  # shallow, as torch.optim: pre-hooks may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        new_state, new_groups = self._checked_state_dict(state_dict)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checked_state_dict(self, state_dict):
        """The (state, param_groups) that load_state_dict sets, built without changing
        anything; raises when ``state_dict`` does not fit."""
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError(f"flora: state_dict must have 'state' and 'param_groups', "
                             f"got keys {sorted(map(str, state_dict))}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"flora: loaded state_dict has {len(saved_groups)} parameter "
                             f"groups, this optimizer has {len(self.param_groups)}")
        foreign_state = sorted({str(key) for saved_state in state_dict["state"].values()
                                for key in saved_state} - _FLORA_STATE_KEYS)
        foreign_group = [key for key in _FLORA_GROUP_KEYS
                         if any(key not in saved for saved in saved_groups)]
        if foreign_state or foreign_group:
            what = (f"its state has keys {foreign_state}" if foreign_state
                    else f"its param_groups lack {foreign_group}")
            raise ValueError(f"flora: this is not a flora_ext.Flora state_dict ({what}); "
                             f"Flora.load_state_dict takes what Flora.state_dict() returned")
        id_to_param, id_to_group = {}, {}
        new_groups = []
        for k, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"flora: loaded parameter group {k} has "
                                 f"{len(saved['params'])} parameters, this optimizer's has "
                                 f"{len(group['params'])}")
            new_group = {**self.defaults, **{key: v for key, v in saved.items() if key != "params"},
                         "params": group["params"]}
            if "projection" not in saved and new_group["projection"] != "gaussian" and any(
                    "seed" in state_dict["state"].get(i, {}) for i in saved["params"]):
                # Saved before the option: compressed momentum in the Gaussian basis.
                raise ValueError(
                    f"flora: loaded parameter group {k} has no 'projection' (saved before the "
                    f"option existed), so its compressed momentum is in the Gaussian basis; "
                    f"this group's projection is {new_group['projection']!r}: load it into a "
                    f"Flora with projection='gaussian'")
            # Where the step counts live is this optimizer's choice, not the saved one's; a
            # Tensor lr (capturable) is a float without it, and on the parameters' device.
            new_group["capturable"] = group["capturable"]
            lr = new_group.get("lr")
            if isinstance(lr, torch.Tensor):
                if not group["capturable"]:
                    new_group["lr"] = float(lr.item()) if lr.numel() == 1 else lr
                elif group["params"]:
                    new_group["lr"] = lr.to(group["params"][0].device, copy=True)
            if "param_names" in group and "param_names" not in saved:
                new_group["param_names"] = group["param_names"]  # as torch.optim keeps them
            if isinstance(new_group.get("eps"), list):
                new_group["eps"] = tuple(new_group["eps"])
            _validate_group(new_group, k)
            new_groups.append(new_group)
            for saved_id, p in zip(saved["params"], group["params"]):
                id_to_param[saved_id] = p
                id_to_group[saved_id] = new_group
        new_state = defaultdict(dict)
        for saved_id, saved_state in state_dict["state"].items():
            if saved_id not in id_to_param:
                raise ValueError(f"flora: loaded state refers to parameter {saved_id!r}, "
                                 f"which no loaded parameter group lists")
            p, group = id_to_param[saved_id], id_to_group[saved_id]
            if not saved_state:  # a parameter not stepped yet (its entry was read): as torch
                new_state[p] = {}
                continue
            where = f"loaded state of parameter {saved_id}"
            state = dict(saved_state)
            _counters_to_ints(state)  # (saved by a capturable Flora: device tensors)
            if _sharded.has_dtensors(group):  # placed as the FSDP2 step keeps it
                self._check_state(p, group, state, where=where, counters_as_ints=True)
                new_state[p] = _sharded.load_state(p, group, state)
                continue
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    if key in _quantized.SIGNED and _quantized.ABSMAX[key] in state:
                        if v.dtype != torch.uint8:  # 8-bit codes: kept as they are
                            raise ValueError(f"flora: {where} {key} must be uint8 (8-bit "
                                             f"codes, as {_quantized.ABSMAX[key]} says), "
                                             f"got {v.dtype}")
                        state[key] = v.to(device=p.device, memory_format=torch.contiguous_format,
                                          copy=True)
                        continue
                    if not v.is_floating_point():
                        hint = (f" ({key}_absmax is missing)" if key in _quantized.SIGNED
                                and v.dtype == torch.uint8 else "")
                        raise ValueError(f"flora: {where} {key} must be a float tensor"
                                         f"{hint}, got {v.dtype}")
                    state[key] = v.to(device=p.device, dtype=torch.float32,
                                      memory_format=torch.contiguous_format, copy=True)
            if self.quantization:
                self._quantize_loaded(p, group, state)
            self._check_state(p, group, state, where=where, counters_as_ints=True)
            if group["capturable"]:
                _counters_to_tensors(state, p.device)
            new_state[p] = state
        return new_state, new_groups

    @staticmethod
    def _quantize_loaded(p, group, state):
        """quantization=True loading float32 state (of quantization=False): the momentum
        and unfactored second moment are quantized on purpose, so that a float32
        checkpoint resumes with 8-bit state (docs/FLORA.md §11). Only tensors of the
        expected shape; _check_state names the others."""
        shapes, _ = _expected_state_shapes(p, group)
        for name, signed in _quantized.SIGNED.items():
            t = state.get(name)
            if (name in shapes and _quantized.ABSMAX[name] not in state
                    and isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and tuple(t.shape) == shapes[name]):
                state[name], state[_quantized.ABSMAX[name]] = _quantized.quantize(name, t)

    def __getstate__(self):
        # torch.optim's keeps defaults, state and param_groups only.
        return {**super().__getstate__(), "reuse_param_norms": self.reuse_param_norms,
                "_nonfinite_skips": self._nonfinite_skips, "quantization": self.quantization}


def _layout_key(group):
    """What of a group's settings decides which state its parameters have (param_layout)."""
    return (int(group["rank"] or 0), (group["beta1"] or 0.0) > 0.0,
            bool(group["factorize_second_moment"]), group["max_aspect_ratio"])


class _CompiledPlan:
    """One group's part of a compiled step: its stepped parameters, their state tensors
    flat as step_group_ takes them, and what its check at trace time assumed."""
    __slots__ = ("group", "group_params", "params", "state", "states", "compressed", "layout",
                 "hyper", "norms", "written", "skip_counter")

    def __init__(self, group, params, state, norms, skip_counter):
        self.group = group
        self.group_params = list(group["params"])  # what the traced code reads, not the group
        self.params = params
        self.state = state  # the optimizer's: its entries are looked up when the op runs
        param_states = [state[p] for p in params]
        self.states = [state[name] for state in param_states
                       for name in _STATE_TENSORS if name in state]
        self.compressed = [k for k, state in enumerate(param_states) if "seed" in state]
        self.layout = _layout_key(group)
        self.hyper = _hyper_key(group)
        self.norms = norms  # as _Plan.norms: sum(p^2) kept between CUDA steps, or None
        self.written = None
        self.skip_counter = skip_counter  # Flora._skip_counter

    def check(self):
        """Raises for a hyper-parameter that the eager step would refuse (or that would
        need another state than the one traced)."""
        group = self.group
        if not _hyper_unchanged(group, self.hyper):
            _validate_group(group)
            _refuse_compile_capturable([group])
            if _layout_key(group) != self.layout:
                raise RuntimeError(
                    f"flora: a parameter group's (rank, beta1 > 0, factorize_second_moment, "
                    f"max_aspect_ratio) "
                    f"changed from {self.layout} to {_layout_key(group)} since torch.compile "
                    f"traced opt.step(), which changes the state its parameters need; keep "
                    f"them, or step eagerly")
            self.hyper = _hyper_key(group)

    def run(self, params, grads, states):
        group = self.group
        if not self.params:
            return
        param_states = list(map(self.state.__getitem__, self.params))
        steps = [state["step"] + 1 for state in param_states]
        seeds = [state.get("seed", 0) for state in param_states]
        skips = self.skip_counter(group, params[0].device)
        if self.norms is None:
            torch.ops.flora.step_group_(params, grads, states, steps, seeds,
                                        nonfinite_skips=skips, **_op_hyper_parameters(group))
        else:  # as Flora._run_plan
            last, now = self.written, _written(params)
            if last is None or last[2] != steps:
                # (another step, e.g. an eager one, wrote p since: without a version bump)
                known = []
            elif last[:2] == now:
                known = [1] * len(params)
            else:
                known = [int(v0 == v1 and d0 == d1)
                         for v0, v1, d0, d1 in zip(last[0], now[0], last[1], now[1])]
            self.written = None
            torch.ops.flora.step_group_(params, grads, states, steps, seeds,
                                        param_norms=self.norms, norms_known=known,
                                        nonfinite_skips=skips, **_op_hyper_parameters(group))
            self.written = (*now, [step + 1 for step in steps])
        kappa = group["kappa"]
        for state, step in zip(param_states, steps):
            state["step"] = step
        for k in self.compressed:
            if steps[k] % kappa == 0:
                param_states[k]["seed"] = next_seed(seeds[k])


class _CompiledStep:
    """The plans of a compiled step, and the handle by which its op finds them; ``states``
    is the flat state tensor list the op is traced with (the graph reads it from
    opt.state)."""
    __slots__ = ("plans", "states", "handle", "__weakref__")

    def __init__(self, plans):
        self.plans = plans
        self.states = [t for plan in plans for t in plan.states]
        self.handle = register_compiled_plan(self)

    def run(self, params, grads, states):
        """What the compiled step's op does: every group's checks, then every group's
        step_group_ on its slice of the tensors the graph passed."""
        for plan in self.plans:
            plan.check()
        p0 = s0 = 0
        for done, plan in enumerate(self.plans):
            p1, s1 = p0 + len(plan.params), s0 + len(plan.states)
            try:
                plan.run(params[p0:p1], grads[p0:p1], states[s0:s1])
            except RuntimeError as err:
                if done and hasattr(err, "add_note"):  # as step(): a fault at run time
                    err.add_note(f"flora: this step() had already stepped the first {done} "
                                 f"of its {len(self.plans)} parameter groups")
                raise
            p0, s0 = p1, s1


def _refuse_compile_capturable(groups):
    if any(group["capturable"] for group in groups):
        raise RuntimeError(
            "flora: torch.compile of opt.step() does not take capturable=True groups; capture "
            "the eager opt.step() in a CUDA graph instead (docs/cuda.md), or compile a Flora "
            "with capturable=False")


def _compile_preparer(optimizer):
    """The function torch.compile runs (not the compiled code) when it traces Flora.step:
    it checks what step() would check and makes the _CompiledStep that the traced code
    reads, so that one trace serves every later step. It takes no arguments, since
    assume_constant_result needs constant ones (the optimizer is not one to Dynamo)."""
    ref = weakref.ref(optimizer)

    @torch._dynamo.assume_constant_result
    def prepare_compiled():
        ref()._prepare_compiled()
        return 0

    return prepare_compiled


def state_bytes(optimizer) -> int:
    """Total bytes of the tensors held in ``optimizer.state``."""
    return sum(t.numel() * t.element_size()
               for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
