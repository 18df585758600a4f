"""End to end through the CLI and the Python API, on the bundled ResNet-20."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompiler
from qcompiler.runtime import make_session
from tests.helpers import assert_matches_schema

ROOT = Path(__file__).resolve().parents[1]


def qc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcompiler.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, bundled_model: Path, bundled_calib: Path, cifar_test_npz: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("compile") / "out"
    result = qc("compile", bundled_model, "--target", "ort-cpu", "--calib", bundled_calib, "-o", out, "--data", cifar_test_npz, "--latency-runs", "10")
    return out, result


def test_readme_command_writes_a_verified_int8_model(compiled, cifar_test_npz: Path) -> None:
    out, result = compiled
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    model = onnx.load(out / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "BatchNormalization" not in ops
    # onnxruntime runs it, and its accuracy on 2,000 test images is within 0.5 points of float.
    data = np.load(cifar_test_npz)
    logits = make_session(model).run(None, {"input": data["input"][:256]})[0]
    assert logits.shape == (256, 10)
    report = json.loads((out / "report.json").read_text())
    v = report["verification"]
    assert v["samples"] == 2000
    assert abs(v["accuracy_quantized"] - v["accuracy_float"]) <= 0.005
    assert v["outputs"][0]["sqnr_db"] > 20
    assert v["size"]["quantized_weight_bytes"] < v["size"]["float_weight_bytes"] / 3.5
    assert report["target"] == "ort-cpu" and report["schema_version"] == 4 and report["schema"] == "qcompiler/report"
    assert [p["name"] for p in report["passes"]] == ["infer-shapes", "fold-constants", "fold-batchnorm", "calibrate", "insert-qdq", "quantize-embeddings", "quantize-recurrent-weights"]
    assert len(v["layers"]) > 19
    # Every matched intermediate is a like-for-like comparison (no integer tensor read as float).
    assert min(layer["sqnr_db"] for layer in v["layers"]) > 15
    assert {"Pad", "Relu", "BatchNormalization"} <= {layer["op_type"] for layer in v["layers"]}
    # The terminal report is a readable table.
    assert "top-1 accuracy" in result.stdout and "Per-layer SQNR" in result.stdout and "SQNR" in result.stdout


def test_report_json_matches_the_documented_schema(compiled) -> None:
    out, _ = compiled
    report = json.loads((out / "report.json").read_text())
    schema = (ROOT / "docs" / "report-schema.md").read_text()
    for key in ["schema_version", "float_model", "quantized_model", "target", "pipeline", "calibration", "passes", "kept_float", "diagnostics", "verification", "compile_seconds", "artifacts"]:
        assert key in report and f"`{key}`" in schema
    for key in report["verification"]:
        assert f"`{key}`" in schema
    assert_matches_schema(report, "report")


def test_custom_pipeline_and_instruments(tmp_path: Path, bundled_model: Path, bundled_calib: Path) -> None:
    dump = tmp_path / "dump"
    result = qc(
        "compile", bundled_model, "--calib", bundled_calib, "--calib-count", "32", "-o", tmp_path / "out",
        "--pipeline", "fold-constants,fold-batchnorm,calibrate{method=percentile,percentile=99.99},insert-qdq",
        "--print-after", "fold-batchnorm", "--time-passes", "--verify-each", "--dump-dir", dump, "--latency-runs", "0",
    )
    assert result.returncode == 0, result.stderr
    assert "after fold-batchnorm" in result.stdout and "Pass timings" in result.stdout
    assert sorted(p.name for p in dump.iterdir()) == ["01-fold-constants.onnx", "02-fold-batchnorm.onnx", "03-calibrate.onnx", "04-insert-qdq.onnx"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # Printed in canonical form: options at their defaults are omitted.
    assert report["pipeline"] == "fold-constants,fold-batchnorm,calibrate{method=percentile},insert-qdq"
    # 32 samples: the last 6 are held out from calibration and verified on.
    assert report["calibration"]["samples"] == 26 and report["verification"]["data"].endswith("samples 26-31")


def test_custom_pass_from_a_users_file_runs_in_the_pipeline(tmp_path: Path, bundled_model: Path, bundled_calib: Path) -> None:
    result = qc(
        "compile", bundled_model, "--calib", bundled_calib, "--calib-count", "32", "-o", tmp_path / "out", "--no-verify",
        "--plugin", ROOT / "examples" / "custom_pass.py",
        "--pipeline", "infer-shapes,fold-constants,fold-batchnorm,clip-weights{sigmas=3},calibrate,insert-qdq",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    clip = next(p for p in report["passes"] if p["name"] == "clip-weights")
    assert clip["modified"] and clip["stats"]["clipped_weights"] > 0
    listing = qc("passes", "--plugin", ROOT / "examples" / "custom_pass.py")
    assert "clip-weights" in listing.stdout and "sigmas" in listing.stdout


def test_passes_and_targets_listings() -> None:
    listing = qc("passes")
    assert listing.returncode == 0
    for name in ["infer-shapes", "fold-constants", "fold-batchnorm", "calibrate", "insert-qdq"]:
        assert name in listing.stdout
    assert "percentile" in listing.stdout  # options are listed
    show = qc("targets", "show", "ort-cpu")
    assert show.returncode == 0 and 'name = "ort-cpu"' in show.stdout


def test_verify_compares_another_tools_model(tmp_path: Path, bundled_model: Path, bundled_calib: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = np.load(bundled_calib)["input"][:16]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 8]} for i in range(0, 16, 8)])

        def get_next(self):
            return next(self.batches, None)

    ort_model = tmp_path / "ort_int8.onnx"
    quantize_static(str(bundled_model), str(ort_model), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    result = qc("verify", bundled_model, ort_model, "--data", bundled_calib, "--count", "64", "--json", tmp_path / "r.json", "--latency-runs", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    v = report["verification"]
    assert v["samples"] == 64 and v["outputs"][0]["sqnr_db"] > 10
    assert v["latency"]["runs"] == 5 and v["accuracy_float"] is not None
    assert v["layers"], "intermediate tensors of another tool's model are matched through its Q/DQ pairs"
    assert_matches_schema(report, "report")


def test_python_api_compile_and_verify(bundled_model: Path, bundled_calib: Path, tmp_path: Path) -> None:
    result = qcompiler.compile(str(bundled_model), target="ort-cpu", calibration=str(bundled_calib), calib_count=32, latency_runs=0)
    assert result.output_dir is None
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph)
    assert result.report.verification.outputs[0].sqnr_db > 20
    assert result.report.calibration["samples"] == 26 and result.report.verification.samples == 6
    # With a pass list instead of text, and written to disk.
    written = qcompiler.compile(
        str(bundled_model), calibration=str(bundled_calib), calib_count=16,
        pipeline=["fold-batchnorm", "calibrate{method=minmax}", "insert-qdq"], output_dir=tmp_path / "o", verify=False,
    )
    assert (tmp_path / "o" / "model.onnx").exists() and written.report.verification is None
    report = qcompiler.verify(str(bundled_model), str(tmp_path / "o" / "model.onnx"), str(bundled_calib), count=32, latency_runs=0)
    assert report.verification.samples == 32 and report.verification.latency is None


@pytest.mark.parametrize("method", ["minmax", "entropy", "mse"])
def test_every_calibration_method_compiles(tmp_path: Path, bundled_model: Path, bundled_calib: Path, method: str) -> None:
    result = qcompiler.compile(str(bundled_model), calibration=str(bundled_calib), calib_count=32, latency_runs=0,
                               pipeline=f"infer-shapes,fold-constants,fold-batchnorm,calibrate{{method={method}}},insert-qdq")
    assert result.report.verification.outputs[0].sqnr_db > 15


def test_pipeline_without_infer_shapes_still_quantizes(bundled_model: Path, bundled_calib: Path) -> None:
    """The issue's example pipeline has no infer-shapes: types come from import, not from a pass."""
    result = qcompiler.compile(str(bundled_model), calibration=str(bundled_calib), calib_count=32, latency_runs=0,
                               pipeline="fold-batchnorm,calibrate{method=percentile,percentile=99.99},insert-qdq")
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert len(convs) == 19 and all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in convs)
    assert 20 < result.report.verification.outputs[0].sqnr_db < 60  # quantized, and sanely so
