#!/usr/bin/env python3
"""Training quality of Flora against the optimizers it replaces (issue 5).

Part 1 (from scratch, the momentum setting): a small pre-norm GPT on byte tokens,
trained for a fixed token budget with each optimizer and seed; one run directory
per (optimizer spec, lr, seed) under --run-dir, resumable.

    # data: once, on a machine with apt (the result is a self-contained directory)
    python benchmarks/data.py --fetch-python-doc --out data_cache
    # part 1 (on the GPU)
    python benchmarks/convergence.py --part 1 --data data_cache/<key> --run-dir runs/part1 \\
        --optimizers flora,adafactor_momentum,adafactor,adamw,flora_opt,galore \\
        --seeds 0,1,2 --tokens 100e6 --model-size base --device cuda
    # learning-rate sweep: every optimizer at each lr of its grid (LR_GRIDS), seed 0
    python benchmarks/convergence.py --part 1 --lr-sweep --seeds 0 ... --run-dir runs/part1
    # then each optimizer at its best lr of the sweep (choose_lr; runs/part1/lr_choice.json);
    # with the same --steps and --run-dir, seed 0 is the sweep's run
    python benchmarks/convergence.py --part 1 --lr-from runs/part1 --seeds 0,1,2 ... \
        --run-dir runs/part1

Optimizer specs: NAME[:key=value[:key=value...]], keys rank, kappa, lr, beta1, and q8=1
(flora_ext's quantization=True: 8-bit state) (e.g. ``flora:rank=64:kappa=100:q8=1``). Names:
  flora              flora_ext.Flora(rank, kappa, beta1=0.9)   compressed momentum
  adafactor_momentum flora_ext.Flora(rank=None, beta1=0.9)      dense momentum
  adafactor          flora_ext.Flora(beta1=None)                no momentum
  adamw              torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0)
  flora_opt          the authors' flora_opt.Flora with the same arguments as flora
  galore             galore_torch.GaLoreAdamW (rank, update_proj_gap=kappa) on the
                     2-D weights of the blocks; an error if galore-torch is missing
                     (bitsandbytes, which it imports for its 8-bit AdamW, is stubbed)
All runs use the same schedule: linear warmup (--warmup fraction of the steps) then
cosine decay to 10% of the peak lr. Same seed -> same initial model and same batches
for every optimizer.

Each run writes RUN/log.json: the arguments, validation loss against tokens seen,
final validation and test loss, optimizer-state bytes (sum of the state tensors,
measured after the first step), peak CUDA memory, tokens/s (training steps only,
evaluation excluded; steady_tokens_per_s leaves out the first steps), wall-clock
points ('clock'). RUN/ckpt.pt holds model + optimizer + scheduler + data RNG + step
(written every --ckpt-every steps and at the end); log.json is also rewritten at every
evaluation. A run whose log says finished is skipped.

Several runs at once: --jobs N runs them in N spawned worker processes (small models
do not fill a GPU; each run's output goes to RUN/output.txt, --threads sets torch's
CPU threads per process). --deadline UNIX_TIME makes runs save and stop when it
passes (log 'stopped_early'; the same command resumes them) and skips runs not yet
started. tools/gpu_convergence.sh drives all of this within a fixed time budget.

Part 2 (fine-tuning with gradient accumulation, the memory setting): see run_part2.

    python benchmarks/convergence.py --part 2 --data data_cache/<key> --run-dir runs/part2 \\
        --init-from best:runs/part1 --modes flora_accum,naive,lora,small_batch \\
        --rank 128 --accum 16 --micro-batch-size 4 --steps 300 --seeds 0,1,2 --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as data_mod  # noqa: E402  (benchmarks/data.py)

import flora_ext  # noqa: E402

# ------------------------------------------------------------------------------ model

# name: (d_model, n_layers, n_heads, context)
MODEL_SIZES = {
    "tiny": (32, 1, 2, 32),          # tests
    "small": (256, 4, 4, 256),       # ~3.3M parameters
    "base": (512, 8, 8, 256),        # ~25.5M parameters
    "large": (640, 10, 10, 256),     # ~49.5M parameters
}
VOCAB = 256


class Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    """Pre-norm decoder-only transformer over bytes; untied output head."""

    def __init__(self, d_model, n_layers, n_heads, context, vocab=VOCAB):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if name.endswith("proj.weight") or name.endswith("fc2.weight"):
                    std = 0.02 / math.sqrt(2 * n_layers)
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def model_dims(args):
    d, l, h, c = MODEL_SIZES[args.model_size]
    return (args.d_model or d, args.n_layers or l, args.n_heads or h, args.context or c)


def loss_fn(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


# ------------------------------------------------------------------------------- data


def sample_batch(tokens, batch_size, context, generator):
    starts = torch.randint(0, tokens.numel() - context - 1, (batch_size,), generator=generator)
    w = tokens[starts[:, None] + torch.arange(context + 1)].long()
    return w[:, :-1], w[:, 1:]


def eval_windows(tokens, context, max_windows):
    """Evenly spaced, non-overlapping windows: the same for every run."""
    n = (tokens.numel() - 1) // context
    idx = torch.linspace(0, n - 1, steps=min(n, max_windows)).long() * context
    w = tokens[idx[:, None] + torch.arange(context + 1)].long()
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, windows, batch_size, device, autocast):
    model.eval()
    x_all, y_all = windows
    total, count = 0.0, 0
    for i in range(0, x_all.shape[0], batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        with autocast():
            total += loss_fn(model, x, y).item() * x.shape[0]
        count += x.shape[0]
    model.train()
    return total / count


# -------------------------------------------------------------------------- optimizers

OPTIMIZERS = ("flora", "adafactor_momentum", "adafactor", "adamw", "flora_opt", "galore")
# learning-rate grids of --lr-sweep (peak lr of the schedule). The Adafactor family
# scales the step by the parameter RMS (scale_parameter=True), hence larger values.
# With weights initialised at std 0.02 the effective step of a matrix is about 0.02 lr.
LR_GRIDS = {
    "flora": [1e-2, 3e-2, 1e-1],
    "adafactor_momentum": [1e-2, 3e-2, 1e-1],
    "adafactor": [1e-2, 3e-2, 1e-1],
    "flora_opt": [1e-2, 3e-2, 1e-1],
    "adamw": [3e-4, 1e-3, 3e-3],
    "galore": [3e-4, 1e-3, 3e-3],
}
DEFAULT_LR = {k: v[1] for k, v in LR_GRIDS.items()}


def parse_spec(spec, args):
    """'flora:rank=64:kappa=100' -> dict(name=..., rank=..., kappa=..., lr=..., beta1=...)."""
    name, *kvs = spec.split(":")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    cfg = {"name": name, "rank": args.rank, "kappa": args.kappa, "lr": args.lr, "beta1": 0.9}
    for kv in kvs:
        k, _, v = kv.partition("=")
        if k not in ("rank", "kappa", "lr", "beta1", "q8") or not v:
            raise ValueError(f"bad optimizer option {kv!r} in {spec!r} "
                             f"(keys: rank, kappa, lr, beta1, q8)")
        if k == "q8" and (v not in ("0", "1") or not name.startswith(("flora", "adafactor"))
                          or name == "flora_opt"):
            raise ValueError(f"q8 is 0 or 1, for flora_ext's optimizers, got {kv!r} in {spec!r}")
        cfg[k] = float(v) if k in ("lr", "beta1") else int(v)
    if cfg["lr"] is None:
        cfg["lr"] = DEFAULT_LR[name]
    return cfg


def run_name(cfg, seed):
    parts = [cfg["name"]]
    if cfg["name"] in ("flora", "flora_opt", "galore"):
        parts += [f"r{cfg['rank']}", f"k{cfg['kappa']}"]
    if cfg["name"] != "adafactor" and cfg["beta1"] != 0.9:
        parts.append(f"b{cfg['beta1']:g}")
    if cfg.get("q8"):
        parts.append("q8")
    parts += [f"lr{cfg['lr']:g}", f"s{seed}"]
    return "-".join(parts)


def _stub_bitsandbytes_optim():
    """Stand-ins for the bitsandbytes names galore-torch imports at import time.

    galore-torch 1.0 imports ``bitsandbytes.optim.optimizer.Optimizer2State`` in
    ``galore_torch/__init__.py`` for its 8-bit AdamW only; GaLoreAdamW (used here) needs
    nothing from bitsandbytes, which is not installed on the device machine. A stub module
    (possibly already put there by flora_ext.testing for flora-opt) gets an ``optim``
    submodule whose Optimizer2State refuses to be constructed.
    """
    import types

    class Optimizer2State(torch.optim.Optimizer):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("bitsandbytes stub: GaLoreAdamW8bit needs the real bitsandbytes")

    bnb = sys.modules.get("bitsandbytes") or types.ModuleType("bitsandbytes")
    optim = types.ModuleType("bitsandbytes.optim")
    optimizer = types.ModuleType("bitsandbytes.optim.optimizer")
    optimizer.Optimizer2State = Optimizer2State
    optim.optimizer = optimizer
    bnb.optim = optim
    sys.modules.update({"bitsandbytes": bnb, "bitsandbytes.optim": optim,
                        "bitsandbytes.optim.optimizer": optimizer})


def import_galore():
    """galore_torch (galore-torch from PyPI), with bitsandbytes stubbed where it is missing."""
    import importlib

    try:
        return importlib.import_module("galore_torch")
    except ImportError as e:
        if "bitsandbytes" not in str(e):
            raise RuntimeError("optimizer 'galore' needs galore-torch and transformers "
                               "(pip install galore-torch; carry the wheel to the device "
                               f"machine): {e}") from e
    _stub_bitsandbytes_optim()
    return importlib.import_module("galore_torch")


def build_optimizer(cfg, model, seed):
    name, lr = cfg["name"], cfg["lr"]
    q8 = bool(cfg.get("q8"))
    params = list(model.parameters())
    if name == "flora":
        return flora_ext.Flora(params, lr=lr, rank=cfg["rank"], kappa=cfg["kappa"],
                               beta1=cfg["beta1"], seed=seed, quantization=q8)
    if name == "adafactor_momentum":
        return flora_ext.Flora(params, lr=lr, rank=None, beta1=cfg["beta1"], seed=seed,
                               quantization=q8)
    if name == "adafactor":
        return flora_ext.Flora(params, lr=lr, rank=None, beta1=None, seed=seed,
                               quantization=q8)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg["beta1"], 0.95), weight_decay=0.0)
    if name == "flora_opt":
        from flora_ext.testing import import_flora_opt

        return import_flora_opt().Flora(params, lr=lr, rank=cfg["rank"], kappa=cfg["kappa"],
                                        beta1=cfg["beta1"])
    if name == "galore":
        galore_torch = import_galore()
        lowrank = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
        ids = {id(p) for p in lowrank}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest},
                  {"params": lowrank, "rank": cfg["rank"], "update_proj_gap": cfg["kappa"],
                   "scale": 0.25, "proj_type": "std"}]
        return galore_torch.GaLoreAdamW(groups, lr=lr, betas=(cfg["beta1"], 0.95), weight_decay=0.0,
                                        no_deprecation_warning=True)
    raise AssertionError(name)


def make_scheduler(opt, steps, warmup_frac):
    warmup = max(1, int(warmup_frac * steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_state_bytes(opt):
    """Bytes of all tensors in the optimizer state (nested containers included)."""
    def walk(v):
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        if hasattr(v, "__dict__") and not isinstance(v, type):  # e.g. GaLore's projector
            return sum(walk(x) for x in vars(v).values())
        return 0
    return sum(walk(s) for s in opt.state.values())


# ---------------------------------------------------------------------------- training


def _progress(total, initial, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def finished_log(run_dir):
    """The log of the run in run_dir if it finished (which is then skipped), else None."""
    log_path = run_dir / "log.json"
    if not log_path.is_file():
        return None
    log = json.loads(log_path.read_text())
    if not log.get("finished"):
        return None
    print(f"[skip] {run_dir.name}: finished (final val loss {log['final_val_loss']:.4f})")
    return log


def save_log(run_dir, log):
    """Writes run_dir/log.json atomically."""
    tmp = run_dir / "log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, run_dir / "log.json")


def save_checkpoint(run_dir, checkpoint, log):
    """Writes run_dir/ckpt.pt atomically (a killed run keeps its last one), then log.json."""
    ckpt_path = run_dir / "ckpt.pt"
    tmp = ckpt_path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, ckpt_path)
    save_log(run_dir, log)


def past_deadline(args):
    return args.deadline is not None and time.time() >= args.deadline


def deadline_skip(run_dir):
    print(f"[deadline] {run_dir.name}: not started, --deadline has passed", flush=True)
    return {"run": run_dir.name, "finished": False, "skipped": "deadline"}


def result_without_training(run_dir, args):
    """The log to return instead of training: the run finished before, or the deadline has
    passed before it started; None when it should train (resuming if it has a checkpoint)."""
    finished = finished_log(run_dir)
    if finished is not None:
        return finished
    if past_deadline(args):
        return deadline_skip(run_dir)
    return None


class RunDevice:
    """The device side of a training run (part 1 and part 2 alike): bf16 autocast,
    synchronisation, and the peak memory of training alone (reset after evaluations)."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.bf16 = args.amp == "bf16" or (args.amp == "auto" and self.cuda)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def record_peak(self, log):
        if self.cuda:
            log["peak_memory_bytes"] = max(torch.cuda.max_memory_allocated(self.device),
                                           log["peak_memory_bytes"] or 0)

    def name_in(self, log):
        if self.cuda:
            log["device_name"] = torch.cuda.get_device_name(self.device)


