"""`qc target measure`: a per-op cost table measured in onnxruntime, written as a target file that
loads back and drives latency budgets. Timings are noisy: only their form is asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx

from qcompiler.latency_table import _compiled_at, measure, model_layers, representative_layers
from qcompiler.targets.spec import load_target
from tests.helpers import assert_matches_schema, small_cnn

QC = [sys.executable, "-m", "qcompiler.cli"]


def test_cli_writes_a_target_file_that_loads_back(tmp_path: Path) -> None:
    out = tmp_path / "measured.toml"
    done = subprocess.run([*QC, "target", "measure", "ort-cpu", "-o", str(out), "--runs", "10"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spec = load_target(str(out))
    assert spec.name == "ort-cpu-measured" and spec.weights == load_target("ort-cpu").weights
    assert set(spec.cost.op) == {"Conv", "MatMul", "Gemm"}
    assert all(t["float32"] == 1.0 and t["int8"] > 0 for t in spec.cost.op.values())
    assert "onnxruntime" in spec.cost.source
    again = subprocess.run([*QC, "target", "measure", "ort-cpu", "-o", str(out), "--runs", "10"], capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr


def test_model_layers_are_cut_out_with_their_own_shapes() -> None:
    layers = model_layers(small_cnn())
    assert [l.op_type for l in layers] == ["Conv"] * 5 + ["Gemm"]
    conv_b = next(l for l in layers if l.name == "conv_b")
    assert conv_b.input_shape == (1, 4, 4, 4) and conv_b.macs == 4 * 4 * 4 * 4 * 9


def test_weight_only_target_measures_each_native_width() -> None:
    table = measure(load_target("ort-cpu-int4"), model_layers(small_cnn()), runs=10)
    assert set(table.op) == {"Conv", "Gemm"}
    assert all(set(t) == {"float32", "int8", "int4"} for t in table.op.values())


def test_timed_layer_reads_and_writes_integers_for_qdq_targets() -> None:
    """Inside a network a quantized layer's neighbours are quantized: the probe drops the input
    quantizer and the output dequantizer so only the layer's own kernel is timed."""
    import numpy as np

    layer = representative_layers()[0]
    proto = _compiled_at(layer, load_target("ort-cpu"), 8, np.random.default_rng(0))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [n.op_type for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")].count("QuantizeLinear") == 1  # the output's


def test_unknown_model_path_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*QC, "target", "measure", "ort-cpu", "-o", str(tmp_path / "t.toml"), "--model", str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and not (tmp_path / "t.toml").exists()


def test_per_layer_table_shows_each_layers_evidence(tmp_path: Path) -> None:
    """`--per-layer` times every weight layer as insert-qdq's speed check does and writes the rows
    beside the target file; a target with no quantizer boundary is refused in one line."""
    import json

    from qcompiler.ir import save_model

    model = tmp_path / "small.onnx"
    save_model(small_cnn(), model)
    out = tmp_path / "measured.toml"
    done = subprocess.run([*QC, "target", "measure", "ort-cpu", "--model", str(model), "-o", str(out), "--runs", "10", "--per-layer"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.with_suffix(".layers.json").read_text())
    assert_matches_schema(written, "layer-speed")
    rows = written["layers"]
    assert [r["layer"] for r in rows] == [l.name for l in model_layers(small_cnn())]
    assert all(r["decision"] in ("float", "quantized") and r["note"].startswith(("left float", "quantized")) and r["float_ms"] > 0 for r in rows)
    refused = subprocess.run([*QC, "target", "measure", "ort-cpu-int4", "--model", str(model), "-o", str(tmp_path / "int4.toml"), "--runs", "10", "--per-layer"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "weight-only" in refused.stderr
