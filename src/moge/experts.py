"""Routed SwiGLU experts: one stacked weight layout, several compute backends with equal numbers.

Weights: `gate_up_proj` [E, 2F, D] (gate rows first, then up rows) and `down_proj` [E, D, F],
i.e. the released per-expert `gate_proj`/`up_proj`/`down_proj` matrices stacked. An expert is
down(silu(gate(x)) * up(x)), no biases.

The path of a batch: permute token slots so each expert's rows are contiguous, run the experts on
their rows, then combine: scale by the routing weight and sum each token's K rows back in token
order. The combine is a gather with the inverse permutation and a sum over K: no atomics, so the
result is bit-for-bit repeatable.

Backends (same weights, same results):
  grouped_mm  torch.nn.functional.grouped_mm over the sorted rows (needs 16-byte aligned rows)
  loop        a Python loop over experts that received tokens, weights unbound once
  reference   straight from the SPEC: every expert on every token, y = sum_i G_i * E_i(x)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def permute(experts_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the T*K token slots by expert (stable, so ties keep token order).

    Returns (order_R, token_R, counts_E): slot indices in expert order, the token each sorted
    row came from, and how many rows each expert received (R = T*K).
    """
    flat_R = experts_TK.reshape(-1)
    order_R = torch.argsort(flat_R, stable=True)
    counts_E = torch.bincount(flat_R, minlength=num_experts)
    return order_R, order_R // experts_TK.shape[-1], counts_E


def combine(out_RD: Tensor, order_R: Tensor, weights_TK: Tensor) -> Tensor:
    """Weighted sum of each token's K expert outputs, back in token order (deterministic)."""
    T, K = weights_TK.shape
    inverse_R = torch.empty_like(order_R)
    inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
    out_TKD = out_RD[inverse_R].view(T, K, -1)
    y_TD = torch.bmm(weights_TK.to(out_RD.dtype).unsqueeze(1), out_TKD).squeeze(1)
    return y_TD


def grouped_mm_supported(x: Tensor, hidden: int, ffn: int) -> bool:
    """grouped_mm exists in this torch and the row strides are 16-byte multiples."""
    if not hasattr(F, "grouped_mm"):
        return False
    size = x.element_size()
    return (hidden * size) % 16 == 0 and (ffn * size) % 16 == 0 and (2 * ffn * size) % 16 == 0


class SwiGLUExperts(nn.Module):
    """E routed experts stored stacked; `forward(x_TD, experts_TK, weights_TK)` -> y_TD."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default per expert (kaiming uniform, a=sqrt(5)).
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def resolve_backend(self, x: Tensor) -> str:
        """`auto`: grouped_mm on accelerators when aligned, the sorted loop otherwise (measured
        faster than grouped_mm on CPU, see docs/benchmarks.md)."""
        if self.backend != "auto":
            if self.backend == "grouped_mm" and not grouped_mm_supported(x, self.hidden_size,
                                                                        self.intermediate_size):
                return "loop"  # explicit request, but shapes/torch can't: fall back, same numbers
            return self.backend
        if x.device.type != "cpu" and grouped_mm_supported(x, self.hidden_size, self.intermediate_size):
            return "grouped_mm"
        return "loop"

    def forward(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        backend = backend or self.resolve_backend(x_TD)
        if backend == "reference":
            return reference_experts(x_TD, experts_TK, weights_TK, self.gate_up_proj, self.down_proj)
        order_R, token_R, counts_E = permute(experts_TK, self.num_experts)
        x_RD = x_TD[token_R]
        if backend == "grouped_mm":
            out_RD = _grouped_mm_experts(x_RD, counts_E, self.gate_up_proj, self.down_proj)
        elif backend == "loop":
            out_RD = _loop_experts(x_RD, counts_E, self.gate_up_proj, self.down_proj)
        else:
            raise ValueError(f"backend={backend!r} is invalid: choose auto, grouped_mm, loop or reference")
        return combine(out_RD, order_R, weights_TK)


def _swiglu(h_R2F: Tensor) -> Tensor:
    gate, up = h_R2F.chunk(2, dim=-1)
    return F.silu(gate) * up


def _loop_experts(x_RD: Tensor, counts_E: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor) -> Tensor:
    """Run only the experts that received rows. Weights are unbound once: indexing a stacked
    parameter per expert would make autograd allocate a full-size gradient per expert."""
    gate_up = gate_up_E2FD.unbind(0)
    down = down_EDF.unbind(0)
    outs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        x = x_RD[start:start + n]
        outs.append(F.linear(_swiglu(F.linear(x, gate_up[e])), down[e]))
        start += n
    if not outs:
        return x_RD.new_zeros(0, down_EDF.shape[1])
    return torch.cat(outs)


def _grouped_mm_experts(x_RD: Tensor, counts_E: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor) -> Tensor:
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_R2F = F.grouped_mm(x_RD, gate_up_E2FD.transpose(-2, -1), offs=offs_E)
    return F.grouped_mm(_swiglu(h_R2F), down_EDF.transpose(-2, -1), offs=offs_E)


def reference_experts(x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, gate_up_E2FD: Tensor,
                      down_EDF: Tensor) -> Tensor:
    """y = sum_i G_i * E_i(x), with G the dense [T, N] gate (zero for experts not chosen).

    Written from the SPEC, not for speed: every expert runs on every token."""
    T = x_TD.shape[0]
    E, twoF, _ = gate_up_E2FD.shape
    G_TN = torch.zeros(T, E, dtype=weights_TK.dtype, device=x_TD.device)
    G_TN = G_TN.scatter_add(1, experts_TK, weights_TK)
    y_TD = torch.zeros_like(x_TD)
    for i in range(E):
        gate, up = gate_up_E2FD[i][: twoF // 2], gate_up_E2FD[i][twoF // 2:]
        e_TD = (F.silu(x_TD @ gate.T) * (x_TD @ up.T)) @ down_EDF[i].T
        y_TD = y_TD + G_TN[:, i:i + 1].to(x_TD.dtype) * e_TD
    return y_TD
