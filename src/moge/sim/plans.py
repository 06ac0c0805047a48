"""Parallel plans: how one model replica is split over devices, module by module.

A replica spans `pp` pipeline stages of `attn_tp * attn_dp` devices each; the cards are divided
into identical replicas (plain data parallelism on top). Inside a stage every module has its own
split, as in the paper's H2P:

    attention        attn_dp groups of attn_tp devices (heads split over TP; batch over DP)
    routed experts   expert_tp x expert_ep == stage devices (expert width over TP, experts over EP)
    always-on MLP    dense_tp (the shared expert of an MoE layer, or a dense model's MLP)

Devices are numbered so that TP groups are consecutive (attention TP, expert TP and the shared
TP all start at multiples of their size) and DP/EP groups stride over them. That fixes which
interconnect level each collective crosses.

Token exchange for the MLP part of a layer ("layout"):
    stage       every device of the stage sees all tokens of the stage (all-gather in, reduce-
                scatter or all-reduce out). H2P uses this ("dispatch=allgather").
    attention   the MLP runs on the attention layout: the always-on MLP shares attention's TP,
                routed tokens travel by all-to-all to their experts ("dispatch=alltoall").
comm_rewrite=True replaces each all-reduce by reduce-scatter + all-gather, with the all-gather
moved after the RMSNorm so that it carries already-quantized activations (paper section 5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moge.config import ModelConfig, divisors
from moge.degrees import check_attention_tp, check_degree, check_dense_tp, check_expert_parallel, check_expert_tp
from moge.errors import ConfigError, bad_value

DISPATCH_CHOICES = ("allgather", "alltoall")
PLAN_PRESETS = ("h2p", "tp", "tp-ep", "ep", "dp")


class InfeasiblePlan(ConfigError):
    """This plan cannot run this model on these devices (a degree rule, or the memory does not fit).

    The searches skip exactly this; any other exception, a plain ValueError included, is a bug and
    propagates.
    """


@dataclass(frozen=True)
class ParallelPlan:
    attn_tp: int = 1
    attn_dp: int = 1
    expert_tp: int = 1
    expert_ep: int = 1
    dense_tp: int = 1
    pp: int = 1
    dispatch: str = "allgather"
    comm_rewrite: bool = True
    name: str = "custom"

    @property
    def stage_devices(self) -> int:
        return self.attn_tp * self.attn_dp

    @property
    def replica_devices(self) -> int:
        return self.stage_devices * self.pp

    def layout(self, model: ModelConfig) -> str:
        """'stage' (all tokens on every device for the MLP part) or 'attention' (see module doc)."""
        if model.is_moe:
            return "stage" if self.dispatch == "allgather" else "attention"
        return "attention" if self.dense_tp == self.attn_tp else "stage"

    def describe(self, model: ModelConfig | None = None) -> str:
        parts = [f"attn DP{self.attn_dp}xTP{self.attn_tp}"]
        if model is None or model.is_moe:
            parts.append(f"experts TP{self.expert_tp}xEP{self.expert_ep}")
            if model is None or model.shared_expert_intermediate_size:
                parts.append(f"shared TP{self.dense_tp}")
            parts.append(f"dispatch {self.dispatch}")
        else:
            parts.append(f"MLP TP{self.dense_tp}")
        if self.pp > 1:
            parts.append(f"PP{self.pp}")
        parts.append("RS+AG rewrite" if self.comm_rewrite else "all-reduce")
        return f"{self.name}: " + ", ".join(parts)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replicas(self, devices: int) -> int:
        return devices // self.replica_devices

    def validate(self, model: ModelConfig, devices: int) -> None:
        """Raise InfeasiblePlan naming the field when this plan cannot run `model` on `devices`.

        The head, expert and width rules are moge.degrees', the runtime's own, so a plan the runtime
        rejects is rejected here with the same message; the rest are the simulator's layout rules.
        """
        try:
            self._validate(model, devices)
        except InfeasiblePlan:
            raise
        except ConfigError as e:
            raise InfeasiblePlan(str(e)) from None

    def _validate(self, model: ModelConfig, devices: int) -> None:
        for f in ("attn_tp", "attn_dp", "expert_tp", "expert_ep", "dense_tp", "pp"):
            check_degree(f, getattr(self, f))
        if self.dispatch not in DISPATCH_CHOICES:
            raise bad_value("dispatch", self.dispatch, f"choose one of {DISPATCH_CHOICES}")
        if devices % self.replica_devices:
            raise InfeasiblePlan(
                f"devices={devices} is invalid for this plan: must be a multiple of attn_tp*attn_dp*pp="
                f"{self.replica_devices} (one replica); valid plans for {devices} devices have "
                f"attn_tp*attn_dp*pp in {divisors(devices)}")
        check_attention_tp(model, self.attn_tp)
        if self.pp > model.num_layers:
            raise bad_value("pp", self.pp, f"must be <= num_layers={model.num_layers}")
        stage = self.stage_devices
        if stage % self.dense_tp:
            raise bad_value("dense_tp", self.dense_tp, f"must divide the stage's devices attn_tp*attn_dp={stage} "
                            f"(valid: {divisors(stage)})")
        check_dense_tp(model, self.dense_tp)
        if not model.is_moe:
            return
        if self.expert_tp * self.expert_ep != stage:
            raise InfeasiblePlan(f"expert_tp*expert_ep={self.expert_tp}*{self.expert_ep} is invalid: must equal "
                                 f"the stage's devices attn_tp*attn_dp={stage} (every device holds experts)")
        check_expert_parallel(model, self.expert_ep, name="expert_ep")
        check_expert_tp(model, self.expert_tp)
        if self.dispatch == "alltoall":
            if self.expert_tp != 1:
                raise bad_value("expert_tp", self.expert_tp, "must be 1 with dispatch='alltoall' (pure EP), "
                                "or use dispatch='allgather'")
            if model.shared_expert_intermediate_size and self.dense_tp != self.attn_tp:
                raise bad_value("dense_tp", self.dense_tp, f"must equal attn_tp={self.attn_tp} with "
                                "dispatch='alltoall': the shared expert runs on the attention layout")


def _passes(check, model: ModelConfig, degree: int) -> bool:
    try:
        check(model, degree)
    except ConfigError:
        return False
    return True


def _largest_divisor_at_most(n: int, cap: int, ok) -> int:
    for d in sorted(divisors(n), reverse=True):
        if d <= cap and ok(d):
            return d
    return 1


def plan_preset(name: str, model: ModelConfig, devices: int, pp: int = 1) -> ParallelPlan:
    """A named plan for `devices` devices (pp pipeline stages, the rest split inside the stage).

    h2p    the paper's hybrid: attention DP x TP(t), routed experts TP x EP(t), shared TP over
           the whole stage, all-gather dispatch and the RS+AG rewrite; t = the largest valid
           divisor of the stage size that is <= 4 (the paper: 8 chips -> attention DP2xTP4,
           experts TP2xEP4, shared TP8)
    tp     everything tensor parallel over the stage, plain all-reduces (Megatron style)
    tp-ep  attention TP over the stage, routed experts EP over the stage, shared TP, all-reduces
    ep     attention DP over the stage, routed experts EP via all-to-all, shared expert
           replicated (DeepSeek-style serving)
    dp     one device per replica
    """
    if name not in PLAN_PRESETS:
        raise bad_value("plan", name, f"choose one of {PLAN_PRESETS} or give explicit sizes")
    if isinstance(pp, bool) or not isinstance(pp, int) or pp <= 0 or devices % pp:
        raise bad_value("pp", pp, f"must be a positive divisor of devices={devices} (valid: {divisors(devices)})")
    if name == "dp":
        return ParallelPlan(pp=pp, name="dp")
    stage = devices // pp

    def heads_ok(t: int) -> bool:
        return _passes(check_attention_tp, model, t)

    def experts_ok(ep: int) -> bool:
        if not model.is_moe:
            return ep == 1
        return _passes(check_expert_parallel, model, ep) and _passes(check_expert_tp, model, stage // ep)

    if name == "tp":
        return ParallelPlan(attn_tp=stage, expert_tp=stage, expert_ep=1, dense_tp=stage, pp=pp,
                            comm_rewrite=False, name="tp")
    if name == "tp-ep":
        return ParallelPlan(attn_tp=stage, expert_tp=1, expert_ep=stage, dense_tp=stage, pp=pp,
                            comm_rewrite=False, name="tp-ep")
    if name == "ep":
        return ParallelPlan(attn_tp=1, attn_dp=stage, expert_tp=1, expert_ep=stage, dense_tp=1, pp=pp,
                            dispatch="alltoall", comm_rewrite=True, name="ep")
    t = _largest_divisor_at_most(stage, 4, heads_ok)
    ep = _largest_divisor_at_most(stage, t, experts_ok)
    return ParallelPlan(attn_tp=t, attn_dp=stage // t, expert_tp=stage // ep, expert_ep=ep, dense_tp=stage,
                        pp=pp, dispatch="allgather", comm_rewrite=True, name="h2p")


def candidate_plans(model: ModelConfig, devices: int, max_pp: int = 1, rewrite_options=(True, False),
                    max_plans: int | None = None) -> list[ParallelPlan]:
    """Every valid plan for `devices` devices (replicas x pp x stage), for the plan search."""
    plans: list[ParallelPlan] = []
    seen = set()
    for pp in divisors(devices):
        if pp > max_pp or pp > model.num_layers:
            continue
        for stage in divisors(devices // pp):
            for a_tp in divisors(stage):
                a_dp = stage // a_tp
                expert_splits = ([(stage // ep, ep) for ep in divisors(stage)] if model.is_moe else [(1, 1)])
                dense_tps = sorted({a_tp, stage})
                for e_tp, e_ep in expert_splits:
                    for d_tp in dense_tps:
                        dispatches = ("allgather", "alltoall") if model.is_moe else ("allgather",)
                        for disp in dispatches:
                            for rw in (rewrite_options if stage > 1 else (True,)):
                                p = ParallelPlan(attn_tp=a_tp, attn_dp=a_dp, expert_tp=e_tp, expert_ep=e_ep,
                                                 dense_tp=d_tp, pp=pp, dispatch=disp, comm_rewrite=rw,
                                                 name="search")
                                try:
                                    p.validate(model, devices)
                                except InfeasiblePlan:
                                    continue
                                if not rw and a_tp == 1 and p.layout(model) == "attention":
                                    continue  # nothing to rewrite: same plan as rw=True
                                key = dataclasses.astuple(p)
                                if key not in seen:
                                    seen.add(key)
                                    plans.append(p)
    if max_plans is not None:
        plans = plans[:max_plans]
    return plans


def kv_heads_per_device(model: ModelConfig, plan: ParallelPlan) -> int:
    """KV heads each attention-TP rank stores (attn_tp divides num_kv_heads: heads are not replicated)."""
    return model.num_kv_heads // plan.attn_tp
