"""Uncertainty propagation: intervals that contain the point estimate, reproducible draws, the
most influential input found, bad input rejected."""

import copy

import numpy as np
import pytest

from moge.config import PRESETS
from moge.errors import ConfigError
from moge.sim.hardware import load_hardware, profile_from_dict, sampled_ranges
from moge.sim.simulate import Scenario
from moge.sim.uncertainty import draw, propagate, spearman

PANGU = PRESETS["pangu-pro-moe"]


@pytest.mark.parametrize("hardware,cards,batch", [("atlas-300i-duo", 4, 8), ("nvidia-h100", 8, 64),
                                                  ("ascend-800i-a2", 8, 64)])
def test_interval_contains_the_point_estimate(hardware, cards, batch):
    hw = load_hardware(hardware)
    u = propagate(lambda h: Scenario(PANGU, h, cards=cards, batch=batch), hw, samples=30, seed=1)
    q = u.quantiles()
    for m in ("tpot_ms", "throughput_tok_s_per_card"):
        assert q[m]["p10"] <= u.point[m] <= q[m]["p90"], (m, q[m], u.point[m])
        assert q[m]["p10"] < q[m]["p90"]  # the ranges do spread the answer
    assert u.failed == 0


def test_calibration_point_stays_matched():
    """At a calibration point each draw refits the factors, so TPOT stays at the paper's number."""
    hw = load_hardware("ascend-800i-a2")
    u = propagate(lambda h: Scenario(PANGU, h, cards=4, batch=456), hw, samples=8, seed=0)
    assert all(abs(t / 99.31 - 1) < 0.02 for t in u.samples["tpot_ms"])


def test_draws_are_reproducible_and_inside_the_ranges():
    hw = load_hardware("nvidia-h100")
    ranges = sampled_ranges(hw)
    a = draw(ranges, np.random.default_rng(3))
    assert a == draw(ranges, np.random.default_rng(3)) and a != draw(ranges, np.random.default_rng(4))
    for k, v in a.items():
        assert ranges[k][0] <= v <= ranges[k][2]
    make = lambda h: Scenario(PANGU, h, cards=8, batch=16)  # noqa: E731
    assert propagate(make, hw, samples=5, seed=2).samples == propagate(make, hw, samples=5, seed=2).samples


def test_the_only_uncertain_input_is_the_most_sensitive():
    """A profile with one ranged number: it tops the sensitivity list with rho = -1 on TPOT."""
    raw = copy.deepcopy(load_hardware("nvidia-h100").raw)
    for v in raw["peak_tflops"].values():
        v.pop("range", None)
    raw["memory_bandwidth_GBps"] = {"value": 3350, "range": [2000, 3350], "source": "test"}
    for lv in raw["interconnect"]:
        lv["bandwidth_GBps"].pop("range", None)
        lv["latency_us"].pop("range", None)
    for v in raw["kernels"].values():
        v["range"] = [v["value"], v["value"]]
    hw = profile_from_dict(raw, "one-range")
    assert list(sampled_ranges(hw)) == ["memory_bandwidth_GBps"]
    u = propagate(lambda h: Scenario(PANGU, h, cards=8, batch=1), hw, samples=20, seed=0)
    top = u.sensitivity()["tpot_ms"][0]
    assert top["input"] == f"{hw.name}:memory_bandwidth_GBps"
    assert top["rho"] == pytest.approx(-1.0)


def test_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(4)) == 0.0


def test_bad_samples():
    with pytest.raises(ConfigError, match="samples=1"):
        propagate(lambda h: Scenario(PANGU, h, cards=8), load_hardware("nvidia-h100"), samples=1)
