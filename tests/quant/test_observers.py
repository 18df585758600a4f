"""Tests for the streaming calibration observers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompiler.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    _kl_divergences,
    make_observer,
)

METHODS = ("minmax", "percentile", "entropy", "mse")


def feed(obs: Observer, data: np.ndarray, batches: int = 20) -> Observer:
    for batch in np.array_split(data, batches):
        obs.update(batch)
    return obs


def fake_quant_mse(x: np.ndarray, lo: float, hi: float, levels: int = 256) -> float:
    """Actual mean squared error of affine quantize-dequantize of x to [lo, hi]."""
    scale = (hi - lo) / (levels - 1)
    zp = np.clip(np.round(-lo / scale), 0, levels - 1)
    q = np.clip(np.round(x / scale) + zp, 0, levels - 1)
    return float(np.mean((x - (q - zp) * scale) ** 2))


# --- min/max ------------------------------------------------------------------------------


def test_minmax_is_exact_over_batches() -> None:
    obs = MinMaxObserver()
    obs.update(np.array([1.0, -2.0, 3.0]))
    obs.update(np.array([[0.5, 7.0]], dtype=np.float32))
    obs.update(np.array([-4.0]))
    assert obs.count == 6
    assert obs.range(levels=256, symmetric=False) == (-4.0, 7.0)
    assert obs.range(levels=256, symmetric=True) == (-7.0, 7.0)


def test_minmax_widens_one_sided_data_to_contain_zero() -> None:
    pos = feed(MinMaxObserver(), np.array([2.0, 5.0, 3.0]), batches=2)
    assert pos.range(levels=256, symmetric=False) == (0.0, 5.0)
    neg = feed(MinMaxObserver(), np.array([-2.0, -5.0]), batches=2)
    assert neg.range(levels=256, symmetric=False) == (-5.0, 0.0)
    assert neg.range(levels=256, symmetric=True) == (-5.0, 5.0)


# --- histogram ----------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [64, 2048])
def test_histogram_growth_equals_one_histogram_of_all_data(bins: int) -> None:
    rng = np.random.default_rng(1)
    batches = [
        np.zeros(100),  # before any non-zero value: R is still undefined
        rng.uniform(-0.7, 0.7, 50_000),  # R = 1
        rng.uniform(-3.0, 3.0, 50_000),  # R = 4: two doublings
        rng.uniform(-0.1, 0.1, 50_000),  # no growth
        rng.uniform(-10.0, 10.0, 50_000),  # R = 16
    ]
    obs = PercentileObserver(bins=bins)
    for b in batches:
        obs.update(b)
    counts, edges = obs.histogram
    expected, expected_edges = np.histogram(np.concatenate(batches), bins=2 * bins, range=(-16, 16))
    np.testing.assert_array_equal(edges, expected_edges)
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == obs.count == 200_100


def test_histogram_survives_a_huge_jump_in_magnitude() -> None:
    small = np.array([-0.3, 0.2, 0.7, -0.9])
    big = np.array([1e30, -3e29])
    obs = EntropyObserver(bins=8)
    obs.update(small)
    obs.update(big)
    counts, edges = obs.histogram
    expected, _ = np.histogram(np.concatenate([small, big]), bins=16, range=(edges[0], edges[-1]))
    assert edges[-1] == 2.0**100  # the power of two just above 1e30
    np.testing.assert_array_equal(counts, expected)


def test_histogram_power_of_two_peak_lands_in_last_bin() -> None:
    obs = MSEObserver(bins=4)
    obs.update(np.array([4.0, -4.0, 1.0]))
    counts, edges = obs.histogram
    assert edges[-1] == 4.0  # 4 is already a power of two: R = 4, not 8
    assert counts[0] == 1 and counts[-1] == 1 and counts.sum() == 3


@pytest.mark.parametrize("method", METHODS)
def test_state_does_not_grow_with_batches(method: str) -> None:
    rng = np.random.default_rng(2)
    obs = make_observer(method)
    for k in range(100):
        obs.update(rng.standard_normal(1000) * (k + 1))  # growing magnitude forces R to grow
        if k == 9:
            after_10 = obs.state_bytes()
    assert obs.state_bytes() == after_10
    if isinstance(obs, HistogramObserver):
        assert obs.histogram[0].size == 2 * 2048


# --- percentile ---------------------------------------------------------------------------


def test_percentile_matches_numpy_on_normal_data() -> None:
    data = np.random.default_rng(3).standard_normal(1_000_000)
    obs = feed(PercentileObserver(99.9), data)
    lo, hi = obs.range(levels=256, symmetric=False)
    assert hi == pytest.approx(np.percentile(data, 99.9), rel=0.01)
    assert lo == pytest.approx(np.percentile(data, 0.1), rel=0.01)
    lo_s, hi_s = obs.range(levels=256, symmetric=True)
    assert lo_s == -hi_s
    assert hi_s == pytest.approx(np.percentile(np.abs(data), 99.9), rel=0.01)


def test_percentile_100_is_the_exact_min_max() -> None:
    data = np.random.default_rng(4).uniform(-2.0, 5.0, 10_000)
    obs = feed(PercentileObserver(100.0), data)
    assert obs.range(levels=256, symmetric=False) == (data.min(), data.max())


# --- entropy ------------------------------------------------------------------------------


def reference_kl(counts: np.ndarray, i: int, nq: int, eps: float = 1e-4) -> float:
    """Loop-by-loop statement of the KL criterion that _kl_divergences vectorises."""
    counts = counts.astype(np.float64)
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()
    q = np.zeros(i)
    for k in range(nq):
        members = [j for j in range(i) if (j * nq) // i == k]
        mass = sum(counts[j] for j in members)
        nonempty = [j for j in members if p[j] > 0]
        for j in nonempty:
            q[j] = mass / len(nonempty)
    p /= counts.sum()
    if counts[:i].sum() > 0:
        q /= counts[:i].sum()
    return sum(p[j] * math.log(p[j] / (q[j] if q[j] > 0 else eps)) for j in range(i) if p[j] > 0)


def test_vectorised_kl_matches_the_loop_definition() -> None:
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 50, 200) * (rng.random(200) < 0.7)  # ~30% empty bins
    counts[150:180] = 0  # an empty stretch: clipping into it needs the eps floor
    candidates = np.arange(16, 201)
    got = _kl_divergences(counts, candidates, 16)
    expected = [reference_kl(counts, int(i), 16) for i in candidates]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15)


def test_entropy_clips_outliers_of_post_relu_data() -> None:
    rng = np.random.default_rng(6)
    data = np.concatenate([np.maximum(rng.standard_normal(1_000_000), 0.0), np.full(10, 200.0)])
    obs = feed(EntropyObserver(), rng.permutation(data))
    lo, hi = obs.range(levels=256, symmetric=False)
    assert lo == 0.0
    assert np.percentile(data, 99) < hi < 0.25 * data.max()
    lo_s, hi_s = obs.range(levels=256, symmetric=True)
    assert lo_s == -hi_s and np.percentile(data, 99) < hi_s < 0.25 * data.max()


def test_entropy_is_not_dragged_down_by_the_zeros_relu_produces() -> None:
    # Half the data is exactly 0. Zeros quantize exactly at any threshold; if they were smeared
    # over the first bin like other values, KL would favour tiny thresholds clipping the tail.
    data = np.maximum(np.random.default_rng(15).standard_normal(1_000_000), 0.0)
    lo, hi = feed(EntropyObserver(), data).range(levels=256, symmetric=False)
    assert lo == 0.0 and np.percentile(data[data > 0], 99) < hi <= data.max()


def test_entropy_keeps_nearly_the_whole_range_of_uniform_data() -> None:
    data = np.random.default_rng(7).uniform(0.0, 1.0, 1_000_000)
    obs = feed(EntropyObserver(), data)
    lo, hi = obs.range(levels=256, symmetric=False)
    assert lo == 0.0 and hi >= 0.97 * data.max()


def test_entropy_with_negative_data_intersects_the_abs_threshold_with_min_max() -> None:
    rng = np.random.default_rng(8)
    data = np.concatenate([rng.standard_normal(500_000), [-60.0, 60.0]])
    lo, hi = feed(EntropyObserver(), data).range(levels=256, symmetric=False)
    assert -30.0 < lo < -3.0 and 3.0 < hi < 30.0


# --- mse ----------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_beats_minmax_on_laplace_data_with_outliers(symmetric: bool) -> None:
    rng = np.random.default_rng(10)
    data = rng.permutation(np.concatenate([rng.laplace(size=1_000_000), [-300.0, 300.0]]))
    lo, hi = feed(MSEObserver(), data).range(levels=256, symmetric=symmetric)
    mm_lo, mm_hi = feed(MinMaxObserver(), data).range(levels=256, symmetric=symmetric)
    assert fake_quant_mse(data, lo, hi) < 0.5 * fake_quant_mse(data, mm_lo, mm_hi)
    # The histogram's choice is (nearly) as good as the best of the same grid on the raw data.
    grid_best = min(
        fake_quant_mse(data, a * mm_lo, a * mm_hi) for a in np.linspace(0.01, 1.0, 100)
    )
    assert fake_quant_mse(data, lo, hi) <= 1.05 * grid_best


def test_mse_keeps_nearly_the_minmax_range_of_uniform_data() -> None:
    data = np.random.default_rng(11).uniform(-1.0, 3.0, 500_000)
    lo, hi = feed(MSEObserver(), data).range(levels=256, symmetric=False)
    assert lo == pytest.approx(data.min(), rel=0.02)
    assert hi == pytest.approx(data.max(), rel=0.02)


def test_mse_keeps_zero_as_the_low_end_of_non_negative_data() -> None:
    data = np.maximum(np.random.default_rng(12).standard_normal(100_000), 0.0)
    lo, hi = feed(MSEObserver(), data).range(levels=256, symmetric=False)
    assert lo == 0.0 and 0.0 < hi <= data.max()


# --- invariants shared by every observer ----------------------------------------------------

DATASETS = {
    "positive": np.array([2.0, 5.0, 3.5, 4.0]),
    "negative": np.array([-2.0, -5.0, -3.5]),
    "mixed": np.random.default_rng(13).standard_normal(10_000),
    "single": np.array([0.25]),
    "zeros": np.zeros(1000),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("symmetric", [False, True])
def test_range_contains_zero_and_is_not_empty(method: str, name: str, symmetric: bool) -> None:
    obs = feed(make_observer(method), DATASETS[name], batches=2)
    lo, hi = obs.range(levels=256, symmetric=symmetric)
    assert lo <= 0.0 <= hi and hi > lo
    if symmetric:
        assert lo == -hi
    bound = max(float(np.abs(DATASETS[name]).max()), 1e-8)  # never wider than the data needs
    assert -bound <= lo and hi <= bound


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_data_gives_a_tiny_range(method: str) -> None:
    obs = feed(make_observer(method), np.zeros((4, 8)), batches=2)
    assert obs.range(levels=256, symmetric=False) == (0.0, 1e-8)
    assert obs.range(levels=256, symmetric=True) == (-1e-8, 1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_nans_are_ignored(method: str) -> None:
    data = np.random.default_rng(14).standard_normal(20_000)
    with_nans = data.copy()
    with_nans[::7] = np.nan
    clean = feed(make_observer(method), with_nans[~np.isnan(with_nans)], batches=4)
    dirty = feed(make_observer(method), with_nans, batches=4)
    dirty.update(np.full(5, np.nan))  # an all-NaN batch is a no-op
    assert dirty.count == clean.count == np.count_nonzero(~np.isnan(with_nans))
    for symmetric in (False, True):
        assert dirty.range(levels=256, symmetric=symmetric) == clean.range(
            levels=256, symmetric=symmetric
        )


@pytest.mark.parametrize("method", METHODS)
def test_inf_is_rejected_and_leaves_the_observer_unchanged(method: str) -> None:
    obs = make_observer(method)
    obs.update(np.array([1.0, -2.0]))
    before = obs.range(levels=256, symmetric=False)
    with pytest.raises(ValueError, match="inf"):
        obs.update(np.array([0.5, np.inf]))
    assert obs.count == 2
    assert obs.range(levels=256, symmetric=False) == before


@pytest.mark.parametrize("method", METHODS)
def test_range_before_any_data_is_an_error(method: str) -> None:
    with pytest.raises(RuntimeError, match="no data"):
        make_observer(method).range(levels=256, symmetric=False)


# --- construction -------------------------------------------------------------------------


def test_make_observer_builds_each_method_with_its_options() -> None:
    assert type(make_observer("minmax")) is MinMaxObserver
    pct = make_observer("percentile", percentile=99.5, bins=128)
    assert type(pct) is PercentileObserver and pct.percentile == 99.5 and pct.bins == 128
    assert type(make_observer("entropy", bins=256)) is EntropyObserver
    assert make_observer("entropy", bins=256).bins == 256
    assert type(make_observer("mse")) is MSEObserver


def test_make_observer_rejects_unknown_methods_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError) as info:
        make_observer("kl")
    message = str(info.value)
    assert "'kl'" in message
    for name in METHODS:
        assert name in message


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        EntropyObserver(bins=15)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(40.0)
    obs = feed(MinMaxObserver(), np.array([1.0]), batches=1)
    with pytest.raises(ValueError, match="levels"):
        obs.range(levels=1, symmetric=False)
    with pytest.raises(TypeError):
        obs.update(np.array(["a"]))
