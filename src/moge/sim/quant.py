"""Quantization schemes: how many bytes each tensor class costs and which peak a GEMM runs at.

Only the sizes matter to the simulator, not the numerics. Conventions (documented in
docs/simulator.md):
- Transformer-layer GEMM weights (attention, router excluded, experts, shared expert) take
  `weight_bytes`; embedding and lm_head stay in 16 bit, as is usual for W8A8 deployments.
- GEMM inputs take `act_bytes` (per-token int8 under W8A8/W4A8); GEMM outputs, residuals and
  partial sums that are reduced across devices stay 16 bit.
- W4A8 unpacks int4 weights to int8 on the fly, so it computes at the int8 peak.
- Attention (QK^T, softmax, PV) runs in 16 bit even when the KV cache is int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from moge.errors import ConfigError

KV_CACHE_CHOICES = ("auto", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    weight_bytes: float  # per weight element of a quantized GEMM
    act_bytes: float  # per element of a GEMM input (and of gathered, already quantized activations)
    gemm_dtype: str  # key into HardwareProfile.peak_tflops for quantized GEMMs
    kv_bytes: float  # per KV-cache element
    float_bytes: float = 2.0  # 16-bit tensors: outputs, residual stream, partial sums, lm_head
    float_dtype: str = "bf16"

    @property
    def quantized_activations(self) -> bool:
        return self.act_bytes < self.float_bytes


_SCHEMES = {
    "bf16": dict(weight_bytes=2.0, act_bytes=2.0, gemm_dtype="bf16", float_dtype="bf16"),
    "fp16": dict(weight_bytes=2.0, act_bytes=2.0, gemm_dtype="fp16", float_dtype="fp16"),
    "w8a8": dict(weight_bytes=1.0, act_bytes=1.0, gemm_dtype="int8", float_dtype="fp16"),
    "w4a8": dict(weight_bytes=0.5, act_bytes=1.0, gemm_dtype="int8", float_dtype="fp16"),
}
QUANT_CHOICES = tuple(_SCHEMES)


def quant_scheme(name: str, kv_cache: str = "auto") -> QuantScheme:
    """A scheme by name. kv_cache='auto' means int8 KV under W8A8/W4A8 (the paper quantises the
    KV cache alongside W8A8) and 16 bit otherwise."""
    if name not in _SCHEMES:
        raise ConfigError(f"quant={name!r} is invalid: choose one of {QUANT_CHOICES}")
    if kv_cache not in KV_CACHE_CHOICES:
        raise ConfigError(f"kv_cache={kv_cache!r} is invalid: choose one of {KV_CACHE_CHOICES}")
    spec = _SCHEMES[name]
    if kv_cache == "auto":
        kv_bytes = 1.0 if spec["act_bytes"] < 2 else 2.0
        kv_name = "int8" if kv_bytes == 1 else spec["float_dtype"]
    else:
        kv_bytes = 1.0 if kv_cache == "int8" else 2.0
        kv_name = kv_cache
    return QuantScheme(name=f"{name}+kv-{kv_name}", kv_bytes=kv_bytes, **spec)
