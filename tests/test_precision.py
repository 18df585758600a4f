"""assign-precision: the ILP is exact, baselines respect the budget, budgets are checked, widths are applied."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import helper

import qcompiler
from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.precision_ilp import pareto_front, solve_greedy, solve_ilp, solve_random, solve_uniform
from qcompiler.quant.weights import weight_qrange
from qcompiler.targets.spec import TensorRule
from tests.helpers import make_model, tensor_info

BITS = (2, 4, 8)


def _problem(seed: int = 0, layers: int = 6):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 200, layers).astype(np.float64)
    scale = rng.uniform(0.1, 10, layers)[:, None]
    omega = scale * np.array([[16.0, 1.0, 1 / 256]])  # error falls 4x per extra bit, per layer scale
    return omega, sizes


def _cost(sizes: np.ndarray) -> np.ndarray:
    """The size resource: parameters x bits per (layer, width)."""
    return sizes[:, None] * np.asarray(BITS, dtype=np.float64)[None, :]


def test_ilp_is_the_exact_optimum_by_brute_force() -> None:
    omega, sizes = _problem()
    budget = float(np.sum(sizes) * 4.2)
    choice = solve_ilp(omega, _cost(sizes), budget)
    best = min(
        (c for c in itertools.product(range(len(BITS)), repeat=len(sizes)) if np.sum(sizes * np.take(BITS, c)) <= budget),
        key=lambda c: omega[np.arange(len(sizes)), c].sum(),
    )
    assert np.isclose(omega[np.arange(len(sizes)), choice].sum(), omega[np.arange(len(sizes)), best].sum())


@pytest.mark.parametrize("solver", ["ilp", "greedy", "uniform", "random"])
def test_every_method_meets_the_budget_and_ilp_is_never_worse(solver: str) -> None:
    omega, sizes = _problem(1, 12)
    budget = float(np.sum(sizes) * 5.0)
    choice = {
        "ilp": lambda: solve_ilp(omega, _cost(sizes), budget),
        "greedy": lambda: solve_greedy(omega, _cost(sizes), BITS, budget),
        "uniform": lambda: solve_uniform(_cost(sizes), BITS, budget),
        "random": lambda: solve_random(_cost(sizes), BITS, budget, seed=3),
    }[solver]()
    assert np.sum(sizes * np.take(BITS, choice)) <= budget
    ilp = solve_ilp(omega, _cost(sizes), budget)
    assert omega[np.arange(12), ilp].sum() <= omega[np.arange(12), choice].sum() + 1e-12


def test_infeasible_budget_names_the_smallest_feasible_one() -> None:
    omega, sizes = _problem()
    with pytest.raises(QCError) as info:
        solve_ilp(omega, _cost(sizes), float(np.sum(sizes)), "weight bits")  # 1 bit per weight < 2 bits minimum
    assert info.value.option == "budget" and f"smallest feasible is {np.sum(sizes) * 2:.6g} weight bits" in info.value.message


def test_a_width_that_saves_nothing_is_never_chosen_to_save() -> None:
    """Latency on a target where 2 and 4 bits run as int8: narrowing below 8 saves nothing, so a
    budget under the int8 latency is infeasible and one at it keeps the sensitivity-optimal widths."""
    omega, sizes = _problem(3, 5)
    cost = np.repeat(sizes[:, None], 3, axis=1)  # same cost at every width
    with pytest.raises(QCError, match="smallest feasible"):
        solve_greedy(omega, cost, BITS, 0.9 * sizes.sum())
    for solver in (lambda: solve_ilp(omega, cost, sizes.sum()), lambda: solve_greedy(omega, cost, BITS, sizes.sum())):
        assert list(solver()) == [2] * 5  # the widest (least sensitive) width everywhere


def test_pareto_front_is_monotone() -> None:
    omega, sizes = _problem(2, 8)
    front = pareto_front(omega, _cost(sizes), points=8)
    sizes_out = [b for b, _ in front]
    costs = [c for _, c in front]
    assert sizes_out == sorted(sizes_out) and all(a >= b - 1e-12 for a, b in zip(costs, costs[1:]))


def _mlp(rng: np.random.Generator, hidden: int):
    """x[16] -> MatMul -> Relu -> Gemm -> y[4]: two weights, fc1 and fc2."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("Gemm", ["a", "w2"], ["y"], name="fc2"),
        ],
        [tensor_info("x", [None, 16])],
        [tensor_info("y", [None, 4])],
        {"w1": rng.normal(0, 0.5, (16, hidden)).astype(np.float32), "w2": rng.normal(0, 0.5, (hidden, 4)).astype(np.float32)},
    )


