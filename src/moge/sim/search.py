"""Searches: (a) the batch and parallel plan with the most throughput per card under a latency
bound; (b) the paper's architecture search over MoGE shapes (its Fig. 3).

(a) For every valid plan the largest batch that fits in memory is found, then the largest batch
    whose TPOT (decode) or TTFT (prefill) meets the bound, by bisection (latency is taken to be
    non-decreasing in batch). The plan/batch pairs are ranked by throughput per card.
(b) Every candidate shape in the grid with 60-80B total parameters is scored on each target
    (hardware, cards, TPOT bound) by search (a) over the named plan presets; throughput is
    normalised to the median candidate, and Pangu Pro MoE's rank is reported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from moge.config import PRESETS, ModelConfig
from moge.errors import ConfigError
from moge.sim.hardware import HardwareProfile, load_hardware
from moge.sim.plans import PLAN_PRESETS, InfeasiblePlan, ParallelPlan, candidate_plans, plan_preset
from moge.sim.simulate import Scenario, SimResult, simulate


@dataclass
class PlanChoice:
    plan: ParallelPlan
    batch: int
    result: SimResult | None
    note: str = ""

    @property
    def throughput_per_card(self) -> float:
        return self.result.throughput_tok_s_per_card if self.result else 0.0

    def as_dict(self) -> dict:
        if self.result is None:
            return {"plan": self.plan.describe(), "feasible": False, "note": self.note}
        r = self.result
        return {"plan": self.plan.describe(r.scenario.model), "plan_fields": self.plan.as_dict(), "feasible": True,
                "batch": self.batch, "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms,
                "throughput_tok_s_per_card": r.throughput_tok_s_per_card,
                "memory_gb_per_card": r.memory_gb_per_card, "max_batch_memory": r.max_batch, "note": self.note}


def best_batch(make: Callable[[int], Scenario], bound_ms: float | None, max_batch_cap: int = 4096) -> PlanChoice | None:
    """Largest batch of the scenario family `make(batch)` that fits and meets the bound."""
    try:
        r1 = simulate(make(1))
    except InfeasiblePlan as e:
        return PlanChoice(make(1).resolved_plan(), 0, None, str(e))
    plan = r1.plan

    def latency(r: SimResult) -> float:
        return r.latency_ms

    if bound_ms is not None and latency(r1) > bound_ms:
        return PlanChoice(plan, 0, None, f"batch 1 already takes {latency(r1):.1f} ms > bound {bound_ms} ms")
    hi_cap = min(r1.max_batch, max_batch_cap)
    if bound_ms is None:
        best = hi_cap
    else:
        lo, hi = 1, hi_cap + 1
        r_hi = simulate(make(hi_cap))
        if latency(r_hi) <= bound_ms:
            lo = hi_cap
        else:
            hi = hi_cap
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if latency(simulate(make(mid))) <= bound_ms:
                    lo = mid
                else:
                    hi = mid
        best = lo
    return PlanChoice(plan, best, simulate(make(best)))


def search_plans(model: ModelConfig, hardware: HardwareProfile, cards: int, stage: str = "decode",
                 tpot_bound_ms: float | None = None, ttft_bound_ms: float | None = None,
                 plans: Iterable[ParallelPlan] | None = None, max_pp: int = 1, max_batch_cap: int = 4096,
                 model_name: str = "custom", **scenario_kw) -> list[PlanChoice]:
    """Search (a): all plans (or `plans`), each with its best batch; best first."""
    devices = cards * hardware.devices_per_card
    if plans is None:
        plans = []
        for name in PLAN_PRESETS:  # named presets first, so their names show up in the table
            try:
                p = plan_preset(name, model, devices)
                p.validate(model, devices)
                plans.append(p)
            except InfeasiblePlan:
                pass
        plans += candidate_plans(model, devices, max_pp=max_pp)
    bound = ttft_bound_ms if stage == "prefill" else tpot_bound_ms
    out: list[PlanChoice] = []
    seen = set()
    for plan in plans:
        key = dataclasses.astuple(dataclasses.replace(plan, name=""))
        if key in seen:
            continue
        seen.add(key)

        def make(b: int, plan=plan) -> Scenario:
            return Scenario(model, hardware, cards=cards, stage=stage, batch=b, plan=plan, model_name=model_name,
                            tpot_bound_ms=tpot_bound_ms, ttft_bound_ms=ttft_bound_ms, **scenario_kw)

        choice = best_batch(make, bound, max_batch_cap)
        if choice is not None:
            out.append(choice)
    out.sort(key=lambda c: -c.throughput_per_card)
    return out


# ---------------------------------------------------------------------------------------------
# (b) architecture search
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchTarget:
    hardware: str
    cards: int
    tpot_bound_ms: float

    @classmethod
    def parse(cls, text: str) -> "ArchTarget":
        parts = text.split(":")
        if len(parts) != 3:
            raise ConfigError(f"target={text!r} is invalid: write HARDWARE:CARDS:TPOT_MS, e.g. ascend-800i-a2:8:50")
        try:
            return cls(parts[0], int(parts[1]), float(parts[2]))
        except ValueError:
            raise ConfigError(f"target={text!r} is invalid: CARDS must be an integer and TPOT_MS a number") from None

    def label(self) -> str:
        return f"{self.hardware} x{self.cards}, TPOT<={self.tpot_bound_ms:g} ms"


# The paper's search targets (paper). Cards: one 800I A2 server (8 NPUs) and four 300I Duo
# cards (8 chips, the two CPUs' worth of a typical host): the paper does not say how many.
DEFAULT_TARGETS = (ArchTarget("atlas-300i-duo", 4, 100.0), ArchTarget("ascend-800i-a2", 8, 50.0))

ARCH_GRIDS = {
    "small": dict(hidden=(4096, 5120, 6144, 8192), heads=(32, 40, 64), kv_heads=(8, 16), layers=(40, 48, 56),
                  experts=(32, 64), expert_width=(1344, 2048)),
    "default": dict(hidden=(4096, 5120, 6144, 7168, 8192), heads=(32, 40, 48, 64), kv_heads=(8, 16),
                    layers=(40, 48, 56, 64), experts=(32, 48, 64), expert_width=(1024, 1344, 1792, 2304)),
}
PARAM_RANGE = (60e9, 80e9)
ARCH_PLANS = ("h2p", "tp", "tp-ep", "ep")


def arch_candidates(grid: dict, param_range=PARAM_RANGE, base: ModelConfig | None = None) -> list[ModelConfig]:
    """MoGE shapes (K=8 over 8 groups, shared expert 4x the expert width, head_dim 128) in range."""
    base = base or PRESETS["pangu-pro-moe"]
    out = []
    for d in grid["hidden"]:
        for h in grid["heads"]:
            for kv in grid["kv_heads"]:
                if h % kv:
                    continue
                for layers in grid["layers"]:
                    for n in grid["experts"]:
                        for w in grid["expert_width"]:
                            m = base.replace(hidden_size=d, num_heads=h, num_kv_heads=kv, head_dim=128,
                                             num_layers=layers, num_experts=n, expert_intermediate_size=w,
                                             shared_expert_intermediate_size=4 * w)
                            total = m.parameter_counts()["total"]
                            if param_range[0] <= total <= param_range[1]:
                                out.append(m)
    return out


def is_pangu_shape(m: ModelConfig) -> bool:
    p = PRESETS["pangu-pro-moe"]
    keys = ("hidden_size", "num_heads", "num_kv_heads", "num_layers", "num_experts", "expert_intermediate_size",
            "shared_expert_intermediate_size", "top_k", "num_groups")
    return all(getattr(m, k) == getattr(p, k) for k in keys)


def shape_label(m: ModelConfig) -> str:
    return (f"d{m.hidden_size}-h{m.num_heads}-kv{m.num_kv_heads}-L{m.num_layers}-E{m.num_experts}"
            f"-I{m.expert_intermediate_size}")


@dataclass
class ArchResult:
    targets: list[ArchTarget]
    rows: list[dict] = field(default_factory=list)

    def ranks(self) -> dict:
        out = {}
        keys = [f"t{i}" for i in range(len(self.targets))] + ["combined"]
        for key in keys:
            ordered = sorted(self.rows, key=lambda r: -r["score"][key])
            for i, r in enumerate(ordered):
                if r["pangu"]:
                    out[key] = {"rank": i + 1, "of": len(ordered), "best": ordered[0]["shape"],
                                "pangu_score": r["score"][key], "best_score": ordered[0]["score"][key]}
        return out

    def pareto(self) -> dict:
        """Candidates at least as large (activated params) and at least as fast on the combined score."""
        pangu = next((r for r in self.rows if r["pangu"]), None)
        if pangu is None:
            return {}
        dom = [r["shape"] for r in self.rows if not r["pangu"] and r["activated_b"] >= pangu["activated_b"]
               and r["score"]["combined"] > pangu["score"]["combined"]]
        return {"dominated_by": dom, "on_frontier": not dom}

    def as_dict(self) -> dict:
        return {"targets": [t.label() for t in self.targets], "candidates": len(self.rows),
                "normalisation": "throughput per card / median candidate's, per target; combined = geometric mean",
                "pangu": self.ranks(), "pangu_pareto_activated_vs_combined": self.pareto(), "rows": self.rows}


def architecture_search(targets: Iterable[ArchTarget] = DEFAULT_TARGETS, grid: str | dict = "default",
                        input_len: int = 2048, output_len: int = 0, quant: str = "w8a8",
                        plans: Iterable[str] = ARCH_PLANS, progress: Callable[[int, int], None] | None = None,
                        hardware: dict[str, HardwareProfile] | None = None) -> ArchResult:
    """Search (b): score every candidate shape on every target (see module doc); `hardware`
    replaces the shipped profiles by name (the uncertainty run passes sampled ones)."""
    targets = list(targets)
    g = ARCH_GRIDS[grid] if isinstance(grid, str) else grid
    if isinstance(grid, str) and grid not in ARCH_GRIDS:
        raise ConfigError(f"grid={grid!r} is invalid: choose one of {sorted(ARCH_GRIDS)}")
    cands = arch_candidates(g)
    if not any(is_pangu_shape(m) for m in cands):
        cands.append(PRESETS["pangu-pro-moe"])
    hws = {t.hardware: (hardware or {}).get(t.hardware) or load_hardware(t.hardware) for t in targets}
    result = ArchResult(targets)
    raw: list[list[float]] = []
    for i, m in enumerate(cands):
        tputs, details = [], []
        for t in targets:
            hw = hws[t.hardware]
            devices = t.cards * hw.devices_per_card
            plan_list = []
            for name in plans:
                try:
                    p = plan_preset(name, m, devices)
                    p.validate(m, devices)
                    plan_list.append(p)
                except InfeasiblePlan:
                    continue
            choices = search_plans(m, hw, t.cards, "decode", tpot_bound_ms=t.tpot_bound_ms, plans=plan_list,
                                   input_len=input_len, output_len=output_len, quant=quant,
                                   model_name=shape_label(m))
            best = choices[0] if choices and choices[0].result else None
            tputs.append(best.throughput_per_card if best else 0.0)
            details.append({"plan": best.plan.name if best else None, "batch": best.batch if best else 0,
                            "tpot_ms": best.result.tpot_ms if best else None})
        raw.append(tputs)
        counts = m.parameter_counts()
        result.rows.append({"shape": shape_label(m), "pangu": is_pangu_shape(m),
                            "config": {k: getattr(m, k) for k in ("hidden_size", "num_heads", "num_kv_heads",
                                                                  "num_layers", "num_experts",
                                                                  "expert_intermediate_size")},
                            "total_b": counts["total"] / 1e9, "activated_b": counts["activated"] / 1e9,
                            "throughput_tok_s_per_card": tputs, "best": details})
        if progress:
            progress(i + 1, len(cands))
    for j in range(len(targets)):
        vals = sorted(r[j] for r in raw if r[j] > 0)
        med = vals[len(vals) // 2] if vals else 1.0
        for row, r in zip(result.rows, raw):
            row.setdefault("score", {})[f"t{j}"] = r[j] / med
    for row in result.rows:
        s = [row["score"][f"t{j}"] for j in range(len(targets))]
        row["score"]["combined"] = math.prod(s) ** (1 / len(s)) if all(x > 0 for x in s) else 0.0
    return result


def arch_uncertainty(targets: Iterable[ArchTarget] = DEFAULT_TARGETS, samples: int = 20, seed: int = 0,
                     grid: str | dict = "default", progress: Callable[[int, int], None] | None = None,
                     **kw) -> dict:
    """Pangu Pro MoE's rank per target across Monte Carlo draws of every profile's ranged inputs
    (calibrated factors refit per draw; see moge.sim.uncertainty)."""
    import numpy as np

    from moge.sim.uncertainty import HardwareSampler

    targets = list(targets)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"samples={samples!r} is invalid: must be an integer >= 2")
    sampler = HardwareSampler({t.hardware: load_hardware(t.hardware) for t in targets})
    rng = np.random.default_rng(seed)
    ranks: dict[str, list[int]] = {}
    of = 0
    for i in range(samples):
        hws, _ = sampler.sample(rng)
        res = architecture_search(targets, grid=grid, hardware=hws, **kw)
        for key, r in res.ranks().items():
            ranks.setdefault(key, []).append(r["rank"])
            of = r["of"]
        if progress:
            progress(i + 1, samples)
    return {"samples": samples, "of": of, "ranks": ranks,
            "quantiles": {k: {f"p{q}": float(np.percentile(v, q)) for q in (10, 50, 90)} for k, v in ranks.items()},
            "best_rank": {k: int(min(v)) for k, v in ranks.items()},
            "top10_share": {k: float(np.mean([x <= 10 for x in v])) for k, v in ranks.items()}}
