"""fold-batchnorm: fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

BN(y) = a * y + b per channel, with a = gamma / sqrt(var + eps) and b = beta - mean * a. When y is
the output of a linear op whose weight is constant and that nothing else reads, scaling the weight's
output channels by a and the bias by a (then adding b) gives the same function with one op less.
A BN that cannot be folded (after a ReLU, an Add, a graph input, ...) becomes Mul + Add, which
later passes can quantize; folding backwards through a nonlinearity would change the function.

A weight a training pass (slb, learn-bits) left on a per-channel grid stays on one: scaling an
output channel scales its grid, so the folded weight keeps its codes (`RoundedWeight.channels_scaled`)
and its width, and insert-qdq stores exactly them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler.ir import NameAuthority, add_initializer, constant_array
from qcompiler.op_roles import input_roles
from qcompiler.pass_manager import Pass, PassContext, PassResult
from qcompiler.precision import ROUNDED_WEIGHTS_FACT, WEIGHT_BITS_FACT
from qcompiler.registry import register_pass

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@register_pass
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul; others become Mul+Add."""

    name = "fold-batchnorm"
    tolerance = 1e-4

    @dataclass(frozen=True)
    class Options:
        #: Rewrite BNs that cannot be folded as Mul + Add (quantizable); false leaves them as they are.
        decompose_standalone: bool = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        names = NameAuthority(graph)
        folded = decomposed = 0
        for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
            affine = _bn_affine(bn)
            if affine is None:
                ctx.note(self.name, "left as is: parameters are not constant or training outputs are used", node=bn.name)
                continue
            a, b = affine
            producer = bn.inputs[0].producer()
            reason = _why_not_foldable(bn, producer)
            old_weight = producer.inputs[1] if reason is None else None
            result = _fold_into(producer, a, b, graph, names) if reason is None else None
            if result is not None:
                _carry_rounded_weight(ctx, old_weight, producer, a)
                _bypass(bn, result, graph)
                folded += 1
            elif self.options.decompose_standalone and _decompose(bn, a, b, graph, names):
                decomposed += 1
                ctx.note(self.name, f"not folded ({reason or 'unsupported weight layout'}): rewritten as Mul+Add", node=bn.name)
            else:
                ctx.note(self.name, f"not folded: {reason or 'unsupported weight layout'}", node=bn.name)
        if folded or decomposed:
            RemoveUnusedNodesPass()(model)
        return PassResult(model, bool(folded or decomposed), {"folded": folded, "decomposed": decomposed})


