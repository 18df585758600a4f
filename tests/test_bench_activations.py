"""bench/activations.py in its quick mode: every alternative compiles and runs, the table says which
op types onnxruntime ran and the command of each row, and the table lookup is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.runtime import make_session
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/activations.py")


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("activations")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = bench.main(["--quick", "--nets", "chain-hardswish,chain-gelu-erf,mbv3-sigmoid", "--out", str(out), "--json", str(out / "a.json")])
    return status, printed.getvalue(), json.loads((out / "a.json").read_text())


def test_quick_mode_measures_every_alternative(quick_run) -> None:
    status, printed, stored = quick_run
    assert status == 0
    assert printed.startswith("CPU: ") and "onnxruntime" in printed.splitlines()[1]
    rows = {(r["net"], r["alternative"]): r for r in stored["rows"]}
    assert set(rows) == {
        *(("chain-hardswish", a) for a in ("float", "float-act", "quantized", "lut", "ort-cpu")),
        *(("chain-gelu-erf", a) for a in ("float", "float-act", "quantized", "mul-quantized", "float-mul", "ort-cpu")),
        *(("mbv3-sigmoid", a) for a in ("float", "float-act", "quantized", "float-mul", "ort-cpu")),
    }
    for (net, alt), row in rows.items():
        assert row["ms"] > 0 and row["speedup"] > 0 and row["ran"]
        assert row["command"] in printed
        if alt != "float":
            assert row["command"].startswith("qc compile ") and np.isfinite(row["sqnr_db"]) and row["sqnr_db"] > 15
    # What onnxruntime ran, read from its optimized graph: Q/DQ around the float HardSwish (which it
    # decomposes), an integer Sigmoid gate in the MobileNet block, the lookup's Gather.
    assert "com.microsoft.QLinearConv" in rows["chain-hardswish", "float-act"]["ran"]
    # Every HardSwish between two quantizers becomes a lookup; the last one, read only by the
    # pooling before the model's output (a weightless tail, kept float), stays as it was.
    lut, float_act = rows["chain-hardswish", "lut"]["ran"], rows["chain-hardswish", "float-act"]["ran"]
    assert "Gather" in lut and lut.get("HardSigmoid", 0) < float_act["HardSigmoid"]
    assert "com.microsoft.QLinearSigmoid" in rows["mbv3-sigmoid", "ort-cpu"]["ran"]
    # ort-cpu keeps the decomposed Gelu float as a unit; "mul-quantized" quantizes its Mul/Add.
    assert "com.microsoft.QLinearMul" not in rows["chain-gelu-erf", "ort-cpu"]["ran"]
    assert "com.microsoft.QLinearMul" in rows["chain-gelu-erf", "mul-quantized"]["ran"]
    assert any(n.startswith("Mul: Gelu (Mul of its decomposed form) kept float") for n in rows["chain-gelu-erf", "ort-cpu"]["float_notes"])
    assert "CPU: " in printed and "$ qc compile" in printed


def test_lookup_is_bit_identical_to_the_float_activation(quick_run) -> None:
    _, _, stored = quick_run
    rows = {(r["net"], r["alternative"]): r for r in stored["rows"]}
    assert rows["chain-hardswish", "lut"]["sqnr_db"] == rows["chain-hardswish", "float-act"]["sqnr_db"]


def test_lookup_tables_replaces_dq_act_q_exactly(bench) -> None:
    s_in, z_in, s_out, z_out = np.float32(0.05), np.uint8(120), np.float32(0.02), np.uint8(10)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s_in", "z_in"], ["x"], name="dq"), helper.make_node("Tanh", ["x"], ["t"], name="tanh"),
             helper.make_node("QuantizeLinear", ["t", "s_out", "z_out"], ["y"], name="q_out")]
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in (("s_in", s_in), ("z_in", z_in), ("s_out", s_out), ("z_out", z_out))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 128])], [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 128])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    q = np.arange(256, dtype=np.uint8).reshape(2, 128)
    (expected,) = make_session(proto).run(None, {"q": q})
    model = ir.serde.deserialize_model(proto)
    assert bench.lookup_tables(model) == 1
    assert [n.op_type for n in model.graph] == ["Cast", "Gather"]
    (got,) = make_session(ir.serde.serialize_model(model)).run(None, {"q": q})
    np.testing.assert_array_equal(got, expected)
