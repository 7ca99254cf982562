"""benchmarks/bench_memory.py's profile option on the CPU (the tiny model): one profiled
step per configuration, its table written, its wall time in the results."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_memory  # noqa: E402


def test_kernel_kinds():
    assert bench_memory.kernel_kind("void flora::cuda_detail::fused_down_kernel<1, true>") == "flora"
    assert bench_memory.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert bench_memory.kernel_kind("cutlass::Kernel2<cutlass_80_tensorop>") == "gemm"
    assert bench_memory.kernel_kind("flash_fwd_kernel") == "attention"
    assert bench_memory.kernel_kind("at::native::vectorized_elementwise_kernel") == "other"


def test_profile_writes_one_step_per_configuration(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bm.md"
    prof = tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"), "--tiny",
         "--device", "cpu", "--configs", "flora_accum", "--steps", "1", "--warmup", "1",
         "--profile", str(prof), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (prof / "flora_accum.txt").read_text()
    assert text.startswith("flora_accum: one optimizer step")
    assert "Self CPU" in text
    results = json.loads(out.with_suffix(".json").read_text())
    rows = results["results"] if isinstance(results, dict) else results
    row = next(r for r in rows if r["config"] == "flora_accum")
    assert row["status"] == "ok"
    assert row["profile"]["wall_s"] > 0 and "gpu_busy_s" not in row["profile"]
