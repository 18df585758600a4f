"""Per-layer quantization sensitivity Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2 (HAWQ-V2/V3).

The Hessian trace says how sharply the loss curves around layer l's weights; the quantization
error says how far b-bit quantization moves them. Their product estimates the loss increase of
quantizing that layer alone to b bits, which is what precision assignment trades against size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis import Analysis
from qcompiler.hessian import HessianTraceResult
from qcompiler.quant.weights import dequantize_weight, quantize_weight, weight_axis
from qcompiler.targets.spec import FLOAT_WIDTH, TensorRule

if TYPE_CHECKING:
    from qcompiler.pass_manager import PassContext


@dataclass(frozen=True)
class LayerSensitivity:
    weight: str
    node: str
    parameters: int
    trace: float
    #: bits -> Omega_l(bits)
    omega: dict[int, float]


def _omega(trace: float, w: np.ndarray, rule: TensorRule, bits: int, axis: int | None, weight_range: str) -> float:
    """Tr(H) / n x ||Q_b(W) - W||^2 for one weight at one width (0 for a layer left float)."""
    if bits == FLOAT_WIDTH:
        return 0.0
    q, scale, zp = quantize_weight(w, rule, bits, axis, weight_range)
    err = float(np.sum((dequantize_weight(q, scale, zp, rule, axis) - w).astype(np.float64) ** 2))
    # A negative trace estimate (noise around a flat direction) means no measurable curvature.
    return max(trace, 0.0) / w.size * err


def weight_sensitivity(model: ir.Model, layer: LayerSensitivity, rule: TensorRule, bits: int, weight_range: str = "auto") -> float:
    """Omega_l(bits) for a width outside the candidates the layer was scored at."""
    w = model.graph.initializers[layer.weight].const_value.numpy().astype(np.float32)
    return _omega(layer.trace, w, rule, bits, weight_axis(model, layer.weight, rule), weight_range)


#: Which value of a trace estimate the sensitivities use: its mean, or the upper end of its 95 %
#: interval (a trace the probes could not pin down is not taken as evidence of flatness).
TraceBound = Literal["mean", "upper"]


def layer_sensitivities(model: ir.Model, traces: HessianTraceResult, rule: TensorRule, bits: tuple[int, ...], weight_range: str = "auto", bound: TraceBound = "mean") -> list[LayerSensitivity]:
    """Omega_l(b) for every weight with a trace estimate and every candidate width."""
    out = []
    for name, estimate in traces.estimates.items():
        w = model.graph.initializers[name].const_value.numpy().astype(np.float32)
        axis = weight_axis(model, name, rule)
        trace = estimate.trace if bound == "mean" else estimate.ci95[1]
        omega = {b: _omega(trace, w, rule, b, axis, weight_range) for b in bits}
        out.append(LayerSensitivity(name, estimate.node, int(w.size), trace, omega))
    return out


def measured_loss_increase(model: ir.Model, data, rule: TensorRule, bits: int, weights: list[str], *, loss: str = "auto", samples: int = 5000, batch_size: int = 250, weight_range: str = "auto") -> dict[str, float]:
    """The real loss change of quantizing each weight alone to ``bits`` (all else float).

    The empirical check of the Hessian estimate: forward passes only, one per layer, on the first
    ``samples`` samples, with the loss the traces were estimated with (``auto``: cross-entropy
    with labels, else KL or MSE against the float model's outputs, as `choose_loss` decides).
    """
    return measured_loss_increases(model, data, rule, (bits,), weights, loss=loss, samples=samples, batch_size=batch_size, weight_range=weight_range)[bits]


class LossProbe:
    """The loss of the network with some weights replaced, on a fixed set of samples.

    Forward passes only: one torch graph and one float reference pass serve every measurement
    (`measured_loss_increases` quantizes one weight at a time, `measured_assignment_loss` all of
    them at once).
    """

    def __init__(self, model: ir.Model, data, weights: list[str], *, loss: str = "auto", samples: int = 5000, batch_size: int = 250) -> None:
        import torch

        from qcompiler.hessian import choose_loss
        from qcompiler.torch_exec import TorchGraph

        self.graph = TorchGraph(model, trainable=weights)
        self.params = self.graph.named_weights()
        subset = data.head(samples)
        self._batches = list(subset.batches(batch_size))
        self._out = self.graph.output_names[0]
        self._labels = subset.labels
        with torch.no_grad():
            self._reference = [self.graph.run(b, [self._out])[self._out] for b in self._batches]
        self.loss_name = choose_loss(loss, tuple(self._reference[0].shape), self._labels is not None)
        self._starts = np.cumsum([0] + [len(r) for r in self._reference])
        self.base = self._mean_loss(self._reference)  # the float outputs are already at hand

    def _mean_loss(self, outputs) -> float:
        from qcompiler.training import task_loss

        labels, starts = self._labels, self._starts
        total = sum(float(task_loss(self.loss_name, out, None if labels is None else labels[start : start + len(out)], ref)) * len(out)
                    for out, ref, start in zip(outputs, self._reference, starts))
        return total / starts[-1]

    def increase(self, replaced: dict[str, np.ndarray]) -> float:
        """The loss change with the weights in ``replaced`` set to those values (all others float)."""
        import torch

        originals = {name: self.params[name].detach().clone() for name in replaced}
        try:
            with torch.no_grad():
                for name, values in replaced.items():
                    self.params[name].copy_(torch.from_numpy(np.asarray(values, np.float32)))
                return self._mean_loss(self.graph.run(b, [self._out])[self._out] for b in self._batches) - self.base
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    self.params[name].copy_(original)


def _quantized(model: ir.Model, w: np.ndarray, name: str, rule: TensorRule, bits: int, weight_range: str) -> np.ndarray:
    axis = weight_axis(model, name, rule)
    q, scale, zp = quantize_weight(w, rule, bits, axis, weight_range)
    return dequantize_weight(q, scale, zp, rule, axis)


def measured_loss_increases(model: ir.Model, data, rule: TensorRule, widths: Sequence[int], weights: list[str], *, loss: str = "auto", samples: int = 5000, batch_size: int = 250, weight_range: str = "auto") -> dict[int, dict[str, float]]:
    """`measured_loss_increase` at each of ``widths``: width -> weight -> loss change."""
    probe = LossProbe(model, data, weights, loss=loss, samples=samples, batch_size=batch_size)
    floats = {name: probe.params[name].detach().numpy().copy() for name in weights}
    return {bits: {name: probe.increase({name: _quantized(model, floats[name], name, rule, bits, weight_range)}) for name in weights} for bits in widths}


def measured_assignment_loss(model: ir.Model, data, rule: TensorRule, assignments: Sequence[dict[str, int]], *, loss: str = "auto", samples: int = 1000, batch_size: int = 250, weight_range: str = "auto") -> list[float]:
    """The loss change of quantizing every weight of each assignment (weight -> bits) at once.

    What the per-layer sums of Omega or of measured damage assume is additive; this is the real
    joint effect, including the errors of one layer compounding through the next.
    """
    names = sorted({name for a in assignments for name in a})
    probe = LossProbe(model, data, names, loss=loss, samples=samples, batch_size=batch_size)
    floats = {name: probe.params[name].detach().numpy().copy() for name in names}
    return [probe.increase({name: _quantized(model, floats[name], name, rule, bits, weight_range) for name, bits in a.items()}) for a in assignments]


@dataclass(frozen=True)
class MeasuredDamage(Analysis[dict[int, dict[str, float]]]):
    """The measured loss change of quantizing each weight alone at each width (width -> weight -> change).

    What `assign-precision` charges narrow widths with, where the second-order estimate is too
    optimistic. Weights and the quantizer rule come from the target; ``cache`` names a JSON file
    that keeps the result for later compiles of the same model, data and parameters (a sweep over
    budgets measures once).
    """

    name = "measured-damage"
    widths: tuple[int, ...]
    weights: tuple[str, ...]
    loss: str = "auto"
    samples: int = 1000
    weight_range: str = "auto"
    cache: str = ""

    def compute(self, model: ir.Model, ctx: PassContext) -> dict[int, dict[str, float]]:
        from qcompiler.analysis_cache import cache_key, read_cached, write_cached

        assert ctx.data is not None
        data = ctx.data.head(self.samples)
        parameters = {"widths": self.widths, "weights": self.weights, "loss": self.loss, "weight_range": self.weight_range, "rule": repr(ctx.target.weights)}
        key = cache_key(model, data, parameters) if self.cache else ""
        if key and (stored := read_cached(self.cache, key)) is not None:
            return {int(b): damage for b, damage in stored["damage"].items()}
        result = measured_loss_increases(model, data, ctx.target.weights, self.widths, list(self.weights), loss=self.loss, samples=self.samples, weight_range=self.weight_range)
        if key:
            write_cached(self.cache, key, {"damage": {str(b): damage for b, damage in result.items()}})
        return result
