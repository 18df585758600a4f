"""quantize-embeddings: store constant Gather tables (token embeddings) as integers, read as integers.

A language model's token embedding is often its largest tensor (BERT-base: 23 M of its 110 M
parameters), and every run reads only the rows of its tokens. Left float it is what keeps a
quantized transformer large: 2 of the 5.4 MB of bench/transformers.py's int8 encoder. This pass
quantizes each table with the shared weight quantizer (a scale per row, or per block along the
row) and rewrites the lookup so that the integer rows are gathered first and only they are
dequantized; the whole table is never dequantized at run time.

How is the target's ``[embeddings]`` section (`EmbeddingRule`): its integer type and scales, and
its lowering:

- ``gather-cast-mul``: ``Mul(Cast(Gather(table_q, ids)), Gather(scales, ids))`` (a ``Sub`` of the
  gathered zero points first where they are not 0): standard ops, any opset, 8-bit tables;
- ``gather-block-quantized``: onnxruntime's ``com.microsoft.GatherBlockQuantized``, int4/uint4
  blocks along each row.

A table is left float, with a note, when something other than an axis-0 Gather reads it (a
language-model head tied to the embedding reads it as a MatMul weight, which insert-qdq handles),
when it is a graph input (the caller may replace it), or when it has fewer than ``min_elements``
values. A target without ``[embeddings]`` leaves every table float.

Runs after insert-qdq, which treats Gather as data movement: the rows it gathers are then the
input of whatever quantizer insert-qdq put after the lookup.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.accuracy_guard import FloatLookup
from qcompiler.ir import NameAuthority, add_initializer, opset_version
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import FLOAT_LAYER_INPUTS_FACT
from qcompiler.quant.uniform import sqnr_db
from qcompiler.quant.weights import dequantize_weight, quantize_weight, stored_bytes, stored_tensor
from qcompiler.registry import register_pass
from qcompiler.targets.spec import EmbeddingRule


@register_pass
class QuantizeEmbeddings(Pass):
    """Store constant Gather tables (embeddings) as integers and gather them as integers (weight-only)."""

    name = "quantize-embeddings"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        how = ctx.target.embeddings
        if how is None:
            ctx.note(self.name, f"target '{ctx.target.name}' has no [embeddings] section: embedding tables stay float")
            return PassResult(model, False, {"tables": 0})
        if how.lowering == "gather-block-quantized" and opset_version(model) < 21:
            ctx.note(self.name, f"4-bit tables need opset 21 (the model has {opset_version(model)}): embedding tables stay float", level="warning")
            return PassResult(model, False, {"tables": 0})
        graph = model.graph
        names = NameAuthority(graph)
        tables: list[dict[str, object]] = []
        for value, lookups in _embedding_tables(graph).items():
            reason = _why_float(value, lookups, how)
            if reason is not None:
                if value.const_value.size >= how.min_elements:
                    ctx.note(self.name, f"table '{value.name}' {list(value.shape)} stays float: {reason}", level="float", op_type="Gather")
                continue
            table = value.const_value.numpy().astype(np.float32)
            axis = 1 if how.rule.granularity == "per-block" else (0 if how.rule.granularity == "per-channel" else None)
            codes, scale, zero_point = quantize_weight(table, how.rule, how.rule.bits, axis)
            restored = dequantize_weight(codes, scale, zero_point, how.rule, axis)
            table_q = add_initializer(graph, names, f"{value.name}_quantized", stored_tensor(codes, how.rule.dtype))
            for gather in lookups:
                ids = gather.inputs[1].name
                if how.lowering == "gather-cast-mul":
                    last = _lower_gather_cast_mul(graph, names, gather, table_q, scale, zero_point, axis)
                else:
                    last = _lower_gather_block_quantized(model, names, gather, table_q, scale, zero_point, how)
                # The accuracy guard may put the lookup back in float, like any quantized layer.
                ctx.facts.setdefault(FLOAT_LAYER_INPUTS_FACT, {})[last.name] = FloatLookup(table, ids)
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
            tables.append({"table": value.name, "shape": list(table.shape), "lookups": len(lookups), "float_bytes": table.nbytes,
                           "stored_bytes": stored_bytes(codes, scale, zero_point, how.rule.dtype),
                           "weight_sqnr_db": round(sqnr_db(table, restored), 2)})
        for t in tables:
            ctx.note(self.name, f"table '{t['table']}' {t['shape']}: {how.rule.dtype} {how.rule.granularity} ({how.lowering}), "
                                f"{t['float_bytes']:,} -> {t['stored_bytes']:,} bytes, weight SQNR {t['weight_sqnr_db']} dB")
        return PassResult(model, bool(tables), {"tables": len(tables), "dtype": how.rule.dtype, "lowering": how.lowering,
                                                "float_bytes": sum(t["float_bytes"] for t in tables), "stored_bytes": sum(t["stored_bytes"] for t in tables),
                                                "per_table": tables})


def _embedding_tables(graph: ir.Graph) -> dict[ir.Value, list[ir.Node]]:
    """Each float32 rank-2 initializer read by a Gather as its data, with those Gathers."""
    found: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        data = node.inputs[0]
        if data is None or data.const_value is None or data.name not in graph.initializers:
            continue
        if data.const_value.dtype != ir.DataType.FLOAT or len(data.const_value.shape) != 2:
            continue
        found.setdefault(data, []).append(node)
    return found


def _why_float(value: ir.Value, lookups: list[ir.Node], how: EmbeddingRule) -> str | None:
    """Why a table must stay float, or None."""
    if value.const_value.size < how.min_elements:
        return f"{value.const_value.size} values, under the target's min_elements ({how.min_elements})"
    if value.is_graph_input():
        return "it is also a graph input (whoever runs the model may replace it)"
    if value.is_graph_output():
        return "it is also a graph output"
    for gather in lookups:
        axis = gather.attributes["axis"].as_int() if "axis" in gather.attributes else 0
        if axis not in (0, -2):
            return f"Gather '{gather.name}' reads it along axis {axis}, not by row"
    others = [node for node, _ in value.uses() if node not in lookups]
    if others:
        return f"{others[0].op_type} '{others[0].name}' also reads it (tied weights: that op quantizes it on its own)"
    return None


def _lower_gather_cast_mul(graph: ir.Graph, names: NameAuthority, gather: ir.Node, table_q: ir.Value, scale: np.ndarray, zero_point: np.ndarray,
                           axis: int | None) -> ir.Node:
    """Gather the integer rows, Cast them to float, subtract the rows' zero points where not 0,
    multiply by the rows' scales (gathered by the same indices; a single scale per tensor)."""
    out = gather.outputs[0]
    base = gather.name or out.name
    ids = gather.inputs[1]
    rows = ir.Node("", "Gather", [table_q, ids], attributes=[ir.AttrInt64("axis", 0)], name=names.fresh(f"{base}_rows"))
    rows.outputs[0].name = names.fresh(f"{out.name}_rows")
    rows.outputs[0].dtype = table_q.dtype
    cast = ir.Node("", "Cast", [rows.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)], name=names.fresh(f"{base}_cast"))
    cast.outputs[0].name = names.fresh(f"{out.name}_codes")
    cast.outputs[0].dtype = ir.DataType.FLOAT
    new_nodes = [rows, cast]
    codes = cast.outputs[0]

    def per_row(array: np.ndarray, what: str) -> ir.Value:
        constant = add_initializer(graph, names, f"{table_q.name}_{what}", np.asarray(array, np.float32).reshape(-1, 1) if axis is not None else np.asarray(array, np.float32).reshape(()))
        if axis is None:
            return constant
        picked = ir.Node("", "Gather", [constant, ids], attributes=[ir.AttrInt64("axis", 0)], name=names.fresh(f"{base}_{what}"))
        picked.outputs[0].name = names.fresh(f"{out.name}_{what}")
        picked.outputs[0].dtype = ir.DataType.FLOAT
        new_nodes.append(picked)
        return picked.outputs[0]

    if np.any(zero_point):
        offsets = per_row(zero_point, "zero_points")
        sub = ir.Node("", "Sub", [codes, offsets], name=names.fresh(f"{base}_centred"))
        sub.outputs[0].name = names.fresh(f"{out.name}_centred")
        sub.outputs[0].dtype = ir.DataType.FLOAT
        new_nodes.append(sub)
        codes = sub.outputs[0]
    scales = per_row(scale, "scales")
    mul = ir.Node("", "Mul", [codes, scales], name=names.fresh(f"{base}_dequantized"))
    mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, out.shape
    new_nodes.append(mul)
    graph.insert_before(gather, new_nodes)
    _take_over(graph, gather, mul.outputs[0])
    return mul


