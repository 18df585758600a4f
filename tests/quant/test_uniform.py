"""Uniform quantization numerics: exact against onnxruntime's QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from qcompiler.quant.uniform import affine_params, dequantize, quantize, sqnr_db
from tests.helpers import make_model, run, tensor_info


def test_affine_params_asymmetric_map_range_ends_and_zero_exactly() -> None:
    scale, zp = affine_params(-1.0, 3.0, 0, 255, symmetric=False)
    assert np.isclose(scale, 4.0 / 255) and zp == 64
    assert dequantize(quantize(np.zeros(1, np.float32), scale, zp, 0, 255), scale, zp)[0] == 0.0


def test_affine_params_widen_to_contain_zero_and_symmetric_centre() -> None:
    scale, zp = affine_params(2.0, 5.0, 0, 255, symmetric=False)  # [2, 5] becomes [0, 5]
    assert zp == 0 and np.isclose(scale, 5.0 / 255)
    scale, zp = affine_params(np.array([-1.0, -4.0]), np.array([2.0, 1.0]), -127, 127, symmetric=True)
    np.testing.assert_allclose(scale, [2.0 / 127, 4.0 / 127], rtol=1e-7)
    assert np.all(zp == 0)
    _, zp_u8 = affine_params(-1.0, 1.0, 0, 255, symmetric=True)
    assert zp_u8 == 128


def test_quantize_matches_onnxruntime_bit_for_bit_per_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (4, 3, 5)).astype(np.float32)
    # Values exactly halfway between steps check round-half-to-even.
    x[0, 0, :] = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32) * 0.1
    scale, zp = affine_params(x.min(axis=(0, 2)), x.max(axis=(0, 2)), -128, 127, symmetric=True)
    scale[0] = 0.1
    model = make_model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)],
        [tensor_info("x", [4, 3, 5])],
        [tensor_info("q", [4, 3, 5], TensorProto.INT8), tensor_info("y", [4, 3, 5])],
        {"s": scale, "z": zp.astype(np.int8)},
    )
    q_ort, y_ort = run(model, {"x": x})
    q = quantize(x, scale, zp, -128, 127, axis=1)
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_array_equal(dequantize(q, scale, zp, axis=1), y_ort)


def test_sqnr() -> None:
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) == float("inf")
    assert np.isclose(sqnr_db(ref, ref + np.array([0.3, 0.4])), 20.0)
