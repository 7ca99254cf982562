"""flora_ext: the Flora optimizer (Adafactor with compressed, resampled momentum).

Hao, Cao, Mou, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", ICML 2024.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401
except ImportError as err:  # a build made against another torch fails here
    raise ImportError(
        f"flora_ext: cannot load the compiled extension ({err}). It must be built "
        f"against the installed torch {torch.__version__}: rebuild with "
        "`pip install --no-build-isolation -e .` (or `make build`)."
    ) from err

from ._ops import next_seed, param_layout, projection  # noqa: E402
from .optimizer import Flora, state_bytes  # noqa: E402

__all__ = ["Flora", "projection", "next_seed", "param_layout", "state_bytes"]
__version__ = "0.1.0"
