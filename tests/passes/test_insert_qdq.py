"""insert-qdq: the QDQ structure each target rule asks for, checked node by node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from qcompiler.data import DataSource
from qcompiler.ir import load_model, to_proto
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.uniform import sqnr_db
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, run, tensor_info


def _compile(model: ir.Model, data: DataSource, target: str = "ort-cpu", pipeline: str | None = None) -> tuple[ir.Model, PassContext]:
    spec = load_target(target)
    ctx = PassContext(target=spec, data=data)
    result = parse_pipeline(pipeline or spec.pipeline).run(model, ctx)
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    return result.model, ctx


def _const(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


@pytest.fixture(scope="module")
def resnet20(bundled_model: Path, bundled_calib: Path) -> tuple[ir.Model, PassContext]:
    model = load_model(bundled_model)
    data = DataSource({"input": np.load(bundled_calib)["input"][:64]})
    return _compile(model, data)


def test_weights_are_int8_symmetric_per_channel_narrow(resnet20) -> None:
    model, ctx = resnet20
    limit = ctx.target.weights.pair_sum_limit
    convs = [n for n in model.graph if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 20
    for node in convs:
        dq = node.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear"
        q, scale, zp = (_const(v) for v in dq.inputs)
        assert q.dtype == np.int8 and q.min() >= -127  # narrow range
        assert np.all(zp == 0)  # symmetric
        out_channels = q.shape[0]
        assert scale.shape == (out_channels,) and dq.attributes["axis"].as_int() == 0
        top = np.abs(q.reshape(out_channels, -1).astype(np.int64)).max(axis=1)
        if limit is None:
            # Each channel uses its full range: the largest |q| per channel is 127.
            assert np.all(top == 127)
        else:
            # A CPU without VNNI adds pairs of products in int16: each channel is narrowed just
            # enough that its two largest codes of one sign sum to at most the limit.
            rows = q.reshape(out_channels, -1).astype(np.int64)
            for signed in (rows, -rows):
                two = np.sort(np.maximum(signed, 0), axis=1)[:, -2:].sum(axis=1)
                assert np.all(two <= limit)
            assert np.all(top <= 127)


def test_bias_is_int32_with_input_times_weight_scale(resnet20) -> None:
    model, _ = resnet20
    for node in (n for n in model.graph if n.op_type in ("Conv", "Gemm")):
        x_scale = _const(node.inputs[0].producer().inputs[1])
        w_scale = _const(node.inputs[1].producer().inputs[1])
        bias_dq = node.inputs[2].producer()
        q_bias, b_scale, b_zp = (_const(v) for v in bias_dq.inputs)
        assert q_bias.dtype == np.int32 and np.all(b_zp == 0)
        np.testing.assert_array_equal(b_scale, (x_scale * w_scale).astype(np.float32))


def test_activations_uint8_asymmetric_per_tensor_and_relu_fused(resnet20) -> None:
    model, ctx = resnet20
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        scale, zp = _const(q.inputs[1]), _const(q.inputs[2])
        assert scale.shape == () and zp.dtype == np.uint8
    # ReLUs are absorbed by the uint8 quantizer (zero point 0 clips negatives exactly).
    assert not [n for n in model.graph if n.op_type == "Relu"]
    assert ctx.stats["insert-qdq"]["fused_activations"] == 19
    # The logits stay float: no QuantizeLinear on the graph output.
    assert model.graph.outputs[0].producer().op_type == "Gemm"
    # Every Conv reads a DequantizeLinear and feeds a QuantizeLinear (what QLinearConv fusion needs).
    for conv in (n for n in model.graph if n.op_type == "Conv"):
        assert conv.inputs[0].producer().op_type == "DequantizeLinear"
        assert {c.op_type for c in conv.outputs[0].consumers()} == {"QuantizeLinear"}


def test_residual_add_and_passthrough_share_scales(resnet20) -> None:
    model, _ = resnet20
    pads = [n for n in model.graph if n.op_type == "Pad"]
    assert len(pads) == 2
    for pad in pads:
        # ort-cpu lists Pad in integer_passthrough: the shortcut Slice -> Slice -> Pad chain runs on
        # the uint8 tensor, with the fill value quantized, and one DequantizeLinear after it.
        assert pad.inputs[0].dtype == ir.DataType.UINT8 and pad.outputs[0].dtype == ir.DataType.UINT8
        dq = pad.outputs[0].consumers()[0]
        assert dq.op_type == "DequantizeLinear"
        chain = pad.inputs[0].producer()
        while chain.op_type == "Slice":
            chain = chain.inputs[0].producer()
        assert chain.op_type == "QuantizeLinear"
        # One scale on both ends of the chain: data movement needs no requantization.
        assert dq.inputs[1] is chain.inputs[1] and dq.inputs[2] is chain.inputs[2]
        fill = _const(pad.inputs[2])
        assert fill.dtype == np.uint8 and fill == _const(dq.inputs[2])  # float 0 -> the zero point
    adds = [n for n in model.graph if n.op_type == "Add"]
    assert len(adds) == 9 and all(i.producer().op_type == "DequantizeLinear" for a in adds for i in a.inputs)


def test_passthrough_stays_in_qdq_form_when_the_target_does_not_lower_it(tmp_path: Path, bundled_model: Path, bundled_calib: Path) -> None:
    target = tmp_path / "qdq-only.toml"
    target.write_text('extends = "ort-cpu"\nname = "qdq-only"\n[ops]\ninteger_passthrough = []\n')
    data = DataSource({"input": np.load(bundled_calib)["input"][:32]})
    model, _ = _compile(load_model(bundled_model), data, target=str(target))
    for pad in (n for n in model.graph if n.op_type == "Pad"):
        q_after = pad.outputs[0].consumers()[0]
        dq_before = pad.inputs[0].producer()
        assert q_after.op_type == "QuantizeLinear" and dq_before.op_type == "DequantizeLinear"
        assert q_after.inputs[1] is dq_before.inputs[1] and q_after.inputs[2] is dq_before.inputs[2]


def _concat_model() -> ir.Model:
    rng = np.random.default_rng(100)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a"),
            helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
            helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
            helper.make_node("Conv", ["cat", "w3"], ["c"], name="conv_c"),
            helper.make_node("Tanh", ["c"], ["s"], name="tanh"),
            helper.make_node("Conv", ["s", "w4"], ["y"], name="conv_d"),
        ],
        [tensor_info("x", [None, 3, 6, 6])],
        [tensor_info("y", [None, 2, 6, 6])],
        {
            "w1": rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32),
            "w2": rng.normal(0, 3, (4, 3, 1, 1)).astype(np.float32),
            "w3": rng.normal(0, 1, (5, 8, 1, 1)).astype(np.float32),
            "w4": rng.normal(0, 1, (2, 5, 1, 1)).astype(np.float32),
        },
    )


def test_concat_inputs_share_one_scale_and_unsupported_op_stays_float() -> None:
    rng = np.random.default_rng(0)
    data = DataSource({"x": rng.normal(0, 1, (32, 3, 6, 6)).astype(np.float32)})
    model, ctx = _compile(_concat_model(), data)
    cat = next(n for n in model.graph if n.op_type == "Concat")
    scales = {id(i.producer().inputs[1]) for i in cat.inputs}
    out_q = cat.outputs[0].consumers()[0]
    scales.add(id(out_q.inputs[1]))
    assert len(scales) == 1  # both inputs and the output use the same scale initializer
    kept = [d for d in ctx.diagnostics if d.level == "float"]
    assert [(d.node, d.op_type) for d in kept] == [("tanh", "Tanh")]
    # ort-cpu keeps Tanh float on purpose and the note gives its measured reason ([ops.kept_float]).
    assert kept[0].message.startswith("Tanh kept float by target 'ort-cpu': no integer kernel")
    tanh = next(n for n in model.graph if n.op_type == "Tanh")
    assert tanh.inputs[0].producer().op_type == "DequantizeLinear"  # reads the quantized tensor, in float
    feed = {"x": rng.normal(0, 1, (4, 3, 6, 6)).astype(np.float32)}
    expected = run(_concat_model(), feed)[0]
    assert sqnr_db(expected, run(model, feed)[0]) > 25


def test_symmetric_activation_target_keeps_relu(tmp_path: Path) -> None:
    target = tmp_path / "sym.toml"
    target.write_text('extends = "ort-cpu"\nname = "sym"\n[activations]\ndtype = "int8"\nsymmetric = true\n')
    rng = np.random.default_rng(1)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")],
        [tensor_info("x", [None, 3, 4, 4])],
        [tensor_info("y", [None, 2, 4, 4])],
        {"w": rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32), "w2": rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32)},
    )
    data = DataSource({"x": rng.normal(0, 1, (16, 3, 4, 4)).astype(np.float32)})
    compiled, ctx = _compile(model, data, target=str(target))
    # With int8 symmetric activations zero is mid-range: dropping the ReLU would keep negatives.
    assert [n for n in compiled.graph if n.op_type == "Relu"]
    for q in (n for n in compiled.graph if n.op_type == "QuantizeLinear"):
        assert _const(q.inputs[2]).dtype == np.int8 and _const(q.inputs[2]) == 0


def test_compiled_model_matches_a_numpy_simulation_of_one_conv() -> None:
    """onnxruntime runs exactly what the quantizer meant: compare with numpy's Q/DQ arithmetic."""
    from qcompiler.quant.uniform import dequantize, quantize

    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (3, 2, 1, 1)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [tensor_info("x", [None, 2, 3, 3])], [tensor_info("y", [None, 3, 3, 3])], {"w": w})
    x = rng.normal(0, 1, (8, 2, 3, 3)).astype(np.float32)
    # Without bias correction: this checks the Q/DQ arithmetic alone (the correction has its own tests).
    compiled, _ = _compile(model, DataSource({"x": x}), pipeline="calibrate{method=minmax},insert-qdq{bias-correction=false}")
    dq_x = next(n.inputs[0].producer() for n in compiled.graph if n.op_type == "Conv")
    s_x, z_x = _const(dq_x.inputs[1]), _const(dq_x.inputs[2])
    dq_w = next(n.inputs[1].producer() for n in compiled.graph if n.op_type == "Conv")
    s_w = _const(dq_w.inputs[1])
    xq = dequantize(quantize(x, s_x, z_x, 0, 255), s_x, z_x)
    wq = dequantize(quantize(w, s_w, np.zeros(3, np.int64), -127, 127, axis=0), s_w, np.zeros(3, np.int64), axis=0)
    expected = np.einsum("nchw,oc->nohw", xq.astype(np.float64), wq[:, :, 0, 0].astype(np.float64))
    got = run(compiled, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Min/max calibration of the input: its exact extremes are representable.
    assert np.isclose(float(s_x) * 255, float(x.max() - min(x.min(), 0)), rtol=1e-6)


def test_tensorrt_placement_quantizes_layer_inputs_keeps_relu_and_float_bias(bundled_model: Path, bundled_calib: Path) -> None:
    model = load_model(bundled_model)
    data = DataSource({"input": np.load(bundled_calib)["input"][:64]})
    compiled, _ = _compile(model, data, target="tensorrt")
    for node in compiled.graph:
        if node.op_type == "Conv":
            # Bias float, no Q/DQ between the Conv and the ReLU TensorRT fuses into it.
            assert node.inputs[2].producer() is None and node.inputs[2].const_value.dtype == ir.DataType.FLOAT
            assert all(c.op_type != "QuantizeLinear" or any(u.node.op_type == "Add" for dq in c.outputs[0].consumers() for u in dq.outputs[0].uses()) for c in node.outputs[0].consumers())
            assert node.inputs[0].producer().op_type == "DequantizeLinear"
        if node.op_type == "Add":
            assert all(v.producer().op_type == "DequantizeLinear" for v in node.inputs)
        if node.op_type == "QuantizeLinear":
            # Every quantizer feeds a quantized layer (through a DequantizeLinear).
            readers = {u.node.op_type for dq in node.outputs[0].consumers() for u in dq.outputs[0].uses()}
            trt = load_target("tensorrt").ops
            assert readers <= {*trt.quantized, *trt.passthrough, "Shape"}, readers
            assert _const(node.inputs[2]).dtype == np.int8 and _const(node.inputs[2]) == 0
    assert sum(n.op_type == "Relu" for n in compiled.graph) == sum(n.op_type == "Relu" for n in load_model(bundled_model).graph)


def test_a_weight_shared_by_two_convs_is_quantized_once_and_stays_shared() -> None:
    rng = np.random.default_rng(3)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="conv_a"), helper.make_node("Conv", ["x", "w"], ["b"], name="conv_b"), helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [tensor_info("x", [None, 3, 4, 4])],
        [tensor_info("y", [None, 4, 4, 4])],
        {"w": rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32)},
    )
    data = DataSource({"x": rng.normal(0, 1, (16, 3, 4, 4)).astype(np.float32)})
    compiled, _ = _compile(model, data)
    convs = [n for n in compiled.graph if n.op_type == "Conv"]
    assert convs[0].inputs[1] is convs[1].inputs[1]
    assert convs[0].inputs[1].producer().op_type == "DequantizeLinear"
    assert sum(n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.INT8 for n in compiled.graph) == 1


