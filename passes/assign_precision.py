"""assign-precision: per-layer weight bit-widths under a budget, chosen from the target's allowed set.

Sensitivities Omega_l(b) come from the Hessian traces (`hessian-trace`, run first or computed here
with its defaults). ``method=ilp`` solves the assignment exactly; ``uniform``, ``greedy`` and
``random`` are the baselines, in the same code path so they are compared at equal budget.
`insert-qdq` then quantizes each weight at its assigned width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from qcompiler.targets.spec import FLOAT_WIDTH, TargetSpec

from qcompiler.budget import _UNITS, BUDGET_KINDS, Budget  # noqa: F401 - BUDGET_KINDS re-exported
from qcompiler.cost_model import layer_macs, resource_matrix
from qcompiler.errors import QCError
from qcompiler.hessian import HESSIAN_FACT, HessianTrace
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import (
    ACTIVATION_BITS_FACT,
    WEIGHT_BITS_FACT,
    checked_activation_bits,
)
from qcompiler.precision_ilp import (
    pareto_front,
    smallest_feasible,
    solve_greedy,
    solve_ilp,
    solve_random,
    solve_uniform,
)
from qcompiler.registry import register_pass
from qcompiler.sensitivity import TraceBound, layer_sensitivities
from qcompiler.quant.weights import WeightRange


def budget_pipeline(spec: TargetSpec, budget: str, *, option: str = "budget") -> str:
    """The target's ``mixed_pipeline`` with assign-precision's budget set to ``budget``.

    What ``qc compile --budget`` and ``qcompiler.compile(budget=...)`` run. Errors name ``option``:
    a target without a mixed-precision pipeline, or a budget that does not parse.
    """
    from qcompiler.pipeline import split_pipeline

    if not spec.mixed_pipeline:
        raise QCError(f"target '{spec.name}' has no mixed-precision pipeline (its file sets no mixed_pipeline, or [bits] allows one weight width: {list(spec.bits.allowed)})", option=option)
    try:
        # Checked here, before the passes: hessian-trace takes minutes before assign-precision reads it.
        Budget.parse(budget)
    except QCError as exc:
        raise QCError(exc.message, option=option) from None
    steps = []
    for step in split_pipeline(spec.mixed_pipeline):
        options = list(step.options) + ([("budget", budget)] if step.name == AssignPrecision.name else [])
        steps.append(step.name + ("{" + ",".join(f"{k}={v}" for k, v in options) + "}" if options else ""))
    return ",".join(steps)


def parse_budget(text: str, weights: int, int8_bits: int = 8) -> float:
    """A size or bits budget text as a number of weight bits (for ``weights`` parameters)."""
    budget = Budget.parse(text)
    if budget.kind not in ("size", "bits"):
        raise QCError(f"'{text}': only size= and bits= budgets are a number of weight bits", pass_name="assign-precision", option="budget")
    return budget.number * (int8_bits if budget.kind == "size" else 1) * weights


@register_pass
class AssignPrecision(Pass):
    """Choose per-layer weight bit-widths under a size, bits, bops or latency budget (exact ILP on Hessian sensitivities)."""

    name = "assign-precision"
    requires = (HessianTrace,)
    preserves = "all"  # decides; insert-qdq rewrites

    @dataclass(frozen=True)
    class Options:
        #: size=FRACTION of the int8 model's weight bytes, bits=AVERAGE bits per weight,
        #: bops=FRACTION of its bit operations, latency=FRACTION of its predicted latency.
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
        #: The loss the empirical check measures: the one the traces were estimated with, or
        #: ``kl`` (``mse``) against the float network's outputs. At a minimum of the training loss
        #: both have the same second-order term, but cross-entropy on a data subset adds a
        #: first-order one, g . dW, whose sampling noise can be as large as the changes being ranked
        #: (ResNet-56, 4 bits: about 1e-4 per layer); against the float outputs it is exactly zero.
        check_loss: Literal["traces", "cross-entropy", "kl", "mse"] = "traces"
        #: The weight quantizer the sensitivities are scored with; keep it equal to insert-qdq's.
        weight_range: WeightRange = "auto"
        #: Width of every quantized activation, one of the target's [bits] activations (0: the
        #: activation dtype's own). Below the dtype's width insert-qdq lowers each activation
        #: quantizer as QuantizeLinear -> Clip -> DequantizeLinear; bops budgets count it.
        activation_bits: int = 0
        #: The value of each trace estimate Omega uses: its mean, or the upper end of its 95 %
        #: interval, so a layer whose trace the probes left uncertain is not spent as if flat.
        trace: TraceBound = "mean"
        #: Widths below this many bits are scored by the larger of the Hessian estimate and the
        #: measured damage of quantizing each layer alone to them: the KL divergence of the
        #: network's outputs from the float ones (MSE for non-classifiers) on `measure-samples`
        #: samples, one forward pass per layer and width. The second-order estimate holds for
        #: small perturbations; at 2-3 bits it underrates the damage (ResNet-56's last stage at 3
        #: bits: 5-8x the predicted loss change, and an ILP free to use 3 bits lost to uniform
        #: 4-bit). 0: Hessian only.
        measure_below: int = 4
        measure_samples: int = 1000
        #: How method=ilp picks its answer. ``estimate``: the optimum of the summed sensitivities.
        #: ``measured``: for every width f the budget can give all layers, the optimum with no
        #: layer below f bits is also solved, with Omega as scored (narrow widths measured) and
        #: with the Hessian estimate alone; each distinct candidate is measured with all its
        #: weights quantized at once (KL of the outputs from the float ones, `measure-samples`
        #: samples) and the lowest measured loss wins: the sums assume the layers' errors add up,
        #: and narrow layers' errors compound. One forward pass per candidate. Opt-in: it measures
        #: the weights alone on calibration images, which may be images the model memorised; on
        #: ResNet-20 at 0.35x it picked an assignment 4.7 points better, on ResNet-56 at 0.6x one
        #: 0.4 points worse (KL 0.0008 against 0.0013).
        select: Literal["estimate", "measured"] = "estimate"
        #: JSON file that keeps the measured damage for later compiles of the same model and data
        #: (a sweep over budgets or methods then measures once); empty: no file.
        measure_cache: str = ""

        def __post_init__(self) -> None:
            # When the pipeline is parsed: a typo should not wait for minutes of Hessian traces.
            Budget.parse(self.budget)
            if self.measure_below < 0 or self.measure_samples < 1:
                raise ValueError("options 'measure-below' must be >= 0 and 'measure-samples' >= 1")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        # Option checks first: the traces and measurements below take minutes on a deep model.
        activation_bits = checked_activation_bits(ctx.target, self.options.activation_bits, self.name)
        # The traces the pipeline's hessian-trace pass computed (same options), else its defaults.
        analysis = ctx.facts.get(HESSIAN_FACT, HessianTrace(seed=ctx.seed))
        traces = ctx.analyses.get(analysis, model, ctx)
        bits = ctx.target.bits.allowed
        layers = layer_sensitivities(model, traces, ctx.target.weights, bits, self.options.weight_range, self.options.trace)
        sizes = np.array([l.parameters for l in layers], dtype=np.float64)
        omega = np.array([[l.omega[b] for b in bits] for l in layers])
        hessian_only = omega.copy()
        measured = self._measure_narrow(model, ctx, layers, bits, traces.loss, omega)
        budget = Budget.parse(self.options.budget)
        if self.options.activation_bits:
            ctx.facts[ACTIVATION_BITS_FACT] = activation_bits
        macs = None
        if budget.kind in ("bops", "latency"):
            macs = np.array([layer_macs(model, l.weight, l.node) for l in layers], dtype=np.float64)
        op_of = {n.name: n.op_type for n in model.graph}
        op_types = [op_of.get(l.node, "") for l in layers]
        cost = resource_matrix(budget.kind, ctx.target, bits, sizes, macs, activation_bits, op_types)
        # The reference is the widest integer width (a float option, 32, costs more than it).
        full = max((j for j, b in enumerate(bits) if b != FLOAT_WIDTH), key=lambda j: bits[j])
        # The reference is the full-width model: every weight at full width, activations at the
        # activation dtype's width (W8A8 on ort-cpu), whatever activation-bits says.
        full_width = float(resource_matrix(budget.kind, ctx.target, bits, sizes, macs, op_types=op_types)[:, full].sum())
        limit = budget.limit(full_width, sizes)
        unit = _UNITS[budget.kind]
        smallest = smallest_feasible(cost)
        if limit < smallest * (1 - 1e-9):
            # Said in the budget's own terms, so the user can type the number back in.
            least = smallest / float(sizes.sum()) if budget.kind == "bits" else smallest / full_width
            raise QCError(f"no assignment meets {budget.kind}={budget.number:g}; the smallest feasible is {budget.kind}={math.ceil(least * 1000) / 1000:g} (every layer at its cheapest width)", pass_name=self.name, option="budget")
        method = self.options.method
        selection = None
        if method == "ilp" and self.options.select == "measured" and ctx.data is not None:
            choice, selection = self._select_measured(model, ctx, layers, bits, {"measured": omega, "hessian": hessian_only}, cost, limit, unit, traces.loss)
        elif method == "ilp":
            choice = solve_ilp(omega, cost, limit, unit)
        elif method == "greedy":
            choice = solve_greedy(omega, cost, bits, limit, unit)
        elif method == "uniform":
            choice = solve_uniform(cost, bits, limit, unit)
        else:
            choice = solve_random(cost, bits, limit, seed=ctx.seed, unit=unit)
        chosen = {l.weight: int(bits[c]) for l, c in zip(layers, choice)}
        ctx.facts[WEIGHT_BITS_FACT] = chosen
        rows = np.arange(len(layers))
        total = float(omega[rows, choice].sum())
        used = float(np.sum(sizes * np.asarray(bits)[choice]))
        stats = {
            "method": method,
            "activation_bits": activation_bits,
            "budget": {"kind": budget.kind, "value": budget.number, "limit": limit, "used": float(cost[rows, choice].sum()), "full_width": full_width, "unit": unit},
            "weight_bytes": round(used / 8),
            "average_bits": round(used / sizes.sum(), 3),
            "total_sensitivity": total,
            "layers": {l.weight: {"node": l.node, "bits": chosen[l.weight], "sensitivity": float(omega[i, choice[i]]), "trace": l.trace} for i, l in enumerate(layers)},
            "measured_widths": measured,
        }
        if selection is not None:
            stats["selection"] = selection
        if self.options.check_bits:
            stats["check"] = self._empirical_check(model, ctx, layers, traces.loss)
        if self.options.pareto_points:
            stats["pareto"] = [{"resource": r, "total_sensitivity": t} for r, t in pareto_front(omega, cost, self.options.pareto_points)]
        return PassResult(model, False, stats)

    def _measure_narrow(self, model: ir.Model, ctx: PassContext, layers: list, bits: tuple[int, ...], loss: str, omega: np.ndarray) -> list[int]:
        """Raise Omega at widths below measure-below to the measured damage (in place); the widths measured."""
        from qcompiler.sensitivity import MeasuredDamage

        narrow = [j for j, b in enumerate(bits) if b < self.options.measure_below]
        if not narrow or ctx.data is None:
            return []
        # Label-free on purpose: against the float outputs the loss change has no first-order
        # term, so no sampling noise of a gradient swamps it (cross-entropy's does at 1,000).
        free = "kl" if loss in ("cross-entropy", "kl") else "mse"
        names = tuple(l.weight for l in layers)
        analysis = MeasuredDamage(tuple(bits[j] for j in narrow), names, loss=free, samples=self.options.measure_samples,
                                  weight_range=self.options.weight_range, cache=self.options.measure_cache)
        damage = ctx.analyses.get(analysis, model, ctx)
        for j in narrow:
            # HAWQ's Omega, Tr(H)/n ||dW||^2, is twice the second-order loss change it predicts:
            # the measured change is doubled into the same units.
            omega[:, j] = np.maximum(omega[:, j], [2.0 * damage[bits[j]][n] for n in names])
        return [bits[j] for j in narrow]

    def _select_measured(self, model: ir.Model, ctx: PassContext, layers: list, bits: tuple[int, ...], estimates: dict[str, np.ndarray], cost: np.ndarray,
                         limit: float, unit: str, loss: str) -> tuple[np.ndarray, list[dict]]:
        """The candidate that measures lowest, and every candidate: for each estimate (Omega with
        narrow widths measured, and the Hessian alone where they differ) its optimum and its
        optima with no layer below each width f the budget can give all layers."""
        from qcompiler.sensitivity import measured_assignment_loss

        candidates: list[tuple[str, int, np.ndarray]] = []
        for estimate, omega in estimates.items():
            for floor in sorted(set(bits)):
                columns = np.flatnonzero(np.asarray(bits) >= floor)
                if smallest_feasible(cost[:, columns]) > limit * (1 + 1e-9):
                    break
                choice = columns[solve_ilp(omega[:, columns], cost[:, columns], limit, unit)]
                if not any(np.array_equal(choice, c) for _, _, c in candidates):
                    candidates.append((estimate, floor, choice))
        rows = np.arange(len(layers))
        first = estimates[candidates[0][0]]
        described = [{"estimate": e, "floor": f, "total_sensitivity": float(first[rows, c].sum())} for e, f, c in candidates]
        if len(candidates) == 1:
            return candidates[0][2], [described[0] | {"measured_loss_increase": None, "selected": True}]
        free = "kl" if loss in ("cross-entropy", "kl") else "mse"
        assignments = [{l.weight: int(bits[c]) for l, c in zip(layers, choice)} for _, _, choice in candidates]
        measured = measured_assignment_loss(model, ctx.data, ctx.target.weights, assignments, loss=free, samples=self.options.measure_samples, weight_range=self.options.weight_range)
        best = int(np.argmin(measured))
        return candidates[best][2], [d | {"measured_loss_increase": m, "loss": free, "selected": i == best} for i, (d, m) in enumerate(zip(described, measured))]

    def _empirical_check(self, model: ir.Model, ctx: PassContext, layers: list, loss: str) -> dict:
        from scipy.stats import spearmanr

        from qcompiler.sensitivity import measured_loss_increase, weight_sensitivity

        bits, wanted, weight_range = self.options.check_bits, self.options.check_samples, self.options.weight_range
        available = ctx.data.usable_samples if ctx.data is not None else 0
        if available < wanted:
            ctx.note(self.name, f"the empirical check measures on {available} samples (check-samples={wanted}); below a few thousand its loss changes are mostly sampling noise", level="warning")
        if self.options.check_loss != "traces":
            loss = self.options.check_loss
        if loss == "cross-entropy" and (ctx.data is None or ctx.data.labels is None):
            raise QCError("check-loss=cross-entropy needs 'labels' in the data file", pass_name=self.name, option="check-loss")
        names = [l.weight for l in layers]
        measured = measured_loss_increase(model, ctx.data, ctx.target.weights, bits, names, loss=loss, samples=wanted, weight_range=weight_range)
        estimated = [l.omega[bits] if bits in l.omega else weight_sensitivity(model, l, ctx.target.weights, bits, weight_range) for l in layers]
        rho = float(spearmanr(estimated, [measured[n] for n in names]).statistic)
        return {"bits": bits, "samples": min(available, wanted), "loss": loss, "spearman": rho, "measured_loss_increase": measured}
