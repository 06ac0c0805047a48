"""W8A8 routed experts in the stacked layout of `moge.nn.experts.SwiGLUExperts`.

Buffers: `gate_up_proj` int8 [E, 2F, D] with `gate_up_scale` fp32 [E, 2F], and `down_proj` int8
[E, D, F] with `down_scale` fp32 [E, D]: the same stacked matrices, each row with its own scale.
A batch is permuted by expert as in the float kernels (`moge.nn.experts.permute`) and a Python loop
runs each expert that received tokens: its rows of the per-token quantized input (quantized once
for all experts), an integer gate/up product, SwiGLU in fp32, per-token quantization of the
activation, an integer down product, then the routing weight and a deterministic index_add. One
token (decoding a single sequence) skips the permutation and quantizes its K activations at once.
With few rows per expert (decoding) on a CPU where moge.quant.int8 picks the gemv kernel, there is
no loop: each projection is one integer kernel call over every row, each naming its expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.kernels import gemv as _gemv
from moge.nn.experts import SwiGLUExperts, combine, expert_slots, permute
from moge.quant.int8 import dequantize, int8_kernel, int8_linear, int8_mm, quantize_per_channel, quantize_per_token


class QuantExperts(nn.Module):
    """Drop-in for SwiGLUExperts at inference: `forward(x_TD, experts_TK, weights_TK)` -> y_TD."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        E, D, F_ = num_experts, hidden_size, intermediate_size
        self.register_buffer("gate_up_proj", torch.zeros(E, 2 * F_, D, dtype=torch.int8, device=device))
        self.register_buffer("gate_up_scale", torch.ones(E, 2 * F_, dtype=torch.float32, device=device))
        self.register_buffer("down_proj", torch.zeros(E, D, F_, dtype=torch.int8, device=device))
        self.register_buffer("down_scale", torch.ones(E, D, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: SwiGLUExperts) -> "QuantExperts":
        out = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size,
                  device=experts.gate_up_proj.device)
        out.gate_up_proj, out.gate_up_scale = quantize_per_channel(experts.gate_up_proj)
        out.down_proj, out.down_scale = quantize_per_channel(experts.down_proj)
        return out

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """(gate_up [E, 2F, D], down [E, D, F]) in fp32, for references and error checks."""
        return dequantize(self.gate_up_proj, self.gate_up_scale), dequantize(self.down_proj, self.down_scale)

    def _expert(self, e: int, qx: Tensor, sx: Tensor) -> Tensor:
        """Expert e on already quantized rows (qx int8 [n, D], sx [n]) -> fp32 [n, D]."""
        f = self.intermediate_size
        h = int8_mm(qx, self.gate_up_proj[e]).float().mul_(sx.unsqueeze(-1)).mul_(self.gate_up_scale[e])
        act = F.silu(h[:, :f]) * h[:, f:]
        return int8_linear(act, self.down_proj[e], self.down_scale[e])

    def forward(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        del backend  # one kernel; the argument keeps the SwiGLUExperts signature
        T, D = x_TD.shape
        qx, sx = quantize_per_token(x_TD)
        R = experts_TK.numel()
        if x_TD.device.type == "cpu" and int8_kernel(R / min(R, self.num_experts)) == "gemv":
            return self._all_experts_at_once(qx, sx, experts_TK, weights_TK).to(x_TD.dtype)
        if T == 1:  # decoding one sequence: its K experts straight from the row, no permutation
            experts = experts_TK[0].tolist()
            f = self.intermediate_size
            h_K2F = torch.cat([int8_mm(qx, self.gate_up_proj[e]) for e in experts]).float()
            h_K2F.mul_(sx).mul_(self.gate_up_scale[experts_TK[0]])
            qa, sa = quantize_per_token(F.silu(h_K2F[:, :f]) * h_K2F[:, f:])  # one row per expert
            out_KD = torch.cat([int8_mm(qa[k:k + 1], self.down_proj[e]) for k, e in enumerate(experts)]).float()
            out_KD.mul_(sa.unsqueeze(-1)).mul_(self.down_scale[experts_TK[0]])
            return (weights_TK.float() @ out_KD).to(x_TD.dtype)
        y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
        order_R, token_R, counts_E = permute(experts_TK, self.num_experts)
        w_R = weights_TK.reshape(-1).index_select(0, order_R).float()
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n == 0:
                continue
            rows = slice(start, start + n)
            tokens = token_R[rows]
            out = self._expert(e, qx.index_select(0, tokens), sx.index_select(0, tokens))
            y_TD.index_add_(0, tokens, out.mul_(w_R[rows, None]))
            start += n
        return y_TD.to(x_TD.dtype)

    def _all_experts_at_once(self, qx_TD: Tensor, sx_T: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """Every token slot in one integer call per projection (the gemv kernel's expert ids): one
        token's K rows in routing order, a batch's slots sorted by expert. Same integer sums and
        scaling as the loop."""
        f = self.intermediate_size
        expert_R, order_R, (q_RD, s_R) = expert_slots(experts_TK, qx_TD, sx_T)
        h_R2F = _gemv.int8_gemv(q_RD, self.gate_up_proj, expert_R).float()
        h_R2F.mul_(s_R.unsqueeze(-1)).mul_(self.gate_up_scale.index_select(0, expert_R))
        qa, sa = quantize_per_token(F.silu(h_R2F[:, :f]) * h_R2F[:, f:])
        out_RD = _gemv.int8_gemv(qa, self.down_proj, expert_R).float()
        out_RD.mul_(sa.unsqueeze(-1)).mul_(self.down_scale.index_select(0, expert_R))
        if order_R is None:
            return weights_TK.float() @ out_RD
        return combine(out_RD, order_R, weights_TK.float())

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, W8A8")
