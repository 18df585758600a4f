"""Bias correction: the shift is E[op(x, W_q - W)] exactly, and the corrected layer is unbiased."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from qcompiler.data import DataSource
from qcompiler.ir import annotate_types
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import parse_pipeline
from qcompiler.precision import WEIGHT_BITS_FACT
from qcompiler.quant.bias_correction import GROUPS, LayerInputMeans, output_shift, shrunk_shift
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, run, tensor_info

CONV_CASES = {
    "padded-strided": {"pads": [1, 0, 2, 1], "strides": [2, 1]},
    "grouped-dilated": {"group": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]},
    "same-upper": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_shift_is_the_mean_output_of_the_weight_error(case: str) -> None:
    rng = np.random.default_rng(0)
    attrs = CONV_CASES[case]
    cin = 4
    w = rng.normal(0, 1, (6, cin // attrs.get("group", 1), 3, 3)).astype(np.float32)
    error = rng.normal(0, 0.1, w.shape).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], [tensor_info("x", [None, cin, 7, 6])], [tensor_info("y", [None, None, None, None])], {"w": error})
    # Position-dependent, non-zero-mean inputs: padding then matters at the borders.
    x = (rng.normal(0, 1, (32, cin, 7, 6)) + np.linspace(0, 3, 42).reshape(7, 6)).astype(np.float32)
    expected = run(model, {"x": x})[0].astype(np.float64).mean(axis=(0, 2, 3))
    node = next(iter(model.graph))
    got = output_shift(node, x.mean(axis=0, keepdims=True), error, 17)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_shift(trans_b: int) -> None:
    rng = np.random.default_rng(1)
    error = rng.normal(0, 0.1, (5, 3) if trans_b else (3, 5)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b, alpha=0.5)], [tensor_info("x", [None, 3])], [tensor_info("y", [None, 5])], {"w": error})
    x = (rng.normal(1, 1, (64, 3))).astype(np.float32)
    expected = run(model, {"x": x})[0].astype(np.float64).mean(axis=0)
    got = output_shift(next(iter(model.graph)), x.mean(axis=0, keepdims=True), error, 17)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _relu_conv_model(rng: np.random.Generator, bias: bool):
    """Conv after ReLU: all-positive inputs, so a weight error shifts every output's mean."""
    inits = {"w": rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)}
    inputs = ["r", "w"]
    if bias:
        inits["b"] = rng.normal(0, 0.1, 8).astype(np.float32)
        inputs.append("b")
    return make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Conv", inputs, ["y"], name="conv", pads=[1, 1, 1, 1])],
        [tensor_info("x", [None, 4, 6, 6])],
        [tensor_info("y", [None, 8, 6, 6])],
        inits,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_corrected_layer_has_no_mean_error_at_three_bits(bias: bool) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 1, (64, 4, 6, 6)).astype(np.float32)
    reference = run(_relu_conv_model(np.random.default_rng(2), bias), {"x": x})[0]
    errors = {}
    for correct in (False, True):
        model = _relu_conv_model(np.random.default_rng(2), bias)
        ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": x}))
        ctx.facts[WEIGHT_BITS_FACT] = {"w": 3}
        result = parse_pipeline(f"calibrate{{method=minmax}},insert-qdq{{bias-correction={str(correct).lower()}}}").run(model, ctx)
        conv = next(n for n in result.model.graph if n.op_type == "Conv")
        assert len(conv.inputs) == 3 or not correct  # a Conv without bias gains one
        assert ctx.stats["insert-qdq"]["bias_corrected"] == int(correct)
        errors[correct] = np.abs((run(result.model, {"x": x})[0] - reference).astype(np.float64).mean(axis=(0, 2, 3)))
    # The remaining mean error is the int32 bias step and the 8-bit activation rounding, far below
    # the 3-bit weight shift it replaces.
    assert errors[True].max() < 0.1 * errors[False].max(), errors


