import pytest
import torch

import flora_ext

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU: run pytest on the GPU machine for these")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def pytest_sessionstart(session):
    # A GPU with a CPU-only build would silently test nothing of the CUDA kernels.
    if HAS_CUDA and not flora_ext.cuda_compiled():
        raise pytest.UsageError("a GPU is present but flora_ext was built without CUDA kernels")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
