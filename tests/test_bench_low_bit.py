"""bench/low_bit.py's measurements: the stored weight bytes and the value width it reports are
what the written graph holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import qcompiler
from qcompiler.data import DataSource
from qcompiler.ir import save_model
from tests.helpers import load_script, small_cnn

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script("bench/low_bit.py")


def test_stored_weight_bytes_count_codes_scales_and_zero_points(tmp_path: Path) -> None:
    bench = _bench()
    calib = DataSource({"input": np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})
    pipeline = "infer-shapes,fold-constants,adaround{bits=4,iterations=0},calibrate,insert-qdq"
    model = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, pipeline=pipeline, verify=False).model
    save_model(model, tmp_path / "m.onnx")
    total, bits = bench.stored_weight_bytes(tmp_path / "m.onnx")
    shapes = [(4, 3, 3, 3), (4, 4, 1, 1), (4, 4, 3, 3), (6, 8, 1, 1), (6, 6, 3, 3), (5, 6)]
    codes = sum(int(np.prod(s)) for s in shapes)  # int8 codes, one byte each
    channels = sum(s[0] for s in shapes)  # one float32 scale and one int8 zero point per channel
    assert total == codes + channels * (4 + 1)
    assert bits == 4.0
