"""Weight-only quantization for CPU decode: int8 or int4 weights, float activations.

Decoding a few sequences reads every activated weight once per token, so its speed is set by
the bytes of weights streamed; storing them in 8 or 4 bits and dequantizing in registers cuts
those bytes 4x or ~7x. Round-to-nearest, no calibration.

Schemes (the layout of each quantized [N, K] matrix, experts stacked as [E, N, K]):
- `int8-wo`: `weight` int8 [N, K] (-127..127) and `weight_scale` fp32 [N], symmetric per output
  channel: w = q * scale[n].
- `int4-wo`: `weight` uint8 [N, K/2] holding two 4-bit codes u (0..15) per byte and
  `weight_scale` fp32 [N, K/G], one scale per (output channel, group of G inputs along K).
  Symmetric (as GGUF q4_0): w = (u - 8) * scale; the scale is the group's largest-magnitude value
  over -8, so that value is exact. Asymmetric (`symmetric=False`, as q4_1) adds `weight_zero` fp32
  [N, K/G]: w = u * scale + zero with zero = the group minimum. Packing, in blocks of 32 along K:
  byte j of a block holds element j in its low nibble and element j + 16 in its high one, so one
  16-byte load unpacks into two vectors of 16 consecutive elements. G is a multiple of 32 that
  divides K.

Kernel: moge.kernels.gemv, the C++ few-row kernel the float model decodes with too: it dequantizes
in registers, splits output channels over torch's intra-op threads, reads each weight row once for
all input rows and, for experts, takes every row's expert id, so a token's K experts are one call.
Where it cannot be built, or from KERNEL_MAX_ROWS rows per matrix (prefill), or for tensors on an
accelerator, the same numbers come from a pure torch path (dequantize, then F.linear).
`MOGE_GEMV_KERNEL=torch` (or `moge.kernels.gemv.set_kernel("torch")`) forces that path.

Why symmetric int4 is the default: on the trained tiny model both variants change validation
perplexity by far less than 1% (symmetric -0.02%, asymmetric +0.11% at one checkpoint; +0.15% and
+0.06% at an earlier one: noise of the same size), and symmetric reads 20% fewer bytes per weight
(no zero points), so it decodes faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.errors import ConfigError
from moge.kernels import gemv as _gemv
from moge.nn.experts import expert_slots
from moge.nn.moe import MoGEBlock
from moge.quant.experts import QuantExperts
from moge.quant.int8 import MIN_SCALE, QuantLinear, quantize_per_channel

WO_SCHEMES = ("int8-wo", "int4-wo")
DEFAULT_GROUP_SIZE = 32
INT4_BLOCK = 32  # packing block along K (see the module docstring)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------


def check_group_size(group_size: int, in_dims: dict[str, int]) -> None:
    """group_size must be a positive multiple of 32 that divides every quantized input dim."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ConfigError(f"group_size={group_size!r} is invalid: give a positive multiple of {INT4_BLOCK}")
    bad = {k: v for k, v in in_dims.items() if v % group_size}
    if group_size % INT4_BLOCK or bad:
        dims = sorted(set(in_dims.values()))
        valid = [g for g in range(INT4_BLOCK, (min(dims) if dims else INT4_BLOCK) + 1, INT4_BLOCK)
                 if all(d % g == 0 for d in dims)]
        why = (f"it is not a multiple of {INT4_BLOCK}" if group_size % INT4_BLOCK else
               f"it does not divide the input dim of {', '.join(f'{k}={v}' for k, v in sorted(bad.items()))}")
        raise ConfigError(f"group_size={group_size} is invalid: {why}; valid group sizes for these input dims "
                          f"{dims}: {valid or 'none (an input dim is not a multiple of 32)'}")


