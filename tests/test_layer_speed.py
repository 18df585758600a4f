"""The per-layer speed check: weight layers slower quantized than in float (with the boundary a
float layer pays) stay float, with the evidence in the report. Decisions are tested on injected
timings; the real timing runs once, end to end, with no assertion on what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import qcompiler
from qcompiler import layer_speed
from qcompiler.cpu import CpuInfo, detect_cpu
from qcompiler.data import DataSource
from qcompiler.latency_table import Layer, model_layers
from qcompiler.layer_speed import LayerTiming, cache_key, cpu_label, decide, skip_reason, timed_layer
from qcompiler.targets.spec import SpeedRules, load_target
from tests.helpers import small_cnn

RULES = SpeedRules(keep_slower_float=True, min_slowdown=1.15, min_difference_ms=0.005)
WEIGHT_LAYERS = ["conv0", "conv_a", "conv_b", "conv_c", "conv_d", "fc"]


def timing(float_ms: float, quantized_ms: float, *, low: float | None = None, runs_as: str = "float") -> LayerTiming:
    ratio = quantized_ms / float_ms
    return LayerTiming(float_ms, quantized_ms, ratio, ratio if low is None else low, runs_as)


# -- the decision -----------------------------------------------------------------------------


def test_slower_quantized_layer_is_left_float_with_the_evidence() -> None:
    keep, note = decide(timing(0.15, 0.21), RULES, "AMD EPYC (avx512-vnni)")
    assert keep
    assert note == "left float: int8 kernel 1.40x slower than float on AMD EPYC (avx512-vnni), measured 0.210 vs 0.150 ms (float with its DequantizeLinear/QuantizeLinear)"


@pytest.mark.parametrize(
    ("t", "why"),
    [
        (timing(0.15, 0.165), "10 % slower: inside the ratio margin"),
        (timing(0.002, 0.004), "2x slower but 2 us: inside the time margin"),
        (timing(0.15, 0.21, low=0.95), "slower in the median cycle but not in most cycles"),
        (timing(0.15, 0.05), "faster quantized"),
    ],
)
def test_layer_stays_quantized_inside_the_margins(t: LayerTiming, why: str) -> None:
    keep, note = decide(t, RULES, "cpu")
    assert not keep, why
    assert note.startswith("quantized:") and f"{t.quantized_ms:.3f} vs {t.float_ms:.3f} ms" in note


def test_layer_onnxruntime_would_quantize_itself_stays_quantized() -> None:
    """onnxruntime turns a float Conv between DequantizeLinear and QuantizeLinear into its own
    per-tensor QLinearConv: leaving it 'float' would only coarsen its weights."""
    keep, note = decide(timing(0.10, 0.30, runs_as="QLinearConv"), RULES, "cpu")
    assert not keep and "QLinearConv" in note and "not on offer" in note


# -- the cache --------------------------------------------------------------------------------


def _layer() -> Layer:
    return model_layers(small_cnn())[2]


def _counting(result: LayerTiming) -> tuple[list[Layer], layer_speed.Measure]:
    calls: list[Layer] = []

    def measure(layer: Layer, target, width: int) -> LayerTiming:
        calls.append(layer)
        return result

    return calls, measure


def test_second_lookup_is_a_cache_hit(tmp_path: Path) -> None:
    target = load_target("ort-cpu")
    calls, measure = _counting(timing(0.1, 0.2))
    first = timed_layer(_layer(), target, 8, "int8", measure=measure, directory=tmp_path)
    second = timed_layer(_layer(), target, 8, "int8", measure=measure, directory=tmp_path)
    assert len(calls) == 1 and not first.cached and second.cached
    assert (second.float_ms, second.quantized_ms, second.slowdown) == (first.float_ms, first.quantized_ms, first.slowdown)
    refreshed = timed_layer(_layer(), target, 8, "int8", measure=measure, directory=tmp_path, refresh=True)
    assert len(calls) == 2 and not refreshed.cached


def test_cache_lives_under_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls, measure = _counting(timing(0.1, 0.2))
    timed_layer(_layer(), load_target("ort-cpu"), 8, "int8", measure=measure)
    assert len(list((tmp_path / "qcompiler" / "layer-speed").glob("*.json"))) == 1


@pytest.mark.parametrize("change", ["weight dtype", "onnxruntime", "cpu", "flags", "threads", "shape", "attribute", "activations"])
def test_any_key_change_measures_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    target, layer, dtype = load_target("ort-cpu"), _layer(), "int8"
    calls, measure = _counting(timing(0.1, 0.2))
    timed_layer(layer, target, 8, dtype, measure=measure, directory=tmp_path)
    cpu = detect_cpu()
    if change == "weight dtype":
        dtype = "int4"
    elif change == "onnxruntime":
        monkeypatch.setattr(layer_speed.ort, "__version__", "0.0.1")
    elif change in ("cpu", "flags"):
        other = CpuInfo("Other CPU", cpu.arch, cpu.flags, cpu.source) if change == "cpu" else CpuInfo(cpu.model, cpu.arch, cpu.flags - {"avx512_vnni"} | {"sse2_only"}, cpu.source)
        monkeypatch.setattr(layer_speed, "detect_cpu", lambda: other)
    elif change == "threads":
        monkeypatch.setattr(layer_speed, "threads", lambda: 97)
    elif change == "shape":
        layer = Layer(layer.op_type, layer.name, (1, 4, 8, 8), (1, 4, 8, 8), layer.weight, layer.attrs, layer.macs)
    elif change == "attribute":
        layer = Layer(layer.op_type, layer.name, layer.input_shape, layer.output_shape, layer.weight, {**layer.attrs, "strides": [2, 2]}, layer.macs)
    elif change == "activations":
        import dataclasses

        target = dataclasses.replace(target, activations=dataclasses.replace(target.activations, dtype="int8"))
    again = timed_layer(layer, target, 8, dtype, measure=measure, directory=tmp_path)
    assert len(calls) == 2 and not again.cached


def test_unreadable_or_foreign_cache_file_is_measured_again(tmp_path: Path) -> None:
    target, layer = load_target("ort-cpu"), _layer()
    calls, measure = _counting(timing(0.1, 0.2))
    timed_layer(layer, target, 8, "int8", measure=measure, directory=tmp_path)
    (path,) = tmp_path.glob("*.json")
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "key": {**stored["key"], "op": "MatMul"}}))
    timed_layer(layer, target, 8, "int8", measure=measure, directory=tmp_path)
    path.write_text("{not json")
    timed_layer(layer, target, 8, "int8", measure=measure, directory=tmp_path)
    assert len(calls) == 3


def test_weight_values_do_not_change_the_key() -> None:
    layer, target = _layer(), load_target("ort-cpu")
    other = Layer(layer.op_type, "another", layer.input_shape, layer.output_shape, layer.weight * 3, layer.attrs, layer.macs)
    assert cache_key(layer, target, "int8") == cache_key(other, target, "int8")


# -- where it runs ----------------------------------------------------------------------------


def test_skipped_when_compiling_for_another_cpu_or_weight_only() -> None:
    assert skip_reason(load_target("ort-cpu")) is None
    other = "sse4" if detect_cpu().isa != "sse4" else "avx2"
    assert "not this machine" in skip_reason(load_target("ort-cpu", cpu=other))
    assert "weight-only" in skip_reason(load_target("ort-cpu-int4"))


def _calib() -> DataSource:
    return DataSource({"input": np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})


def _fake_measure(slow_shape: tuple[int, ...]) -> tuple[list[str], layer_speed.Measure]:
    """conv_b's shape is 1.4x slower quantized; every other layer twice as fast."""
    seen: list[str] = []

    def measure(layer: Layer, target, width: int) -> LayerTiming:
        seen.append(layer.name)
        return timing(0.15, 0.21) if layer.weight.shape == slow_shape else timing(0.2, 0.1)

    return seen, measure


