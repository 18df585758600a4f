"""AdaRound numerics: the relaxation starts at the float weight, ends on the grid within one step
of it, beats rounding to nearest on the output error it optimises, and respects the CPU's pair
limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompiler.quant.adaround import (
    AdaRoundSettings,
    beta_at,
    hard_codes,
    initial_logits,
    optimize_rounding,
    pair_sum_violations,
    rectified_sigmoid,
    rounding_regularizer,
)
from qcompiler.quant.weights import weight_grid
from qcompiler.targets.spec import load_target


def _grid(w: np.ndarray, bits: int = 4, cpu: str | None = None, axis: int | None = 0):
    rule = load_target("ort-cpu", cpu=cpu).weights if cpu else load_target("ort-cpu", cpu="avx512-vnni").weights
    return weight_grid(w, rule, bits, axis, "minmax")


def test_initial_relaxation_is_the_float_weight_and_its_hard_rounding_is_nearest() -> None:
    w = np.random.default_rng(0).normal(0, 1, (8, 16)).astype(np.float32)
    grid = _grid(w)
    floor, v = initial_logits(w, grid)
    soft = (floor + rectified_sigmoid(torch.from_numpy(v)).numpy() - grid.expand(grid.zero_point, 2)) * grid.expand(grid.scale, 2)
    np.testing.assert_allclose(soft, w, atol=2e-4 * float(np.max(grid.scale)))
    np.testing.assert_array_equal(hard_codes(floor, v, grid), grid.nearest(w))


def test_hard_codes_are_the_code_below_or_above_and_inside_the_grid() -> None:
    w = np.random.default_rng(1).normal(0, 1, (6, 20)).astype(np.float32)
    grid = _grid(w, bits=3)
    floor, _ = initial_logits(w, grid)
    for v in (np.full(w.shape, -50.0, np.float32), np.full(w.shape, 50.0, np.float32)):
        codes = hard_codes(floor, v, grid)
        assert np.all((codes == np.clip(floor, -3, 3)) | (codes == np.clip(floor + 1, -3, 3)))
        assert codes.min() >= -3 and codes.max() <= 3


def test_regularizer_is_zero_at_hard_choices_and_largest_halfway() -> None:
    h = torch.tensor([0.0, 1.0, 0.5, 0.25])
    terms = [float(rounding_regularizer(h[i : i + 1], 4.0)) for i in range(4)]
    assert terms[0] == terms[1] == 0.0 and terms[2] == 1.0 and 0 < terms[3] < 1


def test_beta_is_off_in_the_warmup_then_anneals_from_start_to_end() -> None:
    s = AdaRoundSettings(iterations=100, warmup=0.2, beta_start=20, beta_end=2)
    assert beta_at(0, s) is None and beta_at(19, s) is None
    assert beta_at(20, s) == pytest.approx(20) and beta_at(100, s) == pytest.approx(2)
    betas = [beta_at(i, s) for i in range(20, 101)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))


def test_pair_sum_violations_find_two_large_codes_of_one_sign() -> None:
    codes = np.array([[100, 60, -5], [64, 64, -128], [-70, -70, 3]])
    assert pair_sum_violations(codes, np.zeros(3, np.int64), 0, 128).tolist() == [True, False, True]


def test_learned_rounding_lowers_the_output_error_of_a_linear_layer() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (16, 32)).astype(np.float32)
    # Correlated inputs: rounding errors of one row then add up in the output, which is what
    # AdaRound exploits and rounding to nearest ignores.
    mix = rng.normal(0, 1, (32, 32)).astype(np.float32)
    x = torch.from_numpy((rng.normal(0, 1, (512, 32)) @ mix).astype(np.float32))
    y = x @ torch.from_numpy(w).T
    grid = _grid(w, bits=3)
    result = optimize_rounding(lambda a, b: a @ b.T, x, y, w, grid, AdaRoundSettings(iterations=600, batch_size=64, lr=1e-2))
    assert result.adaround_mse < 0.8 * result.nearest_mse
    floor, _ = initial_logits(w, grid)
    assert np.all((result.codes == floor) | (result.codes == floor + 1) | (result.codes == grid.nearest(w)))
    assert 0 < result.flipped < 0.5


def test_channels_whose_rounding_would_overflow_int16_pairs_keep_nearest() -> None:
    """On an AVX2 CPU without VNNI the grid is pair-safe for nearest rounding only: a channel where
    learned rounding pushes two large weights up is put back, and the codes stay safe."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (8, 64)).astype(np.float32)
    grid = _grid(w, bits=8, cpu="avx2")
    limit = load_target("ort-cpu", cpu="avx2").weights.pair_sum_limit
    assert limit is not None
    x = torch.from_numpy(rng.normal(0, 1, (256, 64)).astype(np.float32))
    # A target that rewards rounding everything up: the largest weights then break the limit.
    y = x @ torch.from_numpy(w + 0.6 * np.asarray(grid.expand(grid.scale, 2))).T
    result = optimize_rounding(lambda a, b: a @ b.T, x, y, w, grid, AdaRoundSettings(iterations=300, batch_size=64, lr=5e-2, reg=0.0), pair_sum_limit=limit)
    assert result.reverted_channels > 0
    assert not pair_sum_violations(result.codes, grid.zero_point, 0, limit).any()
