"""Hand-computed costs: rooflines, collectives and a whole decode step of a small dense model."""

import dataclasses
import math

import pytest

from moge.config import ModelConfig
from moge.sim.collectives import collective_time_s
from moge.sim.cost import CostModel, StepShape
from moge.sim.hardware import Efficiency, HardwareProfile, LinkLevel
from moge.sim.plans import ParallelPlan
from moge.sim.quant import quant_scheme
from moge.sim.simulate import Scenario, simulate

# Every stream at its peak, no fixed costs, no padding, and a cache that holds every operand.
PERFECT = Efficiency(compute=1.0, weight_stream=1.0, kv_attention=1.0, elementwise=1.0, link=1.0, kernel_us=0.0,
                     host_us=0.0, attn_seq_us=0.0, gmm_rel=1.0, gmm_tile_m=1.0, gemm_tile=1.0, cache_mib=1e9,
                     name="perfect")


def toy_hw(**kw) -> HardwareProfile:
    base = dict(name="toy", peak_tflops={"bf16": 100.0, "int8": 200.0}, memory_gib=80.0,
                memory_bandwidth_GBps=1000.0,
                links=(LinkLevel("mesh", 8, "full_mesh", 70.0, 0.0), LinkLevel("net", 1024, "ring", 10.0, 0.0)),
                efficiency=PERFECT)
    base.update(kw)
    return HardwareProfile(**base)