def _insert_qdq_stats(report) -> dict:
    return next(p.stats for p in report.passes if p.name == "insert-qdq")


def test_compile_leaves_the_slower_layer_float_and_reports_every_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache of its own: another test may have timed these very layers for real.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen, measure = _fake_measure((4, 4, 3, 3))
    monkeypatch.setattr(layer_speed, "measure_layer", measure)
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), verify=False)
    speed = _insert_qdq_stats(result.report)["speed_check"]
    assert sorted(seen) == sorted(WEIGHT_LAYERS)
    assert [row["node"] for row in speed["layers"]] == WEIGHT_LAYERS and speed["left_float"] == 1
    assert {row["node"]: row["decision"] for row in speed["layers"]} == {n: "float" if n == "conv_b" else "quantized" for n in WEIGHT_LAYERS}
    kept = {k.node: k.reason for k in result.report.kept_float}
    assert kept["conv_b"].startswith(f"left float: int8 kernel 1.40x slower than float on {cpu_label()}") and "0.210 vs 0.150 ms" in kept["conv_b"]
    nodes = {n.name: n for n in result.model.graph}
    # The float layer reads its float weight; its neighbours still read integer weights.
    assert nodes["conv_b"].inputs[1].const_value is not None and nodes["conv_b"].inputs[1].dtype.name == "FLOAT"
    assert nodes["conv_a"].inputs[1].producer().op_type == "DequantizeLinear"


