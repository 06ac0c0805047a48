"""`parallelize(model, plan)`: apply a parallel layout to an unchanged model, in place.

The model keeps its one forward (PanguProMoEForCausalLM.forward, MoGEBlock.forward); a plan only
slices parameters and swaps components, as torchtitan's `parallelize_*` functions do:

  ExpertParallel(ep)   data x expert parallel (training, EP inference). Every MoGEBlock keeps its
                       router and shared expert whole and 1/ep of the routed experts (parameter names
                       unchanged: a sharded state dict maps to the full one by concatenating the
                       expert tensors over the EP group in rank order); its dispatcher becomes the
                       all-to-all one.
  H2P(attn_tp, expert_tp)  the paper's hybrid inference layout on W ranks: attention DP x TP(attn_tp),
                       routed experts TP(expert_tp) x EP(W / expert_tp), shared expert TP over all W.

H2P's communication, per layer, as the paper rewrites it (T tokens of one DP group):

    embed_tokens   -> this rank's 1/attn_tp of its DP group's tokens (padded to a multiple)
    input_layernorm  RMSNorm on the shard, then all-gather over the attention TP group
    self_attn      this rank's heads; o_proj's output reduce-scattered over the TP group
    mlp            (dispatcher) all-gather over all W ranks -> router -> this rank's experts'
                   F-slice + the shared expert's F-slice -> one reduce-scatter over all W ranks,
                   which leaves exactly this rank's shard (the next layer's attention input)
    norm           RMSNorm on the shard, then all-gather over the TP group -> lm_head

Each step is a module swapped into the same model: `ShardTokens` (embedding), `GatheredRMSNorm`,
`ReduceScatterLinear` (o_proj) and the `AllGatherDispatcher`. Token counts must be equal on all DP
groups (pad the batch). The MTP modules are not split (speculative decoding runs in one process).
The tensor-parallel pieces are explicit slices with functional collectives: the residual stream's
layout (rows shared out over ranks, padding included, reduce-scattered) is the paper's, and plain
slices keep the numbers identical to the single-process model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moge.config import ModelConfig
from moge.degrees import check_expert_parallel, check_hybrid
from moge.errors import ConfigError
from moge.nn.experts import SwiGLUExperts
from moge.nn.model import Attention, PanguProMoEForCausalLM, RMSNorm
from moge.nn.moe import Linear, LocalDispatcher, MoGEBlock
from moge.parallel.comm import all_gather, reduce_scatter
from moge.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from moge.parallel.mesh import ExpertParallelMesh, H2PMesh


@dataclass(frozen=True)
class ExpertParallel:
    """Routed experts split over `ep` ranks (the rest replicated: data parallel over the world).
    `same_tokens_per_rank`: every forward gets the same number of tokens on every rank (training
    micro-batches), so MoGE's dispatch needs no exchange at all before the data."""

    ep: int
    same_tokens_per_rank: bool = False


@dataclass(frozen=True)
class H2P:
    """The paper's hybrid layout: attention TP over `attn_tp` ranks, routed experts TP over
    `expert_tp` ranks (EP over world / expert_tp), shared expert TP over the world."""

    attn_tp: int
    expert_tp: int


def parallelize(model: nn.Module, plan: ExpertParallel | H2P,
                mesh: ExpertParallelMesh | H2PMesh | None = None) -> nn.Module:
    """Apply `plan` to `model` (a whole, identical copy on every rank) in place and return it.
    Without `mesh` its process groups are created (collective: every rank calls this alike)."""
    if isinstance(plan, ExpertParallel):
        return _expert_parallel(model, plan, mesh)
    if isinstance(plan, H2P):
        return _h2p(model, plan, mesh)
    raise ConfigError(f"plan={plan!r} is invalid: use moge.parallel.ExpertParallel(ep) or H2P(attn_tp, expert_tp)")


