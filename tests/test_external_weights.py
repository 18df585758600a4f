"""Models whose weights stay in their files (over 2 GB): the same compile, one tensor in memory at a time.

The path is taken for models above `qcompiler.ir.EXTERNAL_DATA_THRESHOLD`; these tests lower the
threshold to zero so a small generated model takes it, and compare with the in-memory path.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

import qcompiler
from qcompiler.cli import app
from qcompiler.data import DataSource, InputSpec
from qcompiler.external_weights import EXTERNAL_DIR_KEY, FileBackedTensor, folder_of
from qcompiler.ir import copy_model, from_proto, load_model, to_proto
from qcompiler.runtime import make_session
from qcompiler.verify import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from large_model import generate  # noqa: E402


@pytest.fixture()
def mlp(tmp_path: Path) -> tuple[Path, Path]:
    return generate(tmp_path / "in", width=64, layers=3, samples=40)


@pytest.fixture()
def in_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qcompiler.ir.EXTERNAL_DATA_THRESHOLD", 0)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_weights_are_read_on_use_and_not_kept(mlp, in_files) -> None:
    model = load_model(mlp[0])
    tensor = model.graph.initializers["w0"].const_value
    assert isinstance(tensor, FileBackedTensor)
    reference = onnx.numpy_helper.to_array(onnx.load(str(mlp[0])).graph.initializer[0])
    np.testing.assert_array_equal(tensor.numpy(), reference)
    assert tensor.numpy() is not tensor.numpy()  # read again each time, nothing cached
    assert tensor.raw is None  # never memory-mapped
    assert tensor.tobytes() == reference.astype("<f4").tobytes()


def test_protos_carry_the_folder_and_sessions_find_the_weights(mlp, in_files) -> None:
    model = load_model(mlp[0])
    proto = to_proto(model)
    assert folder_of(proto) == str(mlp[0].parent.resolve())
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer if t.name.startswith("w"))
    x = np.load(mlp[1])["x"][:4]
    float_run = make_session(onnx.load(str(mlp[0])), optimize=False).run(None, {"x": x})[0]
    np.testing.assert_array_equal(make_session(proto, optimize=False, prepack=False).run(None, {"x": x})[0], float_run)
    again = from_proto(proto)
    assert EXTERNAL_DIR_KEY not in again.metadata_props  # the mark never reaches a model
    assert isinstance(again.graph.initializers["w1"].const_value, FileBackedTensor)
    clone = copy_model(model)
    assert clone.graph.initializers["w1"].const_value is model.graph.initializers["w1"].const_value


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cpu-int4"])
def test_compile_kept_in_files_matches_the_in_memory_compile(mlp, in_files, target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_path, calib = mlp
    before = _digest(model_path.parent)
    out = tmp_path / f"out-{target}"
    result = qcompiler.compile(model_path, target, calib, output_dir=out, latency_runs=0)
    assert _digest(model_path.parent) == before  # the input folder is only read
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "report.json"]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(p.key == EXTERNAL_DIR_KEY for p in proto.metadata_props)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # nothing points back at the input's folder
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    # The returned model reads its weights from the output folder (the temporary one was renamed).
    for value in result.model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            assert Path(value.const_value.base_dir) == out.resolve()
            value.const_value.numpy()
    kept = result.report.verification
    monkeypatch.setattr("qcompiler.ir.EXTERNAL_DATA_THRESHOLD", 1 << 40)
    in_memory = qcompiler.compile(model_path, target, calib, latency_runs=0).report.verification
    # Same compile, same numbers: the sessions differ only in where the weights come from.
    assert kept.outputs[0].sqnr_db == pytest.approx(in_memory.outputs[0].sqnr_db, abs=1e-6)
    assert kept.outputs[0].sqnr_db_simulated == pytest.approx(in_memory.outputs[0].sqnr_db_simulated, abs=1e-6)
    assert [l.tensor for l in kept.layers] == [l.tensor for l in in_memory.layers]
    assert kept.size.quantized_weight_bytes == in_memory.size.quantized_weight_bytes


def test_verify_one_session_at_a_time_gives_the_same_report(mlp, in_files, tmp_path: Path) -> None:
    model_path, calib = mlp
    out = tmp_path / "out"
    qcompiler.compile(model_path, "ort-cpu", calib, output_dir=out, latency_runs=0)
    float_proto = to_proto(load_model(model_path))
    data = DataSource.from_npz(calib, InputSpec.of_proto(float_proto))
    apart = verify(float_proto, out / "model.onnx", data, latency_runs=2)
    together = verify(onnx.load(str(model_path)), out / "model.onnx", data, latency_runs=0)
    assert apart.outputs[0].sqnr_db == pytest.approx(together.outputs[0].sqnr_db, abs=1e-6)
    assert apart.outputs[0].sqnr_db_simulated == pytest.approx(together.outputs[0].sqnr_db_simulated, abs=1e-6)
    assert apart.latency is not None and apart.latency.float_ms > 0 and apart.latency.quantized_ms > 0
    together_layers = {l.tensor: l.sqnr_db for l in together.layers}
    assert {l.tensor for l in apart.layers} == set(together_layers)


def test_cli_compiles_a_model_kept_in_files(mlp, in_files, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["compile", str(mlp[0]), "--target", "ort-cpu", "--calib", str(mlp[1]), "-o", str(out), "--latency-runs", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["outputs"][0]["sqnr_db"] > 20
