"""Calibration: four global efficiency factors fitted to the paper's three Ascend 800I A2 points.

Fitted parameters (hardware.Efficiency): compute, memory and link efficiency (fractions of peak)
and a fixed per-operator overhead in microseconds. Four parameters and three points leave one
direction undetermined, so the fit minimises

    sum_points log(predicted / given)^2  +  PRIOR_WEIGHT * sum_params (z - z_prior)^2

with z = logit(efficiency) or log(overhead) and a weak, stated prior (PRIOR). The fit is a
deterministic Nelder-Mead in z. Leave-one-out fits (two points in, the third predicted) are
stored with the factors: they are the honest estimate of error on an unseen configuration.

Nothing else is tuned: every other model, hardware profile, batch or plan reuses these factors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moge.config import PRESETS
from moge.io import atomic_write_text
from moge.sim.hardware import CALIBRATION_FILE, Efficiency, HardwareProfile, load_calibration, load_hardware
from moge.sim.plans import InfeasiblePlan
from moge.sim.simulate import Scenario, simulate

SET_NAME = "ascend-800i-a2-w8a8"
PRIOR = Efficiency(compute=0.6, memory=0.8, link=0.7, op_overhead_us=10.0, name="prior")
PRIOR_WEIGHT = 0.001
PARAMS = ("compute", "memory", "link", "op_overhead_us")


@dataclass(frozen=True)
class CalibrationPoint:
    label: str
    stage: str
    cards: int
    batch: int
    metric: str  # ttft_ms | tpot_ms
    given: float


# The paper's measured points (W8A8, input length 2048, Ascend 800I A2). Plan assumed: the h2p preset.
POINTS = (
    CalibrationPoint("prefill, 2 cards, 2 x 2048 tokens", "prefill", 2, 2, "ttft_ms", 424.21),
    CalibrationPoint("decode, 4 cards, batch 1", "decode", 4, 1, "tpot_ms", 18.44),
    CalibrationPoint("decode, 4 cards, batch 456", "decode", 4, 456, "tpot_ms", 99.31),
)
SETTINGS = {"model": "pangu-pro-moe", "hardware": "ascend-800i-a2", "quant": "w8a8", "kv_cache": "auto",
            "plan": "h2p", "routing": "auto", "input_len": 2048, "output_len": 0}


def predict(point: CalibrationPoint, hardware: HardwareProfile) -> float:
    s = Scenario(PRESETS[SETTINGS["model"]], hardware, cards=point.cards, stage=point.stage, batch=point.batch,
                 input_len=SETTINGS["input_len"], output_len=SETTINGS["output_len"], quant=SETTINGS["quant"],
                 kv_cache=SETTINGS["kv_cache"], routing=SETTINGS["routing"], model_name=SETTINGS["model"])
    r = simulate(s)
    return r.ttft_ms if point.metric == "ttft_ms" else r.tpot_ms


def _to_z(e: Efficiency) -> np.ndarray:
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    return np.array([logit(min(e.compute, 0.999)), logit(min(e.memory, 0.999)), logit(min(e.link, 0.999)),
                     math.log(max(e.op_overhead_us, 1e-3))])


def _from_z(z: np.ndarray, name: str = SET_NAME) -> Efficiency:
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    return Efficiency(compute=sig(z[0]), memory=sig(z[1]), link=sig(z[2]), op_overhead_us=math.exp(z[3]), name=name)


def _nelder_mead(f, x0: np.ndarray, step: float = 0.5, iters: int = 600, tol: float = 1e-10) -> np.ndarray:
    """Plain Nelder-Mead (reflection 1, expansion 2, contraction 0.5, shrink 0.5)."""
    n = len(x0)
    pts = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[int(np.argmin(vals))]


def fit(points=POINTS, hardware: str | HardwareProfile = SETTINGS["hardware"], prior: Efficiency = PRIOR,
        prior_weight: float = PRIOR_WEIGHT) -> Efficiency:
    """The efficiency factors that best reproduce `points` (see module doc)."""
    hw = load_hardware(hardware) if isinstance(hardware, str) else hardware
    z0 = _to_z(prior)

    def objective(z: np.ndarray) -> float:
        eff = _from_z(z)
        try:
            err = sum(math.log(predict(p, hw.with_efficiency(eff)) / p.given) ** 2 for p in points)
        except InfeasiblePlan:  # the optimiser wandered where the model does not fit; bugs propagate
            return 1e9
        return err + prior_weight * float(np.sum((z - z0) ** 2))

    z = _nelder_mead(objective, z0)
    z = _nelder_mead(objective, z, step=0.1)  # restart from the optimum to polish
    return _from_z(z)


def validate(efficiency: Efficiency | None = None, hardware: str = SETTINGS["hardware"]) -> list[dict]:
    """Predicted against given for the three points, with the stored factors (or `efficiency`)."""
    hw = load_hardware(hardware)
    if efficiency is not None:
        hw = hw.with_efficiency(efficiency)
    rows = []
    for p in POINTS:
        pred = predict(p, hw)
        rows.append({"point": p.label, "metric": p.metric, "given": p.given, "predicted": pred,
                     "rel_error": pred / p.given - 1})
    return rows


def leave_one_out(hardware: str = SETTINGS["hardware"]) -> list[dict]:
    """Fit on two points, predict the third: an estimate of the error on unseen settings."""
    hw = load_hardware(hardware)
    rows = []
    for i, p in enumerate(POINTS):
        eff = fit([q for j, q in enumerate(POINTS) if j != i], hw)
        pred = predict(p, hw.with_efficiency(eff))
        rows.append({"held_out": p.label, "given": p.given, "predicted": pred, "rel_error": pred / p.given - 1,
                     "factors": eff.as_dict()})
    return rows


def calibrate(write_to: str | Path | None = None, with_loo: bool = True) -> dict:
    """Refit the factors; optionally write them as the calibration file's set (see SET_NAME)."""
    hw = load_hardware(SETTINGS["hardware"])
    eff = fit(hardware=hw)
    record = {
        **{k: round(v, 4) for k, v in eff.as_dict().items()},
        "method": ("Nelder-Mead on sum of squared log errors of the paper's three Ascend 800I A2 points "
                   f"(W8A8, input 2048, h2p plan, MoGE routing) plus {PRIOR_WEIGHT} x squared distance to the "
                   "prior in logit/log space"),
        "prior": PRIOR.as_dict(),
        "settings": SETTINGS,
        "points": [dict(p.__dict__) for p in POINTS],
        "residuals": validate(eff),
        "applies_to": "every shipped profile (assumption: the same achieved fractions on other hardware)",
    }
    if with_loo:
        record["leave_one_out"] = leave_one_out()
    if write_to is not None:
        path = Path(write_to)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            data = {"kind": "calibration", "sets": {}}
        data.setdefault("sets", {})[SET_NAME] = record
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return record


def stored_record(path: str | Path | None = None) -> dict:
    return load_calibration(path or CALIBRATION_FILE).get(SET_NAME, {})
