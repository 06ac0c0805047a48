"""The optimizer recipe: AdamW with weight decay on matrices only, linear warmup, cosine decay."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from moge.train.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, router_scale, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def lr_at(step: int, cfg: TrainConfig | SimpleNamespace) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def phase_lr(step: int, cfg: TrainConfig) -> float:
    """The learning rate of run step `step`: `lr_at` within the phase the step belongs to (a run
    without phases is one phase, so this equals `lr_at(step, cfg)`)."""
    if not cfg.phases:
        return lr_at(step, cfg)
    p = cfg.phase_at(step)
    return lr_at(step - p.start, SimpleNamespace(lr=p.lr, min_lr=p.min_lr, warmup=p.warmup, steps=p.steps))
