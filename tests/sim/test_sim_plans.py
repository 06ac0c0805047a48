"""Parallel plans: the paper's H2P preset, and invalid plans rejected with the field named."""

import dataclasses

import pytest

from moge.config import PRESETS
from moge.sim.hardware import load_hardware
from moge.sim.plans import ParallelPlan, candidate_plans, plan_preset
from moge.sim.simulate import Scenario, simulate

PANGU = PRESETS["pangu-pro-moe"]


def test_h2p_preset_matches_the_paper_on_8_devices():
    p = plan_preset("h2p", PANGU, 8)
    assert (p.attn_dp, p.attn_tp) == (2, 4)
    assert (p.expert_tp, p.expert_ep) == (2, 4)
    assert p.dense_tp == 8 and p.comm_rewrite and p.dispatch == "allgather"
    p.validate(PANGU, 8)


@pytest.mark.parametrize("name", ["h2p", "tp", "tp-ep", "ep", "dp"])
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_presets_are_valid(name, devices):
    plan_preset(name, PANGU, devices).validate(PANGU, devices)


def test_tp_not_dividing_heads_is_rejected():
    with pytest.raises(ValueError, match=r"attn_tp=3 .*num_heads=40"):
        ParallelPlan(attn_tp=3, expert_ep=3, dense_tp=3).validate(PANGU, 3)


def test_ep_not_dividing_experts_is_rejected():
    with pytest.raises(ValueError, match=r"expert_ep=3 .*num_experts=64"):
        ParallelPlan(attn_dp=6, expert_ep=3, expert_tp=2).validate(PANGU, 6)


def test_experts_must_cover_the_stage():
    with pytest.raises(ValueError, match=r"expert_tp\*expert_ep"):
        ParallelPlan(attn_tp=4, expert_ep=2).validate(PANGU, 4)


def test_devices_must_hold_whole_replicas():
    with pytest.raises(ValueError, match=r"devices=6"):
        ParallelPlan(attn_tp=4, expert_ep=4, dense_tp=4).validate(PANGU, 6)


def test_alltoall_needs_pure_ep():
    with pytest.raises(ValueError, match=r"expert_tp=2 .*alltoall"):
        ParallelPlan(attn_dp=4, expert_tp=2, expert_ep=2, dispatch="alltoall").validate(PANGU, 4)


def test_bad_dispatch_and_sizes():
    with pytest.raises(ValueError, match="dispatch='ring'"):
        ParallelPlan(dispatch="ring").validate(PANGU, 1)
    with pytest.raises(ValueError, match="pp=0"):
        ParallelPlan(pp=0).validate(PANGU, 1)
    with pytest.raises(ValueError, match="plan='zz'"):
        plan_preset("zz", PANGU, 4)


def test_dense_tp_must_divide_mlp_width():
    qwen = PRESETS["qwen2.5-72b"]  # intermediate 29568 = 2^7 * 3 * 7 * 11
    with pytest.raises(ValueError, match=r"dense_tp=5"):
        ParallelPlan(attn_tp=1, attn_dp=5, dense_tp=5).validate(qwen, 5)


def test_invalid_plan_through_simulate_names_the_field():
    hw = load_hardware("ascend-800i-a2")
    with pytest.raises(ValueError, match="attn_tp=16"):
        simulate(Scenario(PANGU, hw, cards=16, plan=ParallelPlan(attn_tp=16, expert_ep=16, dense_tp=16)))


def test_candidate_plans_are_valid_and_distinct():
    plans = candidate_plans(PANGU, 8, max_pp=2)
    assert len(plans) > 20
    keys = {dataclasses.astuple(dataclasses.replace(p, name="")) for p in plans}
    assert len(keys) == len(plans)
    for p in plans:
        p.validate(PANGU, 8)
    assert any(p.pp == 2 for p in plans)
