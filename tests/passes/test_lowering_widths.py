"""Lowering any width so onnxruntime runs it exactly: native int4 weights as INT4, narrow
activations as QuantizeLinear -> Clip -> DequantizeLinear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.ir import to_proto
from qcompiler.quant.uniform import dequantize, quantize
from qcompiler.runtime import make_session, with_extra_outputs
from tests.helpers import make_model, run, tensor_info


def _net(rng: np.random.Generator, opset: int = 17):
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Conv", ["p", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1),
        ],
        [tensor_info("x", [None, 3, 8, 8])],
        [tensor_info("y", [None, 4])],
        {
            "w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
            "b1": rng.normal(0, 0.1, 8).astype(np.float32),
            "w2": rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32),
            "w3": rng.normal(0, 0.1, (4, 128)).astype(np.float32),
        },
        opset=opset,
    )


def _data() -> DataSource:
    rng = np.random.default_rng(7)
    return DataSource({"x": rng.normal(0, 1, (48, 3, 8, 8)).astype(np.float32)}, rng.integers(0, 4, 48))


def _compile(assign: str, target: str = "ort-cpu", opset: int = 17) -> qcompiler.CompileResult:
    return qcompiler.compile(_net(np.random.default_rng(0), opset), target=target, calibration=_data(), verify=False,
                             pipeline=f"infer-shapes,hessian-trace{{max-probes=8}},assign-precision{{{assign},pareto-points=0}},calibrate,insert-qdq")


def test_narrow_activations_run_as_quantize_clip_dequantize() -> None:
    result = _compile("budget=bits=8,activation-bits=4")
    model = result.model
    quantizers = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert quantizers
    clips = []
    for q in quantizers:
        (consumer,) = q.outputs[0].consumers()
        assert consumer.op_type == "Clip"  # every activation quantizer is clipped to 4 bits
        assert int(consumer.inputs[1].const_value.numpy()) == 0 and int(consumer.inputs[2].const_value.numpy()) == 15
        clips.append(consumer.outputs[0].name)
    x = _data().arrays["x"][:8]
    proto = with_extra_outputs(to_proto(model), clips)
    outputs = dict(zip([o.name for o in proto.graph.output], make_session(proto, optimize=False).run(None, {"x": x})))
    for name in clips:
        assert outputs[name].dtype == np.uint8 and outputs[name].max() <= 15
    # The graph input's quantizer, by hand: onnxruntime computes exactly the 4-bit values.
    q0 = next(q for q in quantizers if q.inputs[0].name == "x")
    s, z = q0.inputs[1].const_value.numpy(), q0.inputs[2].const_value.numpy()
    (clip0,) = q0.outputs[0].consumers()
    expected = np.clip(quantize(x, s, z, 0, 255), 0, 15)
    np.testing.assert_array_equal(outputs[clip0.outputs[0].name], expected)
    # onnxruntime's full optimizer keeps the same numbers (no fusion through the Clip).
    optimized = make_session(to_proto(model), optimize=True).run(None, {"x": x})[0]
    np.testing.assert_allclose(optimized, run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    stats = next(p.stats for p in result.report.passes if p.name == "assign-precision")
    assert stats["activation_bits"] == 4


def test_activation_width_the_target_does_not_allow_is_refused() -> None:
    with pytest.raises(QCError) as info:
        _compile("budget=bits=8,activation-bits=3")
    assert info.value.option == "activation-bits" and "[4, 5, 6, 8]" in info.value.message


def _int4_target(tmp_path: Path, min_opset: int) -> str:
    path = tmp_path / f"int4_{min_opset}.toml"
    path.write_text(f'extends = "ort-cpu"\nname = "int4-test"\nmin_opset = {min_opset}\n[bits]\nallowed = [3, 4, 8]\nnative = [4, 8]\n[cost.mac]\nfloat32 = 1.0\nint8 = 0.4\nint4 = 0.5\n')
    return str(path)


def _weight_dtypes(model: ir.Model) -> set[ir.DataType]:
    return {n.inputs[1].producer().inputs[0].const_value.dtype for n in model.graph if n.op_type in ("Conv", "Gemm")}


def test_native_int4_weights_are_stored_as_int4_with_the_same_numbers(tmp_path: Path) -> None:
    as_int4 = _compile("budget=bits=4", target=_int4_target(tmp_path, 21))
    in_int8 = _compile("budget=bits=4")  # ort-cpu: the same 4-bit values in int8 containers
    assert _weight_dtypes(as_int4.model) == {ir.DataType.INT4} and _weight_dtypes(in_int8.model) == {ir.DataType.INT8}
    x = _data().arrays["x"]
    np.testing.assert_allclose(run(as_int4.model, {"x": x})[0], run(in_int8.model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    # Packed two per byte: the int4 model is smaller on disk.
    assert len(to_proto(as_int4.model).SerializeToString()) < len(to_proto(in_int8.model).SerializeToString())
    onnx.checker.check_model(to_proto(as_int4.model), full_check=True)


def test_int4_weights_below_opset_21_stay_int8_with_a_warning(tmp_path: Path) -> None:
    result = _compile("budget=bits=4", target=_int4_target(tmp_path, 13), opset=17)
    assert _weight_dtypes(result.model) == {ir.DataType.INT8}
    assert any("opset 21" in d["message"] and d["level"] == "warning" for d in result.report.diagnostics)
