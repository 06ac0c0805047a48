"""Hand-computed costs of each term of the cost model: separate memory streams, tile re-reads,
grouped GEMM padding, host/device time, overlap, shared PCIe, voted experts and MTP acceptance."""

import dataclasses

import pytest

from moge.config import PRESETS
from moge.errors import ConfigError
from moge.sim.collectives import collective_time_s
from moge.sim.cost import CostModel, StepShape
from moge.sim.hardware import LinkLevel, load_hardware
from moge.sim.plans import ParallelPlan, plan_preset
from moge.sim.quant import quant_scheme
from moge.sim.simulate import Scenario, simulate
from moge.sim.straggler import parse_routing

from test_sim_roofline import PERFECT, toy_hw, toy_model

BW = 1000e9  # toy_hw: 1000 GB/s, 100 TFLOPS bf16, 200 TOPS int8


def cm_with(quant="bf16", model=None, plan=None, **eff):
    hw = toy_hw(efficiency=dataclasses.replace(PERFECT, **eff))
    return CostModel(model or toy_model(), hw, plan or ParallelPlan(), quant_scheme(quant), None)


def test_three_memory_streams_have_their_own_efficiency():
    cm = cm_with(weight_stream=0.5, kv_attention=0.25, elementwise=0.8, attn_seq_us=2.0)
    g = cm.gemm("g", 1, 4096, 4096, 2, 2, 2, "bf16")
    assert g.time_s == pytest.approx((4096 * 4096 * 2 + 2 * 4096 * 2) / (BW * 0.5))
    assert cm.elementwise("e", 1e6).time_s == pytest.approx(1e6 / (BW * 0.8))
    a = cm.attention("a", 1e3, 8e6, 1e5, 8, "bf16")
    assert a.time_s == pytest.approx(8e6 / (BW * 0.25) + 1e5 / (BW * 0.8) + 8 * 2e-6)
    # inside a layer: the KV cache is read at kv_attention, independent of weight_stream
    ops, _ = cm.layer_ops(StepShape(seqs=8, tokens_per_seq=1, context_len=4096, logits_per_seq=1))
    attn = next(o for o in ops if o.name == "attention")
    kv = 8 * 4096 * 2 * 8 * 128 * 2
    assert attn.time_s == pytest.approx(kv / (BW * 0.25) + 8 * 32 * 128 * 2 * 2 / (BW * 0.8) + 8 * 2e-6)


def test_gemm_tile_rereads_by_hand():
    """An operand larger than the cache is re-read once per tile of the other operand's rows."""
    cm = cm_with(gemm_tile=128, cache_mib=1.0)
    m = k = n = 1024
    op = cm.gemm("g", m, k, n, 2, 2, 2, "bf16")  # A and W are 2 MiB each, over the 1 MiB cache
    traffic = k * n * 2 * (m / 128) + m * k * 2 * (n / 128) + m * n * 2
    assert op.bytes == pytest.approx(traffic)
    assert op.time_s == pytest.approx(max(2 * m * k * n / 100e12, traffic / BW))
    assert op.bound == "memory"  # 8 re-reads push a 341 FLOP/byte GEMM under the 100 FLOP/byte ridge
    big_cache = cm_with(gemm_tile=128, cache_mib=64.0).gemm("g", m, k, n, 2, 2, 2, "bf16")
    assert big_cache.bytes == pytest.approx(3 * 1024 * 1024 * 2)
    assert big_cache.bound == "compute"


def test_grouped_gemm_pads_each_expert_and_runs_at_gmm_rel():
    model = PRESETS["moge-tiny"]
    cm = cm_with(quant="w8a8", model=model, gmm_rel=0.5, gmm_tile_m=16.0, compute=0.8)
    d, width, rows, active = model.hidden_size, 64, 3000.0, 4.0
    op = cm.grouped_swiglu("x", rows, width, active)
    t_c = 2 * 3 * d * width * (rows + active * 8) / (200e12 * 0.8 * 0.5)
    nbytes = 3 * d * width * active + rows * (d + 2 * width * 2 + width + d * 2)
    assert op.time_s == pytest.approx(max(t_c, nbytes / BW))
    assert op.weight_bytes == 3 * d * width * active
    few = cm.grouped_swiglu("x", 4.0, width, 4.0)  # one row per expert: padding dominates the compute
    assert few.flops == 2 * 3 * d * width * 4


