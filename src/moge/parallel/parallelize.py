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

    embed_tokens   vocabulary rows split over all W ranks: the ids of every DP group all-gathered,
                   looked up in this rank's rows, one reduce-scatter over all W ranks -> this
                   rank's 1/attn_tp of its DP group's tokens (padded to a multiple)
    input_layernorm  RMSNorm on the shard, then all-gather over the attention TP group
    self_attn      this rank's heads; o_proj's output reduce-scattered over the TP group
    mlp            (dispatcher) all-gather over all W ranks -> router -> this rank's experts'
                   F-slice + the shared expert's F-slice -> one reduce-scatter over all W ranks,
                   which leaves exactly this rank's shard (the next layer's attention input)
    norm           all-gather of the shard over the TP group (the model's `gather_hidden`: its
                   pre-norm hidden state is then [B, S, D], as in one process), then RMSNorm
    lm_head        vocabulary rows split over all W ranks: every DP group's normed positions
                   all-gathered, this rank's vocabulary block of their fp32 logits, one all-to-all
                   -> each rank its DP group's logits over the whole vocabulary

Each step is a module swapped into the same model: `VocabParallelEmbedding`, `GatheredRMSNorm`,
`ReduceScatterLinear` (o_proj), the `AllGatherDispatcher` and `VocabParallelLMHead` (a tied pair
shares one slice). Token counts must be equal on all DP groups (pad the batch). An MTP module is
split like a decoder layer; its `hnorm` takes this rank's rows of the whole [B, S, D] hidden state it
is given (`ShardedRMSNorm`, no communication), `enorm` and `eh_proj` work row-wise on the shard (whole
weights), and its output is gathered before its `norm`, as the trunk's is.
The tensor-parallel pieces are explicit slices with functional collectives: the residual stream's
layout (rows shared out over ranks, padding included, reduce-scattered) is the paper's, and plain
slices keep the numbers identical to the single-process model's.

Every slice is taken through a `_Slicer`, which records for each local tensor the part of the
single-process tensor it holds (`moge.checkpoint.partial.GlobalSlice`); the records end up in
`model.global_slices` (local state-dict name -> record). The same records let `load_parallel`
read a rank's share straight from a checkpoint onto a model built on the meta device, and let a dry
run size every rank's share without any process group: the plans work on meta tensors, and with
explicit meshes whose groups are None (`offline_mesh`) they need no torch.distributed at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moge.checkpoint.partial import GlobalSlice
from moge.config import ModelConfig
from moge.degrees import check_expert_parallel, check_hybrid
from moge.errors import ConfigError, DistributedError
from moge.nn.experts import SwiGLUExperts, linear
from moge.nn.model import Attention, DecoderLayer, PanguProMoEForCausalLM, RMSNorm
from moge.nn.moe import Linear, LocalDispatcher, MoGEBlock
from moge.parallel.comm import all_gather, all_to_all, reduce_scatter, reduce_scatter_rows
from moge.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from moge.parallel.mesh import ExpertParallelMesh, H2PMesh
from moge.parallel.quantized import ReduceScatterQuantLinear, is_quantized_module, quant_experts_slice, quant_rows


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
    """Apply `plan` to `model` (a whole, identical copy on every rank, or a meta-device one) in
    place and return it, with `model.global_slices` recording what each local tensor holds.
    Without `mesh` its process groups are created (collective: every rank calls this alike)."""
    if isinstance(plan, ExpertParallel):
        return _expert_parallel(model, plan, mesh)
    if isinstance(plan, H2P):
        return _h2p(model, plan, mesh)
    raise ConfigError(f"plan={plan!r} is invalid: use moge.parallel.ExpertParallel(ep) or H2P(attn_tp, expert_tp)")