def _three_layer_mlp(rng: np.random.Generator):
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("MatMul", ["a", "w2"], ["b"], name="fc2"),
            helper.make_node("Relu", ["b"], ["c"], name="relu2"),
            helper.make_node("Gemm", ["c", "w3"], ["y"], name="fc3"),
        ],
        [tensor_info("x", [None, 16])],
        [tensor_info("y", [None, 4])],
        {"w1": rng.normal(0, 0.5, (16, 32)).astype(np.float32), "w2": rng.normal(0, 0.3, (32, 32)).astype(np.float32), "w3": rng.normal(0, 0.5, (32, 4)).astype(np.float32)},
    )


def test_weight_qrange() -> None:
    rule = TensorRule("int8", symmetric=True, granularity="per-channel", narrow_range=True)
    assert [weight_qrange(rule, b) for b in (2, 4, 8)] == [(-1, 1), (-7, 7), (-127, 127)]


def test_auto_weight_range_clips_only_at_three_bits_and_fewer() -> None:
    from qcompiler.quant.uniform import dequantize
    from qcompiler.quant.weights import quantize_weight

    rule = TensorRule("int8", symmetric=True, granularity="per-channel", narrow_range=True)
    w = np.random.default_rng(0).standard_t(4, (16, 64)).astype(np.float32)  # heavy tails, as trained weights

    def error(bits: int, how: str) -> float:
        q, s, z = quantize_weight(w, rule, bits, 0, how)
        return float(np.sum((dequantize(q, s, z, axis=0) - w) ** 2))

    for bits in (2, 3):
        assert error(bits, "auto") == error(bits, "mse") < 0.7 * error(bits, "minmax")
    for bits in (4, 8):
        assert error(bits, "auto") == error(bits, "minmax")
    # At 2 bits min/max rounds most of a heavy-tailed weight to zero.
    assert error(2, "minmax") > 0.5 * float(np.sum(w.astype(np.float64) ** 2))


def test_assigned_widths_are_applied_by_insert_qdq() -> None:
    rng = np.random.default_rng(0)
    model = _mlp(rng, hidden=64)
    data = DataSource({"x": rng.normal(0, 1, (64, 16)).astype(np.float32)}, rng.integers(0, 4, 64))
    result = qcompiler.compile(model, calibration=data, latency_runs=0,
                               pipeline="hessian-trace{max-probes=8},assign-precision{budget=bits=4},calibrate,insert-qdq")
    stats = next(p for p in result.report.passes if p.name == "assign-precision").stats
    assert stats["average_bits"] <= 4.0 and stats["method"] == "ilp"
    for node in (n for n in result.model.graph if n.name in ("fc1", "fc2")):
        weight = node.inputs[1].producer().inputs[0].const_value.numpy()
        bits = next(l["bits"] for l in stats["layers"].values() if l["node"] == node.name)
        assert np.abs(weight).max() <= 2 ** (bits - 1) - 1  # the integers respect the assigned width
    # The verifier's per-layer SQNR is attached to the layer (fc2 writes the graph output, which
    # the per-layer comparison leaves to the output metrics).
    fc1 = next(l for l in stats["layers"].values() if l["node"] == "fc1")
    assert fc1["output"] == "a" and np.isfinite(fc1["sqnr_db"]) and fc1["sqnr_db"] > 5


