#!/usr/bin/env python3
"""Training stability of Flora across projection seeds (issue 27).

The same model initialisation and data order for every Flora run; only the projection seed
(Flora's ``seed``) changes. Adafactor with dense momentum is trained over data-order seeds
instead, for the spread a seed causes without projections. Flora's momentum transfer at a
resample (every kappa steps) is one of ``TRANSFERS`` (tests/reference.py, ``transfer_scale``):

  flora_opt        M = down_s'(up_s(M)), flora-opt's step (flora_ext.Flora as it is)
  norm_preserving  the same, times ||up_s(M)|| / ||up_s'(down_s'(up_s(M)))||: the step sees a
                   momentum of the same norm before and after the resample
  least_squares    the same, times <up_s'(T), up_s(M)> / ||up_s'(T)||^2, T = down_s'(up_s(M)):
                   the multiple of the moved momentum closest to the old one (about
                   1 / (1 + n / r) for Gaussian projections: it shrinks the projection noise)
  reset            M = 0 before this step's down(U) (for scale: what the transfer is worth)

The two others are applied after the extension's step on the resample steps
(``MomentumTransfer``): the step has already added beta1 down_s'(up_s(M)); the difference
beta1 (c - 1) down_s'(up_s(M)) is added to the momentum. Nothing else of the step changes.

Each run logs (RUN.json): every step's training loss; every --diag-every steps and on the
steps around each resample, per 2-D parameter: the update RMS (RMS of the parameter change
over the step size), the RMS of the direction D before clipping (the clip factor is
max(1, RMS(D))), the norm of the momentum as the step sees it (||up(M)|| compressed, ||M||
dense); at each resample, per compressed parameter, ||up(M)|| before and after the transfer;
the validation loss every --eval-every steps and at the end.

    python benchmarks/stability.py run --data data_cache/<key> --out RUN.json \\
        --variant flora --transfer norm_preserving --proj-seed 3 --steps 1200 --kappa 240
    python benchmarks/stability.py sweep --data data_cache/<key> --runs DIR --deadline T
    python benchmarks/stability.py report --runs DIR --md benchmarks/results/convergence.md \\
        --plot benchmarks/results/stability.svg

tools/gpu_stability.sh runs the sweep within a fixed time on one GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convergence as conv  # noqa: E402  (benchmarks/convergence.py: model, data, schedule)
import data as data_mod  # noqa: E402

import flora_ext  # noqa: E402

TRANSFERS = ("flora_opt", "norm_preserving", "least_squares", "reset")
INIT_SEED = 0  # model initialisation of every run


# ------------------------------------------------------------------ projections


def _projection(seed, shape, rank, device):
    """P of docs/FLORA.md §5 for an n x m parameter: r x n (left, n < m) or m x r (right)."""
    n, m = shape
    if n < m:
        return flora_ext.projection(seed, rank, n, rank, device=device)
    return flora_ext.projection(seed, m, rank, rank, device=device)


def _down(P, X, left):
    return P @ X if left else X @ P


def _up(P, C, left):
    return P.t() @ C if left else C @ P.t()


def _compressed(opt, p):
    return "seed" in opt.state.get(p, {})


def transfer_scale(transfer, up_old_norm, up_new_norm, inner=None):
    """c of tests/reference.py's transfer_scale, from the two norms (and for least_squares
    the inner product <up_new, up_old>)."""
    if transfer == "flora_opt":
        return 1.0
    if transfer == "reset":
        return 0.0
    if transfer == "norm_preserving":
        return up_old_norm / up_new_norm if up_new_norm > 0 else 1.0
    if transfer == "least_squares":
        return inner / up_new_norm ** 2 if up_new_norm > 0 else 1.0
    raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")


class MomentumTransfer:
    """Wraps flora_ext.Flora.step: applies ``transfer`` on resample steps and records the
    momentum norms around every resample (also for flora_opt, where it changes nothing)."""

    def __init__(self, opt, names, transfer):
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        self.opt, self.names, self.transfer = opt, names, transfer
        self.records = []  # [step, parameter name, ||up(M)|| before, after, c]

    def _resampling(self):
        """(p, momentum before the step, seed before the step, beta1) of every compressed
        parameter whose next step changes basis."""
        out = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is None or not _compressed(self.opt, p):
                    continue  # no state yet: the momentum is zero, nothing to transfer
                st = self.opt.state[p]
                if (st["step"] + 1) % group["kappa"] == 0:
                    out.append((p, st["momentum"].clone(), st["seed"], group["beta1"]))
        return out

    @torch.no_grad()
    def step(self):
        pending = self._resampling()
        self.opt.step()
        for p, m_old, seed_old, beta1 in pending:
            st = self.opt.state[p]
            left = p.shape[0] < p.shape[1]
            rank = m_old.shape[0] if left else m_old.shape[1]
            up_old = _up(_projection(seed_old, p.shape, rank, p.device), m_old, left)
            p_new = _projection(st["seed"], p.shape, rank, p.device)
            moved = _down(p_new, up_old, left)
            up_new = _up(p_new, moved, left)
            before, after = up_old.norm().item(), up_new.norm().item()
            inner = (up_new * up_old).sum().item()
            c = transfer_scale(self.transfer, before, after, inner)
            if c != 1.0:
                st["momentum"].add_(moved, alpha=beta1 * (c - 1.0))
            self.records.append([st["step"], self.names[p], before, after * c, c])


PROJECTIONS = ("gaussian", "orthogonal", "subspace")
# ProbeFlora's direction D from U and the momentum M (Pi: the projector on P's span,
# s^2 = long / r, up(M) = s^2 Pi m for orthogonal projections):
#   flora   (1 - beta1) U + beta1 up(M)                  Flora's
#   shrink  (1 - beta1) U + beta1 up(M) / s              less projection noise, less momentum
#   split   Pi((1 - beta1) U + beta1 m) + gamma (I - Pi) U: momentum inside the subspace only,
#           the gradient outside it; the transfer carries Pi m (orthogonal projections)
DIRECTIONS = ("flora", "shrink", "split")


def orthogonalised(P, left, scale=True):
    """``P`` (r x n on the left, m x r on the right) with its r long vectors made orthonormal
    by QR (signs fixed by R's diagonal, so the result is a function of the seed) and scaled to
    the Gaussian's expected length sqrt(long / r). E[up(down(X))] = X as for the Gaussian,
    but every singular value is sqrt(long / r) instead of spreading over the Marchenko-Pastur
    range, (1 +- sqrt(r / long)) sqrt(long / r). ``scale=False``: orthonormal, so
    up(down(X)) is the orthogonal projection of X on the subspace: the least-squares estimate
    of X from its r coordinates, biased towards 0 (by r / long on average) but without
    the unbiased estimate's noise, whose squared norm is about long / r times ||X||^2."""
    A = P.t() if left else P  # long x r
    Q, R = torch.linalg.qr(A.double())
    Q = Q * torch.where(torch.diagonal(R) > 0, 1.0, -1.0).to(Q.dtype)[None, :]
    Q = (Q * (math.sqrt(A.shape[0] / A.shape[1]) if scale else 1.0)).to(P.dtype)
    return Q.t().contiguous() if left else Q.contiguous()


class ProbeFlora(torch.optim.Optimizer):
    """Flora's step in plain torch (float32 state), for trying projections the extension does
    not have. The formulas are tests/reference.py's (flora-opt's defaults: scale_parameter,
    no relative step, decay_rate -0.8, clip 1, flora-opt's transfer), the layout and seeds
    flora_ext.Flora's, so ``projection="gaussian"`` follows flora_ext.Flora up to rounding
    (tests/test_stability.py checks it). ``orthogonal``: ``orthogonalised`` P;
    ``subspace``: the same without its scale (orthonormal). No host
    synchronisation in the step."""

    def __init__(self, params, lr, rank, kappa, beta1, seed, projection, direction="flora",
                 gamma=1.0):
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if direction == "split" and projection != "orthogonal":
            raise ValueError("direction='split' needs projection='orthogonal' (a projector)")
        super().__init__(params, dict(lr=lr, rank=rank, kappa=kappa, beta1=beta1))
        self.base_seed, self.projection = seed, projection
        self.direction, self.gamma = direction, gamma
        self._p_cache = {}  # id(p) -> (seed, P)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                self.state[p]["index"] = index

    def _proj(self, p, seed, rank):
        hit = self._p_cache.get(id(p))
        if hit is not None and hit[0] == seed:
            return hit[1]
        left = p.shape[0] < p.shape[1]
        P = _projection(seed, tuple(p.shape), rank, p.device)
        if self.projection != "gaussian":
            P = orthogonalised(P, left, scale=self.projection == "orthogonal")
        self._p_cache[id(p)] = (seed, P)
        return P

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, rank, kappa, b1 = group["lr"], group["rank"], group["kappa"], group["beta1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                factored = p.dim() == 2
                if "step" not in st:
                    st["step"] = 0
                    if factored:
                        n, m = p.shape
                        st["row"] = torch.zeros(n, device=p.device)
                        st["col"] = torch.zeros(m, device=p.device)
                        if min(n, m) >= rank and max(n, m) / min(n, m) <= 4:
                            st["seed"] = self.base_seed + st["index"]
                            shape = (rank, m) if n < m else (n, rank)
                            st["momentum"] = torch.zeros(shape, device=p.device)
                    else:
                        st["second"] = torch.zeros_like(g)
                    if "momentum" not in st:
                        st["momentum"] = torch.zeros_like(g)
                st["step"] += 1
                t = st["step"]
                root_n = math.sqrt(p.numel())
                lr_t = lr * (p.detach().float().norm() / root_n).clamp(min=1e-3)
                beta2 = 1.0 - t ** -0.8
                v = g * g + 1e-30
                if factored:
                    row, col = st["row"], st["col"]
                    row.mul_(beta2).add_(v.mean(dim=1), alpha=1.0 - beta2)
                    col.mul_(beta2).add_(v.mean(dim=0), alpha=1.0 - beta2)
                    u = g * torch.rsqrt(row / row.mean())[:, None] * torch.rsqrt(col)[None, :]
                else:
                    st["second"].mul_(beta2).add_(v, alpha=1.0 - beta2)
                    u = g * torch.rsqrt(st["second"])
                M = st["momentum"]
                if "seed" in st:
                    left = p.shape[0] < p.shape[1]
                    P = self._proj(p, st["seed"], rank)
                    s2 = (p.shape[0] if left else p.shape[1]) / rank  # long / r
                    up_m = _up(P, M, left)
                    if self.direction == "flora":
                        d = (1.0 - b1) * u + b1 * up_m
                    elif self.direction == "shrink":
                        d = (1.0 - b1) * u + (b1 / math.sqrt(s2)) * up_m
                    else:  # split: momentum inside P's span, gamma U outside it
                        pu = _up(P, _down(P, u, left), left) / s2
                        d = self.gamma * u + (1.0 - b1 - self.gamma) * pu + (b1 / s2) * up_m
                    if t % kappa == 0:
                        st["seed"] = flora_ext.next_seed(st["seed"])
                        P_new = self._proj(p, st["seed"], rank)
                        moved = _down(P_new, up_m, left)
                        # split tracks the projected momentum: carry Pi m, not s^2 Pi m
                        M.copy_(moved / s2 if self.direction == "split" else moved)
                        P = P_new
                    M.mul_(b1).add_(_down(P, u, left), alpha=1.0 - b1)
                else:
                    d = (1.0 - b1) * u + b1 * M
                    M.copy_(d)
                d = d / (d.norm() / math.sqrt(d.numel())).clamp(min=1.0)
                p.sub_(lr_t * d.to(p.dtype))


# ------------------------------------------------------------------ diagnostics


class Diagnostics:
    """Per-parameter update RMS, RMS(D) before clipping and momentum norm on chosen steps
    (flora_ext.Flora only: it keeps p.grad and exposes its state)."""

    def __init__(self, opt, named):
        self.opt = opt
        self.named = [(n, p) for n, p in named if p.dim() == 2]
        self.rows = []  # [step, [[update_rms, rms_d, momentum_norm] per parameter]]

    @torch.no_grad()
    def before(self):
        self.saved = []
        for name, p in self.named:
            st = self.opt.state.get(p, {})
            m_old = st["momentum"].clone() if "seed" in st else None
            self.saved.append((p.detach().float().clone(), m_old, st.get("seed")))

    @torch.no_grad()
    def after(self, step):
        stats = []  # 0-d tensors, read back with one synchronisation
        for (name, p), (p_old, m_old, seed_old) in zip(self.named, self.saved):
            group = next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))
            st = self.opt.state[p]
            root_n = math.sqrt(p.numel())
            rms_p = (p_old.norm() / root_n).clamp(min=group["eps"][1])
            update_rms = (p.detach().float() - p_old).norm() / root_n / (group["lr"] * rms_p)
            beta1 = group["beta1"] or 0.0
            if "seed" in st:
                g = p.grad.float()
                row, col = st["row_second_moment"], st["col_second_moment"]
                u = g * torch.rsqrt(row / row.mean())[:, None] * torch.rsqrt(col)[None, :]
                left = p.shape[0] < p.shape[1]
                rank = st["momentum"].shape[0] if left else st["momentum"].shape[1]
                d = (1 - beta1) * u
                if m_old is not None:  # None: the first step, from a zero momentum
                    d = d + beta1 * _up(_projection(seed_old, p.shape, rank, p.device), m_old,
                                        left)
                p_now = _projection(st["seed"], p.shape, rank, p.device)
                mom = _up(p_now, st["momentum"], left).norm()
            elif "momentum" in st:
                d = st["momentum"]
                mom = d.norm()
            else:
                g = p.grad.float()
                row, col = st["row_second_moment"], st["col_second_moment"]
                d = g * torch.rsqrt(row / row.mean())[:, None] * torch.rsqrt(col)[None, :]
                mom = torch.zeros((), device=p.device)
            rms_d = d.norm() / math.sqrt(d.numel())
            stats += [update_rms, rms_d, mom]
        values = torch.stack([x.float() for x in stats]).tolist()
        out = [[round(values[i], 5), round(values[i + 1], 5), round(values[i + 2], 4)]
               for i in range(0, len(values), 3)]
        self.rows.append([step, out])


