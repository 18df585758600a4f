"""hessian-diagonal: per-weight Hessian diagonal h_ii (Hutchinson) or the empirical Fisher, cached for
the passes that weight quantization error by it (Hessian-weighted clustering)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.hessian import HessianDiagonal
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass

#: The facts key under which the pass records the analysis it ran (its options).
HESSIAN_DIAGONAL_FACT = "hessian-diagonal"


@register_pass
class HessianDiagonalPass(Pass):
    """Estimate the Hessian diagonal of every weight (Hutchinson) or its empirical Fisher approximation."""

    name = "hessian-diagonal"
    requires = (HessianDiagonal,)
    preserves = "all"  # analysis only

    @dataclass(frozen=True)
    class Options:
        method: Literal["hutchinson", "fisher"] = "hutchinson"
        #: Hutchinson probes (fisher uses every sample once instead).
        probes: int = 32
        batch_size: int = 128
        samples: int = 1000
        loss: Literal["auto", "cross-entropy", "kl", "mse"] = "auto"

        def __post_init__(self) -> None:
            if self.probes < 1 or self.batch_size < 1 or self.samples < 1:
                raise ValueError("options 'probes', 'batch-size' and 'samples' must be >= 1")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        o = self.options
        analysis = HessianDiagonal(method=o.method, probes=o.probes, batch_size=o.batch_size, samples=o.samples, loss=o.loss, seed=ctx.seed)
        diagonal = ctx.analyses.get(analysis, model, ctx)
        ctx.facts[HESSIAN_DIAGONAL_FACT] = analysis
        summary = {name: {"mean": float(np.mean(h)), "max": float(np.max(h)), "negative_fraction": float(np.mean(h < 0))} for name, h in diagonal.items()}
        return PassResult(model, False, {"method": o.method, "weights": summary})
