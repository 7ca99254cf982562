#!/usr/bin/env python3
"""Write benchmarks/results/convergence.md and its plots from convergence run directories.

    python benchmarks/convergence_report.py RUNS [--out benchmarks/results]

RUNS is what tools/gpu_convergence.sh leaves (and puts into convergence_runs.tar.gz):
``part1/`` (learning-rate sweep and part-1 runs, ``lr_choice.json``), ``part2/``,
``calib/``, ``plan.json``, ``env.json`` and ``commands.txt``; only ``part1/`` is required.
Every number in the report, the claim check included, is computed here from the runs'
``log.json`` files; runs that did not finish (stopped at a deadline) are listed but left
out of means and of the claim check.

The claim check compares means over seeds of the final validation loss: a difference is
"within noise" when it is at most 2 standard errors of the difference
(sqrt(s_a^2/n_a + s_b^2/n_b), s the sample standard deviation over seeds), and "better" or
"worse" beyond that. With fewer than 2 finished seeds on a side no verdict is given.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NOISE_SE = 2.0  # "within noise": |difference of means| <= NOISE_SE standard errors


# ------------------------------------------------------------------------------ reading


def read_logs(d):
    out = []
    for p in sorted(pathlib.Path(d).glob("*/log.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            print(f"warning: {p}: {e}", file=sys.stderr)
    return out


def read_json(p, default=None):
    p = pathlib.Path(p)
    return json.loads(p.read_text()) if p.is_file() else default


def strip_seed(run):
    return run.rsplit("-s", 1)[0]


def config_key(cfg):
    """An optimizer configuration apart from its lr."""
    return (cfg["name"], cfg.get("rank"), cfg.get("kappa"), cfg.get("beta1"))


def label(cfg):
    n, r, k = cfg["name"], cfg.get("rank"), cfg.get("kappa")
    b1 = cfg.get("beta1")
    extra = "" if b1 in (None, 0.9) else f", beta1={b1:g}"
    return {
        "flora": f"Flora (r={r}, kappa={k}{extra})",
        "flora_opt": f"flora-opt (r={r}, kappa={k}{extra})",
        "adafactor_momentum": f"Adafactor + momentum (beta1={b1:g}, dense)" if b1 else "Adafactor + momentum",
        "adafactor": "Adafactor (no momentum)",
        "adamw": f"AdamW (betas=({b1:g}, 0.95))" if b1 else "AdamW",
        "galore": f"GaLore-AdamW (r={r}, update_proj_gap={k}{extra})",
    }.get(n, n)


ORDER = {"flora": 0, "flora_opt": 1, "adafactor_momentum": 2, "adafactor": 3, "galore": 4,
         "adamw": 5}
MODE_LABEL = {
    "flora_accum": "Flora compressed accumulation",
    "naive": "naive accumulation (full-size gradient buffer)",
    "lora": "LoRA (adapters on the block linears, naive accumulation)",
    "small_batch": "small batch, no accumulation",
}


def last_val(lg):
    return lg["val"][-1][1] if lg.get("val") else math.nan


def final_loss(lg, key="final_val_loss"):
    if not lg.get("finished") or lg.get("diverged"):
        return None
    v = lg.get(key)
    return v if v is not None and math.isfinite(v) else None


# -------------------------------------------------------------------------- statistics


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    return m, sd, len(values)


def fmt_ms(values, digits=4):
    m, sd, n = mean_sd(values)
    if m is None:
        return "-"
    if sd is None:
        return f"{m:.{digits}f} (n={n})"
    return f"{m:.{digits}f} ± {sd:.{digits}f} (n={n})"


def compare(a, b):
    """Verdict on mean(a) - mean(b) (losses: negative is better for a)."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    if ma is None or mb is None:
        return {"verdict": "no data", "diff": None, "se": None, "n": (na, nb)}
    diff = ma - mb
    if na < 2 or nb < 2:
        return {"verdict": "no verdict (fewer than 2 seeds)", "diff": diff, "se": None,
                "n": (na, nb)}
    se = math.sqrt(sa * sa / na + sb * sb / nb)
    if abs(diff) <= NOISE_SE * se:
        verdict = "within noise"
    else:
        verdict = "better" if diff < 0 else "worse"
    return {"verdict": verdict, "diff": diff, "se": se, "n": (na, nb)}


