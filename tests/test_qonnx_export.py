"""The qonnx target writes model.qonnx.onnx beside its QDQ model: every quantizer a QONNX Quant
node (what FINN reads), computing exactly what onnxruntime computes on model.onnx.

Quant nodes are executed here by lowering each to its definition in standard ops (qonnx's
docs/qonnx-custom-ops/intquant_v1.md: clamp(round(x / scale + zeropt), qmin, qmax) - zeropt,
times scale; bipolarquant_v1.md: where(x >= 0, 1, -1) x scale) and running the result in
onnxruntime, so the test needs no qonnx install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import subprocess
import sys

import qcompiler
from qcompiler.errors import QCError
from qcompiler.ir import NameAuthority, add_initializer, load_model
from qcompiler.qonnx_export import QONNX_DOMAIN, qonnx_model
from qcompiler.runtime import make_session, with_extra_outputs
from qcompiler.targets.spec import load_target
from tests.helpers import small_cnn

MIXED = "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=bits=5,pareto-points=0,measure-below=0%s},calibrate,insert-qdq"
#: An average below 2 bits per weight: some layer must get 1 bit (bipolar).
BIPOLAR = "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=bits=1.5,pareto-points=0,measure-below=0},calibrate,insert-qdq"
#: The QONNX quantizer ops the exporter writes.
QUANTIZERS = ("Quant", "BipolarQuant")


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qonnx") / "calib.npz"
    np.savez(path, input=np.random.default_rng(2).normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, calib: Path) -> tuple[Path, qcompiler.CompileResult]:
    out = tmp_path_factory.mktemp("qonnx-out") / "out"
    return out, qcompiler.compile(small_cnn(), "qonnx", calibration=calib, output_dir=out, verify=False)


def _int_range(bits: int, signed: int, narrow: int) -> tuple[int, int]:
    """qonnx's min_int / max_int."""
    if signed:
        return -(2 ** (bits - 1)) + narrow, 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - narrow


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _lower_bipolar(graph: ir.Graph, names: NameAuthority, node: ir.Node) -> list[ir.Node]:
    """BipolarQuant(x, scale) as GreaterOrEqual, Where, Mul: where(x >= 0, 1, -1) x scale."""
    assert not node.attributes and len(node.inputs) == 2
    x, scale = node.inputs
    zero = add_initializer(graph, names, "zero", np.asarray(0.0, np.float32))
    plus = add_initializer(graph, names, "plus_one", np.asarray(1.0, np.float32))
    minus = add_initializer(graph, names, "minus_one", np.asarray(-1.0, np.float32))
    ge = ir.node("GreaterOrEqual", [x, zero])
    where = ir.node("Where", [ge.outputs[0], plus, minus])
    mul = ir.node("Mul", [where.outputs[0], scale])
    return [ge, where, mul]


