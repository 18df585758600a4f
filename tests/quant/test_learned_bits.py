"""Learned widths: Uhlich's step/range parametrisation and BitNet's sign steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompiler.quant.learned_bits import BitNetQuantizer, UhlichQuantizer, allowed_ceil

ALLOWED = [2, 3, 4, 5, 6, 8]


def _w() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (4, 3, 3, 3)).astype(np.float32)


def test_allowed_ceil() -> None:
    assert allowed_ceil(2.0, ALLOWED) == 2
    assert allowed_ceil(2.01, ALLOWED) == 3
    assert allowed_ceil(6.5, ALLOWED) == 8
    assert allowed_ceil(9, ALLOWED) == 8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uhlich_starts_at_its_width_and_its_codes_are_what_it_computes(bits: int) -> None:
    w = _w()
    q = UhlichQuantizer(w, 0, bits, ALLOWED)
    assert q.deployed_bits() == bits
    assert float(q.continuous_bits()) == pytest.approx(bits)
    codes, scale, b = q.codes_and_scale(torch.from_numpy(w))
    top = 2 ** (bits - 1) - 1
    assert b == bits and np.abs(codes).max() == top
    np.testing.assert_allclose(q.quantize(torch.from_numpy(w)).detach().numpy(), codes * scale[:, None, None, None], rtol=1e-5, atol=1e-6)


def test_uhlich_width_follows_step_and_range() -> None:
    q = UhlichQuantizer(_w(), 0, 4, ALLOWED)
    with torch.no_grad():
        q.log_d.fill_(float(np.log(1 / 3)))  # 3 positive levels in a range of 1: log2(4) + 1 = 3 bits
    assert float(q.continuous_bits()) == pytest.approx(3.0, abs=1e-5)
    # The width stays within the allowed ones however far the step moves.
    with torch.no_grad():
        q.log_d.fill_(5.0)
    assert q.deployed_bits() == 2
    with torch.no_grad():
        q.log_d.fill_(-20.0)
    assert q.deployed_bits() == 8


def test_uhlich_bits_gradient_lowers_width_when_penalised() -> None:
    q = UhlichQuantizer(_w(), 0, 4, ALLOWED)
    q.bits().backward()
    # More bits come from a smaller step: d(bits)/d(log step) < 0, d(bits)/d(log range) > 0.
    assert float(q.log_d.grad) < 0 < float(q.log_q.grad)
    assert float(q.bits()) == 4.0


def test_uhlich_narrower_width_after_training_keeps_the_range() -> None:
    w = _w()
    q = UhlichQuantizer(w, 0, 4, ALLOWED)
    codes, scale, bits = q.codes_and_scale(torch.from_numpy(w), 2)
    assert bits == 2 and set(np.unique(codes)) <= {-1, 0, 1}
    np.testing.assert_allclose(scale, np.abs(w).reshape(4, -1).max(axis=1), rtol=1e-6)


def test_bitnet_steps_against_the_gradient_sign_within_the_allowed_widths() -> None:
    w = torch.from_numpy(_w())
    q = BitNetQuantizer(_w(), 0, 4, ALLOWED)
    assert q.deployed_bits() == 4
    (q.bits() * 1.0).backward()  # a penalty on bits: positive gradient -> one width down
    assert q.step() == -1 and q.deployed_bits() == 3
    (-q.bits()).backward()
    assert q.step() == 1 and q.deployed_bits() == 4
    codes, scale, bits = q.codes_and_scale(w)
    np.testing.assert_allclose(q.quantize(w).detach().numpy(), codes * scale[:, None, None, None], rtol=1e-5, atol=1e-6)
    low = BitNetQuantizer(_w(), 0, 2, ALLOWED)
    low.bits().backward()
    assert low.step() == 0 and low.deployed_bits() == 2  # already the narrowest


def test_bitnet_gradient_through_the_step_exists() -> None:
    w = torch.from_numpy(_w())
    q = BitNetQuantizer(_w(), 0, 3, ALLOWED)
    ((q.quantize(w) - w) ** 2).sum().backward()
    assert q.b.grad is not None and float(q.b.grad) != 0


def test_initial_range_is_the_plain_quantizers() -> None:
    from qcompiler.quant.learned_bits import initial_range
    from qcompiler.quant.weights import weight_grid
    from qcompiler.targets.spec import load_target

    w = _w()
    rule = load_target("ort-cpu").weights
    # Min/max at 4 bits: the whole range; MSE-clipped at 2 bits: well inside it.
    assert initial_range(w, 0, weight_grid(w, rule, 4, 0, "minmax").scale, 4) == pytest.approx(1.0, rel=1e-5)
    inside = initial_range(w, 0, weight_grid(w, rule, 2, 0, "mse").scale, 2)
    assert 0.2 < inside < 0.9
    q = UhlichQuantizer(w, 0, 2, ALLOWED, inside)
    assert q.deployed_bits() == 2 and float(torch.exp(q.log_q)) == pytest.approx(inside, rel=1e-5)


def test_frozen_widths_stay() -> None:
    w = torch.from_numpy(_w())
    q = UhlichQuantizer(_w(), 0, 4, ALLOWED)
    q.freeze(3)
    with torch.no_grad():
        q.log_d.fill_(-20.0)  # a step that would mean 8 bits
    assert q.deployed_bits() == 3 and float(q.bits()) == pytest.approx(3.0)
    codes, _, bits = q.codes_and_scale(w)
    assert bits == 3 and np.abs(codes).max() <= 3
    b = BitNetQuantizer(_w(), 0, 4, ALLOWED)
    b.freeze(2)
    (-b.bits()).backward()
    assert b.step() == 0 and b.deployed_bits() == 2


@pytest.mark.parametrize("bits", [2, 3])
def test_uhlich_full_range_adds_the_most_negative_code(bits: int) -> None:
    w = _w()
    # A clipped range (half each channel's largest weight): weights below it reach the extra code.
    q = UhlichQuantizer(w, 0, bits, ALLOWED, 0.5, full_range=True)
    codes, scale, b = q.codes_and_scale(torch.from_numpy(w))
    top = 2 ** (bits - 1) - 1
    assert b == bits and codes.min() == -top - 1 and codes.max() == top
    np.testing.assert_allclose(q.quantize(torch.from_numpy(w)).detach().numpy(), codes * scale[:, None, None, None], rtol=1e-5, atol=1e-6)
    # The narrow quantizer of the same step and range never reaches it.
    narrow, _, _ = UhlichQuantizer(w, 0, bits, ALLOWED, 0.5).codes_and_scale(torch.from_numpy(w))
    assert narrow.min() == -top
