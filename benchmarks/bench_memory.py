#!/usr/bin/env python3
"""Peak memory and throughput of training a LLaMA-7B-shaped decoder (issue 6).

The model is transformers' LlamaForCausalLM (hidden 4096, intermediate 11008, 32 layers,
32 heads, vocabulary 32000: 6.74B parameters), built from a LlamaConfig with random weights
directly on the GPU in bf16 (nothing is downloaded). Training: bf16 parameters, sequences of
2048 random tokens, micro-batch 1, 4 micro-batches per optimizer step, activation
checkpointing on every decoder layer (non-reentrant), SDPA attention; --layers,
--micro-batch-size and --no-checkpointing change them (benchmarks/bench_largest.py searches
over them). Configurations:

  flora_accum           flora_ext.Flora(beta1=--flora-beta1, rank=--flora-rank) +
                        flora_ext.FloraAccumulator (compressed accumulation with --rank;
                        Flora steps in the backward hooks of the last micro-batch): the
                        headline, Flora as its users run it
  flora_accum_q8        the same with quantization=True (8-bit momentum and unfactored
                        second moments, docs/FLORA.md §11)
  flora_accum_lean      flora_accum with FloraAccumulator(buffer_dtype=torch.bfloat16) and
                        Flora(max_aspect_ratio=None): bf16 accumulation buffers, compressed
                        momentum for the embedding and the head too
  flora_accum_q8_lean   flora_accum_lean with quantization=True
  flora_accum_lean8     flora_accum_lean with 8-bit accumulation buffers
                        (FloraAccumulator(buffer_dtype=torch.uint8))
  flora_accum_q8_lean8  flora_accum_lean8 with quantization=True
  flora_accum_defaults  the same with Flora's defaults (flora-opt's: no momentum)
  flora                 flora_ext.Flora (momentum as flora_accum), plain accumulation into
                        .grad, opt.step() after the last micro-batch
  adamw                 torch.optim.AdamW(fused=True), plain accumulation
  flora_opt             the authors' flora_opt.FloraAccelerator(accumulation_compression_rank=
                        --rank) with flora_opt.Flora (momentum as flora_accum; flora-opt 0.0.3,
                        bitsandbytes stubbed when missing)
  adamw8bit             torchao.optim.AdamW8bit, plain accumulation (needs torchao; not in
                        the default list)
  no_step               no optimizer: forward and backward only, each gradient dropped as
                        soon as it is accumulated (no state, no gradient memory, no step):
                        the ceiling of tokens/s that any optimizer can reach at a model size
                        and configuration (not in the default list)

Each configuration runs in its own subprocess, so
that peaks and allocator caches are isolated, under a shared --budget of wall time. Reported:
torch.cuda.max_memory_allocated over all steps (warm-up included: the optimizer state is
created in the first step), max_memory_reserved, the median step time over --steps timed
steps after --warmup steps (wall clock between torch.cuda.synchronize() calls, the whole
step: forward, backward, optimizer) and tokens/s = micro-batches * micro-batch size * seq /
median step time.
A configuration that runs out of memory is reported as OOM and the others still run.

--chunked-loss, for every configuration alike: the causal-LM loss is computed from the
model's final hidden states 512 positions at a time (--loss-chunk), each chunk's lm_head and
float32 cross-entropy under torch.utils.checkpoint (non-reentrant), so the full float32
logits of the sequence and their gradient never exist (one chunk's at a time, in forward
and again in backward). Same loss as the model's own (the mean cross-entropy of each next
token), up to float32 summation order; tests/test_bench_memory.py checks it on the tiny
model. The table's "flags" column says which rows ran with it.

    python benchmarks/bench_memory.py --out benchmarks/results/bench_memory.md
    python benchmarks/bench_memory.py --tiny --device cpu --out /tmp/bench_memory.md   # smoke
    python benchmarks/bench_memory.py --configs flora_accum adamw --profile /tmp/prof
    python benchmarks/bench_memory.py --configs flora_accum flora_accum_lean
        flora_accum_q8_lean --chunked-loss --budget 200 --min-config-s 40 --out /tmp/m.md

--profile DIR profiles one more step of each configuration: DIR/<config>.txt holds its top
kernels and host ops, and the JSON its wall time against the GPU's busy time by kernel kind
(flora_ext, GEMMs, attention, other), so a step slower than AdamW's shows whether the time
went to the optimizer's kernels or to a GPU waiting for the host (backward hooks, Python).
Its "streams" entry splits the GPU time by stream from the step's trace (kept as
DIR/<config>_trace.json.gz): the main stream's busy time, the other streams' (the side
streams of FloraAccumulator(overlap_steps=True) and of the step), how long both were busy,
how much of the others' work came after the main stream's last kernel, and the host calls
that wait for the GPU (synchronizations, blocking copies, cudaMalloc/cudaFree).

--memory-peak DIR records the CUDA allocator's history during one more step of each
configuration and writes DIR/<config>_peak.txt: the allocations live at that step's peak,
grouped by the first Python frame outside torch that made them (the model's layers, the
checkpoint's recomputation, the accumulator, the optimizer), on top of what was allocated
before the step (weights, optimizer state, the accumulation buffers of an open cycle).

Needs transformers (and accelerate + flora-opt for flora_opt): requirements-bench.txt.
The Markdown table goes to --out and the same results as JSON next to it (.json).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

# The source tree's flora_ext when it is built in place (python benchmarks/bench_memory.py puts
# benchmarks/, not the repository root, on sys.path).
_REPO = pathlib.Path(__file__).resolve().parent.parent
if (_REPO / "flora_ext" / "libflora.so").exists():
    sys.path.insert(0, str(_REPO))

# The headline is Flora as its users run it: momentum (beta1 0.9) kept at --flora-rank, with
# compressed accumulation; Flora's defaults (no momentum) are the row beside it.
CONFIGS = ("flora_accum", "flora_accum_q8", "flora_accum_lean", "flora_accum_q8_lean",
           "flora_accum_lean8", "flora_accum_q8_lean8",
           "flora_accum_defaults", "flora", "adamw", "flora_opt", "adamw8bit", "no_step")
# adamw8bit needs torchao, which requirements do not pin; the lean rows and no_step are asked
# for by name
DEFAULT_CONFIGS = ("flora_accum", "flora_accum_q8", "flora_accum_defaults", "flora", "adamw",
                   "flora_opt")
# Memory options on top of flora_accum: (Flora kwargs, FloraAccumulator kwargs), by name.
LEAN = {"flora_accum_lean": (dict(max_aspect_ratio=None), "bfloat16"),
        "flora_accum_q8_lean": (dict(max_aspect_ratio=None, quantization=True), "bfloat16"),
        "flora_accum_lean8": (dict(max_aspect_ratio=None), "uint8"),
        "flora_accum_q8_lean8": (dict(max_aspect_ratio=None, quantization=True), "uint8")}
DESCRIPTIONS = {
    "flora_accum": "flora_ext.Flora(beta1={beta1}, rank={flora_rank}) + FloraAccumulator (rank {rank})",
    "flora_accum_q8": "flora_accum with quantization=True (8-bit momentum)",
    "flora_accum_lean": "flora_accum with max_aspect_ratio=None (embedding and head compressed) "
                        "and FloraAccumulator(buffer_dtype=torch.bfloat16)",
    "flora_accum_q8_lean": "flora_accum_lean with quantization=True",
    "flora_accum_lean8": "flora_accum_lean with FloraAccumulator(buffer_dtype=torch.uint8) "
                         "(8-bit blockwise buffers)",
    "flora_accum_q8_lean8": "flora_accum_lean8 with quantization=True",
    "flora_accum_defaults": "flora_ext.Flora defaults (no momentum) + FloraAccumulator (rank {rank})",
    "flora": "flora_ext.Flora(beta1={beta1}, rank={flora_rank}), plain accumulation",
    "adamw": "torch.optim.AdamW(fused=True), plain accumulation",
    "adamw8bit": "torchao.optim.AdamW8bit (8-bit blockwise states), plain accumulation",
    "flora_opt": "flora-opt FloraAccelerator (rank {rank}) + flora_opt.Flora(beta1={beta1}, rank={flora_rank})",
    "no_step": "no optimizer (gradients dropped as they are accumulated): the ceiling of tokens/s",
}
# Configurations that run Flora with its defaults instead of --flora-beta1 / --flora-rank.
DEFAULTS_CONFIGS = ("flora_accum_defaults",)
# (hidden, intermediate, layers, heads, vocab, seq)
MODEL_7B = (4096, 11008, 32, 32, 32000, 2048)
MODEL_TINY = (64, 172, 2, 4, 512, 64)
GIB = 2.0**30


# ------------------------------------------------------------------------------- the child


def model_shape(args):
    """(hidden, intermediate, layers, heads, vocab, seq) of the run: LLaMA-7B's (or the tiny
    model's) with --layers and --seq when given."""
    shape = list(MODEL_TINY if args.tiny else MODEL_7B)
    if getattr(args, "layers", None):
        shape[2] = args.layers
    if args.seq:
        shape[5] = args.seq
    return tuple(shape)


