"""Flora under Hugging Face transformers' Trainer.

Flora from TrainingArguments (``learning_rate``, ``weight_decay``, and Flora's settings in
``optim_args``, e.g. ``"rank=128,kappa=1000,beta1=0.9"``)::

    from flora_ext.integrations.hf import flora_optimizer_cls_and_kwargs
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=flora_optimizer_cls_and_kwargs(args),
                      ...)

Compressed gradient accumulation (FloraAccumulator) in step with Trainer's
``gradient_accumulation_steps``, short last windows of an epoch included::

    add_flora_accumulation(trainer, rank=256)   # needs max_grad_norm=0, see below

Under several processes (torchrun; Trainer wraps the model in DistributedDataParallel) the
accumulator averages the compressed buffers over the processes instead of DDP's all-reduce.

The accumulator steps every parameter in its backward hook during the window's last
backward pass, so no ``p.grad`` is left when Trainer would clip: gradient clipping
(``max_grad_norm > 0``, Trainer's default is 1.0) is refused with an error instead of being
silently skipped. Flora bounds each parameter's update by itself (``clip_threshold``, the RMS
of the update, as in Adafactor). The ``grad_norm`` Trainer logs is replaced by the norm of
the gradients the hooks stepped with.

Imports transformers (and accelerate, which Trainer needs); the rest of flora_ext does not.
"""
from __future__ import annotations

import math
import threading
import warnings
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel

try:
    from accelerate.state import GradientState
    from transformers import Trainer
    from transformers.trainer_callback import ExportableState, TrainerCallback
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("flora_ext.integrations.hf needs Hugging Face transformers and accelerate "
                      "(pip install transformers accelerate); the rest of flora_ext does "
                      "not") from err

from ..accumulation import (BUFFER_DTYPES, FloraAccumulator, _is_int, buffer_dtype_name,
                            check_buffer_dtype, check_overlap_steps, check_step_group_bytes)
from ..optimizer import Flora

# optim_args keys: the Flora argument each sets, and how its value is read.
_INT, _INT_OR_NONE, _FLOAT, _FLOAT_OR_NONE, _BOOL = ("an int", "an int or 'none'", "a float",
                                                      "a float or 'none'", "true or false")
OPTIM_ARGS = {
    "rank": _INT_OR_NONE, "kappa": _INT, "beta1": _FLOAT_OR_NONE,
    "clip_threshold": _FLOAT, "decay_rate": _FLOAT, "eps1": _FLOAT, "eps2": _FLOAT,
    "scale_parameter": _BOOL, "factorize_second_moment": _BOOL, "seed": _INT, "tf32": _BOOL,
    "stochastic_rounding": _BOOL, "reuse_param_norms": _BOOL, "quantization": _BOOL,
    "max_aspect_ratio": _FLOAT_OR_NONE,
}
# Keys that look like Flora's but must come from elsewhere under Trainer.
_ELSEWHERE = {
    "lr": "set TrainingArguments.learning_rate",
    "learning_rate": "set TrainingArguments.learning_rate",
    "weight_decay": "set TrainingArguments.weight_decay",
    "eps": "give its two parts as eps1=...,eps2=...",
    "relative_step": "Trainer's LR scheduler sets lr on every step, which relative_step=True "
                     "excludes; build Flora yourself and pass optimizers=(opt, scheduler)",
    "warmup_init": "it requires relative_step=True (see relative_step)",
}
_DEFAULT_EPS = (1e-30, 1e-3)  # Flora's default (eps1, eps2)


def _parse_value(key, text, kind):
    low = text.lower()
    if kind in (_INT_OR_NONE, _FLOAT_OR_NONE) and low == "none":
        return None
    try:
        if kind == _BOOL:
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if kind in (_INT, _INT_OR_NONE):
            return int(text)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"flora: optim_args {key} must be {kind}, got {text!r}") from None


