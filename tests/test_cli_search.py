"""`qc search`: the candidates' table, the chosen model written, exit 1 when no candidate meets the goal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from qcompiler.ir import save_model
from tests.helpers import small_cnn

QC = [sys.executable, "-c", "from qcompiler.cli import main; main()"]


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    model, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    save_model(small_cnn(), model)
    np.savez(calib, input=np.random.default_rng(0).normal(0, 1, (64, 3, 8, 8)).astype(np.float32))
    return model, calib


def test_qc_search_prints_the_candidates_and_writes_the_choice(tmp_path: Path) -> None:
    model, calib = _inputs(tmp_path)
    done = subprocess.run([*QC, "search", str(model), "--calib", str(calib), "--formats", "int8|int4", "--min-sqnr", "15", "--samples", "32",
                           "--workers", "1", "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "int8 everywhere" in done.stdout and "chosen (layer)" in done.stdout and "less than fp32" in done.stdout
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "report.json").is_file()


def test_qc_search_exits_1_with_the_most_accurate_candidate_when_nothing_meets_the_goal(tmp_path: Path) -> None:
    model, calib = _inputs(tmp_path)
    done = subprocess.run([*QC, "search", str(model), "--calib", str(calib), "--formats", "int2|int4", "--min-sqnr", "300", "--samples", "32",
                           "--workers", "1", "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 1 and "no candidate met the goal" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_qc_search_with_an_unknown_format_lists_the_valid_ones(tmp_path: Path) -> None:
    model, calib = _inputs(tmp_path)
    done = subprocess.run([*QC, "search", str(model), "--calib", str(calib), "--formats", "int8|mxfp5", "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "mxfp5" in done.stderr and "valid formats" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
