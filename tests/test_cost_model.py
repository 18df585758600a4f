"""Cost model: MACs per layer, storage widths, and the bops/latency budgets of assign-precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import qcompiler
from qcompiler.cost_model import layer_macs, storage_dtype, storage_width
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.ir import annotate_types
from qcompiler.targets.spec import load_target
from tests.helpers import make_model, tensor_info


def _net(rng: np.random.Generator):
    """Conv (strided, grouped) -> Conv -> Flatten -> Gemm (transB): three layers of different MACs."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=2, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1),
        ],
        [tensor_info("x", [None, 3, 8, 8])],
        [tensor_info("y", [None, 5])],
        {
            "w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32),
            "w2": rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32),
            "w3": rng.normal(0, 0.1, (5, 128)).astype(np.float32),
        },
    )


def test_layer_macs() -> None:
    model = _net(np.random.default_rng(0))
    annotate_types(model)
    # conv1: 8 x 4 x 4 outputs, 3*3*3 MACs each; conv2: 8 x 4 x 4 outputs, 4*3*3 each; fc: 5 x 128.
    assert layer_macs(model, "w1", "conv1") == 8 * 16 * 27
    assert layer_macs(model, "w2", "conv2") == 8 * 16 * 36
    assert layer_macs(model, "w3", "fc") == 5 * 128


def test_storage_width_is_the_smallest_native_width_that_holds_it() -> None:
    assert [storage_width(b, (4, 8)) for b in (2, 3, 4, 5, 8)] == [4, 4, 4, 8, 8]
    target = load_target("ort-cpu")
    assert storage_dtype(target, 4) == "int8"  # ort-cpu runs every width in int8


def _compile(pipeline: str, target: str = "ort-cpu"):
    rng = np.random.default_rng(1)
    data = DataSource({"x": rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)}, rng.integers(0, 5, 64))
    return qcompiler.compile(_net(rng), target=target, calibration=data, verify=False, pipeline=pipeline)


def test_bops_budget_is_met_in_bit_operations() -> None:
    result = _compile("infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=bops=0.5}")
    stats = next(p for p in result.report.passes if p.name == "assign-precision").stats
    macs = {"conv1": 8 * 16 * 27, "conv2": 8 * 16 * 36, "fc": 5 * 128}
    used = sum(macs[l["node"]] * l["bits"] * 8 for l in stats["layers"].values())
    full = sum(macs.values()) * 8 * 8
    assert stats["budget"]["kind"] == "bops" and used == pytest.approx(stats["budget"]["used"])
    assert used <= 0.5 * full * (1 + 1e-9) and stats["budget"]["full_width"] == full


def test_latency_budget_below_int8_is_infeasible_on_ort_cpu() -> None:
    """Every width runs in the int8 kernels on ort-cpu: narrowing cannot buy latency."""
    with pytest.raises(QCError) as info:
        _compile("infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=latency=0.9}")
    assert info.value.option == "budget" and "smallest feasible" in info.value.message


def test_latency_budget_uses_the_cost_of_the_storage_dtype(tmp_path: Path) -> None:
    target = tmp_path / "int4.toml"
    target.write_text('extends = "ort-cpu"\nname = "int4-test"\n[bits]\nallowed = [2, 4, 8]\nnative = [4, 8]\n[cost.mac]\nfloat32 = 1.0\nint8 = 0.4\nint4 = 0.1\n')
    result = _compile("infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=latency=0.7}", target=str(target))
    stats = next(p for p in result.report.passes if p.name == "assign-precision").stats
    macs = {"conv1": 8 * 16 * 27, "conv2": 8 * 16 * 36, "fc": 5 * 128}
    predicted = sum(macs[l["node"]] * (0.1 if l["bits"] <= 4 else 0.4) for l in stats["layers"].values())
    assert predicted == pytest.approx(stats["budget"]["used"]) and predicted <= 0.7 * 0.4 * sum(macs.values()) * (1 + 1e-9)
    # 2-bit weights cost what 4-bit ones do here, and are more sensitive: never chosen for latency.
    assert all(l["bits"] != 2 for l in stats["layers"].values())


def test_latency_budget_names_a_dtype_missing_from_the_cost_table(tmp_path: Path) -> None:
    target = tmp_path / "nocost.toml"
    target.write_text('extends = "ort-cpu"\nname = "nocost"\n[bits]\nallowed = [4, 8]\nnative = [4, 8]\n')
    with pytest.raises(QCError, match="no latency figure for int4"):
        _compile("infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=latency=0.7}", target=str(target))


