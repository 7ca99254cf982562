#!/usr/bin/env python3
"""Bytes a data-parallel Flora step sends, and what the compression costs in quality.

Three modes:

    # bytes per optimizer step on LLaMA-7B shapes (no GPU needed; the collective sizes are
    # recorded from flora_ext's own code on meta tensors, then checked against a real
    # 1-process gloo run on small shapes)
    python benchmarks/bench_comm.py [--ranks 128,256] [--out benchmarks/results/bench_comm.md]

    # the same collectives read back from torch.profiler in a real 2-process cycle, and the
    # cycle wall time (on the GPU machine; NCCL when 2 GPUs are visible, else gloo)
    python benchmarks/bench_comm.py --profile --device cuda

    # training quality: 2 gloo processes, plain DDP vs flora_comm_hook vs torch's PowerSGD
    # hook at about the same bytes, small GPT of benchmarks/convergence.py on its data
    python benchmarks/bench_comm.py --convergence --data data_cache/<key> --device cpu

What is counted: the payload of every all_reduce (elements x element size) per rank and
optimizer step. A ring all-reduce moves 2 (W - 1) / W times the payload per rank. DDP with
accumulation under no_sync() all-reduces once per step; the FloraAccumulator once per cycle.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import flora_ext  # noqa: E402
from flora_ext import distributed as fd  # noqa: E402
from bench_step import commit, llama_shapes  # noqa: E402  (the same LLaMA shapes)

LLAMA_7B = (4096, 11008, 32, 32000)  # hidden, intermediate, layers, vocab


def measured_on(device):
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return (f"{name}, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"commit {commit()}. Command: `python {' '.join(sys.argv)}`")


# ------------------------------------------------------------------ recording collectives
class _Done:
    """A finished collective for meta tensors (nothing to send)."""

    def __init__(self, tensor):
        self._future = torch.futures.Future()
        self._future.set_result([tensor])

    def wait(self):
        return True

    def get_future(self):
        return self._future


@contextlib.contextmanager
def recording():
    """Records (elements, bytes) of every dist.all_reduce; meta tensors are not sent."""
    sent = []
    real = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        sent.append((tensor.numel(), tensor.numel() * tensor.element_size()))
        if tensor.device.type == "meta":
            return _Done(tensor)
        return real(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    try:
        yield sent
    finally:
        dist.all_reduce = real


def one_process_group():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShapesModel(torch.nn.Module):
    """One parameter of each shape; the loss gives each a gradient (sum of p * a constant)."""

    def __init__(self, shapes, device="cpu", dtype=torch.float32):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for s in shapes)

    def forward(self, scale):
        return sum((p * scale).float().sum() for p in self.weights)


# ------------------------------------------------------------------ bytes
def accumulator_sent(shapes, rank, micro_batches=2, dtype=torch.float32, comm_dtype=torch.float32,
                     device="meta", model=None):
    """(elements, bytes) of the all-reduces of one FloraAccumulator cycle, recorded from the
    accumulator itself (a 1-rank group; on meta tensors nothing is computed or sent)."""
    one_process_group()
    module = model.module if model is not None else ShapesModel(shapes, device, dtype)
    opt = flora_ext.Flora(module.parameters(), lr=1e-3)
    if device == "meta":
        opt._step_param = lambda p, grad: None  # the step sends nothing; meta cannot step
    kwargs = dict(model=model) if model is not None else dict(process_group=None)
    acc = flora_ext.FloraAccumulator(opt, micro_batches=micro_batches, rank=rank,
                                     comm_dtype=comm_dtype, **kwargs)
    with recording() as sent:
        for _ in range(micro_batches):
            (model or module)(1.0).backward()
    acc.remove()
    return sent


class _StubBucket:
    """What flora_comm_hook reads of a GradBucket (one gradient a bucket)."""

    def __init__(self, grad, index, last):
        self.grad, self.i, self.last = grad, index, last

    def gradients(self):
        return [self.grad]

    def index(self):
        return self.i

    def is_last(self):
        return self.last

    def buffer(self):
        return self.grad.view(-1)


def comm_hook_sent(shapes, rank, dtype=torch.float32, min_compression_numel=16384):
    """(elements, bytes) flora_comm_hook all-reduces for gradients of ``shapes`` (meta)."""
    one_process_group()
    state = fd.FloraCommState(rank=rank, min_compression_numel=min_compression_numel)
    with recording() as sent:
        for i, shape in enumerate(shapes):
            grad = torch.empty(shape, device="meta", dtype=dtype)
            fd.flora_comm_hook(state, _StubBucket(grad, i, i == len(shapes) - 1)).wait()
    return sent


def ddp_bytes(shapes, element_size):
    return sum(math.prod(s) for s in shapes) * element_size


def _python_allreduce_hook(state, bucket):
    """DDP's default reduction, through dist.all_reduce so that it is recorded."""
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