def diag_step(step, kappa, every):
    """Whether step (1-based) is logged: every `every` steps and from 2 before to 20 after
    each resample."""
    if step % every == 0:
        return True
    if kappa <= 0:
        return False
    phase = step % kappa
    return phase >= kappa - 2 or (step >= kappa and phase <= 20)


# ------------------------------------------------------------------ one run


def build(args, model):
    named = list(model.named_parameters())
    params = [p for _, p in named]
    names = {p: n for n, p in named}
    if args.variant == "flora":
        opt = flora_ext.Flora(params, lr=args.lr, rank=args.rank, kappa=args.kappa, beta1=0.9,
                              seed=args.proj_seed)
    elif args.variant == "adafactor_momentum":
        opt = flora_ext.Flora(params, lr=args.lr, rank=None, beta1=0.9, seed=args.proj_seed)
    elif args.variant == "flora_opt_pkg":  # the authors' package, for comparison (no diagnostics)
        from flora_ext.testing import import_flora_opt

        opt = import_flora_opt().Flora(params, lr=args.lr, rank=args.rank, kappa=args.kappa,
                                       beta1=0.9, seed=args.proj_seed)
    elif args.variant == "flora_py":  # ProbeFlora: projections the extension does not have
        opt = ProbeFlora(params, lr=args.lr, rank=args.rank, kappa=args.kappa, beta1=0.9,
                         seed=args.proj_seed, projection=args.projection,
                         direction=args.direction, gamma=args.gamma)
    else:
        raise ValueError(f"unknown variant {args.variant!r}")
    return opt, names, named