def _blocks(model: nn.Module) -> list[MoGEBlock]:
    blocks = [m for m in model.modules() if isinstance(m, MoGEBlock)]
    for block in blocks:
        if not isinstance(block.dispatcher, LocalDispatcher):
            raise ConfigError("this model is already parallelized: apply a plan to a whole model once")
    return blocks


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _experts_slice(experts: SwiGLUExperts, first: int, count: int, tp: int = 1, tp_rank: int = 0) -> SwiGLUExperts:
    """Experts [first, first + count), each keeping its `tp_rank`-th 1/tp of the intermediate dim
    (gate rows and up rows alike, down columns)."""
    if not isinstance(experts, SwiGLUExperts):
        raise ConfigError(f"experts of type {type(experts).__name__} cannot be sharded: parallelize the float "
                          "model (SwiGLUExperts) first")
    f = experts.intermediate_size // tp
    with torch.device("meta"):
        new = SwiGLUExperts(count, experts.hidden_size, f, experts.backend)
    gate_up = experts.gate_up_proj[first:first + count]
    gate, up = gate_up[:, :experts.intermediate_size], gate_up[:, experts.intermediate_size:]
    cols = slice(tp_rank * f, (tp_rank + 1) * f)
    new.gate_up_proj = _param(torch.cat([gate[:, cols], up[:, cols]], dim=1), experts.gate_up_proj)
    new.down_proj = _param(experts.down_proj[first:first + count, :, cols], experts.down_proj)
    return new


def _expert_parallel(model: nn.Module, plan: ExpertParallel, mesh: ExpertParallelMesh | None) -> nn.Module:
    blocks = _blocks(model)
    for block in blocks:
        check_expert_parallel(block.cfg, plan.ep)
    if mesh is None:
        mesh = ExpertParallelMesh.build(plan.ep)
    elif mesh.ep != plan.ep:
        raise ConfigError(f"expert_parallel={plan.ep} is invalid for a mesh built with ep={mesh.ep}")
    for block in blocks:
        cfg = block.cfg
        local = mesh.expert_range(cfg.num_experts)
        block.experts = _experts_slice(block.experts, local.start, len(local))
        known = cfg.top_k_per_group * (cfg.num_groups // mesh.ep) if cfg.router == "grouped" else None
        block.dispatcher = AllToAllDispatcher(cfg.num_experts, mesh.ep_group, known, plan.same_tokens_per_rank)
    return model


class _TokenShard:
    """The H2P residual layout of the current forward: B x S tokens of this DP group, padded to a
    multiple of `tp` rows and shared out over the attention TP group in rank order. The embedding
    records B and S; the norms that gather read them back."""

    def __init__(self, tp: int, tp_rank: int, group):
        self.tp, self.tp_rank, self.group = tp, tp_rank, group
        self.batch = self.seq = 0

    def shard(self, x_TD: Tensor) -> Tensor:
        pad = (-x_TD.shape[0]) % self.tp
        if pad:
            x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, x_TD.shape[1])])
        return x_TD.chunk(self.tp)[self.tp_rank]

    def gather(self, shard_TD: Tensor) -> Tensor:
        full = all_gather(shard_TD, self.group) if self.tp > 1 else shard_TD
        return full[:self.batch * self.seq].view(self.batch, self.seq, shard_TD.shape[-1])


class ShardTokens(nn.Embedding):
    """The embedding (same weight) followed by keeping this rank's rows of the token shard."""

    def __init__(self, embedding: nn.Embedding, layout: _TokenShard):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         _weight=embedding.weight)
        self.weight = embedding.weight  # the same Parameter: a tied lm_head stays tied
        self.layout = layout

    def forward(self, input_ids: Tensor) -> Tensor:
        self.layout.batch, self.layout.seq = input_ids.shape
        return self.layout.shard(super().forward(input_ids).reshape(-1, self.embedding_dim))


class GatheredRMSNorm(RMSNorm):
    """RMSNorm on this rank's shard, then all-gather over the attention TP group ([B, S, D] out):
    the paper moves the all-gather after the norm."""

    def __init__(self, norm: RMSNorm, layout: _TokenShard):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return self.layout.gather(super().forward(x))