def check_small():
    """The meta counts equal what real DDP, flora_comm_hook and FloraAccumulator runs send."""
    torch.manual_seed(0)
    shapes = llama_shapes(64, 176, 2, 320)
    rank = 16
    checks = []
    one_process_group()
    ddp = torch.nn.parallel.DistributedDataParallel(ShapesModel(shapes))
    ddp.register_comm_hook(None, _python_allreduce_hook)
    with recording() as sent:
        ddp(1.0).backward()
    checks.append(("DDP", sum(b for _, b in sent), ddp_bytes(shapes, 4)))
    ddp = torch.nn.parallel.DistributedDataParallel(ShapesModel(shapes))
    ddp.register_comm_hook(fd.FloraCommState(rank=rank, min_compression_numel=1024),
                           fd.flora_comm_hook)
    with recording() as sent:
        ddp(1.0).backward()
    checks.append(("flora_comm_hook", sum(b for _, b in sent),
                   sum(b for _, b in comm_hook_sent(shapes, rank, min_compression_numel=1024))))
    ddp = torch.nn.parallel.DistributedDataParallel(ShapesModel(shapes))
    real = sum(b for _, b in accumulator_sent(shapes, rank, device="cpu", model=ddp))
    checks.append(("FloraAccumulator", real, sum(b for _, b in accumulator_sent(shapes, rank))))
    for name, real, counted in checks:
        if real != counted:
            raise AssertionError(f"{name}: a real run sent {real} bytes, the count says {counted}")
    return checks


