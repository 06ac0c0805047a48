"""Supervised fine-tuning (`moge sft`): the training loop of `Trainer` on packed chat data, with the
cross-entropy on assistant tokens only.

The run starts from a checkpoint (`init`, required) with a fresh optimizer and saves every
`save_every` steps into `OUT/checkpoints/step-NNNNNN`, keeping `keep_checkpoints` of them: these are
ordinary released-layout checkpoints, to be merged group by group with `moge merge` as the paper
does within one SFT run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moge.errors import ConfigError
from moge.train.chat import ChatData
from moge.train.config import TrainConfig
from moge.train.packing import Packed, packed_forward
from moge.train.step import routing_losses
from moge.train.trainer import Trainer


@dataclass
class SFTConfig(TrainConfig):
    """A TrainConfig whose data are chat JSONL files: `sources` lists [path, weight] pairs."""

    sources: list[Any] = field(default_factory=list)
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 10
    save_every: int = 50
    keep_checkpoints: int = 100
    eval_every: int = 1_000_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init:
            raise ConfigError("sft needs init: the checkpoint to fine-tune (--init CKPT)")
        if self.phases:
            raise ConfigError("phases are for pretraining; an SFT run has one phase (leave 'phases' out)")
        if self.mtp_loss_weight:
            raise ConfigError("mtp_loss_weight is not supported by sft (packed rows have no MTP targets)")


def masked_ce(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets where `mask_BS` is True (0 when there are none)."""
    ce = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1), reduction="none")
    m = mask_BS.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1)


def sft_loss(model, model_cfg, cfg: TrainConfig, batch: Packed) -> tuple[torch.Tensor, dict[str, float]]:
    """Assistant-token cross-entropy of a packed batch plus the balance terms (on real tokens)."""
    device_type = batch.inputs_BS.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        out = packed_forward(model, batch.inputs_BS, batch.docs_BS, batch.positions_BS,
                             return_routing=model_cfg.is_moe)
    ce = masked_ce(out.logits, batch.targets_BS, batch.loss_mask_BS)
    stats = {"ce": ce.item(), "answer_tokens": float(batch.loss_mask_BS.sum()),
             "fill": float(batch.valid_BS.float().mean())}
    if not model_cfg.is_moe:
        return ce, stats
    extra, balance = routing_losses(out.routing, model_cfg, cfg, valid_T=batch.valid_BS.reshape(-1))
    return ce + extra, stats | balance


class SFTTrainer(Trainer):
    """`Trainer` with packed chat batches and the assistant-only loss."""

    data: ChatData

    def micro_batch(self, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        packed, counts = self.data.micro_batch(self.step, micro, self.cfg.batch_size)
        packed = Packed(*(t.to(self.device) for t in (packed.inputs_BS, packed.targets_BS, packed.loss_mask_BS,
                                                      packed.docs_BS, packed.positions_BS)))
        loss, stats = sft_loss(self.model, self.model_cfg, self.cfg, packed)
        for k, n in enumerate(counts):
            stats[f"source{k}"] = float(n)
        return loss, stats
