"""search-formats on a real small network: the written model is the measured candidate, the
per-layer answer is never costlier than the best uniform one, a goal nothing meets still writes
the most accurate candidate, and bad options name themselves."""

from __future__ import annotations

import numpy as np
import pytest

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.format_metadata import FORMAT_KEY
from qcompiler.ir import to_proto
from qcompiler.op_roles import input_roles
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.uniform import sqnr_db
from qcompiler.runtime import make_session
from tests.helpers import run, small_cnn

HEAD = "infer-shapes,fold-constants"


def _data(n: int = 96, labels: bool = False) -> DataSource:
    x = np.random.default_rng(0).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)
    y = np.argmax(run(small_cnn(), {"input": x})[0], axis=1).astype(np.int64) if labels else None
    return DataSource({"input": x}, y)


def _compile(options: str, data: DataSource | None = None):
    return qcompiler.compile(small_cnn(), "ort-cpu", calibration=data or _data(), pipeline=f"{HEAD},search-formats{{{options}}}", verify=False)


def _stats(result) -> dict:
    return next(p.stats for p in result.report.passes if p.name == "search-formats")


def test_the_written_model_is_the_candidate_measured_and_names_its_formats() -> None:
    data = _data()
    result = _compile("formats=int8|int4|e4m3fn|mxfp4,min-sqnr=18,samples=64,workers=1", data)
    stats = _stats(result)
    assert stats["goal_met"] and stats["sqnr_db"] >= 18
    layers = [n for n in result.model.graph if input_roles(n).weight is not None]
    assert len(stats["layers"]) == len(layers) == 6
    for node in layers:
        producer = node.inputs[input_roles(node).weight].producer()
        assert producer.metadata_props[FORMAT_KEY] == stats["layers"][node.name]
    # Run again on the samples the search measured on: the same SQNR.
    held = data.split(64)[1]
    y = make_session(to_proto(result.model)).run(None, held.arrays)[0]
    assert sqnr_db(run(small_cnn(), held.arrays)[0], y) == pytest.approx(stats["sqnr_db"], abs=1e-3)
    # Uniform candidates (4), activations alone (1), each layer in each format (6 x 4), then the checks.
    assert stats["evaluations"] >= 4 + 1 + 24 + 1
    assert stats["energy_pj"] <= min(u["energy_pj"] for u in stats["uniform"] if u["meets_goal"]) + 1e-6
    assert stats["energy_vs_best_uniform"] >= 1.0 and stats["energy_vs_fp32"] > 1.0
    # The float weights the formats replaced are gone from the written model, not carried along.
    assert all(v.uses() for v in result.model.graph.initializers.values())


def test_a_top1_goal_per_layer_loosens_the_noise_budget_past_the_best_uniform_format() -> None:
    """LeNet-5 on MNIST: int3 everywhere meets a 1-point drop, int2 everywhere does not; layers
    differ in what int2 costs them, so some can go to int2. The budget starts at int3's noise and
    is loosened while the answer still meets the goal, then bisected."""
    import sys
    from pathlib import Path

    from qcompiler.ir import load_model, upgraded_to

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "models"))
    import train_lenet5_mnist as lenet

    if not lenet.MNIST.exists():
        pytest.skip("../shared/data/mnist.npz missing")
    train = lenet.make_npz("train")
    data = DataSource({"input": train["input"][:640]}, train["labels"][:640])
    model, _ = upgraded_to(load_model(root / "models" / "mnist_lenet5.onnx"), 21, "test", "int4")
    result = qcompiler.compile(model, "ort-cpu", calibration=data, verify=False,
                               pipeline=f"{HEAD},search-formats{{formats=int2|int3|int4,granularity=layer,min-sqnr=0,max-drop=1,samples=512,workers=1}}")
    stats = _stats(result)
    steps = stats["budget_steps"]
    assert stats["goal_met"] and stats["best_uniform"] == "int3"
    assert steps[1]["allowed_noise"] > steps[0]["allowed_noise"] and steps[0]["met"], "a budget that meets is loosened"
    assert any(not s["met"] for s in steps) and len(steps) <= 8
    assert "int2" in stats["layers"].values() and stats["energy_vs_best_uniform"] >= 1.2
    assert stats["float_top1"] - stats["top1"] <= 1.0


def test_network_granularity_picks_the_cheapest_format_that_meets_the_goal() -> None:
    stats = _stats(_compile("formats=int8|int4|int2,granularity=network,min-sqnr=15,samples=64"))
    uniform = {u["format"]: u for u in stats["uniform"]}
    meeting = [f for f in ("int2", "int4", "int8") if uniform[f]["meets_goal"]]  # cheapest first
    assert meeting and set(stats["layers"].values()) == {meeting[0]}


