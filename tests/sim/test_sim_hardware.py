"""Hardware profiles: shipped data with sources, user files, clear errors."""

import json

import pytest

from moge.config import PRESETS
from moge.sim.hardware import (HARDWARE_DIR, KERNEL_PARAMS, SAMPLED_PREFIXES, fitted_from_set, list_hardware,
                               load_hardware, perturbed)
from moge.sim.simulate import Scenario, simulate

SHIPPED = ["ascend-800i-a2", "ascend-800t-a2", "atlas-300i-duo", "nvidia-a100", "nvidia-h100", "nvidia-h200",
           "nvidia-h20"]


def test_all_profiles_ship():
    assert set(SHIPPED) <= set(list_hardware())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_has_a_source(name):
    raw = json.loads((HARDWARE_DIR / f"{name}.json").read_text())
    numbers = [raw["memory_gib"], raw["memory_bandwidth_GBps"], *raw["peak_tflops"].values()]
    for lv in raw["interconnect"]:
        numbers += [lv["bandwidth_GBps"], lv["latency_us"]]
    for n in numbers:
        assert isinstance(n, dict) and n.get("source"), f"{name}: {n} has no source"
    hw = load_hardware(name)
    assert hw.peak_flops("int8") >= hw.peak_flops("bf16") > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_every_kernel_parameter_has_a_source_and_a_range(name):
    hw = load_hardware(name)
    assert set(hw.priors) == set(KERNEL_PARAMS), "every kernel parameter is set by the profile"
    for k, pr in hw.priors.items():
        assert pr.source, f"{name}: kernels.{k} has no source"
        if not pr.fitted:
            assert pr.lo <= pr.value <= pr.hi
    for path in hw.uncertain:  # every guessed latency input has a range the uncertainty run samples
        if path.startswith(SAMPLED_PREFIXES) and not path.startswith("kernels."):
            assert path in hw.ranges, f"{name}: {path} is uncertain but has no range"


def test_fitted_factors_only_on_the_ascend_family():
    """NVIDIA profiles carry their own priors; only the Ascend profiles use the 800I A2 fit."""
    fitted = fitted_from_set("ascend-800i-a2-w8a8")
    a2, t2 = load_hardware("ascend-800i-a2"), load_hardware("ascend-800t-a2")
    for hw in (a2, t2):
        assert hw.efficiency.compute == fitted["compute"] and hw.efficiency.kernel_us == fitted["kernel_us"]
    for name in ("nvidia-a100", "nvidia-h100", "nvidia-h200", "nvidia-h20"):
        hw = load_hardware(name)
        assert not hw.calibration_set and not any(p.fitted for p in hw.priors.values())


def test_300i_duo_transfer_rules():
    """kv_attention is derived: the 800I A2 fit times the LPDDR/HBM weight-streaming ratio."""
    fitted = fitted_from_set("ascend-800i-a2-w8a8")
    duo = load_hardware("atlas-300i-duo")
    expect = fitted["kv_attention"] * duo.efficiency.weight_stream / fitted["weight_stream_ref"]
    assert duo.efficiency.kv_attention == pytest.approx(expect)
    assert duo.efficiency.compute == pytest.approx(fitted["compute"])
    # a transfer factor drawn by the uncertainty run multiplies the fitted value
    moved = perturbed(duo, {"kernels.compute.rel": 0.8, "kernels.weight_stream": 0.6})
    assert moved.efficiency.compute == pytest.approx(0.8 * fitted["compute"])
    assert moved.efficiency.kv_attention == pytest.approx(fitted["kv_attention"] * 0.6 / fitted["weight_stream_ref"])
    pcie = duo.level_for(4)
    assert pcie.shared_by == 2 and pcie.device_bandwidth_GBps == pytest.approx(31.5 / 2)


def test_uncertain_fields_are_flagged():
    assert "peak_tflops.fp16" in load_hardware("nvidia-h20").uncertain
    assert any("hccs" in u for u in load_hardware("ascend-800i-a2").uncertain)


def test_spec_figures():
    h100, a2, duo = load_hardware("nvidia-h100"), load_hardware("ascend-800i-a2"), load_hardware("atlas-300i-duo")
    assert h100.peak_tflops["bf16"] == 989 and h100.memory_bandwidth_GBps == 3350
    assert load_hardware("nvidia-h200").memory_bandwidth_GBps == 4800
    assert a2.links[0].topology == "full_mesh" and a2.links[0].devices == 8
    assert duo.devices_per_card == 2 and duo.peak_tflops["int8"] * 2 == 280


def test_user_profile_file(tmp_path):
    prof = {"name": "my-card", "peak_tflops": {"bf16": 200, "int8": 400}, "memory_gib": 48,
            "memory_bandwidth_GBps": 1000,
            "interconnect": [{"name": "pcie", "devices": 8, "topology": "pcie", "bandwidth_GBps": 25,
                              "latency_us": 10}],
            "efficiency": {"compute": 0.5, "memory": 0.7, "link": 0.6, "op_overhead_us": 5}}
    path = tmp_path / "my-card.json"
    path.write_text(json.dumps(prof))
    hw = load_hardware(str(path))
    assert hw.name == "my-card" and hw.efficiency.weight_stream == 0.7 and hw.efficiency.kv_attention == 0.7
    assert hw.efficiency.kernel_us == 5  # the older four-factor names still read
    r = simulate(Scenario(PRESETS["pangu-pro-moe"], hw, cards=4, batch=8))
    assert r.tpot_ms > 0


def test_bad_profiles(tmp_path):
    with pytest.raises(ValueError, match="hardware='tpu-v9'"):
        load_hardware("tpu-v9")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "peak_tflops": {"bf16": 100}, "memory_gib": 10,
                               "memory_bandwidth_GBps": 100,
                               "interconnect": [{"name": "x", "devices": 2, "topology": "torus",
                                                 "bandwidth_GBps": 1, "latency_us": 1}]}))
    with pytest.raises(ValueError, match="topology='torus'"):
        load_hardware(str(bad))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"name": "m", "peak_tflops": {"bf16": 1}}))
    with pytest.raises(ValueError, match="memory_gib"):
        load_hardware(str(missing))
    h100 = json.loads((HARDWARE_DIR / "nvidia-h100.json").read_text())
    eff = tmp_path / "eff.json"
    eff.write_text(json.dumps({**h100, "efficiency": {"compute": 1.5}}))
    with pytest.raises(ValueError, match="not both"):
        load_hardware(str(eff))
    h100.pop("kernels")
    eff.write_text(json.dumps({**h100, "efficiency": {"compute": 1.5}}))
    with pytest.raises(ValueError, match="efficiency.compute=1.5"):
        load_hardware(str(eff))
    bad_prior = {**h100, "kernels": {"weight_stream": {"value": 0.9, "range": [0.5, 0.8], "source": "x"}}}
    eff.write_text(json.dumps(bad_prior))
    with pytest.raises(ValueError, match="must contain the value 0.9"):
        load_hardware(str(eff))
    eff.write_text(json.dumps({**h100, "kernels": {"weight_stream": {"value": 0.9, "source": "x"}}}))
    with pytest.raises(ValueError, match="kernels.weight_stream.range is missing"):
        load_hardware(str(eff))


def test_level_for_span():
    hw = load_hardware("atlas-300i-duo")
    assert hw.level_for(2).name == "on-card"
    assert hw.level_for(4).name == "pcie-cpu"
    assert hw.level_for(8).name == "cross-cpu"
    assert hw.level_for(64).name == "ethernet"
