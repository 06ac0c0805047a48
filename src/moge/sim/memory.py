"""Memory per device: weights, KV cache, workspace and a runtime reserve, and the batch limit.

The fullest device is reported (the last pipeline stage, which also holds lm_head and the MTP
module). Weights follow the plan's splits; the KV cache holds every sequence of the busiest
attention DP rank at its full length (prompt + output + draft tokens); the workspace is a coarse
estimate of live activations for one step (no activation recomputation or chunking modelled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moge.config import ModelConfig
from moge.sim.hardware import HardwareProfile
from moge.sim.plans import ParallelPlan, kv_heads_per_device
from moge.sim.quant import QuantScheme

GB = 1e9


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: float
    kv_cache_bytes: float
    workspace_bytes: float
    reserved_bytes: float
    capacity_bytes: float
    devices_per_card: int
    weights_detail: dict

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes + self.reserved_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    def as_dict(self) -> dict:
        c = self.devices_per_card
        return {"per_device_gb": {"weights": self.weights_bytes / GB, "kv_cache": self.kv_cache_bytes / GB,
                                  "workspace": self.workspace_bytes / GB, "reserved": self.reserved_bytes / GB,
                                  "total": self.total_bytes / GB, "capacity": self.capacity_bytes / GB},
                "per_card_gb": self.total_bytes * c / GB, "capacity_per_card_gb": self.capacity_bytes * c / GB,
                "fits": self.fits,
                "weights_detail_gb": {k: v / GB for k, v in self.weights_detail.items()}}

    def describe(self) -> str:
        return (f"needs {self.total_bytes / GB:.1f} GB per device (weights {self.weights_bytes / GB:.1f}, "
                f"KV cache {self.kv_cache_bytes / GB:.1f}, workspace {self.workspace_bytes / GB:.1f}, "
                f"reserve {self.reserved_bytes / GB:.1f}) of {self.capacity_bytes / GB:.1f} GB")


def layer_weight_bytes(model: ModelConfig, plan: ParallelPlan, quant: QuantScheme) -> dict[str, float]:
    """Bytes of one decoder layer's weights on one device, by module."""
    m, p, q = model, plan, quant
    d, hd = m.hidden_size, m.head_size
    h_loc, kv_loc = m.num_heads // p.attn_tp, kv_heads_per_device(m, p)
    wb, fb = q.weight_bytes, q.float_bytes
    attn = (d * (h_loc + 2 * kv_loc) * hd + h_loc * hd * d) * wb
    if m.attention_bias:
        attn += ((h_loc + 2 * kv_loc) * hd + d) * fb
    scales = 4.0 if wb < 2 else 0.0  # per-output-channel fp32 scales of quantized GEMMs
    out = {"attention": attn, "norms": 2 * d * fb}
    if m.is_moe:
        width = m.expert_intermediate_size / p.expert_tp
        per_expert = 3 * d * width * wb + (2 * width + d) * scales
        out["router"] = d * m.num_experts * fb + m.num_experts * 4
        out["routed_experts"] = m.num_experts / p.expert_ep * per_expert
        if m.shared_expert_intermediate_size:
            w = m.shared_expert_intermediate_size / p.dense_tp
            out["shared_expert"] = 3 * d * w * wb + (2 * w + d) * scales
    else:
        w = m.intermediate_size / p.dense_tp
        out["mlp"] = 3 * d * w * wb + (2 * w + d) * scales
    return out


def weight_bytes(model: ModelConfig, plan: ParallelPlan, quant: QuantScheme, mtp: bool = False) -> dict[str, float]:
    """Weights on the fullest device (last pipeline stage), by module."""
    m, p = model, plan
    layers = math.ceil(m.num_layers / p.pp)
    per_layer = layer_weight_bytes(model, plan, quant)
    out = {k: v * layers for k, v in per_layer.items()}
    vocab = m.vocab_size * m.hidden_size * quant.float_bytes / p.stage_devices  # vocab-parallel
    if p.pp == 1 or m.tie_word_embeddings:
        out["embedding"] = vocab
    out["lm_head"] = 0.0 if m.tie_word_embeddings else vocab
    if mtp:
        out["mtp"] = (sum(per_layer.values()) + 2 * m.hidden_size * m.hidden_size / p.attn_tp * quant.weight_bytes
                      + 2 * m.hidden_size * quant.float_bytes)
    return out


def memory_report(model: ModelConfig, hw: HardwareProfile, plan: ParallelPlan, quant: QuantScheme, seqs: int,
                  cache_tokens_per_seq: int, step_tokens_per_seq: int, logits_per_seq: int,
                  mtp_draft: int = 0) -> MemoryReport:
    """Memory of the fullest device when one replica serves `seqs` sequences.

    cache_tokens_per_seq  KV-cache length each sequence must be able to reach
    step_tokens_per_seq   tokens per sequence processed in one forward (sizes the workspace)
    """
    m, p, q = model, plan, quant
    d = m.hidden_size
    w = weight_bytes(model, plan, quant, mtp=mtp_draft > 0)
    layers = math.ceil(m.num_layers / p.pp) + (1 if mtp_draft else 0)
    seqs_a = math.ceil(seqs / p.attn_dp)
    kv = seqs_a * cache_tokens_per_seq * layers * 2 * kv_heads_per_device(m, p) * m.head_size * q.kv_bytes
    t_a = seqs_a * step_tokens_per_seq
    t_all = t_a * p.attn_dp if p.layout(m) == "stage" else t_a
    ws = t_all * d * q.float_bytes * 6
    if m.is_moe:
        routed_rows = 1.3 * t_all * m.top_k / p.expert_ep  # busiest device, with some imbalance
        ws += routed_rows * (d + 3 * m.expert_intermediate_size / p.expert_tp) * q.float_bytes
        if m.shared_expert_intermediate_size:
            ws += t_all * 3 * m.shared_expert_intermediate_size / p.dense_tp * q.float_bytes
    else:
        ws += t_all * 3 * m.intermediate_size / p.dense_tp * q.float_bytes
    ws += seqs_a * p.attn_dp * logits_per_seq * m.vocab_size / p.stage_devices * 4 * 2
    return MemoryReport(weights_bytes=sum(w.values()), kv_cache_bytes=kv, workspace_bytes=ws,
                        reserved_bytes=hw.reserved_memory_gib * 1024**3, capacity_bytes=hw.memory_bytes,
                        devices_per_card=hw.devices_per_card, weights_detail=w)


def max_batch(fits, upper: int = 1 << 22) -> int:
    """Largest batch b in [0, upper] with fits(b) true, assuming fits is monotone (0 = none fits)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
