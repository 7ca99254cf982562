"""Builds flora_ext: the Python package around libflora.so, the compiled core.

libflora.so holds the kernels, the op registrations (torch.ops.flora.*) and the C++ optimizer
flora::Flora, and no Python API, so the same file serves Python (torch.ops.load_library) and
C++ programs (find_package(Flora) through flora_ext.cmake_prefix_path). Next to it the build
puts the public headers (include/flora/), the CMake package (share/cmake/Flora/) and
_build_info.py, which records the torch version the library was built against.

CUDA kernels are compiled when a CUDA toolkit is found (CUDA_HOME) and torch is a CUDA build,
unless FLORA_WITH_CUDA=0. TORCH_CUDA_ARCH_LIST picks the GPU targets (default 8.0;9.0a;9.0+PTX:
9.0a is the H100/H200 code with Hopper's own instructions, which the driver prefers there).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

# torch looks for the toolkit as CUDA_HOME, CUDA_PATH, the nvcc on PATH, /usr/local/cuda; an
# nvcc on PATH that is a wrapper script outside the toolkit (/usr/local/bin/nvcc) would make it
# take /usr/local and fail to link libcudart. Prefer /usr/local/cuda, as cmake_args.py does.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
        "/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "version.txt")) as f:
    VERSION = f.read().strip()
LIBRARY_SONAME = "libflora.so"
# Release default: A100 code; H100/H200 code with wgmma (9.0a, which the driver loads there
# before plain 9.0: seen on an H100 with driver 580); plain 9.0 with PTX that newer GPUs
# compile at load time.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a;9.0+PTX"
PUBLIC_HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "include", "flora", "*.h")))


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
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")
                     + glob.glob("csrc/optim/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20"]
    common = dict(
        include_dirs=include_dirs,
        # No Python API inside: torch_python is not linked, so C++ programs can link the library.
        py_limited_api=True,
        # A C++ program records the SONAME; the RUNPATH finds torch's libraries beside an
        # installed wheel (site-packages/torch/lib) when no Python process loaded them first.
        extra_link_args=[f"-Wl,-soname,{LIBRARY_SONAME}", "-Wl,-rpath,$ORIGIN/../torch/lib"],
    )
    if not want_cuda():
        return cpp_extension.CppExtension(
            "flora_ext.libflora", sources, extra_compile_args={"cxx": cxx_flags}, **common)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    common["include_dirs"] = include_dirs + nvidia_wheel_include_dirs()
    return cpp_extension.CUDAExtension(
        "flora_ext.libflora", sources, define_macros=[("FLORA_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]}, **common)


def fill_template(name, values):
    """cmake/<name>.in with @KEY@ replaced: the same templates CMakeLists.txt configures."""
    with open(os.path.join(ROOT, "cmake", name + ".in")) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Za-z_]+@", text)
    if leftover:
        raise RuntimeError(f"setup.py: unfilled placeholders in cmake/{name}.in: {leftover}")
    return text


def write_if_changed(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's builder, plus what goes next to libflora.so: build info, headers, CMake package."""

    def run(self):
        super().run()
        import torch

        with_cuda = want_cuda()
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
        package_dir = os.path.dirname(self.get_ext_fullpath("flora_ext.libflora"))
        # Compiled modules of older builds (flora_ext/_C*.so) left in build/lib or in place
        # would otherwise end up in the wheel.
        for stale in glob.glob(os.path.join(package_dir, "*.so")):
            if os.path.basename(stale) != LIBRARY_SONAME:
                os.remove(stale)
        write_if_changed(os.path.join(package_dir, "_build_info.py"), (
            "# Generated by setup.py when libflora.so was built; flora_ext refuses to load the\n"
            "# library under any other torch (see _library.py).\n"
            f"version = {VERSION!r}\n"
            f"torch_version = {torch.__version__!r}\n"
            f"cuda = {with_cuda!r}\n"
            f"cuda_arch_list = {arch_list!r}\n"))
        include_dir = os.path.join(package_dir, "include", "flora")
        shutil.rmtree(include_dir, ignore_errors=True)
        os.makedirs(include_dir)
        for header in PUBLIC_HEADERS:
            shutil.copy2(header, include_dir)
        # The CMake package sits in <package>/share/cmake/Flora, the library in <package>.
        values = dict(FLORA_VERSION=VERSION, FLORA_PREFIX_FROM_CONFIG="../../..",
                      FLORA_INCLUDE_DIR="include", FLORA_LIBRARY="libflora.so",
                      FLORA_WITH_CUDA="ON" if with_cuda else "OFF",
                      FLORA_TORCH_VERSION=torch.__version__, FLORA_BUILT_BY="setup.py (wheel)")
        config_dir = os.path.join(package_dir, "share", "cmake", "Flora")
        write_if_changed(os.path.join(config_dir, "FloraConfig.cmake"),
                         fill_template("FloraConfig.cmake", values))
        write_if_changed(os.path.join(config_dir, "FloraConfigVersion.cmake"),
                         fill_template("FloraConfigVersion.cmake", values))


def torch_requirement():
    """The install requirement on torch: the release this build compiles against.

    libflora.so uses torch's C++ ABI, so another torch fails at import; the pin makes pip
    refuse it at install instead. It names the torch distribution's version without a local
    label (PEP 440: "torch==2.14.1" matches 2.14.1, 2.14.1+cu130 and 2.14.1+cpu), as PyPI's
    torch is "2.14.1" while download.pytorch.org's is "2.14.1+cu130" for the same build, and
    a labelled pin would refuse the former. Which build (CUDA or CPU) is checked at import,
    against the torch.__version__ in _build_info.py.
    """
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:  # a torch source tree on sys.path, not installed
        import torch

        version = torch.__version__
    return f"torch=={version.split('+')[0]}"


setup(
    name="flora_ext",
    version=VERSION,
    description="Flora optimizer (compressed-momentum Adafactor) with C++/CUDA kernels",
    packages=find_packages(include=["flora_ext", "flora_ext.*"]),
    # build_ext writes libflora.so, _build_info.py, include/ and share/ into the package.
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True,
                                                        no_python_abi_suffix=True)},
    # The library uses no Python API at all: one wheel serves every CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=[torch_requirement()],
)