def build_model(shape, device, dtype, checkpointing=True):
    """LlamaForCausalLM with random weights, created on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, vocab, seq = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=seq,
                         tie_word_embeddings=False, use_cache=False)
    try:  # transformers 4.36+ and 5.x: the attention implementation lives in the config
        config._attn_implementation = "sdpa"
    except Exception:  # noqa: BLE001 - an older or newer config: keep its default
        pass
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16, never in fp32 first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():  # in case a version created some parameter in fp32
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.train()
    if not checkpointing:
        return model
    # transformers 5.x: activation_checkpointing_enable (gradient_checkpointing_enable is
    # its deprecated alias there); 4.x: gradient_checkpointing_enable.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def chunked_causal_lm_loss(model, ids, chunk):
    """LlamaForCausalLM's causal-LM loss (the mean float32 cross-entropy of each next token,
    as model(input_ids=ids, labels=ids).loss) from the final hidden states, ``chunk``
    positions at a time: each chunk's lm_head and cross-entropy run under
    torch.utils.checkpoint (non-reentrant), so one chunk's logits exist at a time, in the
    forward and again in the backward, never the whole sequence's."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    hidden = model.model(input_ids=ids, use_cache=False)[0]  # after the final norm
    head = model.get_output_embeddings()

    def chunk_loss(h, targets):
        logits = head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum")

    batch, seq = ids.shape
    inputs, targets = hidden[:, :-1], ids[:, 1:]  # position i predicts token i + 1
    total = None
    for start in range(0, seq - 1, chunk):
        part = checkpoint(chunk_loss, inputs[:, start:start + chunk],
                          targets[:, start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total / (batch * (seq - 1))


def parse_tuning(text):
    """'down_library=1' -> ('down_library', 1): one argument of torch.ops.flora._set_tuning."""
    key, sep, value = text.partition("=")
    try:
        number = int(value)
    except ValueError:
        number = None
    if not sep or not key.isidentifier() or number is None:
        raise argparse.ArgumentTypeError(f"--tuning entries are KEY=INT, got {text!r}")
    return key, number


def tuning_args(tuning):
    """{'down_library': 1} -> ['down_library=1']: parse_tuning's inverse."""
    return [f"{k}={v}" for k, v in tuning.items()]


def row_flags(args, config=None):
    """The flags of a run that change what a row measures, for the table (none: '-'). The
    accumulator's flags apply to the flora_accum configurations only (config None: the run's)."""
    chunk = getattr(args, "chunked_loss", None)
    flags = [f"--chunked-loss ({chunk} positions)"] if chunk else []
    accumulates = config is None or config.startswith("flora_accum")
    if accumulates and getattr(args, "step_group_mb", 0):
        flags.append(f"--step-group-mb {args.step_group_mb}")
    if accumulates and getattr(args, "overlap_steps", False):
        flags.append("--overlap-steps")
    if getattr(args, "tuning", None) and (config is None or config.startswith("flora")):
        flags.append("--tuning " + " ".join(tuning_args(args.tuning)))
    return ", ".join(flags) or "-"


def state_bytes(opt):
    import torch

    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


class _NoOptimizer:
    """no_step's optimizer: no state, and step() and zero_grad() do nothing."""
    state = {}

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def make_trainer(name, model, args, device):
    """(one optimizer step over args.micro_batches micro-batches, optimizer, notes)."""
    import torch

    k = args.micro_batches
    params = [p for p in model.parameters() if p.requires_grad]
    flora_kwargs = dict(lr=args.lr)
    if name not in DEFAULTS_CONFIGS:
        flora_kwargs.update(beta1=args.flora_beta1, rank=args.flora_rank)
    if name == "flora_accum_q8":
        flora_kwargs.update(quantization=True)
    accumulator_kwargs = {}
    if name in LEAN:
        flora_kwargs.update(LEAN[name][0])
        accumulator_kwargs.update(buffer_dtype=getattr(torch, LEAN[name][1]))
    chunk = getattr(args, "chunked_loss", None)

    def forward(ids):
        if chunk:
            return chunked_causal_lm_loss(model, ids, chunk)
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    if name in ("flora_accum", "flora_accum_q8", *LEAN,
                "flora_accum_defaults", "flora", "adamw", "adamw8bit", "no_step"):
        import flora_ext

        if name == "no_step":
            # The ceiling of an optimizer's tokens/s: the same forward and backward, and
            # each gradient freed in its post-accumulate hook as FloraAccumulator's last
            # micro-batch frees it, but no state and no step.
            def drop(p):
                p.grad = None

            for p in params:
                p.register_post_accumulate_grad_hook(drop)
            opt = _NoOptimizer()
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=args.lr, fused=True)
        elif name == "adamw8bit":
            from torchao.optim import AdamW8bit

            opt = AdamW8bit(params, lr=args.lr)
        else:
            opt = flora_ext.Flora(params, **flora_kwargs)
        if name.startswith("flora_accum"):
            flora_ext.FloraAccumulator(opt, micro_batches=k, rank=args.rank, model=model,
                                       step_group_bytes=getattr(args, "step_group_mb", 0) << 20,
                                       overlap_steps=getattr(args, "overlap_steps", False),
                                       **accumulator_kwargs)

        def step(batch):
            losses = []
            for ids in batch:
                loss = forward(ids) / k
                loss.backward()  # flora_accum: the last one steps every parameter in its hook
                losses.append(loss.detach())
            opt.step()  # flora_accum: only checks that the cycle is complete
            opt.zero_grad(set_to_none=True)
            return losses
        return step, opt, {}

    if name == "flora_opt":
        from flora_ext.testing import import_flora_opt

        flora_opt = import_flora_opt()
        accelerator = flora_opt.FloraAccelerator(accumulation_compression_rank=args.rank,
                                                 gradient_accumulation_steps=k,
                                                 cpu=device.type == "cpu")
        opt = flora_opt.Flora(params, **flora_kwargs)
        model, opt = accelerator.prepare(model, opt)

        def step(batch):
            losses = []
            for ids in batch:
                with accelerator.accumulate(model):
                    loss = forward(ids)
                    accelerator.backward(loss)  # divides by gradient_accumulation_steps
                    opt.step()
                    opt.zero_grad()
                losses.append(loss.detach() / k)
            return losses
        notes = {}
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            notes["flora_opt_version"] = version("flora-opt")
        return step, opt, notes

    raise ValueError(f"unknown configuration {name!r}")


def kernel_kind(name):
    """The bucket of a CUDA kernel in a profile: flora_ext's own, GEMMs (cuBLAS, CUTLASS),
    attention, or other (elementwise, norms, copies, the loss)."""
    low = name.lower()
    if "flora" in low:
        return "flora"
    if any(k in low for k in ("gemm", "cutlass", "xmma", "sm90_", "cublas")):
        return "gemm"
    if any(k in low for k in ("flash", "attention", "fmha")):
        return "attention"
    return "other"


def _alloc_site(frames):
    """Where an allocation was made: the innermost Python frame outside torch itself (torch's
    checkpoint recomputation named as such), or the innermost frame, or the autograd engine."""
    for frame in frames:
        path = frame.get("filename", "")
        if "torch/utils/checkpoint.py" in path:
            return "torch.utils.checkpoint (recomputation)"
        if "/torch/" not in path and not path.startswith("<"):
            return f"{os.path.basename(path)}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{os.path.basename(frames[0].get('filename', '?'))}:{frames[0].get('line')} " \
               f"{frames[0].get('name')}"
    return "(no Python frame: autograd's backward kernels)"


def _replay(events, stop=None):
    """The allocations live after events[:stop] ({addr: (size, frames)}), their total bytes
    and the highest total on the way with the index of the event that reached it. Frees of
    blocks allocated before the trace began are ignored: they cannot raise the peak above
    what was live at its start."""
    live, total, peak, at = {}, 0, 0, -1
    for k, ev in enumerate(events[:stop]):
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > peak:
                peak, at = total, k
        elif action == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    return live, peak, at


def peak_breakdown(events):
    """Replays allocator trace events (dicts with action, addr, size, frames) and returns
    (peak bytes above the start, index of the event that reached it, {site: (bytes, count)}
    of the allocations live then): one pass finds the peak, a second stops there."""
    _, peak, at = _replay(events)
    live, _, _ = _replay(events, at + 1)
    sites = {}
    for size, frames in live.values():
        site = _alloc_site(frames)
        bytes_, count = sites.get(site, (0, 0))
        sites[site] = (bytes_ + size, count + 1)
    return peak, at, sites


def memory_peak_step(step, batch, device, out_dir, name):
    """One more step with the allocator's history recorded: writes OUT_DIR/NAME_peak.txt and
    returns what was allocated before it and the step's peak above that (GiB)."""
    import torch

    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python",
                                             max_entries=4_000_000, device=device)
    try:
        step(batch)
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
    events = snapshot["device_traces"][device.index or 0]
    peak, at, sites = peak_breakdown(events)
    lines = [f"{name}: allocated before the step {before / GIB:.3f} GiB; the step's peak "
             f"{(before + peak) / GIB:.3f} GiB, {peak / GIB:.3f} GiB above it, at trace event "
             f"{at} of {len(events)}", "",
             "| allocated at (first frame outside torch) | GiB live at the peak | blocks |",
             "|---|---|---|"]
    for site, (bytes_, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"| {site} | {bytes_ / GIB:.3f} | {count} |")
    os.makedirs(out_dir, exist_ok=True)
    pathlib.Path(out_dir, f"{name}_peak.txt").write_text("\n".join(lines) + "\n")
    return {"before_gib": before / GIB, "peak_above_gib": peak / GIB}


