"""`qc validate`: our outputs are clean for every target, onnxruntime's quantizer is judged
correctly, and each rule catches the graph broken for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.ir import load_model, to_proto
from qcompiler.targets.spec import list_targets, load_target
from qcompiler.validate import RULES, Violation, validate
from tests.helpers import assert_matches_schema, small_cnn

QC = [sys.executable, "-m", "qcompiler.cli"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validate") / "calib.npz"
    np.savez(path, input=np.random.default_rng(1).normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    return path


def _compiled(target: str, calib: Path) -> ir.Model:
    return qcompiler.compile(small_cnn(), target, calibration=calib, verify=False).model


def _rules(model: ir.Model, target: str, cpu: str | None = None) -> dict[str, list[str]]:
    """Violations by rule; ``cpu`` (an ISA, as ``qc validate --cpu``) checks for that CPU rather than this one."""
    found: dict[str, list[str]] = {}
    for v in validate(model, load_target(target, cpu=cpu)):
        found.setdefault(v.rule, []).append(v.node)
    return found


@pytest.mark.parametrize("target", list_targets())
def test_our_output_is_clean_for_every_target(target: str, calib: Path) -> None:
    assert _rules(_compiled(target, calib), target) == {}


def test_bundled_resnet20_for_tensorrt_validates_clean_from_the_cli(tmp_path: Path, bundled_model: Path, bundled_calib: Path) -> None:
    out = tmp_path / "out"
    subprocess.run([*QC, "compile", str(bundled_model), "--target", "tensorrt", "--calib", str(bundled_calib), "-o", str(out), "--no-verify"], check=True, capture_output=True)
    clean = subprocess.run([*QC, "validate", str(out / "model.onnx"), "--target", "tensorrt", "--json", str(tmp_path / "v.json")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["clean"] and report["violations"] == [] and set(report["rules"]) == set(RULES)
    assert_matches_schema(report, "validate")
    # The same file against ort-cpu: int8 activations and float biases are not what ort-cpu's kernels take.
    dirty = subprocess.run([*QC, "validate", str(out / "model.onnx"), "--target", "ort-cpu", "--json", str(tmp_path / "dirty.json")], capture_output=True, text=True)
    assert dirty.returncode == 1 and "dtype" in dirty.stdout and "bias" in dirty.stdout
    violations = json.loads((tmp_path / "dirty.json").read_text())
    assert_matches_schema(violations, "validate")
    assert not violations["clean"] and {v["rule"] for v in violations["violations"]} >= {"dtype", "bias"}


def test_piped_output_is_one_violation_per_line(calib: Path, tmp_path: Path) -> None:
    # Piped (not a terminal), each violation is one tab-separated line with the full node name,
    # so `qc validate ... | grep NODE` finds it; the table would wrap a long name across rows.
    from typer.testing import CliRunner

    from qcompiler.cli import app

    model = _compiled("ort-cpu", calib)
    dq = _node(model, "conv_c").inputs[2].producer()
    dq.name = "backbone/stage_3/block_2/conv_c/bias_DequantizeLinear_with_a_name_longer_than_a_table_cell"
    dq.replace_input_with(1, _const(model, "bias_scale", dq.inputs[1].const_value.numpy() * 2))
    path = tmp_path / "model.onnx"
    onnx.save(to_proto(model), path)
    result = CliRunner().invoke(app, ["validate", str(path), "--target", "ort-cpu"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stdout.splitlines() if dq.name in line]
    assert len(lines) == 1
    rule, node, op, message, fix = lines[0].split("\t")
    assert (rule, node, op, fix) == ("bias", dq.name, "DequantizeLinear", Violation("bias", "", "", "").fix) and "conv_c" in message


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = subprocess.run([*QC, "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "bad.onnx" in result.stderr


def _ort_quantized(tmp_path: Path, calib: Path, per_channel: bool) -> ir.Model:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path, out = tmp_path / "float.onnx", tmp_path / f"ort_{per_channel}.onnx"
    onnx.save(to_proto(small_cnn()), float_path)
    samples = np.load(calib)["input"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": samples[i : i + 8]} for i in range(0, len(samples), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return load_model(out)


#: The weight DequantizeLinear nodes onnxruntime's quantizer writes for small_cnn's six weight layers.
ORT_WEIGHT_DQ = [f"{w}_DequantizeLinear" for w in ("w0", "wa", "wb", "wc", "wd", "wf")]


def test_onnxruntime_quantize_static_per_channel_meets_ort_cpu(tmp_path: Path, calib: Path) -> None:
    model = _ort_quantized(tmp_path, calib, per_channel=True)
    # onnxruntime's quantizer gives each Concat input its own range: QLinearConcat then
    # requantizes every input, which the ort-cpu description rules out (one shared scale).
    # Checked for a CPU whose kernels accumulate in int32 (VNNI, ARM), that is all.
    assert _rules(model, "ort-cpu", cpu="avx512-vnni") == {"shared-scale": ["concat"]}
    assert _rules(model, "ort-cpu", cpu="arm64-dot") == {"shared-scale": ["concat"]}
    # Without VNNI the kernels add pairs of products in int16: the quantizer's full-range int8
    # weights (reduce_range off) overflow them in every layer.
    assert _rules(model, "ort-cpu", cpu="avx2") == {"shared-scale": ["concat"], "saturation": ORT_WEIGHT_DQ}
    # TensorRT wants int8 activations and float biases: every activation quantizer and bias is flagged.
    found = _rules(model, "tensorrt")
    assert set(found) >= {"dtype", "bias"}
    assert len(found["bias"]) == 6


def test_onnxruntime_quantize_static_per_tensor_breaks_granularity(tmp_path: Path, calib: Path) -> None:
    model = _ort_quantized(tmp_path, calib, per_channel=False)
    found = _rules(model, "ort-cpu", cpu="avx512-vnni")
    # Every weight with more than one output channel (5 Convs and the Gemm) is per tensor.
    assert set(found) == {"granularity", "shared-scale"} and found["granularity"] == ORT_WEIGHT_DQ
    # The same on a CPU without VNNI, where the full-range weights also saturate (as per channel).
    assert _rules(model, "ort-cpu", cpu="avx2") == found | {"saturation": ORT_WEIGHT_DQ}


# -- one hand-broken graph per rule ------------------------------------------------------------


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def _weight_dq(model: ir.Model, conv: str) -> ir.Node:
    return _node(model, conv).inputs[1].producer()


def _input_dq(model: ir.Model, node: str) -> ir.Node:
    return _node(model, node).inputs[0].producer()


def _const(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    model.graph.register_initializer(value)
    return value


def _retarget(tmp_path: Path, text: str) -> str:
    path = tmp_path / "target.toml"
    path.write_text(text)
    return str(path)


def test_rule_opset(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    model.opset_imports[""] = 12
    assert _rules(model, "ort-cpu") == {"opset": ["<model>"]}


def test_rule_dtype(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _input_dq(model, "sigmoid")
    zp = _const(model, "int8_zp", np.array(0, np.int8))
    dq.replace_input_with(2, zp)
    dq.inputs[0].producer().replace_input_with(2, zp)
    assert _rules(model, "ort-cpu") == {"dtype": [dq.inputs[0].producer().name]}


def test_rule_symmetric(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _weight_dq(model, "conv_a")
    dq.replace_input_with(2, _const(model, "bad_zp", np.full(4, 3, np.int8)))
    assert _rules(model, "ort-cpu") == {"symmetric": [dq.name]}


def test_rule_granularity(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _weight_dq(model, "conv_b")
    scale = dq.inputs[1].const_value.numpy()
    dq.replace_input_with(1, _const(model, "one_scale", np.array(scale.max(), np.float32)))
    dq.replace_input_with(2, _const(model, "one_zp", np.array(0, np.int8)))
    dq.attributes.pop("axis", None)
    found = _rules(model, "ort-cpu")
    # The int32 bias was scaled for the per-channel weight scales: it is flagged as well.
    assert found == {"granularity": [dq.name], "bias": [_node(model, "conv_b").inputs[2].producer().name]}


def test_rule_format(calib: Path) -> None:
    """A weight code outside the format its DequantizeLinear names (qc.format, written by qc compile)."""
    model = _compiled("ort-cpu", calib)
    dq = _weight_dq(model, "conv_a")
    assert dq.metadata_props["qc.format"] == "int8"
    dq.metadata_props["qc.format"] = "int3"  # the codes are 8-bit ones
    assert _rules(model, "ort-cpu") == {"format": [dq.name]}


def test_rule_axis(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _weight_dq(model, "conv_d")  # [6, 6, 3, 3]: axis 1 has as many entries as axis 0
    dq.attributes["axis"] = ir.AttrInt64("axis", 1)
    assert _rules(model, "ort-cpu") == {"axis": [dq.name]}


def test_rule_qdq_pair_mismatched_scale(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _input_dq(model, "sigmoid")
    dq.replace_input_with(1, _const(model, "other_scale", dq.inputs[1].const_value.numpy() * 2))
    assert _rules(model, "ort-cpu") == {"qdq-pair": [dq.name]}


def test_rule_qdq_pair_quantizer_never_dequantized(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _input_dq(model, "sigmoid")
    q = dq.inputs[0].producer()
    _node(model, "sigmoid").replace_input_with(0, q.inputs[0])
    model.graph.remove(dq, safe=True)
    assert _rules(model, "ort-cpu") == {"qdq-pair": [q.name]}


def _float_weight(model: ir.Model, layer: str, how: str) -> ir.Value:
    """Replace ``layer``'s weight DequantizeLinear by a float copy of the dequantized weight, fed
    the way ``how`` says: an initializer, a Constant node, or an Identity / Cast + Reshape chain."""
    node = _node(model, layer)
    dq = node.inputs[1].producer()
    stored, scale = dq.inputs[0].const_value.numpy().astype(np.float32), dq.inputs[1].const_value.numpy()
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes and scale.size > 1 else 0
    dequantized = stored * (scale.reshape([-1 if i == axis else 1 for i in range(stored.ndim)]) if scale.size > 1 else scale)
    if how == "constant":
        feed = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(dequantized.astype(np.float32)))], name="w_const")
        chain = [feed]
    else:
        copy = _const(model, f"{layer}_float_w", dequantized.astype(np.float16 if how == "cast-reshape" else np.float32).reshape(-1 if how == "cast-reshape" else dequantized.shape))
        if how == "initializer":
            chain = []
        elif how == "identity":
            chain = [ir.Node("", "Identity", [copy], name="w_identity")]
        else:
            cast = ir.Node("", "Cast", [copy], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name="w_cast")
            shape = _const(model, f"{layer}_w_shape", np.array(dequantized.shape, np.int64))
            chain = [cast, ir.Node("", "Reshape", [cast.outputs[0], shape], name="w_reshape")]
    if chain:
        model.graph.insert_before(node, chain)
    weight = chain[-1].outputs[0] if chain else copy
    node.replace_input_with(1, weight)
    model.graph.remove(dq, safe=True)
    return weight


@pytest.mark.parametrize("how", ["initializer", "identity", "constant", "cast-reshape"])
def test_rule_float_weight_behind_a_quantized_input(calib: Path, how: str) -> None:
    # TensorRT runs a Conv whose input is quantized in int8: a float weight there, however it is
    # fed, is a layer the compiler (or a hand edit) forgot to quantize.
    model = _compiled("tensorrt", calib)
    _float_weight(model, "conv_b", how)
    assert _rules(model, "tensorrt") == {"float-weight": ["conv_b"]}


def test_rule_float_weight_matmul_through_identity(calib: Path) -> None:
    # A MatMul whose B is a float constant behind an Identity has a weight, not a second activation.
    model = _compiled("ort-cpu", calib)
    gemm = _node(model, "fc")
    w = _const(model, "mm_w", np.zeros((6, 5), np.float32))
    ident = ir.Node("", "Identity", [w], name="mm_identity")
    matmul = ir.Node("", "MatMul", [gemm.inputs[0], ident.outputs[0]], name="fc_matmul")
    model.graph.insert_before(gemm, [ident, matmul])
    gemm.replace_input_with(0, matmul.outputs[0])
    matmul.outputs[0].dtype = ir.DataType.FLOAT
    found = _rules(model, "ort-cpu")
    assert found.get("float-weight") == ["fc_matmul"] and "qdq-pair" not in found


def test_rule_float_weight_only_where_the_target_has_no_float_layers(calib: Path, tmp_path: Path) -> None:
    model = _compiled("ort-cpu", calib)
    gemm = _node(model, "fc")
    gemm.replace_input_with(1, _const(model, "float_w", np.zeros((5, 6), np.float32)))
    assert _rules(model, "ort-cpu") == {"float-weight": ["fc"]}
    # 32 among the allowed widths lets assign-precision leave a layer float, reading a dequantized
    # input; the backend runs it in float.
    float_layers = _retarget(tmp_path, 'extends = "ort-cpu"\nname = "float-layers"\n[bits]\nallowed = [4, 8, 32]\n')
    assert _rules(model, float_layers) == {}
    # Without a float fallback such a layer cannot run at all.
    all_integer = _retarget(tmp_path, 'extends = "ort-cpu"\nname = "all-integer"\n[bits]\nallowed = [4, 8, 32]\n[ops]\nfloat_fallback = false\n')
    assert _rules(model, all_integer)["float-weight"] == ["fc"]


def test_float_weight_of_a_layer_outside_the_quantized_region_is_fine(calib: Path) -> None:
    # conv0 reading the float graph input with a float weight is a float layer, not a broken one.
    model = _compiled("tensorrt", calib)
    conv0 = _node(model, "conv0")
    x_dq = conv0.inputs[0].producer()
    x_q = x_dq.inputs[0].producer()
    _float_weight(model, "conv0", "identity")
    conv0.replace_input_with(0, model.graph.inputs[0])
    model.graph.remove([x_dq, x_q], safe=True)
    assert _rules(model, "tensorrt") == {}


def test_bundled_resnet20_float_conv_weight_is_flagged_from_the_cli(tmp_path: Path, bundled_model: Path, bundled_calib: Path) -> None:
    out = tmp_path / "out"
    subprocess.run([*QC, "compile", str(bundled_model), "--target", "tensorrt", "--calib", str(bundled_calib), "-o", str(out), "--latency-runs", "0", "--no-verify"], check=True, capture_output=True)
    model = load_model(out / "model.onnx")
    conv = [n for n in model.graph if n.op_type == "Conv"][3]
    _float_weight(model, conv.name, "identity")
    broken = tmp_path / "broken.onnx"
    onnx.save(to_proto(model), broken)
    result = subprocess.run([*QC, "validate", str(broken), "--target", "tensorrt"], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [line[:3] for line in lines] == [["float-weight", conv.name, "Conv"]]


def test_rule_shared_scale(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _node(model, "concat").inputs[0].producer()
    q = dq.inputs[0].producer()
    scale = _const(model, "concat_in_scale", dq.inputs[1].const_value.numpy() * 1.5)
    dq.replace_input_with(1, scale)
    q.replace_input_with(1, scale)
    assert _rules(model, "ort-cpu") == {"shared-scale": ["concat"]}


def test_rule_bias(calib: Path) -> None:
    model = _compiled("ort-cpu", calib)
    dq = _node(model, "conv_c").inputs[2].producer()
    dq.replace_input_with(1, _const(model, "bias_scale", dq.inputs[1].const_value.numpy() * 2))
    assert _rules(model, "ort-cpu") == {"bias": [dq.name]}


def test_rule_unsupported_op_on_integers(calib: Path, tmp_path: Path) -> None:
    model = _compiled("ort-cpu", calib)
    assert _node(model, "pool0").inputs[0].dtype == ir.DataType.UINT8  # ort-cpu runs MaxPool on uint8
    target = _retarget(tmp_path, 'extends = "ort-cpu"\nname = "no-int-pool"\n[ops]\ninteger_passthrough = []\n')
    # Flatten also runs on uint8 in ort-cpu's output.
    assert _rules(model, target) == {"unsupported-op": ["pool0", "flatten"]}


def test_rule_unsupported_op_without_float_fallback(calib: Path, tmp_path: Path) -> None:
    model = _compiled("ort-cpu", calib)
    # ort-cpu runs Sigmoid integer (QLinearSigmoid); a backend without it must flag the float Sigmoid.
    quantized = [op for op in load_target("ort-cpu").ops.quantized if op != "Sigmoid"]
    target = _retarget(tmp_path, f'extends = "ort-cpu"\nname = "all-integer"\n[ops]\nfloat_fallback = false\nquantized = {json.dumps(quantized)}\n')
    assert _rules(model, target) == {"unsupported-op": ["sigmoid"]}


def test_rule_fusion(calib: Path) -> None:
    model = _compiled("tensorrt", calib)
    relu = _node(model, "relu0")
    conv_out = relu.inputs[0]
    scale = _const(model, "split_scale", np.array(0.05, np.float32))
    zp = _const(model, "split_zp", np.array(0, np.int8))
    q = ir.Node("", "QuantizeLinear", [conv_out, scale, zp], name="split_q")
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zp], name="split_dq")
    q.outputs[0].dtype = ir.DataType.INT8
    model.graph.insert_before(relu, [q, dq])
    relu.replace_input_with(0, dq.outputs[0])
    assert _rules(model, "tensorrt") == {"fusion": ["relu0"]}


def test_every_rule_has_a_test() -> None:
    tested = {name.removeprefix("test_rule_").split("_")[0].replace("qdq", "qdq-pair").replace("shared", "shared-scale").replace("unsupported", "unsupported-op").replace("float", "float-weight") for name in globals() if name.startswith("test_rule_")}
    assert tested == set(RULES)


def test_rule_saturation_weights_compiled_for_vnni_checked_for_avx2(calib: Path) -> None:
    """Full-range int8 weights overflow the int16 pair sums of AVX2's kernels; what qc compiles
    for AVX2 does not, and a VNNI CPU accepts both."""
    spec = lambda isa: load_target("ort-cpu", cpu=isa)  # noqa: E731
    for_vnni = qcompiler.compile(small_cnn(), spec("avx512-vnni"), calibration=calib, verify=False).model
    for_avx2 = qcompiler.compile(small_cnn(), spec("avx2"), calibration=calib, verify=False).model
    flagged = {v.rule for v in validate(for_vnni, spec("avx2"))}
    assert flagged == {"saturation"}
    assert validate(for_avx2, spec("avx2")) == []
    assert validate(for_vnni, spec("avx512-vnni")) == []


def test_rule_embedding_tables_checked_against_the_target() -> None:
    """A table stored as integers must have the type and lowering of the target's [embeddings]."""
    import dataclasses

    from qcompiler.pass_manager import PassManager
    from qcompiler.passes.quantize_embeddings import QuantizeEmbeddings
    from tests.passes.test_quantize_embeddings import RULES, _ctx, _lookup_model

    model, _ = _lookup_model()
    blocks = PassManager.run_one(QuantizeEmbeddings(), model, _ctx(RULES["int4 blocks"])).model
    assert [v.rule for v in validate(blocks, dataclasses.replace(load_target("ort-cpu-int4"), embeddings=RULES["int4 blocks"]))] == []
    found = validate(blocks, load_target("ort-cpu-int4"))  # the built-in target reads int8 rows
    assert [v.rule for v in found] == ["embedding"] and "gather-cast-mul" in found[0].message
    rows = PassManager.run_one(QuantizeEmbeddings(), _lookup_model()[0], _ctx(RULES["int8 rows"])).model
    assert validate(rows, load_target("ort-cpu-int4")) == []
    found = validate(rows, load_target("tensorrt"))
    assert [v.rule for v in found] == ["embedding"] and "keeps embedding tables float" in found[0].message
