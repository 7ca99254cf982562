"""benchmarks/bench_memory.py on the CPU (the tiny model): the profile option (one profiled
step per configuration, its table written, its wall time in the results), --chunked-loss
(the model's own loss and gradients, the rows' flags), the lean configurations' options and
the replay of an allocator trace behind --memory-peak."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_memory  # noqa: E402


def test_kernel_kinds():
    assert bench_memory.kernel_kind("void flora::cuda_detail::fused_down_kernel<1, true>") == "flora"
    assert bench_memory.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert bench_memory.kernel_kind("cutlass::Kernel2<cutlass_80_tensorop>") == "gemm"
    assert bench_memory.kernel_kind("flash_fwd_kernel") == "attention"
    assert bench_memory.kernel_kind("at::native::vectorized_elementwise_kernel") == "other"


def _kernel(stream, ts, dur, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"stream": stream}}


def test_trace_overlap_splits_the_streams():
    # Main stream 7: [0, 100] and [200, 400] us. Side stream 20: [50, 150] (50 us beside the
    # main stream), [390, 450] (10 beside, 50 after its last kernel). A memcpy on 7 counts.
    events = [_kernel(7, 0, 100), _kernel(20, 50, 100), _kernel(7, 200, 150),
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 350, "dur": 50,
               "args": {"stream": 7}},
              _kernel(20, 390, 60),
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 5,
               "dur": 2000},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 6, "dur": 3},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 7, "dur": 3},
              {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1}]
    o = bench_memory.trace_overlap(events)
    assert o["span_ms"] == pytest.approx(0.45)
    assert o["busy_ms"] == pytest.approx(0.40)  # [0, 150] and [200, 450]
    assert o["main_stream"] == "7" and o["main_ms"] == pytest.approx(0.30)
    assert o["others_ms"] == pytest.approx(0.16)
    assert o["both_busy_ms"] == pytest.approx(0.06)
    assert o["others_after_main_ms"] == pytest.approx(0.05)
    assert list(o["streams_ms"]) == ["7", "20"]
    assert o["host_waits"] == {"cudaStreamSynchronize": [1, pytest.approx(2.0)]}
    assert bench_memory.trace_overlap([]) == {}


def _frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


def test_memory_peak_replays_the_trace_to_its_highest_point():
    torch_frame = _frame("/x/site-packages/torch/nn/functional.py", 10, "linear")
    model = [torch_frame, _frame("/x/transformers/models/llama/modeling_llama.py", 5, "forward")]
    recompute = [torch_frame, _frame("/x/site-packages/torch/utils/checkpoint.py", 3, "recompute")]
    acc = [_frame("/repo/flora_ext/accumulation.py", 7, "down_project")]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": model},
        {"action": "alloc", "addr": 2, "size": 50, "frames": acc},
        {"action": "free_requested", "addr": 99, "size": 1000},  # allocated before the trace
        {"action": "alloc", "addr": 3, "size": 30, "frames": recompute},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},
        {"action": "alloc", "addr": 5, "size": 10, "frames": acc},
    ]
    peak, at, sites = bench_memory.peak_breakdown(events)
    # live: 100+50+30 = 180 at event 3; then 50+30+60 = 140, +10 = 150 < 180
    assert (peak, at) == (180, 3)
    assert sites == {"modeling_llama.py:5 forward": (100, 1),
                     "accumulation.py:7 down_project": (50, 1),
                     "torch.utils.checkpoint (recomputation)": (30, 1)}
    assert bench_memory._alloc_site([]).startswith("(no Python frame")
    assert bench_memory._alloc_site([torch_frame]) == "functional.py:10 linear"


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


# ------------------------------------------------------------------ --chunked-loss and lean rows


def _tiny_model(dtype=torch.float32):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = bench_memory.MODEL_TINY
    return bench_memory.build_model(shape, "cpu", dtype, checkpointing=False), shape


@pytest.mark.parametrize("chunk", [16, 63, 512], ids=["4_chunks", "one_exact", "one_larger"])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(chunk):
    model, shape = _tiny_model()
    vocab, seq = shape[4], shape[5]
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    own = model(input_ids=ids, labels=ids, use_cache=False).loss
    own.backward()
    own_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    chunked = bench_memory.chunked_causal_lm_loss(model, ids, chunk)
    chunked.backward()
    # float32 rounding of a different summation order: a few ulps of the loss (~5)
    assert abs(chunked.item() - own.item()) <= 1e-6 * own.item()
    assert chunked.item() != 0.0
    for (name, p), g in zip(model.named_parameters(), own_grads):
        err = ((p.grad - g).norm() / g.norm()).item()
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("name,buffer_dtype", [("flora_accum_q8_lean", torch.bfloat16),
                                               ("flora_accum_q8_lean8", torch.uint8)])
def test_lean_configurations_set_the_memory_options(name, buffer_dtype):
    import flora_ext

    model, shape = _tiny_model(torch.bfloat16)
    args = argparse.Namespace(micro_batches=2, lr=1e-3, flora_beta1=0.9, flora_rank=8, rank=8,
                              chunked_loss=16)
    step, opt, _ = bench_memory.make_trainer(name, model, args, torch.device("cpu"))
    assert isinstance(opt, flora_ext.Flora) and opt.quantization
    assert opt.param_groups[0]["max_aspect_ratio"] is None
    assert opt._accumulator().buffer_dtype == buffer_dtype
    ids = torch.randint(0, shape[4], (1, shape[5]), generator=torch.Generator().manual_seed(2))
    step([ids, ids])
    embedding = model.get_input_embeddings().weight  # 512 x 64: past the default limit of 4
    assert "seed" in opt.state[embedding]  # compressed momentum


def test_chunked_loss_rows_say_so(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bm.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"), "--tiny",
         "--device", "cpu", "--configs", "flora_accum", "flora_accum_lean", "--steps", "1",
         "--warmup", "1", "--chunked-loss", "--loss-chunk", "16", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["flags"] == "--chunked-loss (16 positions)" for r in rows)
    table = out.read_text()
    assert "| flags |" in table
    assert table.count("| --chunked-loss (16 positions) |") == 2


def test_accumulator_flags_name_only_the_rows_they_change():
    args = argparse.Namespace(chunked_loss=512, step_group_mb=256, overlap_steps=True)
    both = "--chunked-loss (512 positions), --step-group-mb 256, --overlap-steps"
    assert bench_memory.row_flags(args, "flora_accum_q8") == both
    assert bench_memory.row_flags(args, "adamw") == "--chunked-loss (512 positions)"
    assert bench_memory.row_flags(args) == both  # the run's flags
    plain = argparse.Namespace(chunked_loss=None, step_group_mb=0, overlap_steps=False)
    assert bench_memory.row_flags(plain, "flora_accum") == "-"


def test_tuning_reaches_the_children_and_the_flora_rows():
    assert bench_memory.parse_tuning("down_library=1") == ("down_library", 1)
    for bad in ("down_library", "down_library=on", "=1", "9x=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=INT"):
            bench_memory.parse_tuning(bad)
    args = argparse.Namespace(chunked_loss=None, step_group_mb=0, overlap_steps=False,
                              tuning={"down_library": 1, "side_streams": 0})
    tuned = "--tuning down_library=1 side_streams=0"
    assert bench_memory.row_flags(args, "flora") == tuned
    assert bench_memory.row_flags(args, "flora_accum") == tuned
    assert bench_memory.row_flags(args, "adamw") == "-"
    full = argparse.Namespace(device="cuda", steps=1, warmup=0, micro_batches=1, rank=8,
                              lr=1e-3, seq=None, micro_batch_size=1, no_checkpointing=False,
                              tiny=True, flora_beta1=0.9, flora_rank=8, **vars(args))
    cmd = bench_memory.child_command(full, "flora", "/tmp/r.json")
    at = cmd.index("--tuning")
    assert cmd[at + 1:at + 3] == ["down_library=1", "side_streams=0"]


def test_no_step_drops_every_gradient_and_leaves_the_weights():
    model, shape = _tiny_model(torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    args = argparse.Namespace(micro_batches=2, lr=1e-3, flora_beta1=0.9, flora_rank=8, rank=8,
                              chunked_loss=None)
    step, opt, _ = bench_memory.make_trainer("no_step", model, args, torch.device("cpu"))
    ids = torch.randint(0, shape[4], (1, shape[5]), generator=torch.Generator().manual_seed(3))
    losses = step([ids, ids])
    assert len(losses) == 2 and all(torch.isfinite(l) for l in losses)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert bench_memory.state_bytes(opt) == 0
