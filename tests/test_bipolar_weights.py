"""1-bit (bipolar) weights: quantize_weight at 1 bit is sign(w) x mean |w| per channel, with
w >= 0 -> +1 as QONNX's BipolarQuant (docs/qonnx-custom-ops/bipolarquant_v1.md)."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.quant.uniform import dequantize
from qcompiler.quant.weights import dequantize_weight, quantize_weight, weight_qrange
from qcompiler.targets.spec import TensorRule

RULE = TensorRule("int8", symmetric=True, granularity="per-channel", narrow_range=True)


@pytest.mark.parametrize("weight_range", ["auto", "minmax", "mse"])
def test_one_bit_is_sign_times_mean_magnitude_per_channel(weight_range: str) -> None:
    w = np.random.default_rng(0).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w[1, 0, 0, 0] = 0.0  # zero maps to +1, as BipolarQuant's x >= 0
    w[2, 1, 2, 0] = -0.0
    q, scale, zp = quantize_weight(w, RULE, 1, 0, weight_range)
    assert q.shape == w.shape and scale.shape == (4,) and zp.shape == (4,)
    assert set(np.unique(q)) <= {-1, 1} and not np.any(zp)
    assert np.array_equal(q, np.where(w >= 0, 1, -1))
    assert q[1, 0, 0, 0] == 1 and q[2, 1, 2, 0] == 1
    assert scale.dtype == np.float32
    np.testing.assert_allclose(scale, np.abs(w).reshape(4, -1).mean(axis=1), rtol=1e-6)
    # DequantizeLinear gives exactly scale x sign(w).
    deq = dequantize(q, scale, zp, axis=0)
    assert np.array_equal(deq, (np.where(w >= 0, 1, -1).astype(np.float32) * scale.reshape(4, 1, 1, 1)))


def test_mean_magnitude_is_the_least_squares_scale() -> None:
    w = np.random.default_rng(1).normal(0, 1, (3, 50)).astype(np.float32)
    q, scale, zp = quantize_weight(w, RULE, 1, 0)
    best = np.sum((dequantize(q, scale, zp, axis=0) - w) ** 2, dtype=np.float64)
    for factor in (0.9, 1.1):
        other = np.sum((dequantize(q, scale * factor, zp, axis=0) - w) ** 2, dtype=np.float64)
        assert other > best


def test_per_tensor_and_other_axes() -> None:
    w = np.random.default_rng(2).normal(0, 1, (5, 6)).astype(np.float32)
    q, scale, zp = quantize_weight(w, RULE, 1, None)
    assert scale.shape == () and zp.shape == () and scale == pytest.approx(np.abs(w).mean(), rel=1e-6)
    q1, scale1, _ = quantize_weight(w, RULE, 1, 1)  # a MatMul's output channels: the columns
    np.testing.assert_allclose(scale1, np.abs(w).mean(axis=0), rtol=1e-6)
    assert np.array_equal(q, q1)


def test_channel_of_zeros_keeps_a_positive_scale() -> None:
    w = np.zeros((2, 4), np.float32)
    w[1] = [1.0, -2.0, 3.0, -4.0]
    q, scale, zp = quantize_weight(w, RULE, 1, 0)
    assert np.all(q[0] == 1) and scale[0] > 0 and scale[1] == pytest.approx(2.5)
    assert np.abs(dequantize(q, scale, zp, axis=0)[0]).max() < 1e-9


def test_per_block_scales_ignore_the_padding() -> None:
    rule = TensorRule("int8", symmetric=True, granularity="per-block", block_size=4)
    w = np.random.default_rng(3).normal(0, 1, (3, 10)).astype(np.float32)  # blocks 4 + 4 + 2 (padded)
    q, scale, zp = quantize_weight(w, rule, 1, 1)
    assert scale.shape == (3, 3) and np.array_equal(q, np.where(w >= 0, 1, -1)) and not np.any(zp)
    for b, cols in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
        np.testing.assert_allclose(scale[:, b], np.abs(w[:, cols]).mean(axis=1), rtol=1e-6)
    step = np.repeat(scale, 4, axis=1)[:, :10]
    assert np.array_equal(dequantize_weight(q, scale, zp, rule, 1), (q * step).astype(np.float32))


def test_weight_qrange_at_one_bit() -> None:
    assert weight_qrange(RULE, 1) == (-1, 1)
    assert weight_qrange(TensorRule("int8", symmetric=True, granularity="per-channel"), 1) == (-1, 1)
    assert weight_qrange(RULE, 2) == (-1, 1) and weight_qrange(RULE, 8) == (-127, 127)  # unchanged