def test_a_top1_goal_uses_the_labels() -> None:
    stats = _stats(_compile("formats=int8|int4,granularity=network,min-sqnr=0,max-drop=5,samples=64", _data(labels=True)))
    assert stats["float_top1"] == 100.0 and stats["goal_met"] and stats["float_top1"] - stats["top1"] <= 5


def test_a_goal_nothing_meets_writes_the_most_accurate_candidate_and_says_how_close() -> None:
    result = _compile("formats=int4|int2,min-sqnr=200,samples=64")
    stats = _stats(result)
    assert not stats["goal_met"]
    best = max(stats["uniform"], key=lambda u: u["sqnr_db"])
    assert set(stats["layers"].values()) == {best["format"]} and stats["sqnr_db"] == best["sqnr_db"]
    assert any("no candidate met the goal (200 dB)" in d["message"] for d in result.report.diagnostics)


@pytest.mark.parametrize(("options", "culprit"), [
    ("formats=int8|mxfp5", "unknown number format 'mxfp5'.*valid formats"),
    ("activations=int3", "option 'activations' must be one of"),
    ("min-sqnr=0", "give a goal"),
])
def test_bad_options_name_themselves(options: str, culprit: str) -> None:
    with pytest.raises(QCError, match=culprit):
        parse_pipeline(f"search-formats{{{options}}}")


def test_max_drop_without_labels_says_what_to_give() -> None:
    with pytest.raises(QCError, match="max-drop needs labels"):
        _compile("formats=int8,max-drop=1,min-sqnr=0")


def test_two_worker_processes_measure_exactly_what_one_process_does() -> None:
    data = _data()
    one = _stats(_compile("formats=int8|int4|mxfp4,min-sqnr=18,samples=64,workers=1", data))
    two = _stats(_compile("formats=int8|int4|mxfp4,min-sqnr=18,samples=64,workers=2", data))
    assert two["workers"] == 2 and two["failed_evaluations"] == 0
    for key in ("layers", "uniform", "sqnr_db", "energy_pj", "evaluations"):
        assert one[key] == two[key], key


def test_ray_actors_measure_exactly_what_worker_processes_do() -> None:
    """The same evaluation on a local Ray with 2 CPUs (skipped where Ray is not installed)."""
    pytest.importorskip("ray")
    data = _data()
    local = _stats(_compile("formats=int8|int4,granularity=network,min-sqnr=18,samples=64,workers=2", data))
    on_ray = _stats(_compile("formats=int8|int4,granularity=network,min-sqnr=18,samples=64,workers=2,executor=ray", data))
    assert on_ray["executor"] == "ray" and on_ray["failed_evaluations"] == 0
    for key in ("layers", "uniform", "sqnr_db", "energy_pj", "evaluations"):
        assert local[key] == on_ray[key], key


def test_without_ray_the_ray_executor_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(QCError, match=r"executor=ray needs Ray: pip install 'qcompiler\[ray\]'"):
        _compile("formats=int8|int4,granularity=network,min-sqnr=18,samples=64,workers=2,executor=ray")


def test_the_time_objective_ranks_by_iso_area_mac_time() -> None:
    from qcompiler.energy_model import load_energy_table
    from qcompiler.format_search import FP32, layer_time, weight_layers
    from qcompiler.quant.formats import parse_format

    stats = _stats(_compile("formats=int8|e4m3fn|fp16,granularity=network,objective=time,min-sqnr=15,samples=64,workers=1"))
    table, uint8 = load_energy_table("horowitz-45nm"), parse_format("uint8")
    shaped = qcompiler.compile(small_cnn(), "ort-cpu", pipeline="infer-shapes", verify=False).model
    layers = weight_layers(shaped)
    times = {u["format"]: u["cost"] for u in stats["uniform"]}
    for name, t in times.items():
        assert t == pytest.approx(sum(layer_time(layer, parse_format(name), uint8, table) for layer in layers), abs=0.06)
    assert stats["objective"] == "time" and stats["fp32_cost"] == pytest.approx(sum(layer.macs for layer in layers), abs=0.06)
    meeting = [u for u in stats["uniform"] if u["meets_goal"]]
    assert stats["best_uniform"] == min(meeting, key=lambda u: u["cost"])["format"]
    assert layer_time(layers[0], FP32, FP32, table) == layers[0].macs
