"""Every place that spells the hyper-parameters, held against their table (hyperparams.py).

Adding a hyper-parameter starts with a row there; each test below then names the place still
missing it: the constructor of flora_ext.Flora, its param groups and plan cache, the op call
(flora_ext/optimizer.py), flora::FloraOptions (FLORA_OPTIONS in csrc/include/flora/flora.h), the
op schemas and checks (csrc/ops.cpp), flora-opt's constructor and README's arguments.
"""
import inspect
import os
import re
from unittest import mock

import pytest
import torch

import flora_ext
from flora_ext.hyperparams import (BY_NAME, GROUP_HYPER_PARAMETERS, HYPER_PARAMETERS, MAX_INT64,
                                   MIN_EPS1, validate_defaults, validate_group)
from flora_ext.testing import import_flora_opt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_HYPER_PARAMETERS = [hp for hp in HYPER_PARAMETERS if hp.op]
# Keyword arguments of the ops that are no hyper-parameters: per parameter, or a cache.
NOT_HYPER = {"step_": {"step", "seed", "nonfinite_skips"},
             "step_group_": {"param_norms", "norms_known", "nonfinite_skips"}}


def same(a, b):
    """Equal values of equal types (True is no 1, 1 is no 1.0)."""
    return type(a) is type(b) and a == b


def test_table_is_well_formed():
    names = [hp.name for hp in HYPER_PARAMETERS]
    assert len(set(names)) == len(names)
    for hp in HYPER_PARAMETERS:
        assert hp.doc and (hp.type is bool) == (hp.check is None), hp.name
        if hp.op:
            assert hp.group, f"{hp.name}: an op argument must be a param group key"
        hp.validate(hp.default)  # the default passes its own check
        assert (hp.invalid is None) == (hp.type is bool), f"{hp.name}: an invalid example"
    group = {hp.name: hp.default for hp in GROUP_HYPER_PARAMETERS}
    with pytest.raises(ValueError, match="lr is required"):
        validate_group(group)  # lr=None without relative_step
    validate_group({**group, "lr": 1e-3})
    validate_defaults(group)  # the constructor's: lr may be left to the param groups
    with pytest.raises(ValueError, match=r"^flora: lr is required unless relative_step=True; "
                                         r"param group 3 has none"):
        validate_group(group, index=3)


def test_constructor_takes_the_table_in_order_with_its_defaults():
    parameters = list(inspect.signature(flora_ext.Flora.__init__).parameters.values())
    assert [p.name for p in parameters[:2]] == ["self", "params"]
    arguments = parameters[2:]
    assert [p.name for p in arguments] == [hp.name for hp in HYPER_PARAMETERS], \
        "flora_ext.Flora.__init__ must take the table's arguments in its order"
    for p in arguments:
        hp = BY_NAME[p.name]
        assert same(p.default, hp.default), f"{p.name}: default {p.default!r} != {hp.default!r}"
        kind = inspect.Parameter.KEYWORD_ONLY if hp.keyword_only else \
            inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert p.kind == kind, f"{p.name} must be {kind.description}"


def test_param_groups_hold_the_group_hyper_parameters():
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = flora_ext.Flora([p], lr=1e-3, eps=[1e-20, 1e-2])
    expected = {hp.name: hp.default for hp in GROUP_HYPER_PARAMETERS}
    expected.update(lr=1e-3, eps=(1e-20, 1e-2))
    assert optimizer.defaults == expected
    assert {k: v for k, v in optimizer.param_groups[0].items() if k != "params"} == expected


def test_a_later_invalid_value_of_any_hyper_parameter_is_caught_at_the_next_step():
    """What step() checks again after a group changed (its plan cache) covers every row."""
    for hp in GROUP_HYPER_PARAMETERS:
        p = torch.nn.Parameter(torch.ones(4, 6))
        optimizer = flora_ext.Flora([p], lr=1e-3, beta1=0.9, rank=2)
        p.grad = torch.ones(4, 6)
        optimizer.step()
        before = p.detach().clone()
        optimizer.param_groups[0][hp.name] = "bad"
        error = TypeError if hp.type is bool else ValueError
        with pytest.raises(error, match=f"^flora: {hp.name} must be "):
            optimizer.step()
        assert torch.equal(p.detach(), before)


