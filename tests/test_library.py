"""The compiled library as Python and C++ users get it: loading, the torch version check, the
scalar ops (no tensor arguments, so torch.library.opcheck cannot check them), the files that
C++ users find next to the library (headers, CMake package)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flora_ext
import reference as ref
from flora_ext import _library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_the_projects():
    with open(os.path.join(ROOT, "version.txt")) as f:
        assert flora_ext.__version__ == f.read().strip()


def test_build_info_names_the_torch_in_use():
    info = _library.build_info()
    assert info.torch_version == torch.__version__
    assert info.cuda == flora_ext.cuda_compiled()
    assert torch.ops.flora.cuda_compiled() is flora_ext.cuda_compiled()


def test_other_torch_version_is_refused_at_import_naming_both():
    script = textwrap.dedent("""
        import torch
        built = torch.__version__
        torch.__version__ = "1.2.3+other"
        try:
            import flora_ext
        except ImportError as err:
            print("ImportError:", err)
            print("loaded:", any("libflora" in p for p in torch.ops.loaded_libraries))
        else:
            print("imported")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ImportError: flora_ext was built against torch " + torch.__version__ in out
    assert "but torch 1.2.3+other is installed" in out
    assert "loaded: False" in out  # refused before the library was loaded


def test_check_torch_version():
    _library.check_torch_version("2.14.1+cu130", "2.14.1+cu130")
    with pytest.raises(ImportError, match=r"built against torch 2\.14\.1\+cu130, but torch "
                                          r"2\.14\.1\+cpu is installed"):
        _library.check_torch_version("2.14.1+cu130", "2.14.1+cpu")


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 7, 2**62, 2**63 - 1])
def test_next_seed_op_is_splitmix64(seed):
    assert torch.ops.flora.next_seed(seed) == ref.next_seed(seed)
    assert flora_ext.next_seed(seed) == ref.next_seed(seed)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_next_seed_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        flora_ext.next_seed(seed)


def test_next_seed_op_checks_its_argument():
    with pytest.raises(RuntimeError, match="flora: seed must be >= 0, got -5"):
        torch.ops.flora.next_seed(-5)


LAYOUT_SHAPES = [(16, 40), (40, 16), (16, 16), (4, 64), (64, 4), (8, 64), (3, 5), (37,), (2, 3, 4),
                 (), (0, 5), (16, 4)]


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("rank,beta1,factorize", [(4, 0.9, True), (0, 0.9, True),
                                                  (4, 0.0, True), (4, 0.9, False), (16, 0.5, True)])
def test_param_layout_op_matches_the_reference(shape, rank, beta1, factorize):
    factored, momentum, momentum_shape, left, layout_rank = torch.ops.flora.param_layout(
        list(shape), rank, beta1, factorize)
    want = ref.layout(shape, rank, beta1, factorize)
    assert (factored, momentum) == (want["factored"], want["momentum"])
    assert tuple(momentum_shape) == (tuple(want["momentum_shape"]) if momentum != "none" else ())
    assert layout_rank == (rank if momentum == "compressed" else 0)
    if momentum == "compressed":
        assert left == want["left"]
    assert flora_ext.param_layout(shape, rank, beta1, factorize) == dict(
        factored=factored, momentum=momentum, momentum_shape=list(momentum_shape), left=left,
        rank=layout_rank)


@pytest.mark.parametrize("args,match", [
    (([4, -1], 2, 0.9, True), "shape must have sizes >= 0"),
    (([4, 4], -1, 0.9, True), "rank must be >= 0, got -1"),
    (([4, 4], 2, 1.0, True), r"beta1 must be in \[0, 1\), got 1"),
])
def test_param_layout_op_checks_its_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.flora.param_layout(*args)


def test_cpp_files_sit_next_to_the_library():
    assert os.path.isfile(flora_ext.library_path)
    assert os.path.basename(flora_ext.library_path) == "libflora.so"
    config = os.path.join(flora_ext.cmake_prefix_path, "Flora", "FloraConfig.cmake")
    with open(config) as f:
        text = f.read()
    assert f'set(Flora_TORCH_VERSION "{torch.__version__}")' in text
    assert "add_library(Flora::flora SHARED IMPORTED)" in text
    assert "@" not in text.replace("@ONLY", "")  # every placeholder filled
    assert os.path.isfile(os.path.join(flora_ext.cmake_prefix_path, "Flora",
                                       "FloraConfigVersion.cmake"))
    include = os.path.join(os.path.dirname(flora_ext.library_path), "include", "flora")
    for header in os.listdir(os.path.join(ROOT, "csrc", "include", "flora")):
        with open(os.path.join(include, header)) as a, \
                open(os.path.join(ROOT, "csrc", "include", "flora", header)) as b:
            assert a.read() == b.read(), f"{header} in the package differs from csrc/include"


def test_the_library_has_no_python_api():
    """C++ programs link the same file: it must not need libpython or libtorch_python."""
    with open(flora_ext.library_path, "rb") as f:
        data = f.read()
    assert b"libtorch_python" not in data
    assert b"PyInit_" not in data and b"PyModule_" not in data


def test_cmake_args_find_torch_and_flora():
    from flora_ext import cmake_args

    args = cmake_args.cmake_args()
    prefix = [a for a in args if a.startswith("-DCMAKE_PREFIX_PATH=")]
    assert prefix == ["-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path + ";"
                      + flora_ext.cmake_prefix_path]
    assert cmake_args.cmake_args(torch_only=True)[0] == \
        "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path