def _relu6_net(opset: int = 13) -> ir.Model:
    """Conv (outputs far beyond [0, 6]) -> Clip(0, 6) -> Conv, as MobileNets write ReLU6."""
    rng = np.random.default_rng(5)
    inits = {"w0": rng.normal(0, 2.0, (8, 3, 3, 3)).astype(np.float32), "b0": rng.normal(0, 1, 8).astype(np.float32),
             "lo": np.asarray(0.0, np.float32), "hi": np.asarray(6.0, np.float32), "w1": rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"], name="relu6"),
        helper.make_node("Conv", ["r0", "w1"], ["out"], name="conv1"),
    ]
    return make_model(nodes, [tensor_info("input", [None, 3, 8, 8])], [tensor_info("out", [None, 4, 8, 8])], inits, opset=opset)


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
def test_relu6_is_fused_into_the_quantizer_over_its_own_range(method):
    # The Conv's output spans about [-20, 20] and is clipped at 6 in most places: the quantizer
    # must take the Clip's output range [0, 6] (all 256 levels inside it), not quantize the
    # pre-activation range and clip after (the double quantization that cost a MobileNet 6 points).
    x = np.random.default_rng(6).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    model, ctx = _compile(_relu6_net(), DataSource({"input": x}), pipeline=f"calibrate{{method={method}}},insert-qdq")
    assert not [n for n in model.graph if n.op_type == "Clip"]
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].producer() is not None and n.inputs[0].producer().name == "conv0")
    scale, zp = float(_const(q.inputs[1])), int(_const(q.inputs[2]))
    assert zp == 0 and scale <= 6.0 / 255 * (1 + 1e-6)
    (ref,) = run(_relu6_net(), {"input": x})
    (got,) = run(model, {"input": x})
    assert sqnr_db(ref, got) > 30
    assert not [d for d in ctx.diagnostics if "activation kept" in d.message]


