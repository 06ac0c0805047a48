"""Data x expert parallel training: gradient reduction and the global gradient norm.

Each rank's loss is the mean over its own tokens; the objective is the mean over the W ranks.
After backward, a replicated parameter holds d(loss_r)/dp on rank r, so the gradient is the
average over all W ranks. A routed expert on EP rank e already holds the sum over the ranks of its EP
group (the all_to_all backward brought their gradients to it), so it is summed over its replicas
(the ranks with the same EP rank) and divided by W. Reductions are bucketed: one all_reduce for
all replicated gradients, one for all expert gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moge.parallel.expert import is_expert_param
from moge.parallel.mesh import ExpertParallelMesh


def _bucket_all_reduce(grads: list[Tensor], group, scale: float) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def reduce_gradients(model: nn.Module, mesh: ExpertParallelMesh) -> None:
    """Average gradients over the data-parallel world: replicated parameters over all ranks,
    expert shards over their replicas (see the module docstring). Missing gradients count as 0."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) else dense).append(p.grad)
    _bucket_all_reduce(dense, None, 1.0 / mesh.world)
    if mesh.replicas > 1:
        _bucket_all_reduce(expert, mesh.replica_group, 1.0 / mesh.world)
    else:
        for g in expert:
            g.mul_(1.0 / mesh.world)


@torch.no_grad()
def clip_grad_norm(named_params: Iterable[tuple[str, nn.Parameter]], max_norm: float,
                   mesh: ExpertParallelMesh | None) -> Tensor:
    """Clip by the norm of the whole model's gradient (expert shards counted once each), which
    equals the single-process norm. Call after `reduce_gradients`. Returns the norm."""
    params = [(n, p) for n, p in named_params if p.grad is not None]
    if mesh is None:
        return torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm)
    sq = torch.zeros(2, dtype=torch.float64, device=params[0][1].grad.device if params else "cpu")
    for name, p in params:
        sq[1 if is_expert_param(name) else 0] += p.grad.double().pow(2).sum()
    if mesh.ep > 1:
        expert_sq = sq[1:].clone()
        dist.all_reduce(expert_sq, group=mesh.ep_group)
        sq[1] = expert_sq[0]
    norm = sq.sum().sqrt()
    if math.isfinite(float(norm)):
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1:
            for _, p in params:
                p.grad.mul_(coef)
    return norm.float()
