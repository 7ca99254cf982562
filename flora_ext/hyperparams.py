"""The hyper-parameters of flora_ext.Flora: one row each, the one place that states them.

From this table come the constructor's defaults and the checks of its arguments
(``validate_defaults``) and of a param group (``validate_group``), with the error messages
users see. tests/test_hyperparams.py holds the other places against it: the constructor's
signature, the C++ ``flora::FloraOptions`` (csrc/include/flora/flora.h, read through the
``flora::options_defaults`` op), the schemas of the step ops, the optimizer's op call,
flora-opt's constructor and README's arguments.

Adding a hyper-parameter: a row here, then what tests/test_hyperparams.py names as missing:
- flora_ext/optimizer.py: the constructor's argument (default from DEFAULTS); for a param group
  key, _HYPER (what makes step() check a group again); for the kernels, _run_plan's op arguments.
- csrc/include/flora/flora.h: its X(type, name, default) line in FLORA_OPTIONS; csrc/optim/
  flora.cpp: its check in FloraOptions::validate and, for the kernels, step_options.
- For the kernels: the step_ and step_group_ schemas and check_step_inputs (csrc/ops.cpp);
  StepOptions, options_from_schema, step_op and step_group_op (csrc/include/flora/ops.h); the
  typed op calls (flora::step_ in ops.cpp, step_group in flora.cpp); the step_ fake (_ops.py).
- README.md's arguments.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

MAX_BASE_SEED = 2**62  # seed + parameter number and the seeds after it stay in int63
MAX_INT64 = 2**63 - 1  # the ops take ints as int64
# float32's smallest normal: eps1 is added in float32, and a smaller eps1 is lost there (below
# about 1e-45, or where denormals are flushed to zero), so a zero gradient row gives 0 / 0.
MIN_EPS1 = 2.0**-126
# The values of the projection hyper-parameter (docs/FLORA.md §5.1).
PROJECTIONS = ("gaussian", "orthogonal")


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _finite(x) -> bool:
    return is_number(x) and math.isfinite(x)


def _int64_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and low <= v <= MAX_INT64


def _step_size(lr) -> bool:
    if isinstance(lr, torch.Tensor):  # as torch.optim's optimizers without tensor lr say
        raise ValueError("flora: lr as a Tensor needs capturable=True; pass a Python float "
                         "(e.g. lr.item())")
    return _finite(lr) and lr >= 0


def _check_tensor_lr(lr) -> None:
    """lr as a Tensor (capturable=True): the step reads it on the device, so that a CUDA graph
    replays with what an LR scheduler fill_()s in; its value is not checked here (reading a
    CUDA tensor would wait for the device)."""
    if lr.dim() != 0 or lr.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"flora: lr as a Tensor must be a 0-d float32 or float64 tensor, got "
                         f"{lr.dtype} of shape {tuple(lr.shape)}")


def _eps_pair(eps) -> bool:
    return (isinstance(eps, (tuple, list)) and len(eps) == 2 and all(map(_finite, eps))
            and eps[0] >= MIN_EPS1 and eps[1] >= 0)


def _lr_or_relative_step(group) -> None:
    if group["lr"] is not None and group["relative_step"]:
        raise ValueError("flora: lr and relative_step=True are exclusive: relative_step "
                         "computes the step size itself; pass lr=None or relative_step=False")


def _capturable_without_skips(group) -> None:
    if group["capturable"] and group["skip_nonfinite"]:
        raise ValueError("flora: skip_nonfinite=True is not supported with capturable=True "
                         "(the capturable step has no skip pass); pass one of them as False")


def _orthogonal_without_capture(group) -> None:
    if group["capturable"] and group["projection"] != "gaussian":
        raise ValueError("flora: projection='orthogonal' is not supported with capturable=True "
                         "(the capturable step is CUDA's, whose kernels have the Gaussian "
                         "projection only); pass projection='gaussian' or capturable=False")


def _warmup_needs_relative_step(group) -> None:
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError("flora: warmup_init=True requires relative_step=True")


@dataclass(frozen=True)
class HyperParameter:
    """One argument of flora_ext.Flora.

    ``check`` says whether a value (not None) is valid; an invalid one raises
    ``flora: <name> must be <expected>, got <value>``: TypeError for a bool argument,
    ValueError otherwise. ``rules`` are checks that involve other arguments (of the group,
    whose bools are checked first), run right after this one's own.
    """
    name: str
    type: type  # of the value, or of each element of a pair (float, int, bool or str)
    default: Any
    doc: str
    check: Optional[Callable[[Any], bool]] = None  # None: a bool
    expected: str = "a bool"
    nullable: bool = False  # None is valid (what it means: doc)
    # C++ and op names of a pair's two elements (eps: eps1, eps2); else the name itself
    split: Optional[Tuple[str, str]] = None
    rules: Tuple[Callable[[dict], None], ...] = ()
    invalid: Any = None  # a value the check rejects (tests hold the op's checks to it)
    # a key of every param group and a FLORA_OPTIONS field of flora::FloraOptions
    # (FloraOptions also has optimizer-wide fields outside that list, such as quantization)
    group: bool = True
    op: bool = True  # a keyword argument of the step ops (step_, step_group_)
    keyword_only: bool = False
    flora_opt: bool = True  # an argument of flora-opt's Flora too

    def validate(self, value) -> None:
        if self.type is bool:
            if not isinstance(value, bool):
                raise TypeError(f"flora: {self.name} must be a bool, got {value!r}")
            return
        if value is None and self.nullable:
            return
        if not self.check(value):
            raise ValueError(f"flora: {self.name} must be {self.expected}, got {value!r}")

    @property
    def cpp_names(self) -> Tuple[str, ...]:
        """The names in C++ (FloraOptions) and in the op schemas."""
        return self.split or (self.name,)

    def cpp_values(self, value) -> Tuple[Any, ...]:
        """``value`` as FloraOptions holds it, one entry per cpp_names: a pair splits, and
        None is 0 but for lr (std::optional there)."""
        values = tuple(value) if self.split else (value,)
        if value is None and self.name != "lr":
            values = (self.type(0),)
        return values


HYPER_PARAMETERS = (
    HyperParameter(
        "lr", float, None,
        "Step size; required (here or in every param group) unless relative_step=True, "
        "exclusive with it. A 0-d tensor with capturable=True.",
        check=_step_size, expected="a finite float >= 0", nullable=True, invalid=-1.0,
        rules=(_lr_or_relative_step, _warmup_needs_relative_step)),
    HyperParameter(
        "rank", int, None, "Rank r of the momentum projection; None or 0 keeps it dense.",
        check=_int64_at_least(0), expected="None or an int in [0, 2**63 - 1]", nullable=True,
        invalid=-1),
    HyperParameter(
        "kappa", int, 1000, "Resample the projection every kappa steps.",
        check=_int64_at_least(1), expected="an int in [1, 2**63 - 1]", invalid=0),
    HyperParameter(
        "eps", float, (1e-30, 1e-3),
        "eps1 is added to g^2 before averaging; eps2 floors the parameter RMS of "
        "scale_parameter.",
        check=_eps_pair,
        expected="a pair (eps1, eps2) of finite floats, eps1 >= 2**-126 (float32's smallest "
                 "normal, about 1.2e-38) and eps2 >= 0",
        split=("eps1", "eps2"), invalid=(-1.0, float("inf"))),
    HyperParameter(
        "clip_threshold", float, 1.0,
        "The update is divided by max(1, RMS(update) / clip_threshold).",
        check=lambda v: _finite(v) and v > 0, expected="a finite float > 0", invalid=0.0),
    HyperParameter(
        "decay_rate", float, -0.8, "beta2_t = 1 - t**decay_rate.",
        check=lambda v: _finite(v) and v <= 0, expected="a finite float <= 0", invalid=0.5),
    HyperParameter(
        "beta1", float, None, "Momentum coefficient; None or 0: no first moment at all.",
        check=lambda v: is_number(v) and 0.0 <= v < 1.0, expected="None or a float in [0, 1)",
        nullable=True, invalid=1.0),
    HyperParameter(
        "weight_decay", float, 0.0, "Decoupled weight decay, scaled by the effective step size.",
        check=lambda v: _finite(v) and v >= 0, expected="a finite float >= 0",
        invalid=float("nan")),
    HyperParameter(
        "scale_parameter", bool, True,
        "Multiply the step size by the parameter's RMS (at least eps2)."),
    HyperParameter(
        "relative_step", bool, False,
        "Step size min(1e-2, 1/sqrt(t)) (min(1e-6 t, 1/sqrt(t)) with warmup_init) instead of lr."),
    HyperParameter(
        "warmup_init", bool, False, "With relative_step: ramp the step size up as 1e-6 t."),
    HyperParameter(
        "factorize_second_moment", bool, True,
        "Row and column second moments for 2-D parameters."),
    HyperParameter(
        "seed", int, 0,
        "Base seed: parameter number i (1-based over all groups, in order) starts at seed + i.",
        check=lambda v: is_int(v) and 0 <= v <= MAX_BASE_SEED,
        expected="an int in [0, 2**62]", invalid=-1,
        op=False),  # the ops take each parameter's current seed instead
    HyperParameter(
        "quantization", bool, False,
        "8-bit momentum and unfactored second moments (blockwise dynamic quantization, "
        "docs/FLORA.md §11).",
        group=False, op=False),
    HyperParameter(
        "tf32", bool, True,
        "CUDA: projection GEMMs on tensor cores (TF32); False keeps them exact fp32.",
        keyword_only=True, flora_opt=False),
    HyperParameter(
        "stochastic_rounding", bool, False,
        "bfloat16 parameters: unbiased stochastic rounding of the written value.",
        keyword_only=True, flora_opt=False),
    HyperParameter(
        "skip_nonfinite", bool, False,
        "A parameter whose gradient holds a NaN or inf keeps its value and state on that "
        "step (its step count advances); the skips are counted in opt.nonfinite_skips.",
        keyword_only=True, flora_opt=False),
    HyperParameter(
        "projection", str, "gaussian",
        "Compressed momentum's basis: 'gaussian' (flora-opt's) or 'orthogonal' (the Gaussian "
        "basis orthonormalised, scaled by sqrt(long side / r); less noise; the momentum is "
        "kept in it, so a checkpoint resumes only with its own projection; docs/FLORA.md §5.1).",
        check=lambda v: isinstance(v, str) and v in PROJECTIONS,
        expected="'gaussian' or 'orthogonal'", invalid="uniform",
        keyword_only=True, flora_opt=False, rules=(_orthogonal_without_capture,)),
    HyperParameter(
        "max_aspect_ratio", float, 4.0,
        "Compressed momentum only for a 2-D parameter whose longer side is at most "
        "max_aspect_ratio times its shorter (4.0: flora-opt's rule, which keeps token "
        "embeddings and output heads dense); None: no limit.",
        check=lambda v: _finite(v) and v >= 1, expected="None (no limit) or a finite float >= 1",
        nullable=True, invalid=0.5, keyword_only=True, flora_opt=False),
    HyperParameter(
        "capturable", bool, False,
        "CUDA: step counts and seeds live in device tensors and the step plans once, so that "
        "it can be captured in a CUDA graph and replayed (docs/cuda.md).",
        keyword_only=True, flora_opt=False, op=False, rules=(_capturable_without_skips,)),
    HyperParameter(
        "reuse_param_norms", bool, True,
        "CUDA: reuse the sum(p^2) the last step wrote instead of reading p again, unless p "
        "was written since.",
        group=False, op=False, keyword_only=True, flora_opt=False),
)

BY_NAME = {hp.name: hp for hp in HYPER_PARAMETERS}
DEFAULTS = {hp.name: hp.default for hp in HYPER_PARAMETERS}
# The keys of a param group (besides "params"), in table order.
GROUP_HYPER_PARAMETERS = tuple(hp for hp in HYPER_PARAMETERS if hp.group)
# Bools first: the rules of the others read them.
_CHECK_ORDER = (tuple(hp for hp in GROUP_HYPER_PARAMETERS if hp.type is bool)
                + tuple(hp for hp in GROUP_HYPER_PARAMETERS if hp.type is not bool))


def validate_defaults(defaults) -> None:
    """The checks of validate_group but one: lr may be missing (None without relative_step)
    here, as every param group may set its own; each group is checked once they are merged."""
    for hp in _CHECK_ORDER:
        value = defaults[hp.name]
        if hp.name == "lr" and isinstance(value, torch.Tensor) and defaults["capturable"] is True:
            _check_tensor_lr(value)
        else:
            hp.validate(value)
        for rule in hp.rules:
            rule(defaults)


def validate_group(group, index: Optional[int] = None) -> None:
    """Raises ValueError/TypeError naming the first invalid hyper-parameter of ``group``
    (param group ``index``, when given, for a missing lr)."""
    validate_defaults(group)
    if group["lr"] is None and not group["relative_step"]:
        which = "" if index is None else (
            f"; param group {index} has none (give it an 'lr', or pass lr to Flora)")
        raise ValueError(f"flora: lr is required unless relative_step=True{which}")
