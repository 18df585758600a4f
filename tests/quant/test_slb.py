"""SLB's numerics: the sharpness schedules, logits that start at plain rounding, the expectation
that becomes the hard choice as the sharpness rises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompiler.quant.slb import LevelChoice, sharpness


@pytest.mark.parametrize("schedule", ["exp", "cos", "linear"])
def test_schedules_run_from_start_to_end_and_rise(schedule: str) -> None:
    values = [sharpness(schedule, i, 50, 0.01, 10.0) for i in range(50)]
    assert values[0] == pytest.approx(0.01) and values[-1] == pytest.approx(10.0)
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_exp_schedule_is_geometric() -> None:
    assert sharpness("exp", 1, 3, 0.01, 10.0) == pytest.approx(np.sqrt(0.01 * 10.0))
    assert sharpness("linear", 1, 3, 0.01, 10.0) == pytest.approx(5.005)


def _choice(axis=0, levels=np.arange(-1, 2)):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (6, 4, 3, 3)).astype(np.float32)
    scale = np.abs(w).reshape(6, -1).max(axis=1).astype(np.float32) / 1.5
    return w, scale, LevelChoice.start(w, levels, scale, 0.0, axis, 0.01)


def test_first_argmax_is_plain_rounding_and_codes_are_levels() -> None:
    w, scale, c = _choice()
    expected = np.clip(np.rint(w / scale[:, None, None, None]), -1, 1).astype(np.int64)
    np.testing.assert_array_equal(c.codes(), expected)
    np.testing.assert_allclose(c.hard().numpy(), expected * scale[:, None, None, None], rtol=1e-6)


def test_expectation_approaches_the_hard_weight_as_sharpness_rises() -> None:
    _, _, c = _choice()
    hard = c.hard()
    # Mean over the weights: one lying exactly between two levels stays split at any sharpness
    # until training moves its logits.
    gaps = [float((c.expected(t).detach() - hard).abs().mean()) for t in (0.01, 0.1, 1.0, 10.0)]
    assert gaps[0] > 0.05 and gaps[-1] < 1e-3
    assert all(b <= a for a, b in zip(gaps, gaps[1:]))
    assert c.confidence(10.0) > 0.999 > c.confidence(0.01)


def test_gradients_reach_logits_and_scales() -> None:
    _, _, c = _choice()
    c.expected(0.01).sum().backward()
    assert c.logits.grad is not None and float(c.logits.grad.abs().sum()) > 0
    assert c.scale.grad is not None and c.scale.grad.shape == (6,)


def test_bipolar_levels() -> None:
    w, scale, c = _choice(levels=np.array([-1, 1]))
    np.testing.assert_array_equal(c.codes(), np.where(w >= 0, 1, -1))
    assert set(np.unique(c.codes())) <= {-1, 1}
    assert torch.all(c.hard().abs() > 0)