def test_dead_weight_channel_keeps_its_bias_in_int32():
    # An all-zero (pruned, dead) output channel gets the smallest scale, and its bias / (s_x x s_w)
    # would overflow int32 and be clipped in silence: the channel's scale is raised instead.
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w[1] = 0.0
    w[2] = 1e-9 * rng.normal(0, 1, (3, 3, 3)).astype(np.float32)
    b = np.asarray([0.1, 2.5, -1.5, 0.3], np.float32)
    model = make_model([helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["out"], name="relu")],
                       [tensor_info("input", [None, 3, 8, 8])], [tensor_info("out", [None, 4, 8, 8])], {"w": w, "b": b})
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    compiled, ctx = _compile(model, DataSource({"input": x}), pipeline="calibrate,insert-qdq{bias-correction=false}")
    conv = next(n for n in compiled.graph if n.op_type == "Conv")
    q_bias = _const(conv.inputs[2].producer().inputs[0])
    assert np.abs(q_bias.astype(np.int64)).max() < 2**31 - 1
    ref = run(make_model([helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["out"], name="relu")],
                         [tensor_info("input", [None, 3, 8, 8])], [tensor_info("out", [None, 4, 8, 8])], {"w": w, "b": b}), {"input": x})[0]
    got = run(compiled, {"input": x})[0]
    np.testing.assert_allclose(got[:, 1], ref[:, 1], atol=0.02)  # the dead channel's output is its bias (2.5)
    assert any("int32 bias" in d.message for d in ctx.diagnostics)


