"""adaround: learn each weight's rounding, layer by layer, from calibration data (Nagel et al., 2020).

At 4 bits, rounding every weight to nearest costs CIFAR ResNet-20 a point or more of accuracy:
each weight's error is as small as it can be, but the errors of one output channel add up over
its inputs. AdaRound picks, for every weight, the code below or above it on the quantizer's own
grid so that the layer's *output* matches the float network's (`qcompiler.quant.adaround`).

Layers are taken in graph order. Each layer's inputs come from the network with every earlier
layer already rounded (weights only: activations stay float here), its target is the float
network's output of that layer, taken after the Relu/Clip it feeds when that is its only reader.
The rounded weights are written back as their float values on the grid, with their codes in the
facts (`ROUNDED_WEIGHTS_FACT`), so insert-qdq stores exactly these codes; run `calibrate` after
this pass, so activation ranges are those of the rounded network.

    --pipeline "infer-shapes,fold-constants,fold-batchnorm,adaround{bits=4},calibrate,insert-qdq"
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.low_bit_training import quantizable_weights
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import ROUNDED_WEIGHTS_FACT, WEIGHT_BITS_FACT
from qcompiler.quant.adaround import AdaRoundSettings, optimize_rounding
from qcompiler.quant.uniform import sqnr_db
from qcompiler.registry import register_pass
from qcompiler.quant.weights import BIPOLAR_BITS, RoundedWeight, WeightLayout, WeightRange, weight_grid
from qcompiler.targets.spec import FLOAT_WIDTH

#: Activations folded into a layer's output error when they are its only reader: the error that
#: matters is the one after them (a negative pre-activation error is free under a Relu).
_FOLLOWING_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu")
#: What one layer's cached inputs and float targets may take in memory; past it fewer samples
#: are used for that layer (a 224x224 network's first layers), and the report says so.
_LAYER_BYTES = 1 << 30


@dataclass(frozen=True)
class AdaRoundOptions(AdaRoundSettings):
    #: Weight width of every layer (one of the target's [bits] allowed); 0: the width
    #: assign-precision chose, else the target's default.
    bits: int = 0
    #: Width of the first and last weight layers (0: as the others). 8 keeps the two layers that
    #: cost the most accuracy per bit at 8, as most low-bit papers do (say so beside the figure).
    first_last_bits: int = 0
    #: Calibration samples the output errors are measured on (the first ones of --calib).
    samples: int = 1024
    #: The plain quantizer's range choice; keep it equal to insert-qdq's.
    weight_range: WeightRange = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1 or self.bits < 0 or self.first_last_bits < 0:
            raise ValueError("options 'samples' must be >= 1 and 'bits', 'first-last-bits' >= 0")


@dataclass
class _Layer:
    node: ir.Node
    weight: str
    x: str  # the activation input's name
    y: str  # what its output error is measured on: its output, or the activation after it
    activation: ir.Node | None
    bits: int
    w: np.ndarray  # the float weight (float32)
    layout: WeightLayout


@register_pass
class AdaRound(Pass):
    """Round each weight down or up to match its layer's float output (AdaRound), layer by layer."""

    name = "adaround"
    Options = AdaRoundOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import torch

        from qcompiler.torch_exec import TorchGraph

        if ctx.data is None:
            raise QCError("adaround learns from data: pass --calib FILE.npz", pass_name=self.name)
        allowed = ctx.target.bits.allowed
        for option in ("bits", "first_last_bits"):
            value = getattr(self.options, option)
            if value and (value not in allowed or value == FLOAT_WIDTH):
                raise QCError(f"{value}-bit weights are not allowed by target '{ctx.target.name}' (its [bits] allowed: {[b for b in allowed if b != FLOAT_WIDTH]})", pass_name=self.name, option=option.replace("_", "-"))
        layers, skipped = self._layers(model, ctx)
        if not layers:
            for node, why in skipped:
                ctx.note(self.name, f"rounding to nearest: {why}", node=node)
            return PassResult(model, False, {"layers": [], "skipped": len(skipped)})
        graph = TorchGraph(model)
        n = min(self.options.samples, ctx.data.usable_samples)
        feeds = {k: a[:n] for k, a in ctx.data.arrays.items()}
        rounded: dict[str, RoundedWeight] = {}
        overrides: dict[str, torch.Tensor] = {}
        rows = []
        start = time.perf_counter()
        settings = AdaRoundSettings(**{f.name: getattr(self.options, f.name) for f in fields(AdaRoundSettings)})
        with ctx.progress("adaround", len(layers) * max(settings.iterations, 1)) as progress:
            for layer in layers:
                w, layout = layer.w, layer.layout
                grid = weight_grid(w, layout.rule, layer.bits, layout.axis, self.options.weight_range)
                x, y, used = self._layer_data(graph, feeds, layer, overrides)
                result = optimize_rounding(self._layer_fn(graph, layer), x, y, w, grid, settings, seed=ctx.seed,
                                           pair_sum_limit=layout.rule.pair_sum_limit, progress=progress.advance)
                rounded[layer.weight] = RoundedWeight(result.codes, grid, layer.bits, w)
                values = grid.dequantize(result.codes)
                overrides[layer.weight] = torch.from_numpy(values)
                rows.append({"node": layer.node.name, "weight": layer.weight, "bits": layer.bits, "samples": used,
                             "scale": float(np.mean(grid.scale)), "weight_sqnr_db": round(sqnr_db(w, values), 2),
                             "nearest_weight_sqnr_db": round(sqnr_db(w, grid.dequantize(grid.nearest(w))), 2),
                             "output_mse_nearest": result.nearest_mse, "output_mse": result.adaround_mse,
                             "output_error_ratio": round(result.adaround_mse / result.nearest_mse, 4) if result.nearest_mse > 0 else 1.0,
                             "flipped": round(result.flipped, 4), "reverted_channels": result.reverted_channels})
                if used < n:
                    ctx.note(self.name, f"output error measured on {used} of {n} samples: the layer's inputs and outputs would take more than {_LAYER_BYTES >> 20} MiB", node=layer.node.name)
                if result.reverted_channels:
                    ctx.note(self.name, f"{result.reverted_channels} channel(s) kept nearest rounding: rounded up, two weights would overflow the CPU's int16 pair sums", node=layer.node.name)
        for name, r in rounded.items():
            model.graph.initializers[name].const_value = ir.tensor(r.grid.dequantize(r.codes), name=name)
        ctx.facts.setdefault(ROUNDED_WEIGHTS_FACT, {}).update(rounded)
        if self.options.bits or self.options.first_last_bits:
            # Widths the user chose: insert-qdq lowers each at its width (and the accuracy guard
            # measures instead of undoing them, as after assign-precision).
            ctx.facts[WEIGHT_BITS_FACT] = {**ctx.facts.get(WEIGHT_BITS_FACT, {}), **{l.weight: l.bits for l in layers}}
        for node, why in skipped:
            ctx.note(self.name, f"rounding to nearest: {why}", node=node)
        ratios = [r["output_error_ratio"] for r in rows]
        return PassResult(model, True, {"layers": rows, "samples": n, "iterations": settings.iterations, "skipped": len(skipped),
                                        "seconds": round(time.perf_counter() - start, 1), "median_output_error_ratio": float(np.median(ratios))})

    def _layers(self, model: ir.Model, ctx: PassContext) -> tuple[list[_Layer], list[tuple[str, str]]]:
        """The weight layers to round, in graph order, and (node, why) for those left to insert-qdq."""
        chosen = ctx.facts.get(WEIGHT_BITS_FACT, {})
        default = ctx.target.bits.default or ctx.target.weights.bits
        candidates, skipped = quantizable_weights(model, ctx)
        layers = []
        for i, candidate in enumerate(candidates):
            node, weight, x, w, layout = candidate.node, candidate.weight, candidate.x, candidate.w, candidate.layout
            bits = self.options.bits or chosen.get(weight, default)
            if self.options.first_last_bits and i in (0, len(candidates) - 1):
                bits = self.options.first_last_bits
            if bits == FLOAT_WIDTH:
                skipped.append((node.name, "kept float by assign-precision"))
                continue
            if bits == BIPOLAR_BITS or layout.block or layout.rule.is_float8:
                skipped.append((node.name, f"{'bipolar' if bits == BIPOLAR_BITS else layout.rule.dtype + (' per-block' if layout.block else '')} weights have no up-or-down rounding to learn"))
                continue
            out = node.outputs[0]
            consumers = out.consumers()
            act = consumers[0] if len(consumers) == 1 and not out.is_graph_output() and consumers[0].op_type in _FOLLOWING_ACTIVATIONS and consumers[0].domain in ("", "ai.onnx") else None
            if act is not None and any(v is not None and v.name not in model.graph.initializers for v in act.inputs[1:]):
                act = None  # a Clip whose bounds are computed: match the layer's own output
            layers.append(_Layer(node, weight, x, (act.outputs[0] if act is not None else out).name, act, bits, w, layout))
        return layers, skipped

    @staticmethod
    def _layer_data(graph, feeds: dict[str, np.ndarray], layer: _Layer, overrides: dict) -> tuple[object, object, int]:
        """The layer's inputs in the network rounded so far, and its float targets (torch, samples
        first), on as many samples as fit in `_LAYER_BYTES`."""
        import torch

        n = len(next(iter(feeds.values())))
        chunks_x, chunks_y = [], []
        used = n
        with torch.no_grad():
            for i in range(0, n, 128):
                batch = {k: a[i : i + 128] for k, a in feeds.items()}
                x = graph.run(batch, [layer.x], overrides=overrides)[layer.x]
                y = graph.run(batch, [layer.y])[layer.y]
                if i == 0:
                    per_sample = (x[0].numel() + y[0].numel()) * 4
                    used = max(1, min(n, _LAYER_BYTES // max(per_sample, 1)))
                chunks_x.append(x)
                chunks_y.append(y)
                if sum(len(c) for c in chunks_x) >= used:
                    break
        return torch.cat(chunks_x)[:used], torch.cat(chunks_y)[:used], used

    @staticmethod
    def _layer_fn(graph, layer: _Layer):
        """layer(x, w): the node (and the activation it feeds) computed by the torch executor."""
        from qcompiler.torch_exec import OPS

        node, roles = layer.node, input_roles(layer.node)
        consts = graph.constants
        args = [consts.get(v.name) if v is not None else None for v in node.inputs]
        act_args = [consts.get(v.name) if v is not None else None for v in layer.activation.inputs] if layer.activation is not None else None

        def run(x, w):
            a = list(args)
            a[roles.activations[0]], a[roles.weight] = x, w
            y = OPS[node.op_type](node, a)[0]
            if layer.activation is not None:
                y = OPS[layer.activation.op_type](layer.activation, [y, *act_args[1:]])[0]
            return y

        return run
