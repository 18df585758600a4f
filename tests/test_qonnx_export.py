"""The qonnx target writes model.qonnx.onnx beside its QDQ model: every quantizer a QONNX Quant
node (what FINN reads; FloatQuant for float8 types), computing exactly what onnxruntime computes
on model.onnx.

Quant nodes are executed here by lowering each to its definition in standard ops (qonnx's
docs/qonnx-custom-ops/intquant_v1.md: clamp(round(x / scale + zeropt), qmin, qmax) - zeropt,
times scale; bipolarquant_v1.md: where(x >= 0, 1, -1) x scale; floatquant_v1.md: x / scale
rounded half-to-even to the minifloat, clamped to +-max_val, times scale, which for the two
float8 formats is a saturating Cast to that type and back) and running the result in
onnxruntime, so the test needs no qonnx install. FloatQuant is also checked against a numpy copy
of qonnx's reference implementation (src/qonnx/custom_op/general/floatquant.py).
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
from qcompiler.ir import NameAuthority, add_initializer, load_model, to_proto
from qcompiler.qonnx_export import QONNX_DOMAIN, qonnx_model
from qcompiler.runtime import make_session, with_extra_outputs
from qcompiler.targets.spec import load_target
from tests.helpers import small_cnn

MIXED = "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=bits=5,pareto-points=0,measure-below=0%s},calibrate,insert-qdq"
#: An average below 2 bits per weight: some layer must get 1 bit (bipolar).
BIPOLAR = "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=bits=1.5,pareto-points=0,measure-below=0},calibrate,insert-qdq"
#: The QONNX quantizer ops the exporter writes for integer types.
QUANTIZERS = ("Quant", "BipolarQuant")
#: ... and for every type.
ALL_QUANTIZERS = (*QUANTIZERS, "FloatQuant")
#: A user target: the qonnx target with float8 activations and weights.
FP8_TARGET = """extends = "qonnx"
name = "qonnx-fp8"
min_opset = 19
[activations]
dtype = "{dtype}"
[weights]
dtype = "{dtype}"
narrow_range = false
[verify]
optimization = "basic"
"""
#: FloatQuant's (exponent_bitwidth, mantissa_bitwidth, exponent_bias, max_val) of each float8
#: type, and the ONNX type a saturating Cast rounds to.
FLOAT8 = {
    "float8e4m3fn": ((4, 3, 7, 448.0), onnx.TensorProto.FLOAT8E4M3FN),
    "float8e5m2": ((5, 2, 15, 57344.0), onnx.TensorProto.FLOAT8E5M2),
}
#: A user target: the qonnx target at 12 and 16 bits in int16 (QuantizeLinear int16: opset 21).
INT16_TARGET = """extends = "qonnx"
name = "qonnx-int16"
min_opset = 21
[activations]
dtype = "int16"
[weights]
dtype = "int16"
[bits]
allowed = [12, 16]
activations = [12, 16]
"""
INT16_MIXED = "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=bits=14,pareto-points=0,measure-below=0},calibrate,insert-qdq"


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


def _float_format(node: onnx.NodeProto | ir.Node, inits: dict[str, np.ndarray] | None = None) -> tuple[str, tuple[float, ...]]:
    """(float8 type name, (exponent_bitwidth, mantissa_bitwidth, exponent_bias, max_val)) of a
    FloatQuant node, whose parameters must be one of the `FLOAT8` formats."""
    if isinstance(node, ir.Node):
        params = tuple(float(v.const_value.numpy()) for v in node.inputs[2:6])
    else:
        params = tuple(float(inits[name]) for name in node.input[2:6])
    assert len(params) == 4
    name = next((n for n, (fmt, _) in FLOAT8.items() if fmt == params), None)
    assert name is not None, f"FloatQuant parameters {params} are no float8 type"
    return name, params


def float_quant_reference(x: np.ndarray, scale: np.ndarray, exponent_bitwidth: float, mantissa_bitwidth: float, exponent_bias: float, max_val: float) -> np.ndarray:
    """qonnx's FloatQuant (src/qonnx/custom_op/general/floatquant.py, ``float_quant`` with
    rounding_mode ROUND, signed, saturating), step for step, all parameters float32 as a node's."""
    e, m, bias, max_val = (np.asarray(v, np.float32) for v in (exponent_bitwidth, mantissa_bitwidth, exponent_bias, max_val))
    x = np.asarray(x, np.float32) / scale
    eps = np.finfo(x.dtype).tiny
    internal_scale = np.exp2(np.maximum(np.floor(np.log2(np.abs(x) + eps)) - m, 1.0 - bias - m))
    x_q = internal_scale * np.round(x / internal_scale)
    # compute_max_val: the largest value the widths alone give, capped by max_val.
    max_exponent = (2.0**e) - 1.0 - bias
    max_value = np.minimum(np.sum(2.0 ** np.arange(0, -1.0 * m - 1.0, -1.0)) * (2**max_exponent), max_val)
    return (np.clip(x_q, -max_value, max_value) * scale).astype(np.float32)