def wait_barrier(args, run_dir):
    """With --barrier N: wait (at most --barrier-timeout s) until N runs under --run-dir have
    reached this point, so that runs timed together (calibration) share the GPU throughout."""
    if not args.barrier:
        return
    ready = pathlib.Path(args.run_dir) / ".barrier"
    ready.mkdir(parents=True, exist_ok=True)
    (ready / run_dir.name).touch()
    t_end = time.time() + args.barrier_timeout
    while (len(list(ready.iterdir())) < args.barrier and time.time() < t_end
           and not past_deadline(args)):
        time.sleep(0.02)


# Steps (part 1) or updates (part 2) at the start of a run that the steady-state
# throughput (steady_tokens_per_s) leaves out: CUDA/cuBLAS initialisation, allocator growth.
TIMING_WARMUP = 5


def train_run(cfg, seed, splits, args, run_dir):
    """Train one run (resuming from run_dir/ckpt.pt); returns its log dict.

    With --deadline, a run that reaches it evaluates, saves its checkpoint and log (with
    ``stopped_early``, not ``finished``) and returns; running the same command again resumes
    it. A run that would start after the deadline is not started.
    """
    run_dir = pathlib.Path(run_dir)
    ckpt_path = run_dir / "ckpt.pt"
    done = result_without_training(run_dir, args)
    if done is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    rd = RunDevice(args)
    device, autocast = rd.device, rd.autocast
    d, n_layers, n_heads, context = model_dims(args)
    tokens_per_step = args.batch_size * context
    steps = args.steps if args.steps else max(1, int(float(args.tokens) // tokens_per_step))

    torch.manual_seed(seed)
    model = GPT(d, n_layers, n_heads, context).to(device)
    opt = build_optimizer(cfg, model, seed)
    sched = make_scheduler(opt, steps, args.warmup)
    gen = torch.Generator().manual_seed(1000 + seed)
    val_windows = eval_windows(splits["validation"], context, args.eval_windows)
    log = {
        "run": run_dir.name, "part": 1, "optimizer": cfg, "seed": seed, "steps": steps,
        "tokens_per_step": tokens_per_step, "batch_size": args.batch_size,
        "model": {"size": args.model_size, "d_model": d, "n_layers": n_layers,
                  "n_heads": n_heads, "context": context,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "device": str(device), "bf16_autocast": rd.bf16, "warmup": args.warmup,
        "data": args.data, "torch": torch.__version__, "concurrent_jobs": args.jobs,
        "eval_windows": args.eval_windows,
        "val": [], "train_loss": [], "train_seconds": 0.0, "train_steps_timed": 0,
        "steady_seconds": 0.0, "steady_steps": 0,
        "optimizer_state_bytes": None, "peak_memory_bytes": None, "finished": False,
    }
    rd.name_in(log)
    step = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"].cpu())  # map_location moved it to the run device
        step, log = ck["step"], ck["log"]
        log.pop("stopped_early", None)
        print(f"[resume] {run_dir.name} at step {step}/{steps}")

    def save_ckpt():
        save_checkpoint(run_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                  "step": step, "log": log}, log)

    bar = _progress(steps, step, run_dir.name, args.progress)
    if step == 0:
        log["val"].append([0, evaluate(model, val_windows, args.eval_batch_size, device, autocast)])
    warm_step = min(TIMING_WARMUP, steps - 1)  # later steps count as steady state
    wait_barrier(args, run_dir)
    rd.sync()
    rd.reset_peak()
    log.setdefault("clock", []).append([step, time.time()])
    t_seg, seg_start = time.perf_counter(), step
    while step < steps:
        x, y = sample_batch(splits["train"], args.batch_size, context, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if log["optimizer_state_bytes"] is None:
            log["optimizer_state_bytes"] = optimizer_state_bytes(opt)
        lv = loss.item() if (step % args.log_every == 0 or step == steps) else None
        if lv is not None:  # loss.item() waited for the step: a wall-clock point
            log["clock"].append([step, time.time()])
            if not math.isfinite(lv):
                log["diverged"] = True
            log["train_loss"].append([step * tokens_per_step, lv])
        if bar is not None:
            bar.update(1)
            if lv is not None:
                bar.set_postfix(loss=f"{lv:.3f}")
        elif lv is not None and (step % (args.log_every * 10) == 0 or step == steps):
            print(f"{run_dir.name} step {step}/{steps} loss {lv:.4f}", flush=True)
        stop = step < steps and past_deadline(args)
        is_eval = step % args.eval_every == 0 or step == steps or stop
        is_ckpt = step % args.ckpt_every == 0 or step == steps or stop
        if is_eval or is_ckpt or step == warm_step:
            rd.sync()
            seconds = time.perf_counter() - t_seg
            log["train_seconds"] += seconds
            log["train_steps_timed"] += step - seg_start
            if seg_start >= warm_step:
                log["steady_seconds"] += seconds
                log["steady_steps"] += step - seg_start
            rd.record_peak(log)
            if is_eval:
                vl = evaluate(model, val_windows, args.eval_batch_size, device, autocast)
                log["val"].append([step * tokens_per_step, vl])
                if bar is None:
                    print(f"{run_dir.name} step {step}/{steps} val loss {vl:.4f}", flush=True)
            if step == steps:
                test_windows = eval_windows(splits["test"], context, args.eval_windows)
                log["final_val_loss"] = log["val"][-1][1]
                log["final_test_loss"] = evaluate(model, test_windows, args.eval_batch_size,
                                                  device, autocast)
                log["finished"] = True
            log["tokens_per_s"] = (log["train_steps_timed"] * tokens_per_step
                                   / max(log["train_seconds"], 1e-9))
            if log["steady_steps"]:
                log["steady_tokens_per_s"] = (log["steady_steps"] * tokens_per_step
                                              / max(log["steady_seconds"], 1e-9))
            if stop:
                log["stopped_early"] = "deadline"
            if is_ckpt:
                save_ckpt()
            elif is_eval:
                save_log(run_dir, log)
            rd.sync()
            rd.reset_peak()
            t_seg, seg_start = time.perf_counter(), step
            if stop:
                break
    if bar is not None:
        bar.close()
    save_log(run_dir, log)
    if log["finished"]:
        print(f"[done] {run_dir.name}: val {log['final_val_loss']:.4f} "
              f"test {log['final_test_loss']:.4f} state {log['optimizer_state_bytes']:,d} B  "
              f"{log['tokens_per_s']:,.0f} tok/s", flush=True)
    else:
        print(f"[stopped] {run_dir.name} at step {step}/{steps} (deadline): "
              f"val {log['val'][-1][1]:.4f}", flush=True)
    return log


# ------------------------------------------------------------- learning-rate choice


def _same_optimizer(cfg, other, strict):
    """Whether two optimizer configs differ at most in lr (strict) or share the name (loose)."""
    if cfg["name"] != other["name"]:
        return False
    if not strict:
        return True
    keys = []
    if cfg["name"] in ("flora", "flora_opt", "galore"):
        keys += ["rank", "kappa"]
    if cfg["name"] != "adafactor":
        keys.append("beta1")
    return (all(cfg.get(k) == other.get(k) for k in keys)
            and bool(cfg.get("q8")) == bool(other.get("q8")))


def run_score(log):
    """The loss a run is ranked by: final validation loss, or its last one if it stopped early;
    inf for a run that diverged."""
    if log.get("diverged") or not log.get("val"):
        return math.inf
    v = log["final_val_loss"] if log.get("finished") else log["val"][-1][1]
    return v if math.isfinite(v) else math.inf


def read_logs(run_dir):
    """The log.json of every run directory directly under run_dir (sorted by name)."""
    logs = []
    for path in sorted(pathlib.Path(run_dir).glob("*/log.json")):
        try:
            logs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return logs


def choose_lr(cfg, sweep_dir):
    """The lr of cfg's optimizer with the lowest validation loss in a --lr-sweep directory.

    Candidates are the part-1 runs in sweep_dir of the same optimizer with the same rank,
    kappa and beta1 (only the lr differs); if there are none, those of the same name (e.g.
    flora with another kappa takes flora's lr). Each lr is scored by the mean over its seeds
    of run_score (final validation loss; the last one for runs stopped at a deadline;
    diverged runs count as inf); the lowest mean wins, ties go to the smaller lr.
    Returns (lr, record) or (None, record) when no run qualifies.
    """
    logs = [lg for lg in read_logs(sweep_dir) if lg.get("part", 1) == 1 and lg.get("val")]
    match = "strict"
    cands = [lg for lg in logs if _same_optimizer(cfg, lg["optimizer"], True)]
    if not cands:
        match = "name"
        cands = [lg for lg in logs if _same_optimizer(cfg, lg["optimizer"], False)]
    by_lr = {}
    for lg in cands:
        by_lr.setdefault(lg["optimizer"]["lr"], []).append(run_score(lg))
    scores = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
    record = {"source": str(sweep_dir), "match": match,
              "scores": {f"{lr:g}": (s if math.isfinite(s) else None)
                         for lr, s in sorted(scores.items())},
              "runs": sorted(lg["run"] for lg in cands),
              "partial": any(not lg.get("finished") for lg in cands)}
    if not scores or all(not math.isfinite(s) for s in scores.values()):
        return None, record
    lr = min(sorted(scores), key=lambda k: scores[k])
    grid = sorted(scores)
    record["lr"] = lr
    record["at_grid_edge"] = len(grid) > 1 and lr in (grid[0], grid[-1])
    return lr, record


# ------------------------------------------------------------------- parallel runs


_WORKER = {}


def _setup_process(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _worker_init(args):
    _setup_process(args)
    _WORKER.clear()


def _cached(key, make):
    if key not in _WORKER:
        _WORKER[key] = make()
    return _WORKER[key]


def _run_task(task):
    """Runs one task in a worker process, its output going to RUN/output.txt."""
    import contextlib
    import traceback

    kind, what, seed, args, run_dir = task
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "output.txt", "a") as out, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            if kind == 1:
                splits = _cached(("splits", args.data), lambda: data_mod.load_splits(args.data))
                return train_run(what, seed, splits, args, run_dir)
            tokens, init = _cached(("part2", args.data, args.init_from),
                                   lambda: _part2_inputs(args))
            return finetune_run(what, seed, tokens, init, args, run_dir)
        except Exception as e:  # noqa: BLE001  (reported, the other runs go on)
            traceback.print_exc()
            msg = f"{type(e).__name__}: {e}"
            (run_dir / "error.txt").write_text(traceback.format_exc())
            return {"run": run_dir.name, "finished": False, "error": msg}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _summary(log):
    if log.get("error"):
        return f"error: {log['error']}"
    if log.get("skipped"):
        return f"not started ({log['skipped']})"
    if not log.get("val"):
        return "no result"
    state = "finished" if log.get("finished") else "stopped early"
    return f"{state}, val {log['val'][-1][1]:.4f}"


def run_tasks(tasks, args):
    """Runs tasks (kind, cfg or mode, seed, args, run_dir): in this process, or with --jobs N
    in N worker processes (spawned, each running one task after the other; CUDA works there).

    A worker that dies (e.g. a crash in native code) breaks the pool; the tasks without a
    result then run again in a fresh pool, at most twice. Returns the logs in task order
    (a stub with 'error' for a task that never returned).
    """
    if args.jobs <= 1:
        splits = None
        logs = []
        for kind, what, seed, a, run_dir in tasks:
            if kind == 1:
                splits = splits or data_mod.load_splits(a.data)
                logs.append(train_run(what, seed, splits, a, run_dir))
            else:
                tokens, init = _cached(("part2", a.data, a.init_from), lambda: _part2_inputs(a))
                logs.append(finetune_run(what, seed, tokens, init, a, run_dir))
        return logs
    import concurrent.futures as cf
    import multiprocessing

    results = {}
    todo = list(range(len(tasks)))
    for attempt in range(3):
        if not todo:
            break
        if attempt:
            print(f"[pool] a worker died; running {len(todo)} task(s) again", flush=True)
        with cf.ProcessPoolExecutor(max_workers=min(args.jobs, len(todo)),
                                    mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_worker_init, initargs=(args,)) as ex:
            futures = {ex.submit(_run_task, tasks[i]): i for i in todo}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as e:  # noqa: BLE001  (BrokenProcessPool and the like)
                    print(f"[pool] {pathlib.Path(tasks[i][4]).name}: {type(e).__name__}: {e}",
                          flush=True)
                    continue
                print(f"[{len(results)}/{len(tasks)}] {pathlib.Path(tasks[i][4]).name}: "
                      f"{_summary(results[i])}", flush=True)
        todo = [i for i in todo if i not in results]
    for i in todo:
        results[i] = {"run": pathlib.Path(tasks[i][4]).name, "finished": False,
                      "error": "worker process died"}
    return [results[i] for i in range(len(tasks))]


def _cost_rank(name):
    # Python-loop optimizers first, so that the slowest runs do not start last.
    return {"flora_opt": 0, "galore": 1, "flora_accum": 0, "small_batch": 1}.get(name, 2)


def _earlier_choice(args, spec):
    path = pathlib.Path(args.run_dir) / "lr_choice.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text()).get(spec)
    if rec and rec.get("source") == str(args.lr_from) and "note" not in rec:
        return rec
    return None


def run_part1(args):
    specs = [s for s in args.optimizers.split(",") if s]
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    cfgs = []
    choices = {}
    for spec in specs:
        cfg = parse_spec(spec, args)
        explicit_lr = ":lr=" in spec or args.lr is not None
        if args.lr_sweep and not explicit_lr:
            cfgs += [dict(cfg, lr=lr) for lr in LR_GRIDS[cfg["name"]]]
            continue
        if args.lr_from and not explicit_lr:
            earlier = _earlier_choice(args, spec)
            if earlier is not None:  # a rerun keeps the choice (more seeds would not sway it)
                cfg["lr"] = earlier["lr"]
                print(f"[lr] {spec}: lr {cfg['lr']:g} (chosen before, "
                      f"{pathlib.Path(args.run_dir) / 'lr_choice.json'})", flush=True)
                cfgs.append(cfg)
                continue
            lr, record = choose_lr(cfg, args.lr_from)
            if lr is None:
                record["note"] = f"no usable sweep run; default lr {cfg['lr']:g}"
                print(f"[lr] {spec}: no usable run in {args.lr_from}, default lr {cfg['lr']:g}",
                      flush=True)
            else:
                cfg["lr"] = lr
                print(f"[lr] {spec}: lr {lr:g} from {args.lr_from} (mean val loss per lr: "
                      f"{record['scores']})", flush=True)
            record["spec"] = spec
            choices[spec] = dict(record, lr=cfg["lr"], run_prefix=run_name(cfg, 0)[:-3])
        cfgs.append(cfg)
    if choices:
        path = pathlib.Path(args.run_dir) / "lr_choice.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update(choices)
        path.write_text(json.dumps(old, indent=1))
    if any(c["name"] == "galore" for c in cfgs):
        try:
            import_galore()
        except Exception as e:  # fail before any run starts
            raise SystemExit(f"{e}; or drop galore from --optimizers") from e
    tasks = [(1, cfg, seed, args, pathlib.Path(args.run_dir) / run_name(cfg, seed))
             for cfg in cfgs for seed in seeds]
    if args.jobs > 1:
        tasks.sort(key=lambda t: _cost_rank(t[1]["name"]))  # stable: keeps the rest in order
        logs = run_tasks(tasks, args)
        order = {str(t[4]): i for i, t in enumerate(tasks)}
        # back to the order of --optimizers and --seeds
        want = [str(pathlib.Path(args.run_dir) / run_name(c, s)) for c in cfgs for s in seeds]
        return [logs[order[w]] for w in want]
    return run_tasks(tasks, args)


# ----------------------------------------------------------------------------- part 2

PART2_MODES = ("flora_accum", "naive", "lora", "small_batch")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update (alpha / r) B A, B initialised to 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features,
                                               device=base.weight.device) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scale


def add_lora(model, rank, alpha):
    """Freeze every parameter and put LoRA adapters on the linear layers of the blocks."""
    for p in model.parameters():
        p.requires_grad_(False)
    for blk in model.blocks:
        for name in ("qkv", "proj", "fc1", "fc2"):
            setattr(blk, name, LoRALinear(getattr(blk, name), rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


def finetune_run(mode, seed, tokens, init, args, run_dir):
    """One part-2 run; tokens = (finetune_train, finetune_eval) uint8 tensors."""
    run_dir = pathlib.Path(run_dir)
    ckpt_path = run_dir / "ckpt.pt"
    done = result_without_training(run_dir, args)
    if done is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    rd = RunDevice(args)
    device, autocast = rd.device, rd.autocast
    dims = init["model"]
    context = dims["context"]
    k = 1 if mode == "small_batch" else args.accum
    updates = args.steps * (args.accum if mode == "small_batch" else 1)
    mb = args.micro_batch_size

    torch.manual_seed(seed)
    model = GPT(dims["d_model"], dims["n_layers"], dims["n_heads"], context).to(device)
    model.load_state_dict(init["state"])
    rank = None if args.rank <= 0 else args.rank
    if mode == "lora":
        params = add_lora(model, args.rank, args.lora_alpha)
    else:
        params = list(model.parameters())
    if mode == "lora":
        # B starts at 0, so scale_parameter's RMS(p) factor would freeze it at eps2 * lr:
        # adapters take absolute steps of --lora-lr instead.
        opt = flora_ext.Flora(params, lr=args.lora_lr, beta1=None, scale_parameter=False,
                              seed=seed)
    else:
        opt = flora_ext.Flora(params, lr=args.lr or 3e-3, beta1=None, seed=seed)
    acc = None
    if mode == "flora_accum":
        acc = flora_ext.FloraAccumulator(opt, micro_batches=k, rank=rank, model=model)
    gen = torch.Generator().manual_seed(2000 + seed)
    windows = eval_windows(tokens[1], context, args.eval_windows)
    log = {"run": run_dir.name, "part": 2, "mode": mode, "seed": seed, "rank": args.rank,
           "micro_batch_size": mb, "micro_batches_per_update": k, "updates": updates,
           "accum": args.accum, "tokens_per_update": k * mb * context,
           "lr": opt.param_groups[0]["lr"], "init_from": str(init.get("dir", args.init_from)),
           "init_val_loss": init.get("final_val_loss"), "model": dims,
           "trainable_parameters": sum(p.numel() for p in params), "device": str(device),
           "bf16_autocast": rd.bf16, "concurrent_jobs": args.jobs, "torch": torch.__version__,
           "eval_windows": args.eval_windows, "val": [], "train_seconds": 0.0,
           "steady_seconds": 0.0, "steady_updates": 0,
           "optimizer_state_bytes": None, "peak_memory_bytes": None, "finished": False}
    rd.name_in(log)
    update = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if acc is not None:
            acc.load_state_dict(ck["accumulator"])
        gen.set_state(ck["generator"].cpu())  # map_location moved it to the run device
        update, log = ck["update"], ck["log"]
        log.pop("stopped_early", None)
        print(f"[resume] {run_dir.name} at update {update}/{updates}")

    if update == 0:
        log["val"].append([0, evaluate(model, windows, args.eval_batch_size, device, autocast)])
    tokens_per_update = k * mb * context
    eval_every = args.eval_every * (args.accum if mode == "small_batch" else 1)
    warm = min(2 * (args.accum if mode == "small_batch" else 1), updates - 1)
    bar = _progress(updates, update, run_dir.name, args.progress)
    wait_barrier(args, run_dir)
    rd.sync()
    clock_every = args.accum if mode == "small_batch" else 1
    log.setdefault("clock", []).append([update, time.time()])
    rd.reset_peak()  # training peaks only: reset after every evaluation
    t0, seg_start = time.perf_counter(), update
    while update < updates:
        for _ in range(k):
            x, y = sample_batch(tokens[0], mb, context, gen)
            x, y = x.to(device), y.to(device)
            with autocast():
                loss = loss_fn(model, x, y) / k
            loss.backward()  # with acc: the k-th backward steps every parameter in its hook
        opt.step()
        opt.zero_grad(set_to_none=True)
        update += 1
        if log["optimizer_state_bytes"] is None:
            log["optimizer_state_bytes"] = optimizer_state_bytes(opt)
        if update % clock_every == 0:  # wall-clock points (tokens/s of a time window)
            rd.sync()
            log["clock"].append([update, time.time()])
        if bar is not None:
            bar.update(1)
        stop = update < updates and past_deadline(args)
        is_eval = update % eval_every == 0 or update == updates or stop
        if is_eval or update == warm:
            rd.sync()
            seconds = time.perf_counter() - t0
            log["train_seconds"] += seconds
            if seg_start >= warm:
                log["steady_seconds"] += seconds
                log["steady_updates"] += update - seg_start
            rd.record_peak(log)
            log["tokens_per_s"] = update * tokens_per_update / max(log["train_seconds"], 1e-9)
            if log["steady_updates"]:
                log["steady_tokens_per_s"] = (log["steady_updates"] * tokens_per_update
                                              / max(log["steady_seconds"], 1e-9))
        if is_eval:
            vl = evaluate(model, windows, args.eval_batch_size, device, autocast)
            log["val"].append([update * tokens_per_update, vl])
            if bar is None:
                print(f"{run_dir.name} update {update}/{updates} val loss {vl:.4f}", flush=True)
            if update == updates:
                log["final_val_loss"] = vl
                log["finished"] = True
            if stop:
                log["stopped_early"] = "deadline"
            if update % (args.ckpt_every * clock_every) == 0 or update == updates or stop:
                save_checkpoint(run_dir, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "accumulator": None if acc is None else acc.state_dict(),
                    "generator": gen.get_state(), "update": update, "log": log}, log)
            else:
                save_log(run_dir, log)
        if is_eval or update == warm:
            rd.sync()
            rd.reset_peak()
            t0, seg_start = time.perf_counter(), update
        if stop:
            break
    if bar is not None:
        bar.close()
    if acc is not None:
        acc.remove()
    if log["finished"]:
        print(f"[done] {run_dir.name}: val {log['final_val_loss']:.4f} "
              f"state {log['optimizer_state_bytes']:,d} B peak {log['peak_memory_bytes']}",
              flush=True)
    else:
        print(f"[stopped] {run_dir.name} at update {update}/{updates} (deadline): "
              f"val {log['val'][-1][1]:.4f}", flush=True)
    return log


def best_part1_run(run_dir):
    """The part-1 run under run_dir (with a checkpoint) of lowest final validation loss.

    Finished runs only; where none finished (all stopped at a deadline), the run of lowest
    last validation loss, with a warning."""
    cands = [lg for lg in read_logs(run_dir)
             if lg.get("part", 1) == 1 and (pathlib.Path(run_dir) / lg["run"] / "ckpt.pt").is_file()
             and math.isfinite(run_score(lg))]
    finished = [lg for lg in cands if lg.get("finished")]
    if not finished and cands:
        print(f"warning: no finished part-1 run in {run_dir}; taking the best unfinished one",
              flush=True)
    best = min(finished or cands, key=run_score, default=None)
    if best is None:
        raise SystemExit(f"--init-from best:{run_dir}: no part-1 run with a checkpoint there")
    return pathlib.Path(run_dir) / best["run"]


def _part2_inputs(args):
    """((finetune_train, finetune_eval) tokens, init dict) of a part-2 command."""
    init_dir = pathlib.Path(args.init_from)
    init_log = json.loads((init_dir / "log.json").read_text())
    ck = torch.load(init_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    init = {"model": init_log["model"], "state": ck["model"], "dir": str(init_dir),
            "final_val_loss": init_log.get("final_val_loss")}
    test = data_mod.load_splits(args.data)["test"]
    cut = int(test.numel() * 0.9)
    return (test[:cut], test[cut:]), init


def run_part2(args):
    """Fine-tune a part-1 checkpoint on the held-out test split with each accumulation mode.

    The fine-tuning corpus is the data's test split (never trained on in part 1): its first
    90% of tokens are the fine-tuning training data, its last 10% the fine-tuning
    validation data. All modes use flora_ext.Flora without momentum (Adafactor) at the
    same lr, micro-batches of --micro-batch-size sequences, --steps optimizer updates of
    --accum micro-batches each (small_batch: --steps * --accum updates of one micro-batch,
    the same tokens):
      flora_accum  FloraAccumulator(rank=--rank): compressed accumulation in backward hooks
      naive        plain accumulation into p.grad (one full-size gradient buffer)
      lora         frozen model + rank --rank adapters on the block linears, naive accumulation,
                   Flora(scale_parameter=False, lr=--lora-lr) since the adapters start at 0
      small_batch  no accumulation
    --init-from best:DIR takes the finished part-1 run in DIR of lowest final validation loss.
    """
    if not args.init_from:
        raise SystemExit("--part 2 needs --init-from RUN_DIR (a finished part-1 run directory)")
    if not args.steps:
        raise SystemExit("--part 2 needs --steps (optimizer updates per run)")
    if args.init_from.startswith("best:"):
        args.init_from = str(best_part1_run(args.init_from[len("best:"):]))
        print(f"[init] {args.init_from}", flush=True)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in PART2_MODES:
            raise ValueError(f"unknown part-2 mode {m!r}; choose from {', '.join(PART2_MODES)}")
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    tasks = []
    for m in modes:
        for seed in seeds:
            lr = args.lora_lr if m == "lora" else (args.lr or 3e-3)
            name = f"{m}-r{args.rank}-a{args.accum}-mb{args.micro_batch_size}-lr{lr:g}-s{seed}"
            tasks.append((2, m, seed, args, pathlib.Path(args.run_dir) / name))
    if args.jobs > 1:
        order = sorted(range(len(tasks)), key=lambda i: _cost_rank(tasks[i][1]))
        logs = run_tasks([tasks[i] for i in order], args)
        back = {j: logs[n] for n, j in enumerate(order)}
        return [back[i] for i in range(len(tasks))]
    return run_tasks(tasks, args)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--part", type=int, choices=(1, 2), default=1)
    p.add_argument("--data", required=True,
                   help="prepared token directory (benchmarks/data.py output, OUT/<key>)")
    p.add_argument("--run-dir", required=True, help="one subdirectory per run; resumable")
    p.add_argument("--optimizers", default="flora,adafactor_momentum,adafactor,adamw",
                   help=f"comma-separated specs NAME[:rank=R][:kappa=K][:lr=LR][:beta1=B]; "
                        f"names: {', '.join(OPTIMIZERS)}")
    p.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr for all optimizers (default: middle of each LR_GRIDS entry)")
    p.add_argument("--lr-sweep", action="store_true",
                   help="run every optimizer at each lr of its LR_GRIDS entry")
    p.add_argument("--rank", type=int, default=128, help="flora/flora_opt/galore rank")
    p.add_argument("--kappa", type=int, default=1000,
                   help="flora/flora_opt resampling interval; galore update_proj_gap")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="base")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None)
    budget.add_argument("--tokens", type=float, default=50e6, help="token budget (default 50e6)")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-windows", type=int, default=512, help="validation/test windows")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--ckpt-every", type=int, default=1000,
                   help="steps (part 1) or updates (part 2, at evaluations) between checkpoints; "
                        "there is always one at the end")
    p.add_argument("--log-every", type=int, default=10)
    p2 = p.add_argument_group("part 2 (fine-tuning; --steps counts optimizer updates, --rank "
                              "is the accumulation/LoRA rank, --lr defaults to 3e-3)")
    p2.add_argument("--modes", default=",".join(PART2_MODES), help=f"comma-separated: {', '.join(PART2_MODES)}")
    p2.add_argument("--accum", type=int, default=16, help="micro-batches per update")
    p2.add_argument("--micro-batch-size", type=int, default=4)
    p2.add_argument("--lora-alpha", type=float, default=16.0)
    p2.add_argument("--lora-lr", type=float, default=1e-3,
                    help="lr of the LoRA adapters (absolute: scale_parameter=False)")
    p.add_argument("--lr-from", metavar="SWEEP_DIR",
                   help="part 1: take each optimizer's lr from the --lr-sweep runs in SWEEP_DIR "
                        "(lowest mean validation loss, see choose_lr; recorded in "
                        "RUN_DIR/lr_choice.json); specs with :lr= keep theirs")
    p2.add_argument("--init-from", help="a finished part-1 run directory, or best:DIR for the "
                                        "finished part-1 run in DIR of lowest validation loss")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own worker process (spawned; several "
                        "small runs share one GPU); output of each run in RUN/output.txt")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in each process (default: torch's)")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time: runs still going then save and stop (resumable, marked "
                        "stopped_early in log.json); runs not started by then are skipped")
    p.add_argument("--barrier", type=int, default=0, metavar="N",
                   help="start training only once N runs under --run-dir are ready (for "
                        "timing runs that share a GPU; tools/gpu_convergence.sh calibration)")
    p.add_argument("--barrier-timeout", type=float, default=60.0)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="plain lines instead of a tqdm bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs > 1:
        args.progress = False
    _setup_process(args)
    return run_part1(args) if args.part == 1 else run_part2(args)


if __name__ == "__main__":
    main()
