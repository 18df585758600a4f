"""No command writes over one of its own inputs: an output path that is an input (through a
symlink too) is one line naming the option, exit 2, and the input unchanged."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qcompiler.ir import save_model
from tests.helpers import small_cnn

QC = [sys.executable, "-c", "from qcompiler.cli import main; main()"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    save_model(small_cnn(), model)
    np.savez(data, input=np.random.default_rng(0).normal(0, 1, (8, 3, 8, 8)).astype(np.float32))
    link = tmp_path / "link.json"
    link.symlink_to(model)
    return {"model": model, "data": data, "link": link}


@pytest.mark.parametrize(("argv", "victim", "option"), [
    (["verify", "{model}", "{model}", "--data", "{data}", "--json", "{model}"], "model", "--json"),
    (["verify", "{model}", "{model}", "--data", "{data}", "--json", "{data}"], "data", "--json"),
    (["verify", "{model}", "{model}", "--data", "{data}", "--json", "{link}"], "model", "--json"),
    (["validate", "{model}", "--json", "{model}"], "model", "--json"),
    (["validate", "{model}", "--json", "{link}"], "model", "--json"),
    (["cost", "{model}", "--json", "{model}"], "model", "--json"),
    (["pack", "{model}", "-o", "{model}", "--force"], "model", "--output"),
])
def test_an_output_that_is_an_input_is_refused(files: dict[str, Path], argv: list[str], victim: str, option: str) -> None:
    before = {name: _digest(path) for name, path in files.items() if name != "link"}
    done = subprocess.run([*QC, *(a.format(**files) for a in argv)], capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "is an input of this command" in done.stderr and option in done.stderr and "Traceback" not in done.stderr
    assert {name: _digest(path) for name, path in files.items() if name != "link"} == before


def test_unpack_refuses_to_write_over_its_qcz(tmp_path: Path) -> None:
    qcz = tmp_path / "m.qcz"
    qcz.write_bytes(b"anything")
    done = subprocess.run([*QC, "unpack", str(qcz), "-o", str(qcz), "--force"], capture_output=True, text=True)
    assert done.returncode == 2 and "is an input of this command" in done.stderr
    assert qcz.read_bytes() == b"anything"


def test_target_measure_refuses_to_write_over_its_target_file(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('name = "mine"\nextends = "ort-cpu"\n')
    before = toml.read_bytes()
    done = subprocess.run([*QC, "target", "measure", str(toml), "-o", str(toml), "--force", "--runs", "10"], capture_output=True, text=True)
    assert done.returncode == 2 and "is an input of this command" in done.stderr and "--output" in done.stderr
    assert toml.read_bytes() == before


def test_a_dump_folder_holding_an_input_named_like_a_dump_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    # The passes are dumped as NN-<pass>.onnx: an input of that name in the folder would be replaced.
    model = tmp_path / "01-infer-shapes.onnx"
    model.write_bytes(files["model"].read_bytes())
    before = _digest(model)
    done = subprocess.run([*QC, "compile", str(model), "--calib", str(files["data"]), "-o", str(tmp_path / "out"), "--dump-dir", str(tmp_path), "--latency-runs", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--dump-dir" in done.stderr and "named like a dump" in done.stderr and done.stderr.count("\n") == 1
    assert _digest(model) == before and not (tmp_path / "out").exists()
