#!/usr/bin/env python3
"""Train a small byte-level language model with flora_ext.Flora.

The corpus is the Python standard library's own top-level ``*.py`` files, so the
demo needs no download. Files are read in sorted order; every tenth file is held
out for validation, so the validation loss measures text the model never saw.
Each byte is a token (vocabulary of 256).

The model is a 2-layer pre-norm transformer (d_model 128, 4 heads, MLP 4x,
context 128, about 0.48M parameters). Every 2-D weight in it has
min(n, m) >= rank and an aspect ratio of at most 4, so Flora keeps a compressed
momentum for each of them (see docs/FLORA.md, "Which state a parameter gets").

At the end the script prints the validation loss and the bytes of optimizer
state Flora holds, next to the bytes a torch.optim.AdamW instance holds after
one step on a copy of the same model with the same gradients (counted from its
state tensors, so it includes AdamW's per-parameter `step` scalars).

    python examples/python/train_charlm.py --steps 800 --rank 8 --lr 0.03
"""

import argparse
import copy
import math
import pathlib
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import flora_ext


# ----------------------------------------------------------------------------- data


def load_stdlib_corpus():
    """Returns (train_bytes, val_bytes) as uint8 tensors, split by file."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if len(files) < 20:
        raise SystemExit(f"found only {len(files)} .py files under {stdlib}; need a full stdlib")
    train, val = [], []
    for i, path in enumerate(files):
        (val if i % 10 == 0 else train).append(path.read_bytes())
    to_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return to_tensor(train), to_tensor(val), len(files)


def sample_batch(data, batch_size, context, generator):
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context + 1)
    windows = data[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)  # weight 384 x 128: aspect ratio 3
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)  # 512 x 128: aspect ratio 4, still compressed
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ByteTransformer(nn.Module):
    def __init__(self, context, d_model=128, n_heads=4, n_layers=2, vocab=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)  # 256 x 128
        self.pos = nn.Embedding(context, d_model)  # 128 x 128
        self.blocks = nn.ModuleList(Block(d_model, d_model // 32) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)  # 256 x 128
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_on(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model, val, batches, batch_size, context, device):
    # The same windows every time (fixed generator), so values are comparable.
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    for _ in range(batches):
        x, y = sample_batch(val, batch_size, context, gen)
        total += loss_on(model, x.to(device), y.to(device)).item()
    model.train()
    return total / batches


def adamw_state_bytes(model, inputs, targets):
    """Bytes of state a torch.optim.AdamW holds after one step on a copy of `model`.

    The copy gets its own gradients from one batch, so AdamW allocates exactly
    what it would in this run: exp_avg, exp_avg_sq and a step scalar per parameter."""
    twin = copy.deepcopy(model)
    loss_on(twin, inputs, targets).backward()
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    adamw.step()
    return sum(
        v.nbytes for st in adamw.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    ap.add_argument("--rank", type=int, default=8, help="Flora projection rank (default 8)")
    ap.add_argument("--lr", type=float, default=0.03,
                    help="Flora lr; scaled by each parameter's RMS (scale_parameter=True) (default 0.03)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0, help="seed for model init, batches and Flora")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128, help="model width (heads of 32)")
    ap.add_argument("--kappa", type=int, default=100,
                    help="resample the momentum projection every kappa steps (default 100)")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)

    train, val, n_files = load_stdlib_corpus()
    print(f"corpus: {n_files} stdlib files, {train.numel():,} train bytes, "
          f"{val.numel():,} validation bytes (every 10th file held out)")

    model = ByteTransformer(args.context, d_model=args.d_model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: 2-layer byte transformer, {n_params:,} parameters, device {device}")

    opt = flora_ext.Flora(model.parameters(), lr=args.lr, rank=args.rank, kappa=args.kappa,
                          beta1=0.9, weight_decay=0.0, seed=args.seed)
    print(f"optimizer: flora_ext.Flora(lr={args.lr}, rank={args.rank}, kappa={args.kappa}, beta1=0.9)")

    val_batches = 16
    start_val = validation_loss(model, val, val_batches, args.batch_size, args.context, device)
    print(f"step    0  val loss {start_val:.3f}  (uniform over 256 bytes: {math.log(256):.3f})")

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    running = None
    for step in range(1, args.steps + 1):
        x, y = sample_batch(train, args.batch_size, args.context, gen)
        loss = loss_on(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise SystemExit(f"loss is {value} at step {step}; try a smaller --lr")
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            elapsed = time.perf_counter() - t0
            print(f"step {step:4d}  train loss {value:.3f}  (smoothed {running:.3f})  {elapsed:6.1f}s",
                  flush=True)

    end_val = validation_loss(model, val, val_batches, args.batch_size, args.context, device)
    print(f"final val loss {end_val:.3f}  (start {start_val:.3f}, {end_val / math.log(2):.2f} bits/byte)")

    flora_bytes = flora_ext.state_bytes(opt)
    adamw_bytes = adamw_state_bytes(model, x.to(device), y.to(device))
    print(f"optimizer state: Flora {flora_bytes:,} bytes ({flora_bytes / n_params:.2f} B/param), "
          f"AdamW {adamw_bytes:,} bytes ({adamw_bytes / n_params:.2f} B/param), "
          f"ratio {flora_bytes / adamw_bytes:.3f}")
    print("(AdamW measured from torch.optim.AdamW's state tensors after one step on a copy of the model)")


if __name__ == "__main__":
    main()