def toy_model(**kw) -> ModelConfig:
    base = dict(vocab_size=32000, hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8, num_experts=0,
                top_k=1, num_groups=1, router="topk", intermediate_size=11008, shared_expert_intermediate_size=0,
                attention_bias=False, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return ModelConfig(**base)


def cost_model(hw=None, model=None, quant="bf16", plan=None):
    return CostModel(model or toy_model(), hw or toy_hw(), plan or ParallelPlan(), quant_scheme(quant), None)


def test_gemm_memory_bound_by_hand():
    cm = cost_model()
    # [1, 4096] x [4096, 4096] bf16: 2*4096*4096 FLOPs; bytes = 4096*4096*2 + 4096*2 + 4096*2
    op = cm.gemm("g", 1, 4096, 4096, 2, 2, 2, "bf16")
    bytes_ = 4096 * 4096 * 2 + 2 * 4096 * 2
    assert op.bound == "memory"
    assert op.time_s == pytest.approx(bytes_ / 1000e9, rel=1e-12)
    assert op.flops == 2 * 4096 * 4096


def test_gemm_compute_bound_by_hand():
    cm = cost_model()
    m = k = n = 8192  # intensity ~ 2730 FLOP/byte, far above the 100 FLOP/byte ridge
    op = cm.gemm("g", m, k, n, 2, 2, 2, "bf16")
    assert op.bound == "compute"
    assert op.time_s == pytest.approx(2 * m * k * n / 100e12, rel=1e-12)
    # int8 GEMMs use the int8 peak
    assert cm.gemm("g8", m, k, n, 1, 1, 2, "int8").time_s == pytest.approx(2 * m * k * n / 200e12, rel=1e-12)


def test_efficiency_divides_peaks():
    half = dataclasses.replace(PERFECT, compute=0.5, elementwise=0.25)
    cm = cost_model(hw=toy_hw(efficiency=half))
    assert cm.gemm("g", 8192, 8192, 8192, 2, 2, 2, "bf16").time_s == pytest.approx(2 * 8192**3 / 50e12)
    assert cm.elementwise("e", 1e9).time_s == pytest.approx(1e9 / 250e9)


def test_collectives_by_hand():
    mesh = LinkLevel("mesh", 8, "full_mesh", 70.0, 5.0)  # 10 GB/s to each of 7 peers
    s = 8e6
    # reduce-scatter over 4 of the 8: 3 links = 30 GB/s; wire (3/4) s; one step of 5 us
    assert collective_time_s("reduce_scatter", s, 4, mesh, 1.0) == pytest.approx(5e-6 + 0.75 * s / 30e9)
    assert collective_time_s("all_gather", s, 8, mesh, 1.0) == pytest.approx(5e-6 + 7 / 8 * s / 70e9)
    assert collective_time_s("all_reduce", s, 2, mesh, 1.0) == pytest.approx(10e-6 + s / 10e9)
    ring = LinkLevel("pcie", 16, "pcie", 20.0, 10.0)
    assert collective_time_s("all_reduce", s, 4, ring, 0.5) == pytest.approx(6 * 10e-6 + 1.5 * s / 10e9)
    switch = LinkLevel("nvl", 8, "switch", 400.0, 2.0)
    assert collective_time_s("all_gather", s, 8, switch, 1.0) == pytest.approx(3 * 2e-6 + 7 / 8 * s / 400e9)
    assert collective_time_s("all_to_all", s, 8, switch, 1.0) == pytest.approx(2e-6 + s / 400e9)
    assert collective_time_s("all_reduce", s, 1, switch, 1.0) == 0.0


def test_decode_attention_reads_the_kv_cache():
    cm = cost_model()
    ops, _ = cm.layer_ops(StepShape(seqs=8, tokens_per_seq=1, context_len=4096, logits_per_seq=1))
    attn = next(o for o in ops if o.name == "attention")
    kv = 8 * 4096 * 2 * 8 * 128 * 2  # seqs * keys * (K,V) * kv_heads * head_dim * bf16
    assert attn.kv_bytes == kv
    assert attn.time_s == pytest.approx((kv + 8 * 32 * 128 * 2 * 2) / 1000e9)


def test_whole_decode_step_by_hand():
    """Batch 1 on one device, no overheads: the step is the bytes streamed over the bandwidth."""
    model, hw = toy_model(), toy_hw()
    r = simulate(Scenario(model, hw, cards=1, batch=1, input_len=1024, quant="bf16", plan=ParallelPlan(name="dp")))
    d, layers, v = 4096, 4, 32000
    per_layer_weights = (d * (32 + 2 * 8) * 128 + 32 * 128 * d + 3 * d * 11008) * 2
    kv = 1025 * 2 * 8 * 128 * 2 * layers
    weights = layers * per_layer_weights + v * d * 2  # lm_head; embedding is a row gather
    expected = (weights + kv) / 1000e9
    assert r.tpot_ms / 1e3 == pytest.approx(expected, rel=0.01)  # activations are the last 1%
    assert r.cost.traffic["weights"] == pytest.approx(weights, rel=1e-9)
    assert r.cost.traffic["kv_cache"] == pytest.approx(kv, rel=1e-9)


def test_prefill_is_compute_bound_by_hand():
    model, hw = toy_model(), toy_hw()
    r = simulate(Scenario(model, hw, cards=1, stage="prefill", batch=4, input_len=2048, quant="bf16",
                          plan=ParallelPlan(name="dp")))
    t, d = 4 * 2048, 4096
    gemm = 2 * t * 4 * (d * (32 + 2 * 8) * 128 + 32 * 128 * d + 3 * d * 11008)
    attn = 4 * 4 * 2048 * (2048 - 2047 / 2) * 128 * 32 * 4  # causal QK^T and PV, 4 sequences, 4 layers
    head = 32000 * d * 2 + 4 * d * 2 + 4 * 32000 * 4  # lm_head on 4 last tokens: memory bound
    # memory-bound elementwise work: two norms + residual adds, RoPE and the KV append, per layer;
    # then embedding gather, final norm and sampling
    elementwise = (4 * (2 * t * d * 8 + t * (32 + 8) * 128 * 4 + t * 2 * 8 * 128 * 2)
                   + t * d * 4 + 4 * d * 6 + 4 * 32000 * 8)
    expected = (gemm + attn) / 100e12 + (head + elementwise) / 1000e9
    assert r.ttft_ms / 1e3 == pytest.approx(expected, rel=1e-3)
    assert r.throughput_tok_s == pytest.approx(t / (r.ttft_ms / 1e3))


def test_tensor_parallel_adds_the_all_reduce_by_hand():
    model, hw = toy_model(), toy_hw()
    plan = ParallelPlan(attn_tp=2, dense_tp=2, comm_rewrite=False, name="tp")
    cm = CostModel(model, hw, plan, quant_scheme("bf16"), None)
    ops, _ = cm.layer_ops(StepShape(16, 1, 1024, 1))
    ar = [o for o in ops if o.name.endswith("all_reduce")]
    assert len(ar) == 2  # after attention and after the MLP
    s = 16 * 4096 * 2
    for o in ar:  # 2 devices of an 8-mesh use one 10 GB/s link
        assert o.time_s == pytest.approx(2 * 0.5 * s / 10e9)
    assert math.isclose(sum(o.time_s for o in ar), 2 * s / 10e9)
