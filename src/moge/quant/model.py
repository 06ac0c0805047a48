"""W8A8 quantization of a whole Pangu Pro MoE / MoGE model, with calibrated smoothing.

What is quantized (int8 weights per output channel, int8 activations per token): the attention
projections q, k, v, o, the routed experts (stacked, `QuantExperts`) and the shared expert(s) (or
a dense layer's MLP). What stays in floating point: the embeddings, every RMSNorm, the router
(`mlp.router`: gate weight, router_scale, optional bias; it reads the float activation) and
lm_head.

Calibration (`quantize_model` with calibration windows) runs layer by layer, the quantized layers
so far feeding the next one, and chooses one migration strength alpha per smoothing site from a
small grid by router-logit alignment: the candidate that minimises

    MSE(logits_full, logits_quant) + KL(softmax(logits_full) || softmax(logits_quant))

of the router that the site's quantization error reaches first, compared with the float model
on the same calibration tokens. Because the router itself stays in floating point (and smoothing
is exact for it), that router is:
- attention site of layer l (input_layernorm -> q/k/v): the router of layer l, which reads the
  residual stream right after the quantized attention;
- MoE site of layer l (post_attention_layernorm -> router, experts, shared expert): the router of
  layer l+1 (after layer l+1's float attention); for the last layer, the next-token distribution
  of lm_head (same MSE + KL, over the vocabulary) on a sample of positions.
Every evaluation uses the real W8A8 kernels. The smoothing factors themselves follow
`moge.quant.smoothing` (expert-aware for the MoE site, as in arXiv 2505.21411).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.nn.moe import MoGEBlock
from moge.quant.experts import QuantExperts
from moge.quant.int8 import QuantLinear
from moge.quant.smoothing import smooth_attention, smooth_mlp
from moge.quant.weight_only import WOExperts, WOLinear

DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
FINAL_LOGIT_POSITIONS = 1024  # positions sampled for the last layer's lm_head objective


@dataclass
class QuantizationReport:
    attention_alpha: list[float | None] = field(default_factory=list)
    moe_alpha: list[float | None] = field(default_factory=list)
    # per layer and site: {alpha: objective} (mse + kl) for every alpha tried
    attention_scores: list[dict[float, dict[str, float]]] = field(default_factory=list)
    moe_scores: list[dict[float, dict[str, float]]] = field(default_factory=list)
    linear_modules: list[str] = field(default_factory=list)
    expert_modules: list[str] = field(default_factory=list)
    calibration_tokens: int = 0

    def to_dict(self) -> dict:
        def scores(rows):
            return [{f"{a:g}": v for a, v in row.items()} for row in rows]
        return {"attention_alpha": self.attention_alpha, "moe_alpha": self.moe_alpha,
                "attention_scores": scores(self.attention_scores), "moe_scores": scores(self.moe_scores),
                "calibration_tokens": self.calibration_tokens}


# ---------------------------------------------------------------------------------------------
# Module replacement
# ---------------------------------------------------------------------------------------------


def _quantize_attention(attn: nn.Module, prefix: str, report: QuantizationReport) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attn, name, QuantLinear.from_linear(getattr(attn, name)))
        report.linear_modules.append(f"{prefix}.{name}")


def _quantize_swiglu(mlp: nn.Module, prefix: str, report: QuantizationReport) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, QuantLinear.from_linear(getattr(mlp, name)))
        report.linear_modules.append(f"{prefix}.{name}")


def _quantize_mlp(mlp: nn.Module, prefix: str, report: QuantizationReport) -> None:
    if isinstance(mlp, MoGEBlock):
        mlp.experts = QuantExperts.from_experts(mlp.experts)
        report.expert_modules.append(f"{prefix}.experts")
        if hasattr(mlp, "shared_expert"):
            _quantize_swiglu(mlp.shared_expert, f"{prefix}.shared_expert", report)
        for j, expert in enumerate(getattr(mlp, "shared_experts", [])):
            _quantize_swiglu(expert, f"{prefix}.shared_experts.{j}", report)
    else:
        _quantize_swiglu(mlp, prefix, report)


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds quantized modules of any scheme (W8A8 or weight-only)."""
    return any(isinstance(m, (QuantLinear, QuantExperts, WOLinear, WOExperts)) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Calibration helpers
# ---------------------------------------------------------------------------------------------


def _alignment(ref: Tensor, got: Tensor) -> dict[str, float]:
    """MSE of the logits + KL(softmax(ref) || softmax(got)), per token."""
    ref, got = ref.float().reshape(-1, ref.shape[-1]), got.float().reshape(-1, got.shape[-1])
    mse = float((ref - got).pow(2).mean())
    kl = float(F.kl_div(torch.log_softmax(got, -1), torch.log_softmax(ref, -1), log_target=True,
                        reduction="batchmean"))
    return {"mse": mse, "kl": kl, "objective": mse + kl}


def _router_logits(layer: nn.Module, h: Tensor) -> Tensor:
    """The logits layer's router computes from the residual stream h (dense layers: the normed h)."""
    y = layer.post_attention_layernorm(h)
    if not isinstance(layer.mlp, MoGEBlock):
        return y
    return F.linear(y.reshape(-1, y.shape[-1]).float(), layer.mlp.router.gate.weight.float())


def _attn(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, i: int) -> Tensor:
    return h + layer.self_attn(layer.input_layernorm(h), cos, sin, None, i, None)


def _mlp(layer: nn.Module, h: Tensor) -> Tensor:
    return h + layer.mlp(layer.post_attention_layernorm(h))


@torch.no_grad()
def quantize_model(model: nn.Module, calibration_ids: Tensor | None = None, *, alpha: float | None = None,
                   alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID, smooth_attn: bool = True,
                   ) -> QuantizationReport:
    """Quantize `model` (a PanguProMoEForCausalLM) to W8A8 in place and return the report.

    With `calibration_ids` [windows, seq_len] the smoothing sites are calibrated layer by layer
    (see the module docstring): `alpha` fixes the migration strength, otherwise each site picks
    the best of `alpha_grid`. Without calibration data the weights are quantized as they are (no
    smoothing). The model is converted to fp32 first and should be in eval mode afterwards."""
    if is_quantized(model):
        raise ConfigError("the model is already quantized")
    grid = (float(alpha),) if alpha is not None else tuple(float(a) for a in alpha_grid)
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise ConfigError(f"alpha grid {grid!r} is invalid: give one or more migration strengths in [0, 1]")
    model.float().eval()
    report = QuantizationReport()
    layers = model.model.layers
    if calibration_ids is None:
        for i, layer in enumerate(layers):
            _quantize_attention(layer.self_attn, f"model.layers.{i}.self_attn", report)
            _quantize_mlp(layer.mlp, f"model.layers.{i}.mlp", report)
            report.attention_alpha.append(None)
            report.moe_alpha.append(None)
        return report
    if calibration_ids.dim() != 2 or calibration_ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"calibration_ids must be an integer tensor [windows, seq_len], got "
                         f"{calibration_ids.dtype} of shape {tuple(calibration_ids.shape)}")
    from moge.nn.model import rope_cos_sin

    ref = copy.deepcopy(model)  # the float model, untouched, for the alignment targets
    cfg = model.config
    ids = calibration_ids.long()
    W, S = ids.shape
    report.calibration_tokens = W * S
    positions = torch.arange(S).expand(W, S)
    cos, sin = rope_cos_sin(positions, cfg.head_size, cfg.rope_theta, cfg.max_position_embeddings)
    h_f = ref.model.embed_tokens(ids)
    h_q = h_f.clone()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(W * S, generator=gen)[:FINAL_LOGIT_POSITIONS]
    for i, layer in enumerate(layers):
        lf = ref.model.layers[i]
        mid_f = _attn(lf, h_f, cos, sin, i)
        out_f = _mlp(lf, mid_f)
        target_attn = _router_logits(lf, mid_f)
        if i + 1 < len(layers):
            nxt = ref.model.layers[i + 1]
            target_moe = _router_logits(nxt, _attn(nxt, out_f, cos, sin, i + 1))
        else:
            target_moe = ref.lm_head(ref.model.norm(out_f).reshape(W * S, -1)[sample])

        # attention site: input_layernorm -> q, k, v (o_proj is quantized without smoothing)
        act_max = layer.input_layernorm(h_q).abs().amax((0, 1))
        best = None
        scores: dict[float, dict[str, float]] = {}
        for a in grid:
            norm, attn = copy.deepcopy(layer.input_layernorm), copy.deepcopy(layer.self_attn)
            if smooth_attn:
                smooth_attention(norm, attn, act_max, a)
            _quantize_attention(attn, "", QuantizationReport())
            mid = h_q + attn(norm(h_q), cos, sin, None, i, None)
            scores[a] = _alignment(target_attn, _router_logits(layer, mid))
            if best is None or scores[a]["objective"] < best[0]:
                best = (scores[a]["objective"], a, norm, attn, mid)
            if not smooth_attn:
                break
        _, a_attn, layer.input_layernorm, layer.self_attn, mid_q = best
        report.attention_alpha.append(a_attn if smooth_attn else None)
        report.attention_scores.append(scores)
        report.linear_modules += [f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]

        # MLP site: post_attention_layernorm -> router, experts, shared expert
        act_max = layer.post_attention_layernorm(mid_q).abs().amax((0, 1))
        best = None
        scores = {}
        for a in grid:
            norm, mlp = copy.deepcopy(layer.post_attention_layernorm), copy.deepcopy(layer.mlp)
            smooth_mlp(norm, mlp, act_max, a)
            _quantize_mlp(mlp, "", QuantizationReport())
            out = mid_q + mlp(norm(mid_q))
            if i + 1 < len(layers):
                got = _router_logits(nxt, _attn(nxt, out, cos, sin, i + 1))
            else:
                got = ref.lm_head(ref.model.norm(out).reshape(W * S, -1)[sample])
            scores[a] = _alignment(target_moe, got)
            if best is None or scores[a]["objective"] < best[0]:
                best = (scores[a]["objective"], a, norm, mlp, out)
        _, a_moe, layer.post_attention_layernorm, layer.mlp, h_q = best
        report.moe_alpha.append(a_moe)
        report.moe_scores.append(scores)
        _quantize_mlp_names(layer.mlp, f"model.layers.{i}.mlp", report)
        h_f = out_f
    return report