def _lower_gather_block_quantized(model: ir.Model, names: NameAuthority, gather: ir.Node, table_q: ir.Value, scale: np.ndarray, zero_point: np.ndarray,
                                  how: EmbeddingRule) -> ir.Node:
    """onnxruntime's GatherBlockQuantized: the rows' 4-bit blocks gathered and dequantized in one kernel."""
    graph = model.graph
    out = gather.outputs[0]
    base = gather.name or out.name
    inputs = [table_q, gather.inputs[1], add_initializer(graph, names, f"{table_q.name}_scales", np.asarray(scale, np.float32))]
    default_zero = 8 if how.rule.dtype == "uint4" else 0
    if np.any(zero_point != default_zero):
        inputs.append(add_initializer(graph, names, f"{table_q.name}_zero_points", stored_tensor(zero_point, how.rule.dtype)))
    node = ir.Node("com.microsoft", "GatherBlockQuantized", inputs, attributes=[ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                                                                                 ir.AttrInt64("block_size", how.rule.block_size)], name=names.fresh(f"{base}_blocks"))
    node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, out.shape
    model.opset_imports.setdefault("com.microsoft", 1)
    graph.insert_before(gather, node)
    _take_over(graph, gather, node.outputs[0])
    return node


def _take_over(graph: ir.Graph, gather: ir.Node, result: ir.Value) -> None:
    """``result`` replaces the float lookup everywhere and carries its name (per-layer matching by
    name, and a graph output keeps its name)."""
    out = gather.outputs[0]
    name = out.name
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(gather, safe=True)
    result.name = name