def quantize_int8_wo(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale fp32 [..., N]): symmetric per output channel."""
    return quantize_per_channel(w)


def dequantize_int8_wo(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float().unsqueeze(-1)


def pack_int4(u: Tensor) -> Tensor:
    """Codes u (0..15) [..., N, K] -> uint8 [..., N, K/2] (block-of-32 layout, module docstring)."""
    *lead, N, K = u.shape
    if K % INT4_BLOCK:
        raise ValueError(f"pack_int4: K={K} must be a multiple of {INT4_BLOCK}")
    b = u.to(torch.uint8).reshape(*lead, N, K // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (b[..., 0, :] | (b[..., 1, :] << 4)).reshape(*lead, N, K // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., N, K/2] -> codes uint8 [..., N, K] (0..15); the inverse of `pack_int4`."""
    *lead, N, Kh = packed.shape
    b = packed.reshape(*lead, N, Kh // (INT4_BLOCK // 2), INT4_BLOCK // 2)
    return torch.stack([b & 0xF, b >> 4], -2).reshape(*lead, N, Kh * 2)


def quantize_int4_wo(w: Tensor, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True,
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """w [..., N, K] -> (packed uint8 [..., N, K/2], scale fp32 [..., N, K/G], zero fp32 or None)."""
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"weight must be a floating-point tensor [..., out, in], got {w.dtype} {tuple(w.shape)}")
    check_group_size(group_size, {"in_features": w.shape[-1]})
    w32 = w.detach().float()
    if not bool(torch.isfinite(w32).all()):
        raise ValueError(f"weight of shape {tuple(w.shape)} holds NaN/Inf values; cannot quantize it")
    *lead, N, K = w32.shape
    g = w32.reshape(*lead, N, K // group_size, group_size)
    if symmetric:
        idx = g.abs().argmax(-1, keepdim=True)
        peak = g.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude: it maps to code 0 (-8)
        scale = peak / -8.0
        scale = torch.where(scale.abs() < MIN_SCALE, torch.full_like(scale, MIN_SCALE), scale)
        u = torch.round(g / scale.unsqueeze(-1)).clamp_(-8, 7).add_(8)
        zero = None
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(MIN_SCALE)
        u = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15)
        zero = lo.contiguous()
    return pack_int4(u.reshape(*lead, N, K)), scale.contiguous(), zero


def dequantize_int4_wo(packed: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """The fp32 weights [..., N, K] that packed codes, scales (and zeros) stand for."""
    u = unpack_int4(packed).float()
    G = u.shape[-1] // scale.shape[-1]
    s = scale.float().repeat_interleave(G, -1)
    if zero is None:
        return (u - 8) * s
    return u * s + zero.float().repeat_interleave(G, -1)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


# From about 64 rows per matrix (prefill) the GEMV kernel, which re-reads the input for every
# weight row, is 1.2-1.6x slower than dequantizing once and calling the float GEMM (measured on
# an AVX-512 EPYC, 1 thread); below it the kernel wins 1.4-5x. So large row counts take the
# dequantize path.
KERNEL_MAX_ROWS = _gemv.MAX_ROWS


def _rows_per_matrix(row_expert: Tensor | None, rows: int, num_matrices: int) -> float:
    """Mean rows per weight matrix of one call, if the rows spread over the matrices evenly (as a
    balanced router spreads them): known from shapes alone, so nothing is read from the tensors
    (no host sync, no graph break under torch.compile)."""
    if row_expert is None or rows == 0:
        return float(rows)
    return rows / min(rows, num_matrices)


def _segments(row_expert: Tensor | None, rows: int) -> list[tuple[int, int, int]]:
    """(expert, first row, row count) for each run of equal expert ids (the torch path)."""
    if row_expert is None or row_expert.numel() == 0:
        return [(0, 0, rows)] if rows else []
    ids = row_expert.tolist()
    out, start = [], 0
    for r in range(1, rows + 1):
        if r == rows or ids[r] != ids[start]:
            out.append((ids[start], start, r - start))
            start = r
    return out


def wo_matmul(x_RK: Tensor, weight: Tensor, scale: Tensor, zero: Tensor | None = None,
              row_expert: Tensor | None = None) -> Tensor:
    """y [R, N] = x [R, K] @ dequant(weight[e(r)]).T in fp32, for int8 weights (scale [E, N]) or
    packed int4 ones (scale [E, N, K/G], optional zero), stacked [E, N, K or K/2] or one [N, ...]
    matrix. `row_expert` [R] (int64) names each row's expert, rows of one expert adjacent; None:
    every row uses expert 0 (a plain linear)."""
    x = x_RK if x_RK.dtype == torch.float32 else x_RK.float()
    int4 = weight.dtype == torch.uint8
    matrices = weight.shape[0] if weight.dim() == 3 else 1
    if x.device.type == "cpu" and _rows_per_matrix(row_expert, x.shape[0], matrices) < KERNEL_MAX_ROWS and \
            _gemv.available():
        return _gemv.gemv(x, weight, scale, row_expert, zero=zero,
                          group_size=x.shape[1] // scale.shape[-1] if int4 else 0)
    if weight.dim() == 2:  # one matrix: expert 0 of a stack
        weight, scale = weight.unsqueeze(0), scale.unsqueeze(0)
        zero = None if zero is None else zero.unsqueeze(0)
    y = x.new_empty(x.shape[0], weight.shape[1])
    for e, r0, n in _segments(row_expert, x.shape[0]):
        w = dequantize_int4_wo(weight[e], scale[e], None if zero is None else zero[e]) if int4 \
            else dequantize_int8_wo(weight[e], scale[e])
        y[r0:r0 + n] = F.linear(x[r0:r0 + n], w)
    return y


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _scheme_shapes(scheme: str, N: int, K: int, group_size: int) -> tuple[tuple[int, ...], torch.dtype, tuple]:
    if scheme == "int8-wo":
        return (N, K), torch.int8, (N,)
    if scheme == "int4-wo":
        check_group_size(group_size, {"in_features": K})
        return (N, K // 2), torch.uint8, (N, K // group_size)
    raise ConfigError(f"weight-only scheme={scheme!r} is invalid: choose one of {WO_SCHEMES}")


class WOLinear(nn.Module):
    """Weight-only drop-in for nn.Linear at inference: buffers `weight` (int8 [out, in] or packed
    int4 uint8 [out, in/2]), `weight_scale` (fp32 [out] or [out, in/G]), `weight_zero` (asymmetric
    int4 only) and `bias` (fp32 [out] or None). The input stays float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "int8-wo",
                 group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True, device=None):
        super().__init__()
        wshape, wdtype, sshape = _scheme_shapes(scheme, out_features, in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric if scheme == "int4-wo" else True
        self.register_buffer("weight", torch.zeros(wshape, dtype=wdtype, device=device))
        self.register_buffer("weight_scale", torch.ones(sshape, dtype=torch.float32, device=device))
        if not self.symmetric:
            self.register_buffer("weight_zero", torch.zeros(sshape, dtype=torch.float32, device=device))
        else:
            self.weight_zero = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: str = "int8-wo", group_size: int = DEFAULT_GROUP_SIZE,
                    symmetric: bool = True) -> WOLinear:
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme=scheme,
                  group_size=group_size, symmetric=symmetric, device=linear.weight.device)
        if scheme == "int8-wo":
            out.weight, out.weight_scale = quantize_int8_wo(linear.weight)
        else:
            out.weight, out.weight_scale, zero = quantize_int4_wo(linear.weight, group_size, symmetric)
            if zero is not None:
                out.weight_zero = zero
        if linear.bias is not None:
            out.bias = linear.bias.detach().float().clone()
        return out

    def dequantized_weight(self) -> Tensor:
        """The fp32 [out, in] weight this layer computes with (for references and error checks)."""
        if self.scheme == "int8-wo":
            return dequantize_int8_wo(self.weight, self.weight_scale)
        return dequantize_int4_wo(self.weight, self.weight_scale, self.weight_zero)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim={x.shape[-1]} does not match in_features={self.in_features}")
        lead = x.shape[:-1]
        y = wo_matmul(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.weight_zero)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        q = self.scheme if self.scheme == "int8-wo" else \
            f"{self.scheme}, group_size={self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {q}"


class WOExperts(nn.Module):
    """Weight-only drop-in for SwiGLUExperts at inference: `forward(x_TD, experts_TK, weights_TK)`.

    Buffers `gate_up_proj` [E, 2F, D(/2)] and `down_proj` [E, D, F(/2)] in the scheme's layout with
    `gate_up_scale` / `down_scale` (and `gate_up_zero` / `down_zero`, asymmetric int4). Rows are
    sorted by expert (`moge.nn.experts.expert_slots`) and each projection is one kernel call over
    all of them; one token skips the sort (its K expert ids go to the kernel as they are)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, scheme: str = "int8-wo",
                 group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = True, device=None):
        super().__init__()
        E, D, F_ = num_experts, hidden_size, intermediate_size
        if scheme == "int4-wo":
            check_group_size(group_size, {"hidden_size": D, "intermediate_size": F_})
        self.num_experts, self.hidden_size, self.intermediate_size = E, D, F_
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric if scheme == "int4-wo" else True
        for name, (n, k) in (("gate_up", (2 * F_, D)), ("down", (D, F_))):
            wshape, wdtype, sshape = _scheme_shapes(scheme, n, k, group_size)
            self.register_buffer(f"{name}_proj", torch.zeros((E, *wshape), dtype=wdtype, device=device))
            self.register_buffer(f"{name}_scale", torch.ones((E, *sshape), dtype=torch.float32, device=device))
            if not self.symmetric:
                self.register_buffer(f"{name}_zero", torch.zeros((E, *sshape), dtype=torch.float32, device=device))
            else:
                setattr(self, f"{name}_zero", None)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: nn.Module, scheme: str = "int8-wo", group_size: int = DEFAULT_GROUP_SIZE,
                     symmetric: bool = True) -> WOExperts:
        out = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, scheme=scheme,
                  group_size=group_size, symmetric=symmetric, device=experts.gate_up_proj.device)
        for name in ("gate_up", "down"):
            w = getattr(experts, f"{name}_proj")
            if scheme == "int8-wo":
                q, s = quantize_int8_wo(w)
                z = None
            else:
                q, s, z = quantize_int4_wo(w, group_size, symmetric)
            setattr(out, f"{name}_proj", q)
            setattr(out, f"{name}_scale", s)
            if z is not None:
                setattr(out, f"{name}_zero", z)
        return out

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """(gate_up [E, 2F, D], down [E, D, F]) in fp32, for references and error checks."""
        if self.scheme == "int8-wo":
            return (dequantize_int8_wo(self.gate_up_proj, self.gate_up_scale),
                    dequantize_int8_wo(self.down_proj, self.down_scale))
        return (dequantize_int4_wo(self.gate_up_proj, self.gate_up_scale, self.gate_up_zero),
                dequantize_int4_wo(self.down_proj, self.down_scale, self.down_zero))

    def _run(self, x_RD: Tensor, row_expert_R: Tensor) -> Tensor:
        f = self.intermediate_size
        h = wo_matmul(x_RD, self.gate_up_proj, self.gate_up_scale, self.gate_up_zero, row_expert_R)
        act = F.silu(h[:, :f]) * h[:, f:]
        return wo_matmul(act, self.down_proj, self.down_scale, self.down_zero, row_expert_R)

    def forward(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, backend: str | None = None) -> Tensor:
        del backend  # one kernel; the argument keeps the SwiGLUExperts signature
        T, D = x_TD.shape
        expert_R, order_R, (x_RD,) = expert_slots(experts_TK, x_TD.float())
        out_RD = self._run(x_RD, expert_R)
        if order_R is None:  # one token: its K rows in routing order, no sort
            return (weights_TK.float() @ out_RD).to(x_TD.dtype)
        w_R = weights_TK.reshape(-1).index_select(0, order_R).float()
        y_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, order_R // experts_TK.shape[1], out_RD.mul_(w_R[:, None]))
        return y_TD.to(x_TD.dtype)

    def extra_repr(self) -> str:
        q = self.scheme if self.scheme == "int8-wo" else \
            f"{self.scheme}, group_size={self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, {q}")


