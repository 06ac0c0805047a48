"""W8A8 modules under the parallel plans: what `parallelize` builds where the model holds
`QuantLinear` / `QuantExperts` (moge.quant) instead of float layers.

Each slice is taken through the plan's slicer, like the float slices, so the local tensors carry the
same records of which part of the single-process tensor they hold. The int8 weights are sliced like
the float ones; their per-output-channel scales follow the output rows kept, and a row-parallel
(input-dim) slice keeps every row's scale whole (it was computed over the whole row and still
dequantizes the slice).

Numbers: expert parallelism moves whole token rows, so each token's per-token activation scale is
the single-process one and the logits match to float rounding. H2P's row-parallel layers (o_proj,
the shared expert's down_proj, and the routed experts' down_proj when expert_tp > 1) quantize each
rank's slice of the activation with its own per-token scale: the sum over ranks differs from the
unsplit layer by about the int8 activation rounding error (tests/quant/test_quant_parallel.py
states the tolerance).
"""

from __future__ import annotations

from torch import Tensor, nn

from moge.parallel.comm import reduce_scatter_rows
from moge.quant.experts import QuantExperts
from moge.quant.int8 import QuantLinear

Pieces = list[tuple[slice, ...]]


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, (QuantLinear, QuantExperts))


def _take(slicer, like: Tensor, pieces: Pieces, dim: int = 0) -> Tensor:
    """`pieces` of the buffer `like` as a new plain tensor (a buffer, not a parameter: int8 cannot
    require grad), recorded by the slicer like a float slice."""
    param = slicer.take(like, pieces, dim)
    out = param.detach()
    slicer.made[id(out)] = slicer.made.pop(id(param))
    return out


def quant_experts_slice(slicer, experts: QuantExperts, first: int, count: int, tp: int = 1,
                        tp_rank: int = 0) -> QuantExperts:
    """Experts [first, first + count), each keeping its `tp_rank`-th 1/tp of the intermediate dim:
    gate and up rows with their scales, down columns (whose per-row scales stay whole)."""
    full = experts.intermediate_size
    f = full // tp
    new = QuantExperts(count, experts.hidden_size, f, device="meta")
    mine = slice(first, first + count)
    if tp == 1:
        pieces_2f: Pieces = [(mine,)]
        down: Pieces = [(mine,)]
    else:
        pieces_2f = [(mine, slice(tp_rank * f, (tp_rank + 1) * f)),
                     (mine, slice(full + tp_rank * f, full + (tp_rank + 1) * f))]
        down = [(mine, slice(None), slice(tp_rank * f, (tp_rank + 1) * f))]
    new.gate_up_proj = _take(slicer, experts.gate_up_proj, pieces_2f, dim=1)
    new.gate_up_scale = _take(slicer, experts.gate_up_scale, pieces_2f, dim=1)
    new.down_proj = _take(slicer, experts.down_proj, down)
    new.down_scale = _take(slicer, experts.down_scale, [(mine,)])
    return new


def quant_rows(slicer, linear: QuantLinear, part: int, parts: int, dim: int = 0) -> QuantLinear:
    """The `part`-th 1/parts of `linear` along its output (dim 0) or input (dim 1) features; an input
    split keeps the whole bias, like the float slice."""
    size = linear.weight.shape[dim] // parts
    mine = slice(part * size, (part + 1) * size)
    new = QuantLinear(linear.in_features if dim == 0 else size, size if dim == 0 else linear.out_features,
                      bias=linear.bias is not None, device="meta")
    new.weight = _take(slicer, linear.weight, [(slice(None),) * dim + (mine,)])
    new.weight_scale = _take(slicer, linear.weight_scale, [(mine,) if dim == 0 else ()])
    if linear.bias is not None:
        new.bias = _take(slicer, linear.bias, [(mine,) if dim == 0 else ()])
    return new


class ReduceScatterQuantLinear(QuantLinear):
    """H2P's row-parallel o_proj in W8A8: this rank's head columns, its partial output
    reduce-scattered over the attention TP group into the residual shard (the float
    `ReduceScatterLinear`'s layout; `layout` is the plan's token layout)."""

    def __init__(self, o_proj: QuantLinear, layout, slicer):
        tp, t = layout.tp, layout.tp_rank
        cols = o_proj.in_features // tp
        super().__init__(cols, o_proj.out_features, bias=o_proj.bias is not None, device="meta")
        self.weight = _take(slicer, o_proj.weight, [(slice(None), slice(t * cols, (t + 1) * cols))])
        self.weight_scale = _take(slicer, o_proj.weight_scale, [()])
        if o_proj.bias is not None:  # added once per group: the other ranks hold zeros
            self.bias = _take(slicer, o_proj.bias, [()] if t == 0 else [])
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return reduce_scatter_rows(super().forward(x).reshape(-1, self.out_features), self.layout.group,
                                   self.layout.tp)