def test_bad_budget_text_names_the_option() -> None:
    from qcompiler.passes.assign_precision import parse_budget

    assert parse_budget("size=0.5", 100) == 400 and parse_budget("bits=3", 100) == 300
    for text in ("speed=3", "size", "size=abc", "bits=-1", "bops=0", "latency=nan"):
        with pytest.raises(QCError) as info:
            parse_budget(text, 100)
        assert info.value.option == "budget" and info.value.pass_name == "assign-precision"


def test_empirical_check_reports_the_rank_correlation() -> None:
    from qcompiler.sensitivity import measured_loss_increase
    from qcompiler.targets.spec import load_target

    rng = np.random.default_rng(5)
    model = _three_layer_mlp(rng)
    data = DataSource({"x": rng.normal(0, 1, (128, 16)).astype(np.float32)}, rng.integers(0, 4, 128))
    rule = load_target("ort-cpu").weights
    at2 = measured_loss_increase(model, data, rule, 2, ["w1", "w2", "w3"])
    at8 = measured_loss_increase(model, data, rule, 8, ["w1", "w2", "w3"])
    assert all(abs(at8[n]) < abs(at2[n]) for n in at2)  # 8-bit barely moves the loss; 2-bit does
    result = qcompiler.compile(model, calibration=data, verify=False,
                               pipeline="hessian-trace{max-probes=16},assign-precision{budget=bits=5,check-bits=3,pareto-points=0}")
    check = next(p for p in result.report.passes if p.name == "assign-precision").stats["check"]
    assert check["bits"] == 3 and -1 <= check["spearman"] <= 1 and set(check["measured_loss_increase"]) == {"w1", "w2", "w3"}
    assert check["loss"] == "cross-entropy"  # the traces' loss, with labels
    result = qcompiler.compile(model, calibration=data, verify=False,
                               pipeline="hessian-trace{max-probes=16},assign-precision{budget=bits=5,check-bits=3,check-loss=kl,check-samples=128,pareto-points=0}")
    check = next(p for p in result.report.passes if p.name == "assign-precision").stats["check"]
    assert check["loss"] == "kl" and check["measured_loss_increase"] == measured_loss_increase(model, data, rule, 3, ["w1", "w2", "w3"], loss="kl", samples=128)
    unlabelled = DataSource({"x": data.arrays["x"]})
    with pytest.raises(QCError, match="check-loss=cross-entropy needs 'labels'"):
        qcompiler.compile(model, calibration=unlabelled, verify=False,
                          pipeline="hessian-trace{max-probes=8},assign-precision{budget=bits=5,check-bits=3,check-loss=cross-entropy,pareto-points=0}")


def test_upper_trace_bound_uses_the_top_of_each_interval() -> None:
    import onnx_ir as ir

    from qcompiler.hessian import HessianTraceResult, TraceEstimate
    from qcompiler.sensitivity import layer_sensitivities

    rng = np.random.default_rng(1)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [tensor_info("x", [None, 8])], [tensor_info("y", [None, 4])],
                       {"w": rng.normal(0, 1, (8, 4)).astype(np.float32)})
    rule = TensorRule("int8", symmetric=True, granularity="per-channel", narrow_range=True)
    # A noisy estimate whose mean came out negative: the mean says "flat", the interval does not.
    traces = HessianTraceResult("cross-entropy", {"w": TraceEstimate("w", "fc", 32, trace=-0.5, stderr=1.0, probes=8)}, 8, False)
    assert isinstance(model, ir.Model)
    (mean,) = layer_sensitivities(model, traces, rule, (2, 4))
    (upper,) = layer_sensitivities(model, traces, rule, (2, 4), bound="upper")
    assert mean.omega == {2: 0.0, 4: 0.0}
    assert upper.trace == pytest.approx(-0.5 + 1.96) and upper.omega[2] > upper.omega[4] > 0