def lower_quant(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each Quant replaced by Div, Add, Clip, Round, Sub, Mul (its definition), each
    BipolarQuant by GreaterOrEqual, Where, Mul (its)."""
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    names = NameAuthority(graph)
    for node in list(graph):
        if node.domain != QONNX_DOMAIN:
            continue
        assert node.op_type in QUANTIZERS, node.op_type
        if node.op_type == "BipolarQuant":
            _replace(graph, names, node, _lower_bipolar(graph, names, node))
            continue
        x, scale, zeropt, bitwidth = node.inputs
        bits = int(bitwidth.const_value.numpy())
        assert bits == bitwidth.const_value.numpy()
        attrs = {k: a.value for k, a in node.attributes.items()}
        assert attrs.get("rounding_mode", "ROUND") == "ROUND"  # round half to even: ONNX Round
        qmin, qmax = _int_range(bits, attrs.get("signed", 1), attrs.get("narrow", 0))
        lo = add_initializer(graph, names, "qmin", np.asarray(qmin, np.float32))
        hi = add_initializer(graph, names, "qmax", np.asarray(qmax, np.float32))
        div = ir.node("Div", [x, scale])
        add = ir.node("Add", [div.outputs[0], zeropt])
        clip = ir.node("Clip", [add.outputs[0], lo, hi])
        rnd = ir.node("Round", [clip.outputs[0]])
        sub = ir.node("Sub", [rnd.outputs[0], zeropt])
        mul = ir.node("Mul", [sub.outputs[0], scale])
        _replace(graph, names, node, [div, add, clip, rnd, sub, mul])
    model.opset_imports.pop(QONNX_DOMAIN, None)
    return ir.serde.serialize_model(model)


def _replace(graph: ir.Graph, names: NameAuthority, node: ir.Node, nodes: list[ir.Node]) -> None:
    """Put ``nodes`` in place of ``node``; the last one's output takes over its output's name."""
    graph.insert_before(node, nodes)
    for n in nodes:
        n.outputs[0].name = names.fresh(f"{node.name}_{n.op_type}")
    last = nodes[-1].outputs[0]
    out = node.outputs[0]
    name = out.name
    out.name = names.fresh(f"{name}_quant")
    last.name = name
    last.dtype, last.shape = out.dtype, out.shape
    out.replace_all_uses_with(last, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _run(proto: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    proto = with_extra_outputs(proto, names)
    session = make_session(proto, optimize=False)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))


def _check_same_numerics(out: Path) -> None:
    """model.qonnx.onnx (Quant nodes lowered to their definition) computes what onnxruntime
    computes on model.onnx, on every quantized tensor and on the outputs."""
    qonnx = onnx.load(out / "model.qonnx.onnx")
    quantized = [n.output[0] for n in qonnx.graph.node if n.op_type in QUANTIZERS]
    lowered = lower_quant(qonnx)
    reference = onnx.load(out / "model.onnx")
    for x in (np.random.default_rng(5).normal(0, 1, (32, 3, 8, 8)), np.random.default_rng(6).normal(0, 3, (16, 3, 8, 8))):
        x = x.astype(np.float32)
        want, got = _run(reference, x, quantized), _run(lowered, x, quantized)
        assert np.abs(got["logits"] - want["logits"]).max() <= 1e-5
        for name in quantized:  # weights and activations alike: the same values, bit for bit
            assert np.array_equal(got[name], want[name]), name


def test_writes_a_qonnx_model_of_quant_nodes(compiled: tuple[Path, qcompiler.CompileResult]) -> None:
    out, result = compiled
    assert result.report.artifacts == [str(out / "model.qonnx.onnx")]
    proto = onnx.load(out / "model.qonnx.onnx")
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[QONNX_DOMAIN] == 1
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and "Clip" not in ops
    quants = [n for n in proto.graph.node if n.domain == QONNX_DOMAIN]
    assert quants and all(n.op_type == "Quant" for n in quants)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node if n.op_type != "Quant")
    # FINN stores everything as float32; bitwidth, scale and zero point are initializers.
    inits = _inits(proto)
    assert all(a.dtype == np.float32 for a in inits.values())
    by_output = {o: n for n in proto.graph.node for o in n.output}
    compiled_model = load_model(out / "model.onnx")
    sources = {n.metadata_props["qc.source"] for n in compiled_model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None and n.inputs[0].dtype == ir.DataType.INT8}
    for n in quants:
        attrs = _attrs(n)
        assert attrs["rounding_mode"] == b"ROUND"
        # FINN converts only zero-point-0 Quant nodes (ConvertQuantActToMultiThreshold, FoldQuantWeights).
        assert not np.any(inits[n.input[2]]) and inits[n.input[3]].shape == ()
        if n.input[0] in inits:  # a weight: float values on the integer grid, narrow int8 per channel
            w, scale = inits[n.input[0]], inits[n.input[1]]
            assert n.input[0] in sources and (attrs["signed"], attrs["narrow"], inits[n.input[3]]) == (1, 1, 8)
            assert scale.shape == (w.shape[0],) + (1,) * (w.ndim - 1)  # axis 0: Conv, Gemm transB=1
            q = np.round(w / scale)  # what the Quant computes: exactly the integers of model.onnx
            assert np.array_equal(q * scale, w) and np.abs(q).max() <= 127
        else:  # an activation: unsigned and not narrow after a Relu, signed elsewhere (FINN's rules)
            after_relu = n.input[0] in by_output and by_output[n.input[0]].op_type == "Relu"
            assert (attrs["signed"], attrs["narrow"], inits[n.input[3]]) == ((0, 0, 7) if after_relu else (1, 0, 8))
    assert any(_attrs(n)["signed"] == 0 for n in quants)  # small_cnn has one Relu
    # Biases: float, the int32 values of model.onnx times their scale.
    conv0 = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[0] == "input_dequantized")
    bias_dq = next(n for n in compiled_model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT32 and n.outputs[0].consumers()[0].outputs[0].name == "c0")
    assert np.array_equal(inits[conv0.input[2]], bias_dq.inputs[0].const_value.numpy().astype(np.float32) * bias_dq.inputs[1].const_value.numpy())


def test_qonnx_model_computes_what_onnxruntime_computes(compiled: tuple[Path, qcompiler.CompileResult]) -> None:
    _check_same_numerics(compiled[0])


@pytest.mark.parametrize("activation_bits", [0, 4])
def test_mixed_widths_become_quant_bitwidths(tmp_path: Path, calib: Path, activation_bits: int) -> None:
    extra = f",activation-bits={activation_bits}" if activation_bits else ""
    result = qcompiler.compile(small_cnn(), "qonnx", calibration=calib, pipeline=MIXED % extra, output_dir=tmp_path / "out", verify=False)
    stats = next(p.stats for p in result.report.passes if p.name == "assign-precision")
    chosen = {w: layer["bits"] for w, layer in stats["layers"].items()}
    assert len(set(chosen.values())) > 1  # a 5-bit average over 2..8 bits: really mixed
    proto = onnx.load(tmp_path / "out" / "model.qonnx.onnx")
    inits = _inits(proto)
    by_output = {o: n for n in proto.graph.node for o in n.output}
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    weights = {n.input[0]: n for n in proto.graph.node if n.op_type in QUANTIZERS and n.input[0] in inits}
    assert set(weights) == set(chosen)
    for name, bits in chosen.items():
        n = weights[name]
        if bits == 1:
            _check_bipolar(n, inits)
            continue
        assert n.op_type == "Quant" and inits[n.input[3]] == bits and _attrs(n)["narrow"] == 1
        lo, hi = _int_range(bits, 1, 1)
        q = np.round(inits[name] / inits[n.input[1]])
        assert np.array_equal(q * inits[n.input[1]], inits[name]) and q.min() >= lo and q.max() <= hi
    act_bits = activation_bits or 8
    for n in quants:
        if n.input[0] not in inits:
            after_relu = n.input[0] in by_output and by_output[n.input[0]].op_type == "Relu"
            assert inits[n.input[3]] == (act_bits - 1 if after_relu else act_bits)
    _check_same_numerics(tmp_path / "out")


def _check_bipolar(n: onnx.NodeProto, inits: dict[str, np.ndarray]) -> None:
    """A 1-bit weight: BipolarQuant (no attributes) of float values that are exactly +-scale per
    output channel, so the node gives them back."""
    assert n.op_type == "BipolarQuant" and n.domain == QONNX_DOMAIN and len(n.input) == 2 and not n.attribute
    w, scale = inits[n.input[0]], inits[n.input[1]]
    assert scale.dtype == np.float32 and scale.shape == (w.shape[0],) + (1,) * (w.ndim - 1) and np.all(scale > 0)
    sign = np.where(w >= 0, 1, -1).astype(np.float32)
    assert np.array_equal(sign * scale, w)


def test_one_bit_weights_become_bipolar_quant(tmp_path: Path, calib: Path) -> None:
    out = tmp_path / "out"
    result = qcompiler.compile(small_cnn(), "qonnx", calibration=calib, pipeline=BIPOLAR, output_dir=out, verify=False)
    stats = next(p.stats for p in result.report.passes if p.name == "assign-precision")
    chosen = {w: layer["bits"] for w, layer in stats["layers"].items()}
    bipolar = {w for w, bits in chosen.items() if bits == 1}
    assert bipolar  # 1.5 bits per weight on average: some layer has 1
    # model.onnx: int8 -1/+1 behind a DequantizeLinear with zero point 0 and scale mean |w|.
    compiled_model = load_model(out / "model.onnx")
    for dq in compiled_model.graph:
        if dq.op_type == "DequantizeLinear" and dq.metadata_props.get("qc.source") in bipolar:
            q = dq.inputs[0].const_value.numpy()
            assert dq.inputs[0].dtype == ir.DataType.INT8 and set(np.unique(q)) == {-1, 1} and not np.any(dq.inputs[2].const_value.numpy())
    proto = onnx.load(out / "model.qonnx.onnx")
    onnx.checker.check_model(proto)
    inits = _inits(proto)
    quantizers = [n for n in proto.graph.node if n.domain == QONNX_DOMAIN]
    assert {n.op_type for n in quantizers} == set(QUANTIZERS)
    # BipolarQuant on exactly the 1-bit weights, Quant on the other weights and the activations.
    assert {n.input[0] for n in quantizers if n.op_type == "BipolarQuant"} == bipolar
    for n in quantizers:
        if n.op_type == "BipolarQuant":
            _check_bipolar(n, inits)
        elif n.input[0] in inits:
            assert inits[n.input[3]] == chosen[n.input[0]] >= 2
    _check_same_numerics(out)
    validate = subprocess.run([sys.executable, "-m", "qcompiler.cli", "validate", str(out / "model.onnx"), "--target", "qonnx"], capture_output=True, text=True)
    assert validate.returncode == 0, validate.stdout + validate.stderr


def test_model_is_not_changed_and_integer_passthrough_is_refused(calib: Path) -> None:
    # ort-cpu runs MaxPool/Reshape/Flatten on uint8 tensors: QONNX has float tensors only.
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, verify=False)
    before = ir.serde.serialize_model(result.model).SerializeToString()
    with pytest.raises(QCError, match="integer_passthrough"):
        qonnx_model(result.model, load_target("ort-cpu"))
    assert ir.serde.serialize_model(result.model).SerializeToString() == before
