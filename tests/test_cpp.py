"""The C++ optimizer flora::Flora against the Python one, and the C++ tests' reference values.

Both step each device's parameters of a group in one flora::step_group_ call (with
quantization=True, in the same chunks around it), so the scenarios of cpp_cases.py (param
groups, dtypes, resampling, parameters without a gradient on some steps, 8-bit state) must give
bitwise the same parameters and state.

The C++ side is the test binary of the CMake build (tests/cpp/test_flora.cpp, `make cpp-test`):
FLORA_CPP_TESTS names it, else build/cmake-cpu/tests/cpp/flora_cpp_tests is used. Without a
binary the comparison is skipped, unless FLORA_REQUIRE_CPP_TESTS=1 (as in `make test`).
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import flora_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cpp"))
import cpp_cases  # noqa: E402
import make_reference_values  # noqa: E402

DEFAULT_BINARY = os.path.join(os.path.dirname(HERE), "build", "cmake-cpu", "tests", "cpp",
                              "flora_cpp_tests")


def cpp_binary():
    path = os.environ.get("FLORA_CPP_TESTS", DEFAULT_BINARY)
    if not os.path.exists(path):
        if os.environ.get("FLORA_REQUIRE_CPP_TESTS") == "1":
            pytest.fail(f"C++ test binary {path} not found (FLORA_REQUIRE_CPP_TESTS=1)")
        pytest.skip(f"C++ test binary {path} not built (make cpp-test builds it)")
    return path


def run_python(name):
    """The scenario through flora_ext.Flora: {(key, k): list of floats or int}."""
    scenario = cpp_cases.SCENARIOS[name]
    params, groups, k = [], [], 0
    for shapes, overrides in scenario["groups"]:
        group = []
        for shape, dtype in shapes:
            group.append(torch.nn.Parameter(cpp_cases.initial_param(k, shape, dtype)))
            k += 1
        params += group
        groups.append({"params": group, **overrides})
    opt = flora_ext.Flora(groups, **scenario["defaults"])
    for t in range(1, scenario["steps"] + 1):
        for k, p in enumerate(params):
            p.grad = (cpp_cases.gradient(k, t, tuple(p.shape), p.dtype)
                      if cpp_cases.has_gradient(scenario, k, t) else None)
        opt.step()
    out = {}
    for k, p in enumerate(params):
        out[("param", k)] = p.detach().double().flatten().tolist()
        for key, value in opt.state[p].items():
            out[(key, k)] = (value.double().flatten().tolist() if isinstance(value, torch.Tensor)
                             else value)
    return out


def run_cpp(name):
    """The scenario through flora::Flora, as `flora_cpp_tests trajectory` prints it."""
    result = subprocess.run([cpp_binary(), "trajectory", name], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = {}
    for line in result.stdout.splitlines():
        key, k, *values = line.split()
        if key in ("step", "seed"):
            out[(key, int(k))] = int(values[0])
        else:
            out[(key, int(k))] = [float.fromhex(v) for v in values]
    return out


@pytest.mark.parametrize("name", sorted(cpp_cases.SCENARIOS))
def test_same_inputs_and_seeds_give_the_same_trajectory_in_cpp_and_python(name):
    cpp = run_cpp(name)
    python = run_python(name)
    assert sorted(cpp) == sorted(python)
    for key in sorted(python):
        assert cpp[key] == python[key], f"{name}: {key} differs between C++ and Python"
    # the run did something: compressed momentum was resampled, parameters moved
    if name != "relative_step":
        assert any(key == "seed" for key, _ in python)
    initial = cpp_cases.initial_param(0, cpp_cases.SCENARIOS[name]["groups"][0][0][0][0])
    assert python[("param", 0)] != initial.double().flatten().tolist()
    if cpp_cases.SCENARIOS[name]["defaults"].get("quantization"):
        assert any(key == "momentum_absmax" for key, _ in python)
        assert any(key == "second_moment_absmax" for key, _ in python)


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def test_cpp_reference_values_are_current():
    """tests/cpp/reference_values.h is what make_reference_values.py computes now."""
    with open(make_reference_values.HEADER) as f:
        stored = f.read()
    fresh = make_reference_values.render()
    assert _NUMBER.sub("#", stored) == _NUMBER.sub("#", fresh), \
        "reference_values.h is stale: run python tests/cpp/make_reference_values.py"
    for a, b in zip(_NUMBER.findall(stored), _NUMBER.findall(fresh)):
        # float64 BLAS may round differently on another CPU: not bitwise, but close
        assert float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-15)