def test_trained_codes_that_would_saturate_int16_pairs_are_rounded_again_pair_safe() -> None:
    """Codes chosen for a CPU that accumulates in int32 (full int8 range), handed to insert-qdq for
    one that adds int16 pairs, would saturate there: insert-qdq rounds those weights again on its
    pair-safe grid and says so, instead of shipping codes the kernels overflow on."""
    from qcompiler.precision import ROUNDED_WEIGHTS_FACT
    from qcompiler.quant.adaround import pair_sum_violations
    from tests.helpers import small_cnn

    data = DataSource({"input": np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})
    wide = PassContext(target=load_target("ort-cpu", cpu="avx512-vnni"), data=data)
    model = parse_pipeline("infer-shapes,fold-constants,adaround{bits=8,iterations=0},calibrate").run(small_cnn(), wide).model
    rounded = wide.facts[ROUNDED_WEIGHTS_FACT]
    assert any(pair_sum_violations(r.codes, r.grid.zero_point, r.grid.axis, 128).any() for r in rounded.values())
    narrow = PassContext(target=load_target("ort-cpu", cpu="avx2"), data=data)
    narrow.facts.update(wide.facts)
    result = parse_pipeline("calibrate,insert-qdq").run(model, narrow)
    for node in result.model.graph:
        if node.op_type in ("Conv", "Gemm"):
            dq = node.inputs[1].producer()
            codes = dq.inputs[0].const_value.numpy().astype(np.int64)
            assert not pair_sum_violations(codes, np.zeros(()), 0, 128).any(), node.name
    assert any("pair-safe grid instead" in d.message for d in narrow.diagnostics)


