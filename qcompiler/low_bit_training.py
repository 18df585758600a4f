"""What the low-bit training passes (`slb`, `learn-bits`) share: the weight layers they quantize,
the float graph trained with BatchNormalization in batch-statistics mode, and the finish that
re-estimates BN, writes the weights back on their grids and checks torch against onnxruntime.

These passes run on the float graph *before* `fold-batchnorm`: a BN folded into a weight before
low-bit training freezes the normalization the quantized weight needs to move (brevitas #494).
While training every BN normalizes with its batch's statistics; after it, their running mean and
variance are re-estimated on training data with the final hard weights (SLB's "state BN"), and
`fold-batchnorm` then folds them: the grids' per-channel scales absorb BN's factors, so the codes
found by training are the codes shipped (`RoundedWeight.channels_scaled`). The chosen widths go
through the same lowering as `assign-precision`'s (`WEIGHT_BITS_FACT`, read by insert-qdq).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnx_ir as ir

from qcompiler.data import DataSource
from qcompiler.errors import QCError
from qcompiler.ir import constant_array, is_float_tensor, to_proto
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import PassContext
from qcompiler.precision import ACTIVATION_BITS_FACT, ROUNDED_WEIGHTS_FACT, WEIGHT_BITS_FACT
from qcompiler.quant.uniform import sqnr_db
from qcompiler.quant.weights import RoundedWeight, WeightGrid, WeightLayout, weight_layout

#: Passed to the training graph as its reference overrides: "the float model's outputs".
FLOAT_REFERENCE: Mapping[str, object] = MappingProxyType({})


@dataclass
class WeightLayer:
    """A layer whose constant weight a training pass quantizes."""

    node: ir.Node
    weight: str  # the weight initializer's name
    x: str  # the activation input's name
    w: np.ndarray  # the float weight (float32)
    layout: WeightLayout
    bits: int = 0  # the width the pass gives it (0: not chosen yet)


def quantizable_weights(model: ir.Model, ctx: PassContext) -> tuple[list[WeightLayer], list[tuple[str, str]]]:
    """The layers the target quantizes whose weight is a float initializer, in graph order, and
    (node, why) for the ones a training pass must leave to insert-qdq."""
    layers, skipped, seen = [], [], set()
    for node in model.graph:
        roles = input_roles(node)
        if roles.weight is None or roles.weight >= len(node.inputs) or not roles.activations:
            continue
        wv, xv = node.inputs[roles.weight], node.inputs[roles.activations[0]]
        if wv is None or xv is None or wv.name not in model.graph.initializers or not is_float_tensor(wv) or constant_array(wv) is None:
            continue
        if node.op_type not in ctx.target.ops.quantized:
            continue
        if wv.name in seen:
            skipped.append((node.name, f"weight '{wv.name}' is shared with an earlier layer, quantized there"))
            continue
        seen.add(wv.name)
        others = [v for i, v in enumerate(node.inputs) if i not in (roles.weight, roles.activations[0]) and v is not None]
        if any(v.name not in model.graph.initializers for v in others):
            skipped.append((node.name, "an input other than its activation and weight is computed, not constant"))
            continue
        w = constant_array(wv).astype(np.float32)
        layers.append(WeightLayer(node, wv.name, xv.name, w, weight_layout(node, w, ctx.target, roles.weight_axis)))
    return layers, skipped


def float_parameters(model: ir.Model, layers: list[WeightLayer]) -> list[str]:
    """The float initializers trained beside the quantized weights: the layers' biases and every
    BatchNormalization's scale and shift (its running statistics are re-estimated, not trained)."""
    names: list[str] = []
    for layer in layers:
        roles = input_roles(layer.node)
        if roles.bias is not None and roles.bias < len(layer.node.inputs) and (b := layer.node.inputs[roles.bias]) is not None:
            names.append(b.name)
    for node in model.graph:
        if node.op_type == "BatchNormalization" and len(node.inputs) >= 3:
            names += [v.name for v in node.inputs[1:3] if v is not None]
    return [n for n in dict.fromkeys(names) if n in model.graph.initializers and is_float_tensor(model.graph.initializers[n])]


