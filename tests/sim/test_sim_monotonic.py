"""Properties: more compute, bandwidth or link speed is never slower; more batch never lowers TPOT."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moge.config import PRESETS
from moge.sim.hardware import load_hardware
from moge.sim.plans import plan_preset
from moge.sim.simulate import Scenario, simulate

MODELS = ["pangu-pro-moe", "qwen2.5-32b"]
HARDWARE = ["ascend-800i-a2", "nvidia-h100", "atlas-300i-duo"]

scenarios = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS),
    "hardware": st.sampled_from(HARDWARE),
    "cards": st.sampled_from([2, 4]),
    "stage": st.sampled_from(["prefill", "decode"]),
    "batch": st.integers(1, 64),
    "input_len": st.sampled_from([128, 1024, 2048]),
    "plan": st.sampled_from(["h2p", "tp", "ep"]),
    "quant": st.sampled_from(["bf16", "w8a8"]),
})


def _scenario(p, hw=None, batch=None):
    model = PRESETS[p["model"]]
    hw = hw or load_hardware(p["hardware"])
    plan = plan_preset(p["plan"], model, p["cards"] * hw.devices_per_card)
    return Scenario(model, hw, cards=p["cards"], stage=p["stage"], batch=batch or p["batch"],
                    input_len=p["input_len"], quant=p["quant"], plan=plan, check_memory=False)


@settings(max_examples=40)
@given(p=scenarios, which=st.sampled_from(["compute", "memory_bandwidth", "link_bandwidth"]),
       factor=st.floats(1.0, 8.0))
def test_better_hardware_is_never_slower(p, which, factor):
    hw = load_hardware(p["hardware"])
    base = simulate(_scenario(p, hw))
    fast = simulate(_scenario(p, hw.scaled(**{which: factor})))
    assert fast.ttft_ms <= base.ttft_ms * (1 + 1e-12)
    assert fast.tpot_ms <= base.tpot_ms * (1 + 1e-12)
    assert fast.throughput_tok_s >= base.throughput_tok_s * (1 - 1e-12)


@settings(max_examples=30)
@given(p=scenarios, extra=st.integers(1, 64))
def test_bigger_batch_never_lowers_latency(p, extra):
    a = simulate(_scenario(p))
    b = simulate(_scenario(p, batch=p["batch"] + extra))
    assert b.latency_ms >= a.latency_ms * (1 - 1e-12)


@settings(max_examples=20)
@given(p=scenarios)
def test_memory_capacity_does_not_change_latency(p):
    hw = load_hardware(p["hardware"])
    a = simulate(_scenario(p, hw))
    b = simulate(_scenario(p, hw.scaled(memory_capacity=2.0)))
    assert a.latency_ms == b.latency_ms
    assert b.max_batch >= a.max_batch


KERNEL_FASTER = ["compute", "weight_stream", "kv_attention", "elementwise", "link", "gmm_rel", "cache_mib"]
KERNEL_SLOWER = ["kernel_us", "host_us", "attn_seq_us", "gmm_tile_m"]


@settings(max_examples=40)
@given(p=scenarios, which=st.sampled_from(KERNEL_FASTER + KERNEL_SLOWER), factor=st.floats(1.0, 4.0),
       mode=st.sampled_from(["graph", "eager"]))
def test_each_kernel_parameter_moves_latency_one_way(p, which, factor, mode):
    """A better kernel parameter (higher efficiency, bigger cache; lower fixed cost or padding) is
    never slower, in either execution mode."""
    import dataclasses

    hw = load_hardware(p["hardware"])
    e = hw.efficiency
    v = getattr(e, which)
    better = min(1.0, v * factor) if which in KERNEL_FASTER and which != "cache_mib" else v * factor
    if which in KERNEL_SLOWER:
        better = max(v / factor, 1.0 if which == "gmm_tile_m" else 0.0)
    fast_hw = hw.with_efficiency(dataclasses.replace(e, **{which: better}))
    base = simulate(dataclasses.replace(_scenario(p, hw), exec_mode=mode))
    fast = simulate(dataclasses.replace(_scenario(p, fast_hw), exec_mode=mode))
    assert fast.ttft_ms <= base.ttft_ms * (1 + 1e-12)
    assert fast.tpot_ms <= base.tpot_ms * (1 + 1e-12)


@settings(max_examples=30)
@given(p=scenarios)
def test_features_never_backfire(p):
    """Eager mode is never faster than graph mode; overlap never slower than none; voting fewer
    experts never slower than voting more; a longer context never lowers TPOT."""
    import dataclasses

    s = _scenario(p)
    graph = simulate(s)
    assert simulate(dataclasses.replace(s, exec_mode="eager")).latency_ms >= graph.latency_ms * (1 - 1e-12)
    assert simulate(dataclasses.replace(s, overlap_comm=True)).latency_ms <= graph.latency_ms * (1 + 1e-12)
    if s.model.is_moe:
        per_group = s.model.num_experts // s.model.num_groups
        lat = [simulate(dataclasses.replace(s, voted_experts=v)).latency_ms for v in range(1, per_group + 1)]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(lat, lat[1:]))
        assert lat[-1] == pytest.approx(graph.latency_ms)
    longer = simulate(dataclasses.replace(s, input_len=s.input_len + 512))
    assert longer.tpot_ms >= graph.tpot_ms * (1 - 1e-12)
