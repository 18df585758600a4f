"""quantize-recurrent-weights: LSTM/GRU/RNN weights stored quantized run exactly as the shared
weight quantizer's values; what stays float; the guard can undo it; targets validate clean."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from qcompiler.accuracy_guard import layer_in_float
from qcompiler.cost_model import storage_dtype
from qcompiler.ir import copy_model, to_proto
from qcompiler.pass_manager import PassContext, PassManager
from qcompiler.passes.quantize_recurrent_weights import QuantizeRecurrentWeights
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT
from qcompiler.quant.weights import dequantize_weight, quantize_weight
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, run, tensor_info
from tests.test_cli_errors import assert_one_line_error, qc

HIDDEN, FEATURES, STEPS = 16, 40, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent(op: str, directions: int = 1, *, weights_as_input: bool = False, batch_first: bool = False) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """One recurrent layer; ``batch_first``: [batch, steps, features] in, the final state
    [batch, directions, hidden] out, through Transposes (as torch exports it)."""
    rng = np.random.default_rng(0)
    g = GATES[op]
    inits = {"W": rng.normal(0, 0.3, (directions, g * HIDDEN, FEATURES)).astype(np.float32), "R": rng.normal(0, 0.3, (directions, g * HIDDEN, HIDDEN)).astype(np.float32),
             "B": rng.normal(0, 0.1, (directions, 2 * g * HIDDEN)).astype(np.float32)}
    direction = "bidirectional" if directions == 2 else "forward"
    inputs = [tensor_info("R", [directions, g * HIDDEN, HIDDEN])] if weights_as_input else []
    if batch_first:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]), helper.make_node(op, ["xt", "W", "R", "B"], ["", "ht"], name="rnn", hidden_size=HIDDEN, direction=direction),
                 helper.make_node("Transpose", ["ht"], ["h"], perm=[1, 0, 2])]
        return make_model(nodes, [tensor_info("x", ["b", STEPS, FEATURES]), *inputs], [tensor_info("h", ["b", directions, HIDDEN])], inits, opset=21), inits
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y", "h"], name="rnn", hidden_size=HIDDEN, direction=direction)
    outputs = [tensor_info("y", [STEPS, directions, "b", HIDDEN]), tensor_info("h", [directions, "b", HIDDEN])]
    model = make_model([node], [tensor_info("x", [STEPS, "b", FEATURES]), *inputs], outputs, inits, opset=21)
    return model, inits


def _target(name: str):
    """A built-in target; "int8 weight-only" is ort-cpu with its recurrent weights stored int8
    (ort-cpu itself keeps them float: onnxruntime runs the layer slower on computed weights)."""
    if name != "int8 weight-only":
        return load_target(name)
    spec = load_target("ort-cpu")
    return dataclasses.replace(spec, ops=dataclasses.replace(spec.ops, weight_only=("LSTM", "GRU", "RNN")))


def _x() -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1, (STEPS, 3, FEATURES)).astype(np.float32)


@pytest.mark.parametrize(("op", "directions", "target"), [("LSTM", 1, "int8 weight-only"), ("GRU", 1, "int8 weight-only"), ("RNN", 1, "int8 weight-only"), ("LSTM", 2, "int8 weight-only"),
                                                          ("LSTM", 1, "ort-cpu-int4"), ("GRU", 2, "ort-cpu-int4")])
def test_the_kernel_runs_on_exactly_the_quantizer_values(op: str, directions: int, target: str) -> None:
    spec = _target(target)
    model, inits = _recurrent(op, directions)
    ctx = PassContext(target=spec)
    result = PassManager.run_one(QuantizeRecurrentWeights(), model, ctx)
    assert result.stats["layers"] == 1 and result.stats["weights"] == 2
    assert result.stats["stored_bytes"] < 0.35 * result.stats["float_bytes"]
    onnx.checker.check_model(to_proto(result.model), full_check=True)
    assert {"W", "R"}.isdisjoint(result.model.graph.initializers) and "B" in result.model.graph.initializers
    rule, bits = spec.weights, spec.bits.default or spec.weights.bits
    axis = 2 if rule.granularity == "per-block" else 1
    dequantized = dict(inits)
    for name in ("W", "R"):
        dequantized[name] = dequantize_weight(*quantize_weight(inits[name], dataclasses.replace(rule, pair_sum_limit=None), bits, axis), rule, axis)
    reference, _ = _recurrent(op, directions)
    for name in ("W", "R"):
        reference.graph.initializers[name].const_value = ir.tensor(dequantized[name], name=name)
    # The stored codes, scales and zero points stand for exactly those values ...
    dqs = {n.outputs[0].uses()[0].idx: n for n in result.model.graph if n.op_type == "DequantizeLinear"}
    for index, name in ((1, "W"), (2, "R")):
        dq = dqs[index]
        codes, scale, zp = (v.const_value.numpy() for v in dq.inputs)
        assert dq.inputs[0].const_value.dtype == (ir.DataType.INT8 if storage_dtype(spec, bits) == "int8" else ir.DataType.INT4)
        np.testing.assert_array_equal(dequantize_weight(codes.astype(np.int32), scale, zp.astype(np.int32), rule, axis), dequantized[name])
    # ... and onnxruntime's kernel runs on them (its summation order differs for weights computed at
    # run time rather than prepacked, hence the float tolerance).
    for a, b in zip(run(result.model, {"x": _x()}), run(reference, {"x": _x()})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_guard_can_put_the_layer_back_in_float() -> None:
    model, _ = _recurrent("LSTM")
    float_out = run(model, {"x": _x()})
    ctx = PassContext(target=_target("int8 weight-only"))
    out = PassManager.run_one(QuantizeRecurrentWeights(), model, ctx).model
    trial = copy_model(out)
    assert layer_in_float(trial, "rnn", ctx.facts[FLOAT_LAYER_INPUTS_FACT]["rnn"])
    assert not any(n.op_type == "DequantizeLinear" for n in trial.graph)
    for a, b in zip(run(trial, {"x": _x()}), float_out):
        np.testing.assert_array_equal(a, b)


def test_a_weight_that_is_a_graph_input_stays_float() -> None:
    model, _ = _recurrent("GRU", weights_as_input=True)
    ctx = PassContext(target=_target("int8 weight-only"))
    result = PassManager.run_one(QuantizeRecurrentWeights(), model, ctx)
    assert result.stats["weights"] == 1 and "R" in result.model.graph.initializers
    assert any("input 2 stays float" in d.message and "graph input" in d.message for d in ctx.diagnostics)


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_a_target_without_weight_only_ops_changes_nothing(target: str) -> None:
    model, _ = _recurrent("LSTM")
    result = PassManager.run_one(QuantizeRecurrentWeights(), model, PassContext(target=load_target(target)))
    assert not result.modified and "W" in result.model.graph.initializers


def test_compile_and_validate_a_gru_model(tmp_path: Path) -> None:
    model, _ = _recurrent("GRU", 2, batch_first=True)
    onnx.save(to_proto(model), tmp_path / "gru.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).normal(0, 1, (64, STEPS, FEATURES)).astype(np.float32))
    # What the ort-cpu target file suggests for size over speed: a file of one's own extending it.
    (tmp_path / "small.toml").write_text('extends = "ort-cpu"\nname = "ort-cpu-small"\n[ops]\nweight_only = ["LSTM", "GRU", "RNN"]\n')
    done = qc("compile", "gru.onnx", "--target", "small.toml", "--calib", "calib.npz", "-o", "out", "--latency-runs", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "quantize-recurrent-weights" in done.stdout
    assert (tmp_path / "out" / "model.onnx").stat().st_size < 0.5 * (tmp_path / "gru.onnx").stat().st_size
    checked = qc("validate", "out/model.onnx", "--target", "small.toml", cwd=tmp_path)
    assert checked.returncode == 0 and "clean" in checked.stdout, checked.stdout


def test_weight_only_names_only_recurrent_ops(tmp_path: Path) -> None:
    text = Path(load_target("ort-cpu-int4").path).read_text().replace('weight_only = ["LSTM", "GRU", "RNN"]', 'weight_only = ["LSTM", "Conv"]')
    assert "Conv" in text
    (tmp_path / "mine.toml").write_text(text)
    assert_one_line_error(qc("targets", "show", "mine.toml", cwd=tmp_path), "mine.toml", "ops.weight_only")
