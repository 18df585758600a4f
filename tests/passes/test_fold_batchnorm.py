"""fold-batchnorm: exact numerics (outputs within 1e-5) and what is and is not folded."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from qcompiler.ir import load_model
from qcompiler.passes.fold_batchnorm import FoldBatchNorm
from qcompiler.passes.infer_shapes import InferShapes
from qcompiler.pass_manager import PassContext, PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.targets.spec import load_target
from tests.helpers import bn_node, bn_params, make_model, run, tensor_info

TOL = 1e-5


def _ctx() -> PassContext:
    return PassContext(target=load_target("ort-cpu"))


def _fold(model: ir.Model):
    """Run infer-shapes then fold-batchnorm; return (ops before, ops after, fold-batchnorm's result)."""
    before_ops = [n.op_type for n in model.graph]
    ctx = _ctx()
    shaped = PassManager.run_one(InferShapes(), model, ctx).model
    result = PassManager.run_one(FoldBatchNorm(), shaped, ctx)
    return before_ops, [n.op_type for n in result.model.graph], result


def _assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    for a, b in zip(before, after):
        scale = max(1.0, float(np.max(np.abs(a))))
        assert np.max(np.abs(a - b)) <= TOL * scale


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bn_folds_exactly(with_bias: bool) -> None:
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), **bn_params(rng, 8)}
    conv_inputs = ["x", "w"]
    if with_bias:
        inits["b"] = rng.normal(0, 1, 8).astype(np.float32)
        conv_inputs.append("b")
    model = make_model(
        [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "y")],
        [tensor_info("x", [2, 3, 8, 8])],
        [tensor_info("y", [2, 8, 8, 8])],
        inits,
    )
    feed = {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    expected = run(model, feed)
    _, ops, result = _fold(model)
    assert ops == ["Conv"]
    assert result.stats == {"folded": 1, "decomposed": 0}
    assert result.model.graph.outputs[0].name == "y"  # the folded tensor keeps BN's name
    _assert_same(expected, run(result.model, feed))


def test_conv_transpose_grouped_bn_folds_exactly() -> None:
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(0, 0.5, (4, 3, 2, 2)).astype(np.float32), **bn_params(rng, 6)}
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", group=2, strides=[2, 2]), bn_node("c", "y")],
        [tensor_info("x", [1, 4, 5, 5])],
        [tensor_info("y", [1, 6, 10, 10])],
        inits,
    )
    feed = {"x": rng.normal(0, 1, (1, 4, 5, 5)).astype(np.float32)}
    expected = run(model, feed)
    _, ops, result = _fold(model)
    assert ops == ["ConvTranspose"]
    _assert_same(expected, run(result.model, feed))


@pytest.mark.parametrize("trans_b,with_c,beta", [(0, False, 1.0), (1, True, 0.5), (1, False, 1.0), (0, True, 2.0)])
def test_gemm_bn_folds_exactly(trans_b: int, with_c: bool, beta: float) -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.5, (5, 7) if trans_b else (7, 5)).astype(np.float32)
    inits = {"w": w, **bn_params(rng, 5)}
    gemm_inputs = ["x", "w"]
    if with_c:
        inits["c_bias"] = rng.normal(0, 1, 5).astype(np.float32)
        gemm_inputs.append("c_bias")
    model = make_model(
        [helper.make_node("Gemm", gemm_inputs, ["g"], name="gemm", transB=trans_b, beta=beta), bn_node("g", "y")],
        [tensor_info("x", [3, 7])],
        [tensor_info("y", [3, 5])],
        inits,
    )
    feed = {"x": rng.normal(0, 1, (3, 7)).astype(np.float32)}
    expected = run(model, feed)
    _, ops, result = _fold(model)
    assert ops == ["Gemm"]
    _assert_same(expected, run(result.model, feed))


def test_matmul_bn_folds_into_weight_plus_add() -> None:
    rng = np.random.default_rng(3)
    inits = {"w": rng.normal(0, 0.5, (6, 4)).astype(np.float32), **bn_params(rng, 4)}
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), bn_node("m", "y")],
        [tensor_info("x", [3, 6])],
        [tensor_info("y", [3, 4])],
        inits,
    )
    feed = {"x": rng.normal(0, 1, (3, 6)).astype(np.float32)}
    expected = run(model, feed)
    _, ops, result = _fold(model)
    assert ops == ["MatMul", "Add"]
    _assert_same(expected, run(result.model, feed))


