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