def test_cpp_options_are_the_table():
    """flora::FloraOptions (FLORA_OPTIONS in flora.h): names in order, C++ types, defaults."""
    names, types, defaults = torch.ops.flora.cpp_options()
    expected = [(name, hp) for hp in GROUP_HYPER_PARAMETERS for name in hp.cpp_names]
    assert names == [name for name, _ in expected], \
        "FLORA_OPTIONS in csrc/include/flora/flora.h must list the table's group arguments"
    for name, cpp_type, text, (_, hp) in zip(names, types, defaults, expected):
        want_type = {float: "float", int: "int", bool: "bool", str: "str"}[hp.type]
        if hp.nullable and hp.cpp_values(None) == (None,):
            want_type += "?"
        assert cpp_type == want_type, f"FloraOptions::{name} is {cpp_type}, expected {want_type}"
    values = []
    for cpp_type, text in zip(types, defaults):
        if text == "None":
            values.append(None)
        elif cpp_type.startswith("float"):
            values.append(float.fromhex(text))
        elif cpp_type == "int":
            values.append(int(text))
        elif cpp_type == "str":
            values.append(text)
        else:
            assert text in ("True", "False")
            values.append(text == "True")
    want = [v for hp in GROUP_HYPER_PARAMETERS for v in hp.cpp_values(hp.default)]
    for name, got, value in zip(names, values, want):
        assert same(got, value), f"FloraOptions::{name} defaults to {got!r}, expected {value!r}"


def _schema_type(hp):
    return {float: "float", int: "int", bool: "bool", str: "str"}[hp.type]


@pytest.mark.parametrize("op", sorted(NOT_HYPER))
def test_op_schema_takes_the_table(op):
    schema = getattr(torch.ops.flora, op).default._schema
    keywords = [a for a in schema.arguments if a.kwarg_only and a.name not in NOT_HYPER[op]]
    expected = {name: hp for hp in OP_HYPER_PARAMETERS for name in hp.cpp_names}
    assert sorted(a.name for a in keywords) == sorted(expected), \
        f"the keyword arguments of flora::{op} (csrc/ops.cpp) must be the table's op arguments"
    for a in keywords:
        hp = expected[a.name]
        assert str(a.type) == _schema_type(hp), f"{op}: {a.name} is {a.type}"
        if a.has_default_value():
            default = dict(zip(hp.cpp_names, hp.cpp_values(hp.default)))[a.name]
            assert same(a.default_value, default), \
                f"{op}: {a.name} defaults to {a.default_value!r}, the table to {default!r}"


def invalid_variants(hp):
    """(value, {C++ name: value}) with one invalid element: each element of a pair in turn."""
    if not hp.split:
        return [(hp.invalid, {hp.name: hp.cpp_values(hp.invalid)[0]})]
    variants = []
    for i, cpp_name in enumerate(hp.split):
        value = list(hp.default)
        value[i] = hp.invalid[i]
        variants.append((tuple(value), {cpp_name: hp.invalid[i]}))
    return variants


VALID_GROUP = {**{hp.name: hp.default for hp in GROUP_HYPER_PARAMETERS}, "lr": 1e-3}


@pytest.mark.parametrize("name", [hp.name for hp in GROUP_HYPER_PARAMETERS
                                  if hp.invalid is not None])
def test_python_rejects_the_invalid_example_naming_it(name):
    hp = BY_NAME[name]
    for value, _ in invalid_variants(hp):
        assert not hp.check(value)
        message = f"flora: {name} must be {hp.expected}, got {value!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            validate_group({**VALID_GROUP, name: value})


@pytest.mark.parametrize("name", [hp.name for hp in OP_HYPER_PARAMETERS
                                  if hp.invalid is not None])
def test_op_rejects_the_invalid_example_naming_it(name):
    """The ops' checks (check_step_inputs in csrc/ops.cpp) cover every op argument."""
    hp = BY_NAME[name]
    valid = {cpp: value for h in OP_HYPER_PARAMETERS
             for cpp, value in zip(h.cpp_names, h.cpp_values(VALID_GROUP[h.name]))}
    for _, bad in invalid_variants(hp):
        (cpp_name, value), = bad.items()
        param = torch.ones(4, 6)
        # factored second moment, no momentum: the state of the valid settings
        with pytest.raises(RuntimeError, match=f"flora: {cpp_name} must"):
            torch.ops.flora.step_(param, torch.ones(4, 6), torch.zeros(4), torch.zeros(6), None,
                                  None, step=1, seed=0, **{**valid, cpp_name: value})
        assert torch.equal(param, torch.ones(4, 6))


INT_HYPER_PARAMETERS = [hp.name for hp in HYPER_PARAMETERS if hp.type is int]


@pytest.mark.parametrize("name", INT_HYPER_PARAMETERS)
def test_int_hyper_parameters_stay_in_int64(name):
    """The ops take ints as int64: a larger one would pass to the dispatcher and fail there
    ("Expected a value of type 'int'"); the check rejects it naming the accepted range."""
    hp = BY_NAME[name]
    for value in (2**63, 2**64, -(2**63) - 1):
        assert not hp.check(value)
        with pytest.raises(ValueError, match=rf"^flora: {name} must be .*, got {value}$"):
            validate_group({**VALID_GROUP, name: value})
    assert re.search(r"\[-?\d+, 2\*\*6[23]( - 1)?\]", hp.expected), \
        f"{name}: the message must state the accepted range, got {hp.expected!r}"


