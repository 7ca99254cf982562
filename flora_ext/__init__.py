"""flora_ext: the Flora optimizer (Adafactor with compressed, resampled momentum).

Hao, Cao, Mou, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", ICML 2024.
"""
from __future__ import annotations

from . import _library

_library.load()  # registers torch.ops.flora.*; raises ImportError on a torch mismatch

from ._library import cmake_prefix_path, library_path  # noqa: E402
from ._ops import cuda_compiled, next_seed, param_layout, projection  # noqa: E402
from .optimizer import Flora, state_bytes  # noqa: E402
from .accumulation import FloraAccumulator  # noqa: E402
from . import distributed  # noqa: E402  (FloraCommState, flora_comm_hook)

# FloraAccelerator is left out of __all__: a star import must not require accelerate.
__all__ = ["Flora", "FloraAccumulator", "distributed", "projection", "next_seed", "param_layout",
           "state_bytes", "cuda_compiled", "cmake_prefix_path", "library_path"]
__version__ = _library.build_info().version


def __getattr__(name):
    # FloraAccelerator subclasses accelerate.Accelerator: imported on first use only, so
    # that flora_ext itself never imports (or requires) accelerate.
    if name == "FloraAccelerator":
        from .accelerator import FloraAccelerator

        return FloraAccelerator
    raise AttributeError(f"module 'flora_ext' has no attribute {name!r}")