def _carry_rounded_weight(ctx: PassContext, old: ir.Value, node: ir.Node, a: np.ndarray) -> None:
    """Move the codes (and chosen width) of a weight on a grid over to its folded copy."""
    rounded = ctx.facts.get(ROUNDED_WEIGHTS_FACT, {}).get(old.name)
    widths = ctx.facts.get(WEIGHT_BITS_FACT)
    new = node.inputs[1]
    if widths is not None and old.name in widths:
        widths[new.name] = widths[old.name]
    if rounded is None:
        return
    # BN's channels are the weight's output channels (a grouped ConvTranspose holds fewer per
    # slice than BN has: channels_scaled declines it).
    axis = input_roles(node).weight_axis
    scaled = rounded.channels_scaled(a, axis) if axis is not None else None
    if scaled is None:
        return  # insert-qdq rounds the folded weight afresh (matches() no longer holds)
    # Exactly the grid's values (the float64 product differs from them in the last bit).
    new.const_value = ir.tensor(scaled.grid.dequantize(scaled.codes).astype(new.const_value.numpy().dtype), name=new.name)
    ctx.facts[ROUNDED_WEIGHTS_FACT][new.name] = scaled


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) with BN(y) = a*y + b per channel, in float64; None if BN is not in inference form."""
    if any(out.uses() for out in bn.outputs[1:]) or len(bn.inputs) < 5:
        return None
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    eps_attr = bn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    a = gamma / np.sqrt(var + eps)
    return a, beta - mean * a


def _why_not_foldable(bn: ir.Node, producer: ir.Node | None) -> str | None:
    x = bn.inputs[0]
    if producer is None:
        return "input is a graph input"
    if producer.op_type not in _LINEAR_OPS or producer.domain not in ("", "ai.onnx"):
        return f"preceded by {producer.op_type}, not a linear op"
    if len(x.uses()) != 1 or x.is_graph_output():
        return f"output of {producer.name} is also used elsewhere"
    if len(producer.inputs) < 2 or constant_array(producer.inputs[1]) is None:
        return f"weight of {producer.name} is not constant"
    return None


def _fold_into(node: ir.Node, a: np.ndarray, b: np.ndarray, graph: ir.Graph, names: NameAuthority) -> ir.Value | None:
    """Scale ``node``'s weight and bias by the BN affine and return the value now holding BN's result.

    None (and the node untouched) when the weight layout does not match BN's channels.
    """
    w_value = node.inputs[1]
    w = constant_array(w_value)
    dtype = w.dtype
    w64 = w.astype(np.float64)
    channels = a.shape[0]
    bias_index = 2
    if len(node.inputs) > bias_index and node.inputs[bias_index] is not None and constant_array(node.inputs[bias_index]) is None:
        return None  # a computed bias cannot be rescaled in place
    if node.op_type == "Conv":
        if w64.shape[0] != channels:
            return None
        w_new = w64 * a.reshape(-1, *([1] * (w64.ndim - 1)))
    elif node.op_type == "ConvTranspose":
        group = node.attributes.get("group").as_int() if "group" in node.attributes else 1
        c_in, c_out_g = w64.shape[0], w64.shape[1]
        if c_out_g * group != channels:
            return None
        w_new = (w64.reshape(group, c_in // group, c_out_g, -1) * a.reshape(group, 1, c_out_g, 1)).reshape(w64.shape)
    elif node.op_type == "Gemm":
        trans_b = node.attributes.get("transB").as_int() if "transB" in node.attributes else 0
        if w64.ndim != 2 or (w64.shape[0] if trans_b else w64.shape[1]) != channels:
            return None
        w_new = w64 * (a[:, None] if trans_b else a[None, :])
    else:  # MatMul: BN's channel axis 1 is the weight's output axis only for 2-D outputs
        out_shape = node.outputs[0].shape
        if w64.ndim != 2 or w64.shape[1] != channels or out_shape is None or len(out_shape) != 2:
            return None
        w_new = w64 * a[None, :]
    node.replace_input_with(1, add_initializer(graph, names, f"{w_value.name}_bnfolded", w_new.astype(dtype)))

    if node.op_type == "MatMul":
        # MatMul has no bias input: the BN shift becomes an Add after it.
        shift = add_initializer(graph, names, f"{node.name}_bn_shift", b.astype(dtype))
        out = node.outputs[0]
        add = ir.Node("", "Add", [out, shift], name=names.fresh(f"{node.name}_bn_add"))
        add.outputs[0].name = names.fresh(f"{out.name}_bn")
        add.outputs[0].dtype, add.outputs[0].shape = out.dtype, out.shape
        out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
        add.replace_input_with(0, out)
        graph.insert_after(node, add)
        return add.outputs[0]

    old_bias = constant_array(node.inputs[bias_index]) if len(node.inputs) > bias_index and node.inputs[bias_index] is not None else None
    if node.op_type == "Gemm":
        beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        c_eff = np.zeros(channels) if old_bias is None else beta * old_bias.astype(np.float64)
        new_bias = c_eff * a + b
        node.attributes["beta"] = ir.Attr("beta", ir.AttributeType.FLOAT, 1.0)
    else:
        new_bias = (np.zeros(channels) if old_bias is None else old_bias.astype(np.float64)) * a + b
    bias_value = add_initializer(graph, names, f"{node.name}_bias_bnfolded", new_bias.astype(dtype))
    if len(node.inputs) <= bias_index:
        node.resize_inputs(bias_index + 1)
    node.replace_input_with(bias_index, bias_value)
    return node.outputs[0]


def _bypass(bn: ir.Node, new_out: ir.Value, graph: ir.Graph) -> None:
    """Route BN's consumers to the folded op and let its output carry BN's name."""
    bn_out = bn.outputs[0]
    name = bn_out.name
    bn_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    # The folded tensor *is* what BN produced: keeping its name keeps per-layer matching by name.
    new_out.name = name


def _decompose(bn: ir.Node, a: np.ndarray, b: np.ndarray, graph: ir.Graph, names: NameAuthority) -> bool:
    x = bn.inputs[0]
    if x.shape is None:
        return False
    rank = len(x.shape)
    dtype = np.dtype(x.dtype.numpy()) if x.dtype is not None else np.float32
    bshape = (-1,) + (1,) * (rank - 2)
    scale = add_initializer(graph, names, f"{bn.name}_scale", a.reshape(bshape).astype(dtype))
    shift = add_initializer(graph, names, f"{bn.name}_shift", b.reshape(bshape).astype(dtype))
    mul = ir.Node("", "Mul", [x, scale], name=names.fresh(f"{bn.name}_mul"))
    add = ir.Node("", "Add", [mul.outputs[0], shift], name=names.fresh(f"{bn.name}_add"))
    mul.outputs[0].name = names.fresh(f"{bn.outputs[0].name}_scaled")
    for v in (mul.outputs[0], add.outputs[0]):
        v.dtype, v.shape = x.dtype, x.shape
    graph.insert_before(bn, [mul, add])
    _bypass(bn, add.outputs[0], graph)
    return True
