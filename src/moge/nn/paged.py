"""A paged KV cache: one pool of fixed-size blocks shared by every sequence (the memory layout of
vLLM's PagedAttention, Kwon et al., SOSP 2023), and the attention of one flat batch over it.

A sequence owns a list of blocks (its block table); context position p lives in slot
`table[p // block_size] * block_size + p % block_size` of the pool. The model runs a step as one
flat row of T tokens (`input_ids` [1, T]) gathered from many sequences, each contributing its new
tokens (one for a decode, a chunk of its prompt for a prefill). Everything but attention works on
tokens independently, so only attention needs to know the sequences: `PagedBatch.attend` writes the
new keys/values into their slots, then reads each sequence's whole context back from its slots.
Sequences with the same number of new tokens share one `scaled_dot_product_attention` call
(keys padded to the longest context and masked), so a step of 32 decodes is one call per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moge.config import ModelConfig


@dataclass
class KVPool:
    """Keys and values of every layer: [L, num_blocks * block_size, H_kv, head_dim] each."""

    k: Tensor
    v: Tensor
    block_size: int

    @classmethod
    def allocate(cls, attn_cfg: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVPool":
        """`attn_cfg` is the attention modules' config: all heads, or a rank's heads under a plan."""
        shape = (num_layers, num_blocks * block_size, attn_cfg.num_kv_heads, attn_cfg.head_size)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   block_size)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1] // self.block_size

    @staticmethod
    def bytes_per_block(attn_cfg: ModelConfig, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * attn_cfg.num_kv_heads * attn_cfg.head_size * dtype.itemsize


@dataclass(frozen=True)
class Span:
    """One sequence's part of a step: its block table, its context length after the step, and how many
    of those positions are new (fed in this step, at the end of the context)."""

    blocks: tuple[int, ...]
    context: int
    new: int


@dataclass
class _Group:
    rows_BQ: Tensor  # the group's query tokens: indices into the step's T tokens
    slots_BC: Tensor  # every context slot of each sequence, padded with slot 0
    mask_B1QC: Tensor | None  # None: every key is visible (or plain causal when is_causal)
    is_causal: bool


class PagedBatch:
    """What one forward over a flat batch of sequences reads and writes in a `KVPool`.

    Pass it as the model's `cache` with `input_ids` [1, T] (the spans' new tokens, concatenated in
    span order); the model takes `positions_1T` from it. Built once per step on the host; the
    index tensors are shared by every layer."""

    def __init__(self, pool: KVPool, spans: Sequence[Span], device: torch.device | str | None = None):
        if not spans or any(s.new < 1 or s.new > s.context for s in spans):
            raise ValueError(f"every span needs 1 <= new <= context, got {list(spans)}")
        device = pool.k.device if device is None else device
        bs = pool.block_size
        self.pool, self.spans = pool, list(spans)
        slots_per_span = []
        for s in spans:
            if len(s.blocks) * bs < s.context:
                raise ValueError(f"a span of {s.context} positions needs {-(-s.context // bs)} blocks, "
                                 f"got {len(s.blocks)}")
            blocks = torch.tensor(s.blocks, dtype=torch.long)
            slots_per_span.append((blocks.repeat_interleave(bs) * bs + torch.arange(bs).repeat(len(s.blocks)))
                                  [:s.context])
        positions, write = [], []
        for s, slots in zip(spans, slots_per_span):
            positions.append(torch.arange(s.context - s.new, s.context))
            write.append(slots[s.context - s.new:])
        self.num_tokens = sum(s.new for s in spans)
        self.positions_1T = torch.cat(positions).view(1, -1).to(device)
        self.write_slots_T = torch.cat(write).to(device)
        starts = [0]
        for s in spans:
            starts.append(starts[-1] + s.new)
        by_new: dict[int, list[int]] = {}
        for i, s in enumerate(spans):
            by_new.setdefault(s.new, []).append(i)
        self.groups = [self._group([spans[i] for i in members], [slots_per_span[i] for i in members],
                                   [starts[i] for i in members], device)
                       for _, members in sorted(by_new.items())]

    @staticmethod
    def _group(spans: list[Span], slots: list[Tensor], starts: list[int], device) -> _Group:
        Q = spans[0].new
        C = max(s.context for s in spans)
        slots_BC = torch.zeros(len(spans), C, dtype=torch.long)
        for b, sl in enumerate(slots):
            slots_BC[b, :len(sl)] = sl
        rows_BQ = torch.tensor(starts).view(-1, 1) + torch.arange(Q)
        ctx = torch.tensor([s.context for s in spans])
        if Q == 1 and bool((ctx == C).all()):
            mask, causal = None, False  # one query per sequence, every key real
        elif len(spans) == 1 and spans[0].context == Q:
            mask, causal = None, Q > 1  # a prompt's first chunk: plain causal
        else:
            # query i of row b sits at position context_b - Q + i and sees keys 0..that position
            q_pos = (ctx - Q).view(-1, 1, 1) + torch.arange(Q).view(1, Q, 1)
            mask, causal = (torch.arange(C).view(1, 1, C) <= q_pos).unsqueeze(1).to(device), False
        return _Group(rows_BQ.to(device), slots_BC.to(device), mask, causal)

    def attend(self, layer: int, q_1HTd: Tensor, k_1HTd: Tensor, v_1HTd: Tensor, mask: Tensor | None = None) -> Tensor:
        """Store the step's keys/values of `layer` in their slots, then attend each sequence's queries
        to its whole context. Returns [1, H, T, head_dim] like the queries."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        pool_k.index_copy_(0, self.write_slots_T, k_1HTd[0].transpose(0, 1).to(pool_k.dtype))
        pool_v.index_copy_(0, self.write_slots_T, v_1HTd[0].transpose(0, 1).to(pool_v.dtype))
        q_THd = q_1HTd[0].transpose(0, 1)
        gqa = q_1HTd.shape[1] != k_1HTd.shape[1]
        if len(self.groups) == 1 and self.groups[0].rows_BQ.shape[0] == 1:  # one sequence: no scatter
            return self._group_attention(self.groups[0], q_THd, pool_k, pool_v, gqa)
        out_THd = torch.empty_like(q_THd)
        for g in self.groups:
            out_BHQd = self._group_attention(g, q_THd, pool_k, pool_v, gqa)
            out_THd[g.rows_BQ] = out_BHQd.transpose(1, 2)
        return out_THd.transpose(0, 1).unsqueeze(0)

    @staticmethod
    def _group_attention(g: _Group, q_THd: Tensor, pool_k: Tensor, pool_v: Tensor, gqa: bool) -> Tensor:
        B, C = g.slots_BC.shape
        q = q_THd.index_select(0, g.rows_BQ.view(-1)).view(B, -1, *q_THd.shape[1:]).transpose(1, 2)  # [B, H, Q, d]
        # index_select, not advanced indexing: 6x faster for these gathers on CPU
        k = pool_k.index_select(0, g.slots_BC.view(-1)).view(B, C, *pool_k.shape[1:]).transpose(1, 2)  # [B, H_kv, C, d]
        v = pool_v.index_select(0, g.slots_BC.view(-1)).view(B, C, *pool_v.shape[1:]).transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask_B1QC, is_causal=g.is_causal, enable_gqa=gqa)
