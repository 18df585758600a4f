"""Every format's lowering runs in onnxruntime with exactly the values the numpy format computes,
says whether it ran natively, and carries a qc.format that the validator accepts."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompiler.format_lowering import lower_constant
from qcompiler.format_metadata import format_violations
from qcompiler.ir import to_proto
from qcompiler.quant.formats import BlockFormat, parse_format
from qcompiler.quant.weights import quantize_bipolar

#: format -> (runs natively, storage type)
FORMATS = {
    "int8": (True, "int8"), "uint8": (True, "uint8"), "int4": (True, "int4"), "int<3>": (True, "int4"), "int2": (True, "int4"),
    "int<12>": (True, "int16"), "bipolar": (True, "int4"), "fixed<4,3>": (True, "int8"), "ufixed<2,6>": (True, "uint8"),
    "e4m3fn": (True, "float8e4m3fn"), "e5m2": (True, "float8e5m2"), "e4m3fnuz": (True, "float8e4m3fnuz"), "e5m2fnuz": (True, "float8e5m2fnuz"),
    "e2m1": (True, "float8e4m3fn"), "e2m3": (True, "float8e4m3fn"), "e3m2": (True, "float8e4m3fn"),
    "fp16": (False, "int32"), "bf16": (False, "int32"),
    "float<3,3>": (False, "int32"), "float<5,4,bias=10,fn>": (False, "int32"), "float<4,2,nosub>": (False, "int32"), "float<6,5>": (False, "int32"),
    "mxfp8": (True, "float8e4m3fn"), "mxfp8_e5m2": (True, "float8e5m2"), "mxfp6": (True, "float8e4m3fn"), "mxfp6_e3m2": (True, "float8e4m3fn"),
    "mxfp4": (True, "float8e4m3fn"), "mxint8": (True, "int8"), "nvfp4": (True, "float8e4m3fn"),
}


def _run(lowered) -> np.ndarray:
    graph = ir.Graph([], [lowered.output], nodes=lowered.nodes, initializers=lowered.initializers, opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    session = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_lowering_computes_the_formats_values_bit_for_bit_in_onnxruntime(name: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (6, 70)) * np.array([[1e-3], [0.1], [1.0], [3.0], [50.0], [0.0]])).astype(np.float32)
    fmt = parse_format(name)
    lowered = lower_constant("w", x, fmt, axis=0, block_axis=1)
    native, storage = FORMATS[name]
    assert (lowered.native, lowered.storage) == (native, storage)
    runtime = _run(lowered)
    np.testing.assert_array_equal(runtime.view(np.uint32), lowered.values.view(np.uint32))
    if isinstance(fmt, BlockFormat):
        expected = fmt.round(x, axis=1)
    elif name in ("fp16", "bf16"):
        expected = fmt.round(x, saturate=False)
    elif "fixed" in name:
        expected = fmt.round(x)  # fixed point has its own step, 2**-f: no scale
    else:
        # Per channel: the channel's max |x| maps to the format's largest value.
        amax = np.abs(x).max(axis=1, keepdims=True)
        if name == "bipolar":  # the mean |x| of the channel is its scale (1e-12 for a channel of zeros), as the weight quantizer has it
            scale = quantize_bipolar(x, 0)[1].reshape(-1, 1)
        else:
            scale = np.where(amax > 0, amax / fmt.max_value, 1.0).astype(np.float32)
        expected = (fmt.round(x / scale) * scale).astype(np.float32)
    np.testing.assert_array_equal(runtime, expected)
    assert np.all(np.abs(runtime[5]) <= 1e-12)  # an all-zero channel stays zero (bipolar: +-1e-12)
    assert format_violations(lowered.nodes[-1]) == []


def test_a_tampered_block_element_is_caught_by_the_validator() -> None:
    x = np.random.default_rng(1).normal(0, 1, (2, 64)).astype(np.float32)
    lowered = lower_constant("w", x, "mxfp4", block_axis=1)
    codes = lowered.initializers[0]
    values = codes.const_value.numpy().astype(np.float32)
    values[0, 0] = 5.0  # an E4M3FN value E2M1 does not have
    codes.const_value = ir.tensor(values.astype(codes.const_value.numpy().dtype), dtype=codes.const_value.dtype, name=codes.name)
    problems = format_violations(lowered.nodes[-1])
    assert len(problems) == 1 and "not in qc.format 'mxfp4' (the first: 5.0)" in problems[0]


def test_a_tampered_int32_coded_float_is_caught_by_the_validator() -> None:
    x = np.random.default_rng(2).normal(0, 1, (3, 40)).astype(np.float32)
    lowered = lower_constant("w", x, "float<3,3>", axis=0)
    dq = lowered.nodes[0]
    assert dq.op_type == "DequantizeLinear" and float.fromhex(dq.metadata_props["qc.format_unit"]) == 2.0**-5
    assert format_violations(dq) == [] and format_violations(lowered.nodes[-1]) == []
    codes = lowered.initializers[0]
    tampered = codes.const_value.numpy().copy()
    tampered[0, 0] = 17  # 17 / 32: five significant bits, float<3,3> has four
    codes.const_value = ir.tensor(tampered, name=codes.name)
    problems = format_violations(dq)
    assert len(problems) == 1 and "not in qc.format 'float<3,3>' (the first: 0.53125)" in problems[0]


@pytest.mark.parametrize("name", ["fp16", "bf16", "float<3,2>", "float<2,4>"])
def test_emulated_float_weights_keep_their_values_under_all_optimizations(name: str) -> None:
    """Conv -> MaxPool between quantized activations, all optimizations on: a float32 weight
    constant would be quantized to int8 by onnxruntime's QDQ optimizer, and a DequantizeLinear of
    int32 codes feeding the Conv directly fused into a QLinearConv that cannot load. The lowering
    avoids both: the layer computes the format's values."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    lowered = lower_constant("w", w, name, axis=0)
    x = ir.Value(name="x", shape=ir.Shape([2, 3, 8, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    s, z = ir.Value(name="s", const_value=ir.tensor(np.array(0.02, np.float32))), ir.Value(name="z", const_value=ir.tensor(np.array(128, np.uint8)))
    q = ir.Node("", "QuantizeLinear", [x, s, z])
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z])
    conv = ir.Node("", "Conv", [dq.outputs[0], lowered.output])
    pool = ir.Node("", "MaxPool", [conv.outputs[0]], attributes={"kernel_shape": ir.AttrInt64s("kernel_shape", [2, 2]), "strides": ir.AttrInt64s("strides", [2, 2])})
    t = ir.Value(name="t", const_value=ir.tensor(np.array(0.05, np.float32)))
    q2 = ir.Node("", "QuantizeLinear", [pool.outputs[0], t, z])
    dq2 = ir.Node("", "DequantizeLinear", [q2.outputs[0], t, z])
    dq2.outputs[0].name, dq2.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [dq2.outputs[0]], nodes=[*lowered.nodes, q, dq, conv, pool, q2, dq2], initializers=[*lowered.initializers, s, z, t], opset_imports={"": 21}, name="g")
    proto = to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    feeds = {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        outputs.append(ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