def test_an_integer_pad_without_a_fill_pads_with_the_zero_point() -> None:
    """A 1-D CNN with BatchNormalization after ReLU (decomposed to Mul/Add): the tensor the Pad
    reads has a non-zero zero point, so padding the integer tensor with the code 0 would pad with
    -zero_point x scale. The Pad gets the zero point as its fill (10.8 dB before, 50 dB after)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    import qcompiler

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"), helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "s"], ["m"], name="mul"), helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Pad", ["a", "pads"], ["p"], name="pad"), helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 1, 5)).astype(np.float32), "w1"), numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 5)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.full((1, 8, 1), 0.5, np.float32), "s"), numpy_helper.from_array(np.full((1, 8, 1), -2.0, np.float32), "b"),
             numpy_helper.from_array(np.array([0, 0, 4, 0, 0, 4], np.int64), "pads")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 64])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (64, 1, 64)).astype(np.float32)
    reference = run(ir.serde.deserialize_model(proto), {"x": x})[0]
    model = qcompiler.compile(ir.serde.deserialize_model(proto), "ort-cpu", calibration=DataSource({"x": x}), verify=False).model
    pad = next(n for n in model.graph if n.op_type == "Pad")
    assert pad.inputs[0].dtype == ir.DataType.UINT8 and len(pad.inputs) == 3
    zero_point = pad.inputs[0].producer().inputs[2].const_value.numpy()
    assert pad.inputs[2].const_value.numpy() == zero_point != 0
    assert sqnr_db(reference, run(model, {"x": x})[0]) > 40


def test_a_bias_that_does_not_fit_int32_stays_float_and_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the weight-scale floor that normally keeps every bias in int32 (a bias correction
    can still grow one past it), a tiny input scale x weight scale would clip the bias in silence:
    it stays float instead, and the report names the layer."""
    import sys

    from qcompiler.registry import get_pass
    from tests.helpers import small_cnn

    module = sys.modules[get_pass("insert-qdq").__module__]  # the module the registry runs
    monkeypatch.setattr(module._Rewriter, "_bias_scale_floor", lambda self, node, roles: None)
    data = DataSource({"input": np.full((16, 3, 8, 8), 1e-7, np.float32)})  # an input range of ~1e-7
    model, ctx = _compile(small_cnn(), data)
    flagged = [d.message.split(":")[0] for d in ctx.diagnostics if "does not fit int32" in d.message]
    assert flagged, [d.message for d in ctx.diagnostics]
    for name in flagged:
        node = next(n for n in model.graph if n.name == name)
        bias = node.inputs[2]
        assert bias.producer() is None or bias.producer().op_type != "DequantizeLinear"  # float, not clipped codes


