"""Calibration: three kernel parameters fitted to the paper's three Ascend 800I A2 points.

One factor per point, each pinned by the regime that point measures:

    compute       the compute ceiling of large GEMMs     <- prefill, 2 cards, 2 x 2048 tokens
    kv_attention  decode attention's KV-cache bandwidth  <- decode, 4 cards, batch 456
    kernel_us     the fixed device cost of every kernel  <- decode, 4 cards, batch 1

Every other parameter is a prior from the profile (hardware/ascend-800i-a2.json, "kernels"), with
its source and range. The fit is Levenberg-Marquardt in z = logit(fraction) / log(microseconds) on

    sum_points log(predicted / given)^2  +  PRIOR_WEIGHT * sum_params (z - z_prior)^2

(the weak prior keeps the fit unique). Leave-one-out fits (two points in, the third predicted; the
held-out point's factor stays at its prior) are the honest error estimate and are stored with the
factors, with a variant in which all three factors move (`leave_one_out_all_free`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moge.config import PRESETS
from moge.io import atomic_write_text
from moge.sim.hardware import CALIBRATION_FILE, FITTED, FRACTIONS, HardwareProfile, load_calibration, load_hardware
from moge.sim.plans import InfeasiblePlan
from moge.sim.simulate import Scenario, simulate

SET_NAME = "ascend-800i-a2-w8a8"
PRIOR_WEIGHT = 0.001


@dataclass(frozen=True)
class CalibrationPoint:
    label: str
    stage: str
    cards: int
    batch: int
    metric: str  # ttft_ms | tpot_ms
    given: float
    pins: str  # the fitted parameter this point determines


# The paper's measured points (W8A8, input length 2048, Ascend 800I A2). Plan assumed: the h2p preset.
POINTS = (
    CalibrationPoint("prefill, 2 cards, 2 x 2048 tokens", "prefill", 2, 2, "ttft_ms", 424.21, "compute"),
    CalibrationPoint("decode, 4 cards, batch 1", "decode", 4, 1, "tpot_ms", 18.44, "kernel_us"),
    CalibrationPoint("decode, 4 cards, batch 456", "decode", 4, 456, "tpot_ms", 99.31, "kv_attention"),
)
SETTINGS = {"model": "pangu-pro-moe", "hardware": "ascend-800i-a2", "quant": "w8a8", "kv_cache": "auto",
            "plan": "h2p", "routing": "auto", "input_len": 2048, "output_len": 0, "exec_mode": "graph",
            "overlap_comm": False, "mtp": "none", "voted_experts": None}


def calibration_hardware(fitted: dict[str, float] | None = None) -> HardwareProfile:
    """The calibration profile with its fitted parameters at their priors (or at `fitted`)."""
    return load_hardware(SETTINGS["hardware"], fitted=fitted if fitted is not None else {})


def predict(point: CalibrationPoint, hardware: HardwareProfile) -> float:
    s = Scenario(PRESETS[SETTINGS["model"]], hardware, cards=point.cards, stage=point.stage, batch=point.batch,
                 input_len=SETTINGS["input_len"], output_len=SETTINGS["output_len"], quant=SETTINGS["quant"],
                 kv_cache=SETTINGS["kv_cache"], routing=SETTINGS["routing"], model_name=SETTINGS["model"],
                 exec_mode=SETTINGS["exec_mode"], overlap_comm=SETTINGS["overlap_comm"])
    r = simulate(s)
    return r.ttft_ms if point.metric == "ttft_ms" else r.tpot_ms


def _to_z(values: dict[str, float]) -> np.ndarray:
    return np.array([math.log(values[k] / (1 - values[k])) if k in FRACTIONS else math.log(values[k])
                     for k in FITTED])


def _from_z(z: np.ndarray) -> dict[str, float]:
    return {k: (1 / (1 + math.exp(-float(x))) if k in FRACTIONS else math.exp(float(x))) for k, x in zip(FITTED, z)}


def prior_values(hw: HardwareProfile) -> dict[str, float]:
    return {k: hw.priors[k].value for k in FITTED}


def _levenberg_marquardt(residual: Callable[[np.ndarray], np.ndarray], z0: np.ndarray, iters: int = 40,
                         h: float = 1e-5) -> np.ndarray:
    """Minimise |residual(z)|^2 (forward-difference Jacobian, multiplicative damping)."""
    z, r = z0.copy(), residual(z0)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        jac = np.empty((len(r), len(z)))
        for j in range(len(z)):
            dz = z.copy()
            dz[j] += h
            jac[:, j] = (residual(dz) - r) / h
        a, g = jac.T @ jac, jac.T @ r
        while True:
            step = -np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-9), g)
            zn = z + step
            rn = residual(zn)
            cn = float(rn @ rn)
            if cn < cost:
                z, r, cost, lam = zn, rn, cn, max(lam / 3, 1e-9)
                break
            lam *= 4
            if lam > 1e9:
                return z
        if float(np.max(np.abs(step))) < 1e-6:
            break
    return z


def fit(points=POINTS, hardware: HardwareProfile | None = None, prior_weight: float = PRIOR_WEIGHT,
        free: tuple[str, ...] | None = None) -> dict:
    """The fitted parameters (and the weight_stream they go with) that best reproduce `points`.

    Only the parameters in `free` move (default: those the given points pin); the rest stay at
    their priors.
    """
    hw = hardware if hardware is not None else calibration_hardware()
    free = tuple(p.pins for p in points) if free is None else free
    mask = np.array([k in free for k in FITTED])
    z0 = _to_z(prior_values(hw))
    ref = {"weight_stream_ref": hw.efficiency.weight_stream}

    def residual(zf: np.ndarray) -> np.ndarray:
        z = z0.copy()
        z[mask] = zf
        h = hw.with_fitted({**_from_z(z), **ref}, name=SET_NAME)
        try:
            errs = [math.log(predict(p, h) / p.given) for p in points]
        except InfeasiblePlan:  # the optimiser wandered where the model does not fit; bugs propagate
            errs = [30.0] * len(points)
        return np.array(errs + list(math.sqrt(prior_weight) * (z - z0)))

    z = z0.copy()
    z[mask] = _levenberg_marquardt(residual, z0[mask])
    return {**_from_z(z), **ref}


def validate(fitted: dict | None = None) -> list[dict]:
    """Predicted against given for the three points, with the stored factors (or `fitted`)."""
    hw = load_hardware(SETTINGS["hardware"], fitted=fitted)
    rows = []
    for p in POINTS:
        pred = predict(p, hw)
        rows.append({"point": p.label, "metric": p.metric, "pins": p.pins, "given": p.given, "predicted": pred,
                     "rel_error": pred / p.given - 1})
    return rows


def leave_one_out(hardware: HardwareProfile | None = None, free_all: bool = False) -> list[dict]:
    """Fit on two points, predict the third. The held-out point's factor stays at its prior; with
    `free_all` all three move and only the weak prior holds the undetermined direction."""
    hw = hardware if hardware is not None else calibration_hardware()
    rows = []
    for i, p in enumerate(POINTS):
        fitted = fit([q for j, q in enumerate(POINTS) if j != i], hw, free=FITTED if free_all else None)
        pred = predict(p, hw.with_fitted(fitted))
        rows.append({"held_out": p.label, "given": p.given, "predicted": pred, "rel_error": pred / p.given - 1,
                     "factors": {k: fitted[k] for k in FITTED}})
    return rows


def calibrate(write_to: str | Path | None = None, with_loo: bool = True) -> dict:
    """Refit the factors; optionally write them as the calibration file's set (see SET_NAME)."""
    hw = calibration_hardware()
    fitted = fit(hardware=hw)
    record = {
        "fitted": {k: round(fitted[k], 5) for k in FITTED},
        "weight_stream_ref": fitted["weight_stream_ref"],
        "method": ("Levenberg-Marquardt on the sum of squared log errors of the paper's three Ascend 800I A2 points "
                   f"(W8A8, input 2048, h2p plan, MoGE routing, graph mode) plus {PRIOR_WEIGHT} x squared "
                   "distance to the prior in logit/log space; every other kernel parameter is the profile's prior"),
        "prior": {k: {"value": hw.priors[k].value, "range": [hw.priors[k].lo, hw.priors[k].hi]} for k in FITTED},
        "pins": {p.pins: p.label for p in POINTS},
        "settings": SETTINGS,
        "points": [dict(p.__dict__) for p in POINTS],
        "residuals": validate(fitted),
        "applies_to": ("the Ascend profiles whose kernels block names this set: ascend-800i-a2 and ascend-800t-a2 "
                       "as fitted; atlas-300i-duo through its transfer rules. NVIDIA profiles use their own priors."),
    }
    if with_loo:
        record["leave_one_out"] = leave_one_out(hw)
        record["leave_one_out_all_free"] = leave_one_out(hw, free_all=True)
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
