"""What each input of an ONNX op means to a quantizer: activation, weight (with its channel axis) or bias.

This is ONNX operator semantics, not a target's choice: targets decide *whether* an op runs
quantized; this module says *which* inputs are weights and along which axis their output channels lie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class InputRoles:
    """Indices of an op's inputs by role. ``weight_axis`` is the output-channel axis of the weight."""

    activations: tuple[int, ...]
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def input_roles(node: ir.Node) -> InputRoles:
    """The roles of ``node``'s inputs. Ops without weights list all float data inputs as activations."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return InputRoles(activations=tuple(range(len(node.inputs))))
    if op == "Conv":
        return InputRoles(activations=(0,), weight=1, weight_axis=0, bias=2 if len(node.inputs) > 2 else None)
    if op == "ConvTranspose":
        # Weight is [C_in, C_out/group, ...]: output channels on axis 1 when group == 1; with groups
        # they are split across axes 0 and 1, so no single axis holds them (per-tensor scales).
        axis = 1 if _attr_int(node, "group", 1) == 1 else None
        return InputRoles(activations=(0,), weight=1, weight_axis=axis, bias=2 if len(node.inputs) > 2 else None)
    if op == "Gemm":
        trans_b = _attr_int(node, "transB", 0)
        return InputRoles(activations=(0,), weight=1, weight_axis=0 if trans_b else 1, bias=2 if len(node.inputs) > 2 else None)
    if op == "MatMul":
        b = node.inputs[1]
        if b is not None and b.const_value is not None:
            return InputRoles(activations=(0,), weight=1, weight_axis=len(b.const_value.shape) - 1)
        return InputRoles(activations=(0, 1))
    if op in ("Reshape", "Slice", "Pad", "Squeeze", "Unsqueeze", "Expand", "Tile", "Gather", "Resize", "Upsample"):
        # Later inputs are shapes, indices, pads or scales: only the data input carries activations.
        return InputRoles(activations=(0,))
    return InputRoles(activations=tuple(range(len(node.inputs))))


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a constant one-element tensor, else None."""
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(-1)[0])


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a two-input node that is not ``value`` (None when both or neither are)."""
    ins = list(node.inputs)
    if len(ins) != 2 or (ins[0] is value) == (ins[1] is value):
        return None
    return ins[1] if ins[0] is value else ins[0]


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    consumers = value.consumers()
    if len(consumers) != 1 or value.is_graph_output() or consumers[0].op_type != op_type or consumers[0].domain not in ("", "ai.onnx"):
        return None
    return consumers[0]


def _gelu_erf(erf: ir.Node) -> list[ir.Node] | None:
    """The nodes of ``x * 0.5 * (1 + Erf(x / sqrt 2))`` around ``erf``, in the two orders exporters
    write it (torch: the 0.5 last; Hugging Face: ``(x * 0.5) * (1 + erf)``), else None."""
    scaled = erf.inputs[0] if erf.inputs else None
    div = scaled.producer() if scaled is not None else None
    if div is None or div.op_type not in ("Div", "Mul") or len(scaled.consumers()) != 1:
        return None
    ins = list(div.inputs)
    if len(ins) != 2 or any(v is None for v in ins):
        return None
    # x / sqrt 2, or x * (1 / sqrt 2) with the constant on either side.
    x, c = (ins[0], _scalar(ins[1])) if div.op_type == "Div" or _scalar(ins[0]) is None else (ins[1], _scalar(ins[0]))
    if c is None or c == 0 or _scalar(x) is not None or not np.isclose(c if div.op_type == "Div" else 1 / c, np.sqrt(2), rtol=1e-3):
        return None
    add = _only_consumer(erf.outputs[0], "Add")
    if add is None or not np.isclose(_scalar(_other_input(add, erf.outputs[0])) or 0.0, 1.0, rtol=1e-3):
        return None
    mul = _only_consumer(add.outputs[0], "Mul")
    other = _other_input(mul, add.outputs[0]) if mul is not None else None
    if other is None:
        return None
    if other is x:  # torch: (x * (1 + erf)) * 0.5
        half = _only_consumer(mul.outputs[0], "Mul")
        if half is None or not np.isclose(_scalar(_other_input(half, mul.outputs[0])) or 0.0, 0.5, rtol=1e-3):
            return None
        return [div, erf, add, mul, half]
    pre = other.producer()  # Hugging Face: (x * 0.5) * (1 + erf)
    if pre is None or pre.op_type != "Mul" or len(other.consumers()) != 1 or _other_input(pre, x) is None or not np.isclose(_scalar(_other_input(pre, x)) or 0.0, 0.5, rtol=1e-3):
        return None
    return [pre, div, erf, add, mul]


def decomposed_activations(graph: ir.Graph) -> dict[int, tuple[str, list[ir.Node]]]:
    """Activations written as several ops, by ``id`` of each of their nodes: (the op type they
    compute, all their nodes). Today: Gelu in its Erf form (opset < 20 has no Gelu op), whose
    Mul and Add a target quantizing Mul/Add would otherwise quantize one by one."""
    found: dict[int, tuple[str, list[ir.Node]]] = {}
    for node in graph:
        if node.op_type == "Erf" and node.domain in ("", "ai.onnx") and (nodes := _gelu_erf(node)) is not None:
            for n in nodes:
                found[id(n)] = ("Gelu", nodes)
    return found
