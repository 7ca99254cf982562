"""flora_ext.Flora: torch.optim front end of the flora ops (FLORA.md)."""
from __future__ import annotations

import math
import numbers
import sys
from collections import defaultdict
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter

import torch

from ._ops import next_seed, param_layout

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_SEED = 2**63 - 1
_STATE_TENSORS = ("row_second_moment", "col_second_moment", "second_moment", "momentum")
_MAX_FLOAT = sys.float_info.max
_GRAD = attrgetter("grad")
# What a gradient must share with its parameter (whose layout is always strided).
_META = attrgetter("layout", "dtype", "shape", "device")
# The hyper-parameters but lr, and those of them that decide which state a parameter has.
_HYPER = itemgetter("rank", "kappa", "eps", "clip_threshold", "decay_rate", "beta1",
                    "weight_decay", "scale_parameter", "relative_step", "warmup_init",
                    "factorize_second_moment", "seed", "tf32", "stochastic_rounding")
_LAYOUT = itemgetter("rank", "beta1", "factorize_second_moment")


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_bool(group, name):
    if not isinstance(group[name], bool):
        raise TypeError(f"flora: {name} must be a bool, got {group[name]!r}")


def _validate_group(group):
    """Raises ValueError/TypeError naming the first invalid hyper-parameter."""
    lr, relative_step = group["lr"], group["relative_step"]
    for name in ("scale_parameter", "relative_step", "warmup_init", "factorize_second_moment",
                 "tf32", "stochastic_rounding"):
        _check_bool(group, name)
    if lr is not None:
        if isinstance(lr, torch.Tensor):
            raise TypeError("flora: lr must be a Python float, not a tensor")
        if not _is_number(lr) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"flora: lr must be a finite float >= 0, got {lr!r}")
        if relative_step:
            raise ValueError("flora: lr and relative_step=True are exclusive: relative_step "
                             "computes the step size itself; pass lr=None or relative_step=False")
    elif not relative_step:
        raise ValueError("flora: lr is required unless relative_step=True")
    if group["warmup_init"] and not relative_step:
        raise ValueError("flora: warmup_init=True requires relative_step=True")
    rank = group["rank"]
    if rank is not None and (not _is_int(rank) or rank < 0):
        raise ValueError(f"flora: rank must be None or an int >= 0, got {rank!r}")
    kappa = group["kappa"]
    if not _is_int(kappa) or kappa < 1:
        raise ValueError(f"flora: kappa must be an int >= 1, got {kappa!r}")
    eps = group["eps"]
    if (not isinstance(eps, (tuple, list)) or len(eps) != 2
            or not all(_is_number(e) and math.isfinite(e) and e >= 0 for e in eps)):
        raise ValueError(f"flora: eps must be a pair (eps1, eps2) of finite floats >= 0, "
                         f"got {eps!r}")
    clip = group["clip_threshold"]
    if not _is_number(clip) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"flora: clip_threshold must be a finite float > 0, got {clip!r}")
    decay = group["decay_rate"]
    if not _is_number(decay) or not math.isfinite(decay) or decay > 0:
        raise ValueError(f"flora: decay_rate must be a finite float <= 0, got {decay!r}")
    beta1 = group["beta1"]
    if beta1 is not None and (not _is_number(beta1) or not 0.0 <= beta1 < 1.0):
        raise ValueError(f"flora: beta1 must be None or a float in [0, 1), got {beta1!r}")
    wd = group["weight_decay"]
    if not _is_number(wd) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"flora: weight_decay must be a finite float >= 0, got {wd!r}")
    seed = group["seed"]
    if not _is_int(seed) or not 0 <= seed <= _MAX_SEED // 2:
        raise ValueError(f"flora: seed must be an int in [0, 2**62], got {seed!r}")


def _lr_ok(group):
    """Whether lr passes _validate_group, for a group whose other settings do: a quick
    check for the one setting that LR schedulers change on every step."""
    lr = group["lr"]
    if group["relative_step"]:
        return lr is None
    return type(lr) is float and 0.0 <= lr <= _MAX_FLOAT  # NaN and inf fail


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
                 "steps", "seeds", "batches", "norms", "written")


# What tells that a parameter is as a step left it: its version counter (every in-place
# write through p or a view of it advances it) and its memory (``p.data = x`` does not).
_VERSION = attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _written(params):
    return list(map(_VERSION, params)), list(map(_DATA_PTR, params))


def _pick(xs, index):
    return xs if index is None else [xs[i] for i in index]


def _layout(p, group):
    return param_layout(p.shape, group["rank"], group["beta1"], group["factorize_second_moment"])


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