def offline_mesh(plan: ExpertParallel | H2P, world: int, rank: int) -> ExpertParallelMesh | H2PMesh:
    """A mesh for rank `rank` of `world` with no process groups: `parallelize` with it gives that
    rank's share (shapes and records) without torch.distributed, e.g. on the meta device for a dry
    run. Such a model cannot run a forward."""
    if not 0 <= rank < world:
        raise ConfigError(f"rank={rank} is invalid: must be in [0, {world})")
    if isinstance(plan, ExpertParallel):
        if world % plan.ep:
            raise ConfigError(f"expert_parallel={plan.ep} is invalid: must divide the world size {world}")
        return ExpertParallelMesh(world, rank, plan.ep, None, None)
    if isinstance(plan, H2P):
        if world % plan.attn_tp:
            raise ConfigError(f"attn_tp={plan.attn_tp} is invalid: must divide the world size {world}")
        return H2PMesh(world, rank, plan.attn_tp, None, None)
    raise ConfigError(f"plan={plan!r} is invalid: use moge.parallel.ExpertParallel(ep) or H2P(attn_tp, expert_tp)")


def _online() -> bool:
    return dist.is_available() and dist.is_initialized()


class OfflineDispatcher:
    """The expert-parallel dispatcher of a model sharded without process groups (`offline_mesh`):
    it has one rank's shapes, but no peers to exchange tokens with. (H2P's all-gather dispatcher
    needs no group to be built.)"""

    def _fail(self, *_args, **_kwargs):
        raise DistributedError("this model was sharded with an offline mesh (no process group): it describes one "
                               "rank's share but cannot run; parallelize under torchrun to run it")

    gather = scatter = __call__ = _fail


class _Slicer:
    """Takes every slice a plan makes and records, for the new parameter, which part of which
    single-process tensor it holds: loading reads exactly what the slicing took."""

    def __init__(self, model: nn.Module):
        self.names: dict[int, str] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            self.names.setdefault(id(t), name)
        self.made: dict[int, GlobalSlice] = {}

    def take(self, like: nn.Parameter, pieces: list[tuple[slice, ...]], dim: int = 0) -> nn.Parameter:
        record = GlobalSlice(self.names[id(like)], tuple(pieces), dim)
        new = _param(record.take(like), like)
        self.made[id(new)] = record
        return new

    def finish(self, model: nn.Module) -> nn.Module:
        """Record every local tensor of `model` (the ones not sliced: whole) as `model.global_slices`."""
        model.global_slices = {name: self.made.get(id(t), GlobalSlice(self.names.get(id(t), name)))
                               for name, t in model.state_dict(keep_vars=True).items()}
        return model


def _blocks(model: nn.Module) -> list[MoGEBlock]:
    blocks = [m for m in model.modules() if isinstance(m, MoGEBlock)]
    for block in blocks:
        if not isinstance(block.dispatcher, LocalDispatcher):
            raise ConfigError("this model is already parallelized: apply a plan to a whole model once")
    return blocks


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _experts_slice(slicer: _Slicer, experts: SwiGLUExperts, first: int, count: int, tp: int = 1,
                   tp_rank: int = 0) -> SwiGLUExperts:
    """Experts [first, first + count), each keeping its `tp_rank`-th 1/tp of the intermediate dim
    (gate rows and up rows alike, down columns)."""
    if is_quantized_module(experts):
        return quant_experts_slice(slicer, experts, first, count, tp, tp_rank)
    if not isinstance(experts, SwiGLUExperts):
        raise ConfigError(f"experts of type {type(experts).__name__} cannot be sharded: parallelize the float "
                          "model (SwiGLUExperts) first")
    f = experts.intermediate_size // tp
    with torch.device("meta"):
        new = SwiGLUExperts(count, experts.hidden_size, f, experts.backend)
    mine, full = slice(first, first + count), experts.intermediate_size
    if tp == 1:  # whole experts: one range along dim 0
        new.gate_up_proj = slicer.take(experts.gate_up_proj, [(mine,)])
        new.down_proj = slicer.take(experts.down_proj, [(mine,)])
        return new
    gate_rows, up_rows = slice(tp_rank * f, (tp_rank + 1) * f), slice(full + tp_rank * f, full + (tp_rank + 1) * f)
    new.gate_up_proj = slicer.take(experts.gate_up_proj, [(mine, gate_rows), (mine, up_rows)], dim=1)
    new.down_proj = slicer.take(experts.down_proj, [(mine, slice(None), gate_rows)])
    return new


