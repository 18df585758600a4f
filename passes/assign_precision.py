"""assign-precision: per-layer weight bit-widths under a budget, chosen from the target's allowed set.

Sensitivities Omega_l(b) come from the Hessian traces (`hessian-trace`, run first or computed here
with its defaults). ``method=ilp`` solves the assignment exactly; ``uniform``, ``greedy`` and
``random`` are the baselines, in the same code path so they are compared at equal budget.
`insert-qdq` then quantizes each weight at its assigned width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.hessian import HESSIAN_FACT, HessianTrace
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import WEIGHT_BITS_FACT
from qcompiler.precision_ilp import pareto_front, solve_greedy, solve_ilp, solve_random, solve_uniform
from qcompiler.registry import register_pass
from qcompiler.sensitivity import WeightRange, layer_sensitivities

_BUDGET_KINDS = ("size", "bits")


def parse_budget(text: str, weights: int, int8_bits: int = 8) -> float:
    """A budget text (``size=0.6`` or ``bits=4.5``) as a number of weight bits."""
    kind, eq, value = text.partition("=")
    if not eq or kind not in _BUDGET_KINDS:
        raise QCError(f"'{text}' is not a budget (accepted: size=FRACTION of the int8 weight bytes, bits=AVERAGE bits per weight)", pass_name="assign-precision", option="budget")
    try:
        number = float(value)
    except ValueError:
        raise QCError(f"'{value}' is not a number", pass_name="assign-precision", option="budget") from None
    if number <= 0:
        raise QCError(f"the budget must be positive, got {number}", pass_name="assign-precision", option="budget")
    return number * int8_bits * weights if kind == "size" else number * weights


@register_pass
class AssignPrecision(Pass):
    """Choose per-layer weight bit-widths under a size or bits budget (exact ILP on Hessian sensitivities)."""

    name = "assign-precision"
    requires = (HessianTrace,)
    preserves = "all"  # decides; insert-qdq rewrites

    @dataclass(frozen=True)
    class Options:
        #: size=FRACTION of the int8 model's weight bytes, or bits=AVERAGE bits per weight.
        budget: str = "size=0.6"
        method: Literal["ilp", "uniform", "greedy", "random"] = "ilp"
        #: Budgets at which the exact optimum is recorded for the Pareto front (0: none).
        pareto_points: int = 12
        #: Also measure the real loss change of quantizing each layer alone to this many bits, and
        #: report its Spearman rank correlation with the Hessian estimate (0: skip; costs one
        #: forward pass over 256 samples per layer).
        check_bits: int = 0
        #: Samples the empirical check measures on (the first ones). Its loss changes are small
        #: differences of large means: with fewer than a few thousand samples the first-order
        #: noise of the subset swamps them (ResNet-20: Spearman 0.17 on 256, 0.75 on 5,000).
        check_samples: int = 5000
        #: The weight quantizer the sensitivities are scored with; keep it equal to insert-qdq's.
        weight_range: WeightRange = "auto"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        # The traces the pipeline's hessian-trace pass computed (same options), else its defaults.
        analysis = ctx.facts.get(HESSIAN_FACT, HessianTrace(seed=ctx.seed))
        traces = ctx.analyses.get(analysis, model, ctx)
        bits = ctx.target.bits.allowed
        layers = layer_sensitivities(model, traces, ctx.target.weights, bits, self.options.weight_range)
        sizes = np.array([l.parameters for l in layers], dtype=np.float64)
        omega = np.array([[l.omega[b] for b in bits] for l in layers])
        budget = parse_budget(self.options.budget, int(sizes.sum()))
        method = self.options.method
        if method == "ilp":
            choice = solve_ilp(omega, sizes, bits, budget)
        elif method == "greedy":
            choice = solve_greedy(omega, sizes, bits, budget)
        elif method == "uniform":
            choice = solve_uniform(sizes, bits, budget)
        else:
            choice = solve_random(sizes, bits, budget, seed=ctx.seed)
        chosen = {l.weight: int(bits[c]) for l, c in zip(layers, choice)}
        ctx.facts[WEIGHT_BITS_FACT] = chosen
        total = float(omega[np.arange(len(layers)), choice].sum())
        used = float(np.sum(sizes * np.asarray(bits)[choice]))
        stats = {
            "method": method,
            "budget_bytes": round(budget / 8),
            "weight_bytes": round(used / 8),
            "average_bits": round(used / sizes.sum(), 3),
            "total_sensitivity": total,
            "layers": {l.weight: {"node": l.node, "bits": chosen[l.weight], "sensitivity": l.omega[chosen[l.weight]], "trace": l.trace} for l in layers},
        }
        if self.options.check_bits:
            stats["check"] = self._empirical_check(model, ctx, layers)
        if self.options.pareto_points:
            stats["pareto"] = [{"weight_bytes": b, "total_sensitivity": s} for b, s in pareto_front(omega, sizes, bits, self.options.pareto_points)]
        return PassResult(model, False, stats)

    def _empirical_check(self, model: ir.Model, ctx: PassContext, layers: list) -> dict:
        from scipy.stats import spearmanr

        from qcompiler.sensitivity import measured_loss_increase, weight_sensitivity

        bits, wanted, weight_range = self.options.check_bits, self.options.check_samples, self.options.weight_range
        available = ctx.data.usable_samples if ctx.data is not None else 0
        if available < wanted:
            ctx.note(self.name, f"the empirical check measures on {available} samples (check-samples={wanted}); below a few thousand its loss changes are mostly sampling noise", level="warning")
        names = [l.weight for l in layers]
        measured = measured_loss_increase(model, ctx.data, ctx.target.weights, bits, names, samples=wanted, weight_range=weight_range)
        estimated = [l.omega[bits] if bits in l.omega else weight_sensitivity(model, l, ctx.target.weights, bits, weight_range) for l in layers]
        rho = float(spearmanr(estimated, [measured[n] for n in names]).statistic)
        return {"bits": bits, "samples": min(available, wanted), "spearman": rho, "measured_loss_increase": measured}