def test_narrow_widths_are_scored_by_the_larger_of_estimate_and_measured_damage() -> None:
    from qcompiler.passes.assign_precision import AssignPrecision
    from qcompiler.pass_manager import PassContext
    from qcompiler.sensitivity import LayerSensitivity, measured_loss_increase
    from qcompiler.targets.spec import load_target

    rng = np.random.default_rng(2)
    model = _mlp(rng, hidden=32)
    data = DataSource({"x": rng.normal(0, 1, (64, 16)).astype(np.float32)}, rng.integers(0, 4, 64))
    ctx = PassContext(target=load_target("ort-cpu"), data=data)
    layers = [LayerSensitivity(w, n, 0, 1.0, {}) for w, n in (("w1", "fc1"), ("w2", "fc2"))]
    bits = (2, 3, 4, 8)
    estimate = np.array([[0.0, 0.0, 0.0, 0.0], [1e6, 1e6, 1e6, 0.0]])
    measured = AssignPrecision(measure_below=4)._measure_narrow(model, ctx, layers, bits, "cross-entropy", estimate)
    assert measured == [2, 3]
    for j, b in enumerate((2, 3)):
        damage = measured_loss_increase(model, data, ctx.target.weights, b, ["w1", "w2"], loss="kl", samples=1000)
        assert damage["w1"] > 0
        assert estimate[0, j] == pytest.approx(2 * damage["w1"])  # measured, in Omega's units
        assert estimate[1, j] == 1e6  # the estimate, where it is the larger
    assert list(estimate[:, 2:].ravel()) == [0.0, 0.0, 1e6, 0.0]  # 4 and 8 bits: the estimate only
    assert AssignPrecision(measure_below=0)._measure_narrow(model, ctx, layers, bits, "cross-entropy", estimate) == []


def test_measured_damage_is_kept_in_its_cache_file_for_the_same_model_and_data_only(tmp_path) -> None:
    from qcompiler.pass_manager import PassContext
    from qcompiler.sensitivity import MeasuredDamage, measured_loss_increase
    from qcompiler.targets.spec import load_target

    rng = np.random.default_rng(3)
    model = _mlp(rng, hidden=32)
    data = DataSource({"x": rng.normal(0, 1, (64, 16)).astype(np.float32)}, rng.integers(0, 4, 64))
    cache = tmp_path / "damage.json"
    analysis = MeasuredDamage((2, 3), ("w1", "w2"), loss="kl", samples=64, cache=str(cache))

    def measure(data: DataSource) -> dict:
        return analysis.compute(model, PassContext(target=load_target("ort-cpu"), data=data))

    first = measure(data)
    assert first[3] == measured_loss_increase(model, data, load_target("ort-cpu").weights, 3, ["w1", "w2"], loss="kl", samples=64)
    stamp = cache.stat().st_mtime_ns
    assert measure(data) == first and cache.stat().st_mtime_ns == stamp  # read back, not measured again
    other = DataSource({"x": rng.normal(0, 1, (64, 16)).astype(np.float32)}, data.labels)
    assert measure(other)[2]["w1"] != first[2]["w1"] and cache.stat().st_mtime_ns != stamp


