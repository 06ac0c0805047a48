"""One deployment scenario in, latency, throughput, memory and a time breakdown out.

    scenario = Scenario(load_model_config("pangu-pro-moe"), load_hardware("ascend-800i-a2"),
                        cards=4, stage="decode", batch=456, input_len=2048, quant="w8a8")
    result = simulate(scenario)      # result.tpot_ms, result.as_dict()["breakdown"], ...

Stages. prefill: the batch's prompts go through one forward; TTFT is its time and throughput
counts prompt tokens. decode: one step advances every sequence by 1 + accepted draft tokens at a
KV length of input_len + output_len/2 (the mean over the generation); TPOT is the step time over
the tokens per step, 1 + accepted draft tokens (`mtp_accepted` as given, or 1 + a + ... + a^n from a
per-token acceptance `mtp_acceptance`). Each result carries the other stage's latency too: a decode result's
`ttft_ms` is an unloaded single-prompt prefill, a prefill result's `tpot_ms` the decode step of
the same batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moge.config import ModelConfig
from moge.errors import ConfigError
from moge.sim.cost import EXEC_MODES, CostModel, StepCost, StepShape
from moge.sim.hardware import HardwareProfile
from moge.sim.memory import MemoryReport, max_batch, memory_report
from moge.sim.plans import InfeasiblePlan, ParallelPlan, plan_preset
from moge.sim.quant import quant_scheme
from moge.sim.straggler import parse_routing

STAGES = ("prefill", "decode")

# Operator -> coarse group for the readable breakdown.
GROUPS = {
    "norm_residual": "attention", "qkv_proj": "attention", "rope_kv_write": "attention",
    "attention": "attention", "o_proj": "attention",
    "router": "moe", "expert_permute": "moe", "routed_experts": "moe", "shared_expert": "moe", "mlp": "mlp",
    "embedding": "head", "final_norm": "head", "lm_head": "head", "sampling": "head",
    "overhead": "overhead", "host_bound": "overhead", "comm_overlap": "communication",
}


def op_group(name: str) -> str:
    if name.startswith("mtp:"):
        return "mtp"
    if name in GROUPS:
        return GROUPS[name]
    return "communication"


def tokens_per_step(draft_tokens: int, acceptance: float) -> float:
    """Expected tokens a sequence gains per step with `draft_tokens` MTP drafts, each accepted with
    probability `acceptance` given that the previous ones were: 1 + a + a^2 + ... + a^n."""
    return sum(acceptance**i for i in range(draft_tokens + 1))


@dataclass(frozen=True)
class Scenario:
    model: ModelConfig
    hardware: HardwareProfile
    cards: int = 4
    stage: str = "decode"
    batch: int = 1
    input_len: int = 2048
    output_len: int = 0
    quant: str = "w8a8"
    kv_cache: str = "auto"
    plan: ParallelPlan | None = None  # None: the h2p preset for these devices
    routing: str = "auto"
    mtp_draft: int = 0
    mtp_acceptance: float = 0.0
    mtp_accepted: float | None = None  # mean accepted draft tokens per step; overrides mtp_acceptance
    voted_experts: int | None = None  # experts kept per group per batch (300I Duo release), None = all
    overlap_comm: bool = False
    exec_mode: str = "graph"
    model_name: str = "custom"
    check_memory: bool = True
    tpot_bound_ms: float | None = None
    ttft_bound_ms: float | None = None

    @property
    def devices(self) -> int:
        return self.cards * self.hardware.devices_per_card

    def resolved_plan(self) -> ParallelPlan:
        return self.plan if self.plan is not None else plan_preset("h2p", self.model, self.devices)

    def validate(self) -> None:
        for name in ("cards", "batch", "input_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}={v!r} is invalid: must be a positive integer")
        if not isinstance(self.output_len, int) or self.output_len < 0:
            raise ConfigError(f"output_len={self.output_len!r} is invalid: must be an integer >= 0")
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r} is invalid: choose one of {STAGES}")
        if not isinstance(self.mtp_draft, int) or not 0 <= self.mtp_draft <= 8:
            raise ConfigError(f"mtp_draft={self.mtp_draft!r} is invalid: must be an integer in [0, 8]")
        if not 0.0 <= self.mtp_acceptance <= 1.0:
            raise ConfigError(f"mtp_acceptance={self.mtp_acceptance!r} is invalid: must be in [0, 1]")
        if self.mtp_accepted is not None and not (isinstance(self.mtp_accepted, (int, float))
                                                  and 0.0 <= self.mtp_accepted <= self.mtp_draft):
            raise ConfigError(f"mtp_accepted={self.mtp_accepted!r} is invalid: must be in [0, mtp_draft="
                              f"{self.mtp_draft}] (mean accepted draft tokens per step)")
        if self.voted_experts is not None:
            m = self.model
            per_group = m.num_experts // max(1, m.num_groups) if m.is_moe else 0
            if isinstance(self.voted_experts, bool) or not isinstance(self.voted_experts, int) \
                    or not 1 <= self.voted_experts <= per_group:
                raise ConfigError(f"voted_experts={self.voted_experts!r} is invalid: must be an integer in "
                                  f"[1, experts per group={per_group}] (MoE models only)")
        if self.exec_mode not in EXEC_MODES:
            raise ConfigError(f"exec_mode={self.exec_mode!r} is invalid: choose one of {EXEC_MODES}")
        if self.input_len + self.output_len > self.model.max_position_embeddings:
            raise ConfigError(f"input_len+output_len={self.input_len + self.output_len} is invalid: exceeds the "
                             f"model's max_position_embeddings={self.model.max_position_embeddings}")
        for name in ("tpot_bound_ms", "ttft_bound_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name}={v!r} is invalid: must be > 0")


@dataclass
class SimResult:
    scenario: Scenario
    plan: ParallelPlan
    ttft_ms: float
    tpot_ms: float
    step_ms: float
    tokens_per_step: float
    throughput_tok_s: float
    memory: MemoryReport
    max_batch: int
    cost: StepCost
    routing_label: str
    extra: dict = field(default_factory=dict)

    @property
    def throughput_tok_s_per_card(self) -> float:
        return self.throughput_tok_s / self.scenario.cards

    @property
    def memory_gb_per_card(self) -> float:
        return self.memory.total_bytes * self.memory.devices_per_card / 1e9

    @property
    def latency_ms(self) -> float:
        return self.ttft_ms if self.scenario.stage == "prefill" else self.tpot_ms

    def meets_bounds(self) -> bool | None:
        s = self.scenario
        checks = []
        if s.tpot_bound_ms is not None:
            checks.append(self.tpot_ms <= s.tpot_bound_ms)
        if s.ttft_bound_ms is not None:
            checks.append(self.ttft_ms <= s.ttft_bound_ms)
        return all(checks) if checks else None

    def breakdown_ms(self) -> dict[str, float]:
        items = sorted(self.cost.ops.items(), key=lambda kv: -kv[1])
        return {k: v * 1e3 for k, v in items if v != 0}

    def breakdown_groups_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.cost.ops.items():
            g = op_group(k)
            out[g] = out.get(g, 0.0) + v * 1e3
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def streaming_ms(self) -> dict[str, float]:
        """Time the weight and KV-cache reads alone take at the achieved bandwidth (a share of the
        memory-bound operators' time, not an extra term)."""
        hw = self.scenario.hardware
        eff = {"weights": hw.efficiency.weight_stream, "kv_cache": hw.efficiency.kv_attention}
        return {k: self.cost.traffic.get(k, 0.0) / (hw.memory_Bps * e) * 1e3 for k, e in eff.items()}

    def as_dict(self) -> dict:
        s = self.scenario
        load = self.cost.load
        return {
            "model": s.model_name, "hardware": s.hardware.name, "cards": s.cards, "devices": s.devices,
            "stage": s.stage, "batch": s.batch, "input_len": s.input_len, "output_len": s.output_len,
            "quant": quant_scheme(s.quant, s.kv_cache).name,
            "plan": {**self.plan.as_dict(), "description": self.plan.describe(s.model),
                     "replicas": self.plan.replicas(s.devices)},
            "routing": self.routing_label,
            "mtp": {"draft_tokens": s.mtp_draft, "acceptance": s.mtp_acceptance, "accepted": s.mtp_accepted,
                    "tokens_per_step": self.tokens_per_step},
            "voted_experts": s.voted_experts, "overlap_comm": s.overlap_comm, "exec_mode": s.exec_mode,
            "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "step_ms": self.step_ms,
            "throughput_tok_s": self.throughput_tok_s,
            "throughput_tok_s_per_card": self.throughput_tok_s_per_card,
            "memory_gb_per_card": self.memory_gb_per_card,
            "memory": self.memory.as_dict(), "max_batch": self.max_batch,
            "breakdown": self.breakdown_ms(), "breakdown_groups": self.breakdown_groups_ms(),
            "traffic_gb_per_step": {k: v / 1e9 for k, v in self.cost.traffic.items()},
            "streaming_ms": self.streaming_ms(),
            "straggler": None if load is None else {
                "tokens": load.tokens, "expert_ep": load.ep, "mean_load": load.mean_load,
                "max_load": load.max_load, "factor": load.straggler_factor,
                "max_active_experts": load.max_active_experts, "devices_per_token": load.devices_per_token},
            "bounds": {"tpot_ms": s.tpot_bound_ms, "ttft_ms": s.ttft_bound_ms, "met": self.meets_bounds()},
            "efficiency": {**s.hardware.efficiency.as_dict(), "from": s.hardware.efficiency.name},
            "uncertain_inputs": list(s.hardware.uncertain),
        }


def _shapes(s: Scenario, seqs: int) -> tuple[StepShape, StepShape]:
    new = 1 + s.mtp_draft
    decode = StepShape(seqs, new, s.input_len + s.output_len // 2 + new, new)
    prefill = StepShape(seqs, s.input_len, s.input_len, 1)
    return prefill, decode


def simulate(s: Scenario) -> SimResult:
    """Run one scenario; raises ConfigError naming the field for invalid inputs, InfeasiblePlan for a misfit."""
    s.validate()
    plan = s.resolved_plan()
    plan.validate(s.model, s.devices)
    quant = quant_scheme(s.quant, s.kv_cache)
    routing = parse_routing(s.routing, s.model)
    replicas = plan.replicas(s.devices)
    seqs = math.ceil(s.batch / replicas)
    cm = CostModel(s.model, s.hardware, plan, quant, routing, voted_experts=s.voted_experts, exec_mode=s.exec_mode,
                   overlap_comm=s.overlap_comm)
    draft = s.mtp_draft

    step_tokens = s.input_len if s.stage == "prefill" else 1 + draft
    logits = 1 if s.stage == "prefill" else 1 + draft
    cache_len = s.input_len + s.output_len + draft

    def mem(b: int) -> MemoryReport:
        return memory_report(s.model, s.hardware, plan, quant, math.ceil(b / replicas), cache_len, step_tokens,
                             logits, draft)

    report = mem(s.batch)
    limit = max_batch(lambda b: mem(b).fits)
    if s.check_memory and not report.fits:
        if limit == 0:
            raise InfeasiblePlan(f"model does not fit: {report.describe()} even at batch 1 with plan "
                             f"{plan.describe(s.model)} on cards={s.cards}; use more cards, a smaller "
                             "quantization or a plan that splits the weights further")
        raise InfeasiblePlan(f"batch={s.batch} does not fit in memory: {report.describe()}; the largest batch "
                         f"that fits is {limit}")

    prefill_shape, decode_shape = _shapes(s, seqs)
    tps = 1.0 + s.mtp_accepted if s.mtp_accepted is not None else tokens_per_step(draft, s.mtp_acceptance)
    if s.stage == "decode":
        cost = cm.step_cost(decode_shape, mtp_draft=draft)
        step_s = cost.total_s
        tpot_ms = step_s / tps * 1e3
        ttft_ms = cm.step_cost(StepShape(1, s.input_len, s.input_len, 1), prefill=True).total_s * 1e3
        throughput = s.batch * tps / step_s
    else:
        cost = cm.step_cost(prefill_shape, prefill=True)
        step_s = cost.total_s
        ttft_ms = step_s * 1e3
        tpot_ms = cm.step_cost(decode_shape, mtp_draft=draft).total_s / tps * 1e3
        throughput = s.batch * s.input_len / step_s
    return SimResult(scenario=s, plan=plan, ttft_ms=ttft_ms, tpot_ms=tpot_ms, step_ms=step_s * 1e3,
                     tokens_per_step=tps if s.stage == "decode" else 1.0, throughput_tok_s=throughput,
                     memory=report, max_batch=limit, cost=cost,
                     routing_label=routing.label() if routing else "dense")
