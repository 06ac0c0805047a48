"""Per-rank memory of a parallel layout at the real size, without loading anything.

Every rank's share comes from the code that loads it: the model is built on the meta device and
`parallelize` slices it with an offline mesh for that rank (no process group), so the weight bytes
are the sizes of the tensors `load_parallel` would fill, and the KV cache is what the sharded
model's `allocate_cache` would allocate. Activations are an estimate (see `activation_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from moge.checkpoint.build import meta_model
from moge.config import ModelConfig
from moge.parallel.parallelize import H2P, ExpertParallel, offline_mesh, parallelize


@dataclass(frozen=True)
class RankMemory:
    rank: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    sequences: int  # this rank's attention DP group's sequences

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _nbytes(t: Tensor, dtype: torch.dtype) -> int:
    return t.numel() * (torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size())


def attention_dp(plan: ExpertParallel | H2P, world: int) -> int:
    """How many groups of ranks hold different sequences (each EP rank is a data-parallel rank)."""
    return world // plan.attn_tp if isinstance(plan, H2P) else world


def activation_bytes(cfg: ModelConfig, plan: ExpertParallel | H2P, world: int, sequences: int, tokens: int,
                     dtype: torch.dtype) -> int:
    """The largest live tensors of one decoder layer when this rank runs `tokens` tokens of each of
    its `sequences` (a prefill of the whole context): the residual stream and its normed copy, this
    rank's q/k/v/attention output, the MoE input as the dispatcher hands it over (under H2P every
    rank's tokens), the routed rows with their gate/up/act intermediate, and the fp32 logits of the
    last position. Not counted: SDPA workspaces (fused kernels need none of size S x S), allocator
    slack, and the runtime itself."""
    e = torch.empty((), dtype=dtype).element_size()
    t = sequences * tokens
    tp = plan.attn_tp if isinstance(plan, H2P) else 1
    d, hd = cfg.hidden_size, cfg.head_size
    attn = t * (cfg.num_heads // tp + 2 * cfg.num_kv_heads // tp + cfg.num_heads // tp) * hd
    if isinstance(plan, H2P):
        moe_tokens, experts_local = t * (world // tp), cfg.num_experts // (world // plan.expert_tp)
        width = cfg.expert_intermediate_size // plan.expert_tp
    else:
        moe_tokens, experts_local, width = t, cfg.num_experts // plan.ep, cfg.expert_intermediate_size
    # balanced routing: this rank's experts' share of every slot it sees
    routed_rows = moe_tokens * cfg.top_k * experts_local // cfg.num_experts if cfg.is_moe else 0
    mlp = moe_tokens * d + routed_rows * (d + 3 * width)
    logits = sequences * cfg.vocab_size * 4
    return (2 * t * d + attn + mlp) * e + logits


def rank_memory(cfg: ModelConfig, plan: ExpertParallel | H2P, world: int, rank: int, *, dtype: torch.dtype,
                batch: int, context: int) -> RankMemory:
    """Memory of rank `rank` of `world` under `plan` serving `batch` sequences in all (shared out
    over the attention DP groups) with a KV cache of `context` tokens each."""
    model = meta_model(cfg)
    parallelize(model, plan, offline_mesh(plan, world, rank))
    seen: set[int] = set()
    weights = 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:  # tied embeddings count once
            seen.add(id(t))
            weights += _nbytes(t, dtype)
    sequences = math.ceil(batch / attention_dp(plan, world))
    cache = model.allocate_cache(sequences, context, dtype, device="meta")
    kv = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    acts = activation_bytes(cfg, plan, world, sequences, context, dtype)
    return RankMemory(rank, weights, kv, acts, sequences)


def dry_run(cfg: ModelConfig, plan: ExpertParallel | H2P, world: int, *, dtype: torch.dtype, batch: int,
            context: int) -> list[RankMemory]:
    """`rank_memory` of every rank of the world."""
    return [rank_memory(cfg, plan, world, r, dtype=dtype, batch=batch, context=context) for r in range(world)]