def parse_optim_args(optim_args: str | None) -> dict:
    """Flora keyword arguments from a TrainingArguments.optim_args string such as
    ``"rank=128,kappa=1000,beta1=0.9"`` (keys: OPTIM_ARGS; ``eps1``/``eps2`` make ``eps``).

    Raises ValueError naming the entry for a malformed entry, an unknown or repeated key, or a
    value of the wrong kind; ranges are checked by Flora itself when it is built."""
    if optim_args is None:
        return {}
    if not isinstance(optim_args, str):
        raise TypeError(f"flora: optim_args must be a string like 'rank=128,kappa=1000', got "
                        f"{type(optim_args).__name__}")
    parsed = {}
    for entry in optim_args.split(","):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, text = (part.strip() for part in entry.partition("="))
        if not sep or not key or not text:
            raise ValueError(f"flora: optim_args entries must look like key=value, got "
                             f"{entry!r} in {optim_args!r}")
        if key in _ELSEWHERE:
            raise ValueError(f"flora: optim_args cannot set {key}: {_ELSEWHERE[key]}")
        if key not in OPTIM_ARGS:
            raise ValueError(f"flora: optim_args key {key!r} is not a Flora setting; known keys: "
                             f"{', '.join(OPTIM_ARGS)}")
        if key in parsed:
            raise ValueError(f"flora: optim_args sets {key} twice in {optim_args!r}")
        parsed[key] = _parse_value(key, text, OPTIM_ARGS[key])
    if "eps1" in parsed or "eps2" in parsed:
        parsed["eps"] = (parsed.pop("eps1", _DEFAULT_EPS[0]), parsed.pop("eps2", _DEFAULT_EPS[1]))
    return parsed


def flora_optimizer_kwargs(args) -> dict:
    """Flora keyword arguments from TrainingArguments: ``lr`` = ``learning_rate``,
    ``weight_decay``, and what ``optim_args`` sets (parse_optim_args)."""
    return {"lr": float(args.learning_rate), "weight_decay": float(args.weight_decay),
            **parse_optim_args(args.optim_args)}


def flora_optimizer_cls_and_kwargs(args) -> tuple[type, dict]:
    """``(Flora, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``. Trainer then builds
    its two parameter groups itself: weight_decay on the weights, 0 on biases and norms."""
    return Flora, flora_optimizer_kwargs(args)


def create_flora_optimizer(model: torch.nn.Module, args) -> Flora:
    """Flora over ``model``'s trainable parameters with Trainer's grouping (weight decay but
    for biases and norms) and flora_optimizer_kwargs(args), e.g. for
    ``Trainer(optimizers=(opt, None))`` or a loop of one's own."""
    kwargs = flora_optimizer_kwargs(args)
    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses only the model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay],
               "weight_decay": kwargs["weight_decay"]},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return Flora([g for g in groups if g["params"]], **kwargs)


def _unwrap_flora(optimizer):
    """The Flora inside Trainer's optimizer (accelerate wraps it in AcceleratedOptimizer)."""
    seen = optimizer
    while seen is not None and not isinstance(seen, Flora):
        seen = getattr(seen, "optimizer", None)
    if seen is None:
        raise TypeError(f"flora: FloraAccumulationCallback needs Trainer's optimizer to be a "
                        f"flora_ext.Flora, got {type(optimizer).__name__}; pass "
                        f"optimizer_cls_and_kwargs=flora_optimizer_cls_and_kwargs(args) to "
                        f"Trainer")
    return seen


