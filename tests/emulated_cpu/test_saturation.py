"""onnxruntime's int8 GEMM on an emulated AVX2 CPU (no VNNI): full-range int8 weights saturate,
weights where any two of one sign sum to at most 128 in magnitude stay exact.

Runs onnxruntime under ``qemu-x86_64 -cpu Haswell-v4`` (see `tests.emulated_cpu.run`); skipped where
qemu-user is not installed or the host is not x86-64 Linux. About 10 s.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.emulated_cpu import emulated_cpuid, emulator_unavailable_reason, run_natively, run_on_emulated_cpu
from tests.emulated_cpu.models import (
    exact_matmul,
    matmul_integer,
    qdq_conv,
    qdq_matmul,
    requantize,
    vpmaddubsw_matmul,
)

CPU = "avx2"


@pytest.fixture(scope="module", autouse=True)
def _needs_emulator():
    reason = emulator_unavailable_reason(CPU)
    if reason:
        pytest.skip(reason)


def test_emulated_cpu_is_avx2_without_vnni():
    flags = set(emulated_cpuid(CPU)["flags"])
    assert "avx2" in flags
    assert not flags & {"avx512f", "avx512bw", "avx512_vnni", "avx_vnni"}


def test_full_range_weights_saturate_in_matmul_integer(tmp_path):
    """u8 255 x s8 127 over K=64: exact 64*32385 = 2072640; VPMADDUBSW clips each pair's 64770 to
    32767, giving 32*32767 = 1048544."""
    a = np.full((1, 64), 255, np.uint8)
    w = np.full((64, 8), 127, np.int8)
    model = matmul_integer(tmp_path / "mmi.onnx", w)
    emulated = run_on_emulated_cpu(model, {"x": a}, CPU)[0]
    assert exact_matmul(a, w)[0, 0] == 2072640
    assert (emulated == 1048544).all()
    np.testing.assert_array_equal(emulated, vpmaddubsw_matmul(a, w))
    # onnxruntime's documented way out: convert s8 weights to u8 (U8U8 kernel, exact on AVX2).
    fixed = run_on_emulated_cpu(model, {"x": a}, CPU, session_config={"session.x64quantprecision": "1"})[0]
    np.testing.assert_array_equal(fixed, exact_matmul(a, w))


def test_full_range_weights_saturate_in_fused_qdq_matmul(tmp_path):
    """The QDQ group fuses into QLinearMatMul under ORT_ENABLE_ALL and saturates; the float
    reference (ORT_ENABLE_BASIC keeps DQ -> MatMul -> Q in float) is exact."""
    s_x, s_w, s_y = 1 / 255, 1 / 127, 0.5
    w = np.full((64, 8), 127, np.int8)
    model = qdq_matmul(tmp_path / "qdq_mm.onnx", w, s_x, s_w, s_y)
    x = np.ones((1, 64), np.float32)  # quantizes to 255
    a = np.full((1, 64), 255, np.uint8)
    exact = requantize(exact_matmul(a, w), s_x, s_w, s_y) * np.float32(s_y)
    saturated = requantize(vpmaddubsw_matmul(a, w), s_x, s_w, s_y) * np.float32(s_y)
    assert exact[0, 0] == 64.0 and saturated[0, 0] == 32.5
    np.testing.assert_array_equal(run_on_emulated_cpu(model, {"x": x}, CPU, "all")[0], saturated)
    np.testing.assert_array_equal(run_on_emulated_cpu(model, {"x": x}, CPU, "basic")[0], exact)


def test_pair_limited_weights_exact(tmp_path):
    """Weights in [-64, 64] (any two of one sign sum to at most 128: 255*128 = 32640 fits int16)
    give the exact accumulator on AVX2, for random activations over the whole uint8 range."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 147)).astype(np.uint8)
    a[:, :8] = 255
    w = rng.integers(-64, 65, (147, 33)).astype(np.int8)
    w[:8] = 64
    model = matmul_integer(tmp_path / "mmi.onnx", w)
    emulated = run_on_emulated_cpu(model, {"x": a}, CPU)[0]
    np.testing.assert_array_equal(emulated, exact_matmul(a, w))
    np.testing.assert_array_equal(emulated, run_natively(model, {"x": a})[0])


def _im2col_nhwc(a: np.ndarray, k: int) -> np.ndarray:
    """Rows = output pixels, K ordered (kh, kw, cin): the order of onnxruntime's NHWC QLinearConv."""
    _, c, h, wd = a.shape
    oh, ow = h - k + 1, wd - k + 1
    taps = [a[0, :, i:i + oh, j:j + ow] for i in range(k) for j in range(k)]  # each [c, oh, ow]
    return np.stack(taps, axis=0).reshape(k * k * c, oh * ow).T


def test_fused_qdq_conv_saturates_full_range_and_is_exact_pair_limited(tmp_path):
    """3x3 QLinearConv (QDQ fused, NHWC): large same-sign weights saturate exactly as VPMADDUBSW
    over K ordered (kh, kw, cin) predicts; the same shapes with weights in [-64, 64] are exact."""
    rng = np.random.default_rng(1)
    cin, cout, k, s_x, s_w = 16, 8, 3, 1 / 255, 1 / 127
    a = rng.integers(150, 256, (1, cin, 6, 6)).astype(np.uint8)
    x = a.astype(np.float32) * np.float32(s_x)
    cols = _im2col_nhwc(a, k)

    def codes(out: np.ndarray, s_y: float) -> np.ndarray:
        return (np.rint(out / np.float32(s_y)).astype(np.int64) + 128)[0].reshape(cout, -1).T

    signs = rng.choice([-1, 1], (cout, cin, k, k))
    for name, w in [("full", rng.integers(60, 128, (cout, cin, k, k)) * signs),
                    ("pair-limited", rng.integers(0, 65, (cout, cin, k, k)) * signs)]:
        w = w.astype(np.int8)
        wm = w.transpose(0, 2, 3, 1).reshape(cout, -1).T
        exact_acc = exact_matmul(cols, wm)
        s_y = float(np.abs(exact_acc).max() * s_x * s_w / 120)
        model = qdq_conv(tmp_path / f"conv_{name}.onnx", w, s_x, s_w, s_y, zp_y=128)
        emulated = codes(run_on_emulated_cpu(model, {"x": x}, CPU)[0], s_y)
        exact = requantize(exact_acc, s_x, s_w, s_y, 128)
        if name == "full":
            np.testing.assert_array_equal(emulated, requantize(vpmaddubsw_matmul(cols, wm), s_x, s_w, s_y, 128))
            assert (emulated != exact).mean() > 0.5
        else:
            np.testing.assert_array_equal(emulated, exact)
