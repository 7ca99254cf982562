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
    python benchmarks/convergence.py --part 1 --lr-sweep --seeds 0 ... --run-dir runs/sweep

Optimizer specs: NAME[:key=value[:key=value...]], keys rank, kappa, lr, beta1
(e.g. ``flora:rank=64:kappa=100``). Names:
  flora              flora_ext.Flora(rank, kappa, beta1=0.9)   compressed momentum
  adafactor_momentum flora_ext.Flora(rank=None, beta1=0.9)      dense momentum
  adafactor          flora_ext.Flora(beta1=None)                no momentum
  adamw              torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0)
  flora_opt          the authors' flora_opt.Flora with the same arguments as flora
  galore             galore_torch.GaLoreAdamW (rank, update_proj_gap=kappa) on the
                     2-D weights of the blocks; an error if galore-torch is missing
All runs use the same schedule: linear warmup (--warmup fraction of the steps) then
cosine decay to 10% of the peak lr. Same seed -> same initial model and same batches
for every optimizer.

Each run writes RUN/log.json: the arguments, validation loss against tokens seen,
final validation and test loss, optimizer-state bytes (sum of the state tensors,
measured after the first step), peak CUDA memory, tokens/s (training steps only,
evaluation excluded). RUN/ckpt.pt holds model + optimizer + scheduler + data RNG +
step (written every --ckpt-every steps and at the end); a run whose log says
finished is skipped.

Part 2 (fine-tuning with gradient accumulation, the memory setting): see run_part2.

    python benchmarks/convergence.py --part 2 --data data_cache/<key> --run-dir runs/part2 \\
        --init-from runs/part1/<best run> --modes flora_accum,naive,lora,small_batch \\
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
        if k not in ("rank", "kappa", "lr", "beta1") or not v:
            raise ValueError(f"bad optimizer option {kv!r} in {spec!r} (keys: rank, kappa, lr, beta1)")
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
    parts += [f"lr{cfg['lr']:g}", f"s{seed}"]
    return "-".join(parts)


def build_optimizer(cfg, model, seed):
    name, lr = cfg["name"], cfg["lr"]
    params = list(model.parameters())
    if name == "flora":
        return flora_ext.Flora(params, lr=lr, rank=cfg["rank"], kappa=cfg["kappa"],
                               beta1=cfg["beta1"], seed=seed)
    if name == "adafactor_momentum":
        return flora_ext.Flora(params, lr=lr, rank=None, beta1=cfg["beta1"], seed=seed)
    if name == "adafactor":
        return flora_ext.Flora(params, lr=lr, rank=None, beta1=None, seed=seed)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg["beta1"], 0.95), weight_decay=0.0)
    if name == "flora_opt":
        from flora_ext.testing import import_flora_opt

        return import_flora_opt().Flora(params, lr=lr, rank=cfg["rank"], kappa=cfg["kappa"],
                                        beta1=cfg["beta1"])
    if name == "galore":
        try:
            import galore_torch
        except ImportError as e:
            raise RuntimeError("optimizer 'galore' needs galore-torch (pip install galore-torch; "
                               "carry the wheel to the device machine)") from e
        lowrank = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
        ids = {id(p) for p in lowrank}
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest},
                  {"params": lowrank, "rank": cfg["rank"], "update_proj_gap": cfg["kappa"],
                   "scale": 0.25, "proj_type": "std"}]
        return galore_torch.GaLoreAdamW(groups, lr=lr, betas=(cfg["beta1"], 0.95), weight_decay=0.0)
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


def save_checkpoint(run_dir, checkpoint, log):
    """Writes run_dir/ckpt.pt atomically (a killed run keeps its last one), then log.json."""
    ckpt_path = run_dir / "ckpt.pt"
    tmp = ckpt_path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, ckpt_path)
    (run_dir / "log.json").write_text(json.dumps(log, indent=1))


