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


def test_qc_search_runs_each_strategy_on_a_format_grid(tmp_path: Path) -> None:
    model, calib = _inputs(tmp_path)
    curve = tmp_path / "curve.json"
    curve.write_text('{"kind": "hill-r2-exponential", "intercept": 0.5, "slope": -1.5, "fitted_on": ["test"], "points": 3}')
    chosen = {}
    for strategy in ("exhaustive", "binary", "halving", "predictor"):
        done = subprocess.run([*QC, "search", str(model), "--calib", str(calib), "--formats", "int<2..8>|float<2..4,1..3>", "--granularity", "network",
                               "--strategy", strategy, "--predictor", str(curve), "--min-sqnr", "20", "--samples", "48", "--workers", "1",
                               "-o", str(tmp_path / strategy)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"({strategy}:" in done.stdout and "of 16)" in done.stdout
        chosen[strategy] = [line for line in done.stdout.splitlines() if "chosen (network)" in line][0].split(":")[1].split()[0]
    assert len(set(chosen.values())) == 1, chosen


def test_qc_search_with_a_bad_predictor_file_names_it(tmp_path: Path) -> None:
    model, calib = _inputs(tmp_path)
    bad = tmp_path / "curve.json"
    bad.write_text("{not json")
    done = subprocess.run([*QC, "search", str(model), "--calib", str(calib), "--formats", "int8|int4", "--granularity", "network", "--strategy", "predictor",
                           "--predictor", str(bad), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "curve.json" in done.stderr and "cannot read the accuracy predictor" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    done = subprocess.run([*QC, "search", str(model), "--calib", str(calib), "--strategy", "guess", "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "strategy" in done.stderr and "Traceback" not in done.stderr
