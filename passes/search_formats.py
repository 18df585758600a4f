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

    search-formats{formats=int8|int4|e4m3fn|mxfp4,activations=uint8,min-sqnr=25}
    search-formats{granularity=network,max-drop=1.0}            # with labels in the data
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.energy_model import load_energy_table
from qcompiler.errors import QCError
from qcompiler.ir import upgraded_to
from qcompiler.format_search import ACTIVATION_FORMATS, FP32, FormatEvaluator, Measurement, layer_energy_pj
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision_ilp import solve_ilp
from qcompiler.quant.formats import parse_format
from qcompiler.registry import register_pass

#: How many times the layer-wise answer is tightened when it misses the goal end to end.
_TIGHTENINGS = 8


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
        #: Candidate weight formats, separated by '|' (any name `qcompiler.quant.formats` parses).
        formats: str = "int8|int4|int2|e4m3fn|e5m2|mxfp8|mxfp6|mxfp4|nvfp4|fp16"
        #: The format of every layer input: fp32, fp16, uint8, int8, e4m3fn or e5m2.
        activations: str = "uint8"
        #: ``layer``: a format per layer (exact integer program over measured damage);
        #: ``network``: one format for all, every candidate measured.
        granularity: Literal["layer", "network"] = "layer"
        #: Goal: output SQNR against the float model, in dB (0: none).
        min_sqnr: float = 25.0
        #: Goal: top-1 drop against the float model, in points, on the labels in the data (-1: none).
        max_drop: float = -1.0
        #: The last N calibration samples every candidate runs on.
        samples: int = 512
        #: Energy table (built-in name or .toml); empty: the target's.
        energy: str = ""
        #: Worker processes measuring candidates side by side, one onnxruntime thread each
        #: (0: one per CPU this process may use; 1: all in this process, onnxruntime's threads).
        workers: int = 0
        #: ``process``: local worker processes; ``ray``: Ray actors, on a local Ray with
        #: ``workers`` CPUs or on the cluster at ``ray-address`` (the optional extra qcompiler[ray]).
        executor: Literal["process", "ray"] = "process"
        ray_address: str = ""

        def __post_init__(self) -> None:
            for name in self.formats.split("|"):
                parse_format(name)
            if self.activations not in ACTIVATION_FORMATS:
                raise ValueError(f"option 'activations' must be one of {', '.join(ACTIVATION_FORMATS)}")
            if self.min_sqnr <= 0 and self.max_drop < 0:
                raise ValueError("give a goal: 'min-sqnr' > 0 (dB) or 'max-drop' >= 0 (points, with labels)")
            if self.samples < 1:
                raise ValueError("option 'samples' must be >= 1")
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
                                    executor=o.executor, ray_address=o.ray_address)
        try:
            return self._search(model, ctx, evaluator, held, activation, start)
        finally:
            evaluator.close()

    def _search(self, model: ir.Model, ctx: PassContext, evaluator: FormatEvaluator, held, activation, start: float) -> PassResult:
        o = self.options
        table = load_energy_table(o.energy or ctx.target.energy_table)
        formats = list(dict.fromkeys(parse_format(n) for n in o.formats.split("|")))
        layers = evaluator.layers
        energy = np.array([[layer_energy_pj(layer, f, activation, table) for f in formats] for layer in layers])
        fp32_energy = float(sum(layer_energy_pj(layer, FP32, FP32, table) for layer in layers))
        float_top1 = evaluator.float_top1()

        def meets(m: Measurement) -> bool:
            ok = o.min_sqnr <= 0 or m.sqnr_db >= o.min_sqnr
            if o.max_drop >= 0 and m.top1 is not None and float_top1 is not None:
                ok = ok and float_top1 - m.top1 <= o.max_drop
            return ok

        # One format for the whole network: each measured (the best uniform, and Hill's search).
        measured_uniform = evaluator.measure_many([{layer.weight: fmt for layer in layers} for fmt in formats])
        uniform = [(fmt, float(energy[:, j].sum()), m) for j, (fmt, m) in enumerate(zip(formats, measured_uniform))]
        passing = [u for u in uniform if meets(u[2])]
        best_uniform = min(passing, key=lambda u: u[1]) if passing else None
        choice = {layer.weight: best_uniform[0] for layer in layers} if best_uniform else None
        measured = best_uniform[2] if best_uniform else None
        chosen_energy = best_uniform[1] if best_uniform else None

        tightened = 0
        if o.granularity == "layer":
            # Each layer alone in each format, the formats' own numerics (see FormatEvaluator.measure).
            base = evaluator.measure({}, as_run=False)  # activations alone
            alone = evaluator.measure_many([{layer.weight: f} for layer in layers for f in formats], as_run=False)
            damage = np.maximum(np.array([m.noise for m in alone]).reshape(len(layers), len(formats)) - base.noise, 0.0)
            allowed = evaluator.signal * 10 ** (-o.min_sqnr / 10) - base.noise if o.min_sqnr > 0 else evaluator.signal * 1e-2
            while allowed > 0 and tightened <= _TIGHTENINGS:
                try:
                    pick = solve_ilp(energy, damage, allowed, "noise")
                except QCError:
                    break  # nothing fits this noise budget
                candidate = {layer.weight: formats[k] for layer, k in zip(layers, pick)}
                m = evaluator.measure(candidate)
                e = float(energy[np.arange(len(layers)), pick].sum())
                if meets(m):
                    if chosen_energy is None or e < chosen_energy:
                        choice, measured, chosen_energy = candidate, m, e
                    break
                # The noises did not add up as assumed: ask for less, in proportion to the miss.
                allowed *= min(0.7, max(0.1, allowed / max(m.noise - base.noise, 1e-30)))
                tightened += 1

        goal_met = choice is not None
        if not goal_met:
            # Nothing met the goal: the most accurate candidate measured, and how far it is.
            fmt, e, m = max(uniform, key=lambda u: u[2].sqnr_db)
            choice, measured, chosen_energy = {layer.weight: fmt for layer in layers}, m, e
            goal = f"{o.min_sqnr:g} dB" if o.min_sqnr > 0 else f"top-1 drop <= {o.max_drop:g}"
            ctx.note(self.name, f"no candidate met the goal ({goal}); wrote the most accurate one: {fmt.name} everywhere, "
                                f"SQNR {m.sqnr_db:.2f} dB" + (f", top-1 {m.top1:.2f} % (float {float_top1:.2f} %)" if m.top1 is not None else ""), level="warning")
        written = evaluator.build(choice)
        stats = {
            "granularity": o.granularity,
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
            "sqnr_db": round(measured.sqnr_db, 3),
            "top1": measured.top1,
            "float_top1": float_top1,
            "uniform": [{"format": f.name, "energy_pj": round(e, 1), "sqnr_db": round(m.sqnr_db, 3), "top1": m.top1, "meets_goal": meets(m)} for f, e, m in uniform],
            "best_uniform": best_uniform[0].name if best_uniform else None,
            "energy_vs_best_uniform": round(best_uniform[1] / chosen_energy, 3) if best_uniform and chosen_energy else None,
            "tightened": tightened,
        }
        return PassResult(written, True, stats)
