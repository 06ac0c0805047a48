"""Uncertainty: propagate every prior's range to TTFT, TPOT and throughput by Monte Carlo.

Each sample draws every ranged latency input of the profiles involved (kernel priors, uncertain
datasheet numbers, link figures, transfer factors) from a triangular distribution on
(low, point, high), refits the three calibrated factors on the calibration hardware with that
sample's priors (so the calibration points stay matched, as they would after a real refit), and
simulates the scenario. Reported: p10/p50/p90 of each metric and the inputs with the largest
|Spearman rank correlation| with it (the ones the answer is most sensitive to).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from moge.errors import ConfigError
from moge.sim.hardware import HardwareProfile, perturbed, sampled_ranges
from moge.sim.plans import InfeasiblePlan
from moge.sim.simulate import Scenario, simulate

METRICS = ("ttft_ms", "tpot_ms", "throughput_tok_s_per_card")
QUANTILES = (10, 50, 90)


def draw(ranges: dict[str, tuple[float, float, float]], rng: np.random.Generator) -> dict[str, float]:
    """One triangular draw per (low, mode, high) range."""
    return {k: float(rng.triangular(lo, mode, hi)) for k, (lo, mode, hi) in sorted(ranges.items())}


@dataclass
class HardwareSampler:
    """Draws perturbed copies of target profiles, refitting the calibrated factors once per draw."""

    targets: dict[str, HardwareProfile]
    calibration: str | None = None
    _cal_hw: HardwareProfile | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if any(hw.calibration_set for hw in self.targets.values()):
            from moge.sim.calibration import calibration_hardware

            self._cal_hw = calibration_hardware()

    def sample(self, rng: np.random.Generator) -> tuple[dict[str, HardwareProfile], dict[str, float]]:
        """({name: sampled profile}, {input name: drawn value})."""
        inputs: dict[str, float] = {}
        fitted = None
        drawn: dict[str, dict[str, float]] = {}
        if self._cal_hw is not None:
            from moge.sim.calibration import fit

            cal = self._cal_hw
            drawn[cal.name] = draw(sampled_ranges(cal), rng)
            fitted = fit(hardware=perturbed(cal, drawn[cal.name], fitted={}, calibration=self.calibration))
        out = {}
        for name, hw in self.targets.items():
            if hw.name not in drawn:
                drawn[hw.name] = draw(sampled_ranges(hw), rng)
            fit_here = fitted if hw.calibration_set else None
            out[name] = perturbed(hw, drawn[hw.name], fitted=fit_here, calibration=self.calibration)
        for hw_name, vals in drawn.items():
            inputs.update({f"{hw_name}:{k}": v for k, v in vals.items()})
        if fitted is not None:
            inputs.update({f"fitted:{k}": v for k, v in fitted.items() if k != "weight_stream_ref"})
        return out, inputs


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (ties broken by order; inputs are continuous draws)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass
class UncertaintyResult:
    point: dict[str, float]
    samples: dict[str, list[float]]
    inputs: dict[str, list[float]]
    failed: int = 0

    def quantiles(self) -> dict[str, dict[str, float]]:
        return {m: {f"p{q}": float(np.percentile(v, q)) for q in QUANTILES} for m, v in self.samples.items()}

    def sensitivity(self, top: int = 3) -> dict[str, list[dict]]:
        """Per metric, the `top` inputs with the largest |Spearman rho| (fitted factors excluded:
        they follow from the drawn inputs)."""
        out = {}
        for m, ys in self.samples.items():
            y = np.array(ys)
            rows = [{"input": k, "rho": spearman(np.array(xs), y)} for k, xs in self.inputs.items()
                    if not k.startswith("fitted:")]
            rows.sort(key=lambda r: -abs(r["rho"]))
            out[m] = rows[:top]
        return out

    def as_dict(self) -> dict:
        n = len(next(iter(self.samples.values()))) if self.samples else 0
        return {"samples": n, "failed": self.failed, "point": self.point, "quantiles": self.quantiles(),
                "most_sensitive": self.sensitivity(),
                "method": "Monte Carlo, triangular draws on every ranged input, calibrated factors refit per draw"}


def _metrics(r) -> dict[str, float]:
    return {"ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "throughput_tok_s_per_card": r.throughput_tok_s_per_card}


def propagate(make: Callable[[HardwareProfile], Scenario], hardware: HardwareProfile, samples: int = 200,
              seed: int = 0, calibration: str | None = None) -> UncertaintyResult:
    """Monte Carlo of `make(sampled hardware)`; `hardware` is the point profile."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError(f"samples={samples!r} is invalid: must be an integer >= 2")
    point = _metrics(simulate(make(hardware)))
    sampler = HardwareSampler({"target": hardware}, calibration)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {m: [] for m in METRICS}
    inputs: dict[str, list[float]] = {}
    failed = 0
    for _ in range(samples):
        hws, drawn = sampler.sample(rng)
        try:
            r = simulate(make(hws["target"]))
        except InfeasiblePlan:
            failed += 1
            continue
        for m, v in _metrics(r).items():
            values[m].append(v)
        for k, v in drawn.items():
            inputs.setdefault(k, []).append(v)
    if not values["tpot_ms"]:
        raise InfeasiblePlan(f"no Monte Carlo sample of {samples} was feasible")
    return UncertaintyResult(point, values, inputs, failed)
