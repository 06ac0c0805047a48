"""Routers: which experts each token uses and with what weight.

The maths are pure functions of fp32 logits/probabilities (testable on their own, Megatron-style);
`Router` is a thin module that owns the gate weight, `router_scale` and the optional
aux-loss-free selection bias, and calls them. Shapes: T tokens, D model dim, N experts, M groups,
K selected experts per token (K' = K/M per group for MoGE).

Nothing here copies device data to the host (no `.item()`, `.tolist()`, `bool(tensor)`, and no
`bincount`, whose output size depends on the data): routing runs inside an accelerator's queue
and traces into one torch.compile graph. The optional finite check branches on data only in
eager CPU runs, where reading a tensor costs no sync (see `check_finite_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.config import MoEConfig


@dataclass
class RoutingResult:
    """Everything losses and metrics need: nothing else has to be recomputed."""

    weights_TK: Tensor  # fp32 combine weights of the chosen experts (router_scale applied)
    experts_TK: Tensor  # int64 expert ids; for the grouped router ordered by group
    # fp32 distribution over all N experts from the unbiased logits, for balance losses and metrics:
    # the softmax (the paper's S), or for group_limited the sigmoid affinities normalised over N
    # (DeepSeek-V3's s')
    probs_TN: Tensor
    logits_TN: Tensor  # fp32 router logits
    group_of_expert_N: Tensor  # int64 group id of every expert

    @property
    def num_experts(self) -> int:
        return self.probs_TN.shape[-1]

    @property
    def num_groups(self) -> int:
        return int(self.group_of_expert_N.max()) + 1


# ---------------------------------------------------------------------------------------------
# Pure routing functions (fp32 in, fp32 weights + int64 ids out)
# ---------------------------------------------------------------------------------------------


def expert_counts(experts_TK: Tensor, num_experts: int) -> Tensor:
    """int64 [N]: how many token slots chose each expert. Like `bincount(minlength=N)`, but its
    size is known without reading the ids, so it needs no host sync and compiles without a break."""
    flat = experts_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                       torch.ones_like(flat))


def check_finite_logits(logits_TN: Tensor) -> None:
    """Refuse NaN/Inf router logits. Eager CPU raises FloatingPointError with a count (reading a
    CPU tensor costs no sync); elsewhere (accelerators, torch.compile) the check is a device-side
    assert (`torch._assert_async`) that fails the step without stalling the host."""
    finite = torch.isfinite(logits_TN)
    if logits_TN.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(finite.all()):
            bad = int((~finite).any(-1).sum())
            raise FloatingPointError(f"router logits are not finite for {bad} of {logits_TN.shape[0]} tokens "
                                     "(NaN/Inf in the hidden states or the gate weight); refusing to route them")
        return
    torch._assert_async(finite.all(), "router logits are not finite (NaN/Inf in the hidden states or the gate "
                                      "weight); refusing to route them")


def _select_scores(scores_TN: Tensor, bias_N: Tensor | None) -> Tensor:
    """Scores used for choosing experts: the aux-loss-free bias moves selection, never weights."""
    return scores_TN if bias_N is None else scores_TN + bias_N


def grouped_topk(probs_TN: Tensor, num_groups: int, k_per_group: int, *, experts_by_group_GE: Tensor | None = None,
                 bias_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """MoGE selection: the top-K' experts inside each of M equal groups (paper section 2, step 3).

    Returns (weights_TK, experts_TK) with K = M*K', group-major. Weights are the given global
    probabilities of the chosen experts (not renormalised). `experts_by_group_GE` lists the
    experts of each group for a non-contiguous assignment; contiguous blocks otherwise.
    """
    T, N = probs_TN.shape
    per = N // num_groups
    sel_TN = _select_scores(probs_TN, bias_N)
    if experts_by_group_GE is None:
        local_TGk = sel_TN.view(T, num_groups, per).topk(k_per_group, dim=-1, sorted=False).indices
        offset_G1 = torch.arange(num_groups, device=probs_TN.device).view(num_groups, 1) * per
        experts_TK = (local_TGk + offset_G1).reshape(T, num_groups * k_per_group)
    else:
        flat = experts_by_group_GE.reshape(-1).to(probs_TN.device)
        local_TGk = sel_TN[:, flat].view(T, num_groups, per).topk(k_per_group, dim=-1, sorted=False).indices
        base_G1 = torch.arange(num_groups, device=probs_TN.device).view(num_groups, 1) * per
        experts_TK = flat[(local_TGk + base_G1).reshape(T, -1)]
    return probs_TN.gather(1, experts_TK), experts_TK


def vote_experts(probs_TN: Tensor, experts_TK: Tensor, num_groups: int, k_per_group: int, num_voted: int, *,
                 experts_by_group_GE: Tensor | None = None,
                 bias_N: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Voted experts (the release's inference code for the Ascend 300I Duo): fewer experts per batch.

    Each of the T tokens has already chosen its K' experts per group (`experts_TK`, from
    `grouped_topk`). Per group, the `num_voted` experts chosen most often over the whole batch are
    kept (ties: the expert listed first in its group, i.e. the lower id for contiguous groups), and
    every token picks its K' experts again inside its group, among the kept ones only, by the same
    selection scores. Weights are the unchanged global-softmax probabilities of the new choices.
    Needs k_per_group <= num_voted <= experts per group; with num_voted = experts per group the
    result equals plain MoGE routing.

    Returns (weights_TK, experts_TK, voted_GV): the new routing (group-major, like grouped_topk)
    and the kept experts of each group, most-voted first.
    """
    T, N = probs_TN.shape
    per = N // num_groups
    if not k_per_group <= num_voted <= per:
        raise ConfigError(f"num_voted={num_voted} is invalid: must be in {k_per_group}..{per} "
                         f"(k_per_group..experts per group)")
    if experts_by_group_GE is None:
        experts_by_group_GE = torch.arange(N, device=probs_TN.device).view(num_groups, per)
    flat = experts_by_group_GE.reshape(-1).to(probs_TN.device)
    counts_GE = expert_counts(experts_TK, N)[flat].view(num_groups, per)
    # stable sort: equal counts keep group order, so ties go to the expert listed first
    voted_local_GV = torch.sort(counts_GE, dim=-1, descending=True, stable=True).indices[:, :num_voted]
    keep_GE = torch.zeros(num_groups, per, dtype=torch.bool, device=probs_TN.device)
    keep_GE.scatter_(1, voted_local_GV, True)
    sel_TGE = _select_scores(probs_TN, bias_N)[:, flat].view(T, num_groups, per)
    sel_TGE = sel_TGE.masked_fill(~keep_GE, float("-inf"))
    local_TGk = sel_TGE.topk(k_per_group, dim=-1, sorted=False).indices
    base_G1 = torch.arange(num_groups, device=probs_TN.device).view(num_groups, 1) * per
    new_TK = flat[(local_TGk + base_G1.unsqueeze(0)).reshape(T, -1)]
    return probs_TN.gather(1, new_TK), new_TK, flat[voted_local_GV + base_G1]