def train_run(cfg, seed, splits, args, run_dir):
    """Train one run (resuming from run_dir/ckpt.pt); returns its log dict."""
    run_dir = pathlib.Path(run_dir)
    log_path, ckpt_path = run_dir / "log.json", run_dir / "ckpt.pt"
    finished = finished_log(run_dir)
    if finished is not None:
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    d, n_layers, n_heads, context = model_dims(args)
    tokens_per_step = args.batch_size * context
    steps = args.steps if args.steps else max(1, int(float(args.tokens) // tokens_per_step))
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    torch.manual_seed(seed)
    model = GPT(d, n_layers, n_heads, context).to(device)
    opt = build_optimizer(cfg, model, seed)
    sched = make_scheduler(opt, steps, args.warmup)
    gen = torch.Generator().manual_seed(1000 + seed)
    val_windows = eval_windows(splits["validation"], context, args.eval_windows)
    log = {
        "run": run_dir.name, "optimizer": cfg, "seed": seed, "steps": steps,
        "tokens_per_step": tokens_per_step, "batch_size": args.batch_size,
        "model": {"size": args.model_size, "d_model": d, "n_layers": n_layers,
                  "n_heads": n_heads, "context": context,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "device": str(device), "bf16_autocast": use_bf16, "warmup": args.warmup,
        "data": args.data, "torch": torch.__version__,
        "val": [], "train_loss": [], "train_seconds": 0.0,
        "optimizer_state_bytes": None, "peak_memory_bytes": None, "finished": False,
    }
    step = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        step, log = ck["step"], ck["log"]
        print(f"[resume] {run_dir.name} at step {step}/{steps}")

    def save_ckpt():
        save_checkpoint(run_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                  "step": step, "log": log}, log)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = _progress(steps, step, run_dir.name, args.progress)
    if step == 0:
        log["val"].append([0, evaluate(model, val_windows, args.eval_batch_size, device, autocast)])
    t_seg, steps_seg = time.perf_counter(), 0
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
        steps_seg += 1
        if log["optimizer_state_bytes"] is None:
            log["optimizer_state_bytes"] = optimizer_state_bytes(opt)
        lv = loss.item() if (step % args.log_every == 0 or step == steps) else None
        if lv is not None:
            if not math.isfinite(lv):
                log["diverged"] = True
            log["train_loss"].append([step * tokens_per_step, lv])
        if bar is not None:
            bar.update(1)
            if lv is not None:
                bar.set_postfix(loss=f"{lv:.3f}")
        elif lv is not None and (step % (args.log_every * 10) == 0 or step == steps):
            print(f"{run_dir.name} step {step}/{steps} loss {lv:.4f}", flush=True)
        is_eval = step % args.eval_every == 0 or step == steps
        is_ckpt = step % args.ckpt_every == 0 or step == steps
        if is_eval or is_ckpt:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            log["train_seconds"] += time.perf_counter() - t_seg
            log["train_steps_timed"] = log.get("train_steps_timed", 0) + steps_seg
            if is_eval:
                vl = evaluate(model, val_windows, args.eval_batch_size, device, autocast)
                log["val"].append([step * tokens_per_step, vl])
                if bar is None:
                    print(f"{run_dir.name} step {step}/{steps} val loss {vl:.4f}", flush=True)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                log["peak_memory_bytes"] = max(peak, log["peak_memory_bytes"] or 0)
            if step == steps:
                test_windows = eval_windows(splits["test"], context, args.eval_windows)
                log["final_val_loss"] = log["val"][-1][1]
                log["final_test_loss"] = evaluate(model, test_windows, args.eval_batch_size,
                                                  device, autocast)
                log["tokens_per_s"] = (log["train_steps_timed"] * tokens_per_step
                                       / max(log["train_seconds"], 1e-9))
                log["finished"] = True
            if is_ckpt:
                save_ckpt()
            t_seg, steps_seg = time.perf_counter(), 0
    if bar is not None:
        bar.close()
    log_path.write_text(json.dumps(log, indent=1))
    print(f"[done] {run_dir.name}: val {log['final_val_loss']:.4f} test {log['final_test_loss']:.4f} "
          f"state {log['optimizer_state_bytes']:,d} B  {log['tokens_per_s']:,.0f} tok/s", flush=True)
    return log


def run_part1(args):
    splits = data_mod.load_splits(args.data)
    specs = [s for s in args.optimizers.split(",") if s]
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    cfgs = []
    for spec in specs:
        cfg = parse_spec(spec, args)
        if args.lr_sweep and ":lr=" not in spec:
            cfgs += [dict(cfg, lr=lr) for lr in LR_GRIDS[cfg["name"]]]
        else:
            cfgs.append(cfg)
    if any(c["name"] == "galore" for c in cfgs):
        try:
            import galore_torch  # noqa: F401
        except ImportError as e:  # fail before any run starts
            raise SystemExit("optimizer 'galore' needs galore-torch (pip install galore-torch; "
                             "carry the wheel to the device machine), or drop it from "
                             "--optimizers") from e
    logs = []
    for cfg in cfgs:
        for seed in seeds:
            run_dir = pathlib.Path(args.run_dir) / run_name(cfg, seed)
            logs.append(train_run(cfg, seed, splits, args, run_dir))
    return logs


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
    finished = finished_log(run_dir)
    if finished is not None:
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dims = init["model"]
    context = dims["context"]
    k = 1 if mode == "small_batch" else args.accum
    updates = args.steps * (args.accum if mode == "small_batch" else 1)
    mb = args.micro_batch_size
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

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
           "lr": opt.param_groups[0]["lr"], "init_from": str(args.init_from),
           "trainable_parameters": sum(p.numel() for p in params), "device": str(device),
           "bf16_autocast": use_bf16, "val": [], "train_seconds": 0.0,
           "optimizer_state_bytes": None, "peak_memory_bytes": None, "finished": False}
    update = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if acc is not None:
            acc.load_state_dict(ck["accumulator"])
        gen.set_state(ck["generator"])
        update, log = ck["update"], ck["log"]
        print(f"[resume] {run_dir.name} at update {update}/{updates}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if update == 0:
        log["val"].append([0, evaluate(model, windows, args.eval_batch_size, device, autocast)])
    tokens_per_update = k * mb * context
    eval_every = args.eval_every * (args.accum if mode == "small_batch" else 1)
    bar = _progress(updates, update, run_dir.name, args.progress)
    t0 = time.perf_counter()
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
        if bar is not None:
            bar.update(1)
        if update % eval_every == 0 or update == updates:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                log["peak_memory_bytes"] = max(torch.cuda.max_memory_allocated(device),
                                               log["peak_memory_bytes"] or 0)
            log["train_seconds"] += time.perf_counter() - t0
            vl = evaluate(model, windows, args.eval_batch_size, device, autocast)
            log["val"].append([update * tokens_per_update, vl])
            if bar is None:
                print(f"{run_dir.name} update {update}/{updates} val loss {vl:.4f}", flush=True)
            if update == updates:
                log["final_val_loss"] = vl
                log["tokens_per_s"] = updates * tokens_per_update / max(log["train_seconds"], 1e-9)
                log["finished"] = True
            save_checkpoint(run_dir, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "accumulator": None if acc is None else acc.state_dict(),
                "generator": gen.get_state(), "update": update, "log": log}, log)
            t0 = time.perf_counter()
    if bar is not None:
        bar.close()
    if acc is not None:
        acc.remove()
    print(f"[done] {run_dir.name}: val {log['final_val_loss']:.4f} "
          f"state {log['optimizer_state_bytes']:,d} B peak {log['peak_memory_bytes']}", flush=True)
    return log


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
    """
    if not args.init_from:
        raise SystemExit("--part 2 needs --init-from RUN_DIR (a finished part-1 run directory)")
    if not args.steps:
        raise SystemExit("--part 2 needs --steps (optimizer updates per run)")
    init_dir = pathlib.Path(args.init_from)
    init_log = json.loads((init_dir / "log.json").read_text())
    ck = torch.load(init_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    init = {"model": init_log["model"], "state": ck["model"]}
    test = data_mod.load_splits(args.data)["test"]
    cut = int(test.numel() * 0.9)
    tokens = (test[:cut], test[cut:])
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in PART2_MODES:
            raise ValueError(f"unknown part-2 mode {m!r}; choose from {', '.join(PART2_MODES)}")
    seeds = [int(s) for s in str(args.seeds).split(",") if s != ""]
    logs = []
    for m in modes:
        for seed in seeds:
            lr = args.lora_lr if m == "lora" else (args.lr or 3e-3)
            name = f"{m}-r{args.rank}-a{args.accum}-mb{args.micro_batch_size}-lr{lr:g}-s{seed}"
            logs.append(finetune_run(m, seed, tokens, init, args, pathlib.Path(args.run_dir) / name))
    return logs


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
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p2 = p.add_argument_group("part 2 (fine-tuning; --steps counts optimizer updates, --rank "
                              "is the accumulation/LoRA rank, --lr defaults to 3e-3)")
    p2.add_argument("--init-from", help="a finished part-1 run directory")
    p2.add_argument("--modes", default=",".join(PART2_MODES), help=f"comma-separated: {', '.join(PART2_MODES)}")
    p2.add_argument("--accum", type=int, default=16, help="micro-batches per update")
    p2.add_argument("--micro-batch-size", type=int, default=4)
    p2.add_argument("--lora-alpha", type=float, default=16.0)
    p2.add_argument("--lora-lr", type=float, default=1e-3,
                    help="lr of the LoRA adapters (absolute: scale_parameter=False)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="plain lines instead of a tqdm bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return run_part1(args) if args.part == 1 else run_part2(args)


if __name__ == "__main__":
    main()
