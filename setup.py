"""Builds flora_ext._C from csrc/ with torch.utils.cpp_extension.

CUDA kernels are compiled when a CUDA toolkit is found (CUDA_HOME) and torch is a
CUDA build, unless FLORA_WITH_CUDA=0. TORCH_CUDA_ARCH_LIST picks the GPU targets.
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    flag = os.environ.get("FLORA_WITH_CUDA")
    if flag is not None:
        return flag not in ("0", "OFF", "off", "false", "")
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def nvidia_wheel_include_dirs():
    """cuBLAS/cuRAND headers of the nvidia-* wheels, where the toolkit lacks them.

    pip's torch carries them under site-packages/nvidia/cu*/include; a partial
    toolkit (nvcc only) has no cublas_v2.h of its own.
    """
    home = cpp_extension.CUDA_HOME or ""
    if os.path.exists(os.path.join(home, "include", "cublas_v2.h")) and os.path.exists(
        os.path.join(home, "include", "curand_kernel.h")
    ):
        return []
    dirs = []
    for path in sys.path:
        for cand in sorted(glob.glob(os.path.join(path, "nvidia", "cu*", "include"))):
            if os.path.exists(os.path.join(cand, "cublas_v2.h")):
                dirs.append(cand)
        for cand in sorted(glob.glob(os.path.join(path, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(cand, "cublas_v2.h")) or os.path.exists(
                os.path.join(cand, "curand_kernel.h")
            ):
                dirs.append(cand)
    return list(dict.fromkeys(dirs))


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "flora_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
        )
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += nvidia_wheel_include_dirs()
    return cpp_extension.CUDAExtension(
        "flora_ext._C", sources, include_dirs=include_dirs,
        define_macros=[("FLORA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
    )


setup(
    name="flora_ext",
    version="0.1.0",
    description="Flora optimizer (compressed-momentum Adafactor) with C++/CUDA kernels",
    packages=find_packages(include=["flora_ext", "flora_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch"],
)
