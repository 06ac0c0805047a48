"""The loss of one micro-batch (cross-entropy, MTP, balance losses, load statistics) and the
validation pass. Pure functions of the model and the batch: the trainer owns the optimizer and
the loop."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moge.config import ModelConfig
from moge.metrics import device_loads, max_over_mean
from moge.nn.losses import GlobalBatchAuxLoss, aux_loss, local_group_aux_loss, z_loss
from moge.nn.model import PanguProMoEForCausalLM
from moge.train.config import TrainConfig


def micro_batch_loss(model: PanguProMoEForCausalLM, model_cfg: ModelConfig, cfg: TrainConfig,
                     x_BS: torch.Tensor, y_BS: torch.Tensor,
                     global_aux: GlobalBatchAuxLoss | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of inputs `x_BS` with targets `y_BS`, and its parts as floats for the log
    (ce, mtp, aux, z, imbalance, device_max_over_mean)."""
    mc = model_cfg
    device_type = x_BS.device.type
    mtp = None
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        out = model(x_BS, return_routing=mc.is_moe)
        if cfg.mtp_loss_weight > 0:
            # MTP at position t sees h_t and x_{t+1} = y_t and predicts y_{t+1}; the last position has no target
            mtp = model.mtp_forward(out.pre_norm_hidden[:, :-1], y_BS[:, :-1], return_routing=mc.is_moe)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y_BS.reshape(-1))
    stats = {"ce": ce.item()}
    loss = ce
    if mtp is not None:
        mtp_ce = F.cross_entropy(mtp.logits.reshape(-1, mtp.logits.shape[-1]), y_BS[:, 1:].reshape(-1))
        loss = loss + cfg.mtp_loss_weight * mtp_ce
        stats["mtp"] = mtp_ce.item()
    if not mc.is_moe:
        return loss, stats
    # the MTP module's MoE layer is balanced like the trunk's layers
    routings = out.routing + (mtp.routing if mtp is not None else [])
    extra, balance = routing_losses(routings, mc, cfg, global_aux)
    return loss + extra, stats | balance


def routing_losses(routings: list, mc: ModelConfig, cfg: Any, global_aux: GlobalBatchAuxLoss | None = None,
                   valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The balance terms of one forward's routing (aux loss at cfg.aux_scope, z-loss) and the load
    statistics for the log: Imbalance Score, device max/mean and expert max/mean (each layer's,
    averaged). `valid_T`
    (bool over the flattened tokens) leaves padding out of the statistics and losses."""
    aux_terms, z_terms, scores, mom, expert_mom = [], [], [], [], []
    device = routings[0].experts_TK.device
    dev_map = torch.arange(mc.num_experts, device=device) // (mc.num_experts // mc.num_groups)
    for layer, r in enumerate(routings):
        probs, experts, logits = r.probs_TN, r.experts_TK, r.logits_TN
        if valid_T is not None:
            probs, experts, logits = probs[valid_T], experts[valid_T], logits[valid_T]
        if cfg.aux_alpha:
            if cfg.aux_scope == "micro":
                aux_terms.append(aux_loss(probs, experts, cfg.aux_alpha))
            elif cfg.aux_scope == "global":
                aux_terms.append(global_aux(probs, experts, layer=layer))
            else:
                aux_terms.append(local_group_aux_loss(logits, experts, r.group_of_expert_N, cfg.aux_alpha))
        if cfg.z_loss:
            z_terms.append(z_loss(logits, cfg.z_loss))
        with torch.no_grad():
            loads = device_loads(experts, dev_map, mc.num_groups).float()
            scores.append(float((loads.max() - loads.min()) / max(1, experts.shape[0])))
            mom.append(float(max_over_mean(loads)))
            per_expert = torch.bincount(experts.reshape(-1), minlength=mc.num_experts).float()
            expert_mom.append(float(max_over_mean(per_expert)))
    loss = torch.zeros((), device=device)
    stats: dict[str, float] = {}
    if aux_terms:
        aux = torch.stack(aux_terms).mean()
        loss = loss + aux
        stats["aux"] = aux.item()
    if z_terms:
        zl = torch.stack(z_terms).mean()
        loss = loss + zl
        stats["z"] = zl.item()
    stats["imbalance"] = sum(scores) / len(scores)
    stats["device_max_over_mean"] = sum(mom) / len(mom)
    stats["expert_max_over_mean"] = sum(expert_mom) / len(expert_mom)
    return loss, stats


@torch.no_grad()
def evaluate(model: PanguProMoEForCausalLM, data: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean validation cross-entropy per token, per domain, over fixed windows; with an MTP module
    also its cross-entropy on token t+2 as `mtp/<domain>`. Leaves the model in train mode."""
    model.eval()
    result, mtp_result = {}, {}
    has_mtp = bool(model.config.num_mtp_modules)
    for domain in data.domains:
        total, tokens, mtp_total, mtp_tokens = 0.0, 0, 0.0, 0
        for batch in data.val_batches(domain, cfg.eval_windows, cfg.batch_size):
            batch = batch.to(device)
            out = model(batch[:, :-1])
            logits = out.logits
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            tokens += batch[:, 1:].numel()
            if has_mtp and batch.shape[1] > 2:  # the MTP module's CE on token t+2
                m = model.mtp_forward(out.pre_norm_hidden[:, :-1], batch[:, 1:-1]).logits
                mtp_total += F.cross_entropy(m.reshape(-1, m.shape[-1]), batch[:, 2:].reshape(-1),
                                             reduction="sum").item()
                mtp_tokens += batch[:, 2:].numel()
        result[domain] = total / max(1, tokens)
        if has_mtp:
            mtp_result[f"mtp/{domain}"] = mtp_total / max(1, mtp_tokens)
    model.train()
    return result | mtp_result
