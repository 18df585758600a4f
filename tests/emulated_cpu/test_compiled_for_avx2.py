"""What `qc compile --cpu avx2` writes runs exactly on an (emulated) AVX2 CPU without VNNI, as
onnxruntime runs it there; what it writes for a VNNI CPU does not. Skipped without qemu-user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnx

import qcompiler
from qcompiler.data import DataSource
from qcompiler.ir import save_model
from qcompiler.runtime import make_session
from tests.emulated_cpu import emulator_unavailable_reason, run_on_emulated_cpu

CPU = "avx2"


@pytest.fixture(scope="module", autouse=True)
def _needs_emulator():
    reason = emulator_unavailable_reason(CPU)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def images(bundled_calib: Path) -> np.ndarray:
    return np.load(bundled_calib)["input"]


def _compile(tmp_path: Path, model: Path, calib: np.ndarray, cpu: str) -> Path:
    result = qcompiler.compile(str(model), target="ort-cpu", calibration=DataSource({"input": calib[:128]}), cpu=cpu, verify=False)
    path = tmp_path / f"model_{cpu}.onnx"
    save_model(result.model, path)
    return path


def _simulated(path: Path, x: np.ndarray) -> np.ndarray:
    """The graph's own numerics: Q/DQ in float, no integer kernels."""
    return make_session(onnx.load(str(path)), optimize=False).run(None, {"input": x})[0]


def test_resnet20_compiled_for_avx2_is_exact_there_and_vnni_weights_are_not(tmp_path, bundled_model, images):
    x = images[200:216]
    for_avx2 = _compile(tmp_path, bundled_model, images, "avx2")
    for_vnni = _compile(tmp_path, bundled_model, images, "avx512-vnni")
    exact = _simulated(for_avx2, x)
    emulated = run_on_emulated_cpu(for_avx2, {"input": x}, CPU)[0]
    # Integer kernels and the float simulation differ only by float rounding of requantization.
    assert np.abs(emulated - exact).max() < 0.05 * np.abs(exact).max()
    saturated = run_on_emulated_cpu(for_vnni, {"input": x}, CPU)[0]
    reference = _simulated(for_vnni, x)
    print("avx2-compiled max error", np.abs(emulated - exact).max(), "vnni-compiled", np.abs(saturated - reference).max())
    assert np.abs(saturated - reference).max() > 4 * np.abs(emulated - exact).max()
