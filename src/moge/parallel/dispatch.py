"""Token dispatchers for the MoE block under a parallel plan (see moge.nn.moe for the protocol:
gather -> call -> scatter). `LocalDispatcher` (moge.nn.moe) is the single-process one.

AllToAllDispatcher (expert parallel). Sender: sort the T*K slots by expert (stable). Experts are
placed contiguously, so the sorted rows are already grouped by destination rank; an all_to_all with
uneven splits moves them. Receiver: runs its local experts on the rows it got (any kernel), and a
second all_to_all with the splits swapped returns the outputs, which the sender combines in token
order with the routing weights.

How the receiver learns what it will receive:
  top-K       the per-expert counts are exchanged first (a small all_to_all), since any rank may
              receive anything from 0 to T*K rows; the data exchange waits for it.
  MoGE        with expert groups aligned to ranks every token sends exactly K' slots per group to
              every group's rank: each rank receives tokens x K' x (groups per rank) rows from each
              sender, known in advance, so there is no count exchange before the data (and the send
              splits need no look at the routing); the local expert ids travel in a second
              all_to_all with the same known splits, issued together with the data. The senders'
              token counts: with `same_tokens_per_rank` every rank routes as many tokens as this one
              (training micro-batches), otherwise one integer per rank is all-gathered (generation).

AllGatherDispatcher (H2P: experts TP x EP). Every rank sees every rank's tokens (one all-gather),
runs its own experts' slice of the intermediate dimension on the slots routed to them, and the
partial sums of all ranks (routed and shared expert) meet in one reduce-scatter that leaves each rank
its own rows. No all_to_all, and MoGE makes every rank's expert work equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.nn.experts import combine, permute
from moge.nn.routing import RoutingResult
from moge.parallel.comm import all_gather, all_to_all, reduce_scatter


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


class AllToAllDispatcher:
    """All-to-all dispatch over `group` (ep ranks) for `num_experts` experts placed contiguously.

    `slots_per_rank`: when every token sends exactly this many slots to every rank (MoGE with
    groups aligned to ranks: K' x groups per rank), the receive counts are known and the count
    exchange is skipped; None for routers that give no such guarantee (top-K).
    `last_dispatch` is the DispatchLoad of the latest call (rows sent/received per rank)."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None, slots_per_rank: int | None = None,
                 same_tokens_per_rank: bool = False):
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ConfigError(f"expert_parallel={self.ep} is invalid: must divide num_experts={num_experts}")
        self.num_experts, self.experts_per_rank = num_experts, num_experts // self.ep
        self.slots_per_rank = slots_per_rank
        self.same_tokens_per_rank = same_tokens_per_rank
        self.last_dispatch: DispatchLoad | None = None

    def gather(self, x_TD: Tensor) -> Tensor:
        return x_TD

    def scatter(self, y_TD: Tensor) -> Tensor:
        return y_TD

    def __call__(self, x_TD: Tensor, routing: RoutingResult, experts: nn.Module) -> Tensor:
        d = self.dispatch(x_TD, routing.experts_TK, self._tokens_per_rank(x_TD))
        ones_R1 = torch.ones(d.x_RD.shape[0], 1, device=x_TD.device)
        out_RD = experts(d.x_RD, d.local_expert_R.unsqueeze(1), ones_R1)
        self.last_dispatch = d.load()
        return self.combine(out_RD, d, routing.weights_TK)

    def _tokens_per_rank(self, x_TD: Tensor) -> list[int] | None:
        if self.same_tokens_per_rank or self.slots_per_rank is None or self.ep == 1:
            return None
        mine = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=x_TD.device)
        everyone = mine.new_empty(self.ep)
        dist.all_gather_into_tensor(everyone, mine, group=self.group)
        return everyone.tolist()

    def dispatch(self, x_TD: Tensor, experts_TK: Tensor, tokens_per_rank: list[int] | None = None) -> Dispatch:
        T = x_TD.shape[0]
        order_S, token_S, counts_E = permute(experts_TK, self.num_experts)
        local_S = experts_TK.reshape(-1).index_select(0, order_S) % self.experts_per_rank
        x_SD = x_TD.index_select(0, token_S)
        if self.slots_per_rank is not None:
            per_source = tokens_per_rank if tokens_per_rank is not None else [T] * self.ep
            if len(per_source) != self.ep:
                raise ConfigError(f"tokens_per_rank has {len(per_source)} entries; the EP group has {self.ep} ranks")
            send_splits = [T * self.slots_per_rank] * self.ep  # known: no look at the routing
            recv_splits = [t * self.slots_per_rank for t in per_source]
            local_R = local_S.new_empty(sum(recv_splits))
            ids = dist.all_to_all_single(local_R, local_S, recv_splits, send_splits, group=self.group, async_op=True)
            x_RD = all_to_all(x_SD, recv_splits, send_splits, self.group)
            ids.wait()
            return Dispatch(x_RD, local_R, order_S, send_splits, recv_splits, counts_exchanged=False)
        send_counts = counts_E.view(self.ep, self.experts_per_rank)
        send_splits = send_counts.sum(1).tolist()
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


class AllGatherDispatcher:
    """H2P: tokens all-gathered over `group` (every rank), this rank's experts [first, first + n)
    run on the slots routed to them (the experts module holds their slice of the intermediate
    dimension), partial sums reduce-scattered back (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup | None, first_expert: int, num_local: int):
        self.group = group
        self.first_expert, self.num_local = first_expert, num_local

    def gather(self, x_TD: Tensor) -> Tensor:
        return all_gather(x_TD, self.group)

    def scatter(self, y_TD: Tensor) -> Tensor:
        return reduce_scatter(y_TD, self.group)

    def __call__(self, x_TD: Tensor, routing: RoutingResult, experts: nn.Module) -> Tensor:
        return local_partial(x_TD, routing, experts, self.first_expert, self.num_local)


def local_partial(x_TD: Tensor, routing: RoutingResult, experts: nn.Module, first_expert: int,
                  num_local: int) -> Tensor:
    """The routed output restricted to experts [first_expert, first_expert + num_local), which
    `experts` holds as its experts 0..num_local-1: the slots routed elsewhere contribute nothing.
    Summed over a partition of the experts it is the whole routed output."""
    K = routing.experts_TK.shape[1]
    local_R = routing.experts_TK.reshape(-1) - first_expert
    slot_R = ((local_R >= 0) & (local_R < num_local)).nonzero().squeeze(1)
    token_R = slot_R // K
    out_RD = experts(x_TD.index_select(0, token_R), local_R.index_select(0, slot_R).unsqueeze(1),
                     routing.weights_TK.reshape(-1).index_select(0, slot_R).unsqueeze(1))
    return torch.zeros(x_TD.shape, dtype=out_RD.dtype, device=x_TD.device).index_add(0, token_R, out_RD)
