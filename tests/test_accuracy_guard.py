"""The accuracy guard: held-out verification, per-layer fallbacks measured as onnxruntime runs the
model, the best model written and exit 1 when the goal is missed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import qcompiler
from qcompiler.accuracy_guard import layer_in_float
from qcompiler.data import DataSource
from qcompiler.ir import load_model
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import parse_pipeline
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT
from qcompiler.quant.uniform import sqnr_db
from qcompiler.targets.spec import load_target
from qcompiler.validate import validate
from tests.helpers import make_model, run, tensor_info

ROOT = Path(__file__).resolve().parents[1]


def qc(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcompiler.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _conv_relu6_conv() -> tuple:
    rng = np.random.default_rng(0)
    inits = {"w0": rng.normal(0, 1.0, (8, 3, 3, 3)).astype(np.float32), "b0": rng.normal(0, 0.5, 8).astype(np.float32),
             "lo": np.asarray(0.0, np.float32), "hi": np.asarray(6.0, np.float32), "w1": rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"], name="relu6"),
        helper.make_node("Conv", ["r0", "w1"], ["y"], name="conv1"),
    ]
    return make_model(nodes, [tensor_info("x", [None, 3, 8, 8])], [tensor_info("y", [None, 4, 8, 8])], inits)


def test_layer_in_float_gives_back_the_float_layer_with_its_clip():
    # Min/max ranges hold every sample, so with both layers back in float only conv0's output
    # quantizer still rounds (it stays: it also does the ReLU6 it absorbed): the output is the
    # float model's up to that rounding, far closer than the quantized model's.
    x = np.random.default_rng(1).normal(0, 1, (40, 3, 8, 8)).astype(np.float32)
    spec = load_target("ort-cpu")
    ctx = PassContext(target=spec, data=DataSource({"x": x}))
    model = parse_pipeline("calibrate{method=minmax},insert-qdq").run(_conv_relu6_conv(), ctx).model
    assert not [n for n in model.graph if n.op_type == "Clip"]  # fused into the quantizer
    floats = ctx.facts[FLOAT_LAYER_INPUTS_FACT]
    assert set(floats) == {"conv0", "conv1"}
    (ref,) = run(_conv_relu6_conv(), {"x": x})
    (quantized,) = run(model, {"x": x})
    assert layer_in_float(model, "conv0", floats["conv0"]) and layer_in_float(model, "conv1", floats["conv1"])
    assert not layer_in_float(model, "no-such-node", {})
    (restored,) = run(model, {"x": x})
    assert sqnr_db(ref, restored) > sqnr_db(ref, quantized) + 3
    assert not [n for n in model.graph if n.op_type == "DequantizeLinear" and n.outputs[0].uses() and any(u.node.name in ("conv0", "conv1") for u in n.outputs[0].uses())]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, bundled_model: Path, bundled_calib: Path) -> tuple[Path, subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("guard") / "out"
    # ResNet-20 int8 reaches about 31-32 dB on the held-out samples: 33 dB needs fallbacks.
    result = qc("compile", bundled_model, "--calib", bundled_calib, "-o", out, "--latency-runs", "0", "--min-sqnr", "33")
    return out, result, json.loads((out / "report.json").read_text())


def test_guard_falls_back_most_damaging_layers_first_and_each_fallback_helps(guarded):
    out, result, report = guarded
    g = report["guard"]
    assert g["initial_sqnr_db"] < 33 and g["fallbacks"]
    for f in g["fallbacks"]:
        assert f["sqnr_after_db"] > f["sqnr_before_db"] and f["action"] == "float"
    assert g["sqnr_db"] == pytest.approx(g["fallbacks"][-1]["sqnr_after_db"])
    # Every quantized layer's contribution was measured, and the first fallback was tried first.
    assert len(g["contributions"]) == 20 and g["fallbacks"][0]["node"] in [c["node"] for c in g["contributions"][:3]]
    # The report's verification is of the model written, on the held-out samples only.
    assert report["verification"]["data"].endswith("samples 205-255") and report["calibration"]["samples"] == 205
    assert report["verification"]["outputs"][0]["sqnr_db"] == pytest.approx(g["sqnr_db"], abs=0.01)


def test_guard_exit_status_says_whether_the_goal_was_met_and_the_model_is_written(guarded):
    out, result, report = guarded
    assert (out / "model.onnx").is_file()
    if report["guard"]["met"]:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1 and "accuracy guard" in result.stderr and "best model found" in result.stderr


def test_guard_output_validates_for_its_target(guarded):
    out, _, _ = guarded
    assert validate(load_model(out / "model.onnx"), load_target("ort-cpu")) == []


def test_unreachable_goal_writes_the_best_model_and_exits_1(tmp_path, bundled_model, bundled_calib):
    out = tmp_path / "out"
    result = qc("compile", bundled_model, "--calib", bundled_calib, "-o", out, "--latency-runs", "0", "--min-sqnr", "200")
    assert result.returncode == 1
    assert "goal missed" in result.stderr and str(out) in result.stderr and "Traceback" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert not report["guard"]["met"] and report["guard"]["sqnr_db"] >= report["guard"]["initial_sqnr_db"]


def test_max_drop_without_labels_is_a_one_line_error(tmp_path, bundled_model):
    calib = tmp_path / "nolabels.npz"
    np.savez(calib, input=np.load(ROOT / "models" / "cifar10_calib.npz")["input"][:40])
    result = qc("compile", bundled_model, "--calib", calib, "-o", tmp_path / "out", "--latency-runs", "0", "--max-drop", "0.5")
    assert result.returncode == 2 and "--max-drop" in result.stderr and "labels" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_guard_options_are_refused(tmp_path, bundled_model, bundled_calib, value):
    result = qc("compile", bundled_model, "--calib", bundled_calib, "-o", tmp_path / "out", "--min-sqnr", value)
    assert result.returncode == 2 and "--min-sqnr" in result.stderr and "Traceback" not in result.stderr


def test_min_sqnr_zero_turns_the_guard_off(tmp_path, bundled_model, bundled_calib):
    out = tmp_path / "out"
    result = qc("compile", bundled_model, "--calib", bundled_calib, "-o", out, "--latency-runs", "0", "--min-sqnr", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "report.json").read_text())["guard"] is None


def test_pruning_below_the_default_goal_is_reported_not_failed(tmp_path, bundled_model, bundled_calib):
    # Pruning leaves no float layer to fall back on, and its loss is what the pipeline asked for:
    # the default goal is measured and said, an explicit one still decides the exit status.
    pipeline = "infer-shapes,fold-constants,prune-magnitude{ratio=0.95,scope=network}"
    out = tmp_path / "out"
    result = qc("compile", bundled_model, "--calib", bundled_calib, "-o", out, "--latency-runs", "0", "--pipeline", pipeline)
    assert result.returncode == 0, result.stderr
    guard = json.loads((out / "report.json").read_text())["guard"]
    assert not guard["met"] and not guard["fell_back"] and "pruning" in guard["note"]
    assert "accuracy guard" in result.stdout and "measured only" in " ".join(result.stdout.split())
    strict = qc("compile", bundled_model, "--calib", bundled_calib, "-o", tmp_path / "strict", "--latency-runs", "0", "--pipeline", pipeline, "--min-sqnr", "20")
    assert strict.returncode == 1 and "accuracy guard" in strict.stderr and "Traceback" not in strict.stderr
