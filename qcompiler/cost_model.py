"""What a weight width costs: bytes, bit operations and predicted latency per layer.

Precision assignment trades sensitivity against one of these resources. Each is linear in the
per-layer choice, so the ILP stays exact:

- ``size``: parameters x bits (the logical weight bits);
- ``bops``: MACs x weight bits x activation bits (the bit-operation count of the HAWQ papers);
- ``latency``: MACs x the target's cost per MAC for the layer's op type and the dtype that width
  is stored and executed in (the smallest native width that holds it; ``[cost.op]`` before
  ``[cost.mac]``), so a width with no faster kernel than the next native one costs the same as
  that one, and a width that is slow for one op (onnxruntime's int4 Conv) is charged as slow.

MACs are per sample, from the static shapes `infer-shapes` leaves on the graph.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompiler.errors import QCError
from qcompiler.ir import SOURCE_KEY
from qcompiler.targets.spec import FLOAT_WIDTH, TargetSpec


def storage_width(bits: int, native: tuple[int, ...]) -> int:
    """The native width a ``bits``-wide weight is stored and computed in (32: float)."""
    if bits == FLOAT_WIDTH:
        return FLOAT_WIDTH
    wider = [n for n in sorted(native) if n >= bits]
    return wider[0] if wider else max(native)


def storage_dtype(target: TargetSpec, bits: int) -> str:
    """The dtype name (``int8``, ``int4``, ``float32``...) a ``bits``-wide weight runs as on ``target``."""
    if bits == FLOAT_WIDTH:
        return "float32"
    width = storage_width(bits, target.bits.native)
    base = target.weights.dtype
    return base if width == target.weights.bits else f"{'u' if base.startswith('u') else ''}int{width}"


def _per_sample_elements(value: ir.Value, node: ir.Node) -> int:
    """Elements of one sample of ``value`` (its first axis is the batch)."""
    if value.shape is None:
        raise QCError(f"output '{value.name}' has no shape: run infer-shapes first (needed for MACs)", node=node.name)
    dims = list(value.shape)[1:]
    if not all(isinstance(d, int) for d in dims):
        raise QCError(f"output '{value.name}' has a symbolic dimension {value.shape}: MACs need static shapes beyond the batch", node=node.name)
    return math.prod(dims)


def layer_macs(model: ir.Model, weight: str, node_name: str) -> int:
    """Multiply-accumulates per sample of the node that uses ``weight``."""
    node = next(n for n in model.graph if n.name == node_name)
    return node_macs(node, tuple(model.graph.initializers[weight].const_value.shape))


def node_macs(node: ir.Node, w_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of a Conv/ConvTranspose/Gemm/MatMul with weight shape ``w_shape``."""
    size = math.prod(w_shape)
    if node.op_type == "ConvTranspose":
        # Each input element is multiplied by every weight of its input channel.
        return _per_sample_elements(node.inputs[0], node) * size // w_shape[0]
    if node.op_type == "Gemm" or (node.op_type == "MatMul" and len(w_shape) >= 2):
        out_channels = w_shape[0] if node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int() else w_shape[-1]
    else:  # Conv: weights [C_out, C_in / group, k...]
        out_channels = w_shape[0]
    return _per_sample_elements(node.outputs[0], node) * size // out_channels


def predicted_speedup(model: ir.Model, target: TargetSpec, weight_bits: dict[str, int] | None = None) -> float | None:
    """Float latency over compiled latency of ``model``'s weight layers, from the target's cost
    table: each Conv/ConvTranspose/Gemm/MatMul costs MACs x its cost per MAC for the dtype its
    weight runs in (float32 where the weight was left float). None where shapes or figures are
    missing. Other ops (additions, pooling, requantization) are not modelled, so the figure
    describes networks dominated by their weight layers."""
    weight_bits = weight_bits or {}
    default = target.bits.default or target.weights.bits
    quantized = floating = 0.0
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        w = node.inputs[1]
        producer = w.producer()
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None and producer.inputs[0].const_value is not None:
            shape = tuple(producer.inputs[0].const_value.shape)
            source = producer.metadata_props.get(SOURCE_KEY, "")
            dtype = storage_dtype(target, weight_bits.get(source, default))
        elif w.const_value is not None:
            shape, dtype = tuple(w.const_value.shape), "float32"
        else:
            continue
        try:
            macs = node_macs(node, shape)
        except QCError:
            return None
        cost, base = target.cost.per_mac(node.op_type, dtype), target.cost.per_mac(node.op_type, "float32")
        if cost is None or base is None:
            return None
        quantized += macs * cost
        floating += macs * base
    return floating / quantized if quantized > 0 else None


def resource_matrix(kind: str, target: TargetSpec, bits: tuple[int, ...], parameters: np.ndarray, macs: np.ndarray | None, activation_bits: int | None = None, op_types: list[str] | None = None) -> np.ndarray:
    """[layers, widths] resource of each choice, in the unit of ``kind`` (bits, bit-ops, cost units).

    Latency reads each layer's op type (``op_types``) in the target's ``[cost.op]`` before its
    ``[cost.mac]``: a width can be fast for one op and slow for another.
    """
    widths = np.asarray(bits, dtype=np.float64)
    if kind in ("size", "bits"):
        return parameters[:, None] * widths[None, :]
    assert macs is not None
    if kind == "bops":
        return macs[:, None] * widths[None, :] * float(activation_bits or target.activations.bits)
    if kind == "latency":
        ops = op_types if op_types is not None else [""] * len(macs)
        per_mac = np.empty((len(macs), len(bits)))
        for j, b in enumerate(bits):
            dtype = storage_dtype(target, b)
            for i, op in enumerate(ops):
                cost = target.cost.per_mac(op, dtype)
                if cost is None:
                    raise QCError(f"no latency figure for {dtype} (a {b}-bit weight runs as {dtype}); the target's [cost.mac] lists {sorted(target.cost.mac)}", option="budget")
                per_mac[i, j] = cost
        return macs[:, None] * per_mac
    raise ValueError(kind)