def test_input_means_are_per_position_over_all_samples() -> None:
    rng = np.random.default_rng(3)
    model = _relu_conv_model(rng, True)
    annotate_types(model)  # as load_model does: layer inputs are found by type
    x = rng.normal(0, 1, (50, 4, 6, 6)).astype(np.float32)  # 50: batches of 32 and 18
    ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": x}))
    means = ctx.analyses.get(LayerInputMeans(), model, ctx)
    np.testing.assert_allclose(means["r"].mean, np.maximum(x, 0).mean(axis=0, keepdims=True), rtol=1e-5, atol=1e-6)
    # Sample i is in group i mod GROUPS, across batch boundaries.
    assert means["r"].counts.tolist() == [len(range(g, 50, GROUPS)) for g in range(GROUPS)]
    np.testing.assert_allclose(means["r"].groups[3], np.maximum(x[3::GROUPS], 0).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_shrunk_shift_keeps_a_clear_shift_and_drops_noise() -> None:
    counts = np.full(8, 10)
    clear = np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0])  # se ~ 0.02: kept almost whole
    noise = np.array([1.0, -1.2, 0.8, -0.9, 1.1, -1.0, 0.2, -0.1])  # mean ~ 0, se ~ 0.33: dropped
    got = shrunk_shift(np.stack([clear, noise], axis=1), counts)
    assert got[0] == pytest.approx(clear.mean(), rel=1e-3)
    assert got[1] == 0.0
    # Unequal groups weigh by their sample counts; one group has no noise estimate: kept as is.
    np.testing.assert_allclose(shrunk_shift(np.array([[2.0, -3.0]]), np.array([5])), [2.0, -3.0])
    m = np.array([[1.0], [3.0]])
    # m = (3 x 1 + 1 x 3) / 4 = 1.5; se^2 = (3 x 0.25 + 1 x 2.25) / (1 x 4) = 0.75: 1.5 < 2 se
    assert shrunk_shift(m, np.array([3, 1]))[0] == 0.0
    m = np.array([[1.0], [1.2]])  # m = 1.05, se^2 = (3 x 0.0025 + 1 x 0.0225) / 4 = 0.0075
    assert shrunk_shift(m, np.array([3, 1]))[0] == pytest.approx(1.05 * (1 - 0.0075 / 1.05**2))


def _depthwise_model(rng: np.random.Generator):
    w = rng.normal(0, 0.3, (16, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 16).astype(np.float32)
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=16, pads=[1, 1, 1, 1])],
        [tensor_info("x", [None, 16, 8, 8])],
        [tensor_info("y", [None, 16, 8, 8])],
        {"w": w, "b": b},
    )


def test_depthwise_correction_from_a_few_noisy_samples_does_not_hurt_held_out_data() -> None:
    # Zero-mean inputs: the true shift is zero, and whatever the calibration samples show is
    # sampling noise. The raw mean would move each channel by it; the shrunk one must not make
    # unseen data worse.
    # Each sample's channels carry a large random offset, so each sample's shift is large while
    # their mean is zero.
    rng = np.random.default_rng(5)

    def inputs(n: int) -> np.ndarray:
        return (rng.normal(0, 3, (n, 16, 1, 1)) + rng.normal(0, 0.1, (n, 16, 8, 8))).astype(np.float32)

    calib, held_out = inputs(16), inputs(512)
    reference = run(_depthwise_model(np.random.default_rng(6)), {"x": held_out})[0].astype(np.float64)
    mse = {}
    for correct in (False, True):
        model = _depthwise_model(np.random.default_rng(6))
        ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": calib}))
        ctx.facts[WEIGHT_BITS_FACT] = {"w": 3}
        result = parse_pipeline(f"calibrate{{method=minmax}},insert-qdq{{bias-correction={str(correct).lower()}}}").run(model, ctx)
        mse[correct] = float(((run(result.model, {"x": held_out})[0] - reference) ** 2).mean())
    assert mse[True] <= mse[False] * 1.002, mse


def test_depthwise_correction_still_removes_a_real_shift() -> None:
    # Positive inputs (after a ReLU, as in MobileNets): a 3-bit weight error shifts every channel.
    rng = np.random.default_rng(7)
    calib = np.abs(rng.normal(0.5, 1, (64, 16, 8, 8))).astype(np.float32)
    held_out = np.abs(rng.normal(0.5, 1, (256, 16, 8, 8))).astype(np.float32)
    reference = run(_depthwise_model(np.random.default_rng(8)), {"x": held_out})[0].astype(np.float64)
    bias_error = {}
    for correct in (False, True):
        model = _depthwise_model(np.random.default_rng(8))
        ctx = PassContext(target=load_target("ort-cpu"), data=DataSource({"x": calib}))
        ctx.facts[WEIGHT_BITS_FACT] = {"w": 3}
        result = parse_pipeline(f"calibrate{{method=minmax}},insert-qdq{{bias-correction={str(correct).lower()}}}").run(model, ctx)
        bias_error[correct] = np.abs((run(result.model, {"x": held_out})[0] - reference).mean(axis=(0, 2, 3)))
    assert bias_error[True].mean() < 0.3 * bias_error[False].mean(), bias_error
