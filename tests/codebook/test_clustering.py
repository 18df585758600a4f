"""Codebook quantizers: weighted k-means is a Lloyd fixed point, importances steer the centres,
uniform keeps its grid's bins, ECSQ trades distortion for rate as lambda grows."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.codebook.clustering import ecsq, entropy_bits, kmeans, uniform


def _data(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_t(5, n) * 0.05, rng.gamma(0.5, 1.0, n)


def test_kmeans_is_a_fixed_point_of_lloyd() -> None:
    w, h = _data()
    centres, a = kmeans(w, h, 8)
    assert np.all(np.diff(centres) > 0)
    # Every value sits at its nearest centre, and every centre is the weighted mean of its values.
    assert np.array_equal(a, np.argmin(np.abs(w[:, None] - centres[None, :]), axis=1))
    for j in range(8):
        assert np.isclose(centres[j], np.average(w[a == j], weights=h[a == j]))


def test_importance_weighting_lowers_the_weighted_error() -> None:
    w, h = _data()
    plain, a_plain = kmeans(w, np.ones_like(w), 6)
    weighted, a_weighted = kmeans(w, h, 6)
    def cost(c, a):
        return float(np.sum(h * (w - c[a]) ** 2))
    assert cost(weighted, a_weighted) < cost(plain, a_plain)


def test_fixed_zero_keeps_an_exact_zero_centre() -> None:
    w, h = _data()
    centres, a = kmeans(w + 0.013, h, 5, fixed_zero=True)
    assert 0.0 in centres


def test_more_clusters_than_values_is_refused() -> None:
    with pytest.raises(ValueError, match="clusters"):
        kmeans(np.arange(3.0), np.ones(3), 4)


def test_uniform_bins_are_grid_cells_with_weighted_centres() -> None:
    w, h = _data()
    step = 0.02
    centres, a = uniform(w, h, step)
    bins = np.rint(w / step)
    for j in np.unique(a)[:10]:
        members = a == j
        assert len(np.unique(bins[members])) == 1  # one grid cell per centre
        assert np.isclose(centres[j], np.average(w[members], weights=h[members]))


def test_ecsq_trades_distortion_for_rate() -> None:
    w, h = _data(10_000)
    results = []
    for lam in (0.0, 0.05, 0.5):
        centres, a = ecsq(w, h, 32, lam)
        results.append((entropy_bits(a, len(centres)), float(np.mean(h * (w - centres[a]) ** 2))))
    rates, errors = zip(*results)
    assert rates[0] > rates[1] > rates[2]
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("importance", ["hessian", "unit"])
def test_ecsq_assigns_each_value_one_of_the_two_centres_around_it(importance: str) -> None:
    w, h = _data(20_000)
    assign = h if importance == "hessian" else np.ones_like(h)
    centres, a = ecsq(w, h, 32, 0.3, assign_importance=assign)
    assert np.all(np.diff(centres) > 0)
    above = np.clip(np.searchsorted(centres, w), 0, len(centres) - 1)
    assert np.all((a == above) | (a == np.maximum(above - 1, 0)))


def test_ecsq_centres_follow_h_and_assignment_follows_its_own_importance() -> None:
    # The values with a tiny Hessian estimate are what a per-weight assignment weight lets the rate
    # term push off their nearest centre, all towards the probable ones (their errors then add up,
    # shrinking the weights); with unit assignment weights they are treated like the rest.
    w, h = _data(20_000)
    h = h.copy()
    tiny = np.arange(len(w)) % 2 == 0
    h[tiny] = 1e-6
    moved, shrink = {}, {}
    for name, assign in (("hessian", h), ("unit", np.ones_like(h))):
        centres, a = ecsq(w, h, 32, 0.3, assign_importance=assign)
        nearest = np.searchsorted((centres[1:] + centres[:-1]) / 2, w)
        moved[name] = float(np.mean(a[tiny] != nearest[tiny]))
        shrink[name] = float(np.sum((centres[a] - w)[tiny] * w[tiny]) / np.sum(w[tiny] ** 2))
        # Centres are the h-weighted means of their members, whatever weighs the assignment.
        mass = np.bincount(a, weights=h, minlength=len(centres))
        np.testing.assert_allclose(centres, np.bincount(a, weights=h * w, minlength=len(centres)) / mass, rtol=1e-9, atol=1e-12)
    assert moved["hessian"] > 2 * moved["unit"]
    assert shrink["hessian"] < shrink["unit"] < 0
