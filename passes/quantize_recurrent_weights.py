"""quantize-recurrent-weights: store LSTM, GRU and RNN weights quantized, dequantized in front of the float kernel.

No integer kernel here runs a recurrent layer (onnxruntime's CPU LSTM and GRU are float; its
DynamicQuantizeLSTM is a contrib op with a layout of its own), yet its input and recurrence
weights W and R are most of a sequence model's bytes: 4.7 of the 6.3 MB of bench/transformers.py's
LSTM classifier. This pass stores W and R as the target's ``[weights]`` rule says, at its default
width (int8 per gate row on ort-cpu; int4 in blocks along the input axis on ort-cpu-int4), behind a
DequantizeLinear, so the file shrinks and the kernel still runs in float on the weights it is given.
The bias B and the initial states stay float (a few kB).

Which ops: the target's ``[ops] weight_only`` list. A weight that is not a float initializer (a
graph input, a computed tensor) stays as it is, with a note. Each quantized layer is registered with
the accuracy guard, which may put it back in float like any other layer.

Runs after insert-qdq, which leaves recurrent ops float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.cost_model import storage_dtype
from qcompiler.ir import NameAuthority, add_initializer, opset_version
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT
from qcompiler.quant.uniform import sqnr_db
from qcompiler.quant.weights import dequantize_weight, quantize_weight, stored_bytes, stored_tensor
from qcompiler.registry import register_pass
from qcompiler.targets.spec import INTEGER_DTYPES

#: Inputs of LSTM/GRU/RNN that are weights: W (input weights) and R (recurrence weights), each
#: [directions, gates x hidden, input or hidden].
_WEIGHT_INPUTS = (1, 2)
#: Gate rows are the output channels (axis 1); blocks run along the input axis (2).
_CHANNEL_AXIS, _BLOCK_AXIS = 1, 2


@register_pass
class QuantizeRecurrentWeights(Pass):
    """Store LSTM/GRU/RNN weights quantized behind DequantizeLinear; the recurrent kernel stays float."""

    name = "quantize-recurrent-weights"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        target = ctx.target
        ops = target.ops.weight_only
        layers = [n for n in model.graph if n.op_type in ops and n.domain in ("", "ai.onnx")]
        if not layers:
            return PassResult(model, False, {"layers": 0})
        rule = dataclasses.replace(target.weights, pair_sum_limit=None)  # a float kernel: no int16 pair sums
        bits = target.bits.default or rule.bits
        dtype = storage_dtype(target, bits)
        needed = 21 if rule.granularity == "per-block" or dtype in ("int4", "uint4") else 13
        if dtype not in INTEGER_DTYPES or opset_version(model) < needed:
            why = f"{dtype} weights are not stored this way" if dtype not in INTEGER_DTYPES else f"per-channel or 4-bit DequantizeLinear needs opset {needed} (the model has {opset_version(model)})"
            for node in layers:
                ctx.note(self.name, f"weights stay float: {why}", node=node.name, level="float", op_type=node.op_type)
            return PassResult(model, False, {"layers": 0})
        graph = model.graph
        names = NameAuthority(graph)
        axis = {"per-block": _BLOCK_AXIS, "per-channel": _CHANNEL_AXIS}.get(rule.granularity)
        records = []
        for node in layers:
            originals: dict[int, np.ndarray] = {}
            for index in _WEIGHT_INPUTS:
                value = node.inputs[index] if index < len(node.inputs) else None
                reason = _why_float(graph, value)
                if reason is not None:
                    ctx.note(self.name, f"input {index} stays float: {reason}", node=node.name, level="float", op_type=node.op_type)
                    continue
                w = value.const_value.numpy().astype(np.float32)
                codes, scale, zero_point = quantize_weight(w, rule, bits, axis)
                dq = _dequantize_node(graph, names, value.name, codes, scale, zero_point, dtype, axis, rule.block_size if rule.granularity == "per-block" else 0)
                graph.insert_before(node, dq)
                node.replace_input_with(index, dq.outputs[0])
                if not value.uses() and not value.is_graph_output():
                    graph.initializers.pop(value.name)
                originals[index] = w
                restored = dequantize_weight(codes, scale, zero_point, rule, axis)
                records.append({"layer": node.name, "weight": value.name, "float_bytes": w.nbytes,
                                "stored_bytes": stored_bytes(codes, scale, zero_point, dtype),
                                "weight_sqnr_db": round(sqnr_db(w, restored), 2)})
            if originals:
                ctx.facts.setdefault(FLOAT_LAYER_INPUTS_FACT, {})[node.name] = originals
        for r in records:
            ctx.note(self.name, f"{r['weight']}: {dtype} {rule.granularity}, {r['float_bytes']:,} -> {r['stored_bytes']:,} bytes, weight SQNR {r['weight_sqnr_db']} dB", node=r["layer"])
        return PassResult(model, bool(records), {"layers": len({r["layer"] for r in records}), "weights": len(records), "dtype": dtype,
                                                 "float_bytes": sum(r["float_bytes"] for r in records), "stored_bytes": sum(r["stored_bytes"] for r in records)})


def _why_float(graph: ir.Graph, value: ir.Value | None) -> str | None:
    if value is None or not value.name:
        return "absent"
    if value.const_value is None or value.name not in graph.initializers:
        return "not a constant initializer"
    if value.is_graph_input():
        return "also a graph input (whoever runs the model may replace it)"
    if value.const_value.dtype != ir.DataType.FLOAT or len(value.const_value.shape) != 3:
        return "not a float32 [directions, rows, columns] weight"
    return None


def _dequantize_node(graph: ir.Graph, names: NameAuthority, base: str, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str,
                     axis: int | None, block: int) -> ir.Node:
    stored = add_initializer(graph, names, f"{base}_quantized", stored_tensor(codes, dtype))
    scale_value = add_initializer(graph, names, f"{base}_scale", np.asarray(scale, np.float32))
    zp_value = add_initializer(graph, names, f"{base}_zero_point", stored_tensor(zero_point, dtype))
    attributes = [] if axis is None else [ir.AttrInt64("axis", axis)]
    if block:
        attributes.append(ir.AttrInt64("block_size", block))
    dq = ir.Node("", "DequantizeLinear", [stored, scale_value, zp_value], attributes=attributes, name=names.fresh(f"{base}_dequantize"))
    dq.outputs[0].name = names.fresh(f"{base}_dequantized")
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(codes.shape))
    return dq

