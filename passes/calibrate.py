"""calibrate: observe activation ranges on calibration data and make them the ranges later passes use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from qcompiler.calibration import CALIBRATION_FACT, CalibrationRanges
from qcompiler.ir import annotate_types
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass


@register_pass
class Calibrate(Pass):
    """Run the calibration data through the model and record activation ranges (minmax, percentile, entropy, mse)."""

    name = "calibrate"
    requires = (CalibrationRanges,)
    preserves = "all"  # analysis only: the graph is not touched

    @dataclass(frozen=True)
    class Options:
        method: Literal["minmax", "percentile", "entropy", "mse"] = "mse"
        #: Percentile kept by ``method=percentile`` (the rest is clipped).
        percentile: float = 99.99
        #: Histogram bins per sign for the histogram methods.
        bins: int = 2048
        batch_size: int = 32

        def __post_init__(self) -> None:
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError(f"option 'percentile' must be in (50, 100], got {self.percentile}")
            # An upper bound too: every observed tensor keeps a histogram of this many bins.
            if not 16 <= self.bins <= 1 << 20 or self.batch_size < 1:
                raise ValueError("options 'bins' must be in [16, 1048576] and 'batch-size' >= 1")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        o = self.options
        # Activations are found by type: a pass before this one may have left values untyped
        # (annotation only; the graph's meaning is unchanged).
        annotate_types(model)
        analysis = CalibrationRanges(method=o.method, percentile=o.percentile, bins=o.bins, batch_size=o.batch_size)
        observers = ctx.analyses.get(analysis, model, ctx)
        # Later passes ask for this analysis; if a rewrite invalidates it, it is recomputed with
        # these same settings on the rewritten model.
        ctx.facts[CALIBRATION_FACT] = analysis
        samples = ctx.data.usable_samples if ctx.data is not None else 0
        return PassResult(model, False, {"tensors": len(observers), "samples": samples, "method": o.method})
