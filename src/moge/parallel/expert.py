"""The expert-parallel MoGE block, and sharding a whole model in place (and gathering it back).

An expert-parallel rank keeps the router and the shared expert whole (they are small and every
token needs them) and 1/ep of the routed experts. Parameter names stay those of the single-process
model (`model.layers.3.mlp.experts.gate_up_proj` is this rank's [N/ep, 2F, D] slice), so a sharded
state dict maps to the full one by concatenating the expert tensors over the EP group in rank order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moge.nn.experts import SwiGLUExperts
from moge.nn.moe import MoGEBlock
from moge.parallel.dispatch import ExpertParallelDispatcher
from moge.parallel.mesh import ExpertParallelMesh, check_expert_parallel
from moge.nn.routing import RoutingResult

EXPERT_KEY = ".mlp.experts."


def is_expert_param(name: str) -> bool:
    """Sharded over the EP group (routed expert weights) rather than replicated on every rank."""
    return EXPERT_KEY in f".{name}"


class ExpertParallelMoGEBlock(MoGEBlock):
    """A MoGEBlock whose routed experts are spread over the EP group (same maths, same outputs; a
    MoGEBlock wherever the model asks).

    Built from a whole block: the router and shared expert are taken over, the routed experts are
    sliced to this rank's share.

    The MoGE dispatcher needs every rank's token count to size its receive buffer. With
    `same_tokens_per_rank=True` (training: every rank's micro-batch has the same shape) it takes its
    own count for everybody's and nothing is exchanged before the data; otherwise the ranks first
    all-gather one integer each (batches of any size, e.g. generation), still no per-expert counts."""

    def __init__(self, block: MoGEBlock, mesh: ExpertParallelMesh, same_tokens_per_rank: bool = False):
        nn.Module.__init__(self)  # not MoGEBlock's: that would allocate all the experts
        cfg = block.cfg
        check_expert_parallel(cfg, mesh.ep)
        self.cfg, self.mesh = cfg, mesh
        self.router = block.router
        local = mesh.expert_range(cfg.num_experts)
        self.experts = SwiGLUExperts(len(local), cfg.hidden_size, cfg.expert_intermediate_size, cfg.backend)
        self.experts.to(device=block.experts.gate_up_proj.device, dtype=block.experts.gate_up_proj.dtype)
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(block.experts.gate_up_proj[local.start:local.stop])
            self.experts.down_proj.copy_(block.experts.down_proj[local.start:local.stop])
        for name in ("shared_expert", "shared_experts"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))
        known = cfg.top_k_per_group * (cfg.num_groups // mesh.ep) if cfg.router == "grouped" else None
        self.dispatcher = ExpertParallelDispatcher(cfg.num_experts, mesh.ep_group, known)
        self.same_tokens_per_rank = same_tokens_per_rank
        self.last_dispatch = None  # DispatchLoad of the latest forward: rows sent/received per rank

    def _tokens_per_rank(self, x_TD: Tensor) -> list[int] | None:
        if self.same_tokens_per_rank or self.dispatcher.slots_per_rank is None or self.mesh.ep == 1:
            return None
        mine = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=x_TD.device)
        everyone = mine.new_empty(self.mesh.ep)
        dist.all_gather_single(everyone, mine, group=self.mesh.ep_group)
        return everyone.tolist()

    def forward(self, x: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, RoutingResult]:
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.cfg.hidden_size)
        routing = self.router(x_TD)
        d = self.dispatcher.dispatch(x_TD, routing.experts_TK, self._tokens_per_rank(x_TD))
        ones_R1 = torch.ones(d.x_RD.shape[0], 1, device=x.device)
        out_RD = self.experts(d.x_RD, d.local_expert_R.unsqueeze(1), ones_R1)
        y_TD = self.dispatcher.combine(out_RD, d, routing.weights_TK)
        self.last_dispatch = d.load()
        for expert in self._shared():
            y_TD = y_TD + expert(x_TD)
        y = y_TD.view(*lead, self.cfg.hidden_size)
        return (y, routing) if return_routing else y


def shard_model(model: nn.Module, mesh: ExpertParallelMesh, same_tokens_per_rank: bool = False) -> nn.Module:
    """Replace every MoGEBlock of `model` (a whole, identical copy on every rank) by its
    expert-parallel version, in place; the full expert tensors are freed. Returns the model.
    `same_tokens_per_rank`: every forward gets the same number of tokens on every rank (see
    ExpertParallelMoGEBlock)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoGEBlock) and not isinstance(child, ExpertParallelMoGEBlock):
                setattr(module, name, ExpertParallelMoGEBlock(child, mesh, same_tokens_per_rank))
    return model


def shard_state_dict(full: Mapping[str, Tensor], mesh: ExpertParallelMesh) -> dict[str, Tensor]:
    """This rank's part of a whole-model state dict (expert tensors sliced along dim 0)."""
    out = {}
    for name, t in full.items():
        if is_expert_param(name):
            if t.shape[0] % mesh.ep:
                raise ValueError(f"{name} has {t.shape[0]} experts, not divisible by expert_parallel={mesh.ep}")
            mine = mesh.expert_range(t.shape[0])
            out[name] = t[mine.start:mine.stop]
        else:
            out[name] = t
    return out


def gather_expert_tensor(t: Tensor, mesh: ExpertParallelMesh) -> Tensor:
    """Concatenate this rank's expert shard with the other EP ranks' (in rank order)."""
    if mesh.ep == 1:
        return t
    out = t.new_empty((t.shape[0] * mesh.ep, *t.shape[1:]))
    dist.all_gather_single(out, t.contiguous(), group=mesh.ep_group)
    return out


def full_state_dict(model: nn.Module, mesh: ExpertParallelMesh | None) -> dict[str, Tensor]:
    """The whole model's state dict (as a single process would have it), on every rank of the EP
    group. Collective: all ranks must call it."""
    state = model.state_dict()
    if mesh is None:
        return state
    return {name: gather_expert_tensor(t, mesh) if is_expert_param(name) else t for name, t in state.items()}
