"""benchmarks/profile_step.py's kernel names: every launch of a pass shares the row whose
floor of bytes counts all of that pass's tensors."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from profile_step import short_name  # noqa: E402


@pytest.mark.parametrize("kernel,row", [
    ("void flora::cuda_detail::(anonymous namespace)::stats_kernel<1>(TaskTable, GroupArgs)",
     "stats"),
    ("void flora::cuda_detail::(anonymous namespace)::stats_wide_kernel<1, 2>(TaskTable)",
     "stats"),
    ("void flora::cuda_detail::(anonymous namespace)::stats_quantized_kernel<1>(TaskTable)",
     "stats"),
    ("flora::cuda_detail::(anonymous namespace)::gram_dot_kernel(const DownJob *, int)",
     "gram_dot"),
    ("void flora::cuda_detail::(anonymous namespace)::fused_apply_kernel<1>(TaskTable)",
     "apply"),
    ("void flora::cuda_detail::(anonymous namespace)::projection_t_kernel<1>(const DownJob *)",
     "projection_t"),
    ("void flora::cuda_detail::(anonymous namespace)::scale_projection_t_kernel<1>("
     "const DownJob *, unsigned short *const *, bool, int, int)", "scale_projection_t"),
    ("void flora::cuda_detail::(anonymous namespace)::down_epilogue_kernel<true>("
     "const DownJob *, int, int, int, float, int)", "down_epilogue"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "cublas gemm"),
], ids=["stats", "stats_wide", "stats_quantized", "gram_dot", "fused_apply", "projection_t",
        "scale_projection_t", "down_epilogue", "cublas"])
def test_kernels_share_their_pass_row(kernel, row):
    assert short_name(kernel) == row