def _quantize_mlp_names(mlp: nn.Module, prefix: str, report: QuantizationReport) -> None:
    """Record the names of an already quantized MLP's modules."""
    for name, module in mlp.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(module, QuantLinear):
            report.linear_modules.append(full)
        elif isinstance(module, QuantExperts):
            report.expert_modules.append(full)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights: the quantized matrices (int8 + fp32 scales), what those
    matrices take in fp32, and everything kept in floating point (embeddings, norms, routers,
    lm_head, biases). Tied tensors are counted once."""
    seen: set[int] = set()
    quant_int8 = quant_scales = quant_fp32_equiv = other = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            quant_int8 += module.weight.numel()
            quant_scales += module.weight_scale.numel() * 4
            quant_fp32_equiv += module.weight.numel() * 4
        elif isinstance(module, QuantExperts):
            quant_int8 += module.gate_up_proj.numel() + module.down_proj.numel()
            quant_scales += (module.gate_up_scale.numel() + module.down_scale.numel()) * 4
            quant_fp32_equiv += (module.gate_up_proj.numel() + module.down_proj.numel()) * 4
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or t.dtype == torch.int8 or name.endswith(("weight_scale", "gate_up_scale",
                                                                           "down_scale")):
            continue
        seen.add(t.data_ptr())
        other += t.numel() * t.element_size()
    return {"quantized_int8_bytes": quant_int8, "quantized_scale_bytes": quant_scales,
            "quantized_as_fp32_bytes": quant_fp32_equiv, "float_bytes": other,
            "total_bytes": quant_int8 + quant_scales + other}