def _lower_float_quant(graph: ir.Graph, names: NameAuthority, node: ir.Node) -> list[ir.Node]:
    """FloatQuant(x, scale, e, m, bias, max_val) of a float8 format as Div, Clip(+-max_val), a
    saturating Cast to the float8 type (round half to even), Cast back and Mul: its definition."""
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs.get("rounding_mode", "ROUND").upper() == "ROUND" and attrs.get("saturation", 1) == 1
    name, (_, _, _, top) = _float_format(node)
    x, scale = node.inputs[:2]
    lo = add_initializer(graph, names, "neg_max_val", np.asarray(-top, np.float32))
    hi = add_initializer(graph, names, "max_val", np.asarray(top, np.float32))
    div = ir.node("Div", [x, scale])
    clip = ir.node("Clip", [div.outputs[0], lo, hi])
    to_float8 = ir.node("Cast", [clip.outputs[0]], attributes={"to": FLOAT8[name][1], "saturate": 1})
    back = ir.node("Cast", [to_float8.outputs[0]], attributes={"to": onnx.TensorProto.FLOAT})
    mul = ir.node("Mul", [back.outputs[0], scale])
    return [div, clip, to_float8, back, mul]


def lower_quant(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with each Quant replaced by Div, Add, Clip, Round, Sub, Mul (its definition), each
    BipolarQuant by GreaterOrEqual, Where, Mul (its), each FloatQuant by Div, Clip, Cast, Cast, Mul."""
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    names = NameAuthority(graph)
    for node in list(graph):
        if node.domain != QONNX_DOMAIN:
            continue
        assert node.op_type in ALL_QUANTIZERS, node.op_type
        if node.op_type == "BipolarQuant":
            _replace(graph, names, node, _lower_bipolar(graph, names, node))
            continue
        if node.op_type == "FloatQuant":
            _replace(graph, names, node, _lower_float_quant(graph, names, node))
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


def _check_same_numerics(out: Path, reference: onnx.ModelProto | None = None) -> None:
    """model.qonnx.onnx (Quant nodes lowered to their definition) computes what onnxruntime
    computes on model.onnx (or on ``reference``, a stand-in for it), at its basic optimization
    level, on every quantized tensor and on the outputs. Each FloatQuant, applied by qonnx's
    reference implementation to the tensor onnxruntime feeds it, gives onnxruntime's values too."""
    qonnx = onnx.load(out / "model.qonnx.onnx")
    quantizers = [n for n in qonnx.graph.node if n.op_type in ALL_QUANTIZERS]
    quantized = [n.output[0] for n in quantizers]
    inits = _inits(qonnx)
    float_quants = [n for n in quantizers if n.op_type == "FloatQuant"]
    lowered = lower_quant(qonnx)
    reference = reference if reference is not None else onnx.load(out / "model.onnx")
    float_inputs = [n.input[0] for n in float_quants if n.input[0] not in inits]
    for x in (np.random.default_rng(5).normal(0, 1, (32, 3, 8, 8)), np.random.default_rng(6).normal(0, 3, (16, 3, 8, 8))):
        x = x.astype(np.float32)
        want, got = _run(reference, x, quantized + float_inputs), _run(lowered, x, quantized)
        assert np.abs(got["logits"] - want["logits"]).max() <= 1e-5
        for name in quantized:  # weights and activations alike: the same values, bit for bit
            assert np.array_equal(got[name], want[name]), name
        for n in float_quants:
            value = inits[n.input[0]] if n.input[0] in inits else want[n.input[0]]
            fmt = _float_format(n, inits)[1]
            assert np.array_equal(float_quant_reference(value, inits[n.input[1]], *fmt), want[n.output[0]]), n.output[0]


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


def _quantize_dequantize_model(dtype: str, scale: float) -> ir.Model:
    """input -> QuantizeLinear(scale, float8 zero point 0) -> DequantizeLinear -> y (opset 19)."""
    float8 = FLOAT8[dtype][1]
    nodes = [
        onnx.helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q"),
        onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
    ]
    inits = [onnx.helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [scale]), onnx.helper.make_tensor("z", float8, [], [0.0])]
    graph = onnx.helper.make_graph(
        nodes, "qdq", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n"])], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])], inits
    )
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)]))


