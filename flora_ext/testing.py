"""Helpers for comparing flora_ext with the authors' package in tests and benchmarks."""
from __future__ import annotations

import importlib
import sys
import types


def _stub_bitsandbytes():
    def unavailable(*args, **kwargs):
        raise RuntimeError("bitsandbytes stub: flora-opt's quantization=True needs the real "
                           "bitsandbytes")

    bnb = types.ModuleType("bitsandbytes")
    functional = types.ModuleType("bitsandbytes.functional")
    functional.quantize_blockwise = unavailable
    functional.dequantize_blockwise = unavailable
    bnb.functional = functional
    sys.modules["bitsandbytes"] = bnb
    sys.modules["bitsandbytes.functional"] = functional


def import_flora_opt():
    """flora-opt's torch module (flora_opt.optimizers.torch.flora).

    flora-opt imports bitsandbytes at import time but uses it only for
    quantization=True; where bitsandbytes is missing, a stub whose functions raise
    stands in for it.
    """
    try:
        importlib.import_module("bitsandbytes.functional")
    except Exception:  # missing, or broken without a GPU
        _stub_bitsandbytes()
    return importlib.import_module("flora_opt.optimizers.torch.flora")