class FloraAccumulationCallback(TrainerCallback, ExportableState):
    """Runs Trainer's gradient accumulation through a FloraAccumulator.

    At ``on_train_begin`` it hooks a FloraAccumulator to Trainer's Flora optimizer. The
    accumulation cycles end where Trainer's own do: on the backward pass for which Trainer
    set accelerate's ``sync_gradients`` (every ``gradient_accumulation_steps`` micro-batches,
    and at the last micro-batch of an epoch, so a short last window steps too). Trainer
    scales each micro-batch's loss for the window it belongs to, short or not, so the
    accumulated gradient is the one plain accumulation would give. ``optimizer.step()``,
    which Trainer still calls once per window, only checks that the cycle is complete.

    Arguments:
        rank: rank of the compressed accumulation (FloraAccumulator's ``rank``); None sums
            gradients densely (then the steps are those of plain accumulation).
        log_grad_norm: report as Trainer's ``grad_norm`` the norm of the gradients the hooks
            stepped with (Trainer's own would read 0.0 from the empty ``p.grad``); costs a
            norm per parameter per step, as Trainer's own computation does.
        buffer_dtype: FloraAccumulator's ``buffer_dtype``, the compressed buffers' dtype:
            torch.float32 (default), torch.bfloat16 (half their memory) or torch.uint8 (8-bit
            blockwise, a quarter), or its name ("float32", "bfloat16", "uint8"), which is how
            Trainer's checkpoints record it.
        step_group_bytes: FloraAccumulator's ``step_group_bytes`` (0: one parameter a step
            call; N: the hooks' steps gathered into calls of N bytes of gradients). One
            process.
        overlap_steps: FloraAccumulator's ``overlap_steps`` (CUDA: the hooks' work on a
            second stream, beside the rest of the backward pass). One process.

    Several processes (``torchrun``/``accelerate launch``, Trainer wraps the model in
    DistributedDataParallel): the accumulator takes over DDP's reduction, as
    ``FloraAccumulator(model=ddp_model)`` does (flora_ext.distributed): with ``rank`` set every
    micro-batch is compressed, the compressed buffers are averaged over the processes at the
    window's end and every process takes the same step. The callback finds the DDP model
    through the trainer, so add it with ``add_flora_accumulation(trainer)`` (or pass
    ``trainer=``).

    Refused (ValueError/NotImplementedError at train()): ``max_grad_norm > 0`` (the global
    norm is known only after the last parameter was stepped, so Trainer's clipping cannot
    act: set max_grad_norm=0; Flora's clip_threshold bounds each update), ``fp16`` (the hooks
    would step on scaled gradients: use bf16), several GPUs in one process (DataParallel),
    and several processes whose model is not wrapped in DDP (FSDP, DeepSpeed).
    The accumulation seeds are saved in Trainer's checkpoints (trainer_state.json) and
    restored when training resumes from one.
    """

    def __init__(self, rank: int | None = None, log_grad_norm: bool = True, *,
                 buffer_dtype=torch.float32, step_group_bytes: int = 0,
                 overlap_steps: bool = False, trainer=None):
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise ValueError(f"flora: FloraAccumulationCallback rank must be None (dense "
                             f"accumulation) or an int >= 1, got {rank!r}")
        if not isinstance(log_grad_norm, bool):
            raise TypeError(f"flora: log_grad_norm must be a bool, got {log_grad_norm!r}")
        if isinstance(buffer_dtype, str):  # a checkpoint's JSON holds the name
            buffer_dtype = BUFFER_DTYPES.get(buffer_dtype, buffer_dtype)
        check_buffer_dtype(buffer_dtype, "buffer_dtype")
        check_step_group_bytes(step_group_bytes)
        check_overlap_steps(overlap_steps)
        self.step_group_bytes = int(step_group_bytes)
        self.overlap_steps = overlap_steps
        self.rank = rank
        self.log_grad_norm = log_grad_norm
        self.buffer_dtype = buffer_dtype
        # The trainer whose model_wrapped (the DDP model) multi-process training needs; weak:
        # the trainer holds this callback.
        self._trainer = None if trainer is None else weakref.ref(trainer)
        self.accumulator: FloraAccumulator | None = None
        self.grad_norm: torch.Tensor | None = None  # of the last optimizer step
        self._squares = {}  # device -> sum of squared gradient norms of the current cycle
        self._squares_lock = threading.Lock()
        self._global_step = 0
        self._last_saved = None

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_args(args):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"flora: FloraAccumulationCallback steps each parameter in its backward hook, "
                f"before Trainer would clip, so gradient clipping (max_grad_norm="
                f"{args.max_grad_norm}) cannot act on the gradients; set max_grad_norm=0 in "
                f"TrainingArguments (Flora bounds each update by itself: clip_threshold), or "
                f"leave the callback out to clip with plain accumulation")
        if args.fp16:
            raise ValueError("flora: FloraAccumulationCallback cannot train with fp16=True: the "
                             "hooks step before the GradScaler could unscale the gradients and "
                             "skip steps with inf/nan; use bf16=True or full precision")
        if args.n_gpu > 1:
            raise NotImplementedError(
                f"flora: FloraAccumulationCallback cannot drive {args.n_gpu} GPUs in one process "
                f"(DataParallel): its hooks would step on one replica's gradient; launch one "
                f"process per GPU (torchrun), where Trainer uses DistributedDataParallel")

    def _ddp_model(self, args):
        """The DistributedDataParallel model of a multi-process run (None in one process)."""
        if args.world_size <= 1:
            return None
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise ValueError(
                f"flora: FloraAccumulationCallback in a run of {args.world_size} processes needs "
                f"Trainer's DistributedDataParallel model: add the callback with "
                f"add_flora_accumulation(trainer, ...) or FloraAccumulationCallback(..., "
                f"trainer=trainer)")
        wrapped = trainer.model_wrapped
        if not isinstance(wrapped, DistributedDataParallel):
            raise NotImplementedError(
                f"flora: FloraAccumulationCallback runs in one process or under "
                f"DistributedDataParallel; this run of {args.world_size} processes wraps the "
                f"model in {type(wrapped).__name__} (FSDP and DeepSpeed shard the gradients "
                f"before Flora's hooks could compress them)")
        return wrapped

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        self._check_args(args)
        flora = _unwrap_flora(optimizer)
        ddp = self._ddp_model(args)
        self._release()
        # Across processes every micro-batch is compressed (that is what cuts the all-reduce).
        compress = args.gradient_accumulation_steps > 1 or ddp is not None
        rank = self.rank if compress else None
        gradient_state = GradientState()  # shared with Trainer's accelerator (one state)
        accumulator = FloraAccumulator(flora, rank=rank, model=model if ddp is None else ddp,
                                       buffer_dtype=self.buffer_dtype,
                                       step_group_bytes=self.step_group_bytes,
                                       overlap_steps=self.overlap_steps,
                                       _sync=lambda: bool(gradient_state.sync_gradients))
        if self.log_grad_norm:
            accumulator.grad_observer = self._observe
        self.accumulator = accumulator
        self._squares, self.grad_norm = {}, None
        self._global_step = state.global_step
        if state.global_step > 0:
            self._restore(state)

    def _restore(self, state):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved.get("attributes", {}).get("saved") if isinstance(saved, dict) else None
        if not saved:
            warnings.warn(f"flora: training resumes at step {state.global_step} from a checkpoint "
                          f"without FloraAccumulationCallback's state: the accumulation seeds "
                          f"start afresh", stacklevel=2)
            return
        if saved.get("global_step") != state.global_step:
            raise ValueError(f"flora: the checkpoint holds accumulation seeds of step "
                             f"{saved.get('global_step')!r}, but training resumes at step "
                             f"{state.global_step}")
        self.accumulator.load_state_dict(saved["accumulator"])

    def _observe(self, p, grad):
        square = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        with self._squares_lock:
            before = self._squares.get(grad.device)
            self._squares[grad.device] = square if before is None else before + square

    def on_step_end(self, args, state, control, **kwargs):
        self._global_step = state.global_step
        if self.log_grad_norm:
            with self._squares_lock:
                squares, self._squares = list(self._squares.values()), {}
            if squares:
                total = squares[0]
                for square in squares[1:]:
                    total = total + square.to(total.device)
                self.grad_norm = total.sqrt()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_grad_norm or self.grad_norm is None or logs is None \
                or "grad_norm" not in logs:
            return
        value = self.grad_norm.item()
        logs["grad_norm"] = value
        # Trainer appended a copy of logs to log_history before calling on_log.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and "grad_norm" in last and last.get("step") == state.global_step:
            last["grad_norm"] = value

    def on_train_end(self, args, state, control, **kwargs):
        self._release()

    def _release(self):
        accumulator, self.accumulator = self.accumulator, None
        if accumulator is not None and accumulator.active:
            if accumulator.pending_micro_batches:
                accumulator.reset()  # a stop mid-window drops them, as Trainer does
            else:
                self._last_saved = self._saved(accumulator)
            accumulator.remove()

    def _saved(self, accumulator):
        state = accumulator.state_dict()
        state["seeds"] = {str(k): v for k, v in state["seeds"].items()}  # JSON keys
        return {"global_step": self._global_step, "accumulator": state}

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """The accumulation seeds with the step they belong to (the live accumulator's, or
        those it had when training ended), for Trainer's checkpoints."""
        saved = self._last_saved
        if self.accumulator is not None and self.accumulator.active:
            saved = self._saved(self.accumulator)
        return {"args": {"rank": self.rank, "log_grad_norm": self.log_grad_norm,
                         "buffer_dtype": buffer_dtype_name(self.buffer_dtype),
                         "step_group_bytes": self.step_group_bytes,
                         "overlap_steps": self.overlap_steps},
                "attributes": {"saved": saved}}


def add_flora_accumulation(trainer, rank: int | None = None, log_grad_norm: bool = True, *,
                           buffer_dtype=torch.float32, step_group_bytes: int = 0,
                           overlap_steps: bool = False):
    """Adds a FloraAccumulationCallback in front of ``trainer``'s callbacks (so that every
    logging callback sees the grad_norm it reports) and returns it."""
    callback = FloraAccumulationCallback(rank=rank, log_grad_norm=log_grad_norm,
                                         buffer_dtype=buffer_dtype,
                                         step_group_bytes=step_group_bytes,
                                         overlap_steps=overlap_steps, trainer=trainer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["FloraAccumulationCallback", "OPTIM_ARGS", "add_flora_accumulation",
           "create_flora_optimizer", "flora_optimizer_cls_and_kwargs", "flora_optimizer_kwargs",
           "parse_optim_args"]
