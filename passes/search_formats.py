"""search-formats: a number format per weight layer (or one per network) with the least modelled
energy whose outputs, as onnxruntime runs them, meet an accuracy goal.

After Hill et al. (one custom format per network, accuracy predicted, speed from a MAC model):
here every candidate is run in onnxruntime on held-out calibration samples, layers may differ,
and the energy comes from the target's sourced table (`qc cost`). Weights are lowered with
`qcompiler.format_lowering` (natively where onnxruntime has the type, emulated otherwise), every
layer input is fake-quantized in ``activations``. The written model is that candidate: it runs
in onnxruntime with exactly the formats' values and carries ``qc.format`` on every quantized
tensor; it is an exploration result for hardware with these formats, which the CPU emulates
(ort-cpu's own kernels run int8 only: use assign-precision for them).

One format for the whole network is found by a ``strategy`` (`qcompiler.format_strategies`):
``exhaustive`` (every candidate in full), ``binary`` (binary search along each chain of widths),
``halving`` (successive halving on growing sample counts) or ``predictor`` (Hill et al.'s R^2
predictor on 10 inputs, then one-bit refinement). Per layer, the best such format is the baseline
and the fallback of the integer program. ``objective=time`` minimises the iso-area MAC time instead
of energy. Candidate lists take ranges: ``formats=int<2..8>|float<2..5,0..6>`` is a 42-design grid.

    search-formats{formats=int8|int4|e4m3fn|mxfp4,activations=uint8,min-sqnr=25}
    search-formats{granularity=network,max-drop=1.0}            # with labels in the data
    search-formats{granularity=network,strategy=predictor,formats=int<2..8>|float<2..5,0..6>,max-drop=1.0}
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.energy_model import load_energy_table
from qcompiler.errors import QCError
from qcompiler.format_predictor import AccuracyPredictor
from qcompiler.format_search import (
    ACTIVATION_FORMATS,
    FP32,
    FormatEvaluator,
    layer_energy_pj,
    layer_time,
)
from qcompiler.format_strategies import STRATEGIES, Goal, run_strategy
from qcompiler.ir import upgraded_to
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision_ilp import solve_ilp
from qcompiler.quant.formats import parse_format, parse_format_list
from qcompiler.registry import register_pass

#: Noise budgets the layer-wise search measures end to end (one full evaluation each, at most).
_BUDGET_STEPS = 8


def _usable_cpus() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@register_pass
class SearchFormats(Pass):
    """Choose a number format per weight layer (or per network) with the least modelled energy that meets an SQNR or accuracy goal in onnxruntime."""

    name = "search-formats"

    @dataclass(frozen=True)
    class Options:
        #: Candidate weight formats, separated by '|' (any name `qcompiler.quant.formats` parses;
        #: numbers may be ranges, ``float<2..5,0..6>``).
        formats: str = "int<2..8>|e4m3fn|e5m2|mxfp8|mxfp6|mxfp4|nvfp4|fp16"
        #: The format of every layer input: fp32, fp16, uint8, int8, e4m3fn or e5m2.
        activations: str = "uint8"
        #: ``layer``: a format per layer (exact integer program over measured damage);
        #: ``network``: one format for all, every candidate measured.
        granularity: Literal["layer", "network"] = "layer"
        #: How the one format for the whole network is found (see the module docstring).
        strategy: Literal["exhaustive", "binary", "halving", "predictor"] = "exhaustive"
        #: What is minimised: modelled ``energy`` (MACs and weight reads) or iso-area MAC ``time``.
        objective: Literal["energy", "time"] = "energy"
        #: strategy=predictor: the fitted curve (.json from bench/formats.py; empty: the built-in one)
        #: and the inputs each candidate is probed on (Hill et al.: 10).
        predictor: str = ""
        probe_samples: int = 10
        #: Goal: output SQNR against the float model, in dB (0: none).
        min_sqnr: float = 25.0
        #: Goal: top-1 drop against the float model, in points, on the labels in the data (-1: none).
        max_drop: float = -1.0
        #: The last N calibration samples every candidate runs on.
        samples: int = 512
        #: granularity=layer: each layer's damage in each format (layers x formats runs) is measured
        #: on the first N of those samples (0: all); the answers are checked end to end on all.
        layer_samples: int = 256
        #: Energy table (built-in name or .toml); empty: the target's.
        energy: str = ""
        #: Worker processes measuring candidates side by side, one onnxruntime thread each
        #: (0: one per CPU this process may use; 1: in this process, on one thread, so that N
        #: workers use N cores). Runs outside the workers (probes, one candidate at a time) use
        #: onnxruntime's threads unless workers=1.
        workers: int = 0
        #: ``process``: local worker processes; ``ray``: Ray actors, on a local Ray with
        #: ``workers`` CPUs or on the cluster at ``ray-address`` (the optional extra qcompiler[ray]).
        executor: Literal["process", "ray"] = "process"
        ray_address: str = ""

        def __post_init__(self) -> None:
            parse_format_list(self.formats)
            if self.strategy not in STRATEGIES:
                raise ValueError(f"option 'strategy' must be one of {', '.join(STRATEGIES)}")
            if self.objective not in ("energy", "time"):
                raise ValueError("option 'objective' must be energy or time")
            if self.probe_samples < 1:
                raise ValueError("option 'probe-samples' must be >= 1")
            if self.activations not in ACTIVATION_FORMATS:
                raise ValueError(f"option 'activations' must be one of {', '.join(ACTIVATION_FORMATS)}")
            if self.min_sqnr <= 0 and self.max_drop < 0:
                raise ValueError("give a goal: 'min-sqnr' > 0 (dB) or 'max-drop' >= 0 (points, with labels)")
            if self.samples < 1:
                raise ValueError("option 'samples' must be >= 1")
            if self.layer_samples < 0:
                raise ValueError("option 'layer-samples' must be >= 0 (0: all the samples)")
            if self.workers < 0:
                raise ValueError("option 'workers' must be >= 0 (0: one per CPU)")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        o = self.options
        if ctx.data is None:
            raise QCError("search-formats measures candidates on data: pass --calib FILE.npz", pass_name=self.name)
        if o.max_drop >= 0 and ctx.data.labels is None:
            raise QCError("max-drop needs labels in the calibration data (a 'labels' array); or use min-sqnr", pass_name=self.name, option="max-drop")
        start = time.perf_counter()
        # int4, float8 and blocked DequantizeLinear are opset 21 operators.
        model, old = upgraded_to(model, 21, self.name, "int4, float8 and block formats need 21")
        if old is not None:
            ctx.note(self.name, f"model upgraded from opset {old} to 21")
        held = ctx.data if ctx.data.num_samples <= o.samples else ctx.data.split(o.samples)[1]
        activation = parse_format(o.activations)
        workers = o.workers or _usable_cpus()
        evaluator = FormatEvaluator(model, held, activation, model.graph.outputs[0].name, pair_sum_limit=ctx.target.weights.pair_sum_limit, workers=workers,
                                    executor=o.executor, ray_address=o.ray_address, threads=1 if workers == 1 else 0)
        try:
            return self._search(model, ctx, evaluator, held, activation, start)
        finally:
            evaluator.close()

    def _search(self, model: ir.Model, ctx: PassContext, evaluator: FormatEvaluator, held, activation, start: float) -> PassResult:
        o = self.options
        table = load_energy_table(o.energy or ctx.target.energy_table)
        formats = parse_format_list(o.formats)
        layers = evaluator.layers
        cost_of = layer_energy_pj if o.objective == "energy" else layer_time
        energy = np.array([[layer_energy_pj(layer, f, activation, table) for f in formats] for layer in layers])
        cost = energy if o.objective == "energy" else np.array([[layer_time(layer, f, activation, table) for f in formats] for layer in layers])
        fp32_energy = float(sum(layer_energy_pj(layer, FP32, FP32, table) for layer in layers))
        fp32_cost = float(sum(cost_of(layer, FP32, FP32, table) for layer in layers))
        float_top1 = evaluator.float_top1()
        goal = Goal(o.min_sqnr, o.max_drop, evaluator.float_top1_on)
        meets = goal.meets
        curve = AccuracyPredictor.load(o.predictor or None) if o.strategy == "predictor" else None

        # One format for the whole network, found by the strategy (the best uniform, and Hill's search).
        total = {f: float(cost[:, j].sum()) for j, f in enumerate(formats)}
        by_cost = sorted(formats, key=lambda f: (total[f], formats.index(f)))
        outcome = run_strategy(o.strategy, evaluator, by_cost, goal, curve=curve, probe_samples=o.probe_samples)
        uniform = [(fmt, total[fmt], m) for fmt, m in sorted(outcome.measured.items(), key=lambda fm: total[fm[0]])]
        best_uniform = (outcome.choice, total[outcome.choice], outcome.measurement) if outcome.choice is not None else None
        choice = {layer.weight: best_uniform[0] for layer in layers} if best_uniform else None
        measured = best_uniform[2] if best_uniform else None
        chosen_cost = best_uniform[1] if best_uniform else None

        budget_steps: list[dict] = []
        if o.granularity == "layer":
            # Each layer alone in each format, the formats' own numerics (see FormatEvaluator.measure).
            few = o.layer_samples or None
            base = evaluator.measure({}, as_run=False, samples=few)  # activations alone
            alone = evaluator.measure_many([{layer.weight: f} for layer in layers for f in formats], as_run=False, samples=few)
            damage = np.maximum(np.array([m.noise for m in alone]).reshape(len(layers), len(formats)) - base.noise, 0.0)
            # The integer program spends a budget of summed per-layer noise; whether a budget meets
            # the goal end to end is measured (noises add only approximately, and a top-1 goal has
            # no noise equivalent). Start where the goal says (an SQNR floor) or at the best uniform
            # format's noise, then bracket the largest budget that meets: loosen while it meets,
            # tighten while it misses, bisect (geometrically) once both are known.
            if o.min_sqnr > 0:
                allowed = evaluator.signal * 10 ** (-o.min_sqnr / 10) - base.noise
            elif measured is not None:
                allowed = measured.noise - base.noise
            else:
                allowed = evaluator.signal * 1e-2
            allowed = max(allowed, float(damage[damage > 0].min()) if (damage > 0).any() else 1e-30)
            met_at, missed_at, seen = None, None, {}
            for _ in range(_BUDGET_STEPS):
                try:
                    pick = tuple(int(k) for k in solve_ilp(cost, damage, allowed, "noise"))
                except QCError:
                    pick = None  # nothing fits this noise budget: too tight
                if pick is None:
                    meets_here = False
                else:
                    candidate = {layer.weight: formats[k] for layer, k in zip(layers, pick)}
                    if pick not in seen:
                        seen[pick] = evaluator.measure(candidate)
                    m = seen[pick]
                    e = float(cost[np.arange(len(layers)), list(pick)].sum())
                    meets_here = meets(m)
                    budget_steps.append({"allowed_noise": allowed, "cost": round(e, 1), "sqnr_db": round(m.sqnr_db, 3), "top1": m.top1, "met": meets_here})
                    if meets_here and (chosen_cost is None or e < chosen_cost):
                        choice, measured, chosen_cost = candidate, m, e
                if meets_here:
                    met_at = allowed
                else:
                    missed_at = allowed
                if met_at is not None and missed_at is not None:
                    if missed_at / met_at < 1.25:
                        break
                    allowed = math.sqrt(met_at * missed_at)
                else:
                    allowed = allowed * 4 if meets_here else allowed / 4

        goal_met = choice is not None
        if not goal_met:
            # Nothing met the goal: the most accurate candidate measured, and how far it is.
            fmt, m = outcome.best
            choice, measured, chosen_cost = {layer.weight: fmt for layer in layers}, m, total[fmt]
            goal_text = f"{o.min_sqnr:g} dB" if o.min_sqnr > 0 else f"top-1 drop <= {o.max_drop:g}"
            ctx.note(self.name, f"no candidate met the goal ({goal_text}); wrote the most accurate one: {fmt.name} everywhere, "
                                f"SQNR {m.sqnr_db:.2f} dB" + (f", top-1 {m.top1:.2f} % (float {float_top1:.2f} %)" if m.top1 is not None else ""), level="warning")
        index = {f: j for j, f in enumerate(formats)}
        chosen_energy = float(sum(energy[i, index[choice[layer.weight]]] for i, layer in enumerate(layers)))
        chosen_time = float(sum(layer_time(layer, choice[layer.weight], activation, table) for layer in layers))
        written = evaluator.build(choice)
        stats = {
            "granularity": o.granularity,
            "strategy": o.strategy,
            "objective": o.objective,
            "candidates": len(formats),
            "full_evaluations": outcome.full_evaluations,
            "probes": outcome.probes,
            "strategy_seconds": outcome.seconds,
            "predicted": outcome.predicted.name if outcome.predicted is not None else None,
            "predictor_fitted_on": curve.fitted_on if curve is not None else None,
            "activations": activation.name,
            "energy_table": table.name,
            "goal": {"min_sqnr_db": o.min_sqnr if o.min_sqnr > 0 else None, "max_drop": o.max_drop if o.max_drop >= 0 else None},
            "goal_met": goal_met,
            "samples": held.num_samples,
            "evaluations": evaluator.evaluations,
            "failed_evaluations": evaluator.failed,
            "workers": evaluator.workers,
            "executor": o.executor,
            "seconds": round(time.perf_counter() - start, 2),
            "layers": {layer.node: choice[layer.weight].name for layer in layers},
            # MACs and weight reads (the activations' traffic is the same for every candidate).
            "energy_pj": round(chosen_energy, 1),
            "fp32_energy_pj": round(fp32_energy, 1),
            "energy_vs_fp32": round(fp32_energy / chosen_energy, 3) if chosen_energy else None,
            # Hill et al.'s "speedup": MACs per unit time on an iso-area array, fp32 over the chosen formats.
            "iso_area_speedup": round(sum(layer.macs for layer in layers) / chosen_time, 3) if chosen_time else None,
            # The objective's modelled cost (energy in pJ, or time in fp32-MAC times) against fp32's.
            "cost": round(chosen_cost, 1),
            "fp32_cost": round(fp32_cost, 1),
            "cost_vs_fp32": round(fp32_cost / chosen_cost, 3) if chosen_cost else None,
            "sqnr_db": round(measured.sqnr_db, 3),
            "top1": measured.top1,
            "float_top1": float_top1,
            "uniform": [{"format": f.name, "energy_pj": round(float(energy[:, index[f]].sum()), 1), "cost": round(c, 1), "sqnr_db": round(m.sqnr_db, 3), "top1": m.top1,
                         "r2": None if np.isnan(m.r2) else round(m.r2, 6), "meets_goal": meets(m)} for f, c, m in uniform],
            "best_uniform": best_uniform[0].name if best_uniform else None,
            "energy_vs_best_uniform": round(float(energy[:, index[best_uniform[0]]].sum()) / chosen_energy, 3) if best_uniform and chosen_energy else None,
            "cost_vs_best_uniform": round(best_uniform[1] / chosen_cost, 3) if best_uniform and chosen_cost else None,
            "trail": outcome.trail,
            "budget_steps": budget_steps,
        }
        return PassResult(written, True, stats)