class ReduceScatterLinear(Linear):
    """Row-parallel o_proj: this rank's head columns, its partial output reduce-scattered over the
    attention TP group into the residual shard (half the traffic of an all-reduce)."""

    def __init__(self, o_proj: nn.Linear, layout: _TokenShard):
        tp, t = layout.tp, layout.tp_rank
        cols = o_proj.in_features // tp
        with torch.device("meta"):
            super().__init__(cols, o_proj.out_features, bias=o_proj.bias is not None)
        self.weight = _param(o_proj.weight[:, t * cols:(t + 1) * cols], o_proj.weight)
        if o_proj.bias is not None:  # added once per group
            self.bias = _param(o_proj.bias if t == 0 else torch.zeros_like(o_proj.bias), o_proj.bias)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        y_TD = super().forward(x).reshape(-1, self.out_features)
        pad = (-y_TD.shape[0]) % self.layout.tp
        if pad:
            y_TD = torch.cat([y_TD, y_TD.new_zeros(pad, y_TD.shape[1])])
        return reduce_scatter(y_TD, self.layout.group) if self.layout.tp > 1 else y_TD


def _rows(linear: nn.Linear, part: int, parts: int, dim: int = 0) -> Linear:
    """A Linear holding the `part`-th 1/parts of `linear` along its output (dim 0) or input (dim 1)."""
    w = linear.weight
    size = w.shape[dim] // parts
    weight = w.narrow(dim, part * size, size)
    bias = linear.bias.narrow(0, part * size, size) if linear.bias is not None and dim == 0 else linear.bias
    with torch.device("meta"):
        new = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = _param(weight, w)
    if bias is not None:
        new.bias = _param(bias, linear.bias)
    return new


def _shard_attention(attn: Attention, cfg: ModelConfig, layout: _TokenShard) -> Attention:
    tp, t = layout.tp, layout.tp_rank
    local_cfg = cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp, head_dim=cfg.head_size)
    new = Attention(local_cfg)
    for name in ("q_proj", "k_proj", "v_proj"):  # column parallel: this rank's heads
        setattr(new, name, _rows(getattr(attn, name), t, tp))
    new.o_proj = ReduceScatterLinear(attn.o_proj, layout)
    return new.to(attn.q_proj.weight.device)


def _h2p(model: nn.Module, plan: H2P, mesh: H2PMesh | None) -> nn.Module:
    if not isinstance(model, PanguProMoEForCausalLM):
        raise ConfigError(f"the H2P plan applies to a PanguProMoEForCausalLM, got {type(model).__name__}")
    cfg = model.config
    blocks = _blocks(model)
    if mesh is None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        check_hybrid(cfg, world, plan.attn_tp, plan.expert_tp)  # before any group exists
        mesh = H2PMesh.build(plan.attn_tp)
    ep = check_hybrid(cfg, mesh.world, plan.attn_tp, plan.expert_tp)
    if mesh.attn_tp != plan.attn_tp:
        raise ConfigError(f"attn_tp={plan.attn_tp} is invalid for a mesh built with attn_tp={mesh.attn_tp}")
    for block in blocks:
        for shared in block._shared():
            if shared.gate_proj.out_features % mesh.world:
                raise ConfigError(f"shared expert width {shared.gate_proj.out_features} is invalid for H2P: the world "
                                  f"size {mesh.world} must divide it (the shared expert is split over all ranks)")
    layout = _TokenShard(plan.attn_tp, mesh.attn_rank, mesh.attn_group)
    inner = model.model
    inner.embed_tokens = ShardTokens(inner.embed_tokens, layout)
    inner.norm = GatheredRMSNorm(inner.norm, layout)
    r, expert_rank, expert_tp_rank = mesh.rank, mesh.rank // plan.expert_tp, mesh.rank % plan.expert_tp
    per = cfg.num_experts // ep
    for layer in inner.layers:
        layer.input_layernorm = GatheredRMSNorm(layer.input_layernorm, layout)
        layer.self_attn = _shard_attention(layer.self_attn, cfg, layout)
        block = layer.mlp
        block.experts = _experts_slice(block.experts, expert_rank * per, per, plan.expert_tp, expert_tp_rank)
        for shared in block._shared():  # tensor parallel over every rank: partial sums
            shared.gate_proj = _rows(shared.gate_proj, r, mesh.world)
            shared.up_proj = _rows(shared.up_proj, r, mesh.world)
            shared.down_proj = _rows(shared.down_proj, r, mesh.world, dim=1)
        block.dispatcher = AllGatherDispatcher(mesh.world_group, expert_rank * per, per)
    return model
