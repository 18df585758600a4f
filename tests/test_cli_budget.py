"""``qc compile --budget``: the target's mixed-precision pipeline with nothing else to type, and one
line naming ``--budget`` for every way to get it wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompiler.passes.assign_precision import budget_pipeline
from qcompiler.quant.pair_limit import max_pair_sum
from qcompiler.targets.spec import load_target
from tests.test_cli_errors import BUNDLED_CALIB, BUNDLED_MODEL, compile_error, qc

pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.exists() or not BUNDLED_CALIB.exists(), reason="bundled model or calibration data missing")


def test_budget_compiles_mixed_widths_within_the_size_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = qc("compile", BUNDLED_MODEL, "--calib", BUNDLED_CALIB, "-o", out, "--budget", "size=0.6", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [step.split("{")[0] for step in load_target("ort-cpu").mixed_pipeline.split(",")]
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "assign-precision")
    budget = stats["budget"]
    assert (budget["kind"], budget["value"]) == ("size", 0.6) and budget["limit"] == pytest.approx(0.6 * budget["full_width"])
    assert budget["used"] <= budget["limit"]
    widths = {layer["bits"] for layer in stats["layers"].values()}
    assert len(widths) > 1 and widths <= set(load_target("ort-cpu").bits.allowed), widths
    # The model written holds those widths: each weight's integers stay within its b-bit range,
    # and the widest reaches it (every width is stored in int8 on ort-cpu). On the CPU compiled
    # for (this one) without VNNI, a width whose two largest codes could overflow the kernels'
    # int16 pair sums (8 bits) is pair-safe instead: no two same-sign weights of a channel sum
    # above the limit, and each layer still reaches at least half of it, beyond a 7-bit range.
    limit = load_target("ort-cpu", cpu=report["machine"]["isa"]).weights.pair_sum_limit
    model = onnx.load(out / "model.onnx")
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    reach = {}
    for layer in stats["layers"].values():
        dequantize = producer[nodes[layer["node"]].input[1]]
        q = initializers[dequantize.input[0]].astype(np.int64)
        qmax = 2 ** (layer["bits"] - 1) - 1
        assert np.abs(q).max() <= qmax, layer
        if limit is not None and 2 * qmax > limit:
            axis = next((a.i for a in dequantize.attribute if a.name == "axis"), 1)  # the output channels
            assert max_pair_sum(q, axis) <= limit, layer
        reach[layer["bits"]] = max(reach.get(layer["bits"], 0), int(np.abs(q).max()))
    widest = max(reach)
    if limit is not None and 2 * (2 ** (widest - 1) - 1) > limit:
        assert -(-limit // 2) <= reach[widest] <= 2 ** (widest - 1) - 1, reach
    else:
        assert reach[widest] == 2 ** (widest - 1) - 1, reach


def test_budget_fills_in_the_target_mixed_pipeline() -> None:
    text = budget_pipeline(load_target("ort-cpu"), "bits=4.5")
    assert text == "infer-shapes,fold-constants,fold-batchnorm,hessian-trace,assign-precision{budget=bits=4.5},calibrate{method=mse},insert-qdq,quantize-embeddings,quantize-recurrent-weights"


def test_budget_with_pipeline_is_refused(tmp_path: Path) -> None:
    compile_error(tmp_path, BUNDLED_MODEL, "--budget", "size=0.6", "--pipeline", "infer-shapes,calibrate,insert-qdq", culprits=("--budget", "--pipeline"))


def test_budget_on_a_target_without_mixed_pipeline_names_it(tmp_path: Path) -> None:
    compile_error(tmp_path, BUNDLED_MODEL, "--budget", "size=0.6", "--target", "tensorrt-fp8", culprits=("--budget", "tensorrt-fp8", "mixed_pipeline"))


def test_budget_on_a_user_target_without_mixed_pipeline(tmp_path: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text('extends = "ort-cpu"\nname = "mine"\nmixed_pipeline = ""\n')
    compile_error(tmp_path, BUNDLED_MODEL, "--budget", "size=0.6", "--target", target, culprits=("--budget", "'mine'"))


@pytest.mark.parametrize("budget", ["speed=2", "0.6", "size=abc", "size=0", "bits=-4", "size=inf", "size"])
def test_malformed_budget_names_the_option_and_lists_the_forms(tmp_path: Path, budget: str) -> None:
    compile_error(tmp_path, BUNDLED_MODEL, "--budget", budget, culprits=("--budget", "size=", "bits=", "bops=", "latency="))
