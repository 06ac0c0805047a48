"""`moge train --dry-run`: every rank's memory for a data x expert parallel run, without data, processes
or weights.

Each rank's share comes from the code the run itself uses: the trainer's model (`meta_train_model`,
with its MTP module and aux-loss-free routers) on the meta device, sliced by `parallelize` with an
offline mesh for that rank (moge.parallel.dryrun's way of sizing a rank, the one loading uses).
Weights, gradients and AdamW state are exact sums over that rank's tensors; activations are an
estimate (see `training_activation_bytes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moge.config import ModelConfig
from moge.parallel.dryrun import activation_bytes
from moge.parallel.expert import is_expert_param
from moge.parallel.parallelize import ExpertParallel, offline_mesh, parallelize
from moge.train.config import TrainConfig
from moge.train.distributed import check_layout
from moge.train.model import meta_train_model

FP32 = 4

ACTIVATIONS_COUNTED = ("one micro-batch (batch_size / world rows of seq_len tokens on this rank): per decoder "
                       "layer (and MTP module) the residual stream and its normed copy, q/k/v/attention output, "
                       "the MoE input and this rank's routed rows with their gate/up/act intermediate (balanced "
                       "routing), all kept for the backward; plus the fp32 logits and their gradient. An estimate: "
                       "SDPA and kernel workspaces, allocator slack and the runtime are not counted")


@dataclass(frozen=True)
class TrainRankMemory:
    rank: int
    parameters: int  # this rank's trainable elements
    weights_bytes: int  # parameters and saved buffers (fp32)
    expert_weights_bytes: int  # the routed experts' share of weights_bytes
    gradient_bytes: int  # one fp32 gradient per trainable element
    optimizer_bytes: int  # AdamW: exp_avg and exp_avg_sq, fp32, per trainable element
    activation_bytes: int  # one micro-batch, see ACTIVATIONS_COUNTED

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def training_activation_bytes(model_cfg: ModelConfig, plan: ExpertParallel, world: int, rows: int,
                              seq_len: int) -> int:
    """What autograd keeps for one micro-batch on one rank (see ACTIVATIONS_COUNTED): the per-layer
    live tensors of moge.parallel.dryrun.activation_bytes at fp32, kept for every layer, in place of
    its last-position logits the whole window's logits and their gradient."""
    last_logits = rows * model_cfg.vocab_size * FP32
    per_layer = activation_bytes(model_cfg, plan, world, rows, seq_len, torch.float32) - last_logits
    layers = model_cfg.num_layers + model_cfg.num_mtp_modules
    return layers * per_layer + 2 * rows * seq_len * model_cfg.vocab_size * FP32


def rank_training_memory(cfg: TrainConfig, model_cfg: ModelConfig, world: int, rank: int) -> TrainRankMemory:
    """Rank `rank` of a `world`-process run of `cfg` (expert parallel over cfg.expert_parallel)."""
    check_layout(cfg, model_cfg, world)
    plan = ExpertParallel(cfg.expert_parallel, same_tokens_per_rank=True)
    model = parallelize(meta_train_model(model_cfg, cfg), plan, offline_mesh(plan, world, rank))
    seen: set[int] = set()
    weights = experts = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # tied embeddings count once
            seen.add(id(t))
            weights += t.numel() * t.element_size()
            experts += t.numel() * t.element_size() if is_expert_param(name) else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mtp_cfg = model.config  # with the run's MTP module
    acts = training_activation_bytes(mtp_cfg, plan, world, cfg.batch_size // world, cfg.seq_len)
    return TrainRankMemory(rank, trainable, weights, experts, trainable * FP32, 2 * trainable * FP32, acts)


def train_dry_run(cfg: TrainConfig, model_cfg: ModelConfig, world: int) -> list[TrainRankMemory]:
    """`rank_training_memory` of every rank of the world."""
    return [rank_training_memory(cfg, model_cfg, world, r) for r in range(world)]