def test_bn_after_relu_is_not_folded_backwards_but_becomes_mul_add() -> None:
    rng = np.random.default_rng(4)
    inits = {"w": rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), **bn_params(rng, 4)}
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"), bn_node("r", "y")],
        [tensor_info("x", [2, 3, 4, 4])],
        [tensor_info("y", [2, 4, 4, 4])],
        inits,
    )
    feed = {"x": rng.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)}
    expected = run(model, feed)
    original_w = inits["w"].copy()
    _, ops, result = _fold(model)
    assert ops == ["Conv", "Relu", "Mul", "Add"]
    assert result.stats == {"folded": 0, "decomposed": 1}
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    np.testing.assert_array_equal(conv.inputs[1].const_value.numpy(), original_w)  # weights untouched
    _assert_same(expected, run(result.model, feed))


def test_conv_output_used_twice_is_not_folded() -> None:
    rng = np.random.default_rng(5)
    inits = {"w": rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), **bn_params(rng, 4)}
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y"), helper.make_node("Relu", ["c"], ["z"], name="other")],
        [tensor_info("x", [1, 3, 4, 4])],
        [tensor_info("y", [1, 4, 4, 4]), tensor_info("z", [1, 4, 4, 4])],
        inits,
    )
    feed = {"x": rng.normal(0, 1, (1, 3, 4, 4)).astype(np.float32)}
    expected = run(model, feed)
    _, ops, result = _fold(model)
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1 and "Mul" in ops
    _assert_same(expected, run(result.model, feed))


def test_resnet20_all_bns_fold_within_1e5(bundled_model, bundled_calib) -> None:
    model = load_model(bundled_model)
    feed = {"input": np.load(bundled_calib)["input"][:16]}
    expected = run(model, feed)
    ctx = _ctx()
    result = parse_pipeline("infer-shapes,fold-constants,fold-batchnorm").run(model, ctx)
    assert not [n for n in result.model.graph if n.op_type == "BatchNormalization"]
    assert ctx.stats["fold-batchnorm"] == {"folded": 19, "decomposed": 0}
    got = run(result.model, feed)
    assert np.max(np.abs(expected[0] - got[0])) <= TOL * max(1.0, float(np.max(np.abs(expected[0]))))


def test_trained_codes_of_a_negated_channel_stay_in_the_storage_type() -> None:
    """qnn stores int8 weights on [-128, 127]: fold-batchnorm negating a channel that holds -128
    (bn1's channel 2 has a negative scale) gives 128, which int8 would wrap to -128. insert-qdq
    moves it one step to 127 and says so; every other code is kept."""
    import qcompiler
    from qcompiler.data import DataSource
    from tests.helpers import run, small_bn_cnn

    x = np.random.default_rng(0).normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    w1 = next(n for n in small_bn_cnn().graph if n.name == "conv1").inputs[1].const_value.numpy()
    assert abs(w1[2].min()) > abs(w1[2].max()), "the setting this test needs: channel 2's largest weight is negative"
    result = qcompiler.compile(small_bn_cnn(), "qnn", calibration=DataSource({"input": x}), verify=False,
                               pipeline="infer-shapes,fold-constants,adaround{bits=8,iterations=0},fold-batchnorm,calibrate,insert-qdq")
    conv1 = next(n for n in result.model.graph if n.name == "conv1")
    codes = conv1.inputs[1].producer().inputs[0].const_value.numpy().astype(np.int64)
    assert codes[2].max() == 127 and codes[2].min() > -128  # negated: its largest code is the clipped 128
    assert any("moved one step" in d["message"] and "conv1" in d["message"] for d in result.report.diagnostics)
    reference, out = run(small_bn_cnn(), {"input": x})[0], run(result.model, {"input": x})[0]
    assert 10 * np.log10(np.sum(reference**2) / np.sum((reference - out) ** 2)) > 45