class Flora(torch.optim.Optimizer):
    """Adafactor whose first moment is kept compressed by a resampled random projection.

    Constructor and defaults follow flora-opt's ``Flora``, so replacing
    ``flora_opt.Flora(...)`` by ``flora_ext.Flora(...)`` is the whole migration.
    See README.md for the arguments and FLORA.md for the math.
    """

    def __init__(self, params, lr=None, rank=None, kappa=1000, eps=(1e-30, 1e-3),
                 clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                 scale_parameter=True, relative_step=False, warmup_init=False,
                 factorize_second_moment=True, seed=0, quantization=False, *, tf32=True,
                 stochastic_rounding=False, reuse_param_norms=True):
        if quantization:
            raise NotImplementedError(
                "flora: quantization=True (8-bit optimizer states) is not implemented yet; "
                "use quantization=False")
        defaults = dict(lr=lr, rank=rank, kappa=kappa, eps=tuple(eps) if isinstance(eps, list) else eps,
                        clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init,
                        factorize_second_moment=factorize_second_moment, seed=seed,
                        tf32=tf32, stochastic_rounding=stochastic_rounding)
        _validate_group(defaults)
        if not isinstance(reuse_param_norms, bool):
            raise TypeError(f"flora: reuse_param_norms must be a bool, got {reuse_param_norms!r}")
        # CUDA steps keep sum(p^2) of the parameters they write and use it for the next
        # step's RMS(p) unless p was written since (version counter, data pointer); off:
        # RMS(p) is read from p every step (for code that writes p.data between steps).
        self.reuse_param_norms = reuse_param_norms
        super().__init__(params, defaults)
        # id(group) -> the _Plan of its last successful step(); a plan holds its group, so
        # the id cannot be reused by another group while the plan is kept.
        self._plans = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("reuse_param_norms", True)
        self._plans = {}

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group)
            for p in group["params"]:
                _refuse_fsdp1_param(p)
                if p.dtype not in _SUPPORTED_DTYPES:
                    raise TypeError(f"flora: parameters must be float32, float16 or bfloat16, "
                                    f"got a parameter of dtype {p.dtype}")
                if p.layout != torch.strided:
                    raise TypeError(f"flora: parameters must be dense tensors, got {p.layout}")
                if group["stochastic_rounding"] and p.dtype == torch.float16:
                    raise ValueError("flora: stochastic_rounding supports bfloat16 (and float32, "
                                     "where it does nothing) parameters, got a float16 parameter "
                                     f"of shape {tuple(p.shape)}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _param_number(self, param):
        """1-based position of ``param`` over all groups: its seed offset (FLORA.md)."""
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
            state[name] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        if compressed:
            state["seed"] = group["seed"] + self._param_number(p)

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
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        accumulator = self._owning_accumulator()
        if accumulator is not None:
            accumulator._check_cycle_complete("optimizer.step()")
        # Check everything first, so that a bad input changes nothing. What the last step
        # checked and nothing has changed since (_Plan) is not checked again.
        checked = []
        for group in self.param_groups:
            plan = self._plans.get(id(group))
            if plan is None or not _same(_HYPER(group), plan.hyper) or not _lr_ok(group):
                _validate_group(group)
            params, grads = self._stepped(group, accumulator)
            # The first op call checks every tensor itself before it writes anything, so
            # the first group's reused plan (one call: one device) leaves the per-tensor
            # comparisons to it; a later group's call would come after a write.
            trusted = not checked and plan is not None and len(plan.batches) == 1
            if not self._reusable(plan, group, params, grads, compare_meta=not trusted):
                plan, trusted = None, False
                self._check_inputs(group, params, grads)
            checked.append((group, params, grads, plan, trusted))
        work = [(plan or self._new_plan(group, params), grads, trusted)
                for group, params, grads, plan, trusted in checked]
        for plan, grads, trusted in work:
            # Kept only once the step succeeded: a failed op may have stepped a part.
            self._plans.pop(id(plan.group), None)
            try:
                self._run_plan(plan, grads)
            except RuntimeError:
                if trusted:  # the op refused its inputs: the error Python would have raised
                    self._check_inputs(plan.group, plan.params, grads, suppress_context=True)
                raise
            self._plans[id(plan.group)] = plan
        if len(self._plans) > len(self.param_groups):  # groups were removed
            self._plans = {id(plan.group): plan for plan, _, _ in work}
        return loss

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
                self._check_grad(p, grad)
                state = self.state[p]
                if state:
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
        group = self._group_of(p)
        _validate_group(group)
        self._check_inputs(group, [p], [grad])
        self._run_plan(self._new_plan(group, [p], norms=False), [grad])

    def _new_plan(self, group, params, norms=True):
        """The plan of stepping ``params`` of ``group``, checked; initialises missing state.
        With ``norms`` (and reuse_param_norms, scale_parameter, CUDA) each op call gets a
        vector for the kernels to keep sum(p^2) in between steps."""
        for p in params:
            state = self.state[p]
            if not state:
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
        eps1, eps2 = group["eps"]
        kappa = group["kappa"]
        hyper_parameters = dict(
            lr=float(group["lr"] or 0.0), beta1=float(group["beta1"] or 0.0),
            eps1=float(eps1), eps2=float(eps2), clip_threshold=float(group["clip_threshold"]),
            decay_rate=float(group["decay_rate"]), weight_decay=float(group["weight_decay"]),
            rank=int(group["rank"] or 0), kappa=int(kappa),
            scale_parameter=group["scale_parameter"], relative_step=group["relative_step"],
            warmup_init=group["warmup_init"],
            factorize_second_moment=group["factorize_second_moment"], tf32=group["tf32"],
            stochastic_rounding=group["stochastic_rounding"])
        steps = [step + 1 for step in plan.steps]
        for b, (index, flat_states, compressed) in enumerate(plan.batches):
            params = _pick(plan.params, index)
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
                torch.ops.flora.step_group_(params, _pick(grads, index), flat_states,
                                            _pick(steps, index), _pick(seeds, index),
                                            param_norms=norms, norms_known=known,
                                            **hyper_parameters)
                # The op writes p in place without bumping its version: as read before.
                plan.written[b] = now
            else:
                torch.ops.flora.step_group_(params, _pick(grads, index), flat_states,
                                            _pick(steps, index), _pick(seeds, index),
                                            **hyper_parameters)
            for k in range(len(steps)) if index is None else index:
                states[k]["step"] = steps[k]
            for k in compressed:
                if steps[k] % kappa == 0:
                    seeds[k] = states[k]["seed"] = next_seed(seeds[k])
        plan.steps = steps
        # A list eps can change in place: then () that nothing matches, checked every step.
        plan.hyper = () if isinstance(group["eps"], list) else _HYPER(group)
        plan.values = list(chain.from_iterable(map(dict.values, states)))

    def _check_state(self, p, group, state, where="state"):
        """Raises ValueError when ``state`` does not fit ``p`` under ``group``."""
        shapes, compressed = _expected_state_shapes(p, group)
        expected_keys = {"step", *shapes, *(("seed",) if compressed else ())}
        if set(state) != expected_keys:
            raise ValueError(
                f"flora: {where} of a parameter of shape {tuple(p.shape)} has keys "
                f"{sorted(state)}, expected {sorted(expected_keys)} (rank={group['rank']}, "
                f"beta1={group['beta1']}, factorize_second_moment="
                f"{group['factorize_second_moment']})")
        if not _is_int(state["step"]) or state["step"] < 0:
            raise ValueError(f"flora: {where} step must be an int >= 0, got {state['step']!r}")
        if compressed and (not _is_int(state["seed"]) or not 0 <= state["seed"] <= _MAX_SEED):
            raise ValueError(f"flora: {where} seed must be an int in [0, 2**63), "
                             f"got {state['seed']!r}")
        for name, shape in shapes.items():
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"flora: {where} {name} of a parameter of shape "
                                 f"{tuple(p.shape)} must have shape {shape}, got {got}")
            if not t.is_floating_point():
                raise ValueError(f"flora: {where} {name} must be a float tensor, got {t.dtype}")

    def load_state_dict(self, state_dict):
        """Loads a state_dict after checking that it fits these parameters.

        State tensors stay float32 (torch.optim's default would cast them to the
        parameter dtype) and move to each parameter's device; nothing changes when
        the check fails.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"flora: loaded state_dict has {len(saved_groups)} parameter "
                             f"groups, this optimizer has {len(self.param_groups)}")
        id_to_param, id_to_group = {}, {}
        new_groups = []
        for k, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"flora: loaded parameter group {k} has "
                                 f"{len(saved['params'])} parameters, this optimizer's has "
                                 f"{len(group['params'])}")
            new_group = {**self.defaults, **{key: v for key, v in saved.items() if key != "params"},
                         "params": group["params"]}
            if isinstance(new_group.get("eps"), list):
                new_group["eps"] = tuple(new_group["eps"])
            _validate_group(new_group)
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
            state = dict(saved_state)
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = int(state["step"].item())
            self._check_state(p, group, state, where=f"loaded state of parameter {saved_id}")
            new_state[p] = {key: (v.to(device=p.device, dtype=torch.float32, copy=True)
                                  if isinstance(v, torch.Tensor) else v)
                            for key, v in state.items()}
        self.__setstate__({"state": new_state, "param_groups": new_groups})


def state_bytes(optimizer) -> int:
    """Total bytes of the tensors held in ``optimizer.state``."""
    return sum(t.numel() * t.element_size()
               for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
