"""Parallel plans: the paper's H2P preset, invalid plans rejected with the field named, and the
runtime's degree rules (moge.degrees) applied unchanged."""

import dataclasses
import math

import pytest

from moge import degrees
from moge.config import PRESETS
from moge.errors import ConfigError
from moge.sim.hardware import load_hardware
from moge.sim.plans import InfeasiblePlan, ParallelPlan, candidate_plans, kv_heads_per_device, plan_preset
from moge.sim.simulate import Scenario, simulate

PANGU = PRESETS["pangu-pro-moe"]
TINY = PRESETS["moge-tiny"]


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
    with pytest.raises(InfeasiblePlan, match=r"attn_tp=3 .*num_heads=40"):
        ParallelPlan(attn_tp=3, expert_ep=3, dense_tp=3).validate(PANGU, 3)


def test_ep_not_dividing_experts_is_rejected():
    with pytest.raises(InfeasiblePlan, match=r"expert_ep=3 .*num_experts=64"):
        ParallelPlan(attn_dp=6, expert_ep=3, expert_tp=2).validate(PANGU, 6)


def test_experts_must_cover_the_stage():
    with pytest.raises(InfeasiblePlan, match=r"expert_tp\*expert_ep"):
        ParallelPlan(attn_tp=4, expert_ep=2).validate(PANGU, 4)


def test_devices_must_hold_whole_replicas():
    with pytest.raises(InfeasiblePlan, match=r"devices=6"):
        ParallelPlan(attn_tp=4, expert_ep=4, dense_tp=4).validate(PANGU, 6)


def test_alltoall_needs_pure_ep():
    with pytest.raises(InfeasiblePlan, match=r"expert_tp=2 .*alltoall"):
        ParallelPlan(attn_dp=4, expert_tp=2, expert_ep=2, dispatch="alltoall").validate(PANGU, 4)


def test_bad_dispatch_and_sizes():
    with pytest.raises(InfeasiblePlan, match="dispatch='ring'"):
        ParallelPlan(dispatch="ring").validate(PANGU, 1)
    with pytest.raises(InfeasiblePlan, match="pp=0"):
        ParallelPlan(pp=0).validate(PANGU, 1)
    with pytest.raises(ValueError, match="plan='zz'"):
        plan_preset("zz", PANGU, 4)


def test_dense_tp_must_divide_mlp_width():
    qwen = PRESETS["qwen2.5-72b"]  # intermediate 29568 = 2^7 * 3 * 7 * 11
    with pytest.raises(InfeasiblePlan, match=r"dense_tp=5"):
        ParallelPlan(attn_tp=1, attn_dp=5, dense_tp=5).validate(qwen, 5)


def test_invalid_plan_through_simulate_names_the_field():
    hw = load_hardware("ascend-800i-a2")
    with pytest.raises(InfeasiblePlan, match="attn_tp=16"):
        simulate(Scenario(PANGU, hw, cards=16, plan=ParallelPlan(attn_tp=16, expert_ep=16, dense_tp=16)))


def test_candidate_plans_are_valid_and_distinct():
    plans = candidate_plans(PANGU, 8, max_pp=2)
    assert len(plans) > 20
    keys = {dataclasses.astuple(dataclasses.replace(p, name="")) for p in plans}
    assert len(keys) == len(plans)
    for p in plans:
        p.validate(PANGU, 8)
    assert any(p.pp == 2 for p in plans)


def test_attention_tp_must_divide_the_kv_heads():
    # moge-tiny: 4 query heads, 2 KV heads. The runtime does not replicate KV heads, so TP4 is out.
    with pytest.raises(InfeasiblePlan, match=r"attn_tp=4 is invalid: must divide num_kv_heads=2"):
        ParallelPlan(attn_tp=4, expert_ep=4, dense_tp=4).validate(TINY, 4)
    plan = ParallelPlan(attn_tp=2, attn_dp=2, expert_ep=4, dense_tp=4)
    plan.validate(TINY, 4)
    assert kv_heads_per_device(TINY, plan) == 1