def _expert_parallel(model: nn.Module, plan: ExpertParallel, mesh: ExpertParallelMesh | None) -> nn.Module:
    blocks = _blocks(model)
    for block in blocks:
        check_expert_parallel(block.cfg, plan.ep)
    if mesh is None:
        mesh = ExpertParallelMesh.build(plan.ep)
    elif mesh.ep != plan.ep:
        raise ConfigError(f"expert_parallel={plan.ep} is invalid for a mesh built with ep={mesh.ep}")
    slicer = _Slicer(model)
    online = _online()
    for block in blocks:
        cfg = block.cfg
        local = mesh.expert_range(cfg.num_experts)
        block.experts = _experts_slice(slicer, block.experts, local.start, len(local))
        known = cfg.top_k_per_group * (cfg.num_groups // mesh.ep) if cfg.router == "grouped" else None
        block.dispatcher = AllToAllDispatcher(cfg.num_experts, mesh.ep_group, known, plan.same_tokens_per_rank) \
            if online else OfflineDispatcher()
    return slicer.finish(model)


class _TokenShard:
    """The H2P residual layout of the current forward: B x S tokens of this DP group, padded to a
    multiple of `tp` rows and shared out over the attention TP group in rank order. The embedding
    records B and S; the norms that gather read them back."""

    def __init__(self, tp: int, tp_rank: int, group):
        self.tp, self.tp_rank, self.group = tp, tp_rank, group
        self.batch = self.seq = 0

    def gather(self, shard_TD: Tensor) -> Tensor:
        full = all_gather(shard_TD, self.group) if self.tp > 1 else shard_TD
        return full[:self.batch * self.seq].view(self.batch, self.seq, shard_TD.shape[-1])

    def shard(self, x_BSD: Tensor) -> Tensor:
        """This rank's rows of a whole [B, S, D] tensor (padded with zero rows): `gather`'s inverse."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        pad = (-x_TD.shape[0]) % self.tp
        if pad:
            x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, x_TD.shape[1])])
        rows = x_TD.shape[0] // self.tp
        return x_TD[self.tp_rank * rows:(self.tp_rank + 1) * rows]


class VocabSlice:
    """This rank's rows of the vocabulary: block `rank` of `world` blocks of ceil(V / W) rows. The
    vocabulary is padded logically to a multiple of W (no padding rows exist anywhere): the last
    blocks hold fewer real rows, or none, and their missing logits are cut off after the exchange."""

    def __init__(self, vocab: int, world: int, rank: int):
        self.vocab, self.world = vocab, world
        self.per = -(-vocab // world)
        self.start = min(rank * self.per, vocab)
        self.stop = min(self.start + self.per, vocab)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def _one_per_dp_group(x: Tensor, layout: _TokenShard, world: int, group) -> Tensor:
    """Every rank's `x` (equal shapes), all-gathered over the world, with one copy per attention DP
    group (the TP ranks of a group hold the same rows): [dp * rows, ...] in DP-group order."""
    everyone = all_gather(x, group)
    return everyone.view(world // layout.tp, layout.tp, *x.shape)[:, 0].reshape(-1, *x.shape[1:])


class VocabParallelEmbedding(nn.Embedding):
    """Embedding over all W ranks by vocabulary rows (`VocabSlice`), leaving each rank its rows of the
    H2P residual stream. The ids of every DP group are all-gathered; this rank embeds those in its
    rows (zeros elsewhere, and for the padding rows of the token shard); one reduce-scatter over the
    world sums the W partial embeddings (one non-zero term each: exact) and hands rank r = (DP
    group g, TP rank t) block r of the [dp * padded tokens] stack: exactly block t of group g's
    tokens, the residual layout of `_TokenShard`."""

    def __init__(self, weight: nn.Parameter, vocab: VocabSlice, layout: _TokenShard, group):
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight)
        self.weight = weight  # the same Parameter as a tied lm_head's
        self.vocab, self.layout, self.group = vocab, layout, group

    def forward(self, input_ids: Tensor) -> Tensor:
        self.layout.batch, self.layout.seq = input_ids.shape
        ids_T = input_ids.reshape(-1)
        pad = (-ids_T.shape[0]) % self.layout.tp
        if pad:  # id -1 is in no rank's rows: the padding rows embed to zeros
            ids_T = torch.cat([ids_T, ids_T.new_full((pad,), -1)])
        world = self.vocab.world
        if world > 1:
            ids_T = _one_per_dp_group(ids_T, self.layout, world, self.group)
        local_T = ids_T - self.vocab.start
        inside_T = (local_T >= 0) & (local_T < self.num_embeddings)
        if self.num_embeddings:
            x_TD = F.embedding(local_T.masked_fill(~inside_T, 0), self.weight).masked_fill(~inside_T[:, None], 0)
        else:  # a block of the logical padding: no real rows
            x_TD = self.weight.new_zeros(ids_T.shape[0], self.embedding_dim)
        return reduce_scatter(x_TD, self.group) if world > 1 else x_TD


class VocabParallelLMHead(Linear):
    """lm_head over all W ranks by vocabulary rows (`VocabSlice`). The normed hidden states (the
    positions `logits_slice` kept) of every DP group are all-gathered; this rank computes its
    vocabulary block of their fp32 logits; one all-to-all over the world sends each rank its DP
    group's rows, so it returns that group's full [.., V] logits, as the single-process model does."""

    fp32_logits = True  # PanguProMoEForCausalLM hands h over in any dtype

    def __init__(self, weight: nn.Parameter, vocab: VocabSlice, layout: _TokenShard, group):
        with torch.device("meta"):  # (at least one row: torch's init warns on an empty one)
            super().__init__(weight.shape[1], max(weight.shape[0], 1), bias=False)
        self.weight, self.out_features = weight, weight.shape[0]  # the same Parameter as a tied embedding's
        self.vocab, self.layout, self.group = vocab, layout, group

    def forward(self, h: Tensor) -> Tensor:
        v, world = self.vocab, self.vocab.world
        x_TD = h.reshape(-1, h.shape[-1])
        T = x_TD.shape[0]
        if world > 1:
            x_TD = _one_per_dp_group(x_TD, self.layout, world, self.group)  # [dp * T, D]
        w = self.weight
        if x_TD.dtype != torch.float32:
            x_TD, w = x_TD.float(), w.float()
        logits_TV = linear(x_TD, w)
        if logits_TV.shape[1] < v.per:
            logits_TV = F.pad(logits_TV, (0, v.per - logits_TV.shape[1]))
        if world > 1:  # rank q gets its DP group's rows of every rank's block, in rank order
            dp, tp = world // self.layout.tp, self.layout.tp
            send = logits_TV.view(dp, 1, T, v.per).expand(dp, tp, T, v.per).reshape(world * T, v.per)
            got = all_to_all(send, [T] * world, [T] * world, self.group)
            logits_TV = got.view(world, T, v.per).transpose(0, 1).reshape(T, world * v.per)
        return logits_TV[:, :v.vocab].reshape(*h.shape[:-1], v.vocab)


class GatheredRMSNorm(RMSNorm):
    """RMSNorm on this rank's shard, then all-gather over the attention TP group ([B, S, D] out):
    the paper moves the all-gather after the norm."""

    def __init__(self, norm: RMSNorm, layout: _TokenShard):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return self.layout.gather(super().forward(x))


class ShardedRMSNorm(RMSNorm):
    """This rank's rows of a whole [B, S, D] input, then RMSNorm: an MTP module's `hnorm`, which gets
    the trunk's gathered pre-norm hidden state and hands the residual layout's shard on."""

    def __init__(self, norm: RMSNorm, layout: _TokenShard):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.layout.shard(x))


class ReduceScatterLinear(Linear):
    """Row-parallel o_proj: this rank's head columns, its partial output reduce-scattered over the
    attention TP group into the residual shard (half the traffic of an all-reduce)."""

    def __init__(self, o_proj: nn.Linear, layout: _TokenShard, slicer: _Slicer):
        tp, t = layout.tp, layout.tp_rank
        cols = o_proj.in_features // tp
        with torch.device("meta"):
            super().__init__(cols, o_proj.out_features, bias=o_proj.bias is not None)
        self.weight = slicer.take(o_proj.weight, [(slice(None), slice(t * cols, (t + 1) * cols))])
        if o_proj.bias is not None:  # added once per group: the other ranks hold zeros
            self.bias = slicer.take(o_proj.bias, [()] if t == 0 else [])
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return reduce_scatter_rows(super().forward(x).reshape(-1, self.out_features), self.layout.group,
                                   self.layout.tp)


def _rows(slicer: _Slicer, linear: nn.Linear, part: int, parts: int, dim: int = 0) -> Linear:
    """A Linear holding the `part`-th 1/parts of `linear` along its output (dim 0) or input (dim 1)."""
    if is_quantized_module(linear):
        return quant_rows(slicer, linear, part, parts, dim)
    w = linear.weight
    size = w.shape[dim] // parts
    mine = slice(part * size, (part + 1) * size)
    with torch.device("meta"):
        new = Linear(w.shape[1] if dim == 0 else size, size if dim == 0 else w.shape[0], bias=linear.bias is not None)
    new.weight = slicer.take(w, [(slice(None),) * dim + (mine,)])
    if linear.bias is not None:  # an input split keeps the whole bias
        new.bias = slicer.take(linear.bias, [(mine,) if dim == 0 else ()])
    return new


def _shard_attention(slicer: _Slicer, attn: Attention, cfg: ModelConfig, layout: _TokenShard) -> Attention:
    tp, t = layout.tp, layout.tp_rank
    local_cfg = cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp, head_dim=cfg.head_size)
    with torch.device("meta"):  # every parameter is replaced below
        new = Attention(local_cfg)
    for name in ("q_proj", "k_proj", "v_proj"):  # column parallel: this rank's heads
        setattr(new, name, _rows(slicer, getattr(attn, name), t, tp))
    row_parallel = ReduceScatterQuantLinear if is_quantized_module(attn.o_proj) else ReduceScatterLinear
    new.o_proj = row_parallel(attn.o_proj, layout, slicer)
    return new


def _h2p(model: nn.Module, plan: H2P, mesh: H2PMesh | None) -> nn.Module:
    if not isinstance(model, PanguProMoEForCausalLM):
        raise ConfigError(f"the H2P plan applies to a PanguProMoEForCausalLM, got {type(model).__name__}")
    cfg = model.config
    blocks = _blocks(model)
    if mesh is None:
        world = dist.get_world_size() if _online() else 1
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
    slicer = _Slicer(model)
    inner = model.model
    vocab = VocabSlice(cfg.vocab_size, mesh.world, mesh.rank)
    tied = model.lm_head.weight is inner.embed_tokens.weight
    embed_weight = slicer.take(inner.embed_tokens.weight, [(vocab.rows,)])
    head_weight = embed_weight if tied else slicer.take(model.lm_head.weight, [(vocab.rows,)])
    inner.embed_tokens = VocabParallelEmbedding(embed_weight, vocab, layout, mesh.world_group)
    model.lm_head = VocabParallelLMHead(head_weight, vocab, layout, mesh.world_group)
    model.gather_hidden = layout.gather  # before the final norms: whole pre-norm hidden states
    for layer in inner.layers:
        _shard_layer(slicer, layer, cfg, layout, mesh, plan, ep)
    for mtp in inner.mtp:  # a decoder layer entered from the whole hidden state, left gathered
        _shard_layer(slicer, mtp, cfg, layout, mesh, plan, ep)
        mtp.hnorm = ShardedRMSNorm(mtp.hnorm, layout)
    return slicer.finish(model)


def _shard_layer(slicer: _Slicer, layer: DecoderLayer, cfg: ModelConfig, layout: _TokenShard, mesh: H2PMesh,
                 plan: H2P, ep: int) -> None:
    """Split one decoder layer (a trunk layer or an MTP module's) in place: gathered input norm,
    this rank's heads, its experts' intermediate slice and its slice of the shared expert."""
    r, expert_rank, expert_tp_rank = mesh.rank, mesh.rank // plan.expert_tp, mesh.rank % plan.expert_tp
    per = cfg.num_experts // ep
    layer.input_layernorm = GatheredRMSNorm(layer.input_layernorm, layout)
    layer.self_attn = _shard_attention(slicer, layer.self_attn, cfg, layout)
    block = layer.mlp
    block.experts = _experts_slice(slicer, block.experts, expert_rank * per, per, plan.expert_tp, expert_tp_rank)
    for shared in block._shared():  # tensor parallel over every rank: partial sums
        shared.gate_proj = _rows(slicer, shared.gate_proj, r, mesh.world)
        shared.up_proj = _rows(slicer, shared.up_proj, r, mesh.world)
        shared.down_proj = _rows(slicer, shared.down_proj, r, mesh.world, dim=1)
    block.dispatcher = AllGatherDispatcher(mesh.world_group, expert_rank * per, per)
