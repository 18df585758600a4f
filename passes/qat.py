"""qat: quantization-aware training of the quantized graph itself, with learned step sizes (LSQ).

Runs after `insert-qdq`, on the very QuantizeLinear/DequantizeLinear graph the target will run:
the torch executor evaluates it with straight-through rounding, so what is trained is what ships
(the training numerics are the deployed numerics, up to onnxruntime's integer accumulation).

Trained, by gradient descent on the calibration data (`qcompiler.training.fit`):
- each quantized weight, as a float shadow fake-quantized at its width (per channel, as stored)
  with a learned step size per channel (`qcompiler.quant.lsq`), starting from the float weight
  and insert-qdq's scales;
- each int32 bias, as a float shadow (re-quantized at input scale x weight scale at the end);
- each activation quantizer's scale (LSQ's gradient reaches it through QuantizeLinear and
  DequantizeLinear; zero points stay where calibration put them).

At the end the learned values are written back as codes, scales and int32 biases in place, so the
graph keeps its structure and `qc validate` applies unchanged. The loss is cross-entropy with
labels, else KL (MSE) against the float model's outputs.

    --pipeline "infer-shapes,fold-constants,fold-batchnorm,adaround{bits=4},calibrate,insert-qdq,qat{epochs=1}"
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.ir import SOURCE_KEY, constant_array, from_proto
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT, FLOAT_MODEL_FACT, WEIGHT_BITS_FACT
from qcompiler.quant.adaround import pair_sum_violations
from qcompiler.quant.lsq import fake_quantize
from qcompiler.quant.uniform import channel_ranges, dequantize, per_channel, sqnr_db
from qcompiler.registry import register_pass
from qcompiler.quant.weights import WeightGrid, weight_layout, weight_qrange
from qcompiler.low_bit_training import torch_vs_onnxruntime, training_split
from qcompiler.training import TrainSettings, fit, output_value, training_loss

#: The activation zero point types whose offsets qat can train, and their ranges.
_OFFSET_RANGES = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127), ir.DataType.UINT16: (0, 65535), ir.DataType.INT16: (-32768, 32767)}

#: Passed to the training graph as its reference overrides: "the float model's outputs".
_FLOAT_REFERENCE = MappingProxyType({})


@dataclass(frozen=True)
class QatOptions(TrainSettings):
    #: Epochs over the calibration data: from a good post-training start (adaround or plain
    #: rounding with bias correction) one epoch on a few thousand images is what recovers most.
    epochs: int = 1
    #: Adam's learning rate for weights, biases and step sizes alike (cosine-decayed).
    lr: float = 1e-5
    #: Train the activation quantizers' scales too (False: only weights, their scales and biases).
    learn_activation_scales: bool = True
    #: Train the activation quantizers' zero points too (LSQ+'s learned offsets; rounded
    #: straight-through, stored as integers): for activations that are not Relu-like, whose
    #: calibrated zero point can sit off the best one.
    learn_activation_offsets: bool = False
    #: The last calibration samples, held out of training: the written model runs on them both in
    #: torch and in onnxruntime, to report that they agree (0: no check).
    check_samples: int = 1000


@dataclass
class _WeightShadow:
    layer: ir.Node
    dq: ir.Node
    axis: int | None
    zero_point: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    bits: int
    pair_sum_limit: int | None
    float_weight: np.ndarray
    param: object  # torch.nn.Parameter, the float weight
    scale: object  # torch.nn.Parameter, its per-channel step


@dataclass
class _BiasShadow:
    layer: ir.Node
    dq: ir.Node
    param: object


class _TrainingGraph:
    """The quantized graph as `fit` runs it: weight and bias DequantizeLinear outputs replaced by
    their fake-quantized float shadows; `_FLOAT_REFERENCE` as overrides runs the float model."""

    def __init__(self, graph, float_graph, weights: list[_WeightShadow], biases: list[_BiasShadow]) -> None:
        self.graph, self.float_graph, self.weights, self.biases = graph, float_graph, weights, biases

    def run(self, feeds, outputs=None, overrides=None):
        if overrides is _FLOAT_REFERENCE:
            if self.float_graph is None:
                raise QCError("the label-free loss needs the float model: compile with qc compile / qcompiler.compile, or give 'labels' in the data", pass_name="qat")
            return self.float_graph.run(feeds, outputs)
        shadows = {w.dq.outputs[0].name: fake_quantize(w.param, w.scale, w.zero_point, w.lo, w.hi, w.axis) for w in self.weights}
        shadows.update({b.dq.outputs[0].name: b.param for b in self.biases})
        return self.graph.run(feeds, outputs, {**shadows, **(overrides or {})})


@register_pass
class Qat(Pass):
    """Train the quantized graph (weights, biases, LSQ step sizes) straight through its quantizers."""

    name = "qat"
    Options = QatOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        import torch

        from qcompiler.torch_exec import TorchGraph

        if ctx.data is None:
            raise QCError("qat trains on data: pass --calib FILE.npz (with 'labels' for a supervised loss)", pass_name=self.name)
        weights, biases, act_scales, act_offsets = self._quantizers(model, ctx)
        if not weights:
            raise QCError("no quantized weight to train: run qat after insert-qdq", pass_name=self.name)
        out = output_value(model, self.name)
        trainable = (act_scales if self.options.learn_activation_scales else []) + (act_offsets if self.options.learn_activation_offsets else [])
        graph = TorchGraph(model, trainable=trainable)
        float_graph = None
        if FLOAT_MODEL_FACT in ctx.facts:
            float_graph = TorchGraph(from_proto(ctx.facts[FLOAT_MODEL_FACT]))
        for w in weights:
            # Start exactly at the compiled model (its codes, as adaround or rounding chose them),
            # not at the float weight: training can then only move away from it by improving.
            start = dequantize(w.dq.inputs[0].const_value.numpy(), w.scale.detach().numpy(), w.zero_point, axis=w.axis)
            w.param = torch.nn.Parameter(torch.from_numpy(start))
        training = _TrainingGraph(graph, float_graph, weights, biases)
        params = {f"{w.dq.name}.weight": w.param for w in weights} | {f"{w.dq.name}.scale": w.scale for w in weights}
        params |= {f"{b.dq.name}.bias": b.param for b in biases} | graph.named_weights()
        train_ctx, held_out = training_split(ctx, self.options.check_samples, self.name)
        loss_name = training_loss(training, ctx, train_ctx.data, out.name, self.options.loss, self.options.batch_size, self.name)
        start = time.perf_counter()
        losses = fit(training, train_ctx, params, {}, loss_name=loss_name, out_name=out.name, reference_overrides=_FLOAT_REFERENCE,
                     settings=self.options, label="quantization-aware training", pass_name=self.name)
        seconds = time.perf_counter() - start
        rows, moved_offsets = self._write_back(model, weights, biases, graph, set(act_offsets))
        stats = {"loss": loss_name, "epochs": self.options.epochs, "loss_per_epoch": [round(v, 5) for v in losses], "seconds": round(seconds, 1),
                 "layers": rows, "activation_scales": len(act_scales) if self.options.learn_activation_scales else 0, **losses.stats()}
        if self.options.learn_activation_offsets:
            stats["activation_offsets"] = len(act_offsets)
            stats["activation_offsets_moved"] = moved_offsets
        if held_out is not None:
            stats.update(torch_vs_onnxruntime(model, held_out, out.name, self.options.check_samples, ctx, self.name))
        return PassResult(model, True, stats)

    def _quantizers(self, model: ir.Model, ctx: PassContext) -> tuple[list[_WeightShadow], list[_BiasShadow], list[str], list[str]]:
        """The weight and bias DequantizeLinear nodes of the quantized layers, and the scale and
        zero point initializers of the activation quantizers."""
        import torch

        floats = ctx.facts.get(FLOAT_LAYER_INPUTS_FACT, {})
        widths = ctx.facts.get(WEIGHT_BITS_FACT, {})
        default = ctx.target.bits.default or ctx.target.weights.bits
        weights, biases, act_scales, act_offsets, seen = [], [], [], [], set()
        for node in model.graph:
            if node.op_type == "QuantizeLinear" and len(node.inputs) > 1 and node.inputs[0] is not None and node.inputs[0].const_value is None:
                scale = node.inputs[1]
                if scale is not None and scale.name in model.graph.initializers and scale.name not in act_scales:
                    act_scales.append(scale.name)
                zp = node.inputs[2] if len(node.inputs) > 2 else None
                # Only where the codes go straight to DequantizeLinear: a Clip between them (a
                # narrower activation width) bounds the codes, and the zero point with them.
                direct = all(u.node.op_type == "DequantizeLinear" for u in node.outputs[0].uses())
                if direct and zp is not None and zp.name in model.graph.initializers and zp.name not in act_offsets and zp.dtype in _OFFSET_RANGES:
                    act_offsets.append(zp.name)
            if node.op_type != "DequantizeLinear" or node.inputs[0] is None or node.inputs[0].const_value is None or id(node) in seen:
                continue
            codes = node.inputs[0].const_value.numpy()
            if codes.dtype.kind not in "iu" or len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
                continue
            for use in node.outputs[0].uses():
                layer, roles = use.node, input_roles(use.node)
                if roles.weight == use.idx and "block_size" not in node.attributes:
                    seen.add(id(node))
                    axis = node.attributes["axis"].as_int() if "axis" in node.attributes and node.inputs[1].const_value.size > 1 else None
                    axis = axis % codes.ndim if axis is not None else None
                    zp = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros((), np.int64)
                    scale = node.inputs[1].const_value.numpy().astype(np.float32)
                    source = node.outputs[0].metadata_props.get(SOURCE_KEY, node.inputs[0].name)
                    bits = widths.get(source, default)
                    layout = weight_layout(layer, codes, ctx.target, roles.weight_axis)
                    qmin, qmax = weight_qrange(layout.rule, bits)
                    lo, hi = np.full(scale.shape, qmin, np.int64), np.full(scale.shape, qmax, np.int64)
                    if qmin != -qmax and axis is not None and scale.ndim == 1:
                        # A full low-bit range ([-2^(b-1), 2^(b-1) - 1]) is not its own mirror: a channel
                        # fold-batchnorm negated (a negative BatchNormalization scale) holds [-qmax, -qmin].
                        offsets = np.asarray(zp, np.int64).reshape(-1) if np.size(zp) > 1 else np.asarray(zp, np.int64)
                        top = channel_ranges(codes.astype(np.int64), axis)[1] - offsets
                        lo, hi = np.where(top > qmax, -qmax, lo), np.where(top > qmax, -qmin, hi)
                    limit = layout.rule.pair_sum_limit if layout.rule.symmetric and qmax - qmin > (layout.rule.pair_sum_limit or 1 << 30) else None
                    if limit is not None:
                        # The pair-safe top of each channel, as insert-qdq proved it: kept while training.
                        offsets = np.asarray(zp, np.int64)
                        if axis is not None and offsets.ndim == 1:
                            offsets = offsets.reshape([-1 if d == axis else 1 for d in range(codes.ndim)])
                        distance = np.abs(codes.astype(np.int64) - offsets)
                        top = np.moveaxis(distance, axis, 0).reshape(codes.shape[axis], -1).max(axis=1) if axis is not None else distance.max()
                        lo, hi = -np.asarray(top).reshape(scale.shape), np.asarray(top).reshape(scale.shape)
                    float_weight = floats.get(layer.name, {}).get(use.idx)
                    if float_weight is None or np.shape(float_weight) != codes.shape:
                        float_weight = dequantize(codes, scale, zp, axis=axis)
                    weights.append(_WeightShadow(layer, node, axis, np.asarray(zp), lo, hi, bits, limit, np.asarray(float_weight, np.float32), None,
                                                 torch.nn.Parameter(torch.from_numpy(scale.copy()))))
                    break
                if roles.bias == use.idx:
                    seen.add(id(node))
                    # The compiled bias (bias correction included), as the weights start compiled.
                    bias = (codes.astype(np.float64) * node.inputs[1].const_value.numpy().astype(np.float64)).astype(np.float32)
                    biases.append(_BiasShadow(layer, node, torch.nn.Parameter(torch.from_numpy(bias))))
                    break
        return weights, biases, act_scales, act_offsets

    @staticmethod
    def _write_back(model: ir.Model, weights: list[_WeightShadow], biases: list[_BiasShadow], graph, offsets: set[str]) -> tuple[list[dict], int]:
        """Store the trained values as the graph's codes, scales, zero points and int32 biases;
        also the number of zero points that moved."""
        trained = {name: p.detach().numpy() for name, p in graph.named_weights().items()}
        moved = 0
        for name, value in trained.items():
            value_ir = model.graph.initializers[name]
            old = value_ir.const_value.numpy()
            if name in offsets:
                lo, hi = _OFFSET_RANGES[value_ir.dtype]
                new = np.clip(np.rint(value), lo, hi).astype(old.dtype).reshape(old.shape)
                moved += int(np.any(new != old))
            else:
                new = np.maximum(np.abs(value), 1e-12).astype(old.dtype).reshape(old.shape)
            value_ir.const_value = ir.tensor(new, name=name)
        rows, weight_scale_of = [], {}
        for w in weights:
            scale = np.maximum(np.abs(w.scale.detach().numpy()), 1e-12).astype(np.float32)
            values = w.param.detach().numpy()
            grid = WeightGrid(scale, np.asarray(w.zero_point), w.lo, w.hi, w.axis)
            codes = grid.nearest(values)
            if w.pair_sum_limit is not None and w.axis is not None:
                bad = pair_sum_violations(codes, w.zero_point, w.axis, w.pair_sum_limit)
                if bad.any():
                    # Rounding moved two large weights of a channel past the int16 pair limit:
                    # those channels take the always-safe top of half the limit.
                    half = w.pair_sum_limit // 2
                    codes = np.where(per_channel(bad, codes.ndim, w.axis), np.clip(codes, -half, half), codes)
            stored = w.dq.inputs[0]
            dtype = stored.const_value.numpy().dtype
            stored.const_value = ir.tensor(codes.astype(dtype), name=stored.name)
            old_scale = w.dq.inputs[1].const_value.numpy()
            w.dq.inputs[1].const_value = ir.tensor(scale.reshape(old_scale.shape), name=w.dq.inputs[1].name)
            weight_scale_of[w.layer.name] = scale
            rows.append({"node": w.layer.name, "bits": w.bits, "scale": float(np.mean(scale)), "weight_sqnr_db": round(sqnr_db(w.float_weight, grid.dequantize(codes)), 2),
                         "scale_change_median": round(float(np.median(scale / np.maximum(np.abs(old_scale.reshape(scale.shape)), 1e-12))), 4)})
        for b in biases:
            x = b.layer.inputs[input_roles(b.layer).activations[0]]
            x_dq = x.producer() if x is not None else None
            w_scale = weight_scale_of.get(b.layer.name)
            if x_dq is None or x_dq.op_type != "DequantizeLinear" or w_scale is None:
                continue
            bias_scale = (np.float32(constant_array(x_dq.inputs[1]).reshape(())) * w_scale).astype(np.float32)
            codes = np.clip(np.rint(b.param.detach().numpy() / bias_scale.reshape(-1)), -(2**31), 2**31 - 1).astype(np.int32)
            b.dq.inputs[0].const_value = ir.tensor(codes.reshape(b.dq.inputs[0].const_value.shape), name=b.dq.inputs[0].name)
            old = b.dq.inputs[1].const_value.numpy()
            b.dq.inputs[1].const_value = ir.tensor(bias_scale.reshape(old.shape), name=b.dq.inputs[1].name)
        return rows, moved
