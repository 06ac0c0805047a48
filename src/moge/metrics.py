"""Load balance: the Imbalance Score, load metrics, the tracker and their Monte Carlo.

Everything here is a pure function of routing outputs (expert ids, probabilities, logits), so the
same code scores a live model, a recorded trace or a simulated batch. Shapes: T tokens, N experts,
K selected slots per token, M devices (or groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moge.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Placement and counting
# ---------------------------------------------------------------------------------------------


def contiguous_device_map(num_experts: int, num_devices: int) -> Tensor:
    """Experts [j*N/M, (j+1)*N/M) on device j, the release's placement."""
    if num_experts <= 0 or num_devices <= 0 or num_experts % num_devices:
        raise ConfigError(f"num_devices={num_devices} must be positive and divide num_experts={num_experts}")
    return torch.arange(num_experts) // (num_experts // num_devices)


def expert_counts(experts_TK: Tensor, num_experts: int) -> Tensor:
    """Token-expert assignments per expert over the last two dims: [..., T, K] -> [..., N]."""
    lead = experts_TK.shape[:-2]
    flat = experts_TK.reshape(-1, experts_TK.shape[-2] * experts_TK.shape[-1]).long()
    rows = flat.shape[0]
    offset = (torch.arange(rows, device=flat.device) * num_experts).unsqueeze(1)
    counts = torch.bincount((flat + offset).reshape(-1), minlength=rows * num_experts)
    return counts.view(*lead, num_experts)


def device_loads(experts_TK: Tensor, expert_to_device: Tensor, num_devices: int) -> Tensor:
    """T_i(X): assignments each device computes, [..., T, K] -> [..., M]."""
    devices = expert_to_device.to(experts_TK.device)[experts_TK.long()]
    return expert_counts(devices, num_devices)


def imbalance_score(experts_TK: Tensor, expert_to_device: Tensor, num_devices: int) -> Tensor:
    """IS(X) = (max_i T_i - min_i T_i) / |X| (the paper's Imbalance Score); batched over leading dims."""
    loads = device_loads(experts_TK, expert_to_device, num_devices).float()
    tokens = experts_TK.shape[-2]
    return (loads.max(-1).values - loads.min(-1).values) / tokens


def max_over_mean(loads: Tensor) -> Tensor:
    """Busiest device (or expert) over the average: the straggler factor, 1.0 = balanced."""
    loads = loads.float()
    return loads.max(-1).values / loads.mean(-1).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Monte Carlo of routing
# ---------------------------------------------------------------------------------------------


