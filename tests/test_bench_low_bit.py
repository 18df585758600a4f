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


def test_average_bits_of_full_range_codes_and_a_negated_channel(tmp_path: Path) -> None:
    """[-2, 1] is two bits, and so is a channel fold-batchnorm negated to [-1, 2]."""
    import onnx

    bench = _bench()
    target = tmp_path / "full.toml"
    target.write_text('extends = "ort-cpu"\n[weights]\nlow_bit_range = "full"\n')
    calib = DataSource({"input": np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})
    pipeline = "infer-shapes,fold-constants,adaround{bits=2,iterations=0,weight-range=mse},calibrate,insert-qdq"
    model = qcompiler.compile(small_cnn(), str(target), calibration=calib, pipeline=pipeline, verify=False).model
    save_model(model, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    codes = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert min(int(onnx.numpy_helper.to_array(t).min()) for t in codes) == -2
    assert bench.stored_weight_bytes(tmp_path / "m.onnx")[1] == 2.0
    q = onnx.numpy_helper.to_array(codes[0]).copy()
    q[0] = -q[0]
    codes[0].CopyFrom(onnx.numpy_helper.from_array(q, codes[0].name))
    onnx.save(proto, str(tmp_path / "negated.onnx"))
    assert bench.stored_weight_bytes(tmp_path / "negated.onnx")[1] == 2.0
