"""Collectives that autograd can differentiate, over torch.distributed's own operations.

torch 2.13 deprecates `torch.distributed.nn.functional` and points to a private module, so the
three pairs the expert-parallel layers need are written here, each as its adjoint pair:
all_to_all (backward: all_to_all with the splits swapped), all_gather along dim 0 (backward:
reduce_scatter) and reduce_scatter along dim 0 (backward: all_gather). Plus all_reduce (backward:
identity) and its mirror, `copy_to_group` (forward identity, backward all_reduce) for tensor parallel
regions. Everything runs on gloo (CPU) and nccl (GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; returns the rows received, `out_splits[r]` from
    rank r, in rank order. Splits may be uneven and zero."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def _gather(x: Tensor, group) -> Tensor:
    out = x.new_empty((x.shape[0] * _size(group), *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _scatter(x: Tensor, group) -> Tensor:
    n = _size(group)
    if x.shape[0] % n:
        raise ValueError(f"reduce_scatter needs rows divisible by the group size {n}, got {x.shape[0]}")
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _scatter(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _gather(grad, ctx.group), None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's x along dim 0, in rank order (equal shapes on all ranks)."""
    return _AllGather.apply(x, group)


def reduce_scatter(x: Tensor, group=None) -> Tensor:
    """Sum x over the ranks and keep this rank's 1/n of the rows."""
    return _ReduceScatter.apply(x, group)


def all_reduce(x: Tensor, group=None) -> Tensor:
    """Sum over the ranks; the gradient passes through unchanged (each rank owns a partial sum)."""
    return _AllReduce.apply(x, group)


def copy_to_group(x: Tensor, group=None) -> Tensor:
    """Identity forward; the gradient is summed over the ranks that consumed the same x."""
    return _CopyToGroup.apply(x, group)