def sample_experts(trials: int, tokens: int, num_experts: int, top_k: int, *, num_groups: int | None = None,
                   expert_weights: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Random routing decisions, [trials, tokens, top_k] expert ids.

    Without groups each token draws top_k distinct experts; with `num_groups` (MoGE) it draws
    top_k/num_groups distinct experts inside every contiguous group. Draws are uniform, or
    proportional to `expert_weights` [N] without replacement (Gumbel top-k), which models a
    skewed router.
    """
    if min(trials, tokens, num_experts, top_k) <= 0:
        raise ConfigError(f"trials={trials}, tokens={tokens}, num_experts={num_experts}, top_k={top_k} "
                         "must all be positive")
    if top_k > num_experts:
        raise ConfigError(f"top_k={top_k} must be <= num_experts={num_experts}")
    shape = (trials, tokens, num_experts)
    keys = torch.rand(shape, generator=generator)
    if expert_weights is not None:
        w = torch.as_tensor(expert_weights, dtype=torch.float32)
        if w.shape != (num_experts,) or not torch.all(w >= 0) or not w.sum() > 0:
            raise ConfigError(f"expert_weights must be {num_experts} non-negative numbers with a positive sum")
        # Gumbel top-k: argmax of log w + Gumbel noise samples without replacement proportional to w
        keys = w.log() - torch.log(-torch.log(keys.clamp_min(1e-20)))
    if num_groups is None:
        return keys.topk(top_k, dim=-1).indices
    if num_experts % num_groups or top_k % num_groups or top_k // num_groups > num_experts // num_groups:
        raise ConfigError(f"num_groups={num_groups} must divide num_experts={num_experts} and top_k={top_k}, "
                         f"with top_k/num_groups <= num_experts/num_groups")
    per = num_experts // num_groups
    idx = keys.view(trials, tokens, num_groups, per).topk(top_k // num_groups, dim=-1).indices
    idx = idx + torch.arange(num_groups).view(1, 1, num_groups, 1) * per
    return idx.reshape(trials, tokens, top_k)


@dataclass
class ImbalanceStudy:
    """Distribution of IS and max/mean device load over Monte Carlo batches."""

    scores: Tensor  # [trials]
    max_over_mean: Tensor  # [trials]

    def summary(self, bins: int = 20, hist_max: float | None = None) -> dict:
        s = self.scores.double()
        q = torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99], dtype=torch.float64)
        values, counts = torch.unique(s, return_counts=True)
        top = hist_max if hist_max is not None else max(float(s.max()), 1e-9)
        hist = torch.histc(s.float(), bins=bins, min=0.0, max=top)
        return {
            "trials": int(s.numel()),
            "p_is_positive": float((s > 0).double().mean()),
            "mean": float(s.mean()),
            "std": float(s.std()) if s.numel() > 1 else 0.0,
            "min": float(s.min()),
            "max": float(s.max()),
            "mode": float(values[counts.argmax()]),
            "percentiles": {f"p{int(p * 100)}": float(v) for p, v in zip(q, torch.quantile(s, q))},
            "mean_max_over_mean": float(self.max_over_mean.double().mean()),
            "histogram": {"edges": torch.linspace(0.0, top, bins + 1).tolist(), "counts": hist.long().tolist()},
        }


def simulate_imbalance(trials: int, tokens: int, num_experts: int, top_k: int, num_devices: int, *,
                       grouped: bool, seed: int = 0, expert_weights: Tensor | None = None,
                       chunk_elements: int = 8_000_000) -> ImbalanceStudy:
    """Monte Carlo of the Imbalance Score, vectorised and chunked to bound memory.

    grouped=False: conventional top-K (experts anywhere); grouped=True: MoGE with one group per
    device. Experts sit contiguously on devices as in the release.
    """
    gen = torch.Generator().manual_seed(seed)
    dev_map = contiguous_device_map(num_experts, num_devices)
    per_chunk = max(1, chunk_elements // (tokens * num_experts))
    scores, mom = [], []
    done = 0
    while done < trials:
        n = min(per_chunk, trials - done)
        ex = sample_experts(n, tokens, num_experts, top_k, num_groups=num_devices if grouped else None,
                            expert_weights=expert_weights, generator=gen)
        loads = device_loads(ex, dev_map, num_devices)
        scores.append((loads.max(-1).values - loads.min(-1).values).float() / tokens)
        mom.append(max_over_mean(loads))
        done += n
    return ImbalanceStudy(torch.cat(scores), torch.cat(mom))


def expected_max_load(tokens: int, num_experts: int, top_k: int, num_devices: int, *, grouped: bool,
                      trials: int = 2000, seed: int = 0, expert_weights: Tensor | None = None) -> float:
    """E[max_i T_i] / E[mean_i T_i]: how much longer the busiest device works than the average."""
    study = simulate_imbalance(trials, tokens, num_experts, top_k, num_devices, grouped=grouped, seed=seed,
                               expert_weights=expert_weights)
    return float(study.max_over_mean.double().mean())


# ---------------------------------------------------------------------------------------------
# Load metrics and the tracker the caller owns
# ---------------------------------------------------------------------------------------------


def load_stats(counts_N: Tensor) -> dict:
    """Summary of a per-expert (or per-device) load vector."""
    c = counts_N.double()
    mean = float(c.mean())
    return {
        "max_over_mean": float(c.max()) / mean if mean > 0 else float("nan"),
        "min_over_mean": float(c.min()) / mean if mean > 0 else float("nan"),
        "cv": float(c.std(unbiased=False)) / mean if mean > 0 else float("nan"),
        "dead": int((c == 0).sum()),
        "max_share": float(c.max() / c.sum()) if c.sum() > 0 else float("nan"),
    }


def intra_group_share(counts_N: Tensor, group_of_expert_N: Tensor) -> Tensor:
    """Each expert's share of its own group's assignments; 1/(N/M) everywhere when balanced."""
    M = int(group_of_expert_N.max()) + 1
    totals_G = torch.zeros(M, dtype=torch.float64).index_add_(0, group_of_expert_N.cpu(), counts_N.double().cpu())
    return counts_N.double().cpu() / totals_G[group_of_expert_N.cpu()].clamp_min(1e-12)


def coactivation(experts_TK: Tensor, num_experts: int) -> Tensor:
    """C[i, j] = number of tokens that selected both experts i and j (i != j); diagonal = counts."""
    hot_TN = torch.zeros(experts_TK.shape[0], num_experts, dtype=torch.float32, device=experts_TK.device)
    hot_TN.scatter_(1, experts_TK, 1.0)
    return (hot_TN.T @ hot_TN).round().long()


@dataclass
class LoadTracker:
    """Accumulates routing statistics per layer over many batches. No global state: the caller
    creates it, feeds it `update(experts_TK, layer)` and reads `summary()`.

    Devices default to one per group with contiguous placement (MoGE's natural layout).
    """

    num_experts: int
    num_groups: int
    num_devices: int | None = None
    track_coactivation: bool = True
    counts: dict = field(default_factory=dict)
    coact: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    device_max_over_mean: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_devices = self.num_devices or self.num_groups
        self.device_map = contiguous_device_map(self.num_experts, self.num_devices)
        self.group_map = contiguous_device_map(self.num_experts, self.num_groups)

    def update(self, experts_TK: Tensor, layer: int = 0) -> None:
        experts_TK = experts_TK.detach().reshape(-1, experts_TK.shape[-1]).cpu()
        counts = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        self.counts[layer] = self.counts.get(layer, 0) + counts
        loads = device_loads(experts_TK, self.device_map, self.num_devices)
        self.scores.setdefault(layer, []).append(float((loads.max() - loads.min()) / experts_TK.shape[0]))
        self.device_max_over_mean.setdefault(layer, []).append(float(max_over_mean(loads)))
        if self.track_coactivation:
            self.coact[layer] = self.coact.get(layer, 0) + coactivation(experts_TK, self.num_experts)

    def reset(self) -> None:
        for d in (self.counts, self.coact, self.scores, self.device_max_over_mean):
            d.clear()

    def summary(self) -> dict:
        out = {}
        for layer in sorted(self.counts):
            counts = self.counts[layer]
            share = intra_group_share(counts, self.group_map).view(self.num_groups, -1)
            device_totals = torch.zeros(self.num_devices, dtype=torch.long).index_add_(0, self.device_map, counts)
            entry = {
                "expert_counts": counts.tolist(),
                "experts": load_stats(counts),
                "devices": load_stats(device_totals),
                "imbalance_score_mean": sum(self.scores[layer]) / len(self.scores[layer]),
                "imbalance_score_max": max(self.scores[layer]),
                "device_max_over_mean_mean": sum(self.device_max_over_mean[layer]) / len(self.scores[layer]),
                "intra_group_share_max": float(share.max()),
                "intra_group_share_min": float(share.min()),
                "batches": len(self.scores[layer]),
            }
            if self.track_coactivation:
                c = self.coact[layer].clone()
                same = self.group_map.view(-1, 1) == self.group_map.view(1, -1)
                c.fill_diagonal_(0)
                entry["coactivation_same_group"] = int(c[same].sum())
                entry["coactivation_cross_group"] = int(c[~same].sum())
            out[layer] = entry
        return out
