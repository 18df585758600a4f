"""Pair-limited int8 weights: exact under kernels that add pairs of uint8 x int8 products in int16."""

import dataclasses

import numpy as np
import pytest

from qcompiler.quant.pair_limit import max_pair_sum, pair_safe_scale, pair_sum_limit
from qcompiler.quant.uniform import quantize
from qcompiler.quant.weights import quantize_weight
from qcompiler.targets.spec import load_target


def vpmaddubsw_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] x int8 codes [K, M] as VPMADDUBSW computes them: adjacent products
    added in int16 with saturation, then summed exactly."""
    k = a.shape[1] + a.shape[1] % 2
    a = np.pad(a.astype(np.int64), ((0, 0), (0, k - a.shape[1])))
    w = np.pad(w.astype(np.int64), ((0, k - w.shape[0]), (0, 0)))
    prod = a[:, :, None] * w[None, :, :]  # [N, K, M]
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767)
    return pairs.sum(axis=1)


def test_limit_is_what_int16_holds_for_uint8_codes():
    assert pair_sum_limit() == 128
    assert 255 * 128 <= 32767 < 255 * 129


def test_every_channel_satisfies_the_limit_with_the_widest_safe_range():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    w[0] = 0.002 * w[0]
    w[0, 0, 0, 0] = 1.0  # one dominant weight: the channel keeps all 127 levels
    bound = np.abs(w).reshape(32, -1).max(axis=1)
    scale, top = pair_safe_scale(w, 0, bound, 127, 128)
    q = np.clip(quantize(w, scale, np.zeros(32, np.int64), -127, 127, axis=0), -top.reshape(-1, 1, 1, 1), top.reshape(-1, 1, 1, 1))
    assert max_pair_sum(q, 0) <= 128
    assert top[0] == 127 and (top >= 64).all()
    # The widest: one more level breaks the limit in every channel that did not reach 127.
    for c in np.flatnonzero(top < 127)[:5]:
        wider = np.float32(bound[c] / (top[c] + 1))
        qc = quantize(w[c], wider, np.int64(0), -127, 127)
        assert max_pair_sum(qc[None], 0) > 128


def test_pair_limited_weights_are_exact_under_saturating_pairs_and_full_range_is_not():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)  # MatMul weight [K, N]: channels on axis 1
    a = rng.integers(200, 256, size=(8, 64))  # large activation codes, as after a ReLU's range top
    rule = load_target("ort-cpu", cpu="avx2").weights
    full = dataclasses.replace(rule, pair_sum_limit=None)
    q_full, _, _ = quantize_weight(w, full, 8, 1)
    q_safe, _, _ = quantize_weight(w, rule, 8, 1)
    exact = a @ q_safe
    assert np.array_equal(vpmaddubsw_dot(a, q_safe), exact)
    for perm in (rng.permutation(64) for _ in range(5)):  # any packing order of the reduction axis
        assert np.array_equal(vpmaddubsw_dot(a[:, perm], q_safe[perm]), a[:, perm] @ q_safe[perm])
    assert not np.array_equal(vpmaddubsw_dot(a, q_full), a @ q_full)


def test_clipped_ranges_saturate_at_the_channel_limit():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 200)).astype(np.float32)
    rule = load_target("ort-cpu", cpu="avx2").weights
    q, scale, _ = quantize_weight(w, rule, 8, 0, weight_range="mse")
    assert max_pair_sum(q, 0) <= 128


def test_vnni_keeps_the_full_int8_range():
    rule = load_target("ort-cpu", cpu="avx512-vnni").weights
    assert rule.pair_sum_limit is None
    w = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    q, _, _ = quantize_weight(w, rule, 8, 0)
    assert np.abs(q).max() == 127 and max_pair_sum(q, 0) > 128


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_narrow_widths_are_untouched(bits):
    w = np.random.default_rng(4).standard_normal((4, 50)).astype(np.float32)
    limited = load_target("ort-cpu", cpu="avx2").weights
    plain = dataclasses.replace(limited, pair_sum_limit=None)
    for a, b in zip(quantize_weight(w, limited, bits, 0), quantize_weight(w, plain, bits, 0)):
        assert np.array_equal(a, b)
