"""Flora's parameter groups: dicts in which ``momentum`` is another name for ``beta1``.

torch's OneCycleLR and CyclicLR with ``cycle_momentum=True`` (their default) accept an
optimizer whose ``defaults`` hold ``momentum`` (or ``betas``) and then write
``group["momentum"]`` on every step. In a Flora group that key is not stored: reading it gives
beta1 and writing it sets beta1, so ``state_dict()``, ``load_state_dict()`` and the step see
beta1 only and the two names can never disagree. Flora keeps a momentum state only where
beta1 > 0, so a write that would turn it on or off (beta1 None or 0 <-> > 0) is refused.
"""
from __future__ import annotations

import numbers

_ALIAS = "momentum"


def _momentum_on(beta1) -> bool:
    return beta1 is not None and beta1 > 0


class ParamGroup(dict):
    """A parameter group (or the defaults) of a Flora optimizer; see the module docstring.

    Only the alias goes through Python: the stored keys are read at dict speed
    (``__missing__`` is called for absent keys only)."""

    __slots__ = ()

    def __missing__(self, key):
        if key == _ALIAS:
            beta1 = dict.get(self, "beta1")
            return 0.0 if beta1 is None else beta1
        raise KeyError(key)

    def __contains__(self, key):
        return key == _ALIAS or dict.__contains__(self, key)

    def get(self, key, default=None):
        if key == _ALIAS:
            return self[_ALIAS]
        return dict.get(self, key, default)

    def __setitem__(self, key, value):
        if key == _ALIAS:
            self._set_momentum(value)
        else:
            dict.__setitem__(self, key, value)

    # dict's own update/setdefault/|= would store the alias as a key of its own.
    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key in self:
            return self[key]
        self[key] = default
        return default

    def _set_momentum(self, value):
        if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                or not 0.0 <= value < 1.0):
            raise ValueError(f"flora: momentum (Flora's beta1; an LR scheduler with "
                             f"cycle_momentum=True writes it) must be a float in [0, 1), "
                             f"got {value!r}")
        beta1 = dict.get(self, "beta1")
        if _momentum_on(beta1) != (value > 0):
            turn = "on" if value > 0 else "off"
            raise ValueError(
                f"flora: setting momentum to {value!r} would turn the first moment {turn} for "
                f"a parameter group whose beta1 is {beta1!r}; Flora keeps a momentum state only "
                f"where beta1 > 0 and cannot add or drop it mid-run. To cycle momentum, "
                f"construct Flora with beta1 > 0 (e.g. beta1=0.9) and keep the scheduler's "
                f"base_momentum and max_momentum > 0; otherwise pass cycle_momentum=False to "
                f"the scheduler")
        dict.__setitem__(self, "beta1", float(value))


def as_param_group(group: dict) -> ParamGroup:
    """``group`` as a ParamGroup (the same object when it is one already)."""
    if type(group) is ParamGroup:
        return group
    if dict.__contains__(group, _ALIAS):
        raise ValueError("flora: a parameter group sets 'momentum'; Flora's name for the "
                         "first-moment coefficient is beta1")
    return ParamGroup(group)
