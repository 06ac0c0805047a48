"""MTP speculative decoding: tokens per step and its cost."""

import pytest

from moge.config import PRESETS
from moge.sim.hardware import load_hardware
from moge.sim.simulate import Scenario, simulate, tokens_per_step

PANGU = PRESETS["pangu-pro-moe"]
A2 = load_hardware("ascend-800i-a2")


def test_tokens_per_step():
    assert tokens_per_step(0, 0.9) == 1
    assert tokens_per_step(1, 0.8) == pytest.approx(1.8)
    assert tokens_per_step(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_mtp_step_costs_more_but_tpot_drops_with_high_acceptance():
    base = simulate(Scenario(PANGU, A2, cards=4, batch=64))
    mtp = simulate(Scenario(PANGU, A2, cards=4, batch=64, mtp_draft=1, mtp_acceptance=0.9))
    assert mtp.step_ms > base.step_ms
    assert any(k.startswith("mtp:") for k in mtp.breakdown_ms())
    assert mtp.tpot_ms < base.tpot_ms
    assert mtp.tokens_per_step == pytest.approx(1.9)
    assert mtp.throughput_tok_s == pytest.approx(64 * 1.9 / (mtp.step_ms / 1e3))
    useless = simulate(Scenario(PANGU, A2, cards=4, batch=64, mtp_draft=1, mtp_acceptance=0.0))
    assert useless.tpot_ms > base.tpot_ms
    assert mtp.memory.weights_bytes > base.memory.weights_bytes  # the MTP module's weights


def test_bad_mtp_settings():
    with pytest.raises(ValueError, match="mtp_acceptance=1.5"):
        simulate(Scenario(PANGU, A2, cards=4, mtp_draft=1, mtp_acceptance=1.5))
    with pytest.raises(ValueError, match="mtp_draft=-1"):
        simulate(Scenario(PANGU, A2, cards=4, mtp_draft=-1))
