"""--plot: the Pareto front of assign-precision as a PNG beside the compiled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from qcompiler.ir import to_proto
from tests.helpers import make_model, tensor_info
from tests.test_cli_errors import qc


def _files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)],
        [tensor_info("x", [None, 2, 4, 4])],
        [tensor_info("y", [None, 3])],
        {"w1": rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32), "w2": rng.normal(0, 0.3, (3, 64)).astype(np.float32)},
    )
    onnx.save(to_proto(model), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 2, 4, 4)).astype(np.float32), labels=rng.integers(0, 3, 32))
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def test_plot_writes_the_pareto_front(tmp_path: Path) -> None:
    model, data = _files(tmp_path)
    pipeline = "infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=size=0.6,pareto-points=5},calibrate,insert-qdq"
    result = qc("compile", model, "--calib", data, "--pipeline", pipeline, "-o", "out", "--latency-runs", "0", "--plot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "out" / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_plot_without_assign_precision_fails_first(tmp_path: Path) -> None:
    model, data = _files(tmp_path)
    result = qc("compile", model, "--calib", data, "-o", "out", "--plot", cwd=tmp_path)
    assert result.returncode == 2 and "--plot" in result.stderr and "assign-precision" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
