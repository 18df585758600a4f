"""learn-bits: per-layer weight bit-widths learned end to end under a size (or BOPs) budget.

Every quantized layer's weight trains straight through its quantizer while the quantizer's
width trains too (`qcompiler.quant.learned_bits`), for the first ``freeze-at`` (75 %) of the steps; then the
widths are fixed and the rest of the training adapts the weights to them:

- ``method=uhlich`` (default): the layer learns its step and its range, the width follows from
  them (Uhlich et al. 2020), and a hinge-squared penalty ``penalty * max(0, cost / limit - 1)^2``
  on the model's cost above the budget pulls widths down;
- ``method=bitnet``: the paper's rule (Raghavan et al. 2017), for comparison: integer widths
  moved one allowed width at a time against the sign of their gradient (task loss plus the same
  penalty), ``updates-per-epoch`` times an epoch.

The cost is what the written model stores or computes: ``bits=2.5`` (average bits per weight),
``size=0.3`` (of the int8 weight bits) or ``bops=0.2`` (of the int8 model's MACs x weight bits x
activation bits). Widths are the target's [bits] allowed (float excluded). If the rounded widths
exceed the budget when they are fixed, the layers whose continuous width is nearest below their
allowed width are lowered one width until it holds (and then trained at it); the report says which.

Like `slb`, it trains the float graph with BatchNormalization on batch statistics, re-estimates
BN for the final weights, and hands codes and widths to `fold-batchnorm` and insert-qdq
(`WEIGHT_BITS_FACT`, the lowering `assign-precision` uses), so every target and `qc validate` apply.

    --pipeline "infer-shapes,fold-constants,learn-bits{budget=bits=2.5,epochs=4},fold-batchnorm,calibrate,insert-qdq"

``keep-weights=true`` hands on only the widths and leaves the float model as it came, so that a
training pass after it starts from the pretrained weights at those widths:

    --pipeline "infer-shapes,fold-constants,learn-bits{budget=bits=2.5,epochs=1,keep-weights=true},slb{bits=0,epochs=5},fold-batchnorm,calibrate,insert-qdq"
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.budget import Budget
from qcompiler.cost_model import layer_macs
from qcompiler.errors import QCError
from qcompiler.low_bit_training import (
    FLOAT_REFERENCE,
    TrainingGraph,
    WeightLayer,
    check_no_quantized_graph,
    finish,
    float_parameters,
    grid_of,
    quantizable_weights,
    torch_vs_onnxruntime,
    training_split,
)
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import ACTIVATION_BITS_FACT, WEIGHT_BITS_FACT, checked_activation_bits
from qcompiler.quant.learned_bits import BitNetQuantizer, UhlichQuantizer, allowed_ceil, initial_range
from qcompiler.registry import register_pass
from qcompiler.quant.weights import RoundedWeight, weight_grid, weight_qrange
from qcompiler.targets.spec import FLOAT_WIDTH
from qcompiler.training import TrainSettings, fit, output_value, steps_per_epoch, training_loss

#: Budget kinds learn-bits trains against (assign-precision's, less latency, which has no gradient here).
_KINDS = ("bits", "size", "bops")


@dataclass(frozen=True)
class LearnBitsOptions(TrainSettings):
    #: ``bits=N`` (average bits per weight), ``size=F`` or ``bops=F`` (fractions of the int8 model's).
    budget: str = "bits=4"
    method: Literal["uhlich", "bitnet"] = "uhlich"
    #: Every learned width starts here (rounded up to an allowed width); 0: the budget's average
    #: width for ``bits=``/``size=`` budgets (so training starts near it), 4 for ``bops=``.
    initial_bits: int = 0
    #: Width of the first and last weight layers, fixed (0: learned like the others).
    first_last_bits: int = 0
    #: Width of every quantized activation (0: the target's); training runs with float activations.
    activation_bits: int = 0
    #: Weight of the hinge-squared penalty on the cost above the budget.
    penalty: float = 10.0
    #: The penalty aims this fraction under the budget, so rounding up at the end rarely exceeds it.
    margin: float = 0.02
    epochs: int = 4
    #: Adam's rate for the weights, biases and BN (the network); the quantizers' steps and ranges use ``quantizer-lr``.
    lr: float = 1e-4
    quantizer_lr: float = 1e-2
    #: method=bitnet: width moves per epoch.
    updates_per_epoch: int = 4
    #: Fraction of the steps after which the widths are fixed (lowered first where the rounded
    #: widths exceed the budget); the rest train the weights at exactly those widths.
    freeze_at: float = 0.75
    bn_samples: int = 4096
    check_samples: int = 1000
    #: Keep the float weights (and BN) as they were and hand on only the learned widths: the
    #: widths for a later pass to train at (``slb{bits=0}``, `adaround`, `qat`) or for insert-qdq
    #: to round at, from the pretrained weights rather than from these few epochs' codes.
    keep_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.initial_bits < 0 or self.first_last_bits < 0 or not self.penalty > 0 or not 0 <= self.margin < 0.5:
            raise ValueError("options 'initial-bits' must be >= 0, 'first-last-bits' >= 0, 'penalty' > 0 and 'margin' in [0, 0.5)")
        if not 0 <= self.freeze_at <= 1:
            raise ValueError("option 'freeze-at' must be in [0, 1]")
        if not self.quantizer_lr > 0 or self.updates_per_epoch < 1 or self.bn_samples < 1 or self.check_samples < 0:
            raise ValueError("options 'quantizer-lr' must be > 0, 'updates-per-epoch' and 'bn-samples' >= 1, 'check-samples' >= 0")


@register_pass
class LearnBits(Pass):
    """Learn each layer's weight width with its weights, under a size or BOPs budget (Uhlich et al.; BitNet)."""

    name = "learn-bits"
    Options = LearnBitsOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.data is None:
            raise QCError("learn-bits trains on data: pass --calib FILE.npz (with 'labels' for a supervised loss)", pass_name=self.name)
        check_no_quantized_graph(model, self.name)
        budget = Budget.parse(self.options.budget, pass_name=self.name, kinds=_KINDS)
        activation_bits = checked_activation_bits(ctx.target, self.options.activation_bits, self.name)
        allowed = sorted(b for b in ctx.target.bits.allowed if b != FLOAT_WIDTH and b >= 2)
        if not allowed:
            raise QCError(f"target '{ctx.target.name}' allows no integer weight width of 2 bits or more", pass_name=self.name)
        if self.options.first_last_bits and self.options.first_last_bits not in allowed:
            raise QCError(f"{self.options.first_last_bits}-bit weights are not allowed by target '{ctx.target.name}' (its [bits] allowed: {allowed})", pass_name=self.name, option="first-last-bits")
        layers, skipped = quantizable_weights(model, ctx)
        kept = []
        for layer in layers:
            rule = layer.layout.rule
            if layer.layout.block or rule.is_float8 or not rule.symmetric:
                skipped.append((layer.node.name, f"{rule.dtype} {'per-block' if layer.layout.block else rule.granularity} weights: no symmetric integer width to learn"))
            else:
                kept.append(layer)
        layers = kept
        if not layers:
            raise QCError("no weight layer to learn a width for: learn-bits needs Conv/Gemm/MatMul layers with constant float weights the target quantizes", pass_name=self.name)
        ends = {0, len(layers) - 1} if self.options.first_last_bits else set()
        initial = self.options.initial_bits or {"bits": budget.number, "size": budget.number * ctx.target.weights.bits}.get(budget.kind, 4)
        initial = allowed_ceil(initial, allowed)
        quantizers = {}
        for i, layer in enumerate(layers):
            if i in ends:
                quantizers[layer.weight] = BitNetQuantizer(layer.w, layer.layout.axis, self.options.first_last_bits, [self.options.first_last_bits])
            elif self.options.method == "bitnet":
                quantizers[layer.weight] = BitNetQuantizer(layer.w, layer.layout.axis, initial, allowed)
            else:
                # Started at the plain quantizer's (MSE-clipped below 4 bits) range for that width.
                grid = weight_grid(layer.w, layer.layout.rule, initial, layer.layout.axis, "auto")
                # The target's narrow widths include the code -2^(b-1) (low_bit_range = "full").
                full = weight_qrange(layer.layout.rule, allowed[0])[0] == -(2 ** (allowed[0] - 1))
                quantizers[layer.weight] = UhlichQuantizer(layer.w, layer.layout.axis, initial, allowed, initial_range(layer.w, layer.layout.axis, grid.scale, initial), full_range=full)
        cost_of, limit, unit = self._cost(model, ctx, layers, budget, activation_bits)
        smallest = cost_of({l.weight: (self.options.first_last_bits if i in ends else allowed[0]) for i, l in enumerate(layers)})
        if smallest > limit:
            raise QCError(f"budget {self.options.budget} is below what the narrowest widths cost: {allowed[0]} bits everywhere"
                          f"{' (first and last at ' + str(self.options.first_last_bits) + ')' if ends else ''} is {smallest / limit:.3g}x the limit",
                          pass_name=self.name, option="budget")

        import torch

        train_ctx, held_out = training_split(ctx, self.options.check_samples, self.name)
        shadows = {l.weight: torch.nn.Parameter(torch.from_numpy(l.w.copy())) for l in layers}
        out = output_value(model, self.name)
        training = TrainingGraph(model, lambda: {name: quantizers[name].quantize(p) for name, p in shadows.items()}, float_parameters(model, layers))
        loss_name = training_loss(training, ctx, train_ctx.data, out.name, self.options.loss, self.options.batch_size, self.name)
        aim = limit * (1 - self.options.margin)

        def penalty():
            cost = cost_of({name: q.bits() if i not in ends else float(self.options.first_last_bits) for i, (name, q) in enumerate(quantizers.items())})
            return self.options.penalty * torch.relu(cost / aim - 1) ** 2

        params = {f"{name}.weight": p for name, p in shadows.items()} | training.graph.named_weights()
        multipliers = {}
        for name, q in quantizers.items():
            for key, p in q.parameters().items():
                params[f"{name}.{key}"] = p
                multipliers[f"{name}.{key}"] = self.options.quantizer_lr / self.options.lr
        moves: list[int] = []
        every = max(steps_per_epoch(train_ctx.data, self.options.batch_size) // self.options.updates_per_epoch, 1)
        frozen: dict[str, object] = {}
        # The fixed widths and the step they were fixed at (-1: not yet), trained by nothing but
        # saved in every checkpoint: a run resumed after that step keeps them instead of deriving
        # new ones from weights that trained on at the old ones.
        fixed = torch.full((len(quantizers) + 1,), -1.0)
        params["learn-bits.fixed-widths"] = fixed

        def before_step(step: int, total: int) -> None:
            if not frozen and fixed[-1] >= 0:
                for (name, q), bits in zip(quantizers.items(), fixed[:-1].tolist()):
                    q.freeze(int(bits))
                frozen["step"], frozen["lowered"] = int(fixed[-1]), []
                return
            if not frozen and step >= int(total * self.options.freeze_at):
                # The widths the model will ship at, kept to the budget, fixed from here on: the
                # remaining steps train the weights (and steps, ranges) at exactly those widths.
                widths = {name: q.deployed_bits() for name, q in quantizers.items()}
                frozen["lowered"] = self._fit_budget(widths, quantizers, ends, layers, allowed, cost_of, limit)
                frozen["step"] = step
                for name, q in quantizers.items():
                    q.freeze(widths[name])
                fixed.copy_(torch.tensor([float(widths[name]) for name in quantizers] + [float(step)]))
                return
            if not frozen and self.options.method == "bitnet" and step and step % every == 0:
                moves.extend(q.step() for i, q in enumerate(quantizers.values()) if i not in ends)

        start = time.perf_counter()
        result = fit(training, train_ctx, params, {}, loss_name=loss_name, out_name=out.name, reference_overrides=FLOAT_REFERENCE,
                     settings=self.options, label=f"learn-bits ({self.options.method}, {self.options.budget})", pass_name=self.name,
                     before_step=before_step, penalty=penalty, lr_multipliers=multipliers)
        train_seconds = time.perf_counter() - start

        widths = {name: q.deployed_bits() for name, q in quantizers.items()}
        for node in frozen.get("lowered", []):
            ctx.note(self.name, f"lowered one width when the widths were fixed (step {frozen['step']}) so that they keep to the budget; trained at it after", node=node)
        lowered = self._fit_budget(widths, quantizers, ends, layers, allowed, cost_of, limit)
        for node in lowered:
            ctx.note(self.name, "lowered one width after training so the rounded widths keep to the budget (not trained at it)", node=node, level="warning")
        total = float(sum(l.w.size for l in layers))
        achieved = cost_of(widths)
        continuous = {l.weight: round(float(q.continuous_bits().detach()), 3) for l in layers if isinstance(q := quantizers[l.weight], UhlichQuantizer)}
        stats = {"method": self.options.method, "budget": self.options.budget, "initial_bits": initial, "cost": achieved, "limit": limit, "unit": unit,
                 "cost_fraction_of_limit": round(achieved / limit, 4), "average_bits": round(sum(widths[l.weight] * l.w.size for l in layers) / total, 3),
                 "widths": {l.node.name: widths[l.weight] for l in layers}, "widths_fixed_at_step": frozen.get("step"),
                 "lowered_when_fixed": frozen.get("lowered", []), "lowered_after_training": lowered,
                 "activation_bits": activation_bits, "loss": loss_name, "loss_per_epoch": [round(v, 5) for v in result.losses],
                 "train_seconds": round(train_seconds, 1), "skipped": len(skipped), **result.stats()}
        if moves:
            stats["bitnet_moves"] = {"down": moves.count(-1), "up": moves.count(1), "kept": moves.count(0)}
        for node, why in skipped:
            ctx.note(self.name, f"left to insert-qdq at the target's width: {why}", node=node)
        if self.options.keep_weights:
            # The model as it came; the widths in the facts, as assign-precision leaves them.
            ctx.facts[WEIGHT_BITS_FACT] = {**ctx.facts.get(WEIGHT_BITS_FACT, {}), **widths}
            if self.options.activation_bits:
                ctx.facts[ACTIVATION_BITS_FACT] = activation_bits
            stats |= {"kept_weights": True, "continuous_bits": {l.node.name: continuous[l.weight] for l in layers if l.weight in continuous}}
            return PassResult(model, False, stats)
        rounded, pair_limited = {}, {}
        for layer in layers:
            q = quantizers[layer.weight]
            codes, scale, bits = q.codes_and_scale(shadows[layer.weight].detach(), widths[layer.weight])
            lo, top = weight_qrange(layer.layout.rule, bits)
            codes = np.clip(codes, lo, top)  # a full-range quantizer's -2^(b-1) where the target is narrow at this width
            limit_pairs = layer.layout.rule.pair_sum_limit
            layer.bits = bits
            if limit_pairs is not None and 2 * max(-lo, top) > limit_pairs:
                # Wide enough for this CPU's int16 pair sums to overflow: insert-qdq rounds it
                # with its pair-safe scales instead (the trained float weight is written back).
                model.graph.initializers[layer.weight].const_value = ir.tensor(shadows[layer.weight].detach().numpy(), name=layer.weight)
                pair_limited[layer.weight] = bits
                continue
            rounded[layer.weight] = RoundedWeight(codes, grid_of(scale, lo, top, layer.layout.axis), bits, layer.w)
        done = finish(model, ctx, training, layers, rounded, train_data=train_ctx.data, bn_samples=self.options.bn_samples,
                      widths_for_insert_qdq=pair_limited, activation_bits=activation_bits if self.options.activation_bits else None)
        for row in done["layers"]:
            row["continuous_bits"] = continuous.get(row["weight"])
        stats |= done
        if held_out is not None:
            stats.update(torch_vs_onnxruntime(model, held_out, out.name, self.options.check_samples, ctx, self.name))
        return PassResult(model, True, stats)

    def _cost(self, model: ir.Model, ctx: PassContext, layers: list[WeightLayer], budget, activation_bits: int):
        """(cost of a {weight: bits} map, the budget's limit, unit): weight bits, or bit-ops."""
        sizes = {l.weight: float(l.w.size) for l in layers}
        full_bits = ctx.target.weights.bits
        if budget.kind == "bops":
            macs = {l.weight: float(layer_macs(model, l.weight, l.node.name)) for l in layers}
            full = sum(macs.values()) * full_bits * ctx.target.activations.bits

            def cost_of(widths):
                return sum(macs[name] * b * activation_bits for name, b in widths.items())

            return cost_of, budget.number * full, "bit-ops"

        def cost_of(widths):
            return sum(sizes[name] * b for name, b in widths.items())

        total = sum(sizes.values())
        return cost_of, (budget.number * total if budget.kind == "bits" else budget.number * total * full_bits), "weight bits"

    @staticmethod
    def _fit_budget(widths: dict[str, int], quantizers: dict, ends: set[int], layers: list[WeightLayer], allowed: list[int], cost_of, limit: float) -> list[str]:
        """Lower learned widths one allowed step at a time, the layer whose continuous width sits
        nearest its lower neighbour first, until the cost is within ``limit``. Returns the nodes lowered."""
        lowered = []
        names = [l.weight for i, l in enumerate(layers) if i not in ends]
        node_of = {l.weight: l.node.name for l in layers}
        while cost_of(widths) > limit:
            candidates = [n for n in names if allowed.index(widths[n]) > 0]
            if not candidates:
                break

            def slack(n):
                q = quantizers[n]
                b = float(q.continuous_bits().detach()) if isinstance(q, UhlichQuantizer) else float(widths[n])
                return b - allowed[allowed.index(widths[n]) - 1]

            pick = min(candidates, key=slack)
            widths[pick] = allowed[allowed.index(widths[pick]) - 1]
            lowered.append(node_of[pick])
        return lowered
