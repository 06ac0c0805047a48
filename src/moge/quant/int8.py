"""W8A8 building blocks: symmetric int8 quantization and an exact integer matmul.

Weights: per output channel (one fp32 scale per row of the [out, in] matrix), symmetric, values
in -127..127 (-128 is never produced, so the range is symmetric). Activations: per token (one
scale per row of the input), symmetric, computed on the fly from the row's max |x| ("dynamic").

The product of two quantized operands is computed in integers, then dequantized once:

    y[m, n] = (sum_k qx[m, k] * qw[n, k]) * sx[m] * sw[n] (+ bias[n])

Three exact integer kernels compute the int32 sum (`int8_mm`); they give identical results:
- `gemv`: moge.kernels.gemv's int8 kernel (AVX-512 VNNI, every thread, a stack of matrices with
  one expert id per row, so a layer's routed experts are one call). As fast as `int_mm` up to
  about 16 rows per matrix and 2x slower from 64 (measured in docs/benchmarks.md), so `auto` uses
  it for at most GEMV_MAX_ROWS rows per matrix, on CPUs with VNNI where it builds.
- `int_mm`: `torch._int_mm` (int8 x int8 -> int32). Constraints in torch 2.13: on CPU none (any
  M, K, N >= 0, any strides); on CUDA M > 16 and K, N multiples of 8, so `int8_mm` pads with
  zeros there (exact: zeros add nothing). On CPU it is fast only where oneDNN's int8 path applies
  (AVX512-VNNI / AMX); on an AVX2-only CPU it runs a plain loop, 7-17x slower than the next one
  (measured in docs/benchmarks.md).
- `int32`: the int8 operands widened to int32 and multiplied with torch.mm (integer arithmetic,
  exact while K * 127 * 127 < 2**31, i.e. K < 133,000). Weights stay int8 in memory.
`auto` (the default) picks `gemv` for few rows as above, otherwise `int_mm` on CUDA and on CPUs
whose flags show avx512_vnni, avx_vnni or amx_int8, `int32` elsewhere; `set_int8_kernel` or the
MOGE_INT8_KERNEL environment variable override it, and `int8_kernel()` names what runs. Neither
`int_mm` nor `int32` beats an fp32 SGEMM on an AVX2-only CPU: see docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moge.kernels import gemv as _gemv

QMAX = 127
# The smallest scale: a row of zeros quantizes to zeros with this scale (no division by zero).
MIN_SCALE = 1e-12


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: w [..., N, K] -> (q int8 [..., N, K], scale fp32 [..., N]),
    with w ~= q * scale[..., None] and |w - q * scale| <= scale / 2 elementwise."""
    _check_float("weight", w)
    if w.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [..., out, in], got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    if not bool(torch.isfinite(w32).all()):
        raise ValueError(f"weight of shape {tuple(w.shape)} holds NaN/Inf values; cannot quantize it")
    scale = (w32.abs().amax(-1) / QMAX).clamp_min(MIN_SCALE)
    q = torch.round(w32 / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per token (row), dynamic: x [M, K] -> (q int8 [M, K], scale fp32 [M])."""
    x32 = x.float()
    scale = (x32.abs().amax(-1, keepdim=True) / QMAX).clamp_min_(MIN_SCALE)
    q = torch.round(x32 / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.squeeze(-1)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q [..., N, K] int8 with scale [..., N] (per row) -> fp32."""
    return q.float() * scale.float().unsqueeze(-1)


def int8_mm(a_MK: Tensor, b_NK: Tensor) -> Tensor:
    """Exact int32 product a @ b.T of two int8 matrices (b given as [N, K], like a weight)."""
    for name, t in (("a", a_MK), ("b", b_NK)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8:
            found = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"int8_mm: {name} must be an int8 tensor, got {found}")
        if t.dim() != 2:
            raise ValueError(f"int8_mm: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a_MK.shape[1] != b_NK.shape[1]:
        raise ValueError(f"int8_mm: inner dims differ: a is {tuple(a_MK.shape)}, b is {tuple(b_NK.shape)} "
                         f"(both must be [*, K])")
    if a_MK.device.type == "cuda":
        return _int_mm_padded(a_MK, b_NK)
    if int8_kernel(a_MK.shape[0]) == "gemv":
        return _gemv.int8_gemv(a_MK, b_NK)
    # K = 1 (an outer product) goes to the int32 kernel whatever is chosen: torch 2.13's _int_mm on
    # AVX512-VNNI CPUs returns uninitialised memory for a contiguous [M, 1] operand (strides (1, 1)).
    if int8_kernel() == "int32" or a_MK.shape[1] == 1:
        return torch.mm(a_MK.to(torch.int32), b_NK.to(torch.int32).t())
    return torch._int_mm(a_MK, b_NK.t())


KERNELS = ("auto", "gemv", "int_mm", "int32")
GEMV_MAX_ROWS = 16  # rows per weight matrix up to which `auto` takes the gemv kernel
_kernel = os.environ.get("MOGE_INT8_KERNEL", "auto")


def set_int8_kernel(kernel: str) -> None:
    """Choose the CPU integer kernel: auto, int_mm or int32 (same results, different speed)."""
    global _kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is invalid: choose one of {KERNELS}")
    _kernel = kernel


def int8_kernel(rows: float | None = None) -> str:
    """The CPU kernel `int8_mm` uses for `rows` rows per weight matrix: gemv, int_mm or int32.
    Without `rows`, what `auto` resolves to, for reports: "gemv+int_mm" means gemv up to
    GEMV_MAX_ROWS rows per matrix and int_mm beyond."""
    if _kernel not in KERNELS:
        raise ValueError(f"MOGE_INT8_KERNEL={_kernel!r} is invalid: choose one of {KERNELS}")
    if _kernel == "gemv":
        if not _gemv.available():
            raise RuntimeError(f"int8 kernel 'gemv' is unavailable: {_gemv._build()}")
        return "gemv"
    if _kernel != "auto":
        return _kernel
    large = "int_mm" if _cpu_has_int8_dot() else "int32"
    if not (_gemv.available() and _gemv.vnni()):
        return large
    if rows is None:
        return f"gemv+{large}"
    return "gemv" if rows <= GEMV_MAX_ROWS else large


@functools.cache
def _cpu_has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (x86 VNNI / AMX), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return True  # unknown platform: trust torch._int_mm


def _int_mm_padded(a_MK: Tensor, b_NK: Tensor) -> Tensor:
    """CUDA's _int_mm wants M > 16 and K, N multiples of 8: pad with zero rows/columns."""
    M, K = a_MK.shape
    N = b_NK.shape[0]
    pm, pk, pn = max(0, 17 - M), -K % 8, -N % 8
    a = F.pad(a_MK, (0, pk, 0, pm)) if pm or pk else a_MK
    b = F.pad(b_NK, (0, pk, 0, pn)) if pk or pn else b_NK
    return torch._int_mm(a.contiguous(), b.contiguous().t())[:M, :N]


def int8_linear(x: Tensor, q_weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """W8A8 linear: x [..., K] (float) quantized per token, times the int8 weight [N, K] in
    integers, dequantized in fp32 (+ bias); returned in x's dtype."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    q, s = quantize_per_token(x.reshape(-1, K))
    acc = int8_mm(q, q_weight)
    y = acc.float().mul_(s.unsqueeze(-1)).mul_(weight_scale)
    if bias is not None:
        y = y.add_(bias)
    return y.view(*lead, q_weight.shape[0]).to(x.dtype)


class QuantLinear(nn.Module):
    """A W8A8 replacement for nn.Linear: buffers `weight` (int8 [out, in]), `weight_scale`
    (fp32 [out]) and `bias` (fp32 [out] or None). Holds no parameters: it is for inference."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        out.weight, out.weight_scale = quantize_per_channel(linear.weight)
        if linear.bias is not None:
            out.bias = linear.bias.detach().float().clone()
        return out

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.weight, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim={x.shape[-1]} does not match in_features={self.in_features}")
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, W8A8"
