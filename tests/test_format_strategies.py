"""The network-level format strategies on MNIST LeNet-5: each finds the exhaustive search's optimum
with fewer full evaluations, the predictor within three, and the probe session computes what a
candidate's own session does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from qcompiler.data import DataSource
from qcompiler.format_predictor import AccuracyPredictor
from qcompiler.format_search import FormatEvaluator, Measurement
from qcompiler.format_strategies import PREDICTOR_FULL_EVALUATIONS, STRATEGIES, Goal, run_strategy
from qcompiler.ir import load_model, upgraded_to
from qcompiler.quant.formats import parse_format, parse_format_list

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
import train_lenet5_mnist as lenet  # noqa: E402

pytestmark = pytest.mark.skipif(not lenet.MNIST.exists(), reason="../shared/data/mnist.npz missing")
GRID = "int<2..8>|float<2..4,0..4>"


@pytest.fixture(scope="module")
def evaluator():
    test = lenet.make_npz("test")
    data = DataSource({"input": test["input"][:192]}, test["labels"][:192])
    model, _ = upgraded_to(load_model(ROOT / "models" / "mnist_lenet5.onnx"), 21, "test", "int4 and float8")
    ev = FormatEvaluator(model, data, parse_format("uint8"), model.graph.outputs[0].name, workers=1)
    yield ev
    ev.close()


def _by_cost(ev: FormatEvaluator) -> list:
    from qcompiler.energy_model import load_energy_table
    from qcompiler.format_search import layer_energy_pj

    table = load_energy_table("horowitz-45nm")
    formats = parse_format_list(GRID)
    return sorted(formats, key=lambda f: sum(layer_energy_pj(layer, f, parse_format("uint8"), table) for layer in ev.layers))


def test_the_probe_session_computes_what_the_candidates_own_session_does(evaluator) -> None:
    for fmt, tolerance in (("float<3,2>", 0.0), ("mxfp4", 0.0), ("fp16", 0.0), ("int4", 0.1)):
        formats = {layer.weight: parse_format(fmt) for layer in evaluator.layers}
        own, probe = evaluator.measure(formats, samples=50), evaluator.probe(formats, 50)
        assert probe.samples == own.samples == 50 and not probe.full and own.full
        # Float formats: the same values in the same float32 layers. Integer weights: onnxruntime
        # keeps their DequantizeLinear in its own session and sums in another order (< 0.1 dB).
        assert probe.sqnr_db == pytest.approx(own.sqnr_db, abs=tolerance + 1e-9), fmt
        assert abs(probe.top1 - own.top1) <= (100 / 50 if tolerance else 0), fmt


@pytest.mark.parametrize("min_sqnr", [18.0, 24.0])
def test_every_strategy_finds_the_exhaustive_optimum_with_fewer_full_evaluations(evaluator, min_sqnr: float) -> None:
    goal = Goal(min_sqnr, -1.0, evaluator.float_top1_on)
    candidates = _by_cost(evaluator)
    reference = run_strategy("exhaustive", evaluator, candidates, goal)
    assert reference.choice is not None and reference.full_evaluations == len(candidates)
    # The cheapest that meets: every cheaper candidate misses.
    cheaper = candidates[: candidates.index(reference.choice)]
    assert all(not goal.meets(reference.measured[f]) for f in cheaper)
    for name in STRATEGIES[1:]:
        found = run_strategy(name, evaluator, candidates, goal, curve=AccuracyPredictor(0.5, -1.5))
        assert found.choice == reference.choice, name
        assert found.full_evaluations < reference.full_evaluations, name
    predicted = run_strategy("predictor", evaluator, candidates, goal, curve=AccuracyPredictor(0.5, -1.5))
    assert predicted.full_evaluations <= PREDICTOR_FULL_EVALUATIONS and predicted.predicted is not None
    # Probed cheapest first up to the guess (the first predicted to meet), then only the refinement's steps.
    guess = candidates.index(predicted.predicted)
    probed = [t["format"] for t in predicted.trail if not t["full"]]
    assert probed[: guess + 1] == [f.name for f in candidates[: guess + 1]] and len(probed) < len(candidates)
    # A curve that predicts every design misses: every design is probed, the least bad measured.
    hopeless = run_strategy("predictor", evaluator, candidates, Goal(0.0, 1.0, evaluator.float_top1_on), curve=AccuracyPredictor(10.0, 0.0))
    assert hopeless.probes == len(candidates) and hopeless.full_evaluations <= PREDICTOR_FULL_EVALUATIONS


def test_with_two_workers_the_predictor_takes_the_same_steps_in_fewer_rounds(evaluator) -> None:
    from dataclasses import replace

    goal = Goal(0.0, 0.5, evaluator.float_top1_on)
    candidates = _by_cost(evaluator)
    alone = run_strategy("predictor", evaluator, candidates, goal, curve=AccuracyPredictor(0.5, -1.5))
    assert goal.meets(alone.measured[alone.predicted]), "the setting this test needs: the guess meets, the refinement narrows"
    pair = replace(evaluator, workers=2, _pool=None, _probe_session=None)
    batches: list[int] = []
    measure_many = pair.measure_many
    pair.measure_many = lambda candidates, *a, **k: (batches.append(len(candidates)), measure_many(candidates, *a, **k))[1]
    try:
        side_by_side = run_strategy("predictor", pair, candidates, goal, curve=AccuracyPredictor(0.5, -1.5))
    finally:
        pair.close()
    assert side_by_side.choice == alone.choice and set(side_by_side.measured) == set(alone.measured)
    assert side_by_side.full_evaluations <= PREDICTOR_FULL_EVALUATIONS
    assert batches[0] == 2 and len(batches) == len(alone.measured) - 1
    # A batch no larger than the pool ran here: starting workers costs more than it saves.
    assert pair._pool is None


def test_a_batch_larger_than_the_pool_runs_on_the_workers(evaluator) -> None:
    from dataclasses import replace

    pair = replace(evaluator, workers=2, _pool=None, _probe_session=None)
    formats = _by_cost(evaluator)[:3]
    try:
        many = pair.measure_many([{layer.weight: f for layer in pair.layers} for f in formats])
        assert pair._pool is not None and len(many) == 3
        alone = [evaluator.measure({layer.weight: f for layer in evaluator.layers}) for f in formats]
        assert [round(m.sqnr_db, 6) for m in many] == [round(m.sqnr_db, 6) for m in alone]
    finally:
        pair.close()


def test_a_goal_nothing_meets_returns_the_most_accurate_measured(evaluator) -> None:
    goal = Goal(200.0, -1.0, evaluator.float_top1_on)
    for name in STRATEGIES:
        found = run_strategy(name, evaluator, _by_cost(evaluator), goal, curve=AccuracyPredictor(0.5, -1.5))
        assert found.choice is None and found.best is not None and found.full_evaluations >= 1, name


def test_goal_margins_and_sampling_error() -> None:
    goal = Goal(20.0, 1.0, lambda n: 90.0)
    m = Measurement(23.0, 0.0, 89.5, 0.0, samples=100)
    assert goal.margin(m) == pytest.approx(0.5) and goal.meets(m)
    assert goal.sampling_error(m, 100) == 0.0
    few = Measurement(23.0, 0.0, 89.5, 0.0, samples=25)
    # Two binomial standard errors of top-1 on 25 samples (10.5 % disagree): ~12 points.
    assert goal.sampling_error(few, 100) == pytest.approx(200 * np.sqrt(0.105 * 0.895 / 25))
    assert not Goal(20.0, -1.0, lambda n: None).meets(Measurement(float("-inf"), 1.0, None, 0.0, failed=True))


def test_a_refinement_step_that_misses_by_far_on_a_screen_is_not_measured_in_full(monkeypatch) -> None:
    """The predictor probes refinement steps on 256 samples first: a step that misses the goal
    beyond three standard errors there (or already on its 10-input probe) is dropped without a
    full evaluation; when steps two or more bits narrower than the guess may still meet, the walk
    starts at the narrowest of them, not at the guess. Same answer as the exhaustive search, fewer
    full evaluations than the walk with every step measured in full."""
    import qcompiler.format_strategies as strategies

    test = lenet.make_npz("test")
    data = DataSource({"input": test["input"][:800]}, test["labels"][:800])
    model, _ = upgraded_to(load_model(ROOT / "models" / "mnist_lenet5.onnx"), 21, "test", "int4 and float8")
    ev = FormatEvaluator(model, data, parse_format("uint8"), model.graph.outputs[0].name, workers=1)
    try:
        goal = Goal(0.0, 0.5, ev.float_top1_on)
        candidates = _by_cost(ev)
        reference = run_strategy("exhaustive", ev, candidates, goal)
        # Curves that guess two and four bits wider than the answer.
        wide = AccuracyPredictor(0.5, -1.0)
        wider = AccuracyPredictor(0.5, -0.7)
        screened = [run_strategy("predictor", ev, candidates, goal, curve=c) for c in (wide, wider)]
        screen = strategies.SCREEN_SAMPLES
        monkeypatch.setattr(strategies, "SCREEN_SAMPLES", 10**6)
        unscreened = [run_strategy("predictor", ev, candidates, goal, curve=c) for c in (wide, wider)]
    finally:
        ev.close()
    for found, walked in zip(screened, unscreened):
        guess = candidates.index(found.predicted)
        assert guess >= candidates.index(reference.choice) + 2, "the setting this test needs: a guess two bits wide"
        assert found.choice == reference.choice
        assert found.predicted not in found.measured and found.full_evaluations < walked.full_evaluations
        # Screened and not measured, cheaper than the answer: each one misses.
        screened_only = {parse_format(t["format"]) for t in found.trail if not t["full"] and t["samples"] == screen} - set(found.measured)
        dropped = [f for f in screened_only if candidates.index(f) < candidates.index(found.choice)]
        assert all(not goal.meets(reference.measured[f]) for f in dropped)
    # Four bits wide, the walk measured in full stops at its third evaluation short of the answer.
    assert unscreened[1].choice != reference.choice