def test_measured_selection_takes_the_floor_restricted_optimum_that_measures_lowest() -> None:
    from qcompiler.passes.assign_precision import AssignPrecision
    from qcompiler.pass_manager import PassContext
    from qcompiler.sensitivity import LayerSensitivity, measured_assignment_loss
    from qcompiler.targets.spec import load_target

    rng = np.random.default_rng(12)
    model = _three_layer_mlp(rng)
    data = DataSource({"x": rng.normal(0, 1, (256, 16)).astype(np.float32)}, rng.integers(0, 4, 256))
    ctx = PassContext(target=load_target("ort-cpu"), data=data)
    sizes = np.array([16 * 32, 32 * 32, 32 * 4], dtype=np.float64)
    layers = [LayerSensitivity(w, n, int(k), 1.0, {}) for (w, n), k in zip((("w1", "fc1"), ("w2", "fc2"), ("w3", "fc3")), sizes)]
    bits = (2, 3, 4, 5, 6, 8)
    cost = sizes[:, None] * np.array(bits, dtype=np.float64)
    # An estimate that calls 2 bits free for the big middle layer: its optimum puts it there.
    omega = np.array([[9.0, 5.0, 3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [9.0, 5.0, 3.0, 2.0, 1.0, 0.0]])
    limit = float(sizes.sum() * 4)
    optimum = solve_ilp(omega, cost, limit)
    assert bits[optimum[1]] == 2
    # The second estimate calls 2 bits free for the first layer instead: its optimum is another candidate.
    other = omega[[1, 0, 2]]
    choice, selection = AssignPrecision(measure_samples=256)._select_measured(model, ctx, layers, bits, {"measured": omega, "hessian": other}, cost, limit, "weight bits", "cross-entropy")
    assert [c["estimate"] for c in selection].count("hessian") >= 1 and selection[0]["estimate"] == "measured"
    floors = [c["floor"] for c in selection if c["estimate"] == "measured"]
    assert floors[0] == 2 and 3 in floors and 4 in floors and 5 not in floors  # 5 bits everywhere exceeds 4 on average
    assert sum(c["selected"] for c in selection) == 1
    picked = next(c for c in selection if c["selected"])
    assert picked["measured_loss_increase"] == min(c["measured_loss_increase"] for c in selection)
    assert min(bits[c] for c in choice) >= picked["floor"] and float(cost[np.arange(3), choice].sum()) <= limit
    assignment = {l.weight: bits[c] for l, c in zip(layers, choice)}
    assert measured_assignment_loss(model, data, ctx.target.weights, [assignment], loss="kl", samples=256) == [picked["measured_loss_increase"]]


def test_measured_selection_is_opt_in() -> None:
    rng = np.random.default_rng(13)
    model = _three_layer_mlp(rng)
    data = DataSource({"x": rng.normal(0, 1, (128, 16)).astype(np.float32)}, rng.integers(0, 4, 128))

    def stats(select: str = "") -> dict:
        option = f",select={select}" if select else ""
        result = qcompiler.compile(model, calibration=data, verify=False, pipeline=f"hessian-trace{{max-probes=8}},assign-precision{{budget=bits=4.5,pareto-points=0{option}}}")
        return next(p for p in result.report.passes if p.name == "assign-precision").stats

    measured = stats("measured")
    (picked,) = [c for c in measured["selection"] if c["selected"]]
    assert min(layer["bits"] for layer in measured["layers"].values()) >= picked["floor"]
    assert "selection" not in stats() and "selection" not in stats("estimate")


def test_the_report_lists_the_measured_candidates() -> None:
    from rich.console import Console

    from qcompiler.report import PassTiming, Report

    selection = [{"estimate": "measured", "floor": 2, "total_sensitivity": 0.03, "measured_loss_increase": 0.0197, "loss": "kl", "selected": True},
                 {"estimate": "hessian", "floor": 4, "total_sensitivity": 0.05, "measured_loss_increase": 0.0532, "loss": "kl", "selected": False}]
    stats = {"method": "ilp", "average_bits": 4.0, "budget": {"kind": "size", "value": 0.5, "used": 4.0, "limit": 4.0, "unit": "weight bits"},
             "layers": {"w1": {"node": "fc1", "bits": 4, "sensitivity": 0.01, "trace": 1.0}}, "selection": selection}
    console = Console(record=True, width=400)
    Report("a.onnx", "b.onnx", passes=[PassTiming("assign-precision", 0.1, False, stats)]).render(console)
    text = console.export_text()
    assert ("ILP candidates, measured with every weight quantized (kl from the float outputs): measured estimate, no layer below 2 bits: 0.0197 (chosen); "
            "hessian estimate, no layer below 4 bits: 0.0532") in text
