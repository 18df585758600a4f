"""slb: searched low-bit weights (Yang et al., NeurIPS 2020), trained on the ONNX graph itself.

Each weight of a layer quantized at ``bits`` <= 4 becomes a learned distribution over its layer's
levels (the target's integer codes at that width times a per-channel step,
`qcompiler.quant.slb.LevelChoice`). Training (`qcompiler.training.fit`) uses the expected weight
under ``softmax(t * logits)`` while the sharpness ``t`` rises every step from
``temperature-start`` to ``temperature-end`` (``temperature-schedule=exp|cos|linear``; the paper:
exp from 0.01 to 10). The logits start at plain rounding of the pretrained weights. At the end each
weight takes its most likely level, BatchNormalization's statistics are re-estimated for those
hard weights, and the codes go to insert-qdq through `fold-batchnorm` unchanged.

Layers wider than 4 bits (``first-last-bits=8``) train as float weights beside the rest and are
rounded by insert-qdq. Biases and BN scales and shifts train too; BN runs on batch statistics
throughout (see `qcompiler.low_bit_training`). ``bits=1`` is bipolar (+-step per channel).

    --pipeline "infer-shapes,fold-constants,slb{bits=2,first-last-bits=8,epochs=8},fold-batchnorm,calibrate,insert-qdq"
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.low_bit_training import (
    FLOAT_REFERENCE,
    TrainingGraph,
    check_no_quantized_graph,
    finish,
    float_parameters,
    grid_of,
    quantizable_weights,
    torch_vs_onnxruntime,
    training_split,
)
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import ROUNDED_WEIGHTS_FACT, WEIGHT_BITS_FACT, checked_activation_bits
from qcompiler.quant.slb import LevelChoice, Schedule, sharpness
from qcompiler.registry import register_pass
from qcompiler.quant.weights import BIPOLAR_BITS, RoundedWeight, WeightRange, quantize_bipolar, weight_grid, weight_qrange
from qcompiler.targets.spec import FLOAT_WIDTH
from qcompiler.training import TrainSettings, fit, output_value, training_loss

#: The widest layer searched over its levels; wider ones (8-bit first and last layers) train float.
MAX_SEARCH_BITS = 4


@dataclass(frozen=True)
class SlbOptions(TrainSettings):
    #: Weight width of the searched layers: 1 (bipolar), 2, 3 or 4; 0: each layer's width as an
    #: earlier pass chose it (`learn-bits`, `assign-precision`), so slb trains at learned widths.
    bits: int = 2
    #: Width of the first and last weight layers (0: as the others); 8 is what most low-bit
    #: papers keep them at (say so beside the figure). Above 4 bits they train float.
    first_last_bits: int = 0
    #: Width insert-qdq gives every quantized activation (0: the target's, 8 on ort-cpu); one of
    #: the target's [bits] activations. Training runs with float activations: follow with `qat`
    #: to train the activation quantizers too.
    activation_bits: int = 0
    epochs: int = 4
    #: Adam's rate for the logits (values of order one); biases, BN and the steps use ``float-lr``.
    lr: float = 0.01
    float_lr: float = 1e-4
    #: How the softmax sharpness rises over the steps, and its first and last values (the paper's).
    temperature_schedule: Schedule = "exp"
    temperature_start: float = 0.01
    temperature_end: float = 10.0
    #: How peaked the first distribution is around plain rounding (`LevelChoice.start`).
    initial_sharpness: float = 4.0
    #: Train each layer's per-channel step (else fixed where the initial range put it).
    learn_scales: bool = True
    #: The initial steps' range choice (min/max, MSE, or auto: MSE at 3 bits and fewer).
    weight_range: WeightRange = "auto"
    #: Training samples BatchNormalization's statistics are re-estimated on, with the hard weights.
    bn_samples: int = 4096
    #: The last calibration samples, held out of training: the written model runs on them in torch
    #: and in onnxruntime, and the report gives both top-1s (0: no check).
    check_samples: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (0, 1, 2, 3, 4):
            raise ValueError("option 'bits' must be 1 (bipolar), 2, 3 or 4 (0: the widths an earlier pass chose)")
        if not 0 < self.temperature_start < self.temperature_end:
            raise ValueError("options 'temperature-start' and 'temperature-end' must satisfy 0 < start < end")
        if self.first_last_bits < 0 or self.bn_samples < 1 or self.check_samples < 0 or not self.float_lr > 0 or not self.initial_sharpness > 0:
            raise ValueError("options 'first-last-bits', 'check-samples' must be >= 0, 'bn-samples' >= 1, 'float-lr' and 'initial-sharpness' > 0")


@register_pass
class Slb(Pass):
    """Train each low-bit weight as a softmax over its levels (SLB), then keep the likeliest level."""

    name = "slb"
    Options = SlbOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.data is None:
            raise QCError("slb trains on data: pass --calib FILE.npz (with 'labels' for a supervised loss)", pass_name=self.name)
        check_no_quantized_graph(model, self.name)
        self._check_widths(ctx)
        activation_bits = checked_activation_bits(ctx.target, self.options.activation_bits, self.name)
        layers, skipped = quantizable_weights(model, ctx)
        chosen = self._chosen_widths(ctx, layers)
        train_ctx, held_out = training_split(ctx, self.options.check_samples, self.name)
        choices: dict[str, LevelChoice] = {}
        float_layers: list[str] = []
        kept_float: list[str] = []
        for i, layer in enumerate(layers):
            bits = self.options.first_last_bits if self.options.first_last_bits and i in (0, len(layers) - 1) else chosen.get(layer.weight, self.options.bits)
            layer.bits = bits
            rule, axis = layer.layout.rule, layer.layout.axis
            # Whatever an earlier pass rounded this weight to is retrained here: its codes go.
            ctx.facts.get(ROUNDED_WEIGHTS_FACT, {}).pop(layer.weight, None)
            if bits == FLOAT_WIDTH:
                kept_float.append(layer.weight)
                continue
            if bits > MAX_SEARCH_BITS:
                float_layers.append(layer.weight)
                continue
            if layer.layout.block or rule.is_float8 or not rule.symmetric:
                skipped.append((layer.node.name, f"{rule.dtype} {'per-block' if layer.layout.block else rule.granularity} weights have no symmetric integer levels to search"))
                continue
            if bits == BIPOLAR_BITS:
                _, scale, _ = quantize_bipolar(layer.w, axis)
                levels = np.array([-1, 1])
            else:
                scale = weight_grid(layer.w, rule, bits, axis, self.options.weight_range).scale
                qmin, qmax = weight_qrange(rule, bits)
                levels = np.arange(qmin, qmax + 1)
            choices[layer.weight] = LevelChoice.start(layer.w, levels, scale, 0.0, axis, self.options.temperature_start, self.options.initial_sharpness)
        if not choices:
            raise QCError("no weight layer to search: slb needs Conv/Gemm/MatMul layers with constant float weights the target quantizes", pass_name=self.name)
        layers = [l for l in layers if l.weight in choices or l.weight in float_layers]

        state = {"t": self.options.temperature_start}
        out = output_value(model, self.name)
        floats = float_parameters(model, layers) + float_layers + kept_float
        training = TrainingGraph(model, lambda: {name: c.expected(state["t"]) for name, c in choices.items()}, floats)
        loss_name = training_loss(training, ctx, train_ctx.data, out.name, self.options.loss, self.options.batch_size, self.name)
        params = {f"{name}.logits": c.logits for name, c in choices.items()}
        multipliers = {name: self.options.float_lr / self.options.lr for name in training.graph.named_weights()}
        if self.options.learn_scales:
            params |= {f"{name}.scale": c.scale for name, c in choices.items()}
            multipliers |= {f"{name}.scale": self.options.float_lr / self.options.lr for name in choices}
        params |= training.graph.named_weights()

        def before_step(step: int, total: int) -> None:
            state["t"] = sharpness(self.options.temperature_schedule, step, total, self.options.temperature_start, self.options.temperature_end)

        start = time.perf_counter()
        result = fit(training, train_ctx, params, {}, loss_name=loss_name, out_name=out.name, reference_overrides=FLOAT_REFERENCE,
                     settings=self.options, label=f"slb W{self.options.bits or 'chosen'}", pass_name=self.name, before_step=before_step, lr_multipliers=multipliers)
        train_seconds = time.perf_counter() - start
        confidence = {name: round(c.confidence(state["t"]), 4) for name, c in choices.items()}

        # The hard weights, then (in finish) the trained float tensors and BN statistics for exactly those.
        rounded = {}
        for layer in layers:
            c = choices.get(layer.weight)
            if c is None:
                continue
            lo, hi = int(c.levels.min()), int(c.levels.max())
            rounded[layer.weight] = RoundedWeight(c.codes(), grid_of(c.scale.detach().numpy(), lo, hi, c.axis), layer.bits, layer.w)
        done = finish(model, ctx, training, layers, rounded, train_data=train_ctx.data, bn_samples=self.options.bn_samples,
                      widths_for_insert_qdq={layer.weight: layer.bits for layer in layers if layer.weight in float_layers},
                      activation_bits=activation_bits if self.options.activation_bits else None)
        for row in done["layers"]:
            row["final_confidence"] = confidence.get(row["weight"])
        searched = [layer.bits for layer in layers if layer.weight in choices]
        stats = {"bits": self.options.bits or "chosen", "widths": {l.node.name: l.bits for l in layers}, "kept_float": len(kept_float),
                 "average_bits": round(sum(l.bits * l.w.size for l in layers) / max(sum(l.w.size for l in layers), 1), 3),
                 "searched_widths": sorted(set(searched)), "first_last_bits": self.options.first_last_bits or self.options.bits, "activation_bits": activation_bits, "loss": loss_name,
                 "loss_per_epoch": [round(v, 5) for v in result.losses], "train_seconds": round(train_seconds, 1),
                 "final_temperature": round(state["t"], 4), "float_trained_layers": len(float_layers),
                 "skipped": len(skipped), **done, **result.stats()}
        if held_out is not None:
            stats.update(torch_vs_onnxruntime(model, held_out, out.name, self.options.check_samples, ctx, self.name))
        for node, why in skipped:
            ctx.note(self.name, f"left to insert-qdq: {why}", node=node)
        return PassResult(model, True, stats)

    def _chosen_widths(self, ctx: PassContext, layers) -> dict[str, int]:
        """bits=0: each layer's width from the facts an earlier pass left (else none)."""
        if self.options.bits:
            return {}
        chosen = ctx.facts.get(WEIGHT_BITS_FACT) or {}
        ends = {0, len(layers) - 1} if self.options.first_last_bits else set()
        missing = [l.node.name for i, l in enumerate(layers) if l.weight not in chosen and i not in ends]
        if missing:
            raise QCError("bits=0 trains at the widths an earlier pass chose, but "
                          + (f"no width was chosen for {', '.join(missing[:3])}" if chosen else "no earlier pass chose any")
                          + ": run learn-bits or assign-precision before slb, or give bits=1|2|3|4", pass_name=self.name, option="bits")
        wide = sorted({b for b in chosen.values() if b != FLOAT_WIDTH and b > MAX_SEARCH_BITS})
        if wide:
            ctx.note(self.name, f"layers chosen at {wide} bits train as float weights; insert-qdq rounds them")
        return chosen

    def _check_widths(self, ctx: PassContext) -> None:
        allowed = [b for b in ctx.target.bits.allowed if b != FLOAT_WIDTH]
        bits, first_last = self.options.bits, self.options.first_last_bits
        if bits and bits != BIPOLAR_BITS and bits not in allowed:
            raise QCError(f"{bits}-bit weights are not allowed by target '{ctx.target.name}' (its [bits] allowed: {allowed}; 1 is bipolar)", pass_name=self.name, option="bits")
        if bits == BIPOLAR_BITS and not ctx.target.weights.symmetric:
            raise QCError(f"bipolar weights need symmetric signed weights; target '{ctx.target.name}' quantizes them asymmetrically", pass_name=self.name, option="bits")
        if first_last and first_last != BIPOLAR_BITS and first_last not in allowed:
            raise QCError(f"{first_last}-bit weights are not allowed by target '{ctx.target.name}' (its [bits] allowed: {allowed})", pass_name=self.name, option="first-last-bits")
