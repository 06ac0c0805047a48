"""Memory: limits enforced, batch limit consistent, KV and communication match the paper's ratios."""

import pytest

from moge.config import PRESETS
from moge.sim.hardware import load_hardware
from moge.sim.plans import plan_preset
from moge.sim.simulate import Scenario, simulate

PANGU = PRESETS["pangu-pro-moe"]
A2 = load_hardware("ascend-800i-a2")


def test_batch_beyond_memory_is_rejected_with_the_limit():
    ok = simulate(Scenario(PANGU, A2, cards=4, batch=456))
    limit = ok.max_batch
    assert limit >= 456 and ok.memory.fits
    assert simulate(Scenario(PANGU, A2, cards=4, batch=limit)).memory.fits
    with pytest.raises(ValueError, match=rf"batch={limit + 1} does not fit.*largest batch that fits is {limit}"):
        simulate(Scenario(PANGU, A2, cards=4, batch=limit + 1))


def test_model_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match="model does not fit"):
        simulate(Scenario(PRESETS["qwen2.5-72b"], load_hardware("nvidia-h100"), cards=1, quant="bf16"))
    with pytest.raises(ValueError, match="model does not fit"):
        simulate(Scenario(PANGU, A2, cards=1, quant="bf16"))


def test_paper_batch_needs_the_int8_kv_cache():
    """456 sequences of 2048 tokens do not fit on 4 x 64 GB with a 16-bit KV cache."""
    with pytest.raises(ValueError, match="does not fit"):
        simulate(Scenario(PANGU, A2, cards=4, batch=456, kv_cache="bf16"))


def test_weights_per_device_by_hand():
    r = simulate(Scenario(PANGU, A2, cards=4, batch=1, quant="w8a8"))
    counts = PANGU.parameter_counts()
    vocab = 2 * PANGU.vocab_size * PANGU.hidden_size
    # int8 layer weights (+ small fp16 parts), 16-bit embedding and lm_head, all split over 4 devices
    expected = ((counts["total"] - vocab) * 1 + vocab * 2) / 4
    assert r.memory.weights_bytes == pytest.approx(expected, rel=0.02)


def test_more_quantization_means_more_batch():
    limits = [simulate(Scenario(PANGU, A2, cards=8, quant=q)).max_batch for q in ("bf16", "w8a8", "w4a8")]
    assert limits[0] < limits[1] < limits[2]


def _kv_and_comm_per_token(model):
    plan = plan_preset("tp", model, 8)
    r = simulate(Scenario(model, A2, cards=8, batch=64, plan=plan, quant="w8a8"))
    kv = r.cost.traffic["kv_cache"] * 8  # every device holds its heads' share
    return kv, r.cost.traffic["collectives"]


def test_spec_section5_kv_and_communication_ratios():
    """Against 72B / 32B dense: KV cache about 40% / 25% smaller, communication 63% / 25% smaller."""
    kv_p, comm_p = _kv_and_comm_per_token(PANGU)
    kv_72, comm_72 = _kv_and_comm_per_token(PRESETS["qwen2.5-72b"])
    kv_32, comm_32 = _kv_and_comm_per_token(PRESETS["qwen2.5-32b"])
    assert 1 - kv_p / kv_72 == pytest.approx(0.40, abs=0.01)
    assert 1 - kv_p / kv_32 == pytest.approx(0.25, abs=0.01)
    assert 1 - comm_p / comm_72 == pytest.approx(0.63, abs=0.02)
    assert 1 - comm_p / comm_32 == pytest.approx(0.25, abs=0.02)
