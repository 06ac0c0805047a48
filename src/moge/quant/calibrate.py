"""Calibration data for W8A8: windows of the corpus chosen so that every expert sees tokens.

Smoothing factors come from per-channel activation maxima, and an expert that no calibration
token reaches contributes nothing to them but is quantized all the same. Random windows leave rare
experts with few tokens, so the windows are chosen from a larger random pool: the float model
routes the whole pool once, each window's per-expert token counts (every layer) are recorded, and
windows are picked greedily: each time, among the windows that give tokens to the most (layer,
expert) pairs still without any, the one that adds most to sum over (layer, expert) of
log(1 + tokens so far). The log gives diminishing returns, so the choice keeps favouring windows
that reach the experts with the fewest tokens. The report compares the per-expert minimum with
that of the same number of windows taken at random from the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moge.errors import ConfigError


@dataclass
class CalibrationSet:
    input_ids: Tensor  # int64 [windows, seq_len]
    expert_counts: Tensor  # int64 [layers, experts]: token selections of the chosen windows (float model)
    random_counts: Tensor | None = None  # the same for as many random windows of the pool (for comparison)
    windows: list[tuple[str, int]] = field(default_factory=list)  # (domain, start offset) of each window

    def summary(self) -> dict:
        out = {"windows": int(self.input_ids.shape[0]), "seq_len": int(self.input_ids.shape[1]),
               "tokens": int(self.input_ids.numel())}
        if self.expert_counts.numel():
            out["per_expert_min_tokens"] = [int(c) for c in self.expert_counts.min(-1).values]
            out["per_expert_max_tokens"] = [int(c) for c in self.expert_counts.max(-1).values]
            if self.random_counts is not None:
                out["random_windows_per_expert_min_tokens"] = [int(c) for c in self.random_counts.min(-1).values]
        return out


def candidate_windows(data_root: str | Path, *, seq_len: int, pool: int, seed: int = 0,
                      split: str = "train") -> tuple[Tensor, list[tuple[str, int]]]:
    """`pool` random windows of `seq_len` tokens from a prepared corpus, equally many per domain
    (training split by default, so calibration never sees the validation text)."""
    from moge.data.shards import TokenShards

    if pool <= 0 or seq_len <= 0:
        raise ConfigError(f"pool={pool}, seq_len={seq_len} are invalid: both must be positive")
    shards = TokenShards(data_root)
    rng = np.random.default_rng(seed)
    rows, where = [], []
    domains = shards.domains
    for i, domain in enumerate(domains):
        ids = shards.tokens(split, domain)
        n = pool // len(domains) + (1 if i < pool % len(domains) else 0)
        if len(ids) < seq_len:
            raise ConfigError(f"the {split} split of domain {domain!r} has {len(ids)} tokens, fewer than "
                             f"seq_len={seq_len}")
        for start in rng.integers(0, len(ids) - seq_len + 1, size=n):
            rows.append(np.asarray(ids[start:start + seq_len], dtype=np.int64))
            where.append((domain, int(start)))
    return torch.from_numpy(np.stack(rows)), where


@torch.no_grad()
def expert_counts_per_window(model, input_ids: Tensor, batch_size: int = 16) -> Tensor:
    """int64 [windows, layers, experts]: how many of each window's tokens each expert receives."""
    model.eval()
    E = model.config.num_experts
    chunks = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size]
        B = ids.shape[0]
        routing = model(ids, return_routing=True, logits_slice=slice(-1, None)).routing
        per_layer = []
        for r in routing:
            if r is None:
                per_layer.append(torch.zeros(B, E, dtype=torch.long))
                continue
            experts = r.experts_TK.reshape(B, -1)
            per_layer.append(torch.zeros(B, E, dtype=torch.long).scatter_add_(1, experts, torch.ones_like(experts)))
        chunks.append(torch.stack(per_layer, 1))
    return torch.cat(chunks)


def select_balanced(counts_PLE: Tensor, num: int) -> list[int]:
    """Greedy: `num` windows of the pool, first covering every (layer, expert) pair, then
    maximising sum over (layer, expert) of log(1 + tokens)."""
    P = counts_PLE.shape[0]
    if not 0 < num <= P:
        raise ConfigError(f"cannot choose {num} windows from a pool of {P}")
    c = counts_PLE.double()
    total = torch.zeros_like(c[0])
    free = torch.ones(P, dtype=torch.bool)
    chosen = []
    for _ in range(num):
        # first reach (layer, expert) pairs that have no token yet, then the largest log gain
        new = ((total == 0) & (c > 0)).sum((1, 2)).double()
        new[~free] = -1.0
        gain = (torch.log1p(total + c) - torch.log1p(total)).sum((1, 2))
        gain[new < new.max()] = float("-inf")
        pick = int(gain.argmax())  # first maximum: deterministic
        chosen.append(pick)
        free[pick] = False
        total += c[pick]
    return chosen


def balanced_calibration_set(model, data_root: str | Path, *, windows: int = 32, seq_len: int = 128,
                             pool: int = 256, seed: int = 0) -> CalibrationSet:
    """Choose `windows` calibration windows from a pool of `pool` random training windows so
    that per-expert token counts are as even as practical (see the module docstring)."""
    ids, where = candidate_windows(data_root, seq_len=seq_len, pool=max(pool, windows), seed=seed)
    if model.config.vocab_size <= int(ids.max()):
        raise ConfigError(f"the corpus at {data_root} has token ids up to {int(ids.max())}, beyond the model's "
                         f"vocab_size={model.config.vocab_size}: it was tokenized for another model")
    if not model.config.is_moe:
        return CalibrationSet(ids[:windows], torch.zeros(0, 0, dtype=torch.long), None, where[:windows])
    counts = expert_counts_per_window(model, ids)
    chosen = select_balanced(counts, windows)
    random_pick = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:windows]
    return CalibrationSet(ids[chosen], counts[chosen].sum(0), counts[random_pick].sum(0),
                          [where[i] for i in chosen])