class TrainingGraph:
    """The float graph as `fit` runs it: BN on batch statistics, the quantized weights replaced by
    what ``weights()`` returns; `FLOAT_REFERENCE` as overrides runs the untouched float model."""

    def __init__(self, model: ir.Model, weights: Callable[[], dict[str, object]], trainable: list[str]) -> None:
        from qcompiler.torch_exec import TorchGraph

        self.graph = TorchGraph(model, trainable=trainable, batchnorm_training=True)
        self.float_graph = TorchGraph(model)
        self.weights = weights

    def run(self, feeds, outputs=None, overrides=None):
        if overrides is FLOAT_REFERENCE:
            return self.float_graph.run(feeds, outputs)
        return self.graph.run(feeds, outputs, {**self.weights(), **(overrides or {})})


def training_split(ctx: PassContext, check_samples: int, pass_name: str) -> tuple[PassContext, DataSource | None]:
    """(a context whose data is the training part, the held-out samples or None): the last
    ``check_samples`` of the calibration data are kept out of training to check the written model on."""
    data = ctx.data
    assert data is not None
    if check_samples <= 0:
        return ctx, None
    if data.num_samples < 2 * check_samples:
        ctx.note(pass_name, f"the calibration data has {data.num_samples} samples, fewer than twice check-samples={check_samples}: "
                            "no samples held out, the torch vs onnxruntime check runs on training samples", level="warning")
        return ctx, data.head(check_samples)
    train, held = data.split(check_samples)
    return dataclasses.replace(ctx, data=train), held


def reestimate_batchnorm(model: ir.Model, data: DataSource, overrides: dict[str, object], samples: int, batch_size: int = 256) -> int:
    """Set every BatchNormalization's running mean and variance to those of its input over the
    first ``samples`` training samples, with the network's weights as ``overrides`` give them
    (each BN on its batch's statistics while they are gathered, as in training). Returns the number of BNs set."""
    import torch

    from qcompiler.torch_exec import BatchNormStatistics, TorchGraph

    bns = [n for n in model.graph if n.op_type == "BatchNormalization" and len(n.inputs) >= 5]
    if not bns:
        return 0
    graph = TorchGraph(model, batchnorm_training=True)
    stats = BatchNormStatistics()
    graph.batchnorm_statistics = stats
    n = min(samples, data.usable_samples)
    last = [v.name for v in model.graph.outputs]
    with torch.no_grad():
        for i in range(0, n, batch_size):
            graph.run({k: a[i : min(i + batch_size, n)] for k, a in data.arrays.items()}, last, overrides)
    found = stats.result()
    for bn in bns:
        if bn.name not in found:
            continue
        mean, var = found[bn.name]
        for value, new in ((bn.inputs[3], mean), (bn.inputs[4], var)):
            old = value.const_value.numpy()
            value.const_value = ir.tensor(new.astype(old.dtype).reshape(old.shape), name=value.name)
    return len(found)


def write_weights(model: ir.Model, ctx: PassContext, layers: list[WeightLayer], rounded: dict[str, RoundedWeight]) -> list[dict]:
    """Store each layer's weight as its codes' values, the codes and widths in the facts (for
    fold-batchnorm and insert-qdq); one report row per layer."""
    rows = []
    for layer in layers:
        r = rounded.get(layer.weight)
        if r is None:
            continue
        values = r.grid.dequantize(r.codes)
        model.graph.initializers[layer.weight].const_value = ir.tensor(values.astype(np.float32), name=layer.weight)
        used = np.unique(r.codes)
        rows.append({"node": layer.node.name, "weight": layer.weight, "bits": r.bits, "scale": float(np.mean(r.grid.scale)),
                     "weight_sqnr_db": round(sqnr_db(layer.w, values), 2), "levels_used": int(used.size),
                     "nearest_changed": round(float(np.mean(r.codes != r.grid.nearest(layer.w))), 4)})
    # The float weight the codes stand for is the trained one itself: the float model's weight
    # is what training moved away from on purpose, so bias correction must not pull back to it.
    trained = {name: dataclasses.replace(r, float_weight=r.grid.dequantize(r.codes).astype(np.float32)) for name, r in rounded.items()}
    ctx.facts.setdefault(ROUNDED_WEIGHTS_FACT, {}).update(trained)
    ctx.facts[WEIGHT_BITS_FACT] = {**ctx.facts.get(WEIGHT_BITS_FACT, {}), **{name: r.bits for name, r in trained.items()}}
    return rows


