"""prune-magnitude: set the smallest-magnitude weights to exactly zero.

Pruning before clustering is the first stage of Choi et al.'s pipeline (after Han et al.'s Deep
Compression): the zeros cost almost nothing once coded as run lengths, and the remaining weights
get the codebook's resolution. The mask goes into the facts (`PRUNED_FACT`), so the codebook
passes keep these weights exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.codebook import FLOAT_WEIGHTS_FACT, PRUNED_FACT
from qcompiler.hessian import quantizable_weights
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.registry import register_pass


@register_pass
class PruneMagnitude(Pass):
    """Zero the smallest-magnitude fraction of Conv/Gemm/MatMul weights, per layer or network-wide."""

    name = "prune-magnitude"

    @dataclass(frozen=True)
    class Options:
        #: Fraction of weights set to zero, in [0, 1).
        ratio: float = 0.5
        #: layer: that fraction of every weight tensor; network: one magnitude threshold for all
        #: (layers with small weights lose more of them).
        scope: Literal["layer", "network"] = "layer"

        def __post_init__(self) -> None:
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"option 'ratio' must be in [0, 1), got {self.ratio}")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        weights = {name: model.graph.initializers[name].const_value.numpy() for name in quantizable_weights(model)}
        if not weights:
            return PassResult(model, False, {"pruned": 0, "weights": 0})
        threshold = None
        if self.options.scope == "network":
            everything = np.concatenate([np.abs(w).ravel() for w in weights.values()])
            threshold = _threshold(everything, self.options.ratio)
        masks = ctx.facts.setdefault(PRUNED_FACT, {})
        # The unpruned values are the float reference of the label-free fine-tuning losses.
        float_weights = ctx.facts.setdefault(FLOAT_WEIGHTS_FACT, {})
        pruned_total = 0
        per_layer = {}
        for name, w in weights.items():
            magnitude = np.abs(w)
            cut = threshold if threshold is not None else _threshold(magnitude.ravel(), self.options.ratio)
            # Earlier pruning stays pruned: a second pass can only add zeros.
            mask = (magnitude < cut) | masks.get(name, np.zeros(w.shape, bool))
            masks[name] = mask
            float_weights.setdefault(name, w.copy())
            model.graph.initializers[name].const_value = ir.tensor(np.where(mask, 0, w).astype(w.dtype), name=name)
            pruned_total += int(mask.sum())
            per_layer[name] = round(float(mask.mean()), 4)
        total = sum(w.size for w in weights.values())
        return PassResult(model, pruned_total > 0, {"pruned": pruned_total, "weights": total, "ratio": round(pruned_total / total, 4), "layers": per_layer})


def _threshold(magnitudes: np.ndarray, ratio: float) -> float:
    """The magnitude below which ``ratio`` of the values lie (exactly that many, ties aside)."""
    if ratio <= 0 or len(magnitudes) == 0:
        return 0.0
    k = int(round(ratio * len(magnitudes)))
    if k == 0:
        return 0.0
    if k >= len(magnitudes):
        return float(np.inf)
    return float(np.partition(magnitudes, k)[k])