@pytest.mark.parametrize("name", [n for n in INT_HYPER_PARAMETERS if BY_NAME[n].op])
def test_op_takes_the_largest_int_the_table_accepts(name):
    hp = BY_NAME[name]
    assert hp.check(MAX_INT64)
    valid = {cpp: value for h in OP_HYPER_PARAMETERS
             for cpp, value in zip(h.cpp_names, h.cpp_values(VALID_GROUP[h.name]))}
    param = torch.ones(4, 6)
    torch.ops.flora.step_(param, torch.ones(4, 6), torch.zeros(4), torch.zeros(6), None, None,
                          step=1, seed=0, **{**valid, name: MAX_INT64})
    assert torch.isfinite(param).all() and not torch.equal(param, torch.ones(4, 6))


def test_tensor_lr_is_a_value_error_as_in_torch_optim():
    with pytest.raises(ValueError, match=r"^flora: lr as a Tensor needs capturable=True; pass a "
                                         r"Python float \(e.g. lr.item\(\)\)$"):
        validate_group({**VALID_GROUP, "lr": torch.tensor(1e-3)})
    validate_group({**VALID_GROUP, "lr": torch.tensor(1e-3), "capturable": True})
    with pytest.raises(ValueError, match=r"^flora: lr as a Tensor must be a 0-d float32 or "
                                         r"float64 tensor, got torch.int64 of shape \(\)$"):
        validate_group({**VALID_GROUP, "lr": torch.tensor(1), "capturable": True})


def test_eps1_must_survive_in_float32():
    hp = BY_NAME["eps"]
    assert MIN_EPS1 == torch.finfo(torch.float32).tiny
    for eps1 in (0.0, MIN_EPS1 / 2, 1e-46):
        with pytest.raises(ValueError, match=re.escape(
                f"flora: eps must be {hp.expected}, got {(eps1, 1e-3)!r}")):
            validate_group({**VALID_GROUP, "eps": (eps1, 1e-3)})
    validate_group({**VALID_GROUP, "eps": (MIN_EPS1, 0.0)})


@pytest.mark.parametrize("settings", [
    dict(lr=3e-3, rank=2, kappa=7, eps=(1e-20, 1e-2), clip_threshold=0.7, decay_rate=-0.6,
         beta1=0.5, weight_decay=0.01, scale_parameter=False, factorize_second_moment=False,
         seed=9, tf32=False, stochastic_rounding=True, skip_nonfinite=True,
         projection="orthogonal"),
    dict(lr=None, relative_step=True, warmup_init=True),
], ids=["lr", "relative_step"])
def test_the_optimizer_passes_every_op_hyper_parameter_to_the_op(settings):
    calls = []
    real = torch.ops.flora.step_group_

    def record(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    p = torch.nn.Parameter(torch.ones(4, 6))
    optimizer = flora_ext.Flora([p], **settings)
    p.grad = torch.ones(4, 6)
    with mock.patch.object(torch.ops.flora, "step_group_", record):
        optimizer.step()
    assert len(calls) == 1
    group = optimizer.param_groups[0]
    for hp in OP_HYPER_PARAMETERS:
        value = group[hp.name]
        for name, want in zip(hp.cpp_names, hp.cpp_values(value)):
            want = 0.0 if want is None else want  # lr under relative_step
            assert name in calls[0], f"optimizer.py does not pass {name} to step_group_"
            assert same(calls[0][name], hp.type(want)), \
                f"{name}: passed {calls[0][name]!r}, the group holds {value!r}"


def test_flora_opt_constructor_takes_the_same_arguments():
    try:
        flora_opt = import_flora_opt()
    except Exception as e:  # noqa: BLE001 - reported as the failure
        pytest.fail(f"flora-opt is a required test dependency and could not be imported "
                    f"({type(e).__name__}: {e}); pip install -r requirements-test.txt",
                    pytrace=False)
    parameters = list(inspect.signature(flora_opt.Flora.__init__).parameters.values())[2:]
    ours = [hp for hp in HYPER_PARAMETERS if hp.flora_opt]
    assert [p.name for p in parameters] == [hp.name for hp in ours]
    for p, hp in zip(parameters, ours):
        assert p.default == hp.default, f"flora-opt's {p.name} defaults to {p.default!r}"


def test_readme_names_every_argument():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    missing = [hp.name for hp in HYPER_PARAMETERS
               if not re.search(rf"`{re.escape(hp.name)}\b", readme)]
    assert not missing, f"README.md does not name {missing}"