def set_num_voted_experts(model: nn.Module, num_voted: int | None) -> nn.Module:
    """Turn voted experts on (or off with None) in every MoGE router of `model`, in place, e.g. for
    inference with a model trained without voting. Validated like MoEConfig.num_voted_experts."""
    from dataclasses import replace

    model_cfg = getattr(model, "config", None)
    if model_cfg is not None and hasattr(model_cfg, "num_voted_experts"):
        model.config = replace(model_cfg, num_voted_experts=num_voted)
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, MoEConfig):
            module.cfg = replace(cfg, num_voted_experts=num_voted)
    return model


def topk_softmax_of_logits(logits_TN: Tensor, k: int, *, bias_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Conventional MoE, the paper's Eq. 2: softmax over the K largest logits only."""
    experts_TK = _select_scores(logits_TN, bias_N).topk(k, dim=-1).indices
    return torch.softmax(logits_TN.gather(1, experts_TK), dim=-1), experts_TK


def softmax_then_topk(probs_TN: Tensor, k: int, *, bias_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax over all experts, keep the K largest probabilities (optionally renormalised later)."""
    experts_TK = _select_scores(probs_TN, bias_N).topk(k, dim=-1).indices
    return probs_TN.gather(1, experts_TK), experts_TK


def group_limited_topk(logits_TN: Tensor, num_groups: int, topk_groups: int, k: int, *,
                       experts_by_group_GE: Tensor | None = None,
                       bias_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 routing (arXiv 2412.19437, section 2.1.2): sigmoid affinities s = sigmoid(logits);
    selection uses s + bias. Keep the `topk_groups` groups with the largest sum of their top-2 biased
    scores, then the top-K experts by biased score among those groups' experts. Weights are the
    unbiased s of the chosen experts normalised to sum 1 (V3 always normalises; `renormalize` does
    not apply). Limits how many devices a token touches; it does not equalise device load.

    Returns (weights_TK, experts_TK), experts by descending biased score.
    """
    T, N = logits_TN.shape
    per = N // num_groups
    scores_TN = torch.sigmoid(logits_TN)
    sel_TN = _select_scores(scores_TN, bias_N)
    if experts_by_group_GE is None:
        experts_by_group_GE = torch.arange(N, device=logits_TN.device).view(num_groups, per)
    flat = experts_by_group_GE.reshape(-1).to(logits_TN.device)
    sel_TGE = sel_TN[:, flat].view(T, num_groups, per)
    group_score_TG = sel_TGE.topk(min(2, per), dim=-1).values.sum(-1)
    keep_TG = group_score_TG.topk(topk_groups, dim=-1).indices
    mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_TG, True)
    masked_TN = sel_TGE.masked_fill(~mask_TG.unsqueeze(-1), float("-inf")).view(T, N)
    experts_TK = flat[masked_TN.topk(k, dim=-1).indices]
    weights_TK = scores_TN.gather(1, experts_TK)
    return weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20), experts_TK


