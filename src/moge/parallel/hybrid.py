"""The paper's H2P hybrid inference layout (Pangu Pro MoE, arXiv 2505.21411, section on inference).

On W ranks: attention is data parallel x tensor parallel (DP = W / attn_tp, heads split over attn_tp
ranks), the routed experts are tensor parallel x expert parallel (EP = W / expert_tp: expert groups
placed contiguously on EP ranks, each expert's intermediate dim split over expert_tp ranks) and the
shared expert is tensor parallel over all W ranks. The paper's 8-chip layout is attn_tp=4 (DP2 x TP4),
expert_tp=2 (TP2 x EP4), shared TP8.

Communication per layer, as the paper rewrites it (T = tokens of one DP group, rank r = d*attn_tp + t):

    residual h: each rank keeps 1/attn_tp of its DP group's tokens (rows t*T/tp ...)
    attention   RMSNorm on the shard -> all-gather over the attention TP group (the all-gather moved
                after the norm) -> local heads -> reduce-scatter over the TP group (instead of an
                all-reduce: half the data) -> residual add on the shard
    MoE         RMSNorm on the shard -> all-gather over all W ranks (every rank sees every token) ->
                router (replicated) -> this rank's experts and F-slice, shared expert F-slice: partial
                sums -> one global reduce-scatter: rank r gets exactly its shard of the sum, which is
                the layout the next layer's attention starts from (so the paper's "local all-gather
                over the attention TP group" is the next layer's first step)

No all_to_all: every rank sees all tokens, so routed experts cost the same on every rank when the
routing is balanced - which MoGE guarantees for the expert-parallel split. Token counts must be equal
on all DP groups (pad the batch); they are padded internally to a multiple of attn_tp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moge.config import ModelConfig, divisors
from moge.nn.model import Attention, KVCache, ModelOutput, PanguProMoEForCausalLM, attention_inputs
from moge.parallel.comm import all_gather, reduce_scatter


@dataclass(frozen=True)
class HybridLayout:
    """Attention TP size and routed-expert TP size over `world` ranks (the rest follows)."""

    world: int
    attn_tp: int
    expert_tp: int

    @property
    def expert_ep(self) -> int:
        return self.world // self.expert_tp

    def check(self, cfg: ModelConfig) -> None:
        """Clear errors for layouts this model cannot take."""
        w = self.world
        for name, size in (("attn_tp", self.attn_tp), ("expert_tp", self.expert_tp)):
            if not isinstance(size, int) or size < 1 or w % size:
                raise ValueError(f"{name}={size!r} must divide the world size {w} (valid: {divisors(w)})")
        for field, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads)):
            if n % self.attn_tp:
                raise ValueError(f"attn_tp={self.attn_tp} must divide {field}={n} (valid: {divisors(n)})")
        if not cfg.is_moe:
            raise ValueError("the H2P layout needs a model with routed experts (num_experts > 0)")
        if cfg.expert_intermediate_size % self.expert_tp:
            raise ValueError(f"expert_tp={self.expert_tp} must divide expert_intermediate_size="
                             f"{cfg.expert_intermediate_size} (valid: {divisors(cfg.expert_intermediate_size)})")
        if cfg.num_experts % self.expert_ep:
            raise ValueError(f"world/expert_tp={self.expert_ep} expert-parallel ranks must divide num_experts="
                             f"{cfg.num_experts}")
        if cfg.router in ("grouped", "group_limited") and cfg.num_groups % self.expert_ep:
            raise ValueError(f"world/expert_tp={self.expert_ep} expert-parallel ranks must divide num_groups="
                             f"{cfg.num_groups} so each rank owns whole groups (valid expert_tp: "
                             f"{[w // e for e in divisors(cfg.num_groups) if w % e == 0]})")
        if cfg.shared_expert_intermediate_size <= 0:
            raise ValueError("the H2P layout splits the shared expert over all ranks: this model has none "
                             "(shared_expert_intermediate_size=0)")
        if cfg.shared_expert_intermediate_size % w:
            raise ValueError(f"the shared expert is split over all {w} ranks: world size must divide "
                             f"shared_expert_intermediate_size={cfg.shared_expert_intermediate_size}")


def _rows(t: Tensor, index: int, parts: int, dim: int = 0) -> Tensor:
    size = t.shape[dim] // parts
    return t.narrow(dim, index * size, size).clone()


class _HybridLayer(nn.Module):
    def __init__(self, layer: nn.Module, cfg: ModelConfig, layout: HybridLayout, rank: int):
        super().__init__()
        tp, t = layout.attn_tp, rank % layout.attn_tp
        hd = cfg.head_size
        local_cfg = cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp, head_dim=hd)
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        attn = layer.self_attn
        self.self_attn = Attention(local_cfg)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):  # column parallel: this rank's heads
                src, dst = getattr(attn, name), getattr(self.self_attn, name)
                dst.weight.copy_(_rows(src.weight, t, tp))
                if src.bias is not None:
                    dst.bias.copy_(_rows(src.bias, t, tp))
            o = self.self_attn.o_proj  # row parallel: this rank's head columns; the bias once per group
            o.weight.copy_(_rows(attn.o_proj.weight, t, tp, dim=1))
            if o.bias is not None:
                o.bias.copy_(attn.o_proj.bias if t == 0 else torch.zeros_like(attn.o_proj.bias))
        mlp = layer.mlp
        self.router = mlp.router
        ep, et = rank // layout.expert_tp, rank % layout.expert_tp
        per = cfg.num_experts // layout.expert_ep
        self.expert_lo = ep * per
        f = cfg.expert_intermediate_size
        gate_up = mlp.experts.gate_up_proj[self.expert_lo:self.expert_lo + per]
        gate, up = gate_up[:, :f], gate_up[:, f:]
        self.gate_up_proj = nn.Parameter(torch.cat([_rows(gate, et, layout.expert_tp, 1),
                                                    _rows(up, et, layout.expert_tp, 1)], dim=1))
        self.down_proj = nn.Parameter(_rows(mlp.experts.down_proj[self.expert_lo:self.expert_lo + per], et,
                                            layout.expert_tp, 2))
        shared = mlp.shared_expert
        self.shared_gate = nn.Parameter(_rows(shared.gate_proj.weight, rank, layout.world))
        self.shared_up = nn.Parameter(_rows(shared.up_proj.weight, rank, layout.world))
        self.shared_down = nn.Parameter(_rows(shared.down_proj.weight, rank, layout.world, dim=1))

    def moe_partial(self, x_TD: Tensor) -> Tensor:
        """This rank's part of the MoE output for every token: its experts' F-slices, weighted, plus its
        slice of the shared expert. Summed over all ranks it is the whole MoE output."""
        routing = self.router(x_TD)
        T, K = routing.experts_TK.shape
        e_R = routing.experts_TK.reshape(-1) - self.expert_lo
        keep = (e_R >= 0) & (e_R < self.gate_up_proj.shape[0])
        token_R = torch.arange(T, device=x_TD.device).repeat_interleave(K)[keep]
        e_R, w_R = e_R[keep], routing.weights_TK.reshape(-1)[keep]
        y_TD = torch.zeros_like(x_TD)
        for e in torch.unique(e_R).tolist():  # ascending: deterministic
            rows = (e_R == e).nonzero().squeeze(1)
            tokens = token_R[rows]
            h = x_TD.index_select(0, tokens) @ self.gate_up_proj[e].t()
            gate, up = h.chunk(2, dim=-1)
            out = (F.silu(gate) * up) @ self.down_proj[e].t()
            y_TD.index_add_(0, tokens, out * w_R[rows, None].to(out.dtype))
        shared = (F.silu(x_TD @ self.shared_gate.t()) * (x_TD @ self.shared_up.t())) @ self.shared_down.t()
        return y_TD + shared


class HybridModel(nn.Module):
    """One rank's share of a Pangu Pro MoE model in the H2P layout. Build it on every rank from the same
    whole model; `forward` takes this rank's DP group's batch (the same on the attn_tp ranks of a
    group) and returns its logits, equal to the single-process model's."""

    def __init__(self, model: PanguProMoEForCausalLM, layout: HybridLayout, rank: int | None = None,
                 attn_group: dist.ProcessGroup | None = None):
        super().__init__()
        cfg = model.config
        layout.check(cfg)
        self.config, self.layout = cfg, layout
        self.rank = dist.get_rank() if rank is None else rank
        self.attn_group = attn_group
        self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(_HybridLayer(layer, cfg, layout, self.rank) for layer in model.model.layers)
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    @classmethod
    def build(cls, model: PanguProMoEForCausalLM, attn_tp: int, expert_tp: int) -> "HybridModel":
        """Create the attention TP groups (collective: every rank calls it with the same sizes)."""
        from moge.parallel.launch import group_timeout

        world = dist.get_world_size()
        layout = HybridLayout(world, attn_tp, expert_tp)
        layout.check(model.config)
        groups = [list(range(s, s + attn_tp)) for s in range(0, world, attn_tp)]
        attn_group, _ = dist.new_subgroups_by_enumeration(groups, timeout=group_timeout())
        return cls(model, layout, dist.get_rank(), attn_group)

    def allocate_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> KVCache:
        """A KV cache for this rank's heads of its DP group's batch."""
        cfg = self.config
        local = cfg.replace(num_heads=cfg.num_heads // self.layout.attn_tp,
                            num_kv_heads=cfg.num_kv_heads // self.layout.attn_tp, head_dim=cfg.head_size)
        return KVCache.allocate(local, batch, max_len, dtype)

    def _shard(self, x_TD: Tensor) -> Tensor:
        """This rank's rows of its DP group's tokens (padded to a multiple of attn_tp)."""
        return self._pad(x_TD).chunk(self.layout.attn_tp)[self.rank % self.layout.attn_tp]

    def _gather_group(self, shard: Tensor, T: int) -> Tensor:
        return all_gather(shard, self.attn_group)[:T]

    def forward(self, input_ids: Tensor, *, positions: Tensor | None = None, cache: KVCache | None = None,
                attention_mask: Tensor | None = None, logits_slice: slice | None = None) -> ModelOutput:
        cfg = self.config
        B, S = input_ids.shape
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1} (vocab_size={cfg.vocab_size})")
        past, valid_BT, mask, cos, sin = attention_inputs(cfg, B, S, positions, cache, attention_mask,
                                                          input_ids.device)
        T, D = B * S, cfg.hidden_size
        h = self._shard(self.embed_tokens(input_ids).reshape(T, D))
        for i, layer in enumerate(self.layers):
            x = self._gather_group(layer.input_layernorm(h), T).view(B, S, D)
            attn = layer.self_attn(x, cos, sin, mask, i, cache).reshape(T, D)
            h = h + reduce_scatter(self._pad(attn), self.attn_group)
            everyone = all_gather(layer.post_attention_layernorm(h))  # every DP group's tokens
            h = h + reduce_scatter(layer.moe_partial(everyone))
        if cache is not None:
            cache.advance(S, valid_BT[:, past:])
        out = self._gather_group(self.norm(h), T).view(B, S, D)
        if logits_slice is not None:
            out = out[:, logits_slice]
        return ModelOutput(self.lm_head(out).float(), None, out)

    def _pad(self, x_TD: Tensor) -> Tensor:
        pad = (-x_TD.shape[0]) % self.layout.attn_tp
        return torch.cat([x_TD, x_TD.new_zeros(pad, x_TD.shape[1])]) if pad else x_TD
