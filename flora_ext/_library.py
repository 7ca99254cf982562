"""Finds and loads libflora.so, the compiled core that Python and C++ programs share.

The library has no Python API in it: loading it registers the ``torch.ops.flora`` ops with
torch's dispatcher, and a C++ program links the same file (``find_package(Flora)`` through
``flora_ext.cmake_prefix_path``). Its C++ ABI is that of the torch it was built against, so
a different torch is refused here, with both versions named, before the library is loaded.
"""
from __future__ import annotations

import os

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "libflora.so"
library_path = os.path.join(PACKAGE_DIR, LIBRARY_NAME)
cmake_prefix_path = os.path.join(PACKAGE_DIR, "share", "cmake")

_REBUILD_HINT = ("rebuild flora_ext against the installed torch (from the source tree: "
                 "`pip install --no-build-isolation .` or `make build`)")


def check_torch_version(built: str, installed: str) -> None:
    """Raises ImportError unless the torch in use is the one the library was built against."""
    if built != installed:
        raise ImportError(
            f"flora_ext was built against torch {built}, but torch {installed} is installed. "
            f"Its compiled library uses torch's C++ ABI, which changes between torch builds: "
            f"install torch=={built}, or {_REBUILD_HINT}.")


def build_info():
    """The generated ``_build_info`` module (torch version, CUDA arch list), or None."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def load() -> None:
    info = build_info()
    if info is None:
        raise ImportError(f"flora_ext: flora_ext/_build_info.py is missing, so this is no "
                          f"complete build of flora_ext; {_REBUILD_HINT}.")
    check_torch_version(info.torch_version, torch.__version__)
    if not os.path.exists(library_path):
        raise ImportError(f"flora_ext: the compiled library {library_path} is missing; "
                          f"{_REBUILD_HINT}.")
    try:
        torch.ops.load_library(library_path)
    except OSError as err:
        raise ImportError(f"flora_ext: cannot load {library_path} ({err}); "
                          f"{_REBUILD_HINT}.") from err
