"""The paper's routing analyses on a trained model (its section on expert load and specialisation):

  - per-domain expert share at the first, middle and last MoE layer;
  - co-activation of expert pairs (same-group pairs are never co-activated under MoGE);
  - each expert's share of its own group's tokens (near 1/(N/M) when balanced);
  - the global per-expert token share, and device imbalance on real routing per batch size.

`collect_routing` runs the model over labelled token windows and keeps only expert ids; every
statistic is then a pure function of that trace (moge.metrics).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moge.errors import ConfigError
from moge.io import save_figure
from moge.metrics import coactivation, contiguous_device_map, device_loads, intra_group_share, load_stats, max_over_mean
from moge.nn.model import PanguProMoEForCausalLM


@dataclass
class RoutingTrace:
    """Expert ids [T, K] per layer and domain, in token order."""

    experts: dict[str, list[Tensor]]  # domain -> per layer [T, K]
    num_experts: int
    num_groups: int

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.experts.values())))

    def layer(self, layer: int, domain: str | None = None) -> Tensor:
        if domain is not None:
            return self.experts[domain][layer]
        return torch.cat([per_layer[layer] for per_layer in self.experts.values()])


@torch.no_grad()
def collect_routing(model: PanguProMoEForCausalLM, batches: Mapping[str, Iterable[Tensor]]) -> RoutingTrace:
    """Run `model` over each domain's token batches [B, S] and record the routing of every layer."""
    cfg = model.config
    if not cfg.is_moe:
        raise ConfigError("routing analysis needs a MoE model (num_experts > 0)")
    model.eval()
    experts: dict[str, list[Tensor]] = {}
    for domain, domain_batches in batches.items():
        per_layer: list[list[Tensor]] = [[] for _ in range(cfg.num_layers)]
        for batch in domain_batches:
            out = model(batch, return_routing=True)
            for i, r in enumerate(out.routing):
                per_layer[i].append(r.experts_TK.cpu())
        if per_layer[0]:
            experts[domain] = [torch.cat(x) for x in per_layer]
    if not experts:
        raise ConfigError("no batches to analyse")
    return RoutingTrace(experts, cfg.num_experts, cfg.num_groups)


def imbalance_by_batch_size(experts_TK: Tensor, num_experts: int, num_devices: int,
                            sizes: Iterable[int] = (16, 64, 256, 1024, 4096)) -> list[dict]:
    """Cut a routing trace into consecutive batches of each size; IS and max/mean device load."""
    dev_map = contiguous_device_map(num_experts, num_devices)
    rows = []
    for size in sizes:
        n = experts_TK.shape[0] // size
        if n == 0:
            continue
        batches = experts_TK[: n * size].view(n, size, -1)
        loads = device_loads(batches, dev_map, num_devices).float()
        scores = (loads.max(-1).values - loads.min(-1).values) / size
        rows.append({"tokens": size, "batches": n, "mean_is": float(scores.mean()),
                     "p_is_positive": float((scores > 0).float().mean()),
                     "mean_max_over_mean": float(max_over_mean(loads).mean())})
    return rows


def analyze(trace: RoutingTrace) -> dict:
    """All statistics as JSON-ready numbers."""
    n, m, L = trace.num_experts, trace.num_groups, trace.num_layers
    group_map = contiguous_device_map(n, m)
    picks = sorted({0, L // 2, L - 1})
    out: dict = {"num_experts": n, "num_groups": m, "num_layers": L, "layers_shown": picks,
                 "domains": list(trace.experts), "per_domain_share": {}, "layers": []}
    for layer in picks:
        out["per_domain_share"][str(layer)] = {
            d: (torch.bincount(trace.layer(layer, d).reshape(-1), minlength=n).double()
                / trace.layer(layer, d).numel()).tolist() for d in trace.experts}
    for layer in range(L):
        ids = trace.layer(layer)
        counts = torch.bincount(ids.reshape(-1), minlength=n)
        co = coactivation(ids, n)
        co.fill_diagonal_(0)
        same = group_map.view(-1, 1) == group_map.view(1, -1)
        share = intra_group_share(counts, group_map)
        out["layers"].append({
            "layer": layer,
            "global_share": (counts.double() / counts.sum()).tolist(),
            "experts": load_stats(counts),
            "intra_group_share": share.tolist(),
            "intra_group_share_max": float(share.max()), "intra_group_share_min": float(share.min()),
            "coactivation_same_group_pairs": int(co[same].sum()) // 2,
            "coactivation_cross_group_pairs": int(co[~same].sum()) // 2,
            "coactivation": co.tolist(),
            "imbalance_by_batch_size": imbalance_by_batch_size(ids, n, m),
        })
    return out


def plot_analysis(stats: dict, out_dir: Path, title: str = "") -> list[Path]:
    """PNG figures: per-domain share heatmaps, co-activation, intra-group and global share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    n, m = stats["num_experts"], stats["num_groups"]
    paths = []
    picks = stats["layers_shown"]
    fig, axes = plt.subplots(1, len(picks), figsize=(5 * len(picks), 0.5 * len(stats["domains"]) + 2), squeeze=False)
    for ax, layer in zip(axes[0], picks):
        shares = stats["per_domain_share"][str(layer)]
        mat = torch.tensor([shares[d] for d in stats["domains"]])
        im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(stats["domains"])), stats["domains"])
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}: token share per expert")
        for g in range(1, m):
            ax.axvline(g * n // m - 0.5, color="white", lw=0.5)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(f"{title} expert load per domain".strip())
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "domain_share.png"))

    last = stats["layers"][picks[-1]]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(torch.tensor(last["coactivation"], dtype=torch.float32).numpy(), cmap="magma")
    ax.set_title(f"co-activation, layer {last['layer']} (same-group pairs: {last['coactivation_same_group_pairs']})")
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "coactivation.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for layer in picks:
        entry = stats["layers"][layer]
        axes[0].plot(entry["intra_group_share"], "o-", ms=3, label=f"layer {layer}")
        axes[1].plot(entry["global_share"], "o-", ms=3, label=f"layer {layer}")
    axes[0].axhline(m / n, color="gray", ls="--", lw=1, label=f"balanced 1/{n // m}")
    axes[1].axhline(1 / n, color="gray", ls="--", lw=1, label=f"uniform 1/{n}")
    axes[0].set_title("share of own group's tokens")
    axes[1].set_title("global token share")
    for ax in axes:
        ax.set_xlabel("expert")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, out_dir / "expert_share.png"))
    return paths


def write_report(stats: dict, out_dir: Path) -> Path:
    from moge.io import atomic_write_text

    path = out_dir / "analysis.json"
    atomic_write_text(path, json.dumps(stats) + "\n")
    return path
