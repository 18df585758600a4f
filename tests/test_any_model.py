"""qcompiler on models unlike the bundled ResNet: the default pipeline must hold for any ONNX model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import qcompiler
from qcompiler.data import DataSource
from qcompiler.ir import to_proto
from tests.helpers import make_model, tensor_info


def _attention_like(rng: np.random.Generator):
    """Two inputs, MatMul of two activations, Softmax, Clip (ReLU6), depthwise-free dense layers."""
    d = 8
    return make_model(
        [
            helper.make_node("MatMul", ["a", "wq"], ["q"], name="proj_q"),
            helper.make_node("MatMul", ["b", "wk"], ["k"], name="proj_k"),
            helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
            helper.make_node("Softmax", ["scores"], ["attn"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["attn", "k"], ["ctx"], name="context"),
            helper.make_node("Clip", ["ctx", "zero", "six"], ["c6"], name="relu6"),
            helper.make_node("Add", ["c6", "q"], ["res"], name="residual"),
            helper.make_node("ReduceMean", ["res"], ["pooled"], name="pool", axes=[1], keepdims=0),
            helper.make_node("Gemm", ["pooled", "wo", "bo"], ["y"], name="head", transB=1),
        ],
        [tensor_info("a", [None, 6, d]), tensor_info("b", [None, 6, d])],
        [tensor_info("y", [None, 4])],
        {
            "wq": rng.normal(0, 0.4, (d, d)).astype(np.float32),
            "wk": rng.normal(0, 0.4, (d, d)).astype(np.float32),
            "zero": np.array(0.0, np.float32),
            "six": np.array(6.0, np.float32),
            "wo": rng.normal(0, 0.4, (4, d)).astype(np.float32),
            "bo": rng.normal(0, 0.1, 4).astype(np.float32),
        },
        opset=17,
    )


def _depthwise(rng: np.random.Generator):
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="pointwise", pads=[0, 0, 0, 0]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
            helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["x", "w3"], ["c3"], name="side"),
            helper.make_node("Concat", ["c2", "c3"], ["cat"], name="concat", axis=1),
            helper.make_node("MaxPool", ["cat"], ["p"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
        ],
        [tensor_info("x", [None, 3, 8, 8])],
        [tensor_info("y", [None, 12])],
        {
            "w1": rng.normal(0, 0.5, (8, 3, 1, 1)).astype(np.float32),
            "w2": rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32),
            "b2": rng.normal(0, 0.1, 8).astype(np.float32),
            "w3": rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32),
        },
    )


def _check(model, data: DataSource, min_sqnr: float) -> qcompiler.CompileResult:
    before = to_proto(model).SerializeToString()
    result = qcompiler.compile(model, calibration=data, latency_runs=0)
    assert to_proto(model).SerializeToString() == before, "the caller's model must not change"
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    assert result.report.verification.outputs[0].sqnr_db > min_sqnr
    return result


def test_two_input_attention_like_model() -> None:
    rng = np.random.default_rng(0)
    data = DataSource({"a": rng.normal(0, 1, (64, 6, 8)).astype(np.float32), "b": rng.normal(0, 1, (64, 6, 8)).astype(np.float32)})
    result = _check(_attention_like(rng), data, 25)
    kept = {k.node: k.reason for k in result.report.kept_float}
    assert "softmax" in kept
    # The projections (weights) run quantized; the product of two activations feeding the float
    # Softmax, and the residual chain read only by the float ReduceMean, stay float.
    assert "proj_q" not in kept and "proj_k" not in kept and "head" not in kept
    assert kept["scores"].startswith("its output feeds only float ops")
    proj_q = next(n for n in result.model.graph if n.name == "proj_q")
    assert proj_q.inputs[1].producer().op_type == "DequantizeLinear"


def test_depthwise_concat_maxpool_model() -> None:
    rng = np.random.default_rng(1)
    data = DataSource({"x": rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)})
    result = _check(_depthwise(rng), data, 30)
    depthwise = next(n for n in result.model.graph if n.name == "depthwise")
    w_dq = depthwise.inputs[1].producer()
    assert w_dq.op_type == "DequantizeLinear" and w_dq.inputs[1].const_value.numpy().shape == (8,)
    assert not result.report.kept_float


def test_fixed_batch_model_gets_batches_of_its_size() -> None:
    """Exporters often fix the batch (``[4, 3, 8, 8]``): every run must use exactly that size."""
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [tensor_info("x", [4, 3, 8, 8])],
        [tensor_info("y", [4, 2, 8, 8])],
        {"w": rng.normal(0, 0.5, (2, 3, 1, 1)).astype(np.float32)},
    )
    data = DataSource({"x": rng.normal(0, 1, (42, 3, 8, 8)).astype(np.float32)})
    result = qcompiler.compile(model, calibration=data, latency_runs=3)
    # The last 8 samples (two whole batches) are held out for verification; of the 34 left for
    # calibration, the last 2 do not fill a batch.
    assert result.report.verification.samples == 8 and result.report.verification.data.endswith("samples 34-41")
    assert result.report.verification.latency.batch == 4
    assert result.report.calibration["samples"] == 32


def test_graph_output_that_feeds_a_quantized_op_stays_float() -> None:
    rng = np.random.default_rng(3)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
        ],
        [tensor_info("x", [None, 6])],
        [tensor_info("y", [None, 3]), tensor_info("h", [None, 5])],
        {"w1": rng.normal(0, 1, (6, 5)).astype(np.float32), "w2": rng.normal(0, 1, (5, 3)).astype(np.float32)},
    )
    data = DataSource({"x": rng.normal(0, 1, (32, 6)).astype(np.float32)})
    result = _check(model, data, 30)
    h = next(v for v in result.model.graph.outputs if v.name == "h")
    assert h.producer().name == "first"  # the output is the float tensor itself, no Q/DQ on it
    second = next(n for n in result.model.graph if n.name == "second")
    assert second.inputs[0].producer().op_type == "DequantizeLinear"


def test_float16_model_is_kept_float_with_the_reason() -> None:
    rng = np.random.default_rng(4)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [tensor_info("x", [None, 3, 4, 4], onnx.TensorProto.FLOAT16)],
        [tensor_info("y", [None, 2, 4, 4], onnx.TensorProto.FLOAT16)],
        {"w": rng.normal(0, 1, (2, 3, 1, 1)).astype(np.float16)},
    )
    data = DataSource({"x": rng.normal(0, 1, (8, 3, 4, 4)).astype(np.float16)})
    result = qcompiler.compile(model, calibration=data, latency_runs=0)
    assert [(k.node, k.reason) for k in result.report.kept_float] == [("conv", "float16 data: insert-qdq quantizes float32 tensors only")]
    assert not [n for n in result.model.graph if n.op_type == "QuantizeLinear"]
