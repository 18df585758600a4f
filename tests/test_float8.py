"""FP8 (E4M3) quantization: the tensorrt-fp8 target's Q/DQ, its numbers, and the onnxruntime
optimization that forces its verification to basic optimizations."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.errors import QCError
from qcompiler.ir import to_proto
from qcompiler.quant.weights import quantize_float8
from qcompiler.targets.spec import load_target
from tests.helpers import small_cnn


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp8") / "calib.npz"
    np.savez(path, input=np.random.default_rng(4).normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    return path


def test_float8_quantizer_maps_the_channel_maximum_to_448_and_rounds_like_ml_dtypes() -> None:
    w = np.random.default_rng(0).normal(0, 1, (4, 10)).astype(np.float32)
    q, scale, zp = quantize_float8(w, "float8e4m3fn", (w.min(axis=1), w.max(axis=1)), 0)
    assert q.dtype == ml_dtypes.float8_e4m3fn and np.all(zp == 0)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 448, rtol=1e-6)
    np.testing.assert_array_equal(q.astype(np.float32), (w / scale[:, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.abs(q.astype(np.float32)).max() == 448


def test_tensorrt_fp8_compiles_float8_qdq_and_matches_float(calib: Path) -> None:
    result = qcompiler.compile(small_cnn(), "tensorrt-fp8", calibration=calib, verify_data=calib, latency_runs=0)
    graph = result.model.graph
    quantizers = [n for n in graph if n.op_type == "QuantizeLinear"]
    assert quantizers and all(q.inputs[2].const_value.dtype == ir.DataType.FLOAT8E4M3FN for q in quantizers)
    weights = [n for n in graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert len(weights) == 6 and all(n.inputs[0].const_value.dtype == ir.DataType.FLOAT8E4M3FN for n in weights)
    assert result.report.verification.outputs[0].sqnr_db > 15


def test_onnxruntime_extended_optimizations_drop_relu_before_a_float8_quantizer(calib: Path) -> None:
    """Why tensorrt-fp8 verifies at basic optimizations (onnxruntime 1.32). If this starts to
    fail, onnxruntime fixed it and the target's [verify] optimization can go back to "all"."""
    model = qcompiler.compile(small_cnn(), "tensorrt-fp8", calibration=calib, verify=False).model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(calib.parent / "optimized.onnx")
    ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    import onnx

    optimized = onnx.load(options.optimized_model_filepath)
    assert sum(n.op_type == "Relu" for n in model.graph) == 1
    assert not [n for n in optimized.graph.node if n.op_type == "Relu"]
    assert load_target("tensorrt-fp8").verify_optimization == "basic"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[activations]\ndtype = "float8e4m3fn"\nsymmetric = false\n', "activations.symmetric"),
        ('[weights]\ndtype = "float8e4m3fn"\nnarrow_range = false\n', "min_opset"),
        ('min_opset = 19\n[verify]\noptimization = "none"\n', "verify.optimization"),
    ],
)
def test_float8_target_errors(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text('extends = "tensorrt"\n' + body)
    with pytest.raises(QCError) as info:
        load_target(str(path))
    assert info.value.file == f"{path}:{key}"


def test_float8_weights_have_no_narrower_widths() -> None:
    fp8 = load_target("tensorrt-fp8")
    assert fp8.bits.allowed == (8,) and fp8.weights.is_float8 and fp8.activations.qrange == (-448, 448)