def fmt_cmp(c):
    if c["diff"] is None:
        return c["verdict"]
    s = f"{c['diff']:+.4f}"
    if c["se"] is not None:
        s += f" (2 SE = {NOISE_SE * c['se']:.4f})"
    return f"{c['verdict']}: difference of means {s}"


def mib(b):
    return "-" if b is None else f"{b / 2**20:,.0f}"


def mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


# ---------------------------------------------------------------------------- plotting


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("warning: matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
        return None


def mean_curve(logs):
    """(tokens, mean loss, min, max) over the evaluation points all the logs share."""
    curves = [dict((int(t), v) for t, v in lg["val"]) for lg in logs if lg.get("val")]
    if not curves:
        return [], [], [], []
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    ys = [[c[x] for c in curves] for x in xs]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot_curves(plt, groups, path, title, log_x=True):
    """groups: [(label, [logs])]. Left: whole run (log-log); right: second half (linear)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for lab, logs in groups:
        xs, m, lo, hi = mean_curve(logs)
        if not xs:
            continue
        n = len(logs)
        for ax, part in zip(axes, (slice(None), slice(len(xs) // 2, None))):
            x = [v / 1e6 for v in xs[part]]
            line, = ax.plot(x, m[part], marker=".", label=f"{lab} (n={n})")
            if n > 1:
                ax.fill_between(x, lo[part], hi[part], alpha=0.15, color=line.get_color())
    ax0, ax1 = axes
    if log_x:
        ax0.set_xscale("symlog", linthresh=max(1e-3, _first_positive(groups) / 1e6))
    ax0.set_yscale("log")
    ax0.set_title("whole run (log scales)")
    ax1.set_title("second half (linear scales)")
    for ax in axes:
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, which="both", alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7)
    fig.suptitle(title + "  (mean over seeds; band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_group(lab, runs):
    """The finished runs of a group; where none finished, the longest unfinished one."""
    fin = [lg for lg in runs if lg.get("finished")]
    if fin:
        return lab, fin
    part = [lg for lg in runs if len(lg.get("val", [])) > 1]
    if not part:
        return lab, []
    return f"{lab} [unfinished]", [max(part, key=lambda lg: lg["val"][-1][0])]


def _first_positive(groups):
    xs = [t for _, logs in groups for lg in logs for t, _ in lg.get("val", []) if t > 0]
    return min(xs) if xs else 1.0


def plot_sweep(plt, sweep, chosen, path):
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, runs in sweep.items():
        pts = sorted((lg["optimizer"]["lr"], last_val(lg)) for lg in runs)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=label(runs[0]["optimizer"]))
        lr = chosen.get(key)
        if lr is not None:
            ys = [v for x, v in pts if x == lr]
            if ys:
                ax.plot([lr], ys, marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (seed 0)")
    ax.set_title("learning-rate sweep (star: chosen)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(plt, rows, path):
    """rows: [(label, peak bytes, losses)]; False when there is nothing to plot (CPU runs)."""
    if not any(peak is not None and mean_sd(losses)[0] is not None for _, peak, losses in rows):
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for lab, peak, losses in rows:
        if peak is None:
            continue
        m, sd, _ = mean_sd(losses)
        if m is None:
            continue
        ax.errorbar([peak / 2**20], [m], yerr=[sd or 0], marker="o", capsize=4, label=lab)
    ax.set_xlabel("peak memory during training (MiB, torch.cuda.max_memory_allocated)")
    ax.set_ylabel("final validation loss")
    ax.set_title("part 2: loss against peak memory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ report


def part1_tables(runs_dir, md, plt, out):
    logs = [lg for lg in read_logs(runs_dir / "part1") if lg.get("part", 1) == 1]
    if not logs:
        md.append("No part-1 runs found.\n")
        return {}
    choices = read_json(runs_dir / "part1" / "lr_choice.json", {})
    by_key = {}
    for lg in logs:
        by_key.setdefault(config_key(lg["optimizer"]), []).append(lg)
    # chosen lr per configuration: lr_choice.json, else the lr with the most seeds
    chosen = {}
    for rec in choices.values():
        prefix = rec.get("run_prefix")
        for lg in logs:
            if prefix and strip_seed(lg["run"]) == prefix:
                chosen[config_key(lg["optimizer"])] = lg["optimizer"]["lr"]
    for key, runs in by_key.items():
        if key not in chosen:
            counts = {}
            for lg in runs:
                counts[lg["optimizer"]["lr"]] = counts.get(lg["optimizer"]["lr"], 0) + 1
            chosen[key] = max(counts, key=lambda lr: (counts[lr], -lr))
    keys = sorted(by_key, key=lambda k: (ORDER.get(k[0], 9), str(k)))

    # ---- sweep
    sweep = {k: [lg for lg in by_key[k] if lg["seed"] == 0] for k in keys}
    sweep = {k: v for k, v in sweep.items() if len({lg["optimizer"]["lr"] for lg in v}) > 1}
    first = logs[0]
    md.append("## Part 1: learning-rate sweep\n")
    md.append(f"Every optimizer at each lr of its grid (`LR_GRIDS` in `benchmarks/convergence.py`), "
              f"seed 0, the same {first['steps']} steps as the part-1 runs. The chosen lr "
              "(bold) has the lowest final validation loss (`choose_lr`; runs stopped at a "
              "deadline count with their last validation loss). An lr at the edge of its grid "
              "means the optimum may lie outside it.\n")
    if sweep:
        md.append("| optimizer | lr | final val loss | status |")
        md.append("|---|---|---|---|")
        for k, runs in sweep.items():
            for lg in sorted(runs, key=lambda lg: lg["optimizer"]["lr"]):
                lr = lg["optimizer"]["lr"]
                is_chosen = lr == chosen.get(k)
                grid = sorted({r["optimizer"]["lr"] for r in runs})
                edge = is_chosen and lr in (grid[0], grid[-1])
                lrs = f"**{lr:g}**" if is_chosen else f"{lr:g}"
                status = ("diverged" if lg.get("diverged") else
                          "finished" if lg.get("finished") else
                          f"stopped at {lg['val'][-1][0] / 1e6:.2f}M tokens" if lg.get("val") else "no result")
                if edge:
                    status += "; chosen lr at the grid edge"
                md.append(f"| {label(lg['optimizer'])} | {lrs} | {last_val(lg):.4f} | {status} |")
        md.append("")
        if plt:
            plot_sweep(plt, sweep, chosen, out / "convergence_sweep.png")
            md.append("![lr sweep](convergence_sweep.png)\n")
    else:
        md.append("No sweep runs found (no configuration ran at more than one lr).\n")

    # ---- main table
    # calibration: all optimizers training at once; seconds per step over the window in which
    # all of them ran (plan.json), else each calibration run's own steady tokens/s
    calib = {}
    sec = (read_json(runs_dir / "plan.json", {}) or {}).get("calibration_seconds_per_step", {})
    for name, t in sec.items():
        calib[name] = [first["tokens_per_step"] / t] if t else []
    if not calib:
        for lg in read_logs(runs_dir / "calib" / "part1"):
            if lg.get("steady_tokens_per_s"):
                calib.setdefault(lg["optimizer"]["name"], []).append(lg["steady_tokens_per_s"])
    groups = {}
    for k in keys:
        runs = [lg for lg in by_key[k] if lg["optimizer"]["lr"] == chosen[k]]
        groups[k] = runs
    md.append("## Part 1: from scratch, 3 seeds at the chosen lr\n")
    params = first["model"]["parameters"]
    md.append(f"Final validation and test loss (nats per byte) after {first['steps']} steps of "
              f"{first['tokens_per_step']:,d} tokens ({first['steps'] * first['tokens_per_step'] / 1e6:.1f}M "
              f"tokens); mean ± sample standard deviation over the finished seeds. Optimizer "
              f"state: bytes of all state tensors after the first step (and per parameter, of "
              f"{params:,d}). Peak memory: `torch.cuda.max_memory_allocated` during training "
              "steps (evaluation excluded), per process. Tokens/s: steady state (first 5 steps "
              "left out), while the run shared the GPU with the other runs of its phase, so "
              "only roughly comparable; the calibration column was measured with all "
              "optimizers running at once for the same time, so it compares them under equal "
              "conditions (a GPU time-sliced between processes: relative values only).\n")
    md.append("| optimizer | lr | final val loss | final test loss | state (MB) | state B/param "
              "| peak memory (MiB) | tokens/s (in run) | tokens/s (calibration) | unfinished |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for k in keys:
        runs = groups[k]
        cfg = runs[0]["optimizer"]
        fin = [final_loss(lg) for lg in runs]
        tst = [final_loss(lg, "final_test_loss") for lg in runs]
        state = mean_or_none([lg.get("optimizer_state_bytes") for lg in runs])
        peak = mean_or_none([lg.get("peak_memory_bytes") for lg in runs])
        tps = mean_or_none([lg.get("steady_tokens_per_s") for lg in runs])
        ctps = mean_or_none(calib.get(cfg["name"], []))
        unfinished = [lg for lg in runs if not lg.get("finished")]
        unf = ", ".join(f"s{lg['seed']}: {last_val(lg):.4f} at {lg['val'][-1][0] / 1e6:.2f}M"
                        for lg in unfinished if lg.get("val")) or "-"
        md.append(f"| {label(cfg)} | {cfg['lr']:g} | {fmt_ms(fin)} | {fmt_ms(tst)} | "
                  f"{'-' if state is None else f'{state / 1e6:.1f}'} | "
                  f"{'-' if state is None else f'{state / params:.3f}'} | {mib(peak)} | "
                  f"{'-' if tps is None else f'{tps:,.0f}'} | "
                  f"{'-' if ctps is None else f'{ctps:,.0f}'} | {unf} |")
        results[k] = {"cfg": cfg, "final": fin, "runs": runs, "swept": k in sweep}
    md.append("")
    if plt:
        curves = [_curve_group(label(groups[k][0]["optimizer"]), groups[k]) for k in keys]
        plot_curves(plt, curves, out / "convergence_part1.png",
                    "Part 1: validation loss against training tokens")
        md.append("![part 1 validation loss](convergence_part1.png)\n")
    return results


def part2_tables(runs_dir, md, plt, out):
    logs = read_logs(runs_dir / "part2")
    if not logs:
        md.append("## Part 2\n\nNo part-2 runs found.\n")
        return {}
    first = logs[0]
    by_cfg = {}
    for lg in logs:
        by_cfg.setdefault(strip_seed(lg["run"]), []).append(lg)
    tokens = first["val"][-1][0] if first.get("val") else 0
    md.append("## Part 2: fine-tuning with gradient accumulation, the memory setting\n")
    md.append(f"From `{first.get('init_from')}` (the finished part-1 run of lowest validation "
              f"loss; its final validation loss {first.get('init_val_loss') or float('nan'):.4f} "
              "on part 1's validation split), fine-tuned on the data's test split (never seen in "
              "part 1; first 90% for training, last 10% for validation; the validation loss "
              f"below is on that last 10%). Micro-batches of {first['micro_batch_size']} "
              f"sequences, {first['accum']} per update ({first['accum'] * first['micro_batch_size']} "
              f"sequences an update; small batch: one micro-batch per update, the same tokens), "
              f"{tokens / 1e6:.2f}M tokens per run, rank {first['rank']} for Flora's accumulation "
              "and LoRA, Adafactor without momentum (flora_ext.Flora, beta1=None) for all. Peak "
              "memory is the process's `torch.cuda.max_memory_allocated` during training "
              "(evaluation excluded): parameters, gradients or accumulation buffers, optimizer "
              "state and activations of one micro-batch.\n")
    md.append("| mode | lr | initial val loss | final val loss | peak memory (MiB) | optimizer state (MB) "
              "| trainable parameters | tokens/s (in run) | unfinished |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    order = ["flora_accum", "naive", "lora", "small_batch"]
    keys = sorted(by_cfg, key=lambda k: (order.index(by_cfg[k][0]["mode"])
                                         if by_cfg[k][0]["mode"] in order else 9, k))
    results = {}
    for k in keys:
        runs = by_cfg[k]
        lg0 = runs[0]
        fin = [final_loss(lg) for lg in runs]
        init = mean_or_none([lg["val"][0][1] for lg in runs if lg.get("val")])
        peak = mean_or_none([lg.get("peak_memory_bytes") for lg in runs])
        state = mean_or_none([lg.get("optimizer_state_bytes") for lg in runs])
        tps = mean_or_none([lg.get("steady_tokens_per_s") for lg in runs])
        unf = ", ".join(f"s{lg['seed']}: {last_val(lg):.4f}" for lg in runs
                        if not lg.get("finished") and lg.get("val")) or "-"
        md.append(f"| {MODE_LABEL.get(lg0['mode'], lg0['mode'])} | {lg0['lr']:g} | "
                  f"{'-' if init is None else f'{init:.4f}'} | {fmt_ms(fin)} | {mib(peak)} | "
                  f"{'-' if state is None else f'{state / 1e6:.2f}'} | "
                  f"{lg0['trainable_parameters']:,d} | {'-' if tps is None else f'{tps:,.0f}'} | {unf} |")
        results.setdefault(lg0["mode"], {"final": [], "peak": peak, "runs": []})
        results[lg0["mode"]]["final"] += fin
        results[lg0["mode"]]["runs"] += runs
    md.append("")
    if plt:
        groups = [_curve_group(MODE_LABEL.get(by_cfg[k][0]["mode"], k), by_cfg[k]) for k in keys]
        plot_curves(plt, groups, out / "convergence_part2.png",
                    "Part 2: fine-tuning validation loss against tokens", log_x=False)
        md.append("![part 2 validation loss](convergence_part2.png)\n")
        if plot_memory(plt, [(MODE_LABEL.get(by_cfg[k][0]["mode"], k),
                              mean_or_none([lg.get("peak_memory_bytes") for lg in by_cfg[k]]),
                              [final_loss(lg) for lg in by_cfg[k]]) for k in keys],
                       out / "convergence_part2_memory.png"):
            md.append("![part 2 loss against peak memory](convergence_part2_memory.png)\n")
    return results


def claim_check(p1, p2):
    """Lines of the claim check, computed from the results."""
    lines = []

    def find(name):
        ks = [k for k in p1 if k[0] == name]
        if not ks:
            return None
        # the configuration that was swept (Flora's other kappa takes its lr), then most runs
        ks.sort(key=lambda k: (not p1[k]["swept"], -len(p1[k]["runs"]), str(k)))
        return ks[0]

    flora = find("flora")
    checks = []
    if flora is not None:
        f = p1[flora]
        for name, what, expect in (
                ("adafactor_momentum", "Adafactor with dense momentum", "within noise"),
                ("adafactor", "Adafactor without momentum", "better"),
                ("flora_opt", "flora-opt with the same hyperparameters (our step vs the authors')",
                 "within noise"),
                ("galore", "GaLore at comparable optimizer memory", None),
                ("adamw", "AdamW", None)):
            k = find(name)
            if k is None:
                continue
            c = compare(f["final"], p1[k]["final"])
            checks.append((f"{label(f['cfg'])} vs {what}", expect, c))
        for k in p1:
            if k[0] == "flora" and k != flora:
                c = compare(p1[k]["final"], f["final"])
                checks.append((f"{label(p1[k]['cfg'])} vs {label(f['cfg'])}", None, c))
    if p2.get("flora_accum"):
        fa = p2["flora_accum"]
        for mode, expect in (("naive", "within noise"), ("lora", "better"),
                             ("small_batch", "better")):
            if mode not in p2:
                continue
            c = compare(fa["final"], p2[mode]["final"])
            mem = ""
            if fa["peak"] is not None and p2[mode]["peak"] is not None:
                mem = (f"; peak memory {mib(fa['peak'])} MiB vs {mib(p2[mode]['peak'])} MiB "
                       f"({(fa['peak'] - p2[mode]['peak']) / 2**20:+,.0f} MiB)")
            checks.append((f"part 2: Flora compressed accumulation vs {MODE_LABEL[mode]}{mem}",
                           expect, c))
    lines.append("| comparison (first minus second, final validation loss) | claim expects | "
                 "measured | holds |")
    lines.append("|---|---|---|---|")
    held = []
    for what, expect, c in checks:
        if expect is None:
            ok = "(not part of the claim)"
        elif c["verdict"] in ("no data",) or c["verdict"].startswith("no verdict"):
            ok = "undecided"
        else:
            good = c["verdict"] == expect or (expect == "within noise" and c["verdict"] == "better")
            ok = "yes" if good else "**no**"
            held.append(good)
        lines.append(f"| {what} | {expect or '-'} | {fmt_cmp(c)} | {ok} |")
    lines.append("")
    if not held:
        lines.append("**Verdict: undecided** (not enough finished runs to test the claim).")
    elif all(held):
        lines.append(f"**Verdict: the claim holds** on this data ({len(held)} of {len(held)} "
                     "checks; \"within noise\" also accepts Flora being significantly better).")
    else:
        lines.append(f"**Verdict: the claim does not fully hold**: {held.count(False)} of "
                     f"{len(held)} checks fail (marked **no**). Before reading it as a property "
                     "of Flora: compare with flora-opt's curves above (same hyperparameters; a "
                     "gap there points at our step), the lr sweep (a chosen lr at a grid edge "
                     "means a tuning gap) and the seeds' spread.")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", help="run directory (tools/gpu_convergence.sh's CONV_RUNS, untarred)")
    p.add_argument("--out", default=str(RESULTS), help="where convergence.md and the PNGs go")
    args = p.parse_args(argv)
    runs = pathlib.Path(args.runs)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    env = read_json(runs / "env.json", {})
    plan = read_json(runs / "plan.json", {})
    commands = (runs / "commands.txt").read_text().splitlines() if (runs / "commands.txt").is_file() else []

    body = []
    p1 = part1_tables(runs, body, plt, out)
    p2 = part2_tables(runs, body, plt, out)

    any_log = next(iter(read_logs(runs / "part1")), {})
    device = env.get("device_name") or any_log.get("device_name") or any_log.get("device", "?")
    md = ["# Training quality: Flora against the optimizers it replaces (issue 5)\n"]
    md.append(f"Device: **{device}**"
              + (f" ({env['nvidia_smi']})" if env.get("nvidia_smi") else "")
              + f"; torch {env.get('torch', any_log.get('torch', '?'))}"
              + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
              + (f", Python {env['python']}" if env.get("python") else "")
              + (f", galore-torch {env['galore_torch']}, transformers {env['transformers']}"
                 if env.get("galore_torch") else "")
              + f". Runs started {env.get('date_utc', '?')}. "
              "Generated by `benchmarks/convergence_report.py` from the runs of "
              "`tools/gpu_convergence.sh`; every number below is computed from the runs' logs.\n")
    if any_log:
        m = any_log["model"]
        md.append(f"Model: pre-norm GPT over bytes (`benchmarks/convergence.py`, size "
                  f"`{m['size']}`): d_model {m['d_model']}, {m['n_layers']} layers, "
                  f"{m['n_heads']} heads, context {m['context']}, {m['parameters']:,d} parameters; "
                  f"batch {any_log['batch_size']} sequences, warmup {any_log['warmup']:.0%} of the "
                  f"steps then cosine to 10% of the peak lr, bf16 autocast: "
                  f"{any_log.get('bf16_autocast')}. Data: Python 3.11 documentation sources "
                  f"(`benchmarks/data.py --fetch-python-doc`), byte tokens, split by file.\n")
    if plan:
        md.append(f"Budget: the whole run had to fit one ~9.5-minute command, so the step count "
                  f"was set from a calibration (every optimizer training at once, "
                  f"{plan.get('calibration_processes', plan.get('p_sweep', '?'))} processes sharing the device: "
                  + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in
                              sorted(plan.get("calibration_seconds_per_step", {}).items()))
                  + f" per step; {plan.get('calibration_part1_timing', '')}) and the time left: "
                  f"{plan.get('steps')} steps per run ({plan.get('tokens_per_run', 0) / 1e6:.1f}M "
                  f"tokens; rule in `plan.json`), part 2 {plan.get('part2_updates', '?')} updates "
                  f"per run. Sweep runs {plan.get('p_sweep', '?')} at a time, part 1 "
                  f"{plan.get('p_part1', '?')}, part 2 all at once. These budgets are far "
                  "smaller than the paper's; the comparison is at equal tokens.\n")
    md.append("## Claim check\n")
    md.append("The claim (issue 5): Flora is within noise of Adafactor with momentum, better "
              "than Adafactor without momentum, and in fine-tuning better than LoRA and a naive "
              f"small batch at equal memory. Criterion: a difference of means within {NOISE_SE:g} "
              "standard errors (sqrt(s_a²/n_a + s_b²/n_b), over finished seeds) is \"within "
              "noise\"; beyond it, \"better\" or \"worse\". Noise here is seed-to-seed noise of "
              "short runs: \"within noise\" is not proof of equality.\n")
    md += claim_check(p1, p2)
    md.append("")
    md += body
    if commands:
        md.append("## Commands\n")
        md.append("`tools/gpu_convergence.sh` ran (calibration runs under `calib/` are timing "
                  "runs only):\n")
        md.append("```")
        md += commands
        md.append("```\n")
    md.append(f"Report: `python benchmarks/convergence_report.py {runs}`\n")
    (out / "convergence.md").write_text("\n".join(md))
    print(f"wrote {out / 'convergence.md'}")


if __name__ == "__main__":
    main()
