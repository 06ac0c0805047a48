"""The collectives the dispatchers and the H2P modules use: torch's functional collectives, which
autograd differentiates (all_to_all's backward is all_to_all with the splits swapped, all_gather's is
reduce_scatter and the other way round). These wrappers only wait for the result, so callers get a
plain tensor, and fix dim 0 as the split dimension. Nothing here is hand-written: torch has every
collective this package needs. Everything runs on gloo (CPU) and nccl (GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group  # functional collectives want it named


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; returns the rows received, `out_splits[r]` from
    rank r, in rank order. Splits may be uneven and zero."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), list(out_splits), list(in_splits),
                                                                _group(group)))


def all_gather(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's x concatenated along dim 0, in rank order (equal shapes on all ranks)."""
    return funcol.wait_tensor(funcol.all_gather_single_autograd(x.contiguous(), 0, _group(group)))


def reduce_scatter(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """x summed over the ranks; this rank keeps its 1/n of the rows (rank order)."""
    n = dist.get_world_size(group)
    if x.shape[0] % n:
        raise ValueError(f"reduce_scatter needs rows divisible by the group size {n}, got {x.shape[0]}")
    return funcol.wait_tensor(funcol.reduce_scatter_single_autograd(x.contiguous(), "sum", 0, _group(group)))


def reduce_scatter_rows(x_TD: Tensor, group: dist.ProcessGroup | None, parts: int) -> Tensor:
    """Rows zero-padded to a multiple of `parts` (the group's size), then reduce-scattered: this rank's
    1/parts of the summed rows, as H2P's token shard lays them out. Identity for one part."""
    if parts == 1:
        return x_TD
    pad = (-x_TD.shape[0]) % parts
    if pad:
        x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, x_TD.shape[1])])
    return reduce_scatter(x_TD, group)
