"""IR glue: external data in and out, refusal of data outside the model's folder, atomic output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler.ir as qir
from qcompiler.errors import QCError
from qcompiler.ir import atomic_output_dir, load_model, model_bytes_on_disk, save_model, to_proto
from tests.helpers import make_model, run, tensor_info


def _model_with_weight():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (64, 32)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor_info("x", [None, 64])], [tensor_info("y", [None, 32])], {"w": w})


def _save_external(folder: Path, location: str = "weights.bin") -> Path:
    proto = to_proto(_model_with_weight())
    path = folder / "model.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def test_external_data_next_to_the_model_loads(tmp_path: Path) -> None:
    path = _save_external(tmp_path)
    model = load_model(path)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], run(_model_with_weight(), {"x": x})[0])


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _save_external(tmp_path, location="weights.bin")
    moved = inner / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save_model(proto, str(moved))
    with pytest.raises(QCError) as info:
        load_model(moved)
    assert str(moved) in str(info.value)


def test_large_models_are_saved_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real >2 GB model would take minutes; lower the threshold so the same code path runs.
    monkeypatch.setattr(qir, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = _model_with_weight()
    out = tmp_path / "out.onnx"
    save_model(model, out)
    assert (tmp_path / "out.onnx.data").exists()
    assert out.stat().st_size < 1000 and model_bytes_on_disk(out) > 64 * 32 * 4
    monkeypatch.undo()
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(run(load_model(out), {"x": x})[0], run(_model_with_weight(), {"x": x})[0])


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dest) as tmp:
            (tmp / "model.onnx").write_text("partial")
            raise RuntimeError("boom")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(dest) as tmp:
        (tmp / "model.onnx").write_text("done")
    assert (dest / "model.onnx").read_text() == "done" and len(list(tmp_path.iterdir())) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's 0700
