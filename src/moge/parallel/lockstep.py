"""Decoding in lockstep across ranks: the ranks of a parallel model must run every forward together,
so a rank whose rows are all done keeps stepping until every rank's are (its extra tokens are
discarded). `generate(..., all_done=all_ranks_done)` uses this under torch.distributed;
speculative decoding also agrees per step on how many drafts to verify and keep
(`speculative_generate(..., all_done=all_ranks_done, agree_min=min_over_ranks)`)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_ranks_done(done: bool) -> bool:
    """True when `done` is true on every rank of the default group (just `done` without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return done
    from moge.parallel.launch import comm_device

    flag = torch.tensor([1.0 if done else 0.0], device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def min_over_ranks(value: int) -> int:
    """The smallest `value` over the ranks of the default group (just `value` without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    from moge.parallel.launch import comm_device

    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def share_from_rank0(obj: object = None) -> object:
    """Rank 0's `obj` on every rank of the default group (pickled; the others pass nothing). The
    serving engine hands each step's batch to the ranks that follow it this way."""
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