def _union(intervals):
    """Sorted disjoint [start, end] intervals covering ``intervals``."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _length(intervals):
    return sum(b - a for a, b in intervals)


def _intersect(x, y):
    """The intersection of two sorted disjoint interval lists."""
    i = j = 0
    out = []
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append([a, b])
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


# Host calls that wait for the GPU (or may: cudaFree and cudaMalloc synchronize the device).
_HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "cudaMemcpy", "cudaFree", "cudaMalloc", "cuStreamSynchronize", "cuMemFree")


def trace_overlap(events):
    """What a profiled step's streams did, from chrome-trace events (torch.profiler's
    export): the GPU span and its busy time (ms), each stream's busy time, the main stream
    (the busiest) against the others: the time both were busy, the others' time after the
    main stream's last kernel (what overlap_steps leaves on the critical path), and the
    host calls that wait for the GPU (count, ms)."""
    streams = {}
    waits = {}
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            stream = ev.get("args", {}).get("stream", ev.get("tid"))
            streams.setdefault(stream, []).append([ev["ts"], ev["ts"] + ev["dur"]])
        elif cat in ("cuda_runtime", "cuda_driver"):
            name = ev.get("name", "")
            if name.startswith(_HOST_WAITS) and "Async" not in name:
                count, us = waits.get(name, (0, 0.0))
                waits[name] = (count + 1, us + ev["dur"])
    if not streams:
        return {}
    busy = {k: _union(v) for k, v in streams.items()}
    every = _union([iv for v in busy.values() for iv in v])
    start, end = every[0][0], every[-1][1]
    main = max(busy, key=lambda k: _length(busy[k]))
    others = _union([iv for k, v in busy.items() if k != main for iv in v])
    main_end = busy[main][-1][1]
    after = _length([[max(a, main_end), b] for a, b in others if b > main_end])
    ms = 1e-3
    return {
        "span_ms": (end - start) * ms, "busy_ms": _length(every) * ms,
        "streams_ms": {str(k): _length(v) * ms for k, v in
                       sorted(busy.items(), key=lambda kv: -_length(kv[1]))},
        "main_stream": str(main), "main_ms": _length(busy[main]) * ms,
        "others_ms": _length(others) * ms,
        "both_busy_ms": _length(_intersect(busy[main], others)) * ms,
        "others_after_main_ms": after * ms,
        "host_waits": {k: [c, us * ms] for k, (c, us) in sorted(waits.items())},
    }


def profile_step(step, batch, device, out_dir, name):
    """One more optimizer step (all its micro-batches) under torch.profiler. Writes
    OUT_DIR/NAME.txt (the top kernels and host ops) and returns the split of the step's wall
    time: GPU busy time per kernel kind, and the rest, during which the GPU waited for the
    host (hooks, Python, launches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step(batch)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    kinds = {"flora": 0.0, "gemm": 0.0, "attention": 0.0, "other": 0.0}
    if cuda:
        for ev in prof.events():  # the kernels themselves (summed: overlapping streams twice)
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                kinds[kernel_kind(ev.name)] += ev.time_range.elapsed_us() / 1e6
    summary = {"wall_s": wall}
    os.makedirs(out_dir, exist_ok=True)
    if cuda:
        # Streams and host waits from the trace; the trace itself kept, gzipped, to look at.
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            raw = pathlib.Path(trace).read_bytes()
        data = json.loads(raw)
        summary["streams"] = trace_overlap(
            data["traceEvents"] if isinstance(data, dict) else data)
        with gzip.open(os.path.join(out_dir, f"{name}_trace.json.gz"), "wb") as f:
            f.write(raw)
        stats = torch.cuda.memory_stats(device)
        summary["alloc_retries"] = stats.get("num_alloc_retries", 0)
        busy = sum(kinds.values())
        summary.update(gpu_busy_s=busy, gpu_idle_s=max(0.0, wall - busy),
                       **{f"gpu_{k}_s": v for k, v in kinds.items()})
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    host = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    pathlib.Path(out_dir, f"{name}.txt").write_text(
        f"{name}: one optimizer step, {json.dumps(summary)}\n\n{table}\n\nhost:\n{host}\n")
    return summary


def run_child(args):
    """Measures one configuration; writes its result dict as JSON to args.result."""
    import torch

    result = {"config": args.child, "status": "error"}
    t_start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = model_shape(args)
    seq = shape[5]
    mbs = args.micro_batch_size

    def mem(fn):
        return fn(device) / GIB if cuda else None

    def save():
        result["wall_s"] = time.perf_counter() - t_start
        if cuda:
            result.setdefault("peak_allocated_gib", mem(torch.cuda.max_memory_allocated))
            result.setdefault("peak_reserved_gib", mem(torch.cuda.max_memory_reserved))
        pathlib.Path(args.result).write_text(json.dumps(result, indent=1))

    try:
        import flora_ext

        result["versions"] = versions()
        result["flora_ext_cuda_kernels"] = flora_ext.cuda_compiled()
        if getattr(args, "tuning", None):  # a variant of the CUDA step, for this process
            torch.ops.flora._set_tuning(**args.tuning)
            result["tuning"] = dict(args.tuning)
        t0 = time.perf_counter()
        torch.manual_seed(0)  # the same initial weights for every configuration
        model = build_model(shape, device, torch.bfloat16, checkpointing=not args.no_checkpointing)
        if cuda:
            torch.cuda.synchronize(device)
        result["init_s"] = time.perf_counter() - t0
        result["params"] = sum(p.numel() for p in model.parameters())
        result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        result["after_init_gib"] = mem(torch.cuda.memory_allocated)
        gen = torch.Generator().manual_seed(0)
        batch = [torch.randint(0, shape[4], (mbs, seq), generator=gen).to(device)
                 for _ in range(args.micro_batches)]
        step, opt, notes = make_trainer(args.child, model, args, device)
        result.update(notes)
        result["flags"] = row_flags(args, args.child)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step_losses = step(batch)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            losses.append(sum(l.item() for l in step_losses))
            print(f"[{args.child}] step {i + 1}/{args.warmup + args.steps}: {times[-1]:.3f} s, "
                  f"loss {losses[-1]:.4f}"
                  + (f", peak {mem(torch.cuda.max_memory_allocated):.2f} GiB" if cuda else ""),
                  flush=True)
        if args.memory_peak and cuda:
            result["memory_peak"] = memory_peak_step(step, batch, device, args.memory_peak,
                                                     args.child)
        if args.profile:
            result["profile"] = profile_step(step, batch, device, args.profile, args.child)
        steps_taken = [s.get("step") for s in getattr(opt, "optimizer", opt).state.values()]
        steps_taken = [int(s) for s in steps_taken if s is not None]
        result["optimizer_steps"] = (min(steps_taken), max(steps_taken)) if steps_taken else None
        timed = times[args.warmup:]
        median = statistics.median(timed)
        result.update(
            status="ok", step_times_s=times, median_step_s=median, min_step_s=min(timed),
            tokens_per_s=args.micro_batches * mbs * seq / median, losses=losses,
            optimizer_state_gib=state_bytes(getattr(opt, "optimizer", opt)) / GIB)
    except torch.OutOfMemoryError as err:
        result.update(status="OOM", error=str(err).splitlines()[0][:300])
    except Exception as err:  # noqa: BLE001 - reported in the table, the others still run
        oom = "out of memory" in str(err).lower()
        result.update(status="OOM" if oom else "error",
                      error=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
        traceback.print_exc()
    save()
    print(f"[{args.child}] {result['status']} in {result['wall_s']:.1f} s", flush=True)


# ------------------------------------------------------------------------------ the parent


def child_command(args, name, result_path):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", result_path,
           "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--micro-batches", str(args.micro_batches), "--rank", str(args.rank),
           "--lr", repr(args.lr)]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    if getattr(args, "layers", None):
        cmd += ["--layers", str(args.layers)]
    cmd += ["--micro-batch-size", str(args.micro_batch_size)]
    if args.no_checkpointing:
        cmd.append("--no-checkpointing")
    if args.tiny:
        cmd.append("--tiny")
    cmd += ["--flora-beta1", repr(args.flora_beta1), "--flora-rank", str(args.flora_rank)]
    if getattr(args, "profile", None):
        cmd += ["--profile", os.path.abspath(args.profile)]
    if getattr(args, "memory_peak", None):
        cmd += ["--memory-peak", os.path.abspath(args.memory_peak)]
    if getattr(args, "chunked_loss", None):
        cmd += ["--chunked-loss", "--loss-chunk", str(args.chunked_loss)]
    if getattr(args, "step_group_mb", 0):
        cmd += ["--step-group-mb", str(args.step_group_mb)]
    if getattr(args, "overlap_steps", False):
        cmd.append("--overlap-steps")
    if getattr(args, "tuning", None):
        cmd += ["--tuning", *tuning_args(args.tuning)]
    return cmd


def run_config(args, name, deadline, stdout=None):
    """Runs configuration ``name`` in a child process until ``deadline`` (time.monotonic);
    returns its result dict (status skipped, timeout or error when it gave none)."""
    left = deadline - time.monotonic()
    if left < args.min_config_s:
        return {"config": name, "status": "skipped",
                "error": f"time budget (--budget {args.budget:g} s) spent"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        start = time.monotonic()
        try:
            proc = subprocess.run(child_command(args, name, path), timeout=left, stdout=stdout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
        if os.path.exists(path):
            result = json.loads(pathlib.Path(path).read_text())
        else:
            result = {"config": name}
        if rc is None:
            result.update(status="timeout", error=f"killed after {left:.0f} s (--budget)")
        elif "status" not in result:
            result.update(status="error", error=f"the subprocess exited with status {rc} "
                                                f"without a result (killed?)")
        result.setdefault("wall_s", time.monotonic() - start)
        return result


def versions():
    """Device name and package versions, asked in the child: the parent never touches CUDA
    (a CUDA context there would take GPU memory from the children)."""
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["device_total_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    for module in ("transformers", "accelerate", "flora_ext"):
        with contextlib.suppress(Exception):
            info[module] = __import__(module).__version__
    return info


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(meta, results):
    shape = meta["model"]
    lines = [
        f"### {meta['title']}",
        "",
        f"{meta['device_name']}, torch {meta['torch']}, transformers "
        f"{meta.get('transformers', '?')}, accelerate {meta.get('accelerate', '-')}, "
        f"flora_ext {meta.get('flora_ext', '?')}; {meta['date']}. Command: `{meta['command']}`",
        "",
        f"LlamaForCausalLM, hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
        f"{shape['layers']} layers, {shape['heads']} heads, vocabulary {shape['vocab']} "
        f"({fmt(meta.get('params'), ',')} parameters, random init, bf16), sequence "
        f"{meta['seq']}, micro-batch {meta['micro_batch_size']}, {meta['micro_batches']} "
        f"micro-batches a step ({meta['tokens_per_step']} tokens), "
        + ("activation checkpointing (non-reentrant), " if meta["checkpointing"]
           else "no activation checkpointing, ") +
        f"attention {meta.get('attn_implementation', '?')}. Flora: {meta['flora']}. "
        f"Peak = torch.cuda.max_memory_allocated over {meta['warmup']} warm-up + "
        f"{meta['steps']} timed steps; step time = median of the timed steps (whole step, "
        f"CUDA-synchronised); weights = memory allocated after building the model.",
        "",
        "| config | what | flags | peak allocated (GiB) | peak reserved (GiB) | weights (GiB) "
        "| optimizer state (GiB) | median step (s) | tokens/s | x AdamW tokens/s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    adamw = next((r for r in results if r["config"] == "adamw" and r["status"] == "ok"), None)
    for r in results:
        what = DESCRIPTIONS[r["config"]].format(rank=meta["rank"], beta1=meta["beta1"],
                                                flora_rank=meta["flora_rank"])
        what += f" | {r.get('flags', meta.get('flags', '-'))}"
        if r["status"] == "ok":
            rel = (fmt(r["tokens_per_s"] / adamw["tokens_per_s"], ".2f") if adamw else "-")
            lines.append(
                f"| {r['config']} | {what} | {fmt(r.get('peak_allocated_gib'), '.2f')} | "
                f"{fmt(r.get('peak_reserved_gib'), '.2f')} | {fmt(r.get('after_init_gib'), '.2f')} | "
                f"{fmt(r.get('optimizer_state_gib'), '.2f')} | {r['median_step_s']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {rel} | ok |")
        else:
            status = r["status"]
            detail = r.get("error", "")
            cell = "OOM" if status == "OOM" else "-"
            lines.append(f"| {r['config']} | {what} | {cell} | {cell} | "
                         f"{fmt(r.get('after_init_gib'), '.2f')} | - | {cell} | {cell} | - "
                         f"| {status}{': ' + detail.replace('|', '/') if detail else ''} |")
    lines.append("")
    return "\n".join(lines) + "\n"


def run_parent(args):
    deadline = time.monotonic() + args.budget
    configs = args.configs
    for name in configs:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    shape = model_shape(args)
    seq = shape[5]
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    for name in configs:
        print(f"== {name} ({deadline - time.monotonic():.0f} s of the budget left)", flush=True)
        results.append(run_config(args, name, deadline))
        r = results[-1]
        print(f"== {name}: {r['status']}, peak {fmt(r.get('peak_allocated_gib'), '.2f')} GiB, "
              f"median step {fmt(r.get('median_step_s'), '.3f')} s, "
              f"{fmt(r.get('tokens_per_s'), ',.0f')} tokens/s, {r.get('wall_s', 0):.0f} s wall",
              flush=True)
    first_ok = next((r for r in results if r.get("params")), {})
    import torch

    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "device": args.device, "device_name": args.device}
    meta.update(next((r["versions"] for r in results if r.get("versions")), {}))
    if not args.device.startswith("cuda"):
        meta["device_name"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    flora = (f"beta1={args.flora_beta1}, momentum rank {args.flora_rank}, except "
             f"{', '.join(DEFAULTS_CONFIGS)} (defaults: no momentum)")
    meta.update(
        title=("Tiny smoke-test model" if args.tiny else "LLaMA-7B shapes")
        + f", accumulation rank {args.rank}",
        date=f"{started:%Y-%m-%d %H:%M} UTC",
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        model=dict(zip(("hidden", "intermediate", "layers", "heads", "vocab"), shape[:5])),
        params=first_ok.get("params"), attn_implementation=first_ok.get("attn_implementation"),
        seq=seq, micro_batches=args.micro_batches, micro_batch_size=args.micro_batch_size,
        checkpointing=not args.no_checkpointing,
        tokens_per_step=seq * args.micro_batches * args.micro_batch_size,
        rank=args.rank, lr=args.lr, flora=flora, beta1=args.flora_beta1,
        flags=row_flags(args),
        flora_rank=args.flora_rank, steps=args.steps, warmup=args.warmup,
        wall_s=args.budget - (deadline - time.monotonic()))
    table = markdown(meta, results)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Peak memory and throughput, LLaMA-7B shapes (benchmarks/bench_memory.py)"
                   "\n\n" + table)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results},
                                                   indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')} ({meta['wall_s']:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="NAME",
                    help=f"configurations to run, in order, of {', '.join(CONFIGS)} "
                         f"(default: {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--micro-batches", type=int, default=4, help="per optimizer step (4)")
    ap.add_argument("--micro-batch-size", type=int, default=1,
                    help="sequences per micro-batch (1)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (LLaMA-7B's 32; the tiny model's 2)")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="keep every activation instead of recomputing each layer's")
    ap.add_argument("--rank", type=int, default=None,
                    help="accumulation rank of flora_accum and flora_opt (256; 8 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (2048; 64 --tiny)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--flora-beta1", type=float, default=0.9,
                    help="Flora's momentum in every configuration but flora_accum_defaults (0.9)")
    ap.add_argument("--flora-rank", type=int, default=None,
                    help="Flora's momentum rank, as --flora-beta1 (256; 8 with --tiny)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny LLaMA (hidden 64, 2 layers) that runs on the CPU, for testing")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, profile one more step of each configuration: "
                         "DIR/<config>.txt, and the GPU busy time by kernel kind and by stream "
                         "against the wall time in the results (where a slower step's time "
                         "goes); CUDA: the trace as DIR/<config>_trace.json.gz")
    ap.add_argument("--memory-peak", default=None, metavar="DIR",
                    help="CUDA: record the allocator's history during one more step of each "
                         "configuration; DIR/<config>_peak.txt lists what is live at its peak, "
                         "by where it was allocated")
    ap.add_argument("--chunked-loss", action="store_true",
                    help="every configuration: the loss from the final hidden states in chunks "
                         "of --loss-chunk positions, each chunk's lm_head and float32 "
                         "cross-entropy checkpointed, so the full float32 logits never exist")
    ap.add_argument("--step-group-mb", type=int, default=0,
                    help="FloraAccumulator(step_group_bytes=N MiB) for the flora_accum "
                         "configurations: the last micro-batch's hooks step N MiB of "
                         "gradients a call instead of one parameter (default 0)")
    ap.add_argument("--overlap-steps", action="store_true",
                    help="FloraAccumulator(overlap_steps=True) for the flora_accum "
                         "configurations: the hooks' work (compression, steps) on a second "
                         "CUDA stream, beside the rest of the backward pass")
    ap.add_argument("--tuning", nargs="+", type=parse_tuning, default=[], metavar="KEY=INT",
                    help="CUDA: torch.ops.flora._set_tuning(KEY=INT, ...) in every "
                         "configuration's process before its model is built (a variant of "
                         "the step, e.g. down_library=1; docs/cuda.md section 8)")
    ap.add_argument("--loss-chunk", type=int, default=512,
                    help="positions a chunk with --chunked-loss (default %(default)s)")
    ap.add_argument("--out", default="benchmarks/results/bench_memory.md",
                    help="Markdown output; the JSON goes next to it (default %(default)s)")
    ap.add_argument("--budget", type=float, default=330.0,
                    help="wall seconds for all configurations together; one still running "
                         "then is killed and reported as timeout (default %(default)s)")
    ap.add_argument("--min-config-s", type=float, default=30.0, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is None:
        args.rank = 8 if args.tiny else 256
    if args.flora_rank is None:
        args.flora_rank = 8 if args.tiny else 256
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.loss_chunk < 1:
        ap.error("--loss-chunk must be >= 1")
    args.tuning = dict(args.tuning)
    # from here on: the chunk size with --chunked-loss, else None
    args.chunked_loss = args.loss_chunk if args.chunked_loss else None
    if (args.steps < 1 or args.warmup < 0 or args.micro_batches < 1
            or args.micro_batch_size < 1 or (args.layers is not None and args.layers < 1)):
        ap.error("--steps >= 1, --warmup >= 0, --micro-batches, --micro-batch-size and "
                 "--layers >= 1")
    if args.child:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
