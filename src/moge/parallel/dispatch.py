"""Send each token slot to the rank that owns its expert, and bring the outputs back.

Sender: sort the T*K slots by expert (stable). Experts are placed contiguously, so the sorted rows
are already grouped by destination rank; `all_to_all` with uneven splits moves them. Receiver: runs
its local experts on the rows it got (any kernel), and a second `all_to_all` with the splits swapped
returns the outputs, which the sender combines in token order with the routing weights.

How the receiver learns what it will receive:
  top-K       the per-expert counts are exchanged first (a small all_to_all), since any rank may
              receive anything from 0 to T*K rows; the data exchange waits for it.
  MoGE        with expert groups aligned to ranks every token sends exactly K' slots per group to
              every group's rank: each rank receives tokens x K' x (groups per rank) rows from each
              sender, known in advance, so there is no count exchange before the data; the local
              expert ids travel in a second all_to_all with the same known splits, issued together
              with the data. The senders' token counts come from `tokens_per_rank` (None: every rank
              routes as many tokens as this one, as training micro-batches do; ranks that disagree
              about it would make the transport abort, so callers that cannot promise it pass the
              counts - ExpertParallelMoGEBlock all-gathers one integer per rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moge.nn.experts import combine, permute
from moge.parallel.comm import all_to_all


@dataclass
class Dispatch:
    """What one dispatch produced: the received rows and what the way back needs."""

    x_RD: Tensor  # rows this rank received, in (source rank, expert) order
    local_expert_R: Tensor  # the local expert of each received row
    order_S: Tensor  # this rank's slot order (sorted by expert) for the combine
    send_splits: list[int]
    recv_splits: list[int]
    counts_exchanged: bool

    def load(self) -> "DispatchLoad":
        return DispatchLoad(self.send_splits, self.recv_splits, self.counts_exchanged)


@dataclass(frozen=True)
class DispatchLoad:
    """How many rows one dispatch sent to and received from each rank (no tensors kept)."""

    send_splits: list[int]
    recv_splits: list[int]
    counts_exchanged: bool

    @property
    def received(self) -> int:
        return sum(self.recv_splits)


class ExpertParallelDispatcher:
    """All-to-all dispatch over `group` (ep ranks) for `num_experts` experts placed contiguously.

    `slots_per_rank`: when every token sends exactly this many slots to every rank (MoGE with
    groups aligned to ranks: K' x groups per rank), the receive counts are known and the count
    exchange is skipped; None for routers that give no such guarantee (top-K)."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None, slots_per_rank: int | None = None):
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"expert_parallel={self.ep} must divide num_experts={num_experts}")
        self.num_experts, self.experts_per_rank = num_experts, num_experts // self.ep
        self.slots_per_rank = slots_per_rank

    def dispatch(self, x_TD: Tensor, experts_TK: Tensor, tokens_per_rank: list[int] | None = None) -> Dispatch:
        T = x_TD.shape[0]
        order_S, token_S, counts_E = permute(experts_TK, self.num_experts)
        send_counts = counts_E.view(self.ep, self.experts_per_rank)
        send_splits = send_counts.sum(1).tolist()
        local_S = experts_TK.reshape(-1).index_select(0, order_S) % self.experts_per_rank
        x_SD = x_TD.index_select(0, token_S)
        if self.slots_per_rank is not None:
            per_source = tokens_per_rank if tokens_per_rank is not None else [T] * self.ep
            if len(per_source) != self.ep:
                raise ValueError(f"tokens_per_rank has {len(per_source)} entries; the EP group has {self.ep} ranks")
            expected = [T * self.slots_per_rank] * self.ep
            if send_splits != expected:
                raise RuntimeError(f"routing sent {send_splits} slots per rank, expected {expected}: the router does "
                                   "not put slots_per_rank slots on every rank (is it a grouped router aligned "
                                   "with the ranks?)")
            recv_splits = [t * self.slots_per_rank for t in per_source]
            local_R = local_S.new_empty(sum(recv_splits))
            ids = dist.all_to_all_single(local_R, local_S, recv_splits, send_splits, group=self.group, async_op=True)
            x_RD = all_to_all(x_SD, recv_splits, send_splits, self.group)
            ids.wait()
            return Dispatch(x_RD, local_R, order_S, send_splits, recv_splits, counts_exchanged=False)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # [source rank, local expert]
        recv_splits = recv_counts.sum(1).tolist()
        x_RD = all_to_all(x_SD, recv_splits, send_splits, self.group)
        local_R = torch.arange(self.experts_per_rank, device=x_TD.device).repeat(self.ep) \
            .repeat_interleave(recv_counts.reshape(-1))
        return Dispatch(x_RD, local_R, order_S, send_splits, recv_splits, counts_exchanged=True)

    def combine(self, out_RD: Tensor, d: Dispatch, weights_TK: Tensor) -> Tensor:
        """Return the expert outputs to their senders and sum each token's K slots, weighted."""
        out_SD = all_to_all(out_RD, d.send_splits, d.recv_splits, self.group)
        return combine(out_SD, d.order_S, weights_TK)