def test_graph_and_eager_mode_by_hand():
    model = toy_model()
    hw = toy_hw(efficiency=dataclasses.replace(PERFECT, kernel_us=2.0, host_us=50.0))
    kw = dict(cards=1, batch=1, input_len=256, quant="bf16", plan=ParallelPlan(name="dp"))
    graph = simulate(Scenario(model, hw, exec_mode="graph", **kw))
    eager = simulate(Scenario(model, hw, exec_mode="eager", **kw))
    launches = graph.cost.launches
    assert graph.breakdown_ms()["overhead"] == pytest.approx(launches * 2e-3)
    host_ms = launches * 50e-3
    assert host_ms > graph.step_ms  # tiny kernels: the host cannot keep up
    assert eager.step_ms == pytest.approx(max(host_ms, graph.step_ms))
    assert eager.breakdown_ms()["host_bound"] == pytest.approx(host_ms - graph.step_ms)
    fast_host = toy_hw(efficiency=dataclasses.replace(PERFECT, kernel_us=2.0, host_us=0.1))
    assert simulate(Scenario(model, fast_host, exec_mode="eager", **kw)).step_ms == pytest.approx(graph.step_ms)


def test_comm_overlap_hides_a_share_of_the_shorter_stream():
    model = toy_model()
    hw = toy_hw(efficiency=dataclasses.replace(PERFECT, comm_overlap=0.6))
    plan = ParallelPlan(attn_tp=2, dense_tp=2, comm_rewrite=False, name="tp")
    kw = dict(cards=2, batch=32, input_len=512, quant="bf16", plan=plan)
    off = simulate(Scenario(model, hw, **kw))
    on = simulate(Scenario(model, hw, overlap_comm=True, **kw))
    comm = off.cost.comm_s
    rest = off.step_ms / 1e3 - comm
    assert 0 < comm and 0 < rest
    assert on.step_ms / 1e3 == pytest.approx(off.step_ms / 1e3 - 0.6 * min(comm, rest))
    assert sum(on.breakdown_ms().values()) == pytest.approx(on.step_ms)


def test_pcie_shared_by_two_chips_halves_the_bandwidth():
    shared = LinkLevel("pcie", 4, "pcie", 31.5, 10.0, shared_by=2)
    alone = LinkLevel("pcie", 4, "pcie", 31.5 / 2, 10.0)
    for kind in ("all_reduce", "all_gather", "all_to_all"):
        assert collective_time_s(kind, 8e6, 4, shared, 0.7) == pytest.approx(collective_time_s(kind, 8e6, 4, alone,
                                                                                                0.7))
    with pytest.raises(ConfigError, match="shared_by=5"):
        LinkLevel("pcie", 4, "pcie", 31.5, 10.0, shared_by=5)


def test_voted_experts_cap_the_experts_read():
    """Pangu on 4 devices (EP4): 2 groups of 8 per device; voting 5 per group reads at most 10."""
    model = PRESETS["pangu-pro-moe"]
    hw = load_hardware("ascend-800i-a2")
    plan = plan_preset("h2p", model, 4)
    base = CostModel(model, hw, plan, quant_scheme("w8a8"), parse_routing("auto", model))
    voted = CostModel(model, hw, plan, quant_scheme("w8a8"), parse_routing("auto", model), voted_experts=5)
    shape = StepShape(456, 1, 2049, 1)
    _, stats = base.layer_ops(shape)
    assert base.active_experts(stats) == pytest.approx(16.0, abs=0.01)
    assert voted.active_experts(stats) == 10
    w_base = next(o for o in base.layer_ops(shape)[0] if o.name == "routed_experts").weight_bytes
    w_voted = next(o for o in voted.layer_ops(shape)[0] if o.name == "routed_experts").weight_bytes
    assert w_voted / w_base == pytest.approx(10 / base.active_experts(stats))
    r1 = simulate(Scenario(model, hw, cards=4, batch=1, voted_experts=5))
    assert r1.tpot_ms == pytest.approx(simulate(Scenario(model, hw, cards=4, batch=1)).tpot_ms)  # 1 per group
    with pytest.raises(ConfigError, match="voted_experts=9"):
        simulate(Scenario(model, hw, cards=4, voted_experts=9))


def test_mtp_accepted_divides_the_step():
    model, hw = PRESETS["pangu-pro-moe"], load_hardware("ascend-800i-a2")
    r = simulate(Scenario(model, hw, cards=4, batch=64, mtp_draft=1, mtp_accepted=0.7))
    assert r.tpot_ms == pytest.approx(r.step_ms / 1.7)
    assert r.throughput_tok_s == pytest.approx(64 * 1.7 / (r.step_ms / 1e3))
    with pytest.raises(ConfigError, match="mtp_accepted=1.5"):
        simulate(Scenario(model, hw, cards=4, mtp_draft=1, mtp_accepted=1.5))
    with pytest.raises(ConfigError, match="exec_mode='jit'"):
        simulate(Scenario(model, hw, cards=4, exec_mode="jit"))
