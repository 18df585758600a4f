"""LSQ fake quantization: the forward pass is QuantizeLinear + DequantizeLinear exactly, and the
step size's gradient is LSQ's."""

from __future__ import annotations

import math

import numpy as np
import torch

from qcompiler.quant.lsq import fake_quantize, grad_scaled
from qcompiler.quant.uniform import dequantize, quantize
from qcompiler.quant.weights import WeightGrid


def test_forward_is_quantize_then_dequantize_per_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32)
    scale = np.array([0.1, 0.05, 0.2, 0.02], np.float32)
    lo, hi = np.full(4, -7), np.array([7, 7, 5, 7])
    got = fake_quantize(torch.from_numpy(x), torch.from_numpy(scale), np.zeros(4, np.int64), lo, hi, 0).numpy()
    codes = np.clip(quantize(x, scale, np.zeros(4, np.int64), -128, 127, axis=0), lo.reshape(4, 1, 1, 1), hi.reshape(4, 1, 1, 1))
    np.testing.assert_array_equal(got, dequantize(codes, scale, np.zeros(4, np.int64), axis=0))
    # The codes qat writes back for such values: the grid's own rounding.
    np.testing.assert_array_equal(WeightGrid(scale, np.zeros(4, np.int64), lo, hi, 0).nearest(x), codes)


def test_step_gradient_is_lsqs() -> None:
    x = torch.tensor([0.26, -0.74, 3.0, -3.0])  # x/s: 2.6 inside; -7.4, 30 and -30 past an end
    s = torch.nn.Parameter(torch.tensor(0.1))
    fake_quantize(x, s, 0, -7, 7, None).sum().backward()
    # LSQ: round(v) - v inside the range, the end itself outside; times 1 / sqrt(n * hi).
    expected = ((3 - 2.6) + (-7) + 7 + (-7)) / math.sqrt(4 * 7)
    assert abs(float(s.grad) - expected) < 1e-5


def test_weight_gradient_passes_inside_the_range_only() -> None:
    x = torch.nn.Parameter(torch.tensor([0.26, 3.0]))
    fake_quantize(x, torch.tensor(0.1), 0, -7, 7, None).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


def test_grad_scaled_changes_only_the_gradient() -> None:
    p = torch.nn.Parameter(torch.tensor(2.0))
    y = grad_scaled(p, 0.25)
    assert float(y.detach()) == 2.0
    (3 * y).backward()
    assert float(p.grad) == 0.75