def sigmoid_affinity_probs(logits_TN: Tensor) -> Tensor:
    """DeepSeek-V3's s'_i: the sigmoid affinities normalised over all N experts, the distribution
    the balance losses of the group_limited router use."""
    scores_TN = torch.sigmoid(logits_TN)
    return scores_TN / scores_TN.sum(-1, keepdim=True).clamp_min(1e-20)


def route(logits_TN: Tensor, cfg: MoEConfig, *, router_scale_1N: Tensor | None = None,
          bias_N: Tensor | None = None, experts_by_group_GE: Tensor | None = None,
          group_of_expert_N: Tensor | None = None) -> RoutingResult:
    """Full routing for one batch from fp32 logits, as the config asks."""
    logits_TN = logits_TN.float()
    if cfg.check_finite:
        check_finite_logits(logits_TN)
    if cfg.router == "group_limited":
        probs_TN = sigmoid_affinity_probs(logits_TN)
    else:
        probs_TN = torch.softmax(logits_TN, dim=-1)
    if cfg.router == "grouped":
        weights_TK, experts_TK = grouped_topk(probs_TN, cfg.num_groups, cfg.top_k_per_group,
                                              experts_by_group_GE=experts_by_group_GE, bias_N=bias_N)
        if cfg.num_voted_experts is not None and cfg.num_voted_experts < cfg.experts_per_group:
            weights_TK, experts_TK, _ = vote_experts(probs_TN, experts_TK, cfg.num_groups, cfg.top_k_per_group,
                                                     cfg.num_voted_experts, experts_by_group_GE=experts_by_group_GE,
                                                     bias_N=bias_N)
    elif cfg.router == "topk":
        weights_TK, experts_TK = topk_softmax_of_logits(logits_TN, cfg.top_k, bias_N=bias_N)
    elif cfg.router == "softmax_topk":
        weights_TK, experts_TK = softmax_then_topk(probs_TN, cfg.top_k, bias_N=bias_N)
    else:
        weights_TK, experts_TK = group_limited_topk(logits_TN, cfg.num_groups, cfg.topk_groups, cfg.top_k,
                                                    experts_by_group_GE=experts_by_group_GE, bias_N=bias_N)
    if cfg.renormalize and cfg.router in ("grouped", "softmax_topk"):  # topk, group_limited: always normalised
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    if router_scale_1N is not None:
        weights_TK = weights_TK * router_scale_1N.float()[0, experts_TK]
    if group_of_expert_N is None:
        group_of_expert_N = torch.tensor(cfg.group_of_expert(), device=logits_TN.device)
    return RoutingResult(weights_TK, experts_TK, probs_TN, logits_TN, group_of_expert_N)


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Gate weight (d x N, no bias) + learned `router_scale` [1, N] (+ optional selection bias).

    Logits are computed in fp32 whatever the model dtype (the release computes the softmax in fp32).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.router_scale = nn.Parameter(torch.ones(1, cfg.num_experts))
        self.register_buffer("group_of_expert", torch.tensor(cfg.group_of_expert()), persistent=False)
        if cfg.expert_to_group is not None:
            order = sorted(range(cfg.num_experts), key=lambda e: (cfg.expert_to_group[e], e))
            self.register_buffer("experts_by_group", torch.tensor(order).view(cfg.num_groups, -1),
                                 persistent=False)
        else:
            self.experts_by_group = None
        if cfg.aux_free_bias:
            # Aux-loss-free balancing (DeepSeek-V3): a selection-only bias, updated outside autograd.
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
            self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        else:
            self.expert_bias = None

    def forward(self, x_TD: Tensor) -> RoutingResult:
        logits_TN = F.linear(x_TD.float(), self.gate.weight.float())
        result = route(logits_TN, self.cfg, router_scale_1N=self.router_scale, bias_N=self.expert_bias,
                       experts_by_group_GE=self.experts_by_group, group_of_expert_N=self.group_of_expert)
        if self.expert_bias is not None and self.training:
            self.tokens_per_expert += expert_counts(result.experts_TK, self.cfg.num_experts).float()
        return result

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3, group: dist.ProcessGroup | None = None) -> None:
        """Once per optimizer step: raise the bias of under-loaded experts, lower over-loaded
        ones (sign update), from the counts since the last call (summed over `group` if given).
        Balances within the unit that competes: inside each group for MoGE, globally otherwise."""
        if self.expert_bias is None:
            raise RuntimeError("update_bias() needs a router built with aux_free_bias=True")
        counts = self.tokens_per_expert.clone()
        if group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(counts, group=group)
        if self.cfg.router == "grouped":
            g = self.group_of_expert
            mean = torch.zeros(self.cfg.num_groups, device=counts.device).index_add_(0, g, counts)
            mean = (mean / self.cfg.experts_per_group)[g]
        else:
            mean = counts.mean()
        self.expert_bias += rate * torch.sign(mean - counts)
        self.tokens_per_expert.zero_()
