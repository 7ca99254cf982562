"""CMake arguments that find this Python environment's torch and flora_ext.

    cmake -S my_project -B build $(python -m flora_ext.cmake_args)

prints ``-DCMAKE_PREFIX_PATH=<torch>;<flora_ext>`` (torch.utils.cmake_prefix_path and
flora_ext.cmake_prefix_path), and, when torch is a CUDA build, the hints its CMake config needs
to find the CUDA toolkit: pip's CUDA torch refuses to configure without a toolkit (even for
CPU-only code), and where the toolkit lacks libnvrtc, the copy in the nvidia-* wheels is named.

Run as a file (``python flora_ext/cmake_args.py --torch-only``) it needs no built flora_ext:
that is how CMakeLists.txt's own build finds torch from a source checkout.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import sys


def _cuda_home():
    """CUDA_HOME or CUDA_PATH, else /usr/local/cuda, else the toolkit of the nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _nvrtc_in_wheels(cuda_major):
    """libnvrtc from the nvidia-* wheels that pip's torch depends on, or None."""
    for path in sys.path:
        for pattern in (f"nvidia/cu{cuda_major}/lib/libnvrtc.so*",
                        "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            found = sorted(p for p in glob.glob(os.path.join(path, pattern)) if "builtins" not in p
                           and "alt" not in os.path.basename(p))
            if found:
                return found[0]
    return None


def cmake_args(torch_only: bool = False) -> list[str]:
    import torch
    import torch.utils

    prefixes = [torch.utils.cmake_prefix_path]
    if not torch_only:
        prefixes.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake"))
    args = ["-DCMAKE_PREFIX_PATH=" + ";".join(prefixes)]
    if torch.version.cuda is None:
        return args
    home = _cuda_home()
    if home is None:
        print(f"flora_ext.cmake_args: torch {torch.__version__} is a CUDA build, and its CMake "
              f"config needs a CUDA toolkit; none found (set CUDA_HOME)", file=sys.stderr)
        return args
    args += [f"-DCUDAToolkit_ROOT={home}", f"-DCUDA_TOOLKIT_ROOT_DIR={home}",
             f"-DCMAKE_CUDA_COMPILER={os.path.join(home, 'bin', 'nvcc')}"]
    has_nvrtc = any(glob.glob(os.path.join(home, lib, "libnvrtc.so*"))
                    for lib in ("lib64", "lib", os.path.join("targets", "*", "lib")))
    if not has_nvrtc:
        nvrtc = _nvrtc_in_wheels(torch.version.cuda.split(".")[0])
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-only", action="store_true",
                        help="leave out flora_ext's own prefix (to build flora itself with CMake)")
    args = parser.parse_args(argv)
    values = cmake_args(torch_only=args.torch_only)
    # Printed unquoted for $(...), whose result the shell splits at white space only.
    if any(any(c.isspace() for c in a) for a in values):
        print("flora_ext.cmake_args: a path has white space in it; quote these arguments "
              "yourself: " + " ".join(shlex.quote(a) for a in values), file=sys.stderr)
    print(" ".join(values))


if __name__ == "__main__":
    main()
