"""Smoothing: move activation outliers into the weights before W8A8 quantization, exactly.

Per-token int8 activations lose precision when a few input channels carry much larger values than
the rest. A per-channel factor s_j divides channel j of the activation and multiplies column j of
every weight that reads it; when the activation comes out of an RMSNorm, the division is folded
into the norm's weight, so the float model computes the same function (up to rounding) and only
the quantization error changes.

Two sites per decoder layer:
- attention: input_layernorm -> q, k, v, with SmoothQuant's factor
      s_j = max|x_j|^alpha / max|W_j|^(1 - alpha),  max|W_j| over the rows of q, k and v together;
- MoE: post_attention_layernorm -> router gate, every routed expert's gate_up_proj and the shared
  expert(s), with the expert-aware factor of the Pangu Pro MoE paper (arXiv 2505.21411, sec. 5):
      s_j = max( max|x_j|^alpha / max|W^gate_j|^(1 - alpha),
                 max_i max|x_j|^alpha / max|W^i_j|^(1 - alpha) )
  over the router weight W^gate and the gate_up_proj W^i of every local expert i. One factor for
  all of them, because they all read the same normed activation; the shared expert is not in the
  max (as in the paper's formula) but its gate/up columns are multiplied by s as well, since it
  reads the same activation.
max|x_j| is the calibration max of the activation on channel j; max|W_j| the max over output rows
of column j. Factors are clamped to [1e-4, 1e4] (a channel that is never active would otherwise
give 0 or inf).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moge.errors import ConfigError

MIN_VALUE = 1e-5
S_RANGE = (1e-4, 1e4)


def column_max(w: Tensor) -> Tensor:
    """max |w| over output rows for each input column: [N, D] -> [D], [E, N, D] -> [E, D]."""
    return w.detach().float().abs().amax(-2)


def _check(act_max_D: Tensor, alpha: float, width: int) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha={alpha!r} is invalid: the migration strength must be in [0, 1]")
    if act_max_D.dim() != 1 or act_max_D.shape[0] != width:
        raise ConfigError(f"act_max has shape {tuple(act_max_D.shape)}, expected [{width}] (one max per input "
                         f"channel of the weights)")


def smoothquant_factors(act_max_D: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """SmoothQuant: s_j = max|x_j|^alpha / max|W_j|^(1-alpha), W = all `weights` stacked by rows."""
    _check(act_max_D, alpha, weights[0].shape[-1])
    w_max = torch.stack([column_max(w) for w in weights]).amax(0).clamp_min(MIN_VALUE)
    a = act_max_D.float().clamp_min(MIN_VALUE)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(*S_RANGE)


def expert_aware_factors(act_max_D: Tensor, router_ND: Tensor, gate_up_E2FD: Tensor, alpha: float) -> Tensor:
    """The paper's expert-aware smoothing factor (see the module docstring), [D]."""
    _check(act_max_D, alpha, router_ND.shape[-1])
    if gate_up_E2FD.dim() != 3 or gate_up_E2FD.shape[-1] != router_ND.shape[-1]:
        raise ConfigError(f"gate_up has shape {tuple(gate_up_E2FD.shape)}, expected [experts, 2F, "
                         f"{router_ND.shape[-1]}]")
    a = act_max_D.float().clamp_min(MIN_VALUE).pow(alpha)
    s_gate = a / column_max(router_ND).clamp_min(MIN_VALUE).pow(1 - alpha)
    s_experts = (a / column_max(gate_up_E2FD).clamp_min(MIN_VALUE).pow(1 - alpha)).amax(0)
    return torch.maximum(s_gate, s_experts).clamp(*S_RANGE)


@torch.no_grad()
def fold(norm_weight: Tensor, consumers: list[Tensor], s_D: Tensor) -> None:
    """In place: norm weight / s, every consumer's columns * s (the float function is unchanged)."""
    norm_weight.div_(s_D.to(norm_weight.dtype))
    for w in consumers:
        w.mul_(s_D.to(w.dtype))


def moe_consumers(block) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(router weight, stacked expert gate_up, the other readers of the normed activation)."""
    shared = []
    for expert in block._shared():
        shared += [expert.gate_proj.weight, expert.up_proj.weight]
        if getattr(expert, "gate", None) is not None:
            shared.append(expert.gate.weight)
    return block.router.gate.weight, block.experts.gate_up_proj, shared


@torch.no_grad()
def smooth_attention(norm, attn, act_max_D: Tensor, alpha: float) -> Tensor:
    """Fold SmoothQuant factors into `norm` (the layer's input_layernorm) and the q/k/v weights of
    the float attention `attn`; returns s."""
    consumers = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    s = smoothquant_factors(act_max_D, consumers, alpha)
    fold(norm.weight, consumers, s)
    return s


@torch.no_grad()
def smooth_mlp(norm, mlp, act_max_D: Tensor, alpha: float) -> Tensor:
    """Fold the smoothing of the MLP input into `norm` (post_attention_layernorm) and every reader
    of it: expert-aware factors for a float MoGE block, SmoothQuant factors for a dense SwiGLU.
    Returns s."""
    from moge.nn.moe import MoGEBlock

    if isinstance(mlp, MoGEBlock):
        router, gate_up, shared = moe_consumers(mlp)
        s = expert_aware_factors(act_max_D, router, gate_up, alpha)
        fold(norm.weight, [router, gate_up, *shared], s)
    else:
        consumers = [mlp.gate_proj.weight, mlp.up_proj.weight]
        s = smoothquant_factors(act_max_D, consumers, alpha)
        fold(norm.weight, consumers, s)
    return s
