"""hessian-trace: per-weight Hessian traces (Hutchinson), cached for the passes that weigh by them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from qcompiler.hessian import HESSIAN_FACT, HessianTrace
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass

@register_pass
class HessianTracePass(Pass):
    """Estimate Tr(H) of the loss for every weight tensor (Rademacher probes: Gauss-Newton backward passes, or double backward)."""

    name = "hessian-trace"
    requires = (HessianTrace,)
    preserves = "all"  # analysis only

    @dataclass(frozen=True)
    class Options:
        #: Stop when every layer's relative standard error is below this.
        tolerance: float = 0.25
        max_probes: int = 100
        batch_size: int = 64
        #: Samples of the data used (the first ones).
        samples: int = 1000
        #: auto: cross-entropy with labels, else KL (classifiers) or MSE against the float model's outputs.
        loss: Literal["auto", "cross-entropy", "kl", "mse"] = "auto"
        #: JSON file that keeps the traces: reused when model, data and options are unchanged.
        cache: str = ""
        #: auto: gauss-newton where it is exact (every weight enters the output piecewise linearly:
        #: Conv/Gemm/MatMul, ReLU, pooling, adds; one backward pass per probe for all layers), else
        #: hessian-vector (a double backward per layer and probe; any graph). gauss-newton forced
        #: on a curved graph (Tanh, Softmax, LayerNorm, ...) estimates the Gauss-Newton traces.
        estimator: Literal["auto", "gauss-newton", "hessian-vector"] = "auto"

        def __post_init__(self) -> None:
            if not 0 < self.tolerance < 1:
                raise ValueError(f"option 'tolerance' must be in (0, 1), got {self.tolerance}")
            if self.max_probes < 2 or self.batch_size < 1 or self.samples < 1:
                raise ValueError("options 'max-probes' must be >= 2, 'batch-size' and 'samples' >= 1")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        o = self.options
        analysis = HessianTrace(tolerance=o.tolerance, max_probes=o.max_probes, batch_size=o.batch_size, samples=o.samples, loss=o.loss, seed=ctx.seed, cache=o.cache, estimator=o.estimator)
        result = ctx.analyses.get(analysis, model, ctx)
        ctx.facts[HESSIAN_FACT] = analysis
        worst = max(e.relative_stderr for e in result.estimates.values())
        if not result.converged:
            ctx.note(self.name, f"tolerance {o.tolerance} not reached after {result.probes} probes (worst relative standard error {worst:.3f}); intervals are in the report", level="warning")
        traces = {name: {"node": e.node, "trace": e.trace, "ci95": list(e.ci95), "parameters": e.parameters, "probes": e.probes} for name, e in result.estimates.items()}
        return PassResult(model, False, {"loss": result.loss, "estimator": result.estimator, "probes": result.probes, "converged": result.converged, "worst_relative_stderr": round(worst, 4), "traces": traces})