def _float8_sweep(dtype: str) -> np.ndarray:
    """Every finite value of the float8 type, the midpoints between neighbours (ties: rounded to
    even), the float32 numbers just either side of them, values past the largest one (saturated),
    and log-uniform random values from below the smallest subnormal to past the largest value;
    both signs."""
    import ml_dtypes

    kind = {"float8e4m3fn": ml_dtypes.float8_e4m3fn, "float8e5m2": ml_dtypes.float8_e5m2}[dtype]
    values = np.arange(256, dtype=np.uint8).view(kind).astype(np.float32)
    grid = np.unique(np.abs(values[np.isfinite(values)]))
    top = float(grid[-1])
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    past = np.asarray([top * f for f in (1.01, 1.03, 1.0625, 1.125, 1.2, 1.5, 2, 1e3)], np.float32)
    rng = np.random.default_rng(0)
    random = np.exp2(rng.uniform(np.log2(grid[1]) - 3, np.log2(top) + 2, 20000)).astype(np.float32)
    pos = np.concatenate([grid, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf)), past, random])
    return np.concatenate([pos, -pos]).astype(np.float32)


@pytest.mark.parametrize("dtype", list(FLOAT8))
@pytest.mark.parametrize("scale", [0.5, 0.0123])
def test_float_quant_is_float8_quantize_dequantize(dtype: str, scale: float) -> None:
    """FloatQuant with the parameters written for a float8 type gives what QuantizeLinear ->
    DequantizeLinear gives in onnxruntime on every float8 value, every tie between two, either
    side of them, past the largest value, and random values: by its definition in standard ops
    and by qonnx's reference implementation."""
    model = _quantize_dequantize_model(dtype, scale)
    proto = qonnx_model(model, load_target("tensorrt-fp8"))
    onnx.checker.check_model(proto)
    (node,) = proto.graph.node
    inits = _inits(proto)
    assert node.op_type == "FloatQuant" and node.domain == QONNX_DOMAIN and list(node.output) == ["y"]
    assert _float_format(node, inits) == (dtype, FLOAT8[dtype][0]) and inits[node.input[1]] == np.float32(scale)
    assert _attrs(node) == {"has_inf": int(dtype == "float8e5m2"), "has_nan": 1, "has_subnormal": 1, "saturation": 1, "rounding_mode": b"ROUND"}
    x = _float8_sweep(dtype) * np.float32(scale)
    want = _run(to_proto(model), x, [])["y"]
    assert np.array_equal(_run(lower_quant(proto), x, [])["y"], want)
    assert np.array_equal(float_quant_reference(x, inits[node.input[1]], *FLOAT8[dtype][0]), want)


