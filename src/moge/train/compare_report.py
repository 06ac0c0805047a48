"""The seeds study's report: tables with intervals, paired differences, balance, plots, and a
conclusion that says only what the intervals allow. Written from the runs' results alone."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from moge.io import atomic_write_text, save_figure
from moge.train.compare import Variant, tokens_at, val_at
from moge.train.config import TrainConfig
from moge.train.stats import Summary, paired_difference, summarize

COLORS = {"moge": "tab:blue", "moge-local-aux": "tab:cyan", "topk": "tab:red", "topk-aux-free": "tab:orange",
          "deepseek": "tab:green", "dense": "tab:gray"}
# paired comparisons: (a, b) reports a minus b per seed
PAIRS = (("moge", "topk"), ("moge", "topk-aux-free"), ("moge", "deepseek"), ("moge", "dense"),
         ("moge", "moge-local-aux"))


def _fmt(s: Summary, digits: int = 4) -> str:
    if s.n < 2:
        return f"{s.mean:.{digits}f}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} [{s.lo:.{digits}f}, {s.hi:.{digits}f}]"


def _fmt_diff(s: Summary) -> str:
    if s.n < 2:
        return f"{s.mean:+.4f}"
    return f"{s.mean:+.4f} [{s.lo:+.4f}, {s.hi:+.4f}]"


def _verdict(s: Summary, a: str, b: str) -> str:
    if s.n < 2:
        return "one seed: no interval"
    if s.hi < 0:
        return f"{a} lower"
    if s.lo > 0:
        return f"{b} lower"
    return "interval includes 0"


def _eval_steps(results: dict) -> list[int]:
    steps = None
    for r in results.values():
        s = {row["step"] for row in r["curve"] if "val" in row}
        steps = s if steps is None else steps & s
    return sorted(steps or ())


def paired_table(results: dict, seeds: Sequence[int], a: str, b: str, step: int | None = None) -> Summary | None:
    """a minus b in mean validation loss, per seed, at `step` (None: the final evaluation)."""
    if not all((n, s) in results for n in (a, b) for s in seeds):
        return None
    if step is None:
        return paired_difference([results[(a, s)]["val_mean"] for s in seeds],
                                 [results[(b, s)]["val_mean"] for s in seeds])
    xs = [val_at(results[(a, s)], step) for s in seeds]
    ys = [val_at(results[(b, s)], step) for s in seeds]
    if any(math.isnan(v) for v in xs + ys):
        return None
    return paired_difference(xs, ys)


def write_report(results: dict, variants: Sequence[Variant], seeds: Sequence[int], base: TrainConfig,
                 report_path: Path, *, throughput: dict | None = None, command: str = "") -> Path:
    """report.md (at `report_path`) with plots in `img/` next to it."""
    report_path = Path(report_path)
    img = report_path.parent / "img"
    names = [v.name for v in variants if all((v.name, s) in results for s in seeds)]
    first = results[(names[0], seeds[0])]
    domains = list(first["val"])
    steps = base.steps
    eval_steps = _eval_steps({k: v for k, v in results.items() if k[0] in names})
    early = steps // 3 if steps // 3 in eval_steps else None
    train_s = sum(results[(n, s)]["train_seconds"] for n in names for s in seeds)
    plots = _plots(results, names, seeds, domains, eval_steps, img)

    lines = ["# MoGE vs top-K vs group-limited vs dense: a seeds study", ""]
    if command:
        lines += ["Regenerate this report (finished runs are reused, interrupted ones resume):", "",
                  f"    {command}", ""]
    lines += [f"Corpus of `moge data prepare` (domains: {', '.join(domains)}). Each run: {steps} steps x "
              f"{base.batch_size} x {base.seq_len} = {steps * base.batch_size * base.seq_len:,} tokens, lr {base.lr} "
              f"(warmup {base.warmup}, cosine to {base.min_lr}), z-loss {base.z_loss}, aux alpha {base.aux_alpha} "
              f"unless a variant says otherwise. Seeds {', '.join(map(str, seeds))}: a seed sets the "
              f"initialisation and the data order, and every variant at one seed sees the same batches in the "
              f"same order. Training time of all {len(names) * len(seeds)} runs: {train_s / 60:.0f} CPU-thread "
              f"minutes (sum of step times from the logs).", "",
              "| variant | what it is | params total / activated |", "|---|---|---|"]
    for v in variants:
        if v.name in names:
            p = results[(v.name, seeds[0])]["params"]
            lines.append(f"| {v.name} | {v.label} | {p['total'] / 1e6:.2f}M / {p['activated'] / 1e6:.2f}M |")

    lines += ["", "## Validation loss (nats/token, lower is better)", "",
              f"Mean ± std over {len(seeds)} seeds [95% t-interval of the mean].", "",
              "| variant | " + " | ".join(domains) + " | mean over domains |", "|---|" + "---|" * (len(domains) + 1)]
    for n in names:
        cells = [_fmt(summarize([results[(n, s)]["val"][d] for s in seeds])) for d in domains]
        cells.append(_fmt(summarize([results[(n, s)]["val_mean"] for s in seeds])))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")

    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    conclusions = []
    if pairs:
        early_head = f" at {tokens_at(first, early):,} tokens (1/3)" if early else ""
        lines += ["", "## Paired differences (a minus b, per seed; negative: a is better)", "",
                  "Mean validation loss over domains. Mean [95% t-interval] of the per-seed differences.", "",
                  f"| a - b |{' at ' + format(tokens_at(first, early), ',') + ' tokens |' if early else ''}"
                  f" at {tokens_at(first, steps):,} tokens | reading |",
                  "|---|" + ("---|" if early else "") + "---|---|"]
        for a, b in pairs:
            end = paired_table(results, seeds, a, b)
            mid = paired_table(results, seeds, a, b, early) if early else None
            row = f"| {a} - {b} | " + (f"{_fmt_diff(mid)} | " if early else "") + f"{_fmt_diff(end)} | "
            lines.append(row + _verdict(end, a, b) + " |")
            conclusions.append(_conclude(a, b, end, mid, early_head))
        if early:
            lines += ["", f"The 1/3 column is each run's evaluation at step {early}, inside the same runs: the "
                          "learning rate is still high there, so it shows how the gaps move with tokens, not "
                          "what a run planned for that many tokens would reach."]

    moe = [n for n in names if "routing" in results[(n, seeds[0])]]
    if moe:
        sizes = [row["tokens"] for row in results[(moe[0], seeds[0])]["routing"][0]["imbalance"]]
        lines += ["", "## Device balance on real routing", "",
                  "Validation windows of every domain routed by the trained models, cut into batches of each "
                  "size; experts on 4 devices in contiguous blocks (one MoGE group per device). Busiest "
                  "device / mean device load, mean over layers, then mean ± std over seeds.", "",
                  "| variant | " + " | ".join(f"{t} tok" for t in sizes) + " | busiest expert share |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        for n in moe:
            cells = []
            for i in range(len(sizes)):
                per_seed = [statistics.mean(layer["imbalance"][i]["mean_max_over_mean"]
                                            for layer in results[(n, s)]["routing"]) for s in seeds]
                sm = summarize(per_seed)
                cells.append(f"{sm.mean:.3f}" + (f" ± {sm.std:.3f}" if sm.n > 1 else ""))
            busiest = max(layer["experts"]["max_share"] for s in seeds for layer in results[(n, s)]["routing"])
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {busiest:.1%} |")

    if throughput:
        tps = throughput["tokens_per_s"]
        ref = tps.get("moge")
        st = throughput["settings"]
        lines += ["", "## Training throughput", "",
                  f"A dedicated benchmark (`measure_throughput`): fresh models at the study's batch shape "
                  f"({st['batch_size']} x {st['seq_len']}), {st['rounds']} rounds in which every variant in turn "
                  f"runs {st['steps']} optimizer steps; median tokens/s over rounds. Machine: "
                  f"{throughput['machine']}.", "",
                  "| variant | tokens/s | relative to moge |", "|---|---|---|"]
        for n in names:
            if n in tps:
                rel = f"{tps[n] / ref:.2f}x" if ref else "-"
                lo, hi = min(throughput["samples"][n]), max(throughput["samples"][n])
                lines.append(f"| {n} | {tps[n]:.0f} (rounds {lo:.0f}-{hi:.0f}) | {rel} |")

    lines += ["", "## What the intervals allow", ""] + [f"- {c}" for c in conclusions]
    if len(conclusions) > 1:
        chance = 1 - 0.95 ** len(conclusions)
        lines.append(f"- These are {len(conclusions)} intervals at 95% each: if no variant differed at all, at least "
                     f"one of them would still exclude 0 by chance {chance:.0%} of the time (independent "
                     f"intervals). One excluded 0 alone is weak evidence; a gap that holds at both token counts "
                     f"and across more seeds is stronger.")
    if moe:
        lines.append("- Balance is not a statistical statement: MoGE's routing puts the same number of "
                     "token-expert assignments on every device in every batch by construction, which the "
                     "table shows as exactly 1.000 for both MoGE variants.")
    lines += ["", "## Plots", ""] + [f"![{p.stem}](img/{p.name})" for p in plots] + [""]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_path, "\n".join(lines))
    return report_path


def _conclude(a: str, b: str, end: Summary | None, mid: Summary | None, early_head: str) -> str:
    if end is None:
        return f"{a} - {b}: not all seeds finished."
    if end.n < 2:
        return f"{a} - {b}: {end.mean:+.4f} nats/token from one seed; one seed supports no conclusion."
    if end.excludes_zero():
        better = a if end.hi < 0 else b
        text = (f"{a} - {b}: {end.mean:+.4f} [{end.lo:+.4f}, {end.hi:+.4f}] nats/token; the interval excludes 0, "
                f"so at this budget {better} reaches the lower validation loss.")
    else:
        text = (f"{a} - {b}: {end.mean:+.4f} [{end.lo:+.4f}, {end.hi:+.4f}] nats/token; the interval includes 0, "
                f"so these {end.n} seeds show no difference: a true gap larger than about "
                f"{max(abs(end.lo), abs(end.hi)):.3f} nats/token is unlikely, a smaller one cannot be excluded.")
    if mid is not None and mid.n >= 2:
        text += f" Earlier{early_head}: {mid.mean:+.4f} [{mid.lo:+.4f}, {mid.hi:+.4f}]."
    return text


def _plots(results: dict, names: list[str], seeds: Sequence[int], domains: list[str], eval_steps: list[int],
           img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    paths = []
    tps = results[(names[0], seeds[0])]["tokens_per_step"]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for n in names:
        curves = [[row["ce"] for row in results[(n, s)]["curve"]] for s in seeds]
        length = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(length)]
        k = max(1, length // 50)
        smooth = [statistics.mean(mean[max(0, i - k):i + 1]) for i in range(length)]
        axes[0].plot([(i + 1) * tps / 1e6 for i in range(length)], smooth, label=n, color=COLORS.get(n))
        if eval_steps:
            vals = [[val_at(results[(n, s)], st) for s in seeds] for st in eval_steps]
            xs = [st * tps / 1e6 for st in eval_steps]
            axes[1].plot(xs, [statistics.mean(v) for v in vals], "o-", ms=3, label=n, color=COLORS.get(n))
            if len(seeds) > 1:
                axes[1].fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], alpha=0.15,
                                     color=COLORS.get(n))
    axes[0].set_title(f"training loss (smoothed, mean of {len(seeds)} seeds)")
    axes[1].set_title("validation loss, mean over domains (band: min-max over seeds)")
    for ax in axes:
        ax.set_xlabel("tokens (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, img / "compare-curves.png"))

    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    if pairs and eval_steps and len(seeds) > 1:
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.6), sharey=True, squeeze=False)
        xs = [st * tps / 1e6 for st in eval_steps]
        for ax, (a, b) in zip(axes[0], pairs):
            sums = [paired_table(results, seeds, a, b, st) for st in eval_steps]
            ax.plot(xs, [s.mean for s in sums], "o-", ms=3, color=COLORS.get(b))
            ax.fill_between(xs, [s.lo for s in sums], [s.hi for s in sums], alpha=0.2, color=COLORS.get(b))
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(f"{a} - {b}", fontsize=9)
            ax.set_xlabel("tokens (millions)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("difference in validation loss (nats/token)")
        fig.suptitle("paired differences over training: mean and 95% t-interval over seeds (below 0: MoGE lower)",
                     fontsize=10)
        fig.tight_layout()
        paths.append(save_figure(fig, img / "compare-paired.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        sums = [summarize([results[(n, s)]["val"][d] for s in seeds]) for d in domains]
        err = [s.half_width if s.n > 1 else 0.0 for s in sums]
        ax.bar([j + i * width for j in range(len(domains))], [s.mean for s in sums], width, yerr=err, capsize=2,
               label=n, color=COLORS.get(n))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    lo = min(results[k]["val"][d] for k in results if k[0] in names for d in domains)
    ax.set_ylim(lo * 0.97, None)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("final validation loss per domain (error bar: 95% t-interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, img / "compare-val_by_domain.png"))

    moe = [n for n in names if "routing" in results[(n, seeds[0])]]
    if moe:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for n in moe:
            rows0 = results[(n, seeds[0])]["routing"][0]["imbalance"]
            sizes = [row["tokens"] for row in rows0]
            mom = [statistics.mean(statistics.mean(layer["imbalance"][i]["mean_max_over_mean"]
                                                   for layer in results[(n, s)]["routing"]) for s in seeds)
                   for i in range(len(sizes))]
            axes[0].plot(sizes, mom, "o-", label=n, color=COLORS.get(n))
            # experts are not the same across seeds: sort each layer's shares, then average by rank
            ranked = [sorted(layer["expert_share"], reverse=True)
                      for s in seeds for layer in results[(n, s)]["routing"]]
            shares = [statistics.mean(r[e] for r in ranked) for e in range(len(ranked[0]))]
            axes[1].plot(shares, "o-", ms=3, label=n, color=COLORS.get(n))
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("tokens per batch")
        axes[0].set_ylabel("busiest device / mean (4 devices)")
        axes[0].set_title("device load on real routing (mean over layers and seeds)")
        axes[1].set_xlabel("expert rank (busiest first)")
        axes[1].set_ylabel("token share (mean over layers and seeds)")
        axes[1].set_title("per-expert load, sorted")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(save_figure(fig, img / "compare-balance.png"))
    return paths
