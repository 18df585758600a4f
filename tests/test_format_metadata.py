"""qc.format on every quantized tensor: written by qc compile at the width chosen, and `qc validate`
refuses a stored value outside it, a name that is no format, or a Clip wider than it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.data import DataSource
from qcompiler.format_metadata import FORMAT_KEY
from qcompiler.targets.spec import load_target
from qcompiler.validate import validate
from tests.helpers import small_cnn


def _calib() -> DataSource:
    return DataSource({"input": np.random.default_rng(0).normal(0, 1, (32, 3, 8, 8)).astype(np.float32)})


def _compile(target: str, pipeline: str | None = None) -> ir.Model:
    return qcompiler.compile(small_cnn(), target, calibration=_calib(), pipeline=pipeline, verify=False).model


def _formats(model: ir.Model) -> dict[str, str | None]:
    return {n.name: n.metadata_props.get(FORMAT_KEY) for n in model.graph if n.op_type == "DequantizeLinear"}


@pytest.mark.parametrize(("target", "pipeline", "expected"), [
    ("ort-cpu", None, {"int8", "uint8", "int32"}),
    ("ort-cpu", "infer-shapes,fold-constants,adaround{bits=2,iterations=0},calibrate,insert-qdq", {"int2", "uint8", "int32"}),
    ("ort-cpu", "infer-shapes,fold-constants,assign-precision{budget=bits=8,activation-bits=4},calibrate,insert-qdq", {"int8", "uint4", "int32"}),
    ("tensorrt-fp8", None, {"e4m3fn"}),
    ("ort-cpu-int4", None, {"int4"}),
])
def test_every_dequantize_names_the_format_of_what_it_reads_and_validates(target: str, pipeline: str | None, expected: set[str]) -> None:
    model = _compile(target, pipeline)
    formats = _formats(model)
    assert None not in formats.values() and set(formats.values()) == expected
    assert validate(model, load_target(target)) == []


def _weight_dq(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None and n.metadata_props.get(FORMAT_KEY, "").startswith("int") and n.metadata_props[FORMAT_KEY] != "int32")


def test_a_stored_value_outside_the_format_is_a_violation() -> None:
    model = _compile("ort-cpu", "infer-shapes,fold-constants,adaround{bits=2,iterations=0},calibrate,insert-qdq")
    dq = _weight_dq(model)
    codes = dq.inputs[0].const_value.numpy().copy()
    codes.reshape(-1)[0] = 3  # int2 holds -2..1
    dq.inputs[0].const_value = ir.tensor(codes, name=dq.inputs[0].name)
    found = [v for v in validate(model, load_target("ort-cpu")) if v.rule == "format"]
    assert len(found) == 1 and found[0].node == dq.name and "not in qc.format 'int2' (the first: 3)" in found[0].message


def test_a_channel_holding_the_negated_format_is_not_a_violation_but_a_wider_one_is() -> None:
    """fold-batchnorm negates a channel's codes for a negative BatchNormalization scale: int2's
    -2..1 becomes -1..2 there, the same quantizer times -1. A channel spanning -2..2 is not int2."""
    model = _compile("ort-cpu", "infer-shapes,fold-constants,adaround{bits=2,iterations=0},calibrate,insert-qdq")
    dq = _weight_dq(model)
    codes = dq.inputs[0].const_value.numpy().copy()
    codes[0] = 0
    codes[0].reshape(-1)[:2] = (2, -1)  # channel 0 (the DequantizeLinear's axis): -1..2
    dq.inputs[0].const_value = ir.tensor(codes, name=dq.inputs[0].name)
    assert [v for v in validate(model, load_target("ort-cpu")) if v.rule == "format"] == []
    codes[0].reshape(-1)[2] = -2  # now -2..2
    dq.inputs[0].const_value = ir.tensor(codes, name=dq.inputs[0].name)
    found = [v for v in validate(model, load_target("ort-cpu")) if v.rule == "format"]
    assert len(found) == 1 and "not in qc.format 'int2' (the first: 2)" in found[0].message


@pytest.mark.parametrize(("name", "message"), [("int<0>", "is not a number format"), ("e4m3fn", "is not stored in int8"), ("int16", "holds values its storage type int8 cannot")])
def test_a_format_name_that_is_wrong_for_its_tensor_is_a_violation(name: str, message: str) -> None:
    model = _compile("ort-cpu")
    dq = _weight_dq(model)
    dq.metadata_props[FORMAT_KEY] = name
    found = [v for v in validate(model, load_target("ort-cpu")) if v.rule == "format"]
    assert len(found) == 1 and message in found[0].message and found[0].fix


def test_a_clip_wider_than_the_activation_format_is_a_violation() -> None:
    model = _compile("ort-cpu", "infer-shapes,fold-constants,assign-precision{budget=bits=8,activation-bits=4},calibrate,insert-qdq")
    dq = next(n for n in model.graph if n.metadata_props.get(FORMAT_KEY) == "uint4")
    dq.metadata_props[FORMAT_KEY] = "uint2"
    found = [v for v in validate(model, load_target("ort-cpu")) if v.rule == "format"]
    assert found and "the Clip feeding it allows [0, 15], wider than qc.format 'uint2'" in found[0].message