def bytes_table(args):
    shapes = llama_shapes(*LLAMA_7B)
    numel = sum(math.prod(s) for s in shapes)
    checks = check_small()
    base32, base16 = ddp_bytes(shapes, 4), ddp_bytes(shapes, 2)
    numels = [math.prod(s) for s in reversed(shapes)]
    ddp_buckets = {size: len(fd.plan_buckets(numels, 25 * 2**20 // size)) for size in (4, 2)}
    rows = [("DDP, fp32 gradients", base32, f"~{ddp_buckets[4]}",
             "every gradient element, 4 B, in 25 MiB buckets"),
            ("DDP, bf16 gradients", base16, f"~{ddp_buckets[2]}",
             "every gradient element, 2 B, in 25 MiB buckets")]
    for r in args.ranks:
        for comm in (torch.float32, torch.bfloat16):
            sent = accumulator_sent(shapes, r, comm_dtype=comm)
            rows.append((f"FloraAccumulator r={r}, comm_dtype={str(comm)[6:]}",
                         sum(b for _, b in sent), len(sent),
                         "compressed C per matrix, norms dense, in 25 MiB buckets, once a cycle"))
        sent = comm_hook_sent(shapes, r)
        rows.append((f"flora_comm_hook r={r}", sum(b for _, b in sent), "one a DDP bucket",
                     "every step; min_compression_numel=16384"))
    lines = [f"\n## Bytes all-reduced per optimizer step, LLaMA-7B shapes\n",
             f"Measured on: {measured_on('cpu')}\n",
             f"Shapes: embedding 32000x4096, 32 layers of q, k, v, o 4096x4096, gate and up "
             f"11008x4096, down 4096x11008, two norms 4096, final norm, head 32000x4096: "
             f"{numel:,} parameters. Payload per rank of the all-reduces the code issues "
             f"(recorded by wrapping torch.distributed.all_reduce on meta tensors; a ring "
             f"all-reduce moves 2(W-1)/W times this). The counts were checked against real "
             f"1-process gloo runs on small LLaMA shapes: "
             + ", ".join(f"{n} {real:,} B = counted" for n, real, _ in checks) + ".\n",
             "| scheme | bytes / step | vs DDP fp32 | vs DDP bf16 | all-reduces | what |",
             "|---|---:|---:|---:|---:|---|"]
    for name, nbytes, count, what in rows:
        lines.append(f"| {name} | {nbytes / 2**20:,.1f} MiB | {nbytes / base32:.4f} "
                     f"(1/{base32 / nbytes:.1f}) | {nbytes / base16:.4f} (1/{base16 / nbytes:.1f})"
                     f" | {count} | {what} |")
    report("\n".join(lines) + "\n", args.out)


def report(text, out):
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text)


# ------------------------------------------------------------------ spawned workers
def spawn(fn, nprocs, args, backend, timeout_s):
    """Runs fn(rank, world, *args) on nprocs processes; returns rank 0's return value."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(fn, r, nprocs, port, backend, tmp, args))
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)  # reap it, so that its exit code is set
        if hung or any(p.exitcode for p in procs):
            raise SystemExit(f"workers failed (exit codes {[p.exitcode for p in procs]}, "
                             f"timed out: {hung})")
        return torch.load(os.path.join(tmp, "rank0.pt"), weights_only=False)


def _worker(fn, rank, world, port, backend, tmp, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


# ------------------------------------------------------------------ --profile
def _profiled_bytes(prof):
    """Payload bytes of the all-reduces in a torch.profiler trace: the backend's
    'gloo:all_reduce' / 'nccl:all_reduce' events carry the flat tensor's shape (every buffer
    of this benchmark is float32: 4 bytes an element)."""
    total, seen = 0, 0
    for evt in prof.events():
        if evt.name in ("gloo:all_reduce", "nccl:all_reduce") and evt.input_shapes:
            total += sum(math.prod(shape) for shape in evt.input_shapes if shape) * 4
            seen += 1
    return total, seen, "profiler"


def _profile_worker(rank, world, device, shapes, r, k, cycles):
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else \
        torch.device("cpu")
    torch.manual_seed(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}

    def run(name, make, cycle):
        model, step = make()
        cycle(model, step)  # warm-up (DDP rebuilds its buckets after the first step)
        sync()
        with profile(activities=activities, record_shapes=True) as prof:
            cycle(model, step)
            sync()
        times = []
        for _ in range(cycles):
            dist.barrier()
            sync()
            start = time.perf_counter()
            cycle(model, step)
            sync()
            times.append(time.perf_counter() - start)
        nbytes, count, source = _profiled_bytes(prof)
        results[name] = dict(bytes=nbytes, collectives=count, source=source,
                             cycle_s=sorted(times)[len(times) // 2])

    def ddp_model():
        return torch.nn.parallel.DistributedDataParallel(
            ShapesModel(shapes, dev), device_ids=[dev.index] if device == "cuda" else None)

    def plain_ddp():
        model = ddp_model()
        return model, flora_ext.Flora(model.parameters(), lr=1e-3)

    def plain_cycle(model, opt):
        for i in range(k):
            ctx = model.no_sync() if i < k - 1 else contextlib.nullcontext()
            with ctx:
                model(1.0 / k).backward()
        opt.step()
        opt.zero_grad()

    def accumulator():
        model = ddp_model()
        opt = flora_ext.Flora(model.parameters(), lr=1e-3)
        flora_ext.FloraAccumulator(opt, micro_batches=k, rank=r, model=model)
        return model, opt

    def acc_cycle(model, opt):
        for _ in range(k):
            model(1.0 / k).backward()

    def hooked():
        model = ddp_model()
        model.register_comm_hook(fd.FloraCommState(rank=r), fd.flora_comm_hook)
        return model, flora_ext.Flora(model.parameters(), lr=1e-3)

    def hook_cycle(model, opt):
        model(1.0).backward()
        opt.step()
        opt.zero_grad()

    run(f"DDP + Flora, no_sync accumulation of {k}", plain_ddp, plain_cycle)
    run(f"FloraAccumulator r={r}, {k} micro-batches", accumulator, acc_cycle)
    run(f"flora_comm_hook r={r}, 1 micro-batch", hooked, hook_cycle)
    return results


def profile_mode(args):
    device = args.device
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    backend = "nccl" if gpus >= 2 else "gloo"
    hidden, inter, layers, vocab = args.profile_dims
    shapes = llama_shapes(hidden, inter, layers, vocab)
    results = spawn(_profile_worker, 2, (device, shapes, args.profile_rank, args.micro_batches,
                                         args.cycles), backend, args.timeout)
    counted_acc = sum(b for _, b in accumulator_sent(shapes, args.profile_rank))
    counted_hook = sum(b for _, b in comm_hook_sent(shapes, args.profile_rank))
    expected = [ddp_bytes(shapes, 4), counted_acc, counted_hook]
    lines = [f"\n## Profiled cycle, 2 processes ({backend})\n",
             f"Measured on: {measured_on(device)}\n",
             f"Model: LLaMA shapes hidden {hidden}, intermediate {inter}, {layers} layers, "
             f"vocab {vocab} ({sum(math.prod(s) for s in shapes):,} parameters, fp32), "
             f"{args.micro_batches} micro-batches a cycle; cycle time is the median of "
             f"{args.cycles} (forward, backward, all-reduces, steps; a forward here is a "
             f"trivial sum, so the time is the optimizer's and the communication's)."
             + (" Both processes share one GPU over gloo: the times say nothing of NCCL."
                if device == "cuda" and backend == "gloo" else "") + "\n",
             "| scheme | all-reduced bytes (profiler) | counted | collectives | cycle |",
             "|---|---:|---:|---:|---:|"]
    for (name, res), counted in zip(results.items(), expected):
        lines.append(f"| {name} | {res['bytes'] / 2**20:,.2f} MiB | {counted / 2**20:,.2f} MiB"
                     f" | {res['collectives']} ({res['source']}) | "
                     f"{res['cycle_s'] * 1e3:.1f} ms |")
    report("\n".join(lines) + "\n", args.out)


# ------------------------------------------------------------------ --convergence
def _conv_worker(rank, world, data_dir, cfg, steps, batch_size, lr, eval_every, seed):
    import convergence as conv
    import data as data_mod
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    torch.manual_seed(seed)
    splits = data_mod.load_splits(data_dir)
    d, layers, heads, context = cfg["dims"]
    model = conv.GPT(d, layers, heads, context)
    # One bucket: powerSGD_hook launches its second all-reduce from a future callback, which
    # over gloo can race with the next bucket's first one (a collective mismatch).
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=64)
    kind = cfg["kind"]
    k = cfg.get("micro_batches", 1)
    if kind == "flora_accum":
        opt = flora_ext.Flora(ddp.parameters(), lr=lr, rank=32, kappa=100, beta1=0.9)
        flora_ext.FloraAccumulator(opt, micro_batches=k, rank=cfg["rank"], model=ddp)
    elif kind == "ddp":
        ddp.register_comm_hook(None, _python_allreduce_hook)
    elif kind == "flora":
        ddp.register_comm_hook(fd.FloraCommState(rank=cfg["rank"], seed=seed,
                                                 min_compression_numel=cfg["min_numel"]),
                               fd.flora_comm_hook)
    else:
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg["rank"],
                                   start_powerSGD_iter=2, min_compression_rate=1,
                                   use_error_feedback=True, warm_start=True, random_seed=seed)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    if kind != "flora_accum":
        opt = flora_ext.Flora(ddp.parameters(), lr=lr, rank=32, kappa=100, beta1=0.9)
    sched = conv.make_scheduler(opt, steps, 0.05)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    windows = conv.eval_windows(splits["validation"], context, 64)
    log, sent_total = [], 0
    with recording() as sent:
        for step in range(1, steps + 1):
            for i in range(k):  # micro-batches of batch_size / k sequences
                x, y = conv.sample_batch(splits["train"], batch_size // k, context, gen)
                sync = kind == "flora_accum" or i == k - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    (conv.loss_fn(ddp, x, y) / k).backward()
            opt.step()  # for the accumulator: only checks that the cycle is complete
            opt.zero_grad()
            sched.step()
            if step % eval_every == 0 or step == steps:
                if rank == 0:
                    loss = conv.evaluate(model, windows, 64, "cpu", contextlib.nullcontext)
                    log.append((step, loss))
        sent_total = sum(b for _, b in sent)
    return dict(log=log, bytes_per_step=sent_total / steps)


def convergence_mode(args):
    dims = (args.d_model, args.n_layers, args.n_heads, args.context)
    import convergence as conv

    shapes = [tuple(p.shape) for p in conv.GPT(*dims).parameters()]
    configs = [dict(name="DDP (plain all-reduce)", kind="ddp", dims=dims)]
    for r in args.ranks:
        flora_bytes = sum(b for _, b in comm_hook_sent(shapes, r, min_compression_numel=4096))
        # PowerSGD sends (n + m) k per compressed matrix (P and Q) and the rest dense: the k
        # whose total comes closest to flora_comm_hook's
        best = min(range(1, r + 1), key=lambda k: abs(_powersgd_bytes(shapes, k) - flora_bytes))
        configs.append(dict(name=f"flora_comm_hook r={r}", kind="flora", rank=r, dims=dims,
                            min_numel=4096))
        configs.append(dict(name=f"PowerSGD hook rank {best}", kind="powersgd", rank=best,
                            dims=dims))
    if args.accumulate > 1:
        k = args.accumulate
        configs = [dict(name=f"DDP, no_sync accumulation of {k}", kind="ddp", dims=dims,
                        micro_batches=k)]
        configs += [dict(name=f"FloraAccumulator r={r}, {k} micro-batches", kind="flora_accum",
                         rank=r, dims=dims, micro_batches=k) for r in args.ranks]
    rows = []
    for cfg in configs:
        start = time.perf_counter()
        res = spawn(_conv_worker, 2, (args.data, cfg, args.steps, args.batch_size, args.lr,
                                      args.eval_every, args.seed), "gloo", args.timeout)
        rows.append((cfg["name"], res, time.perf_counter() - start))
        print(cfg["name"], res["log"][-1], f"{res['bytes_per_step']:,.0f} B/step", flush=True)
    evals = [step for step, _ in rows[0][1]["log"]]
    title = (f"DDP vs FloraAccumulator, {args.accumulate} micro-batches a step"
             if args.accumulate > 1 else "DDP vs flora_comm_hook vs PowerSGD")
    lines = [f"\n## Convergence: {title}, 2 gloo processes\n",
             f"Measured on: {measured_on('cpu')}\n",
             f"Model: benchmarks/convergence.py GPT, d_model {dims[0]}, {dims[1]} layers, "
             f"{dims[2]} heads, context {dims[3]}, {sum(math.prod(s) for s in shapes):,} "
             f"parameters; data {args.data}; {args.steps} steps of {args.batch_size} sequences "
             f"a rank (2 ranks), Flora(lr={args.lr}, rank=32, kappa=100, beta1=0.9), warmup 5% "
             f"then cosine to 10%; seed {args.seed}. Bytes: mean all-reduce payload a step "
             f"and rank, recorded; " + (
                 f"each step is {args.accumulate} micro-batches of "
                 f"{args.batch_size // args.accumulate} sequences (DDP under no_sync() but the "
                 f"last; the accumulator compresses all {args.accumulate} and all-reduces once)"
                 if args.accumulate > 1 else
                 "PowerSGD starts after 2 plain steps, with error feedback and warm start; "
                 "flora_comm_hook has no error feedback, min_compression_numel=4096") +
             f"; DDP with one 64 MiB bucket. Validation loss on 64 windows of the validation "
             f"split.\n",
             "| hook | bytes / step | " + " | ".join(f"val @ {s}" for s in evals) + " | wall |",
             "|---|---:|" + "---:|" * len(evals) + "---:|"]
    for name, res, wall in rows:
        lines.append(f"| {name} | {res['bytes_per_step'] / 1024:,.0f} KiB | "
                     + " | ".join(f"{loss:.4f}" for _, loss in res["log"]) + f" | {wall:.0f} s |")
    report("\n".join(lines) + "\n", args.out)


def _powersgd_bytes(shapes, k):
    """What powerSGD_hook (min_compression_rate=1) sends a step: P and Q of each matrix it
    compresses, the other tensors as they are (fp32)."""
    total = 0
    for s in shapes:
        n, m = s[0], math.prod(s[1:]) if len(s) > 1 else 1
        if len(s) > 1 and (n + m) * k < n * m:
            total += (n + m) * k
        else:
            total += n * m
    return total * 4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="256,128", help="projection ranks (comma separated)")
    ap.add_argument("--out", default=None, help="append the Markdown result to this file")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile-dims", default="1024,2752,4,32000",
                    help="hidden,intermediate,layers,vocab of the profiled model")
    ap.add_argument("--profile-rank", type=int, default=256)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--convergence", action="store_true")
    ap.add_argument("--data", default=None, help="prepared token directory (benchmarks/data.py)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=75)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--accumulate", type=int, default=1,
                    help="--convergence: K > 1 compares DDP's no_sync accumulation of K "
                         "micro-batches (batch-size / K sequences each) with FloraAccumulator")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.profile_dims = tuple(int(x) for x in args.profile_dims.split(","))
    if args.profile:
        profile_mode(args)
    elif args.convergence:
        if not args.data:
            ap.error("--convergence needs --data (a directory from benchmarks/data.py)")
        if args.ranks == [256, 128]:
            args.ranks = [16]
        convergence_mode(args)
    else:
        bytes_table(args)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
