"""Block-wise weight quantization (per-block granularity): the quantizer's numbers, and the
weight-only int4 target that stores them behind DequantizeLinear(block_size) for onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.quant.weights import dequantize_weight, quantize_weight
from qcompiler.targets.spec import TensorRule
from tests.helpers import run, small_cnn

RULE = TensorRule(dtype="int8", symmetric=True, granularity="per-block", block_size=4)


def test_each_block_has_its_own_scale_and_hits_the_range() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (3, 10)).astype(np.float32)  # blocks along axis 1: 4 + 4 + 2 (padded)
    q, scale, zp = quantize_weight(w, RULE, 4, 1, "minmax")
    assert q.shape == w.shape and scale.shape == (3, 3) and np.all(zp == 0)
    for row in range(3):
        for b, cols in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
            block = w[row, cols]
            assert scale[row, b] == pytest.approx(np.abs(block).max() / 7.5, rel=1e-6)
            assert -8 <= q[row, cols].min() and q[row, cols].max() <= 7
    deq = dequantize_weight(q, scale, zp, RULE, 1)
    assert np.abs(deq - w).max() <= scale.max() / 2 + 1e-6


def test_blocks_along_axis_0_of_a_4d_kernel() -> None:
    w = np.random.default_rng(1).normal(0, 1, (6, 5, 3, 3)).astype(np.float32)
    q, scale, zp = quantize_weight(w, RULE, 4, 1, "minmax")
    assert scale.shape == (6, 2, 3, 3)  # 5 input channels -> 2 blocks of 4
    # The integers reproduce the weight blockwise: error within half a step everywhere.
    step = np.repeat(scale, 4, axis=1)[:, :5]
    assert np.all(np.abs(dequantize_weight(q, scale, zp, RULE, 1) - w) <= step / 2 + 1e-6)


def test_weight_only_int4_model_runs_what_the_quantizer_meant(tmp_path: Path) -> None:
    """No calibration data needed; onnxruntime (optimizations off) reproduces a float model whose
    weights are the dequantized blocks exactly."""
    result = qcompiler.compile(small_cnn(), "ort-cpu-int4", verify=False)
    graph = result.model.graph
    assert not [n for n in graph if n.op_type == "QuantizeLinear"]  # activations stay float
    dqs = [n for n in graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 6 and all(n.inputs[0].const_value.dtype == ir.DataType.INT4 and n.attributes["block_size"].as_int() == 32 for n in dqs)
    # The same graph with each DequantizeLinear replaced by its float output.
    reference = qcompiler.compile(small_cnn(), "ort-cpu-int4", verify=False).model
    for dq in [n for n in reference.graph if n.op_type == "DequantizeLinear"]:
        q = dq.inputs[0].const_value.numpy().astype(np.int64)
        scale = dq.inputs[1].const_value.numpy()
        zp = dq.inputs[2].const_value.numpy().astype(np.int64)
        axis = dq.attributes["axis"].as_int()
        block = TensorRule(dtype="int8", symmetric=True, granularity="per-block", block_size=32)
        value = ir.Value(name=f"{dq.name}_float", const_value=ir.tensor(dequantize_weight(q, scale, zp, block, axis)))
        reference.graph.register_initializer(value)
        dq.outputs[0].replace_all_uses_with(value)
        reference.graph.remove(dq, safe=True)
    x = np.random.default_rng(2).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    (got,) = run(result.model, {"input": x})
    (want,) = run(reference, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torch_executor_runs_blocked_dequantize_like_onnxruntime() -> None:
    torch = pytest.importorskip("torch")
    from qcompiler.torch_exec import TorchGraph

    model = qcompiler.compile(small_cnn(), "ort-cpu-int4", verify=False).model
    x = np.random.default_rng(3).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    (want,) = run(model, {"input": x})
    got = TorchGraph(model)(input=torch.from_numpy(x))
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_cli_compiles_weight_only_without_calibration(tmp_path: Path, bundled_model: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qcompiler.cli", "compile", str(bundled_model), "--target", "ort-cpu-int4", "-o", str(tmp_path / "out"), "--no-verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check = subprocess.run([sys.executable, "-m", "qcompiler.cli", "validate", str(tmp_path / "out" / "model.onnx"), "--target", "ort-cpu-int4"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