@pytest.mark.parametrize("dtype", list(FLOAT8))
def test_float8_target_writes_float_quant(tmp_path: Path, calib: Path, dtype: str) -> None:
    target = tmp_path / "qonnx-fp8.toml"
    target.write_text(FP8_TARGET.format(dtype=dtype))
    out = tmp_path / "out"
    qcompiler.compile(small_cnn(), str(target), calibration=calib, output_dir=out, verify=False)
    compiled_model = onnx.load(out / "model.onnx")
    compiled_inits = _inits(compiled_model)
    activations = [n for n in compiled_model.graph.node if n.op_type == "QuantizeLinear"]
    float8_weights = {
        n.output[0]: n for n in compiled_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in compiled_inits and compiled_inits[n.input[0]].dtype.itemsize == 1
    }
    assert activations and float8_weights
    proto = onnx.load(out / "model.qonnx.onnx")
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert not {"Quant", "BipolarQuant", "QuantizeLinear", "DequantizeLinear", "Clip"} & set(ops)
    float_quants = [n for n in proto.graph.node if n.op_type == "FloatQuant"]
    # One FloatQuant per quantizer: each activation quantizer, each float8 weight.
    assert len(float_quants) == len(activations) + len(float8_weights)
    inits = _inits(proto)
    assert all(a.dtype == np.float32 for a in inits.values())
    for n in float_quants:
        assert n.domain == QONNX_DOMAIN and _float_format(n, inits) == (dtype, FLOAT8[dtype][0])
        assert _attrs(n) == {"has_inf": int(dtype == "float8e5m2"), "has_nan": 1, "has_subnormal": 1, "saturation": 1, "rounding_mode": b"ROUND"}
        if n.input[0] in inits:  # a weight: exactly the float8 values of model.onnx times their scale
            w, scale = inits[n.input[0]], inits[n.input[1]]
            assert scale.shape == (w.shape[0],) + (1,) * (w.ndim - 1)  # axis 0: Conv, Gemm transB=1
            dq = next(d for d in float8_weights.values() if d.metadata_props and dict((p.key, p.value) for p in d.metadata_props).get("qc.source") == n.input[0])
            q = compiled_inits[dq.input[0]].astype(np.float32)
            assert np.array_equal(q * scale, w) and np.array_equal(compiled_inits[dq.input[1]].reshape(scale.shape), scale)
        else:
            assert inits[n.input[1]].shape == ()
    assert sum(n.input[0] in inits for n in float_quants) == len(float8_weights)
    _check_same_numerics(out)


@pytest.mark.parametrize("pipeline", [None, INT16_MIXED], ids=["16bit", "mixed"])
def test_int16_target_writes_wide_quant(tmp_path: Path, calib: Path, pipeline: str | None) -> None:
    """Widths above 8 in int16 (opset 21): Quant nodes with bit-width 12 and 16."""
    target = tmp_path / "qonnx-int16.toml"
    target.write_text(INT16_TARGET)
    out = tmp_path / "out"
    result = qcompiler.compile(small_cnn(), str(target), calibration=calib, pipeline=pipeline, output_dir=out, verify=False)
    if pipeline is None:
        chosen, act_bits = {}, 16
    else:
        stats = next(p.stats for p in result.report.passes if p.name == "assign-precision")
        chosen, act_bits = {w: layer["bits"] for w, layer in stats["layers"].items()}, 16
        assert set(chosen.values()) <= {12, 16} and 12 in chosen.values()
    proto = onnx.load(out / "model.qonnx.onnx")
    onnx.checker.check_model(proto)
    inits = _inits(proto)
    by_output = {o: n for n in proto.graph.node for o in n.output}
    quants = [n for n in proto.graph.node if n.domain == QONNX_DOMAIN]
    assert quants and all(n.op_type == "Quant" for n in quants)
    weights = {n.input[0]: n for n in quants if n.input[0] in inits}
    assert weights and (not chosen or set(weights) == set(chosen))
    for name, n in weights.items():
        bits = chosen.get(name, 16)
        assert inits[n.input[3]] == bits and (_attrs(n)["signed"], _attrs(n)["narrow"]) == (1, 1)
        lo, hi = _int_range(bits, 1, 1)
        q = np.round(inits[name] / inits[n.input[1]])
        assert np.array_equal(q * inits[n.input[1]], inits[name]) and q.min() >= lo and q.max() <= hi
    for n in quants:
        if n.input[0] not in inits:
            after_relu = n.input[0] in by_output and by_output[n.input[0]].op_type == "Relu"
            assert (_attrs(n)["signed"], inits[n.input[3]]) == ((0, act_bits - 1) if after_relu else (1, act_bits))
    _check_same_numerics(out, onnx.load(out / "model.onnx"))


def test_narrow_activations_inside_int16_are_refused(tmp_path: Path, calib: Path) -> None:
    """A narrower activation width is a Clip on the integer tensor, and onnxruntime 1.32's CPU
    provider has no 16-bit Clip: refused before anything is written."""
    target = tmp_path / "qonnx-int16.toml"
    target.write_text(INT16_TARGET)
    pipeline = INT16_MIXED.replace("measure-below=0}", "measure-below=0,activation-bits=12}")
    with pytest.raises(QCError) as info:
        qcompiler.compile(small_cnn(), str(target), calibration=calib, pipeline=pipeline, output_dir=tmp_path / "out", verify=False)
    assert info.value.option == "activation-bits" and not (tmp_path / "out").exists()
