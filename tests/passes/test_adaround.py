"""adaround on real graphs: learned codes are what the written model stores, each within one step
of the float weight, no layer's output error above rounding to nearest's; widths, bad input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.quant.uniform import dequantize
from qcompiler.quant.weights import RoundedWeight, weight_grid
from qcompiler.targets.spec import load_target
from tests.helpers import run, small_cnn

PIPELINE = "infer-shapes,fold-constants,adaround{bits=4,iterations=300,batch-size=16},calibrate,insert-qdq"


def _calib(n: int = 64) -> DataSource:
    return DataSource({"input": np.random.default_rng(0).normal(0, 1, (n, 3, 8, 8)).astype(np.float32)})


def _stats(result) -> dict:
    return next(p.stats for p in result.report.passes if p.name == "adaround")


def _weight_codes(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int | None]]:
    """Each weight DequantizeLinear's (codes, scale, zero point, axis) by the layer reading it."""
    out = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm") and node.inputs[1].producer() is not None:
            dq = node.inputs[1].producer()
            axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else None
            out[node.name] = tuple(v.const_value.numpy() for v in dq.inputs) + (axis,)
    return out


def test_written_model_stores_the_learned_codes_within_one_step_of_the_float_weights() -> None:
    float_model = small_cnn()
    floats = {n.name: n.inputs[1].const_value.numpy().copy() for n in float_model.graph if n.op_type in ("Conv", "Gemm")}
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), pipeline=PIPELINE, verify=False)
    stats = _stats(result)
    assert [row["node"] for row in stats["layers"]] == list(floats)
    for row in stats["layers"]:
        assert row["bits"] == 4 and row["output_mse"] <= row["output_mse_nearest"]
    stored = _weight_codes(result.model)
    assert set(stored) == set(floats)
    flipped = 0
    for name, (q, scale, zp, axis) in stored.items():
        assert q.min() >= -7 and q.max() <= 7  # 4-bit codes inside int8
        w = floats[name].astype(np.float64)
        step = w / dequantize(np.ones_like(q), scale, np.zeros_like(zp), axis=axis)
        assert np.all(np.abs(q - step) < 1.0 + 1e-5), name  # the code below or the code above
        flipped += int(np.sum(q != np.clip(np.rint(step), -7, 7)))
    assert flipped > 0  # something was learned: not plain rounding under another name
    # And onnxruntime runs it.
    x = _calib(8).arrays["input"]
    assert np.all(np.isfinite(run(result.model, {"input": x})[0]))


def test_learned_rounding_beats_nearest_on_held_out_inputs() -> None:
    """The network with its weights rounded (activations float, as adaround sees it), on inputs
    adaround never saw: learned rounding has a smaller output error than rounding to nearest."""
    data = np.random.default_rng(5).normal(0, 1, (256, 3, 8, 8)).astype(np.float32)
    held_out = {"input": data[128:]}
    reference = run(small_cnn(), held_out)[0]
    errors = {}
    for name, iterations in (("learned", 2000), ("nearest", 0)):
        pipe = f"infer-shapes,fold-constants,adaround{{bits=4,iterations={iterations},batch-size=16}}"
        model = qcompiler.compile(small_cnn(), "ort-cpu", calibration=DataSource({"input": data[:128]}), pipeline=pipe, verify=False).model
        errors[name] = float(np.mean((run(model, held_out)[0] - reference) ** 2))
    assert errors["learned"] < 0.5 * errors["nearest"], errors


def test_first_and_last_layers_can_stay_at_8_bits() -> None:
    result = qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), pipeline=PIPELINE.replace("bits=4,", "bits=4,first-last-bits=8,"), verify=False)
    bits = {row["node"]: row["bits"] for row in _stats(result)["layers"]}
    assert bits == {"conv0": 8, "conv_a": 4, "conv_b": 4, "conv_c": 4, "conv_d": 4, "fc": 8}
    stored = _weight_codes(result.model)
    assert np.abs(stored["conv0"][0]).max() > 7 and np.abs(stored["conv_a"][0]).max() <= 7


def test_codes_of_a_weight_changed_after_adaround_are_not_used() -> None:
    w = np.random.default_rng(0).normal(0, 1, (4, 8)).astype(np.float32)
    grid = weight_grid(w, load_target("ort-cpu", cpu="avx512-vnni").weights, 4, 0)
    rounded = RoundedWeight(grid.nearest(w), grid, 4, w)
    values = grid.dequantize(rounded.codes)
    assert rounded.matches(values, 0, 4)
    assert not rounded.matches(values + 1e-3, 0, 4) and not rounded.matches(values, None, 4) and not rounded.matches(values, 0, 8)


@pytest.mark.parametrize("pipeline, option, message", [
    ("infer-shapes,adaround{bits=7},calibrate,insert-qdq", "bits", "7-bit weights are not allowed"),
    ("infer-shapes,adaround{first-last-bits=32},calibrate,insert-qdq", "first-last-bits", "32-bit weights are not allowed"),
])
def test_widths_the_target_does_not_allow_are_refused(pipeline: str, option: str, message: str) -> None:
    with pytest.raises(QCError) as error:
        qcompiler.compile(small_cnn(), "ort-cpu", calibration=_calib(), pipeline=pipeline, verify=False)
    assert message in str(error.value) and option in str(error.value)


def test_without_data_it_says_what_to_pass() -> None:
    with pytest.raises(QCError, match="--calib"):
        qcompiler.compile(small_cnn(), "ort-cpu", pipeline="infer-shapes,adaround{bits=4}", verify=False)