def test_expert_ep_must_divide_the_groups_of_a_grouped_router():
    # 16 experts split over 8 ranks is even, but 4 groups over 8 ranks is not whole groups per rank
    with pytest.raises(InfeasiblePlan, match=r"expert_ep=8 is invalid: must divide num_groups=4"):
        ParallelPlan(attn_dp=8, expert_ep=8).validate(TINY, 8)
    ParallelPlan(attn_dp=8, expert_ep=8).validate(PRESETS["topk-tiny"], 8)  # top-K has no groups


def _runtime_errors(model, plan) -> list[str]:
    """Messages of every moge.degrees rule the plan breaks (what the runtime would raise)."""
    stage = plan.stage_devices
    checks = [(degrees.check_attention_tp, plan.attn_tp, "attn_tp"),
              (degrees.check_dense_tp, plan.dense_tp, "dense_tp"),
              (degrees.check_expert_parallel, plan.expert_ep, "expert_ep"),
              (degrees.check_expert_tp, stage // plan.expert_ep, "expert_tp")]
    out = []
    for check, value, name in checks:
        try:
            check(model, value, name=name)
        except ConfigError as e:
            out.append(str(e))
    return out


@pytest.mark.parametrize("name", ["moge-tiny", "pangu-pro-moe"])
def test_simulator_and_runtime_agree_on_a_grid_of_degrees(name):
    model = PRESETS[name]
    accepted = rejected = 0
    for attn_tp in (1, 2, 3, 4, 5, 8, 16):
        for expert_ep in (1, 2, 3, 4, 5, 8, 16):
            stage = math.lcm(attn_tp, expert_ep)
            plan = ParallelPlan(attn_tp=attn_tp, attn_dp=stage // attn_tp, expert_tp=stage // expert_ep,
                                expert_ep=expert_ep, dense_tp=stage)
            errors = _runtime_errors(model, plan)
            if errors:
                with pytest.raises(InfeasiblePlan) as e:
                    plan.validate(model, stage)
                assert str(e.value) in errors, (plan, errors)
                rejected += 1
            else:
                plan.validate(model, stage)
                accepted += 1
    assert accepted > 3 and rejected > 3


@pytest.mark.parametrize("name", ["moge-tiny", "pangu-pro-moe", "moge-small", "qwen2.5-72b"])
@pytest.mark.parametrize("devices", [1, 2, 4, 8, 16])
def test_h2p_preset_takes_only_degrees_the_runtime_accepts(name, devices):
    model = PRESETS[name]
    plan = plan_preset("h2p", model, devices)
    plan.validate(model, devices)
    assert not _runtime_errors(model, plan) or not model.is_moe
    for p in candidate_plans(model, devices):
        assert model.num_kv_heads % p.attn_tp == 0
        if model.is_moe:
            assert not _runtime_errors(model, p)


def test_search_propagates_a_plain_value_error_from_the_cost_code(monkeypatch):
    """Only InfeasiblePlan drops a plan; a bug (any other error) must surface, not shrink the table."""
    from moge.sim.cost import CostModel
    from moge.sim.search import search_plans

    def broken(*args, **kwargs):
        raise ValueError("bug in the cost code")

    hw = load_hardware("ascend-800i-a2")
    kw = dict(tpot_bound_ms=1000.0, max_batch_cap=8, input_len=128, output_len=64)
    assert search_plans(TINY, hw, 1, **kw)  # works before the patch
    monkeypatch.setattr(CostModel, "step_cost", broken)
    with pytest.raises(ValueError, match="bug in the cost code") as e:
        search_plans(TINY, hw, 1, **kw)
    assert not isinstance(e.value, InfeasiblePlan)


def test_search_reports_a_plan_that_does_not_fit_as_infeasible():
    from moge.sim.search import search_plans

    hw = load_hardware("ascend-800i-a2")
    choices = search_plans(PANGU, hw, 1, tpot_bound_ms=1000.0, plans=[ParallelPlan(name="dp")])
    assert len(choices) == 1 and choices[0].result is None and "does not fit" in choices[0].note


def test_calibration_fit_propagates_a_bug(monkeypatch):
    import moge.sim.calibration as calibration

    def broken(point, hardware):
        raise ValueError("bug in predict")

    monkeypatch.setattr(calibration, "predict", broken)
    with pytest.raises(ValueError, match="bug in predict"):
        calibration.fit()
