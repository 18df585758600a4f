"""Bad input to the mixed-precision passes: one line naming the culprit, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompiler.ir import to_proto
from tests.helpers import make_model, tensor_info
from tests.test_cli_errors import compile_error

MIXED = "infer-shapes,hessian-trace{max-probes=8},assign-precision{%s},calibrate,insert-qdq"


def _files(tmp_path: Path, middle: list | None = None, output=None) -> tuple[Path, Path]:
    """A Conv -> (middle) -> Flatten -> Gemm model and a labelled npz for it."""
    rng = np.random.default_rng(0)
    middle = middle or [helper.make_node("Relu", ["c"], ["r"], name="relu")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv", pads=[1, 1, 1, 1]), *middle,
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]
    outputs = [tensor_info("y", [None, 3])]
    if output is not None:
        nodes.append(output)
        outputs = [tensor_info("label", [None], TensorProto.INT64)]
    model = make_model(nodes, [tensor_info("x", [None, 2, 4, 4])], outputs,
                       {"w1": rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32), "w2": rng.normal(0, 0.3, (3, 64)).astype(np.float32)})
    onnx.save(to_proto(model), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (32, 2, 4, 4)).astype(np.float32), labels=rng.integers(0, 3, 32))
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def test_budget_no_assignment_meets_names_the_smallest_feasible(tmp_path: Path) -> None:
    model, data = _files(tmp_path)
    # 2 bits is the narrowest width on ort-cpu: a quarter of the int8 bytes.
    line = compile_error(tmp_path, model, "--pipeline", MIXED % "budget=size=0.1", calib=data, culprits=("budget", "size=0.25"))
    assert "assign-precision" in line


def test_bits_budget_below_two_bits(tmp_path: Path) -> None:
    model, data = _files(tmp_path)
    compile_error(tmp_path, model, "--pipeline", MIXED % "budget=bits=1.5", calib=data, culprits=("budget", "bits=2"))


def test_unknown_budget_kind_lists_the_kinds(tmp_path: Path) -> None:
    model, data = _files(tmp_path)
    compile_error(tmp_path, model, "--pipeline", MIXED % "budget=speed=2", calib=data, culprits=("budget", "size=", "bops=", "latency="))


def test_activation_width_not_allowed(tmp_path: Path) -> None:
    model, data = _files(tmp_path)
    compile_error(tmp_path, model, "--pipeline", MIXED % "budget=size=0.5,activation-bits=3", calib=data, culprits=("activation-bits", "[4, 5, 6, 8]"))


def test_op_the_torch_executor_cannot_run_is_named(tmp_path: Path) -> None:
    model, data = _files(tmp_path, middle=[helper.make_node("LRN", ["c"], ["r"], name="norm", size=3)])
    compile_error(tmp_path, model, "--pipeline", MIXED % "budget=size=0.5", calib=data, culprits=("LRN", "norm"))


def test_model_without_a_float_output_has_no_loss(tmp_path: Path) -> None:
    model, data = _files(tmp_path, output=helper.make_node("ArgMax", ["y"], ["label"], name="argmax", axis=1, keepdims=0))
    compile_error(tmp_path, model, "--pipeline", MIXED % "budget=size=0.5", calib=data, culprits=("loss", "label", "not float"))
