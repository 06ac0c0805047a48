"""Quantized modules under the parallel plans: what `parallelize` builds where the model holds
W8A8 `QuantLinear` / `QuantExperts` or weight-only `WOLinear` / `WOExperts` (moge.quant) instead
of float layers.

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

Weight-only modules slice the same way (activations stay float, so every plan matches the single
process to float rounding). Their int4 weights are packed two per byte along the input dim with
one scale per group of G inputs: an input-dim slice takes whole groups (the slice width must be a
multiple of G; a ConfigError says so otherwise) and the matching bytes and group scales.
"""

from __future__ import annotations

from torch import Tensor, nn

from moge.errors import ConfigError
from moge.parallel.comm import reduce_scatter_rows
from moge.quant.experts import QuantExperts
from moge.quant.int8 import QuantLinear
from moge.quant.weight_only import WOExperts, WOLinear

Pieces = list[tuple[slice, ...]]


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, (QuantLinear, QuantExperts, WOLinear, WOExperts))


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
    if isinstance(experts, WOExperts):
        return _wo_experts_slice(slicer, experts, first, count, tp, tp_rank)
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
    if isinstance(linear, WOLinear):
        return _wo_rows(slicer, linear, part, parts, dim)
    size = linear.weight.shape[dim] // parts
    mine = slice(part * size, (part + 1) * size)
    new = QuantLinear(linear.in_features if dim == 0 else size, size if dim == 0 else linear.out_features,
                      bias=linear.bias is not None, device="meta")
    new.weight = _take(slicer, linear.weight, [(slice(None),) * dim + (mine,)])
    new.weight_scale = _take(slicer, linear.weight_scale, [(mine,) if dim == 0 else ()])
    if linear.bias is not None:
        new.bias = _take(slicer, linear.bias, [(mine,) if dim == 0 else ()])
    return new


def _wo_cols(module: WOLinear | WOExperts, start: int, width: int, what: str, full: int,
             ) -> tuple[slice, slice | None]:
    """The packed-weight and scale slices of input columns [start, start + width) (scale None:
    int8's per-row scales stay whole)."""
    if module.scheme == "int8-wo":
        return slice(start, start + width), None
    g = module.group_size
    if width % g:
        raise ConfigError(f"cannot split {what}={full} into slices of {width} inputs: an int4 slice must hold "
                          f"whole groups of group_size={g}; quantize with a group size dividing {width}")
    return slice(start // 2, (start + width) // 2), slice(start // g, (start + width) // g)


def _wo_experts_slice(slicer, experts: WOExperts, first: int, count: int, tp: int, tp_rank: int) -> WOExperts:
    full = experts.intermediate_size
    f = full // tp
    cols, groups = _wo_cols(experts, tp_rank * f, f, "expert_intermediate_size", full)  # whole groups or refuse
    new = WOExperts(count, experts.hidden_size, f, scheme=experts.scheme, group_size=experts.group_size,
                    symmetric=experts.symmetric, device="meta")
    mine = slice(first, first + count)
    suffixes = ("proj", "scale") if experts.gate_up_zero is None else ("proj", "scale", "zero")
    if tp == 1:
        for name in ("gate_up", "down"):
            for suf in suffixes:
                setattr(new, f"{name}_{suf}", _take(slicer, getattr(experts, f"{name}_{suf}"), [(mine,)]))
        return new
    rows: Pieces = [(mine, slice(tp_rank * f, (tp_rank + 1) * f)),
                    (mine, slice(full + tp_rank * f, full + (tp_rank + 1) * f))]
    for suf in suffixes:
        setattr(new, f"gate_up_{suf}", _take(slicer, getattr(experts, f"gate_up_{suf}"), rows, dim=1))
    new.down_proj = _take(slicer, experts.down_proj, [(mine, slice(None), cols)])
    for suf in suffixes[1:]:
        piece = (mine,) if groups is None else (mine, slice(None), groups)
        setattr(new, f"down_{suf}", _take(slicer, getattr(experts, f"down_{suf}"), [piece]))
    return new


def _wo_like(linear: WOLinear, in_features: int, out_features: int) -> WOLinear:
    return WOLinear(in_features, out_features, bias=linear.bias is not None, scheme=linear.scheme,
                    group_size=linear.group_size, symmetric=linear.symmetric, device="meta")


def _wo_rows(slicer, linear: WOLinear, part: int, parts: int, dim: int) -> WOLinear:
    extra = () if linear.weight_zero is None else ("weight_zero",)
    if dim == 0:
        size = linear.out_features // parts
        mine = slice(part * size, (part + 1) * size)
        new = _wo_like(linear, linear.in_features, size)
        for name in ("weight", "weight_scale", *extra):
            setattr(new, name, _take(slicer, getattr(linear, name), [(mine,)]))
        if linear.bias is not None:
            new.bias = _take(slicer, linear.bias, [(mine,)])
        return new
    size = linear.in_features // parts
    _wo_cols(linear, part * size, size, "in_features", linear.in_features)  # whole groups or refuse
    new = _wo_like(linear, size, linear.out_features)
    _wo_input_slice(slicer, linear, new, part * size, size)
    if linear.bias is not None:
        new.bias = _take(slicer, linear.bias, [()])
    return new


def _wo_input_slice(slicer, linear: WOLinear, new: WOLinear, start: int, width: int) -> None:
    cols, groups = _wo_cols(linear, start, width, "in_features", linear.in_features)
    new.weight = _take(slicer, linear.weight, [(slice(None), cols)])
    for name in ("weight_scale",) + (() if linear.weight_zero is None else ("weight_zero",)):
        setattr(new, name, _take(slicer, getattr(linear, name), [()] if groups is None else [(slice(None), groups)]))


def ReduceScatterQuantLinear(o_proj: nn.Module, layout, slicer) -> nn.Module:  # called like the class it picks
    """H2P's row-parallel o_proj for a quantized model: W8A8 or weight-only, as `o_proj` is."""
    if isinstance(o_proj, WOLinear):
        return ReduceScatterWOLinear(o_proj, layout, slicer)
    return ReduceScatterW8A8Linear(o_proj, layout, slicer)


class ReduceScatterWOLinear(WOLinear):
    """H2P's row-parallel o_proj, weight-only: this rank's head columns (whole int4 groups), its
    partial output reduce-scattered over the attention TP group."""

    def __init__(self, o_proj: WOLinear, layout, slicer):
        tp, t = layout.tp, layout.tp_rank
        cols = o_proj.in_features // tp
        _wo_cols(o_proj, t * cols, cols, "in_features", o_proj.in_features)  # whole groups or refuse
        super().__init__(cols, o_proj.out_features, bias=o_proj.bias is not None, scheme=o_proj.scheme,
                         group_size=o_proj.group_size, symmetric=o_proj.symmetric, device="meta")
        _wo_input_slice(slicer, o_proj, self, t * cols, cols)
        if o_proj.bias is not None:  # added once per group: the other ranks hold zeros
            self.bias = _take(slicer, o_proj.bias, [()] if t == 0 else [])
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return reduce_scatter_rows(super().forward(x).reshape(-1, self.out_features), self.layout.group,
                                   self.layout.tp)


class ReduceScatterW8A8Linear(QuantLinear):
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