def test_insert_qdq_option_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, measure = _fake_measure((4, 4, 3, 3))
    monkeypatch.setattr(layer_speed, "measure_layer", measure)
    pipeline = load_target("ort-cpu").pipeline.replace("insert-qdq", "insert-qdq{speed-check=false}")
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    assert seen == [] and "conv_b" not in {k.node for k in result.report.kept_float}
    assert _insert_qdq_stats(result.report)["speed_check"] == {"skipped": "turned off (insert-qdq{speed-check=false})"}
    assert any("speed check skipped" in d["message"] for d in result.report.diagnostics)


def test_compiling_for_another_cpu_measures_nothing_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, measure = _fake_measure((4, 4, 3, 3))
    monkeypatch.setattr(layer_speed, "measure_layer", measure)
    other = "sse4" if detect_cpu().isa != "sse4" else "avx2"
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), cpu=other, verify=False)
    skipped = _insert_qdq_stats(result.report)["speed_check"]["skipped"]
    assert seen == [] and "not this machine" in skipped and other in skipped


def test_targets_without_it_report_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, measure = _fake_measure((4, 4, 3, 3))
    monkeypatch.setattr(layer_speed, "measure_layer", measure)
    result = qcompiler.compile(small_cnn(), "tensorrt", calibration=_calib(), verify=False)
    assert seen == [] and "speed_check" not in _insert_qdq_stats(result.report)


def test_end_to_end_timed_once_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real timing in onnxruntime: each weight layer gets a decision with its figures, and a
    second compile of the same model measures nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = _insert_qdq_stats(qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), verify=False).report)["speed_check"]
    assert [row["node"] for row in first["layers"]] == WEIGHT_LAYERS and first["layers_timed"] == len(WEIGHT_LAYERS)
    for row in first["layers"]:
        assert row["float_ms"] > 0 and row["quantized_ms"] > 0 and row["decision"] in ("float", "quantized") and row["note"]
    assert first["cpu"] == cpu_label() and first["cache"].startswith(str(tmp_path))
    second = _insert_qdq_stats(qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), verify=False).report)["speed_check"]
    assert second["layers_timed"] == 0 and second["cache_hits"] == len(WEIGHT_LAYERS)
    assert [row["decision"] for row in second["layers"]] == [row["decision"] for row in first["layers"]]
