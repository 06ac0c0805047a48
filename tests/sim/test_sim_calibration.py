"""Calibration: the three 800I A2 points are reproduced, and the stored factors are the fit's."""

import pytest

from moge.sim import calibration as cal
from moge.sim.hardware import efficiency_from_set

TOLERANCE = 0.02  # stated in docs/simulator.md


def test_three_points_within_tolerance():
    for row in cal.validate():
        assert abs(row["rel_error"]) < TOLERANCE, row


def test_stored_factors_are_reproduced_by_the_fit():
    stored = efficiency_from_set(cal.SET_NAME)
    refit = cal.fit()
    for k in ("compute", "memory", "link"):
        assert getattr(refit, k) == pytest.approx(getattr(stored, k), abs=0.01)
    assert refit.op_overhead_us == pytest.approx(stored.op_overhead_us, rel=0.05)
    record = cal.stored_record()
    assert len(record["leave_one_out"]) == 3 and "method" in record


def test_factors_are_physical():
    e = efficiency_from_set(cal.SET_NAME)
    assert 0.2 < e.compute <= 1 and 0.2 < e.memory <= 1 and 0.2 < e.link <= 1
    assert 0 < e.op_overhead_us < 100
