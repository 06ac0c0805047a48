"""`moge compare`: MoGE vs top-K MoE vs dense at equal activated parameters and equal tokens,
plus the paper's ablation (MoGE with the global-softmax aux loss vs the per-group local one).

Every variant trains on the same data windows in the same order (same seed, steps, batch), then
the report compares validation loss per domain, training curves, device imbalance of the real
routing at batch sizes 16..4096 tokens, per-expert load and tokens/s. Numbers are reported as
measured, including where MoGE loses.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from moge.io import atomic_write_text, save_figure
from moge.metrics import load_stats
from moge.train.analysis import collect_routing, imbalance_by_batch_size
from moge.train.config import TrainConfig
from moge.train.trainer import Trainer


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    aux_scope: str = "micro"
    label: str = ""


VARIANTS = (
    Variant("moge", "moge-tiny", "micro", "MoGE (16 experts in 4 groups, 1 per group; global-softmax aux loss)"),
    Variant("topk", "topk-tiny", "micro", "top-K MoE (16 experts, K=4, same aux loss)"),
    Variant("dense", "dense-tiny", "micro", "dense (same activated parameters)"),
    Variant("moge-local-aux", "moge-tiny", "local", "MoGE with the per-group local aux loss (ablation)"),
)


def run_compare(base: TrainConfig, out: Path, data, variants=VARIANTS, progress: bool = True, log=print) -> dict:
    """Train every variant (or reuse a finished run) and write report.md, report.json and PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in variants:
        cfg = dataclasses.replace(base, model=v.model, aux_scope=v.aux_scope, out=str(out / v.name))
        trainer = Trainer(cfg, data, log=log)
        resumed = trainer.resume()
        if resumed and trainer.step >= cfg.steps:
            log(f"{v.name}: finished run found in {cfg.out}, reusing it")
        else:
            log(f"{v.name}: training {cfg.steps} steps ({v.label})")
        summary = trainer.fit(progress=progress) if trainer.step < cfg.steps else None
        if summary is not None and summary["interrupted"]:
            raise KeyboardInterrupt
        results[v.name] = _measure(trainer, v, data)
    report = {"config": dataclasses.asdict(base), "variants": results,
              "tokens_per_run": base.steps * base.tokens_per_step}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    plots = _plot(report, out)
    atomic_write_text(out / "report.md", _markdown(report, plots))
    return report


@torch.no_grad()
def _measure(trainer: Trainer, v: Variant, data) -> dict:
    rows = [json.loads(line) for line in (Path(trainer.cfg.out) / "metrics.jsonl").read_text().splitlines() if line]
    val = trainer.evaluate()
    res = {"label": v.label, "model": v.model, "aux_scope": v.aux_scope, "val": val,
           "val_mean": sum(val.values()) / len(val),
           "params": trainer.model.num_parameters(),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 10:]),
           "curve": [{"step": r["step"], "ce": r["ce"], **({"val": r["val"]} if "val" in r else {})} for r in rows]}
    mc = trainer.model_cfg
    if mc.is_moe:
        batches = {d: [b[:, :-1] for b in data.val_batches(d, 64, 16)] for d in data.domains}
        trace = collect_routing(trainer.model, batches)
        layers = []
        for layer in range(trace.num_layers):
            ids = trace.layer(layer)
            counts = torch.bincount(ids.reshape(-1), minlength=mc.num_experts)
            layers.append({"layer": layer, "expert_share": (counts.double() / counts.sum()).tolist(),
                           "experts": load_stats(counts),
                           "imbalance": imbalance_by_batch_size(ids, mc.num_experts, mc.num_groups,
                                                                (16, 64, 256, 1024, 4096))})
        res["routing"] = layers
    return res


