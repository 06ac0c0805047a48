"""Checkpoint merging (the paper's SFT recipe):

    Theta_merged = Theta_base + sum_k lambda_k * mean_i (Theta_k^i - Theta_base)

Group k holds the checkpoints of one epoch (N_k of them); lambda_k weighs that group's mean
update. Computed in fp32 over matching state dicts, then saved in the released layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from moge.checkpoint.load import load_float
from moge.checkpoint.save import save_pretrained
from moge.errors import CheckpointError, ConfigError
from moge.nn.model import PanguProMoEForCausalLM


def merge_state_dicts(base: Mapping[str, Tensor], groups: Sequence[Sequence[Mapping[str, Tensor]]],
                      lambdas: Sequence[float]) -> dict[str, Tensor]:
    """The merge formula over state dicts with identical keys and shapes (base dtype kept)."""
    if len(groups) != len(lambdas):
        raise ConfigError(f"got {len(groups)} checkpoint groups but {len(lambdas)} lambdas: give one lambda per group")
    if any(len(g) == 0 for g in groups):
        raise ConfigError("every checkpoint group needs at least one checkpoint")
    for k, group in enumerate(groups):
        for i, sd in enumerate(group):
            if set(sd) != set(base):
                missing, extra = sorted(set(base) - set(sd)), sorted(set(sd) - set(base))
                raise CheckpointError(f"group {k} checkpoint {i} does not match the base: missing {missing[:5]}, "
                                      f"unexpected {extra[:5]}")
            for key, t in sd.items():
                if t.shape != base[key].shape:
                    raise CheckpointError(f"group {k} checkpoint {i}: {key} has shape {tuple(t.shape)}, "
                                          f"base has {tuple(base[key].shape)}")
    merged = {}
    for key, b in base.items():
        if not b.is_floating_point():
            merged[key] = b.clone()
            continue
        b32 = b.float()
        acc = b32.clone()
        for lam, group in zip(lambdas, groups):
            mean_delta = sum(sd[key].float() - b32 for sd in group) / len(group)
            acc += lam * mean_delta
        merged[key] = acc.to(b.dtype)
    return merged


def merge_checkpoints(base: str | Path, groups: Sequence[Sequence[str | Path]], lambdas: Sequence[float],
                      out: str | Path) -> PanguProMoEForCausalLM:
    """Load released-layout (float) checkpoints, merge them, save the result to `out`."""
    base_model = load_float(base)
    group_sds = []
    for g in groups:
        sds = []
        for path in g:
            model = load_float(path)
            if model.config != base_model.config:
                raise ConfigError(f"checkpoint {path} has a different model config from the base {base}; "
                                  "only checkpoints of one architecture can be merged")
            sds.append(model.state_dict())
        group_sds.append(sds)
    merged = merge_state_dicts(base_model.state_dict(), group_sds, lambdas)
    with torch.no_grad():
        base_model.load_state_dict(merged)
    save_pretrained(base_model, out)
    return base_model
