"""flora_ext.FloraAccelerator: Hugging Face accelerate's Accelerator with Flora's compressed
gradient accumulation and layer-wise steps (a drop-in for flora-opt's FloraAccelerator).

Imported on first access of ``flora_ext.FloraAccelerator``; needs ``accelerate``.
"""
from __future__ import annotations

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError as err:  # pragma: no cover - exercised only without accelerate
    raise ImportError("flora_ext.FloraAccelerator needs Hugging Face accelerate "
                      "(pip install accelerate); the rest of flora_ext does not") from err

import torch
from torch.nn.parallel import DistributedDataParallel

from .accumulation import (FloraAccumulator, _is_int, check_buffer_dtype, check_overlap_steps,
                           check_step_group_bytes)
from .optimizer import Flora


class FloraAccelerator(Accelerator):
    """An ``accelerate.Accelerator`` whose prepared Flora optimizers step in backward hooks.

    Same use as flora-opt's::

        accelerator = flora_ext.FloraAccelerator(accumulation_compression_rank=256,
                                                 gradient_accumulation_steps=4)
        model, opt = accelerator.prepare(model, flora_ext.Flora(model.parameters(), ...))
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model, batch))
                opt.step()          # steps nothing itself: checks the cycle at sync steps
                opt.zero_grad()

    ``prepare_optimizer`` attaches a FloraAccumulator to each Flora optimizer. Its cycles
    end where accelerate's ``sync_gradients`` is True (every ``gradient_accumulation_steps``
    micro-batches, and at the end of the data loader), so a short last window steps too.
    Gradients are compressed with rank ``accumulation_compression_rank`` when it is set and
    ``gradient_accumulation_steps > 1``; otherwise they are summed densely (with one step per
    micro-batch, that is flora-opt's layer-wise mode); ``accumulation_buffer_dtype``
    (torch.float32, torch.bfloat16 or torch.uint8) is the accumulators' ``buffer_dtype``,
    ``step_group_bytes`` and ``overlap_steps`` theirs (one process). ``accelerator.backward``
    divides the loss by ``gradient_accumulation_steps``, so the step sees the mean gradient,
    as with a plain Accelerator. The accumulation seeds are registered for ``save_state`` /
    ``load_state``. No fp16 GradScaler (bf16 or fp32): the steps happen inside backward,
    before a scaler could act on the gradients. For the same reason ``clip_grad_norm_`` /
    ``clip_grad_value_`` raise for the hooked parameters rather than find no gradient and
    silently clip nothing.

    Several processes (``accelerate launch``, MULTI_GPU or MULTI_CPU): the accumulator takes
    over the prepared DistributedDataParallel model's reduction (flora_ext.distributed): each
    rank compresses every micro-batch (whenever ``accumulation_compression_rank`` is set),
    and at each sync step the compressed buffers are averaged over the processes and every
    rank takes the same step. FSDP and DeepSpeed are refused.
    """

    def __init__(self, accumulation_compression_rank: int | None = None, *args,
                 accumulation_buffer_dtype: torch.dtype = torch.float32,
                 step_group_bytes: int = 0, overlap_steps: bool = False, **kwargs):
        if accumulation_compression_rank is not None and (
                not _is_int(accumulation_compression_rank) or accumulation_compression_rank < 1):
            raise ValueError(f"flora: accumulation_compression_rank must be None or an int >= "
                             f"1, got {accumulation_compression_rank!r}")
        check_buffer_dtype(accumulation_buffer_dtype, "accumulation_buffer_dtype")
        check_step_group_bytes(step_group_bytes)
        check_overlap_steps(overlap_steps)
        super().__init__(*args, **kwargs)
        self.step_group_bytes = int(step_group_bytes)
        self.overlap_steps = overlap_steps
        self.accumulation_compression_rank = accumulation_compression_rank
        self.accumulation_buffer_dtype = accumulation_buffer_dtype
        self.flora_accumulators: list[FloraAccumulator] = []
        self._flora_ddp_models: list[DistributedDataParallel] = []

    @property
    def accumulation_compression(self) -> bool:
        """Whether prepared optimizers accumulate compressed gradients."""
        return (self.accumulation_compression_rank is not None
                and self.gradient_accumulation_steps > 1)

    def prepare_model(self, model, *args, **kwargs):
        prepared = super().prepare_model(model, *args, **kwargs)
        if isinstance(prepared, DistributedDataParallel):
            # accelerate keeps the unwrapped model in _models: the DDP is remembered here
            self._flora_ddp_models.append(prepared)
        return prepared

    def prepare_optimizer(self, optimizer, device_placement=None):
        if getattr(optimizer, "_is_accelerate_prepared", False):
            return super().prepare_optimizer(optimizer, device_placement)
        if not isinstance(optimizer, Flora):
            raise TypeError(f"flora: FloraAccelerator prepares flora_ext.Flora optimizers, got "
                            f"{type(optimizer).__name__}; use accelerate.Accelerator for others")
        ddp = None
        if self.distributed_type != DistributedType.NO or self.num_processes > 1:
            ddp = self._flora_ddp_model(optimizer)
        if self.scaler is not None:
            raise ValueError("flora: FloraAccelerator cannot use fp16 mixed precision: the "
                             "steps run inside backward, before the GradScaler could unscale "
                             "the gradients and skip steps with inf/nan; use "
                             "mixed_precision='bf16' or 'no'")
        compress = self.accumulation_compression or (
            ddp is not None and self.accumulation_compression_rank is not None)
        rank = self.accumulation_compression_rank if compress else None
        accumulator = FloraAccumulator(optimizer, rank=rank, model=ddp,
                                       buffer_dtype=self.accumulation_buffer_dtype,
                                       step_group_bytes=self.step_group_bytes,
                                       overlap_steps=self.overlap_steps,
                                       _sync=self._flora_sync)
        self.flora_accumulators.append(accumulator)
        self.register_for_checkpointing(accumulator)
        return super().prepare_optimizer(optimizer, device_placement)

    def _flora_ddp_model(self, optimizer):
        """The prepared DistributedDataParallel model that holds ``optimizer``'s parameters."""
        if self.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise NotImplementedError(
                f"flora: FloraAccelerator runs on one process or under DistributedDataParallel "
                f"(accelerate's MULTI_GPU / MULTI_CPU), got distributed type "
                f"{self.distributed_type}; FSDP and DeepSpeed shard the gradients before "
                f"Flora's hooks could compress them")
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for model in self._flora_ddp_models:
            if isinstance(model, DistributedDataParallel) and any(
                    id(p) in ids for p in model.parameters()):
                return model
        raise ValueError(
            "flora: FloraAccelerator with several processes needs the DistributedDataParallel "
            "model that holds the optimizer's parameters: prepare the model before (or with) "
            "the optimizer, accelerator.prepare(model, optimizer)")

    def _flora_sync(self) -> bool:
        return bool(self.sync_gradients)

    def _refuse_clipping(self, parameters, call):
        """Raises for clipping that would find no gradient: the hooks consumed them."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        for p in parameters:
            for accumulator in self.flora_accumulators:
                if accumulator.manages(p):
                    raise ValueError(
                        f"flora: {call} cannot act on {accumulator.describe(p)}: "
                        f"FloraAccelerator steps it in its backward hook, so no gradient is "
                        f"left to clip (the call would silently do nothing). Drop the call "
                        f"(Flora bounds each update by itself: clip_threshold), or use a "
                        f"plain accelerate.Accelerator to clip with ordinary accumulation")
        return parameters

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        parameters = self._refuse_clipping(parameters, "clip_grad_norm_")
        return super().clip_grad_norm_(parameters, max_norm, norm_type)

    def clip_grad_value_(self, parameters, clip_value):
        parameters = self._refuse_clipping(parameters, "clip_grad_value_")
        return super().clip_grad_value_(parameters, clip_value)


__all__ = ["FloraAccelerator"]