def train(args):
    out = pathlib.Path(args.out)
    splits = data_mod.load_splits(args.data)
    cargs = argparse.Namespace(device=args.device, amp=args.amp)
    rd = conv.RunDevice(cargs)
    device, autocast = rd.device, rd.autocast
    torch.manual_seed(INIT_SEED)
    model = conv.GPT(args.d_model, args.n_layers, args.n_heads, args.context).to(device)
    opt, names, named = build(args, model)
    ext = args.variant not in ("flora_opt_pkg", "flora_py")
    mover = MomentumTransfer(opt, names, args.transfer) if ext else None
    diag = Diagnostics(opt, named) if ext else None
    sched = conv.make_scheduler(opt, args.steps, args.warmup)
    gen = torch.Generator().manual_seed(1000 + args.data_seed)
    val_windows = conv.eval_windows(splits["validation"], args.context, args.eval_windows)
    log = {"args": vars(args), "torch": torch.__version__, "device": str(device),
           "parameters": sum(p.numel() for p in model.parameters()),
           "layers": [n for n, p in named if p.dim() == 2],
           "loss": [], "val": [], "finished": False}
    rd.name_in(log)

    def save():
        tmp = out.with_suffix(".tmp")
        if diag is not None:
            log["diagnostics"] = diag.rows
        if mover is not None:
            log["resamples"] = mover.records
        tmp.write_text(json.dumps(log))
        os.replace(tmp, out)

    if args.barrier_dir:  # calibration: time the steps while every run is training
        ready = pathlib.Path(args.barrier_dir)
        ready.mkdir(parents=True, exist_ok=True)
        (ready / out.name).touch()
        t_end = time.time() + args.barrier_timeout_s
        while len(list(ready.iterdir())) < args.barrier_n and time.time() < t_end:
            time.sleep(0.2)
    rd.sync()
    t0 = time.perf_counter()
    t_warm = None
    warm = min(10, args.steps - 1)
    step = 0
    while step < args.steps:
        x, y = conv.sample_batch(splits["train"], args.batch_size, args.context, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            loss = conv.loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step += 1
        logged = diag is not None and diag_step(step, args.kappa if args.variant == "flora"
                                                else 0, args.diag_every)
        if logged:
            diag.before()
        if mover is not None:
            mover.step()
        else:
            opt.step()
        if logged:
            diag.after(step)
        sched.step()
        log["loss"].append(round(loss.item(), 5))
        if step == warm:
            rd.sync()
            t_warm = time.perf_counter()
        stop = args.deadline is not None and time.time() > args.deadline and step < args.steps
        if step % args.eval_every == 0 or step == args.steps or stop:
            log["val"].append([step, conv.evaluate(model, val_windows, args.eval_batch_size,
                                                   device, autocast)])
            save()
        if not math.isfinite(log["loss"][-1]):
            log["diverged"] = step
            break
        if stop:
            log["stopped_early"] = step
            break
    rd.sync()
    t1 = time.perf_counter()
    log["seconds"] = t1 - t0
    if t_warm is not None and step > warm:
        log["steady_s_per_step"] = (t1 - t_warm) / (step - warm)
    log["steps_done"] = step
    if rd.cuda:
        log["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
    log["finished"] = step == args.steps
    if log["val"]:
        log["final_val_loss"] = log["val"][-1][1]
    save()
    print(f"[done] {out.name}: {step}/{args.steps} steps, val "
          f"{log.get('final_val_loss', float('nan')):.4f}, {log['seconds']:.1f} s", flush=True)


# ------------------------------------------------------------------ the sweep


def run_name(variant, rank, transfer, seed, lr_scale=1.0, direction="flora", gamma=1.0):
    if variant == "flora_py":  # transfer: the projection
        how = {"flora": "", "shrink": "-shrink", "split": f"-split{gamma:g}"}[direction]
        return f"flora_py-r{rank}-{transfer}{how}-proj{seed}"
    if variant == "adafactor_momentum":
        return f"adafactor_momentum-data{seed}"
    if variant == "flora_opt_pkg":
        return f"flora_opt_pkg-r{rank}-proj{seed}"
    scaled = "" if lr_scale == 1.0 else f"-lrx{lr_scale:g}"
    return f"flora-r{rank}-{transfer}{scaled}-proj{seed}"


def _adafactor_momentum_runs(args):
    """Adafactor + momentum over --data-seeds data orders, the reference of every plan."""
    return [(0, run_name("adafactor_momentum", 0, "", s),
             ["--variant", "adafactor_momentum", "--data-seed", str(s)])
            for s in range(args.data_seeds)]


def _probe_run(priority, rank, projection, seed, direction="flora", gamma=1.0):
    """A ProbeFlora run: (priority, name, run arguments)."""
    how = [] if direction == "flora" else ["--direction", direction, "--gamma", f"{gamma:g}"]
    return (priority, run_name("flora_py", rank, projection, seed, direction=direction,
                               gamma=gamma),
            ["--variant", "flora_py", "--rank", str(rank), "--projection", projection, *how,
             "--proj-seed", str(seed)])


def plan_projection_runs(args):
    """--plan projections: ProbeFlora with orthogonalised projections over --seeds at --rank
    and a few seeds at --other-ranks; ProbeFlora with Gaussian ones (the extension's step) on
    two seeds as its baseline; the extension at --other-ranks; Adafactor + momentum."""
    seeds = list(range(args.seeds))
    runs = _adafactor_momentum_runs(args)
    runs += [_probe_run(0, args.rank, "orthogonal", s) for s in seeds]
    runs += [_probe_run(0, args.rank, "gaussian", s) for s in seeds[:2]]
    runs += [(1, run_name("flora", rank, "flora_opt", s),
              ["--variant", "flora", "--rank", str(rank), "--transfer", "flora_opt",
               "--proj-seed", str(s)])
             for rank in args.other_ranks for s in seeds[:args.extra_seeds]]
    runs += [_probe_run(2, rank, "orthogonal", s) for rank in args.other_ranks for s in seeds[:2]]
    return runs


def plan_direction_runs(args):
    """--plan directions: ProbeFlora with orthogonal projections and the directions of
    DIRECTIONS at --rank over --seeds (split with gamma 1 and 0.5; 'subspace' projections are
    split with gamma = 1 - beta1), Flora's own direction on two seeds as the baseline, split
    (gamma 1) at --other-ranks, Adafactor + momentum."""
    seeds = list(range(args.seeds))
    runs = _adafactor_momentum_runs(args)
    runs += [_probe_run(0, args.rank, "orthogonal", s, "split", 1.0) for s in seeds]
    runs += [_probe_run(0, args.rank, "orthogonal", s, "split", 0.5) for s in seeds]
    runs += [_probe_run(0, args.rank, "orthogonal", s, "shrink") for s in seeds]
    runs += [_probe_run(0, args.rank, "subspace", s) for s in seeds]
    runs += [_probe_run(0, args.rank, "orthogonal", s) for s in seeds[:2]]
    runs += [_probe_run(1, rank, "orthogonal", s, "split", 1.0)
             for rank in args.other_ranks for s in seeds[:args.extra_seeds]]
    return runs


def plan_runs(args):
    """(priority, name, run arguments) of every run; lower priority number = kept first."""
    if getattr(args, "plan", "transfers") == "projections":
        return plan_projection_runs(args)
    if getattr(args, "plan", "transfers") == "directions":
        return plan_direction_runs(args)
    seeds = list(range(args.seeds))
    runs = _adafactor_momentum_runs(args)
    for transfer in ("flora_opt", "norm_preserving"):
        for s in seeds:
            runs.append((0, run_name("flora", args.rank, transfer, s),
                         ["--variant", "flora", "--rank", str(args.rank), "--transfer", transfer,
                          "--proj-seed", str(s)]))
    rank = str(args.rank)
    kinds = {  # the extra runs, by kind, one per seed
        "least_squares": [(1, run_name("flora", args.rank, "least_squares", s),
                           ["--variant", "flora", "--rank", rank, "--transfer", "least_squares",
                            "--proj-seed", str(s)]) for s in seeds[:args.extra_seeds]],
        # Flora's update is ~sqrt(1 + n/r) larger than dense momentum's: is it the step
        # size? flora-opt's transfer at a lower lr
        "low_lr": [(1, run_name("flora", args.rank, "flora_opt", s, args.low_lr_scale),
                    ["--variant", "flora", "--rank", rank, "--transfer", "flora_opt",
                     "--proj-seed", str(s), "--lr", str(args.lr * args.low_lr_scale)])
                   for s in seeds[:args.extra_seeds]],
        # the authors' step, for the gap between good runs
        "package": [(1, run_name("flora_opt_pkg", args.rank, "", s),
                     ["--variant", "flora_opt_pkg", "--rank", rank, "--proj-seed", str(s)])
                    for s in seeds[:args.extra_seeds]],
        "reset": [(1, run_name("flora", args.rank, "reset", s),
                   ["--variant", "flora", "--rank", rank, "--transfer", "reset",
                    "--proj-seed", str(s)]) for s in seeds[:args.reset_seeds]],
    }
    # Order: two seeds of least_squares and low_lr first (what --max-procs usually keeps),
    # then two of the package, then the rest a seed at a time.
    extra = [kinds[k][i:i + 1] for i in range(2) for k in ("least_squares", "low_lr")]
    extra += [kinds["package"][:2]]
    extra += [kinds[k][i:i + 1] for i in range(max(args.extra_seeds, args.reset_seeds))
              for k in ("reset", "least_squares", "low_lr", "package")
              if i >= (0 if k == "reset" else 2)]
    runs += [r for group in extra for r in group]
    for rank in args.other_ranks:
        for transfer in ("flora_opt", "norm_preserving"):
            for s in seeds[:args.extra_seeds]:
                runs.append((2, run_name("flora", rank, transfer, s),
                             ["--variant", "flora", "--rank", str(rank), "--transfer", transfer,
                              "--proj-seed", str(s)]))
    return runs


def _launch(args, name, extra, steps, kappa, out_dir, deadline, barrier=0):
    cmd = [sys.executable, os.path.abspath(__file__), "run", "--data", args.data,
           "--out", str(out_dir / f"{name}.json"), "--steps", str(steps), "--kappa", str(kappa),
           "--lr", str(args.lr), "--device", args.device, "--batch-size", str(args.batch_size),
           "--d-model", str(args.d_model), "--n-layers", str(args.n_layers),
           "--n-heads", str(args.n_heads), "--context", str(args.context),
           "--eval-windows", str(args.eval_windows), "--eval-every", str(args.eval_every),
           "--diag-every", str(args.diag_every), "--deadline", str(deadline)] + extra
    if barrier:
        cmd += ["--barrier-dir", str(out_dir / ".barrier"), "--barrier-n", str(barrier)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    f = open(out_dir / f"{name}.out", "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), f


def _run_all(args, runs, steps, kappa, out_dir, deadline, barrier=False):
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = [(name,) + _launch(args, name, extra, steps, kappa, out_dir, deadline,
                               len(runs) if barrier else 0)
             for _, name, extra in runs]
    hard = deadline + args.grace_s
    for name, proc, f in procs:
        try:
            proc.wait(timeout=max(1.0, hard - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"[killed] {name} past the hard deadline", flush=True)
        f.close()


def sweep(args):
    """Calibrate (every run at once for --cal-steps), choose the step count that fits the time
    left, drop the optional runs if even --s-min does not fit, then train everything at once."""
    t_start = time.time()
    runs_dir = pathlib.Path(args.runs)
    all_runs = plan_runs(args)
    try:
        from flora_ext.testing import import_flora_opt

        import_flora_opt()
    except Exception as e:  # flora-opt (and accelerate, which it imports) missing
        print(f"[plan] flora-opt not importable ({e!r}): its runs are left out", flush=True)
        all_runs = [r for r in all_runs if not r[1].startswith("flora_opt_pkg")]
    runs = sorted(all_runs, key=lambda r: r[0])[:args.max_procs]
    deadline = args.deadline
    cal_dir = runs_dir / "calibration"
    # kappa = the calibration's length: diagnostics on about as many steps as in the runs
    _run_all(args, runs, args.cal_steps, args.cal_steps, cal_dir,
             min(deadline, time.time() + args.cal_timeout_s), barrier=True)
    per_step, memory, failed = [], [], []
    for _, name, _ in runs:
        f = cal_dir / f"{name}.json"
        log = json.loads(f.read_text()) if f.is_file() else {}
        if "steady_s_per_step" in log:
            per_step.append(log["steady_s_per_step"])
            memory.append(log.get("max_memory_reserved") or 0)
        else:
            failed.append(name)
    cal_wall = time.time() - t_start
    if not per_step:
        raise SystemExit("calibration produced no timing; see " + str(cal_dir))
    if failed:
        oom = any("out of memory" in (cal_dir / f"{name}.out").read_text(errors="replace")
                  for name in failed if (cal_dir / f"{name}.out").is_file())
        # out of memory with every run at once: keep the essential ones; else drop the failed
        print(f"[calibration] failed: {failed}; " + ("out of memory: keeping priority-0 runs "
              "only" if oom else "leaving them out"), flush=True)
        runs = [r for r in runs if (r[0] == 0 if oom else r[1] not in failed)]
    s_per_step = max(per_step)
    # Startup + evaluations: the calibration's wall time minus its steps.
    overhead = max(10.0, cal_wall - args.cal_steps * s_per_step) + args.eval_reserve_s
    left = deadline - time.time() - overhead
    keep = list(runs)
    steps = int(args.safety * left / s_per_step)
    for drop_from in (2, 1):  # fewer processes share the GPU: assume time per step ~ count
        if steps >= args.s_min:
            break
        kept = [r for r in keep if r[0] < drop_from]
        steps = int(steps * len(keep) / max(1, len(kept)))
        keep = kept
    steps = max(args.s_min // 4, min(args.s_max, steps))
    # A second wave (the runs left out by --max-procs, other ranks first) only where both
    # waves get the full --s-max steps: the main runs are never shortened for it.
    second = [r for r in sorted(all_runs, key=lambda r: -r[0]) if r not in keep][:args.max_procs]
    two_wave_steps = int(args.safety * (left - overhead) / (2 * s_per_step))
    if not failed and second and two_wave_steps >= args.s_max:
        second = sorted(second, key=lambda r: r[0])
    else:
        second = []
    kappa = max(1, steps // args.resamples_per_run)
    plan = {"runs": [r[1] for r in keep + second],
            "second_wave": [r[1] for r in second],
            "dropped": [r[1] for r in all_runs if r not in keep and r not in second],
            "calibration_s_per_step": s_per_step, "calibration_wall_s": cal_wall,
            "calibration_failed": failed, "calibration_max_memory_reserved": max(memory),
            "overhead_s": overhead, "steps": steps, "kappa": kappa, "lr": args.lr,
            "model": [args.d_model, args.n_layers, args.n_heads, args.context],
            "batch_size": args.batch_size, "concurrent": max(len(keep), len(second)),
            "planned_at": time.time(), "deadline": deadline}
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "plan.json").write_text(json.dumps(plan, indent=1))
    print(f"[plan] {json.dumps(plan)}", flush=True)
    if second:
        first_end = time.time() + overhead + steps * s_per_step / args.safety
        _run_all(args, keep, steps, kappa, runs_dir / "runs", first_end)
        _run_all(args, second, steps, kappa, runs_dir / "runs", deadline - args.eval_reserve_s / 2)
    else:
        _run_all(args, keep, steps, kappa, runs_dir / "runs", deadline - args.eval_reserve_s / 2)


# ------------------------------------------------------------------ report


def spikes(losses, window=20, jump=0.1, skip_frac=0.1):
    """Loss spikes: times the windowed mean training loss rises more than ``jump`` above the
    lowest windowed mean so far (after the first ``skip_frac`` of the run); consecutive
    windows count once."""
    if len(losses) < 2 * window:
        return 0
    means = [sum(losses[i:i + window]) / window for i in range(0, len(losses) - window + 1,
                                                                    window)]
    start = max(1, int(skip_frac * len(means)))
    low, count, inside = min(means[:start]), 0, False
    for m in means[start:]:
        if m > low + jump:
            count += 0 if inside else 1
            inside = True
        else:
            inside = False
            low = min(low, m)
    return count


def load_runs(runs_dir):
    out = {}
    for f in sorted(pathlib.Path(runs_dir).glob("runs/*.json")):
        out[f.stem] = json.loads(f.read_text())
    return out


def _median(xs):
    s = sorted(xs)
    n = len(s)
    return float("nan") if not n else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def _row_key(a):
    if a["variant"] == "adafactor_momentum":
        return f"Adafactor + momentum (dense), lr={a['lr']:g}"
    if a["variant"] == "flora_opt_pkg":
        return f"flora-opt package r={a['rank']}, lr={a['lr']:g}"
    if a["variant"] == "flora_py":
        how = {"flora": "", "shrink": ", direction shrink",
               "split": f", direction split (gamma {a.get('gamma', 1.0):g})"}[
                   a.get("direction", "flora")]
        return f"ProbeFlora r={a['rank']}, {a['projection']} projection{how}, lr={a['lr']:g}"
    return f"Flora r={a['rank']}, transfer={a['transfer']}, lr={a['lr']:g}"


def summarise(runs):
    """Rows per (variant, rank, transfer): seeds -> final val loss, spikes; ratios against the
    mean of Adafactor + momentum."""
    base = [r["final_val_loss"] for r in runs.values()
            if r["args"]["variant"] == "adafactor_momentum" and r.get("finished")]
    ref = sum(base) / len(base) if base else float("nan")
    groups = {}
    for name, r in runs.items():
        a = r["args"]
        key = _row_key(a)
        seed = a["data_seed"] if a["variant"] == "adafactor_momentum" else a["proj_seed"]
        groups.setdefault(key, {})[seed] = r
    rows = []
    for key, by_seed in groups.items():
        vals = {s: r.get("final_val_loss", float("nan")) for s, r in by_seed.items()}
        done = [v for s, v in vals.items() if by_seed[s].get("finished") and math.isfinite(v)]
        n_spiky = sum(1 for r in by_seed.values() if spikes(r["loss"]) > 0)
        rows.append(dict(key=key, vals=vals, finished=len(done), runs=len(by_seed),
                         median=_median(done), worst=max(done) if done else float("nan"),
                         median_ratio=_median(done) / ref, worst_ratio=(max(done) / ref
                                                                         if done else math.nan),
                         spiky=n_spiky, failed=sum(1 for v in done if v > 1.03 * ref)))
    return ref, rows


def resample_summary(runs):
    """Mean over runs and layers of ||up(M)|| after / before each resample, per row key."""
    out = {}
    for r in runs.values():
        a = r["args"]
        if a["variant"] != "flora" or not r.get("resamples"):
            continue
        key = _row_key(a)
        ratios = [rec[3] / rec[2] for rec in r["resamples"] if rec[2] > 0]
        raw = [rec[3] / rec[4] / rec[2] if rec[4] else math.nan for rec in r["resamples"]
               if rec[2] > 0]
        out.setdefault(key, [[], []])
        out[key][0] += ratios
        out[key][1] += [x for x in raw if math.isfinite(x)]
    return {k: (sum(v[0]) / len(v[0]), sum(v[1]) / len(v[1]) if v[1] else math.nan)
            for k, v in out.items() if v[0]}


def clip_summary(runs):
    """Median over runs, steps and layers of RMS(D) (the clip factor is max(1, RMS(D))):
    on steps away from a resample and on the 10 steps from one."""
    out = {}
    for r in runs.values():
        a = r["args"]
        if not r.get("diagnostics"):
            continue
        key = _row_key(a)
        kappa = a["kappa"] if a["variant"] == "flora" else 0
        d = out.setdefault(key, [[], []])
        for step, layers in r["diagnostics"]:
            near = kappa and step >= kappa and step % kappa <= 10
            d[1 if near else 0] += [x[1] for x in layers]
    return {k: (_median(v[0]), _median(v[1])) for k, v in out.items()}


def report(args):
    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"no runs under {args.runs}/runs")
    plan = json.loads((pathlib.Path(args.runs) / "plan.json").read_text())
    ref, rows = summarise(runs)
    any_run = next(iter(runs.values()))
    seeds = sorted({s for row in rows for s in row["vals"]})
    head = "## " + args.section
    lines = [head, ""]
    a = any_run["args"]
    lines.append(
        f"Device: {any_run.get('device_name', any_run['device'])}; torch {any_run['torch']}. "
        f"Generated by `benchmarks/stability.py report` from `tools/gpu_stability.sh` "
        f"(commit {args.commit or 'see git log'}). Model: the GPT of `benchmarks/convergence.py`, "
        f"d_model {a['d_model']}, {a['n_layers']} layers, {a['n_heads']} heads, context "
        f"{a['context']} ({any_run['parameters']:,d} parameters); batch {a['batch_size']}, "
        f"{plan['steps']} steps, kappa {plan['kappa']}, beta1 0.9, peak lr {plan['lr']} (the lr "
        f"where Adafactor + momentum does best), bf16 autocast on CUDA, "
        f"{plan['concurrent']} runs sharing the device. Every Flora run has the same "
        f"initialisation and data order; only the projection seed changes. Adafactor + "
        f"momentum varies the data order instead. Final validation loss (nats per byte):")
    lines.append("")
    lines.append("| optimizer | " + " | ".join(f"seed {s}" for s in seeds)
                 + " | median | worst | median / A+M | worst / A+M | seeds > 1.03 A+M | "
                 "runs with a loss spike |")
    lines.append("|---|" + "---|" * (len(seeds) + 6))
    for row in sorted(rows, key=lambda r: r["key"]):
        cells = []
        for s in seeds:
            r = next((x for k, x in row["vals"].items() if k == s), None)
            cells.append("-" if r is None else f"{r:.4f}")
        lines.append(f"| {row['key']} | " + " | ".join(cells)
                     + f" | {row['median']:.4f} | {row['worst']:.4f} | {row['median_ratio']:.3f}"
                     f" | {row['worst_ratio']:.3f} | {row['failed']}/{row['finished']} | "
                     f"{row['spiky']}/{row['runs']} |")
    lines.append("")
    lines.append(f"A+M = mean final validation loss of Adafactor + momentum ({ref:.4f}). A loss "
                 "spike: the mean training loss over 20 steps rises more than 0.1 above its "
                 "lowest earlier value (first 10% of the run excluded). Runs not finished by "
                 "the deadline show their last validation loss and are left out of median, "
                 f"worst and counts. Dropped for time: {', '.join(plan['dropped']) or 'none'}.")
    res = resample_summary(runs)
    clip = clip_summary(runs)
    if res or clip:
        lines += ["", "| optimizer | ‖up(M)‖ after / before a resample (as applied) | "
                  "same, flora-opt's transfer | median RMS(D) away from resamples | "
                  "median RMS(D) within 10 steps after one |", "|---|---|---|---|---|"]
        for key in sorted(set(res) | set(clip)):
            ra, rb = res.get(key, (math.nan, math.nan))
            ca, cb = clip.get(key, (math.nan, math.nan))
            cells = ("-" if not math.isfinite(v) else f"{v:.3f}" for v in (ra, rb, ca, cb))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines += ["", "RMS(D) is the direction's RMS before the clip; the clip factor is "
                  "max(1, RMS(D)) (threshold 1). Per step, per layer values are in the run logs."]
    svg = pathlib.Path(args.plot).name if args.plot else "stability.svg"
    lines += ["", f"![stability]({svg})", ""]
    section = "\n".join(lines)
    if args.md:
        md = pathlib.Path(args.md)
        text = md.read_text() if md.is_file() else ""
        if head in text:
            before, _, rest = text.partition(head)
            nxt = rest.find("\n## ")
            text = before + section + ("\n" + rest[nxt + 1:] if nxt >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        md.write_text(text)
    print(section)
    if args.plot:
        plot(runs, rows, ref, args.plot)


def _svg_panel(x0, y0, w, h, xlim, ylim, title, xlabel, ylabel):
    """Frame, title and axis ticks of one panel; returns (elements, to_px)."""
    (xa, xb), (ya, yb) = xlim, ylim

    def to_px(x, y):
        return (x0 + (x - xa) / (xb - xa) * w, y0 + h - (y - ya) / (yb - ya) * h)

    el = [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="black"/>',
          f'<text x="{x0 + w / 2}" y="{y0 - 8}" text-anchor="middle" font-size="12">{title}</text>',
          f'<text x="{x0 + w / 2}" y="{y0 + h + 34}" text-anchor="middle" font-size="11">'
          f'{xlabel}</text>',
          f'<text x="{x0 - 48}" y="{y0 + h / 2}" font-size="11" text-anchor="middle" '
          f'transform="rotate(-90 {x0 - 48} {y0 + h / 2})">{ylabel}</text>']
    for i in range(6):
        y = ya + (yb - ya) * i / 5
        _, py = to_px(xa, y)
        el.append(f'<text x="{x0 - 4}" y="{py + 4:.1f}" text-anchor="end" font-size="9">'
                  f'{y:.3f}</text>')
        el.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>')
    return el, to_px


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
          "#e377c2", "#7f7f7f", "#bcbd22")


def plot(runs, rows, ref, path):
    """An SVG (no plotting library needed): final validation loss per seed and optimizer, and
    the training-loss curves (20-step means)."""
    keys = sorted(r["key"] for r in rows)
    color = {k: COLORS[i % len(COLORS)] for i, k in enumerate(keys)}
    vals = [v for r in rows for v in r["vals"].values() if math.isfinite(v)]
    lo, hi = min(vals + [ref]), max(vals + [1.03 * ref])
    pad = 0.05 * (hi - lo or 1)
    el, to_px = _svg_panel(70, 30, 420, 330, (-0.5, len(keys) - 0.5), (lo - pad, hi + pad),
                           "final validation loss per seed (bar: median)", "", "nats per byte")
    for label, y, dash in (("A+M", ref, "4,3"), ("1.03 A+M", 1.03 * ref, "1,3")):
        (xa, py), (xb, _) = to_px(-0.5, y), to_px(len(keys) - 0.5, y)
        el.append(f'<line x1="{xa}" x2="{xb}" y1="{py:.1f}" y2="{py:.1f}" stroke="gray" '
                  f'stroke-dasharray="{dash}"/><text x="{xb - 2}" y="{py - 3:.1f}" '
                  f'text-anchor="end" font-size="9">{label}</text>')
    for i, key in enumerate(keys):
        row = next(r for r in rows if r["key"] == key)
        for j, v in enumerate(sorted(v for v in row["vals"].values() if math.isfinite(v))):
            px, py = to_px(i + 0.04 * (j - 4), min(v, hi + pad))
            el.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color[key]}"/>')
        if math.isfinite(row["median"]):
            (xa, py), (xb, _) = to_px(i - 0.3, row["median"]), to_px(i + 0.3, row["median"])
            el.append(f'<line x1="{xa:.1f}" x2="{xb:.1f}" y1="{py:.1f}" y2="{py:.1f}" '
                      f'stroke="black" stroke-width="2"/>')
    curves = {}
    for r in runs.values():
        a = r["args"]
        key = _row_key(a)
        w, losses = 20, r["loss"]
        curves.setdefault(key, []).append(
            [(w * (i + 1), sum(losses[i * w:(i + 1) * w]) / w) for i in range(len(losses) // w)])
    pts = [p for cs in curves.values() for c in cs for p in c]
    if pts:
        tail = [y for x, y in pts if x > 0.2 * max(x for x, _ in pts)] or [y for _, y in pts]
        ylo = min(tail)
        el2, to_px2 = _svg_panel(580, 30, 420, 330, (0, max(x for x, _ in pts)),
                                 (ylo - 0.05, ylo + 1.0), "training loss, 20-step means",
                                 "step", "nats per byte")
        el += el2
        for key, cs in curves.items():
            for c in cs:
                d = " ".join(f"{to_px2(x, min(max(y, ylo - 0.05), ylo + 1.0))[0]:.1f},"
                             f"{to_px2(x, min(max(y, ylo - 0.05), ylo + 1.0))[1]:.1f}"
                             for x, y in c)
                el.append(f'<polyline points="{d}" fill="none" stroke="{color[key]}" '
                          f'stroke-width="0.8" opacity="0.8"/>')
    for i, key in enumerate(keys):
        el.append(f'<rect x="{70 + 250 * (i % 4)}" y="{400 + 16 * (i // 4)}" width="10" '
                  f'height="10" fill="{color[key]}"/><text x="{84 + 250 * (i % 4)}" '
                  f'y="{409 + 16 * (i // 4)}" font-size="10">{key}</text>')
    height = 420 + 16 * ((len(keys) + 3) // 4)
    pathlib.Path(path).write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="1040" height="{height}" '
        f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
        + "".join(el) + "</svg>\n")
    print(f"plot: {path}")


# ------------------------------------------------------------------ command line


def _model_args(p):
    p.add_argument("--data", required=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--diag-every", type=int, default=10)
    p.add_argument("--warmup", type=float, default=0.05)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one training run")
    _model_args(r)
    r.add_argument("--out", required=True)
    r.add_argument("--variant", default="flora",
                   choices=("flora", "adafactor_momentum", "flora_opt_pkg", "flora_py"))
    r.add_argument("--projection", choices=PROJECTIONS, default="gaussian",
                   help="flora_py only: the projection ProbeFlora uses")
    r.add_argument("--direction", choices=DIRECTIONS, default="flora",
                   help="flora_py only: how ProbeFlora forms D (DIRECTIONS)")
    r.add_argument("--gamma", type=float, default=1.0,
                   help="flora_py, direction split: the gradient's weight outside the subspace")
    r.add_argument("--transfer", choices=TRANSFERS, default="flora_opt")
    r.add_argument("--rank", type=int, default=128)
    r.add_argument("--kappa", type=int, default=240)
    r.add_argument("--proj-seed", type=int, default=0)
    r.add_argument("--data-seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument("--deadline", type=float, default=None)
    r.add_argument("--barrier-dir", default=None)
    r.add_argument("--barrier-n", type=int, default=0)
    r.add_argument("--barrier-timeout-s", type=float, default=60)
    s = sub.add_parser("sweep", help="calibrate, plan and run every run at once")
    _model_args(s)
    s.add_argument("--runs", required=True)
    s.add_argument("--deadline", type=float, required=True, help="Unix time")
    s.add_argument("--rank", type=int, default=128)
    s.add_argument("--seeds", type=int, default=8, help="projection seeds at --rank")
    s.add_argument("--data-seeds", type=int, default=4, help="Adafactor + momentum data orders")
    s.add_argument("--extra-seeds", type=int, default=4,
                   help="seeds of the optional runs (reset transfer, other ranks)")
    s.add_argument("--reset-seeds", type=int, default=2, help="seeds of transfer=reset")
    s.add_argument("--low-lr-scale", type=float, default=0.5,
                   help="lr factor of the lower-lr Flora runs")
    s.add_argument("--other-ranks", type=lambda v: [int(x) for x in v.split(",") if x],
                   default=[64, 256])
    s.add_argument("--plan", choices=("transfers", "projections", "directions"),
                   default="transfers",
                   help="transfers: momentum transfers at resamples (the extension); "
                        "projections: orthogonalised projections (ProbeFlora); "
                        "directions: ProbeFlora's directions (DIRECTIONS)")
    s.add_argument("--max-procs", type=int, default=24,
                   help="runs at most (by priority): memory and CPU cores of the machine")
    s.add_argument("--cal-steps", type=int, default=40)
    s.add_argument("--cal-timeout-s", type=float, default=120)
    s.add_argument("--s-min", type=int, default=600)
    s.add_argument("--s-max", type=int, default=1200)
    s.add_argument("--resamples-per-run", type=int, default=5)
    s.add_argument("--eval-reserve-s", type=float, default=20)
    s.add_argument("--safety", type=float, default=0.85, help="fraction of the fitted steps")
    s.add_argument("--grace-s", type=float, default=15)
    s.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("report", help="markdown section and plot from a sweep's directory")
    q.add_argument("--runs", required=True)
    q.add_argument("--md", default=None, help="convergence.md to add/replace the section in")
    q.add_argument("--plot", default=None)
    q.add_argument("--commit", default=None)
    q.add_argument("--section", default="Stability across projection seeds",
                   help="the convergence.md section (## title) to add or replace")
    args = p.parse_args(argv)
    if args.cmd == "run":
        train(args)
    elif args.cmd == "sweep":
        sweep(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