def _attention_mask_model() -> ir.Model:
    """Embedding + position (Add), a projection, scores of two activations plus a -1e4 mask, Softmax."""
    rng = np.random.default_rng(3)
    d = 8
    return make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("Add", ["e", "pos"], ["h"], name="add_pos"),
            helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
            helper.make_node("Transpose", ["h"], ["ht"], name="h_t", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "ht"], ["scores"], name="scores"),
            helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
            helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1),
        ],
        [tensor_info("ids", [None, 4], onnx.TensorProto.INT64)],
        [tensor_info("y", [None, 4, 4])],
        {
            "table": rng.normal(0, 1, (20, d)).astype(np.float32),
            "pos": rng.normal(0, 0.3, (4, d)).astype(np.float32),
            "wq": rng.normal(0, 0.3, (d, d)).astype(np.float32),
            "mask": np.triu(np.full((4, 4), -1e4, np.float32), 1),
        },
    )


def test_a_weightless_op_does_not_start_or_end_a_quantized_region() -> None:
    # The position Add reads the float embedding: quantizing it (and its constant) would round
    # twice before q_proj quantizes its own input. The masked scores feed a float Softmax: an
    # integer Add there would spend its 256 levels on the -1e4 mask.
    rng = np.random.default_rng(4)
    data = DataSource({"ids": rng.integers(0, 20, (32, 4)).astype(np.int64)})
    model, ctx = _compile(_attention_mask_model(), data)
    kept = {d.node: d.message for d in ctx.diagnostics if d.level == "float"}
    assert kept["add_pos"].startswith("none of its inputs is quantized")
    # Walked back from the float Softmax: the mask Add, then the scores MatMul and the Transpose.
    for name in ("add_mask", "scores", "h_t"):
        assert kept[name].startswith("its output feeds only float ops"), name
    assert not any(n.op_type == "QuantizeLinear" and n.inputs[0].name in ("masked", "scores", "ht") for n in model.graph)
    q_proj = next(n for n in model.graph if n.name == "q_proj")
    assert q_proj.inputs[0].producer().op_type == "DequantizeLinear"  # the layer quantizes its input
    add_pos = next(n for n in model.graph if n.name == "add_pos")
    assert all(v.producer() is None or v.producer().op_type != "DequantizeLinear" for v in add_pos.inputs)
    feed = {"ids": rng.integers(0, 20, (8, 4)).astype(np.int64)}
    assert sqnr_db(run(_attention_mask_model(), feed)[0], run(model, feed)[0]) > 30
