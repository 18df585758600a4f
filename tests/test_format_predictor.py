"""Hill et al.'s R^2 -> accuracy curve: the fit recovers a known curve, files round-trip, and a bad
file is one error naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompiler.errors import QCError
from qcompiler.format_predictor import BUILTIN, AccuracyPredictor, nines


def test_nines_of_r2() -> None:
    np.testing.assert_allclose(nines([0.9, 0.99, 0.999]), [1.0, 2.0, 3.0])
    assert nines(1.0) == 9.0 and nines(-3.0) == 0.0 and nines(float("nan")) == 0.0


def test_the_fit_recovers_a_known_curve() -> None:
    truth = AccuracyPredictor(0.5, -1.5)
    r2 = 1 - 10 ** -np.linspace(0.4, 3, 40)
    lost = (1 - truth.normalized_accuracy(r2)) * np.exp(np.random.default_rng(0).normal(0, 0.05, r2.size))
    # Designs that lost nothing or more than half say nothing about the line: they are left out.
    r2, lost = np.append(r2, [0.1, 1 - 1e-6]), np.append(lost, [0.9, 0.0])
    fitted = AccuracyPredictor.fit(r2, 1 - lost, ["a", "b"])
    assert fitted.intercept == pytest.approx(0.5, abs=0.05) and fitted.slope == pytest.approx(-1.5, abs=0.05)
    assert fitted.fitted_on == ["a", "b"] and fitted.points == int(np.sum((lost > 0) & (lost <= 0.5)))
    # A drop in points: the float top-1 times the lost fraction, at most all of it.
    assert fitted.drop(0.99, 80.0) == pytest.approx(80 * 10 ** (0.5 - 1.5 * 2), rel=0.15) and fitted.drop(0.0, 80.0) == 80.0
    with pytest.raises(QCError, match="at least 3"):
        AccuracyPredictor.fit(np.array([0.9, 0.99]), np.array([0.9, 0.99]), ["a"])


def test_files_round_trip_and_a_bad_one_is_named(tmp_path) -> None:
    path = tmp_path / "curve.json"
    curve = AccuracyPredictor(0.3, -1.2, ["lenet5"], 12)
    curve.save(path)
    assert AccuracyPredictor.load(path) == curve
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    for bad in (tmp_path / "other.json", tmp_path / "missing.json"):
        with pytest.raises(QCError, match=bad.name):
            AccuracyPredictor.load(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(QCError, match="broken.json"):
        AccuracyPredictor.load(tmp_path / "broken.json")


def test_the_builtin_curve_ships_and_names_what_it_was_fitted_on() -> None:
    curve = AccuracyPredictor.load()
    assert BUILTIN.name == "hill_r2.json" and len(curve.fitted_on) >= 3 and curve.points >= 10 and curve.slope < 0
    # More nines never predict less accuracy.
    acc = curve.normalized_accuracy(1 - 10 ** -np.linspace(0, 5, 50))
    assert np.all(np.diff(acc) >= 0)
