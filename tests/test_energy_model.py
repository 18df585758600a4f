"""The energy model: its scaling rules on the table's own figures, per-layer costs of float and
quantized models, user tables, and `qc cost`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler.data import DataSource
from qcompiler.energy_model import layer_energies, load_energy_table, totals
from qcompiler.errors import QCError
from qcompiler.ir import load_model
from qcompiler.quant.formats import parse_format
from tests.helpers import assert_matches_schema, small_cnn

REPO = Path(__file__).resolve().parent.parent
LENET = REPO / "models" / "mnist_lenet5.onnx"
QC = [sys.executable, "-c", "from qcompiler.cli import main; main()"]


@pytest.fixture(scope="module")
def table():
    return load_energy_table("horowitz-45nm")


def test_the_scaling_rules_reproduce_the_table_where_it_has_a_figure(table) -> None:
    f = parse_format
    assert table.multiply_pj(f("int8"), f("uint8")) == pytest.approx(0.2)
    assert table.multiply_pj(f("fp16"), f("fp16")) == pytest.approx(1.1)
    assert table.multiply_pj(f("fp32"), f("fp32")) == pytest.approx(3.7)
    assert table.multiply_pj(f("int<32>"), f("int<32>")) == pytest.approx(3.2)  # the table says 3.1: within 4 %
    assert table.mac_pj(f("int8"), f("uint8")) == pytest.approx(0.3)  # int8 multiply + int32 add
    assert table.mac_pj(f("fp32"), f("fp32")) == pytest.approx(4.6)
    assert table.mac_pj(f("int4"), f("uint8")) == pytest.approx(0.2 * 32 / 64 + 0.1)
    # A narrower float costs less than fp16 and more than int8 (it still accumulates in fp32).
    assert table.mac_pj(f("int8"), f("uint8")) < table.mac_pj(f("e4m3fn"), f("e4m3fn")) < table.mac_pj(f("fp16"), f("fp16"))
    # MX: the element product plus the E8M0 scale's exponent add shared by a block of 32.
    assert table.mac_pj(f("mxfp4"), f("mxfp4")) == pytest.approx(table.mac_pj(f("e2m1"), f("e2m1")) + 2 * 0.03 / 32)


def test_a_float_model_costs_what_fp32_costs_and_its_macs_are_lenets(table) -> None:
    rows = layer_energies(load_model(LENET), table)
    assert [r.weight_format for r in rows] == ["fp32"] * len(rows)
    total = totals(rows)
    # Caffe's LeNet-5 (28x28 MNIST): conv 5x5 1->20 on 24x24, conv 5x5 20->50 on 8x8, 800x500, 500x10.
    assert total.macs == 24 * 24 * 20 * 25 + 8 * 8 * 50 * 500 + 800 * 500 + 500 * 10
    assert total.compute_pj == pytest.approx(total.fp32_compute_pj) and total.iso_area_speedup == pytest.approx(1.0)


def test_a_quantized_model_reads_its_formats_and_costs_less(table) -> None:
    calib = DataSource({"input": np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})
    model = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, pipeline="infer-shapes,fold-constants,adaround{bits=2,iterations=0},calibrate,insert-qdq", verify=False).model
    rows = layer_energies(model, table)
    assert {r.weight_format for r in rows} == {"int2"} and {r.activation_format for r in rows} == {"uint8"}
    for r in rows:
        assert r.compute_pj == pytest.approx(r.macs * (0.2 * 16 / 64 + 0.1))
        # 2-bit weights read from DRAM: a sixteenth of the fp32 weight traffic.
        weights = r.weight_bits * 1950 / 64
        fp32_weights = r.weight_bits * 16 * 1950 / 64
        assert r.memory_pj - weights == pytest.approx(r.activation_bits * 10 / 64)
        assert r.fp32_memory_pj > fp32_weights
    total = totals(rows)
    assert total.fp32_total_pj / total.total_pj > 10 and total.iso_area_speedup == pytest.approx(4.6 / (0.2 * 16 / 64 + 0.1))


def test_emulated_formats_are_counted_with_their_widths(table) -> None:
    """Weights the search lowers as int32 codes behind a Max (fp16, minifloats), or as a float32
    Mul where int32 cannot hold them, count at their format's width like native ones."""
    from qcompiler.format_search import FormatEvaluator

    calib = DataSource({"input": np.random.default_rng(0).normal(0, 1, (16, 3, 8, 8)).astype(np.float32)})
    model = qcompiler.compile(small_cnn(), "ort-cpu", calibration=calib, pipeline="infer-shapes,fold-constants", verify=False).model
    evaluator = FormatEvaluator(model, calib, parse_format("uint8"), model.graph.outputs[0].name)
    names = (["fp16", "float<3,2>", "int4"] * 3)[: len(evaluator.layers)]
    built = evaluator.build({layer.weight: parse_format(name) for layer, name in zip(evaluator.layers, names)})
    rows = layer_energies(built, table)
    assert [r.weight_format for r in rows] == names and len(names) >= 3
    for r, layer, name in zip(rows, evaluator.layers, names):
        assert r.weight_bits == layer.params * parse_format(name).bits


def _table_file(tmp_path: Path, dram: str = "{ pj = 3900.0, source = \"my DRAM\" }") -> Path:
    text = (REPO / "targets" / "energy" / "horowitz-45nm.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(text.replace('dram = { pj = 1950.0, source = "Horowitz ISSCC 2014: 1.3-2.6 nJ per 64-bit DRAM access; the midpoint" }', f"dram = {dram}"))
    return path


def test_a_user_table_replaces_the_figures(tmp_path: Path, table) -> None:
    mine = load_energy_table(str(_table_file(tmp_path)))
    model = load_model(LENET)
    ours, theirs = totals(layer_energies(model, table)), totals(layer_energies(model, mine))
    assert theirs.compute_pj == ours.compute_pj and theirs.memory_pj > 1.9 * ours.memory_pj
    assert any("my DRAM" in line for line in mine.assumptions())


@pytest.mark.parametrize(("dram", "culprit"), [("{ pj = 10.0 }", "every figure needs its source"), ("{ pj = -1.0, source = \"x\" }", "finite energy >= 0"), ("12", "expected { pj = NUMBER")])
def test_a_bad_user_table_names_the_figure(tmp_path: Path, dram: str, culprit: str) -> None:
    with pytest.raises(QCError, match=culprit) as error:
        load_energy_table(str(_table_file(tmp_path, dram)))
    assert "memory.dram" in str(error.value)


def test_qc_cost_prints_totals_and_assumptions_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    done = subprocess.run([*QC, "cost", str(LENET), "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "against the same layers in fp32" in done.stdout and "Horowitz" in done.stdout and "iso-area" in done.stdout
    payload = json.loads(out.read_text())
    assert len(payload["layers"]) == 4 and payload["totals"]["macs"] == 2_293_000 and payload["energy_table"] == "horowitz-45nm"
    assert_matches_schema(payload, "cost")


def test_qc_cost_refuses_to_write_its_json_over_the_model(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(LENET.read_bytes())
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    done = subprocess.run([*QC, "cost", str(model), "--json", str(model)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "is an input of this command" in done.stderr and "Traceback" not in done.stderr
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
