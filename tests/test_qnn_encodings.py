"""The qnn target writes encodings.json beside its QDQ model, in AIMET's layout, and the numbers in
it are the ones onnxruntime runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler.errors import QCError
from qcompiler.ir import load_model
from qcompiler.targets.spec import load_target
from tests.helpers import small_cnn


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qnn") / "calib.npz"
    np.savez(path, input=np.random.default_rng(2).normal(0, 1, (32, 3, 8, 8)).astype(np.float32))
    return path


def _const(value) -> np.ndarray:
    return value.const_value.numpy()


def test_encodings_match_the_qdq_model(tmp_path: Path, calib: Path) -> None:
    result = qcompiler.compile(small_cnn(), "qnn", calibration=calib, output_dir=tmp_path / "out", verify=False)
    assert result.report.artifacts == [str(tmp_path / "out" / "encodings.json")]
    enc = json.loads((tmp_path / "out" / "encodings.json").read_text())
    model = load_model(tmp_path / "out" / "model.onnx")
    quantizers = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert quantizers and {q.inputs[0].name for q in quantizers} <= set(enc["activation_encodings"])
    for q in quantizers:
        (entry,) = enc["activation_encodings"][q.inputs[0].name]
        scale, zp = float(_const(q.inputs[1])), int(_const(q.inputs[2]))
        assert entry["bitwidth"] == 8 and entry["is_symmetric"] == "False"
        assert entry["offset"] == -zp and entry["scale"] == pytest.approx(scale, rel=1e-7)
        assert entry["min"] == pytest.approx(-zp * scale) and entry["max"] == pytest.approx((255 - zp) * scale)
    for conv in (n for n in model.graph if n.op_type == "Conv"):
        dq = conv.inputs[1].producer()
        entries = enc["param_encodings"][dq.metadata_props["qc.source"]]
        scales = _const(dq.inputs[1])
        assert len(entries) == conv.inputs[1].shape[0] == scales.size  # one per output channel
        assert all(e["offset"] == -128 and e["is_symmetric"] == "True" and e["bitwidth"] == 8 for e in entries)
        assert [e["scale"] for e in entries] == pytest.approx(scales.tolist(), rel=1e-7)
        bias = enc["param_encodings"][conv.inputs[2].producer().metadata_props["qc.source"]]
        assert all(e["bitwidth"] == 32 for e in bias)


def test_w8a16_variant_writes_16_bit_activations(tmp_path: Path, calib: Path) -> None:
    target = tmp_path / "w8a16.toml"
    target.write_text('extends = "qnn"\nname = "qnn-w8a16"\nmin_opset = 21\n[activations]\ndtype = "uint16"\n[bits]\nactivations = [16]\n')
    out8 = qcompiler.compile(small_cnn(), "qnn", calibration=calib, verify_data=calib, latency_runs=0)
    out16 = qcompiler.compile(small_cnn(), str(target), calibration=calib, output_dir=tmp_path / "out", verify_data=calib, latency_runs=0)
    enc = json.loads((tmp_path / "out" / "encodings.json").read_text())
    assert {e[0]["bitwidth"] for e in enc["activation_encodings"].values()} == {16}
    # 256x finer activation steps: the output error falls well below the uint8 model's.
    assert out16.report.verification.outputs[0].sqnr_db > out8.report.verification.outputs[0].sqnr_db + 10


def test_unknown_artifact_names_the_key(tmp_path: Path) -> None:
    target = tmp_path / "t.toml"
    target.write_text('extends = "qnn"\nemit = ["trt-engine"]\n')
    with pytest.raises(QCError) as info:
        load_target(str(target))
    assert info.value.file == f"{target}:emit" and "qnn-encodings" in info.value.message


def test_one_bit_weights_are_refused_for_qnn_encodings(tmp_path: Path) -> None:
    target = tmp_path / "t.toml"
    target.write_text('extends = "qnn"\n[bits]\nallowed = [1, 8]\n')
    with pytest.raises(QCError) as info:
        load_target(str(target))
    assert info.value.file == f"{target}:bits.allowed"
