"""MoGEBlock: router -> dispatcher -> experts -> combine, plus the always-on shared expert(s).

A drop-in replacement for a transformer MLP: input [..., D], output [..., D]. With
`router="grouped"` (the default) it is the paper's MoGE layer; the same block runs the
conventional top-K and group-limited routers for comparisons. Dropless: every token slot is
computed, no capacity factor.

The split follows Megatron-Core: the router decides, a token dispatcher moves token slots to the
experts and the outputs back, the experts compute. The dispatcher is a plain component, not a
module (it holds no parameters and leaves the state dict alone). `LocalDispatcher` keeps
everything on this process; a parallel plan (`moge.parallel.parallelize`) installs another one
(expert-parallel all-to-all, the H2P all-gather layout) without changing this block's forward.
A dispatcher has three steps:

    gather(x_TD)                    the tokens this block routes (H2P: every rank's)
    __call__(x_TD, routing, experts)  the routed experts' output (H2P: this rank's partial sum)
    scatter(y_TD)                   this rank's rows of the block output (H2P: one reduce-scatter
                                    of routed + shared partial sums)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.config import MoEConfig
from moge.nn.experts import SwiGLUExperts, linear
from moge.nn.routing import Router, RoutingResult


class LocalDispatcher:
    """Every expert on this process: SwiGLUExperts permutes the token slots by expert, runs its
    kernel and combines the outputs in token order itself (including its inference shortcuts)."""

    def gather(self, x_TD: Tensor) -> Tensor:
        return x_TD

    def __call__(self, x_TD: Tensor, routing: RoutingResult, experts: nn.Module) -> Tensor:
        return experts(x_TD, routing.experts_TK, routing.weights_TK)

    def scatter(self, y_TD: Tensor) -> Tensor:
        return y_TD


class Linear(nn.Linear):
    """nn.Linear (same parameters, same module hooks) whose few-row products, as in decoding, run
    through `moge.nn.experts.linear`: on CPU the weight streams on every thread."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SharedExpert(SwiGLU):
    """Always-on expert. Un-gated (plain sum) as in Pangu Pro MoE, or sigmoid-gated per token as in
    Qwen2-MoE when `gated`."""

    def __init__(self, hidden_size: int, intermediate_size: int, gated: bool = False):
        super().__init__(hidden_size, intermediate_size)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class MoGEBlock(nn.Module):
    """Mixture of (Grouped) Experts block. `forward(x, return_routing=True)` also returns the
    RoutingResult, which is all the aux losses and load metrics need."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = SwiGLUExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.backend)
        shared = [SharedExpert(cfg.hidden_size, w, cfg.shared_expert_gate) for w in cfg.shared_expert_sizes]
        # One shared expert is stored as `shared_expert` (the release's key names), several as a list.
        if len(shared) == 1:
            self.shared_expert = shared[0]
        elif shared:
            self.shared_experts = nn.ModuleList(shared)
        self.dispatcher = LocalDispatcher()  # swapped by moge.parallel.parallelize

    def _shared(self) -> list[nn.Module]:
        if hasattr(self, "shared_expert"):
            return [self.shared_expert]
        return list(getattr(self, "shared_experts", []))

    def forward(self, x: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, RoutingResult]:
        if x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"input last dim={x.shape[-1]} does not match hidden_size={self.cfg.hidden_size}")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.cfg.hidden_size)
        x_TD = self.dispatcher.gather(x_TD)
        routing = self.router(x_TD)
        y_TD = self.dispatcher(x_TD, routing, self.experts)
        for expert in self._shared():
            y_TD = y_TD + expert(x_TD)
        y = self.dispatcher.scatter(y_TD).view(*lead, self.cfg.hidden_size)
        return (y, routing) if return_routing else y