# ---------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------


def quantized_input_dims(model: nn.Module) -> dict[str, int]:
    """The input dims of the matrices weight-only quantization touches (what group_size must divide)."""
    cfg = model.config
    dims = {"hidden_size": cfg.hidden_size, "num_heads * head_size": cfg.num_heads * cfg.head_size}
    if cfg.num_experts:
        dims["expert_intermediate_size"] = cfg.expert_intermediate_size
        if cfg.shared_expert_intermediate_size:
            dims["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
    else:
        dims["intermediate_size"] = cfg.intermediate_size
    return dims


@torch.no_grad()
def quantize_weight_only(model: nn.Module, scheme: str = "int8-wo", *, group_size: int = DEFAULT_GROUP_SIZE,
                         symmetric: bool = True) -> dict[str, list[str]]:
    """Quantize a PanguProMoEForCausalLM in place, round-to-nearest: attention q/k/v/o, the routed
    experts, the shared expert(s) (or a dense MLP). The embeddings, every norm, the router and
    lm_head stay in floating point. Returns the quantized module names {"linear", "experts"}."""
    if scheme not in WO_SCHEMES:
        raise ConfigError(f"weight-only scheme={scheme!r} is invalid: choose one of {WO_SCHEMES}")
    if any(isinstance(m, (QuantLinear, QuantExperts, WOLinear, WOExperts)) for m in model.modules()):
        raise ConfigError("the model is already quantized")
    if scheme == "int4-wo":
        check_group_size(group_size, quantized_input_dims(model))
    model.float().eval()
    kw = {"scheme": scheme, "group_size": group_size, "symmetric": symmetric}
    names: dict[str, list[str]] = {"linear": [], "experts": []}

    def linear(parent: nn.Module, attr: str, prefix: str) -> None:
        setattr(parent, attr, WOLinear.from_linear(getattr(parent, attr), **kw))
        names["linear"].append(f"{prefix}.{attr}")

    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(layer.self_attn, attr, f"{prefix}.self_attn")
        mlp = layer.mlp
        swiglus = []
        if isinstance(mlp, MoGEBlock):
            mlp.experts = WOExperts.from_experts(mlp.experts, **kw)
            names["experts"].append(f"{prefix}.mlp.experts")
            if hasattr(mlp, "shared_expert"):
                swiglus.append((mlp.shared_expert, f"{prefix}.mlp.shared_expert"))
            for j, e in enumerate(getattr(mlp, "shared_experts", [])):
                swiglus.append((e, f"{prefix}.mlp.shared_experts.{j}"))
        else:
            swiglus.append((mlp, f"{prefix}.mlp"))
        for module, p in swiglus:
            for attr in ("gate_proj", "up_proj", "down_proj"):
                linear(module, attr, p)
    return names