def test_latency_budget_reads_per_op_costs_and_keeps_slow_int4_convs_at_int8(tmp_path: Path) -> None:
    """The int4 weight-only target's shape: int4 MatMul/Gemm kernels are fast, int4 Convs slower
    than int8 ones. A latency budget must spend int4 on the Gemm, never on the Convs."""
    target = tmp_path / "int4.toml"
    target.write_text(
        'extends = "ort-cpu-int4"\nname = "int4-costs"\n[cost.mac]\nfloat32 = 1.0\nint8 = 1.0\nint4 = 1.0\n'
        "[cost.op.Conv]\nint8 = 1.2\nint4 = 1.6\n[cost.op.Gemm]\nint8 = 1.0\nint4 = 0.3\n"
    )
    result = _compile("infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=latency=0.96,measure-below=0},insert-qdq", target=str(target))
    stats = next(p for p in result.report.passes if p.name == "assign-precision").stats
    bits = {l["node"]: l["bits"] for l in stats["layers"].values()}
    assert bits == {"conv1": 8, "conv2": 8, "fc": 4}
    macs = {"conv1": 8 * 16 * 27, "conv2": 8 * 16 * 36, "fc": 5 * 128}
    assert stats["budget"]["used"] == pytest.approx(1.2 * (macs["conv1"] + macs["conv2"]) + 0.3 * macs["fc"])
    assert stats["budget"]["full_width"] == pytest.approx(1.2 * (macs["conv1"] + macs["conv2"]) + 1.0 * macs["fc"])


def test_cost_per_mac_prefers_the_op_table() -> None:
    target = load_target("ort-cpu")
    assert target.cost.per_mac("Conv", "int8") == target.cost.mac["int8"]
    assert target.cost.per_mac("Conv", "int2") is None


def test_predicted_speedup_from_the_cost_table(tmp_path: Path) -> None:
    from qcompiler.cost_model import predicted_speedup

    rng = np.random.default_rng(1)
    data = DataSource({"x": rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}, rng.integers(0, 5, 16))
    result = qcompiler.compile(_net(rng), target="ort-cpu", calibration=data, latency_runs=10)
    # Every weight layer runs in int8: the prediction is 1 / int8's cost per MAC.
    assert result.report.verification.latency.predicted_speedup == pytest.approx(1 / load_target("ort-cpu").cost.mac["int8"])
    target = tmp_path / "costs.toml"
    target.write_text('extends = "ort-cpu-int4"\nname = "c"\n[cost.mac]\nfloat32 = 1.0\nint8 = 1.0\nint4 = 1.0\n[cost.op.Conv]\nint4 = 2.0\n[cost.op.Gemm]\nint4 = 0.5\n')
    compiled = qcompiler.compile(_net(rng), target=str(target), verify=False).model
    annotate_types(compiled)
    macs = {"conv1": 8 * 16 * 27, "conv2": 8 * 16 * 36, "fc": 5 * 128}
    expected = sum(macs.values()) / (2.0 * (macs["conv1"] + macs["conv2"]) + 0.5 * macs["fc"])
    assert predicted_speedup(compiled, load_target(str(target))) == pytest.approx(expected)
    # Widths chosen per weight change the figure: the Gemm kept at int8 (its cost inherited from
    # ort-cpu-int4's [cost.op.Gemm]).
    gemm_int8 = load_target(str(target)).cost.per_mac("Gemm", "int8")
    assert predicted_speedup(compiled, load_target(str(target)), {"w3": 8}) == pytest.approx(sum(macs.values()) / (2.0 * (macs["conv1"] + macs["conv2"]) + gemm_int8 * macs["fc"]))


def test_float_as_a_width_trades_latency_for_accuracy(tmp_path: Path) -> None:
    """32 among the allowed widths leaves a layer float: zero sensitivity, the float cost per MAC.
    A latency budget above the all-int8 model's buys float layers where they matter most."""
    target = tmp_path / "float-or-int8.toml"
    target.write_text('extends = "ort-cpu"\nname = "float-or-int8"\n[bits]\nallowed = [4, 8, 32]\n[cost.mac]\nfloat32 = 1.0\nint8 = 0.5\n')
    spec = load_target(str(target))
    assert spec.bits.allowed == (4, 8, 32) and storage_dtype(spec, 32) == "float32"
    result = _compile("infer-shapes,hessian-trace{max-probes=8},assign-precision{budget=latency=1.3,measure-below=0},calibrate,insert-qdq", target=str(target))
    stats = next(p for p in result.report.passes if p.name == "assign-precision").stats
    macs = {"conv1": 8 * 16 * 27, "conv2": 8 * 16 * 36, "fc": 5 * 128}
    bits = {l["node"]: l["bits"] for l in stats["layers"].values()}
    # The reference is the all-int8 model (0.5 per MAC); 1.3x of it leaves room for some float.
    assert stats["budget"]["full_width"] == pytest.approx(0.5 * sum(macs.values()))
    used = sum(macs[n] * (1.0 if b == 32 else 0.5) for n, b in bits.items())
    assert used == pytest.approx(stats["budget"]["used"]) and used <= 1.3 * 0.5 * sum(macs.values()) + 1e-6
    assert 32 in bits.values() and all(l["sensitivity"] == 0.0 for l in stats["layers"].values() if l["bits"] == 32)
    floats = {n for n, b in bits.items() if b == 32}
    for node in result.model.graph:
        if node.name in macs:
            weight_is_float = node.inputs[1].const_value is not None
            assert weight_is_float == (node.name in floats), node.name
    assert any(k.reason == "left float by assign-precision" for k in result.report.kept_float)
