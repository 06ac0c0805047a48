"""Balancing losses for the router: the paper's auxiliary loss (micro-batch, global-batch and
per-group forms) and the z-loss. Pure functions of routing outputs; the caller adds them to its
objective. Shapes: T tokens, N experts, K selected slots per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def aux_loss_from_counts(probs_TN: Tensor, counts_N: Tensor, num_tokens: float, top_k: int,
                         alpha: float = 1.0) -> Tensor:
    """l_aux = alpha * sum_i f_i * p_i with f_i = N/(K*|B|) * count_i (the paper's Eq. for l_aux).

    `counts_N`/`num_tokens` may come from a larger batch than `probs_TN` (global-batch scope);
    p_i is the mean of the global softmax over the tokens given here, and carries the gradient.
    """
    N = probs_TN.shape[-1]
    f_N = counts_N.float() * (N / (top_k * float(num_tokens)))
    p_N = probs_TN.float().mean(0)
    return alpha * (f_N.detach() * p_N).sum()


def aux_loss(probs_TN: Tensor, experts_TK: Tensor, alpha: float = 1.0) -> Tensor:
    """Micro-batch auxiliary loss on the global softmax; equals alpha under perfect balance."""
    T, K = experts_TK.shape
    counts_N = torch.bincount(experts_TK.reshape(-1), minlength=probs_TN.shape[-1])
    return aux_loss_from_counts(probs_TN, counts_N, T, K, alpha)


def local_group_aux_loss(logits_TN: Tensor, experts_TK: Tensor, group_of_expert_N: Tensor,
                         alpha: float = 1.0) -> Tensor:
    """The paper's ablation: the same loss computed inside every group on a per-group softmax
    and per-group counts, averaged over the M groups (so it also equals alpha when balanced)."""
    T, K = experts_TK.shape
    N = logits_TN.shape[-1]
    M = int(group_of_expert_N.max()) + 1
    per, k_per = N // M, K // M
    order_N = torch.argsort(group_of_expert_N * N + torch.arange(N, device=logits_TN.device))
    local_TGE = torch.softmax(logits_TN.float()[:, order_N].view(T, M, per), dim=-1)
    counts_N = torch.bincount(experts_TK.reshape(-1), minlength=N).float()[order_N].view(M, per)
    f_GE = counts_N * (per / (k_per * T))
    p_GE = local_TGE.mean(0)
    return alpha * (f_GE.detach() * p_GE).sum() / M


def z_loss(logits_TN: Tensor, coef: float = 1.0) -> Tensor:
    """Router z-loss (ST-MoE): coef * mean_t logsumexp(logits_t)^2, keeps logits small."""
    return coef * torch.logsumexp(logits_TN.float(), dim=-1).square().mean()


class GlobalBatchAuxLoss:
    """The aux loss with f_i counted over the whole global batch rather than one micro-batch.

    Counts are summed over the data-parallel `group` (all_reduce) and accumulated over the
    gradient-accumulation micro-batches since the last `reset()` (call it after each optimizer
    step). On the last micro-batch f_i is exactly the global batch's; earlier micro-batches use the
    running total, the usual practice since f is not known until every micro-batch has routed.
    p_i is the current micro-batch's, which carries the gradient. One object serves every layer.
    """

    def __init__(self, top_k: int, alpha: float = 1.0, group: dist.ProcessGroup | None = None):
        self.top_k, self.alpha, self.group = top_k, alpha, group
        self.counts: dict[int, Tensor] = {}
        self.tokens: dict[int, float] = {}

    def __call__(self, probs_TN: Tensor, experts_TK: Tensor, layer: int = 0) -> Tensor:
        N = probs_TN.shape[-1]
        counts_N = torch.bincount(experts_TK.reshape(-1), minlength=N).double()
        stats = torch.cat([counts_N, torch.tensor([float(experts_TK.shape[0])], dtype=torch.float64,
                                                  device=counts_N.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, group=self.group)
        self.counts[layer] = self.counts.get(layer, 0) + stats[:N]
        self.tokens[layer] = self.tokens.get(layer, 0.0) + float(stats[N])
        return aux_loss_from_counts(probs_TN, self.counts[layer], self.tokens[layer], self.top_k, self.alpha)

    def reset(self) -> None:
        self.counts.clear()
        self.tokens.clear()
