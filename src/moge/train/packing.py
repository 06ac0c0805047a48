"""Packed sequences: several documents in one row, each attending only to itself.

The model's forward knows left padding, not documents. A packed row therefore goes through the
model's own modules here with two things the plain forward cannot express: a block-diagonal causal
mask (a token sees the earlier tokens of its own document only) and positions that restart at 0 in
every document. A packed row then gives every document exactly the logits it gets alone, which is
what `tests/train/test_packing.py` checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moge.nn.model import ModelOutput, PanguProMoEForCausalLM, rope_cos_sin

PAD_DOC = -1  # the document id of padding slots


@dataclass
class Packed:
    """Rows of packed documents, all [B, S]: input ids, targets, which targets count in the loss,
    each slot's document (PAD_DOC for padding) and its position inside the document."""

    inputs_BS: Tensor
    targets_BS: Tensor
    loss_mask_BS: Tensor
    docs_BS: Tensor
    positions_BS: Tensor

    @property
    def valid_BS(self) -> Tensor:
        return self.docs_BS != PAD_DOC


def pack(segments: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], rows: Sequence[Sequence[int]],
         seq_len: int, pad_id: int) -> Packed:
    """Place `segments` (inputs, targets, loss mask: equal lengths <= seq_len) into rows: `rows[r]`
    lists the segments of row r in order. Every segment is its own document."""
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(B, seq_len, dtype=torch.bool)
    docs = torch.full((B, seq_len), PAD_DOC, dtype=torch.long)
    positions = torch.zeros(B, seq_len, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for doc, index in enumerate(members):
            x, y, m = segments[index]
            n = len(x)
            if not len(y) == len(m) == n:
                raise ValueError(f"segment {index}: inputs, targets and mask differ in length ({n}, {len(y)}, "
                                 f"{len(m)})")
            if at + n > seq_len:
                raise ValueError(f"row {r} overflows: segments {list(members)} need more than seq_len={seq_len}")
            inputs[r, at:at + n] = torch.as_tensor(list(x), dtype=torch.long)
            targets[r, at:at + n] = torch.as_tensor(list(y), dtype=torch.long)
            mask[r, at:at + n] = torch.as_tensor(list(m), dtype=torch.bool)
            docs[r, at:at + n] = doc
            positions[r, at:at + n] = torch.arange(n)
            at += n
    return Packed(inputs, targets, mask, docs, positions)


def first_fit(lengths: Sequence[int], rows: int, seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Place items (in order) into `rows` rows of `seq_len` slots, each in the first row with room;
    returns the rows (item indices) and the items that fit nowhere."""
    placed: list[list[int]] = [[] for _ in range(rows)]
    free = [seq_len] * rows
    left = []
    for i, n in enumerate(lengths):
        for r in range(rows):
            if n <= free[r]:
                placed[r].append(i)
                free[r] -= n
                break
        else:
            left.append(i)
    return placed, left


def document_mask(docs_BS: Tensor) -> Tensor:
    """[B, 1, S, S] bool (True = attend): causal and within one document. Padding slots form their own
    document, so every query sees at least itself (no empty softmax row)."""
    S = docs_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=docs_BS.device).tril()
    same = docs_BS.unsqueeze(2) == docs_BS.unsqueeze(1)
    return (same & causal).unsqueeze(1)


def packed_forward(model: PanguProMoEForCausalLM, inputs_BS: Tensor, docs_BS: Tensor, positions_BS: Tensor, *,
                   return_routing: bool = False) -> ModelOutput:
    """The model's forward over packed rows (no KV cache, no MTP): the same modules in the same order
    as `PanguProMoEForCausalLM.forward`, with the document mask and per-document positions."""
    cfg = model.config
    mask = document_mask(docs_BS)
    cos, sin = rope_cos_sin(positions_BS, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
    h = model.model.embed_tokens(inputs_BS)
    routings = []
    for i, layer in enumerate(model.model.layers):
        h, routing = layer(h, cos, sin, mask, i, None)
        routings.append(routing)
    pre_norm = h
    h = model.model.norm(h)
    return ModelOutput(model._logits(h), routings if return_routing else None, h, pre_norm)
