"""Straggler model: MoGE balances devices, top-K does not, skew and traces make it worse."""

import json

import numpy as np
import pytest
import torch

from moge.config import PRESETS
from moge.metrics import expected_max_load
from moge.sim.hardware import load_hardware
from moge.sim.simulate import Scenario, simulate
from moge.sim.straggler import load_stats, parse_routing

PANGU = PRESETS["pangu-pro-moe"]


def test_moge_is_perfectly_balanced_across_ep_devices():
    r = parse_routing("moge", PANGU)
    for ep in (2, 4, 8):
        for tokens in (1, 16, 456):
            s = load_stats(r, 64, 8, 8, ep, tokens)
            assert s.straggler_factor == pytest.approx(1.0)
            assert s.mean_load == tokens * 8 / ep


def test_topk_straggles_less_with_more_tokens():
    r = parse_routing("uniform", PANGU)
    f = [load_stats(r, 64, 8, 8, 8, t).straggler_factor for t in (1, 16, 256, 4096)]
    assert f[0] > f[1] > f[2] > f[3] > 1.0
    assert f[0] == pytest.approx(8 / 1 * 1 / 8 * 2.44, rel=0.05)  # E[max] of 8 picks over 8 devices ~ 2.44


def test_agrees_with_balance_monte_carlo():
    r = parse_routing("uniform", PANGU)
    ours = load_stats(r, 64, 8, 8, 8, 16).straggler_factor
    ref = expected_max_load(16, 64, 8, 8, grouped=False, trials=2000)
    assert ours == pytest.approx(ref, rel=0.03)


def test_zipf_skew_is_worse_than_uniform_and_persists():
    u, z = parse_routing("uniform", PANGU), parse_routing("zipf:1.2", PANGU)
    for t in (64, 4096, 100_000):
        assert load_stats(z, 64, 8, 8, 8, t).straggler_factor > load_stats(u, 64, 8, 8, 8, t).straggler_factor
    assert load_stats(z, 64, 8, 8, 8, 100_000).straggler_factor > 1.2


def test_active_experts_grow_with_tokens():
    r = parse_routing("moge", PANGU)
    a = [load_stats(r, 64, 8, 8, 4, t).max_active_experts for t in (1, 4, 16, 64, 512)]
    assert a[0] == 2 and a == sorted(a) and a[-1] == 16


def test_trace_of_ids_and_counts(tmp_path):
    ids = torch.stack([torch.randperm(64)[:8] for _ in range(200)]).numpy()
    ids[:, 0] = 0  # expert 0 in every token: device 0 is always the busiest
    p = tmp_path / "trace.npy"
    np.save(p, ids)
    r = parse_routing(f"trace:{p}", PANGU)
    s = load_stats(r, 64, 8, 8, 8, 64)
    assert s.straggler_factor > load_stats(parse_routing("uniform", PANGU), 64, 8, 8, 8, 64).straggler_factor
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"counts": [100] + [1] * 63}))
    rc = parse_routing(f"trace:{counts}", PANGU)
    assert load_stats(rc, 64, 8, 8, 8, 256).straggler_factor > 1.3


def test_bad_routing_specs(tmp_path):
    with pytest.raises(ValueError, match="routing='gauss'"):
        parse_routing("gauss", PANGU)
    with pytest.raises(ValueError, match="Zipf exponent"):
        parse_routing("zipf:x", PANGU)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[0, 1, 2]]))
    with pytest.raises(ValueError, match="top_k=8"):
        parse_routing(f"trace:{bad}", PANGU)
    with pytest.raises(FileNotFoundError):
        parse_routing(f"trace:{tmp_path / 'nope.npy'}", PANGU)
    assert parse_routing("auto", PRESETS["qwen2.5-32b"]) is None


def test_topk_routing_is_slower_than_moge_under_ep():
    """Same Pangu shape on 8 cards with pure EP: top-K routing waits for the busiest device."""
    hw = load_hardware("ascend-800i-a2")
    kw = dict(cards=8, batch=64, stage="decode")
    moge = simulate(Scenario(PANGU, hw, routing="moge", **kw))
    topk = simulate(Scenario(PANGU, hw, routing="uniform", **kw))
    assert topk.as_dict()["straggler"]["factor"] > 1.05
    assert topk.tpot_ms > moge.tpot_ms