def _plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    colors = {"moge": "tab:blue", "topk": "tab:red", "dense": "tab:gray", "moge-local-aux": "tab:cyan"}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, r in variants.items():
        steps = [c["step"] for c in r["curve"]]
        ce = [c["ce"] for c in r["curve"]]
        k = max(1, len(ce) // 50)
        smooth = [sum(ce[max(0, i - k):i + 1]) / len(ce[max(0, i - k):i + 1]) for i in range(len(ce))]
        axes[0].plot(steps, smooth, label=name, color=colors.get(name))
        vs = [(c["step"], sum(c["val"].values()) / len(c["val"])) for c in r["curve"] if "val" in c]
        if vs:
            axes[1].plot(*zip(*vs), "o-", label=name, color=colors.get(name))
    axes[0].set_title("training loss (smoothed)")
    axes[1].set_title("validation loss (mean over domains)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out / "curves.png"))

    domains = list(next(iter(variants.values()))["val"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(variants)
    for i, (name, r) in enumerate(variants.items()):
        ax.bar([j + i * width for j in range(len(domains))], [r["val"][d] for d in domains], width, label=name,
               color=colors.get(name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    lo = min(r["val"][d] for r in variants.values() for d in domains)
    ax.set_ylim(lo * 0.95, None)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "val_by_domain.png"))

    moe = {n: r for n, r in variants.items() if "routing" in r}
    if moe:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for name, r in moe.items():
            sizes = [row["tokens"] for row in r["routing"][0]["imbalance"]]
            mom = [statistics.mean(layer["imbalance"][i]["mean_max_over_mean"] for layer in r["routing"])
                   for i in range(len(sizes))]
            axes[0].plot(sizes, mom, "o-", label=name, color=colors.get(name))
            share = torch.tensor([layer["expert_share"] for layer in r["routing"]]).mean(0)
            axes[1].plot(share.numpy(), "o-", ms=3, label=name, color=colors.get(name))
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("tokens per batch")
        axes[0].set_ylabel("busiest device / mean (4 devices)")
        axes[0].set_title("device load on real routing (mean over layers)")
        axes[1].set_xlabel("expert")
        axes[1].set_ylabel("token share (mean over layers)")
        axes[1].set_title("per-expert load")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(_save(fig, out / "balance.png"))
    return paths


def _save(fig, path: Path) -> str:
    return save_figure(fig, path).name


def _markdown(report: dict, plots: list[str]) -> str:
    v = report["variants"]
    domains = list(next(iter(v.values()))["val"])
    cfg = report["config"]
    lines = ["# MoGE vs top-K MoE vs dense", "",
             f"Same data, same order, {cfg['steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} tokens "
             f"({report['tokens_per_run']:,} tokens per run), seed {cfg['seed']}, lr {cfg['lr']}, "
             f"aux alpha {cfg['aux_alpha']}, z-loss {cfg['z_loss']}.", "",
             "## Validation loss (nats/token, lower is better)", "",
             "| variant | params total / activated | " + " | ".join(domains) + " | mean | tokens/s |",
             "|---|---|" + "---|" * (len(domains) + 2)]
    for name, r in v.items():
        p = r["params"]
        lines.append(f"| {name} | {p['total'] / 1e6:.2f}M / {p['activated'] / 1e6:.2f}M | "
                     + " | ".join(f"{r['val'][d]:.4f}" for d in domains)
                     + f" | {r['val_mean']:.4f} | {r['tokens_per_s']:.0f} |")
    best = min(v, key=lambda n: v[n]["val_mean"])
    lines += ["", f"Lowest mean validation loss: **{best}**."]
    if "moge" in v and "topk" in v:
        d = v["moge"]["val_mean"] - v["topk"]["val_mean"]
        lines.append(f"MoGE minus top-K: {d:+.4f} nats/token ({'MoGE better' if d < 0 else 'top-K better'}).")
    if "moge" in v and "moge-local-aux" in v:
        d = v["moge"]["val_mean"] - v["moge-local-aux"]["val_mean"]
        lines.append(f"Global-softmax aux minus local per-group aux: {d:+.4f} nats/token "
                     f"({'global better' if d < 0 else 'local better'}).")
    moe = {n: r for n, r in v.items() if "routing" in r}
    if moe:
        sizes = [row["tokens"] for row in next(iter(moe.values()))["routing"][0]["imbalance"]]
        lines += ["", "## Device balance on real routing (4 devices, one group each; mean over layers)", "",
                  "| variant | " + " | ".join(f"{t} tok" for t in sizes) + " | busiest expert share |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        for name, r in moe.items():
            cells = []
            for i in range(len(sizes)):
                mom = statistics.mean(layer["imbalance"][i]["mean_max_over_mean"] for layer in r["routing"])
                is_ = statistics.mean(layer["imbalance"][i]["mean_is"] for layer in r["routing"])
                cells.append(f"max/mean {mom:.3f}, IS {is_:.3f}")
            busiest = max(layer["experts"]["max_share"] for layer in r["routing"])
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {busiest:.1%} |")
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