def finish(model: ir.Model, ctx: PassContext, training: TrainingGraph, layers: list[WeightLayer], rounded: dict[str, RoundedWeight], *,
           train_data: DataSource, bn_samples: int, widths_for_insert_qdq: Mapping[str, int], activation_bits: int | None) -> dict:
    """The end both low-bit training passes share, in this order: the trained float tensors
    (biases, BN scales and shifts, float-trained layers) written back, the weights written on
    their grids (`write_weights`), the widths insert-qdq rounds at itself (``widths_for_insert_qdq``)
    and the activation width (None: the target's) put in the facts, then every BN's statistics
    re-estimated for exactly those weights. Returns the shared stats: ``layers`` (the rows),
    ``batchnorm_reestimated``, ``batchnorm_seconds``."""
    import time

    from qcompiler.training import write_back

    write_back(model, training.graph.named_weights())
    rows = write_weights(model, ctx, layers, rounded)
    if widths_for_insert_qdq:
        ctx.facts[WEIGHT_BITS_FACT] = {**ctx.facts.get(WEIGHT_BITS_FACT, {}), **widths_for_insert_qdq}
    if activation_bits is not None:
        ctx.facts[ACTIVATION_BITS_FACT] = activation_bits
    start = time.perf_counter()
    bns = reestimate_batchnorm(model, train_data, {}, bn_samples)
    return {"layers": rows, "batchnorm_reestimated": bns, "batchnorm_seconds": round(time.perf_counter() - start, 1)}


def grid_of(scale: np.ndarray, lo: int, hi: int, axis: int | None) -> WeightGrid:
    """A symmetric grid (zero point 0) with codes ``lo..hi`` in every channel."""
    scale = np.maximum(np.abs(np.asarray(scale, np.float32)), np.float32(1e-12))
    return WeightGrid(scale, np.zeros(scale.shape, np.int64), np.full(scale.shape, lo, np.int64), np.full(scale.shape, hi, np.int64), axis)


def torch_vs_onnxruntime(model: ir.Model, data: DataSource, out_name: str, n: int, ctx: PassContext, pass_name: str) -> dict:
    """The written model run in torch and in onnxruntime (all optimizations) on the first ``n``
    samples of ``data``: their top-1 (with labels) and the SQNR between their outputs. A warning
    when their top-1 differ by more than 0.1 points (the training numerics must be the deployed ones)."""
    import onnxruntime as ort
    import torch

    from qcompiler.runtime import session_options
    from qcompiler.torch_exec import TorchGraph

    n = min(n, data.usable_samples)
    if n <= 0:
        return {}
    feeds = {k: np.asarray(a[:n]) for k, a in data.arrays.items()}
    graph = TorchGraph(model)
    with torch.no_grad():
        torch_out = np.concatenate([graph.run({k: a[i : i + 256] for k, a in feeds.items()}, [out_name])[out_name].numpy() for i in range(0, n, 256)])
    session = ort.InferenceSession(to_proto(model).SerializeToString(), session_options(optimize=True), providers=["CPUExecutionProvider"])
    ort_out = np.concatenate([session.run([out_name], {k: a[i : i + 256] for k, a in feeds.items()})[0] for i in range(0, n, 256)])
    result = {"check_samples": n, "check_data": data.origin, "torch_vs_onnxruntime_sqnr_db": round(sqnr_db(ort_out, torch_out), 2)}
    if data.labels is not None and torch_out.ndim == 2:
        labels = np.asarray(data.labels[:n])
        result["top1_torch"] = round(100 * float(np.mean(torch_out.argmax(1) == labels)), 2)
        result["top1_onnxruntime"] = round(100 * float(np.mean(ort_out.argmax(1) == labels)), 2)
        if abs(result["top1_torch"] - result["top1_onnxruntime"]) > 0.1:
            ctx.note(pass_name, f"the written model's top-1 in torch ({result['top1_torch']} %) and in onnxruntime ({result['top1_onnxruntime']} %) differ by more than 0.1 points", level="warning")
    return result


def check_no_quantized_graph(model: ir.Model, pass_name: str) -> None:
    """Refuse a graph that already holds Q/DQ weights: these passes train float weights."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
        raise QCError(f"{pass_name} trains the float graph: run it before calibrate and insert-qdq (and before fold-batchnorm, "
                      "so BatchNormalization stays in training mode), e.g. --pipeline \"infer-shapes,fold-constants,"
                      f"{pass_name},fold-batchnorm,calibrate,insert-qdq\"", pass_name=pass_name)
